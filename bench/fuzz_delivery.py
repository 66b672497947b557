"""Fuzz progressive delivery: a device streaming through a hostile proxy (bench/hostile.py) of a real cloud that
mutates manifests and weight messages at random (``python bench/fuzz.py --delivery``).

Each round sets one mutation and lets the device poll (before a chunk round the chunk files in the device's cache
are deleted, since a new package of the same weights would otherwise be complete from the chunks it keeps by hash): a manifest mutation (any field of the manifest: ids,
versions, order, bits, planes, split point, tensors' names, shapes, dtypes, groups, scales, offsets and shift
targets, chunks' indices, sizes, hashes, units and stages, the metadata JSON, the final and package digests, the
signature, or random bytes flipped in the serialized message), re-sealed with a fresh package digest as a
hostile cloud would (so that the device's own checks are what is fuzzed), or a harmless one together with a
mutation of the weight messages of the stream it starts (bytes flipped, truncated, extended, wrong chunk index or
offset, the call cut). Then an image is classified through the device's local API.

Documented outcomes: the manifest is refused (counted by the device, logged), or streamed; a chunk is refused
(hash) and fetched again, or a cut call resumed. Undocumented: an image not answered, the device process gone or
not SERVING, a file written outside its weights cache. The device's peak RSS is reported against a bound.
"""

from __future__ import annotations

import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.hostile import Cut, HostileCloud  # noqa: E402
from bench.probes import free_port  # noqa: E402
from proto import spinn_v1_pb2 as pb  # noqa: E402
from proto import spinn_v1_pb2_grpc as pb_grpc  # noqa: E402

Manifest = pb.Manifest


def _pick(m: Manifest, g: random.Random, field: str):
    items = getattr(m, field)
    return items[g.randrange(len(items))] if len(items) else None


def _tensor_field(m: Manifest, g: random.Random) -> None:
    t = _pick(m, g, "tensors")
    if t is None:
        return
    what = g.choice(["name", "shape", "dtype", "group", "scales", "offsets", "shift_target", "shift_spread"])
    if what == "name":
        t.name = g.choice(["", "../x", "features.0.0.weight", "x" * 5000])
    elif what == "shape":
        t.shape[:] = g.choice([[], [0], [-1], [2 ** 40], [10 ** 9, 10 ** 9], [g.randint(1, 99)] * g.randint(1, 6)])
    elif what == "dtype":
        t.dtype = g.choice(["", "float64", "int8", "\0"])
    elif what in ("group", "shift_target", "shift_spread"):
        setattr(t, what, g.choice([-1, 2 ** 31 - 1, g.randint(0, len(m.tensors) + 2)]))
    else:
        setattr(t, what, g.randbytes(g.choice([0, 3, 4 * g.randint(1, 64), 4096])))


def _chunk_field(m: Manifest, g: random.Random) -> None:
    c = _pick(m, g, "chunks")
    if c is None:
        return
    what = g.choice(["index", "size", "sha256", "units", "raw", "stage"])
    if what == "index":
        c.index = g.choice([-1, 2 ** 31 - 1, c.index + 1])
    elif what == "size":
        c.size = g.choice([0, -5, 1, 2 ** 40, c.size + 1])
    elif what == "sha256":
        c.sha256 = g.choice(["", "zz" * 32, g.randbytes(32).hex()])
    elif what == "units":
        c.unit_groups.append(g.choice([-1, 0, 10 ** 6]))
    elif what == "raw":
        c.raw.append(g.choice([-1, 10 ** 6]))
    else:
        c.stage = g.choice(["x" * 100, "\0"])


