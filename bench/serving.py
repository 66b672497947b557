"""Serving benchmark: 16 concurrent gRPC clients against the cloud daemon vs the in-process tail forward.

    python bench/serving.py --checkpoint runs/quickstart/best_model.pt --split-point 7 [--out serving]
    python bench/serving.py --checkpoint runs/cars_dev_exits/best_model.pt --split-point 9 \
        --images ../shared/data/stanford_cars_dev/stanford_cars/cars_test --out serving_cars_dev
    ... [--out serving_cars_dev_worker] forward_process=true    # trailing key=value go to python -m cloud

The daemon runs as its own process (``python -m cloud``, as deployed) and the clients in another, so neither
pays for the other's GIL. Modes: unary ``Infer`` with batching on (max batch 16) and off (max batch 1), and
``InferStream`` with batching on. For each mode it prints throughput (images/s), p50/p95 latency, the mean batch
the server formed, and the ratio server / in-process ``tail(s)`` forward at that batch size, measured in this
process with no server running (1.0 is the physical limit; the goal with batching is >= 0.9). All processes
share this machine's cores, so the CPU seconds the clients burned are reported next to the ratio.

It also prints bytes per request for each codec next to the JPEG size of the input images (``--images``: a
folder of JPEGs; default: quickstart images drawn at the model's input size). Results: bench/results/<out>.*.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cloud.server import CloudConfig, intra_op_threads_for  # noqa: E402
from models.checkpoint import load_checkpoint  # noqa: E402
from models.partition import head, tail  # noqa: E402
from models.quickstart import render_sample  # noqa: E402
from proto import spinn_v1_pb2 as pb  # noqa: E402
from proto import spinn_v1_pb2_grpc as pb_grpc  # noqa: E402
from proto.codec import CodecSpec, encode  # noqa: E402

CLIENTS = 16
CODECS = ("float32+none", "float16+zstd", "int8+zstd", "int4+zstd")


def in_process(model, split: int, activation: torch.Tensor, batch: int, seconds: float, threads: int) -> float:
    """Images/s of ``tail(split)`` on batches of ``batch`` activations in this process with ``threads``."""
    t = tail(model, split)
    x = activation[:1].repeat(batch, 1, 1, 1)
    default = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _forward_rate(t, x, seconds)
    finally:
        torch.set_num_threads(default)


def _forward_rate(t, x: torch.Tensor, seconds: float) -> float:
    batch = x.shape[0]
    with torch.no_grad():
        t(x)
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            t(x)
            done += batch
    return done / (time.perf_counter() - started)


def client_load(port: int, request: bytes, clients: int, seconds: float, stream: bool, results) -> None:
    """Child process: ``clients`` threads call the server back to back for ``seconds``; puts stats on ``results``."""
    req = pb.FeatureRequest.FromString(request)
    latencies, batches, busy_ms, lock = [], [], [], threading.Lock()
    stop = time.perf_counter() + seconds

    def record(t0: float, reply: pb.Prediction) -> None:
        with lock:
            latencies.append((time.perf_counter() - t0) * 1000)
            batches.append(reply.timings.batch_size)
            busy_ms.append(reply.timings.compute_ms / reply.timings.batch_size)  # this image's share

    def unary(stub):
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            record(t0, stub.Infer(req, timeout=60))

    def streaming(stub):
        # One request in flight per stream, like a device that waits for each answer.
        sent, ready = [], threading.Semaphore(1)

        def requests():
            while time.perf_counter() < stop:
                ready.acquire()
                sent.append(time.perf_counter())
                yield req

        for reply in stub.InferStream(requests(), timeout=seconds + 60):
            record(sent[-1], reply)
            ready.release()

    channels = [grpc.insecure_channel(f"127.0.0.1:{port}") for _ in range(clients)]
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    threads = [threading.Thread(target=streaming if stream else unary, args=(pb_grpc.InferenceStub(c),))
               for c in channels]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - started
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    results.put({"images": len(latencies), "wall_s": wall, "client_cpu_s": cpu, "latencies": latencies,
                 "batches": batches, "forward_busy": sum(busy_ms) / 1000 / wall})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_daemon(checkpoint: str, max_batch: int, overrides: list[str]) -> tuple[subprocess.Popen, int]:
    """``python -m cloud`` on a free loopback port; returns once health says SERVING."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloud", f"checkpoint={checkpoint}", f"address=127.0.0.1:{port}",
         f"max_batch_size={max_batch}", "max_queue_delay_ms=2.0", "log_level=WARNING", *overrides],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"cloud daemon exited: {proc.stderr.read()}")
        try:
            status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                return proc, port
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("cloud daemon did not become SERVING within 120 s")


