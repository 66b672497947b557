"""Fuzz both daemons over loopback: mutated FeatureRequests against the cloud, hostile images against the device.

    python bench/fuzz.py [--requests 10000] [--images 1000] [--seed 0] [--checkpoint PATH] [--name fuzz]

Starts ``python -m cloud`` and ``python -m device serve`` as their own processes on free loopback ports (a small
random model when no checkpoint is given: the fuzz is about the wire, not about accuracy), then sends:

- ``--requests`` requests, each a valid request for a random served split point with one mutation (every field
  of FeatureRequest: model, split point, shape, dtype, codec enums and affine parameters, data truncated /
  extended / random / a compression bomb, top_k, cloud_exit_threshold, JPEG where it does not belong, a learned
  code where there is no bottleneck or one with a corrupt ANS / zstd payload), or the
  serialised request with random bytes flipped, sent raw;
- ``--images`` hostile images to the device's Classify API: bombs by aspect ratio, pixel count and bytes,
  truncated and corrupt JPEG/PNG/GIF/TIFF, odd modes (1, L, LA, P, I;16, I, F, CMYK, RGBA), empty and random
  bytes, and valid ones.

Pass: every answer is OK or a documented status (below), both daemons answer health SERVING afterwards, and
their peak resident memory (VmHWM) stays under ``--max-rss-mb``. Results in bench/results/<name>.{json,md}.

    python bench/fuzz.py --delivery 300 --name fuzz_delivery

fuzzes progressive delivery instead (bench/fuzz_delivery.py): a ``python -m device serve`` streaming its weights
through a hostile proxy of the cloud that mutates manifests and weight messages.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import grpc
import numpy as np
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.probes import free_port  # noqa: E402
from proto import spinn_v1_pb2 as pb  # noqa: E402
from proto import spinn_v1_pb2_grpc as pb_grpc  # noqa: E402
from proto.codec import CodecSpec, encode  # noqa: E402

OK, BAD, REFUSED, BUSY = "OK", "INVALID_ARGUMENT", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED"
#: What a mutated request may be answered with. Raw random bytes may not even parse: gRPC answers those
#: INTERNAL itself ("Exception deserializing request") before any servicer code runs.
CLOUD_CODES = {OK, BAD, REFUSED, BUSY}
RAW_CODES = CLOUD_CODES | {"INTERNAL"}
DEVICE_CODES = {OK, BAD, BUSY}


def valid_request(info: pb.ModelInfo, rng: random.Random) -> pb.FeatureRequest:
    """A well-formed request for a random split point of the served model (random activation); at a split with a
    bottleneck (``code_shape`` announced) half of them a random learned+zstd code instead."""
    split = rng.choice(list(info.split_points))
    batch = rng.randint(1, 2)
    if split.code_shape and rng.random() < 0.5:
        features = learned_features(batch, tuple(split.code_shape), rng)
    else:
        spec = rng.choice([CodecSpec("float32", "none"), CodecSpec("int8", "zstd"), CodecSpec("float16", "zlib"),
                           CodecSpec("int4", "zstd", per_channel=True)])
        features = encode(torch.randn(batch, *split.activation_shape), spec)
    return pb.FeatureRequest(request_id=f"f{rng.randrange(1 << 30)}", model=info.model,
                             split_point=split.split_point, features=features, top_k=rng.randint(0, 5))


def learned_features(batch: int, code_shape: tuple[int, ...], rng: random.Random) -> pb.Tensor:
    """A valid learned+zstd code of ``(batch, *code_shape)`` (int8 values in [-1, 1]: inside any code_max) as the
    ``Tensor`` a device sends; zstd needs no frequency table, so the fuzzer needs no checkpoint."""
    import zstandard

    n = batch * int(np.prod(code_shape))
    values = np.array([rng.randint(-1, 1) for _ in range(n)], dtype=np.int8)
    return pb.Tensor(shape=[batch, *code_shape], dtype="int8", data=zstandard.ZstdCompressor().compress(
        values.tobytes()), codec=pb.Codec(quantization=pb.Codec.LEARNED, compression=pb.Codec.ZSTD))


def _bomb(n: int) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(b"\0" * n)


#: name -> mutation of a valid request (in place).
MUTATIONS: dict[str, Callable[[pb.FeatureRequest, random.Random], None]] = {
    "split_point": lambda r, g: setattr(r, "split_point", g.choice([-1, 20, 99, 2**31 - 1, -2**31])),
    "model": lambda r, g: setattr(r.model, g.choice(["model_id", "model_version"]), g.choice(["", "x", "é" * 50])),
    "digest": lambda r, g: setattr(r.model, "digest", g.choice(["", "ab" * 31, "zz" * 32, "AB" * 32, "é" * 64,
                                                               g.randbytes(32).hex(), r.model.digest + "0"])),
    "shape": lambda r, g: (r.features.ClearField("shape"),
                           r.features.shape.extend(g.choice([[], [0], [1, 2**40, 1, 1], [-1, 3, 4, 4],
                                                             [g.randint(0, 99) for _ in range(g.randint(1, 6))]]))),
    "batch": lambda r, g: r.features.shape.__setitem__(0, g.choice([0, 17, 1000, 2**31 - 1])),
    "dtype": lambda r, g: setattr(r.features, "dtype", g.choice(["", "float64", "int8", "\0", "f" * 1000])),
    "quantization": lambda r, g: setattr(r.features.codec, "quantization", g.choice([5, 77, -3, 2**31 - 1])),
    "compression": lambda r, g: setattr(r.features.codec, "compression", g.choice([3, 99, -1])),
    "truncate": lambda r, g: setattr(r.features, "data", r.features.data[:g.randrange(max(1, len(r.features.data)))]),
    "extend": lambda r, g: setattr(r.features, "data", r.features.data + g.randbytes(g.randint(1, 64))),
    "random_data": lambda r, g: setattr(r.features, "data", g.randbytes(g.randint(0, 4096))),
    "zstd_bomb": lambda r, g: (setattr(r.features.codec, "compression", pb.Codec.ZSTD),
                               setattr(r.features, "data", _bomb(g.choice([10**6, 10**7])))),
    "affine": lambda r, g: (r.features.codec.ClearField("scale"),
                            r.features.codec.scale.extend(g.choice([[], [float("nan")], [float("inf")] * 3,
                                                                    [1.0] * g.randint(2, 50)]))),
    "zero_point": lambda r, g: r.features.codec.zero_point.extend([float("nan")] * g.randint(1, 3)),
    "top_k": lambda r, g: setattr(r, "top_k", g.choice([-1, -2**31, 2**31 - 1, 10**6])),
    "cloud_exit_threshold": lambda r, g: setattr(r, "cloud_exit_threshold", g.choice([float("nan"), -0.5, 1.5,
                                                                                      float("inf")])),
    # a code where there is none or of another coder: ANS words that are random, ZSTD of values out of range
    "learned": lambda r, g: (setattr(r.features.codec, "quantization", pb.Codec.LEARNED),
                             setattr(r.features, "dtype", "int8"),
                             setattr(r.features.codec, "compression", g.choice([pb.Codec.ANS, pb.Codec.ZSTD])),
                             setattr(r.features, "data", g.choice([b"", g.randbytes(4 * g.randint(1, 64)),
                                                                   _bomb(g.choice([64, 10**6]))]))),
    "jpeg": lambda r, g: (setattr(r.features.codec, "quantization", pb.Codec.JPEG),
                          setattr(r.features, "data", g.choice([b"", b"\xff\xd8\xff\xe0" + g.randbytes(200),
                                                                r.features.data]))),
}


def fuzz_cloud(address: str, count: int, seed: int = 0, timeout_s: float = 30.0) -> dict:
    """Send ``count`` mutated requests to the cloud at ``address``; count the status codes per mutation.

    Returns ``{"by_mutation": {name: {code: n}}, "unexpected": [...], "count": n, "seconds": s}``.
    """
    rng = random.Random(seed)
    channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)])
    stub = pb_grpc.InferenceStub(channel)
    raw = channel.unary_unary("/spinn.v1.Inference/Infer", request_serializer=None,
                              response_deserializer=pb.Prediction.FromString)
    info = stub.GetModelInfo(pb.ModelInfoRequest(), timeout=timeout_s)
    by: dict[str, Counter] = {}
    unexpected = []
    started = time.monotonic()
    names = [*MUTATIONS, "raw_bytes"]
    for i in range(count):
        name = names[i % len(names)]
        request = valid_request(info, rng)
        try:
            if name == "raw_bytes":
                data = bytearray(request.SerializeToString())
                for _ in range(rng.randint(1, 8)):
                    data[rng.randrange(len(data))] = rng.randrange(256)
                raw(bytes(data), timeout=timeout_s)
            else:
                MUTATIONS[name](request, rng)
                stub.Infer(request, timeout=timeout_s)
            code = OK
        except grpc.RpcError as err:
            code = err.code().name
            if code not in (RAW_CODES if name == "raw_bytes" else CLOUD_CODES):
                unexpected.append({"mutation": name, "code": code, "details": err.details()})
        by.setdefault(name, Counter())[code] += 1
    channel.close()
    return {"count": count, "seconds": time.monotonic() - started, "unexpected": unexpected,
            "by_mutation": {k: dict(v) for k, v in sorted(by.items())}}


def _encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def hostile_image(kind: str, rng: random.Random) -> bytes:
    """One image of ``kind`` (see ``IMAGE_KINDS``)."""
    side = rng.randint(1, 96)
    noise = Image.fromarray(np.random.default_rng(rng.randrange(1 << 30)).integers(0, 256, (side, side, 3),
                                                                                   dtype=np.uint8))
    if kind == "valid":
        return _encoded(noise, rng.choice(["PNG", "JPEG", "BMP", "WEBP"]))
    if kind == "thin":  # aspect-ratio bomb: tiny file, tiny pixel count, enormous once resized
        return _encoded(Image.new("L", rng.choice([(2_000_000, 1), (1, 500_000), (60_000, 3)])), "PNG")
    if kind == "pixels":  # pixel bomb: small file, over max_image_pixels
        return _encoded(Image.new("1", rng.choice([(9000, 9000), (30000, 2000)])), "PNG", optimize=True)
    if kind == "bytes":  # over max_image_bytes (the device under fuzz runs with a 1 MiB limit)
        return _encoded(noise, "PNG") + rng.randbytes(1_100_000)
    if kind == "truncated":
        data = _encoded(noise, rng.choice(["PNG", "JPEG", "GIF", "TIFF"]))
        return data[:rng.randrange(1, max(2, len(data) - 1))]
    if kind == "corrupt":
        data = bytearray(_encoded(noise, rng.choice(["PNG", "JPEG", "GIF", "TIFF"])))
        for _ in range(rng.randint(1, 20)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    if kind == "mode":
        mode = rng.choice(["1", "L", "LA", "P", "I;16", "I", "F", "CMYK", "RGBA", "YCbCr"])
        fmt = {"CMYK": "JPEG", "YCbCr": "JPEG", "F": "TIFF", "I": "TIFF", "I;16": "PNG"}.get(mode, "PNG")
        return _encoded(noise.convert(mode) if mode not in ("I;16", "I", "F") else noise.convert("L").convert(mode),
                        fmt)
    if kind == "empty":
        return b""
    return rng.randbytes(rng.randint(1, 2048))  # "random"


IMAGE_KINDS = ["valid", "thin", "pixels", "bytes", "truncated", "corrupt", "mode", "empty", "random"]


def fuzz_device(address: str, count: int, seed: int = 0, timeout_s: float = 60.0) -> dict:
    """Send ``count`` hostile images to the device's Classify API at ``address``; count codes per kind."""
    rng = random.Random(seed)
    channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)])
    stub = pb_grpc.DeviceStub(channel)
    by: dict[str, Counter] = {}
    unexpected = []
    started = time.monotonic()
    for i in range(count):
        kind = IMAGE_KINDS[i % len(IMAGE_KINDS)]
        try:
            stub.Classify(pb.ClassifyRequest(request_id=str(i), image=hostile_image(kind, rng)), timeout=timeout_s)
            code = OK
        except grpc.RpcError as err:
            code = err.code().name
            if code not in DEVICE_CODES:
                unexpected.append({"kind": kind, "code": code, "details": err.details()})
        by.setdefault(kind, Counter())[code] += 1
    channel.close()
    return {"count": count, "seconds": time.monotonic() - started, "unexpected": unexpected,
            "by_kind": {k: dict(v) for k, v in sorted(by.items())}}