def _header_field(m: Manifest, g: random.Random) -> None:
    what = g.choice(["model_id", "model_version", "digest", "order", "bits", "usable_planes", "usable_chunk",
                     "split_point", "corrected_planes", "final_sha256", "metadata_json", "signature"])
    value = {
        "model_id": lambda: g.choice(["", "/tmp/evil", "../..", "a\0b", "x" * 10_000]),
        "model_version": lambda: g.choice(["", "/etc", "..", "v" * 1000]),
        "digest": lambda: g.choice(["", "zz" * 32, g.randbytes(32).hex()]),
        "order": lambda: g.choice(["", "random", "../split"]),
        "bits": lambda: g.choice([-1, 0, 1, 25, 2 ** 31 - 1]),
        "usable_planes": lambda: g.choice([-1, 0, 99]),
        "usable_chunk": lambda: g.choice([-2, 2 ** 31 - 1]),
        "split_point": lambda: g.choice([-1, 99, 2 ** 31 - 1]),
        "corrected_planes": lambda: g.choice([-1, 99]),
        "final_sha256": lambda: g.choice(["", g.randbytes(32).hex()]),
        "metadata_json": lambda: g.choice(["", "[]", "{", "[" * 100_000, '{"model_config": 5}', "x" * (2 << 20)]),
        "signature": lambda: g.randbytes(g.choice([0, 64, 1000])),
    }[what]()
    if what in ("model_id", "model_version", "digest"):
        setattr(m.model, what, value)
    else:
        setattr(m, what, value)


def _flip_bytes(m: Manifest, g: random.Random) -> Manifest:
    data = bytearray(m.SerializeToString())
    for _ in range(g.randint(1, 8)):
        data[g.randrange(len(data))] = g.randrange(256)
    try:
        return Manifest.FromString(bytes(data))
    except Exception:  # bytes that no longer parse: the proxy could not send them as a manifest either
        return m


MANIFEST_MUTATIONS: dict[str, Callable[[Manifest, random.Random], None]] = {
    "tensor": _tensor_field, "chunk": _chunk_field, "header": _header_field}


def _applying(mutate: Callable[[Manifest, random.Random], None], g: random.Random) -> Callable[[Manifest], Manifest]:
    """A proxy hook that applies ``mutate`` in place and sends the result."""
    def hook(m: Manifest) -> Manifest:
        mutate(m, g)
        return m
    return hook


def _chunk_mutation(g: random.Random) -> Callable[[pb.WeightChunk, int], pb.WeightChunk]:
    kind = g.choice(["flip", "truncate", "extend", "index", "offset", "empty", "cut"])
    at = g.randint(0, 5)

    def mutate(message: pb.WeightChunk, i: int) -> pb.WeightChunk:
        if i != at:
            return message
        if kind == "cut":
            raise Cut()
        data = bytearray(message.data)
        if kind == "flip" and data:
            data[g.randrange(len(data))] ^= 0xFF
        elif kind == "truncate":
            data = data[:len(data) // 2]
        elif kind == "extend":
            data += g.randbytes(g.randint(1, 5000))
        elif kind == "index":
            message.index += g.choice([-1, 1, 10 ** 6])
        elif kind == "offset":
            message.offset += g.choice([-1, 1, 10 ** 9])
        elif kind == "empty":
            data = bytearray()
        message.data = bytes(data)
        return message

    mutate.kind = kind  # type: ignore[attr-defined]
    return mutate


def _nonce(round_: int) -> Callable[[Manifest], Manifest]:
    """A harmless mutation (a chunk's stage text): a new package digest, so the device streams it."""
    def mutate(m: Manifest) -> Manifest:
        if m.chunks:
            m.chunks[-1].stage = f"fuzz-{round_}"
        return m
    return mutate


def _device(proxy: str, cache: Path, listen: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "device", "serve", "--config", "apps/device.yml", "checkpoint=stream",
         f"cloud={proxy}", f"listen={listen}", f"weights_cache={cache}", "stream_poll_seconds=0.2",
         "z_confidence_threshold=1.0", "log_level=WARNING"], cwd=ROOT, stdout=log.open("w"),
        stderr=subprocess.STDOUT)


def _classify(stub, image: bytes) -> str:
    try:
        stub.Classify(pb.ClassifyRequest(image=image), timeout=30)
        return "OK"
    except grpc.RpcError as err:
        return err.code().name


def _outside(root: Path, cache: Path) -> set[str]:
    return {str(p) for p in root.rglob("*") if cache not in p.parents and p != cache and p.name != "device.log"}


