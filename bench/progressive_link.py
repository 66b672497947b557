"""Progressive delivery over a shaped link: a device with nothing, a cloud behind 1 Mbit/s.

    sudo python bench/progressive_link.py app:apps/cars_dev_test.yml \
        checkpoint=../shared/models/cars_dev_joint20.pt image_size=128 resize_size=128 --name cars_dev

The cloud (``python -m cloud``) and a device driver run as separate processes in two network namespaces joined
by a veth pair shaped with ``tc tbf`` (``--rate``, default 1 Mbit/s each way; no added delay: the RTT is the
veth's plus the queue's). The driver starts a ``DeviceRuntime`` with ``checkpoint: stream`` and an empty
weights cache (its Python start-up is not counted: the clock starts when the runtime starts), then classifies
validation images one after another until the whole model is on the device and ``--steady`` more requests
have been answered (a second loop does the same with the images a device exit answers at full precision, so that
device-side latency is sampled often while chunks are being swapped in; both loops run until each has
``--steady`` requests answered after the model is complete; ``--loops local`` runs the second loop alone, so that
its latency while swapping and in steady state differ by the swaps only, not by how much the first loop
offloads). Then it downloads the float32 checkpoint with ``GetCheckpoint`` over the same link while the second
loop's images are classified again: the control, the cost of receiving at the link's rate with nothing swapped.

Reported: time to the first answer, to the first answer equal to the full model's, to a usable head (answers
at the split point), to the whole model; the checkpoint download time; classify latency p50/p99 while chunks
are swapped in vs in steady state (all requests, and those the device answered itself); total bytes.
``--plane-coder context``: the cloud codes the planes with the context coder (models/progressive/context.py), so
the device's decode cost per chunk is that coder's. Writes ``bench/results/progressive_link_<name>.{json,md}``.
Needs root (namespaces); loopback-free.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import netns  # noqa: E402
from bench.report import write_results  # noqa: E402
from models.progressive import PLANE_CODERS  # noqa: E402

PORT = 50051


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def drive(args: argparse.Namespace, app_args: list[str]) -> dict:
    """Inside the device namespace: the runtime with nothing, a request loop, then the checkpoint download."""
    import logging

    import torch

    from bench.progressive import load
    from device.config import DeviceConfig
    from device.runtime import DeviceRuntime
    from models.app_config import AppConfig
    from models.config import from_dict, parse_app_argv

    logging.basicConfig(level=logging.WARNING)
    app = parse_app_argv(AppConfig, app_args)
    ckpt, batches = load(app, args.limit)
    images = [x for xs, _ in batches for x in xs]
    with torch.no_grad():  # reference answers of the full-precision model, computed here, not sent
        expected = [int(ckpt.model(x.unsqueeze(0))[-1].argmax()) for x in images]
    split = app.split_point if app.split_point is not None else max(ckpt.model.exit_points)
    # insecure: the namespaces are this benchmark's own, on this machine (bench/netns.py)
    cfg = from_dict(DeviceConfig, {"checkpoint": "stream", "cloud": args.cloud, "insecure": True, "split_point": split,
                                   "z_confidence_threshold": args.threshold, "deadline_ms": 5000,
                                   "weights_cache": args.cache, "log_level": "WARNING",
                                   "stream_nice": args.stream_nice, "stream_swap_ms": args.swap_ms,
                                   "stream_decode_process": not args.decode_in_thread})
    local = local_images(ckpt.model, images, split, args.threshold)
    torch.set_num_threads(1)  # the device: one core, the other one is the cloud's
    started = time.perf_counter()
    runtime = DeviceRuntime.start(cfg)
    rows: list[dict] = []
    loops = args.loops.split(",")
    steady = {name: 0 for name in loops}  # requests answered by the complete model, per loop

    def until_steady() -> bool:
        # both loops run until both have --steady requests after completion, so that the device-answered
        # requests see the same competition for the cores while swapping and in steady state
        return min(steady.values()) < args.steady

    def loop(probe: str, indices: list[int], more: Callable[[], bool] = until_steady) -> None:
        i = 0
        while more() and time.perf_counter() - started < args.timeout:
            k = indices[i % len(indices)]
            active = runtime.active
            t = time.perf_counter() - started
            result = runtime.classify_tensor(images[k])
            rows.append({"probe": probe, "t": t, "latency_ms": result.latency_ms, "answered_by": result.answered_by,
                         "degraded": result.degraded, "split_point": result.split_point,
                         "weights_fraction": result.weights_fraction, "complete": bool(active and active.complete),
                         "equal_to_full": result.class_id == expected[k]})
            if probe in steady:
                steady[probe] += rows[-1]["complete"]
            i += 1

    indices = {"all": list(range(len(images))), "local": local or [0]}
    threads = [threading.Thread(target=loop, args=(name, indices[name])) for name in loops]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stream = runtime.streamed.current if runtime.streamed else None
        streamed = {"total_bytes": stream.manifest.total_bytes, "float32_bytes": stream.manifest.float32_bytes,
                    "chunks": len(stream.manifest.chunks), "digest_ok": stream.digest() ==
                    stream.manifest.final_sha256} if stream else {}
        # The control: the device's own answers while the same link carries a plain download and nothing is
        # decoded or swapped, so that what receiving 1 Mbit/s costs on these cores is told apart from the swaps.
        downloading = threading.Event()
        downloading.set()
        probe = threading.Thread(target=loop, args=("download", indices["local"], downloading.is_set))
        probe.start()
        try:
            size, download_s = download(cfg, args.timeout)
        finally:
            downloading.clear()
            probe.join()
    finally:
        runtime.close()
    return {"rows": rows, "streamed": streamed, "checkpoint_bytes": size, "checkpoint_download_s": download_s,
            "split_point": split}


def download(cfg, timeout_s: float) -> tuple[int, float]:
    """The float32 checkpoint over GetCheckpoint: (bytes, seconds)."""
    from device.link import CloudLink

    link = CloudLink(cfg)
    try:
        t0 = time.perf_counter()
        size = len(link.fetch_checkpoint(timeout_s=timeout_s)[0])
        return size, time.perf_counter() - t0
    finally:
        link.close()


def local_images(model, images: list, split: int, threshold: float) -> list[int]:
    """Indices of the images a device exit answers at full precision (the second request loop cycles them, so
    that device-side latency is sampled often while chunks are swapped in)."""
    import torch

    from models.exit_policy import confidence
    from models.partition import Head

    head = Head(model, split)
    with torch.no_grad():
        return [i for i, x in enumerate(images)
                if any(float(confidence(e[0])) >= threshold for e in head(x.unsqueeze(0)).exit_logits)]


def first(rows: list[dict], predicate) -> float | None:
    return next((r["t"] + r["latency_ms"] / 1000 for r in rows if predicate(r)), None)


def summarize(run: dict, args: argparse.Namespace) -> dict:
    split = run["split_point"]
    rows = sorted(run["rows"], key=lambda r: r["t"])
    control = [r["latency_ms"] for r in rows if r["probe"] == "download" and r["answered_by"] != "cloud"]
    rows = [r for r in rows if r["probe"] != "download"]
    swapping = [r for r in rows if not r["complete"]]
    steady = [r for r in rows if r["complete"]]
    out = {
        "rate_bit_s": args.rate, "threshold": args.threshold, "requests": len(rows), "split_point": split,
        "stream_nice": args.stream_nice, "decode": "thread" if args.decode_in_thread else "process",
        "loops": args.loops, "swap_ms": args.swap_ms, "chunk_bytes": args.chunk_bytes,
        "cloud_nice": args.cloud_nice, "plane_coder": args.plane_coder,
        "first_answer_s": first(rows, lambda r: True),
        "first_answer_equal_to_full_s": first(rows, lambda r: r["equal_to_full"]),
        "first_answer_at_split_s": first(rows, lambda r: r["split_point"] == split),
        "whole_model_s": first(rows, lambda r: r["complete"]),
        "checkpoint_bytes": run["checkpoint_bytes"], "checkpoint_download_s": run["checkpoint_download_s"],
        "degraded": sum(1 for r in rows if r["degraded"]), **run["streamed"],
    }
    for name, subset in (("all", lambda r: r["probe"] == "all"),
                         ("device_answered", lambda r: r["answered_by"] != "cloud")):
        during = [r["latency_ms"] for r in swapping if subset(r) and r["split_point"] == split]
        after = [r["latency_ms"] for r in steady if subset(r)]
        out[f"latency_{name}"] = {
            "swapping_n": len(during), "swapping_p50_ms": percentile(during, 50), "swapping_p99_ms":
            percentile(during, 99), "steady_n": len(after), "steady_p50_ms": percentile(after, 50),
            "steady_p99_ms": percentile(after, 99)}
        if during and after:
            out[f"latency_{name}"]["p99_ratio"] = percentile(during, 99) / percentile(after, 99)
    after = out["latency_device_answered"]["steady_p99_ms"]
    out["latency_device_during_download"] = {
        "n": len(control), "p50_ms": percentile(control, 50), "p99_ms": percentile(control, 99),
        "p99_ratio": percentile(control, 99) / after if control and after else None}
    return out


def markdown(s: dict, name: str, command: str) -> str:
    def ratio(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f} s ({100 * x / s['checkpoint_download_s']:.1f} % of the download)"

    lines = [f"# Progressive delivery over a {s['rate_bit_s'] / 1e6:g} Mbit/s link: {name}", "", f"`{command}`", "",
             f"Cloud and device in two network namespaces, veth shaped with tc tbf each way (no added delay). "
             f"Device split point {s['split_point']}, threshold {s['threshold']}, stream_nice {s['stream_nice']}, "
             f"stream_swap_ms {s.get('swap_ms', 0):g}, "
             f"chunks decoded in a {s.get('decode', 'thread')}, planes coded with {s.get('plane_coder', 'zstd')}, "
             f"{s['requests']} requests from the loop(s) {s.get('loops', 'all,local')}, {s['degraded']} degraded.",
             "",
             f"- float32 checkpoint ({s['checkpoint_bytes']:,} B) over GetCheckpoint: "
             f"**{s['checkpoint_download_s']:.1f} s**",
             f"- first answer (split point 0, the cloud runs the whole model): {ratio(s['first_answer_s'])}",
             f"- first answer equal to the full model's: {ratio(s['first_answer_equal_to_full_s'])}",
             f"- first answer at the device's split point (head usable): {ratio(s['first_answer_at_split_s'])}",
             f"- whole model on the device ({s.get('total_bytes', 0):,} B in {s.get('chunks', 0)} chunks, final "
             f"SHA-256 {'verified' if s.get('digest_ok') else 'NOT verified'}): {ratio(s['whole_model_s'])}", "",
             "| classify latency at the split point | n while swapping | p50 | p99 | n steady | p50 | p99 | "
             "p99 ratio |", "|---|---|---|---|---|---|---|---|"]
    for key, label in (("latency_all", "all requests"), ("latency_device_answered", "answered on the device")):
        v = s[key]
        fmt = (lambda x: "-" if x is None else f"{x:.1f} ms")
        lines.append(f"| {label} | {v['swapping_n']} | {fmt(v['swapping_p50_ms'])} | {fmt(v['swapping_p99_ms'])} | "
                     f"{v['steady_n']} | {fmt(v['steady_p50_ms'])} | {fmt(v['steady_p99_ms'])} | "
                     f"{v.get('p99_ratio', float('nan')):.2f} |")
    c = s.get("latency_device_during_download")
    if c and c["n"]:
        lines += ["", f"Control: the device's own answers while the same link carries the float32 download above "
                      f"(nothing decoded or swapped), after the model is complete: {c['n']} requests, p50 "
                      f"{c['p50_ms']:.1f} ms, p99 {c['p99_ms']:.1f} ms, **{c['p99_ratio']:.2f}x** the steady p99."]
    return "\n".join(lines) + "\n"


def wait_serving(hosts: netns.TwoHosts, address: str, cloud: subprocess.Popen, timeout_s: float) -> None:
    probe = ("import grpc,sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; "
             "s=g.HealthStub(grpc.insecure_channel(sys.argv[1])); "
             "sys.exit(0 if s.Check(h.HealthCheckRequest(),timeout=2,wait_for_ready=True).status==1 else 1)")
    deadline = time.monotonic() + timeout_s
    while subprocess.run([*hosts.exec(hosts.device_ns), sys.executable, "-c", probe, address],
                         capture_output=True).returncode != 0:
        if cloud.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the cloud did not become SERVING across the link")
        time.sleep(0.5)


def run(args: argparse.Namespace, app_args: list[str]) -> dict:
    from models.app_config import AppConfig
    from models.config import parse_app_argv

    app = parse_app_argv(AppConfig, app_args)
    split = app.split_point
    with netns.two_hosts(args.rate) as hosts:
        address = f"{hosts.cloud_ip}:{PORT}"
        cloud = subprocess.Popen(
            [*hosts.exec(hosts.cloud_ns), "nice", "-n", str(args.cloud_nice), sys.executable, "-m", "cloud",
             f"checkpoint={app.checkpoint_path()}", f"address={address}", "insecure=true", "log_level=WARNING",
             "intra_op_threads=1",
             f"delivery_prebuild=[{split if split is not None else ''}]",
             f"delivery_chunk_bytes={args.chunk_bytes}", f"delivery_plane_coder={args.plane_coder}"], cwd=ROOT)
        try:
            wait_serving(hosts, address, cloud, 120)
            cache = Path(args.cache)
            subprocess.run(["rm", "-rf", str(cache)], check=True)
            driver = subprocess.run(
                [*hosts.exec(hosts.device_ns), sys.executable, __file__, "--driver", "--cloud", address,
                 "--cache", str(cache), *sys.argv[1:]], cwd=ROOT, capture_output=True, text=True,
                timeout=args.timeout + 600)
            if driver.returncode != 0:
                raise RuntimeError(f"driver failed: {driver.stderr[-3000:]}")
            return json.loads(driver.stdout.splitlines()[-1])
        finally:
            cloud.terminate()
            cloud.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=int, default=1_000_000, help="link rate each way, bit/s")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--steady", type=int, default=300, help="requests per loop after the model is complete")
    parser.add_argument("--limit", type=int, default=256, help="validation images cycled through")
    parser.add_argument("--stream-nice", type=int, default=10, help="the device's stream_nice")
    parser.add_argument("--cloud-nice", type=int, default=0,
                        help="the cloud process's nice value (here it shares the device's cores; on two machines "
                             "it would not)")
    parser.add_argument("--chunk-bytes", type=int, default=16384, help="the cloud's delivery_chunk_bytes")
    parser.add_argument("--plane-coder", default="zstd", choices=PLANE_CODERS,
                        help="the cloud's delivery_plane_coder (how each bit plane is coded)")
    parser.add_argument("--swap-ms", type=float, default=1000.0, help="the device's stream_swap_ms")
    parser.add_argument("--loops", default="all,local", choices=("all,local", "all", "local"),
                        metavar="all,local|all|local",
                        help="request loops: every image, and/or the images a device exit answers (alone, the "
                             "second measures what swaps cost the device's own answers, with no offloads "
                             "competing for the cores)")
    parser.add_argument("--decode-in-thread", action="store_true",
                        help="the device decodes in the stream's thread (stream_decode_process=false)")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--name", default="quickstart")
    parser.add_argument("--cache", default="/tmp/spinn-progressive-link-cache")
    parser.add_argument("--keep-rows", action="store_true", help="also write every request's row to the JSON")
    parser.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cloud", default="", help=argparse.SUPPRESS)
    args, app_args = parser.parse_known_args()
    app_args = [a for a in app_args if a not in ("--driver",)]
    if args.driver:
        print(json.dumps(drive(args, app_args)))
        return 0
    reason = netns.why_not()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    raw = run(args, app_args)
    summary = summarize(raw, args)
    command = "python bench/progressive_link.py " + " ".join(sys.argv[1:])
    # the per-request rows are megabytes on a real model: kept only on request (--keep-rows)
    doc = {"command": command, "summary": summary, **({"rows": raw["rows"]} if args.keep_rows else {})}
    write_results(f"progressive_link_{args.name}", doc, markdown(summary, args.name, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