def serving(address: str, timeout_s: float = 5.0) -> bool:
    """Whether the daemon at ``address`` answers health SERVING."""
    with grpc.insecure_channel(address) as channel:
        try:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.RpcError:
            return False
    return status.status == health_pb2.HealthCheckResponse.SERVING


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory (VmHWM) of process ``pid``, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def small_checkpoint(folder: Path) -> Path:
    """A narrow random 10-class model at 32 px with a bottleneck at split 9 (learned codes on the wire too): what
    the wire sees is the same as for a trained one."""
    from models.bottleneck import BottleneckConfig
    from models.checkpoint import save_checkpoint
    from models.datasets import Preprocess
    from models.early_exit import EarlyExitMobileNetV2, ModelConfig

    torch.manual_seed(0)
    model = EarlyExitMobileNetV2(ModelConfig(width_mult=0.35, num_classes=10, exits=[3, 9], exit_channels=16,
                                             bottleneck=BottleneckConfig(split_point=9, channels=4, hidden=8)))
    path = folder / "fuzz_model.pt"
    save_checkpoint(path, model.eval(), [f"c{i}" for i in range(10)], Preprocess(32, 32, (0.5,) * 3, (0.25,) * 3))
    return path


def start_daemons(checkpoint: Path) -> tuple[subprocess.Popen, subprocess.Popen, str, str]:
    """``python -m cloud`` and ``python -m device serve`` on free loopback ports, waited for until SERVING."""
    cloud_address, device_address = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    cloud = subprocess.Popen([sys.executable, "-m", "cloud", "--config", "apps/cloud.yml", f"checkpoint={checkpoint}",
                              f"address={cloud_address}", "log_level=WARNING"], cwd=ROOT)
    device = subprocess.Popen([sys.executable, "-m", "device", "serve", "--config", "apps/device.yml",
                               f"checkpoint={checkpoint}", f"cloud={cloud_address}", f"listen={device_address}",
                               "split_point=9", "max_image_bytes=1048576", "log_level=WARNING"], cwd=ROOT)
    deadline = time.monotonic() + 120
    while not (serving(cloud_address) and serving(device_address)):
        if time.monotonic() > deadline or cloud.poll() is not None or device.poll() is not None:
            cloud.kill(), device.kill()
            raise RuntimeError("the daemons did not become SERVING")
        time.sleep(0.3)
    return cloud, device, cloud_address, device_address