def fuzz_delivery(cloud_address: str, image: bytes, rounds: int, seed: int, round_s: float = 0.6) -> dict:
    """``rounds`` rounds against a device streaming through a hostile proxy of ``cloud_address``; returns the
    outcomes and what went wrong, if anything (see the module docstring)."""
    from bench.fuzz import peak_rss_mb, serving

    g = random.Random(seed)
    proxy = HostileCloud(cloud_address)
    work = Path(tempfile.mkdtemp(prefix="spinn-fuzz-delivery-"))
    cache, listen = work / "cache", f"127.0.0.1:{free_port()}"
    device = _device(proxy.address, cache, listen, work / "device.log")
    stub = pb_grpc.DeviceStub(grpc.insecure_channel(listen))
    outcomes: Counter = Counter()
    unexpected: list[dict] = []
    started = time.monotonic()
    try:
        deadline = time.monotonic() + 120
        while not serving(listen):
            if time.monotonic() > deadline or device.poll() is not None:
                raise RuntimeError(f"the device did not become SERVING (see {work / 'device.log'})")
            time.sleep(0.3)
        _wait_for_first_manifest(cache, device, work, deadline=time.monotonic() + 300)
        before = _outside(work, cache)
        for i in range(rounds):
            name = _set_mutation(proxy, g, i)
            if name.startswith("chunks:"):  # chunks are kept by hash: without this the new package is on disk
                for chunk in cache.rglob("chunks/*.bin"):
                    chunk.unlink(missing_ok=True)
            time.sleep(round_s)
            code = _classify(stub, image)
            outcomes[(name, code)] += 1
            problems = ([f"classify {code}"] if code != "OK" else []) + \
                (["device exited"] if device.poll() is not None else []) + \
                (["files outside the cache"] if _outside(work, cache) != before else [])
            if problems:
                unexpected.append({"round": i, "mutation": name, "problems": problems})
                if device.poll() is not None:
                    break
        proxy.honest()
        alive = device.poll() is None and serving(listen)
        rss = peak_rss_mb(device.pid) if device.poll() is None else float("nan")
    finally:
        device.terminate()
        device.wait(30)
        proxy.stop()
    log_text = (work / "device.log").read_text(errors="replace")
    return {"rounds": rounds, "seconds": time.monotonic() - started, "unexpected": unexpected,
            "device_serving_after": alive, "device_peak_rss_mb": rss,
            # what the device said (logged at WARNING): refusals are documented outcomes; a traceback means a
            # state nobody foresaw, which the thread survived but which should be looked at
            "device_log": {"manifest_refusals_logged": log_text.count("refused: "),
                           "chunk_refusals": log_text.count("chunk refused"),
                           "packages_gone": log_text.count("no longer serves package"),
                           "tracebacks": log_text.count("Traceback")},
            "outcomes": {f"{name} -> {code}": n for (name, code), n in sorted(outcomes.items())}}


def _wait_for_first_manifest(cache: Path, device: subprocess.Popen, work: Path, deadline: float) -> None:
    """Wait until the device has taken the cloud's first (honest) manifest: the cloud builds a package on first
    request (seconds of a core, more on a loaded machine), and rounds spent waiting for it would fuzz nothing."""
    while not any(cache.rglob("manifest.pb")):
        if time.monotonic() > deadline or device.poll() is not None:
            raise RuntimeError(f"the device took no manifest (see {work / 'device.log'})")
        time.sleep(0.3)


def _set_mutation(proxy: HostileCloud, g: random.Random, round_: int) -> str:
    """One round's mutation on the proxy; returns its name."""
    proxy.honest()
    if g.random() < 0.6:
        kind = g.choice([*MANIFEST_MUTATIONS, "bytes", "unsealed"])
        if kind == "bytes":
            proxy.reseal = True
            proxy.manifest = lambda m: _flip_bytes(m, g)
        elif kind == "unsealed":  # altered without a new package digest: a mirror that changed a byte
            proxy.reseal = False
            proxy.manifest = _applying(_header_field, g)
        else:
            proxy.reseal = True
            proxy.manifest = _applying(MANIFEST_MUTATIONS[kind], g)
        return f"manifest:{kind}"
    proxy.reseal = True
    proxy.manifest = _nonce(round_)
    proxy.chunk = _chunk_mutation(g)
    return f"chunks:{proxy.chunk.kind}"  # type: ignore[attr-defined]