def run_mode(checkpoint: str, request: pb.FeatureRequest, max_batch: int, stream: bool, seconds: float,
             overrides: list[str]) -> dict:
    proc, port = start_daemon(checkpoint, max_batch, overrides)
    ctx = mp.get_context("spawn")
    try:
        results = []
        for duration in (1.0, seconds):  # warm-up, then the measurement
            queue = ctx.Queue()
            child = ctx.Process(target=client_load,
                                args=(port, request.SerializeToString(), CLIENTS, duration, stream, queue))
            child.start()
            results.append(queue.get(timeout=duration + 300))
            child.join()
        stats = results[-1]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return stats


def input_images(folder: str | None, preprocess, count: int) -> list[tuple[Image.Image, int]]:
    """``count`` (PIL image, JPEG bytes) pairs: files from ``folder`` as stored, or quickstart images as q90 JPEG."""
    out = []
    if folder:
        for path in sorted(Path(folder).glob("*.jpg"))[:count]:
            out.append((Image.open(path).convert("RGB"), path.stat().st_size))
        if not out:
            raise SystemExit(f"--images: no *.jpg files in {folder}")
        return out
    for i in range(count):
        pixels, _, _ = render_sample(0, "val", i, preprocess.input_size)
        image = Image.fromarray((pixels.transpose(1, 2, 0) * 255).astype(np.uint8))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        out.append((image, len(buf.getvalue())))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", default="runs/quickstart/best_model.pt")
    parser.add_argument("--split-point", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--codec", default="int8+zstd")
    parser.add_argument("--images", default=None, help="folder of JPEGs for the bytes comparison")
    parser.add_argument("--out", default="serving", help="result file stem under bench/results/")
    parser.add_argument("--modes", default="batching,no_batching,batching_stream")
    parser.add_argument("daemon_overrides", nargs="*", help="key=value passed to python -m cloud")
    args = parser.parse_args()

    ckpt = load_checkpoint(args.checkpoint)
    model = ckpt.model.eval()
    images = input_images(args.images, ckpt.preprocess, 32)
    transform = ckpt.preprocess.eval_transform()
    with torch.no_grad():
        activations = head(model, args.split_point)(torch.stack([transform(im) for im, _ in images])).activation
    req = pb.FeatureRequest(request_id="bench", model=pb.ModelRef(model_id="spinn", model_version="1"),
                            split_point=args.split_point,
                            features=encode(activations[:1], CodecSpec.from_name(args.codec)))

    all_threads = torch.get_num_threads()
    overrides = dict(o.split("=", 1) for o in args.daemon_overrides)
    server_threads = intra_op_threads_for(CloudConfig(intra_op_threads=int(overrides.get("intra_op_threads", 0))))
    results = {"checkpoint": args.checkpoint, "server_intra_op_threads": server_threads, "split_point": args.split_point, "clients": CLIENTS,
               "codec": args.codec, "daemon_overrides": args.daemon_overrides, "cpu_cores": os.cpu_count(),
               "in_process_threads": all_threads,
               "modes": {}}
    for mode, max_batch, stream in (("batching", CLIENTS, False), ("no_batching", 1, False),
                                    ("batching_stream", CLIENTS, True)):
        if mode not in args.modes.split(","):
            continue
        # This machine's speed drifts (shared VM), so the reference is measured right before and right after
        # the server run and averaged; the batch size is the one the server formed in a short pilot.
        pilot = run_mode(args.checkpoint, req, max_batch, stream, 2.0, args.daemon_overrides)
        ref_batch = max(1, int(round(float(np.mean(pilot["batches"])))))
        refs = [in_process(model, args.split_point, activations, ref_batch, args.seconds / 4, n)
                for n in (all_threads, server_threads)]
        stats = run_mode(args.checkpoint, req, max_batch, stream, args.seconds, args.daemon_overrides)
        refs = [(r + in_process(model, args.split_point, activations, ref_batch, args.seconds / 4, n)) / 2
                for r, n in zip(refs, (all_threads, server_threads))]
        ref, ref_same_threads = refs
        rps = stats["images"] / stats["wall_s"]
        mean_batch = float(np.mean(stats["batches"]))
        row = {
            "throughput_images_per_s": rps, "p50_ms": float(np.percentile(stats["latencies"], 50)),
            "p95_ms": float(np.percentile(stats["latencies"], 95)), "mean_batch_size": mean_batch,
            "in_process_images_per_s_same_batch": ref, "ratio_server_over_in_process": rps / ref,
            "in_process_images_per_s_server_threads": ref_same_threads,
            "ratio_server_over_in_process_server_threads": rps / ref_same_threads,
            "client_cpu_share": stats["client_cpu_s"] / (stats["wall_s"] * (os.cpu_count() or 1)),
            "server_forward_busy": stats["forward_busy"],
            "server_forward_ms_per_image": 1000 * stats["forward_busy"] / rps,
            "in_process_forward_ms_per_image": 1000 / ref,
        }
        results["modes"][mode] = row
        print(f"{mode}: {rps:.0f} img/s, p50 {row['p50_ms']:.1f} ms, p95 {row['p95_ms']:.1f} ms, mean batch "
              f"{mean_batch:.1f}; in-process tail at batch {ref_batch}: {ref:.0f} img/s with {all_threads} threads "
              f"(ratio {rps / ref:.2f}), {ref_same_threads:.0f} img/s with the server's {server_threads} "
              f"(ratio {rps / ref_same_threads:.2f}); "
              f"clients used {100 * row['client_cpu_share']:.0f}% of the machine's CPU; the server's forward was busy "
              f"{100 * row['server_forward_busy']:.0f}% of the time at {row['server_forward_ms_per_image']:.2f} ms/image "
              f"(in-process {row['in_process_forward_ms_per_image']:.2f})", flush=True)

    sizes = {"input_jpeg": float(np.mean([n for _, n in images]))}
    for name in CODECS:
        spec = CodecSpec.from_name(name)
        per_image = []
        for i in range(activations.shape[0]):
            r = pb.FeatureRequest.FromString(req.SerializeToString())
            r.features.CopyFrom(encode(activations[i:i + 1], spec))
            per_image.append(r.ByteSize())
        sizes[f"request_{name}"] = float(np.mean(per_image))
    results["bytes_per_image_mean"] = sizes
    results["images"] = args.images or "quickstart test images, JPEG q90 at the input size"
    print("bytes per image (mean of", len(images), "images):", ", ".join(f"{k} {v:.0f}" for k, v in sizes.items()))

    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.out}.json").write_text(json.dumps(results, indent=2))
    lines = [f"# Serving: {CLIENTS} concurrent gRPC clients vs in-process tail forward", "",
             f"checkpoint {args.checkpoint}, split point {args.split_point}, codec {args.codec}; "
             f"{results['cpu_cores']} CPU cores shared by daemon and clients (separate processes); daemon "
             f"overrides: {' '.join(args.daemon_overrides) or 'none'}", "",
             f"Server forward on {server_threads} intra-op thread(s); in-process reference at the same batch with "
             f"all {all_threads} threads and with the server's {server_threads}.", "",
             "| mode | img/s | p50 ms | p95 ms | mean batch | in-process img/s | ratio | in-process img/s, "
             "server threads | ratio | client CPU |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for mode, r in results["modes"].items():
        lines.append(f"| {mode} | {r['throughput_images_per_s']:.0f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
                     f"{r['mean_batch_size']:.1f} | {r['in_process_images_per_s_same_batch']:.0f} | "
                     f"{r['ratio_server_over_in_process']:.2f} | {r['in_process_images_per_s_server_threads']:.0f} | "
                     f"{r['ratio_server_over_in_process_server_threads']:.2f} | {100 * r['client_cpu_share']:.0f}% |")
    lines += ["", f"Bytes per image ({results['images']}): "
              + ", ".join(f"{k} {v:.0f}" for k, v in sizes.items())]
    (out / f"{args.out}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