def report(name: str, result: dict) -> None:
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Fuzz ({result['command']})", "",
             f"- cloud: {result['cloud']['count']} requests in {result['cloud']['seconds']:.0f} s, "
             f"{len(result['cloud']['unexpected'])} with an undocumented status; peak RSS "
             f"{result['cloud_peak_rss_mb']:.0f} MiB; SERVING afterwards: {result['cloud_serving_after']}",
             f"- device: {result['device']['count']} images in {result['device']['seconds']:.0f} s, "
             f"{len(result['device']['unexpected'])} with an undocumented status; peak RSS "
             f"{result['device_peak_rss_mb']:.0f} MiB; SERVING afterwards: {result['device_serving_after']}",
             f"- memory bound {result['max_rss_mb']} MiB per daemon: {'held' if result['passed'] else 'NOT held'}",
             "", "| cloud mutation | answers |", "|---|---|"]
    lines += [f"| {k} | {', '.join(f'{c} {n}' for c, n in sorted(v.items()))} |"
              for k, v in result["cloud"]["by_mutation"].items()]
    lines += ["", "| device image | answers |", "|---|---|"]
    lines += [f"| {k} | {', '.join(f'{c} {n}' for c, n in sorted(v.items()))} |"
              for k, v in result["device"]["by_kind"].items()]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--images", type=int, default=1_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--max-rss-mb", type=float, default=1024.0)
    parser.add_argument("--name", default="fuzz")
    parser.add_argument("--delivery", type=int, default=0, help="rounds of delivery fuzzing instead (0: off)")
    args = parser.parse_args(argv)
    if args.delivery:
        return main_delivery(args, argv)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint) if args.checkpoint else small_checkpoint(Path(tmp))
        cloud, device, cloud_address, device_address = start_daemons(checkpoint)
        try:
            result = {"command": "python bench/fuzz.py " + " ".join(argv), "max_rss_mb": args.max_rss_mb,
                      "cloud": fuzz_cloud(cloud_address, args.requests, args.seed),
                      "device": fuzz_device(device_address, args.images, args.seed)}
            result.update(cloud_serving_after=serving(cloud_address), device_serving_after=serving(device_address),
                          cloud_peak_rss_mb=peak_rss_mb(cloud.pid), device_peak_rss_mb=peak_rss_mb(device.pid))
        finally:
            cloud.terminate(), device.terminate()
            cloud.wait(30), device.wait(30)
    result["passed"] = (not result["cloud"]["unexpected"] and not result["device"]["unexpected"]
                        and result["cloud_serving_after"] and result["device_serving_after"]
                        and max(result["cloud_peak_rss_mb"], result["device_peak_rss_mb"]) < args.max_rss_mb)
    report(args.name, result)
    return 0 if result["passed"] else 1


def start_cloud(checkpoint: Path) -> tuple[subprocess.Popen, str]:
    """``python -m cloud`` on a free loopback port, waited for until SERVING."""
    address = f"127.0.0.1:{free_port()}"
    cloud = subprocess.Popen([sys.executable, "-m", "cloud", "--config", "apps/cloud.yml", f"checkpoint={checkpoint}",
                              f"address={address}", "log_level=WARNING", "delivery_chunk_bytes=4096"], cwd=ROOT)
    deadline = time.monotonic() + 120
    while not serving(address):
        if time.monotonic() > deadline or cloud.poll() is not None:
            cloud.kill()
            raise RuntimeError("the cloud did not become SERVING")
        time.sleep(0.3)
    return cloud, address


def main_delivery(args: argparse.Namespace, argv: list[str]) -> int:
    from bench.fuzz_delivery import fuzz_delivery

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint) if args.checkpoint else small_checkpoint(Path(tmp))
        cloud, address = start_cloud(checkpoint)
        try:
            result = fuzz_delivery(address, hostile_image("valid", random.Random(args.seed)), args.delivery,
                                   args.seed)
        finally:
            cloud.terminate()
            cloud.wait(30)
    result.update(command="python bench/fuzz.py " + " ".join(argv), max_rss_mb=args.max_rss_mb)
    result["passed"] = (not result["unexpected"] and result["device_serving_after"]
                        and result["device_peak_rss_mb"] < args.max_rss_mb and not result["device_log"]["tracebacks"])
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Delivery fuzz ({result['command']})", "",
             f"- {result['rounds']} rounds in {result['seconds']:.0f} s: {len(result['unexpected'])} with an "
             f"undocumented outcome (an image not answered, the device gone, a file outside its cache)",
             f"- device SERVING afterwards: {result['device_serving_after']}; peak RSS "
             f"{result['device_peak_rss_mb']:.0f} MiB (bound {args.max_rss_mb:.0f} MiB): "
             f"{'passed' if result['passed'] else 'FAILED'}",
             f"- the device's log: {result['device_log']}", "", "| mutation -> classify answer | rounds |", "|---|---|"]
    lines += [f"| {k} | {n} |" for k, n in result["outcomes"].items()]
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
