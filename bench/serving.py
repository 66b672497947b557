"""Serving benchmark: 16 concurrent gRPC clients against the cloud daemon vs the in-process tail forward.

    python bench/serving.py --checkpoint runs/quickstart/best_model.pt --split-point 7 [--out serving]
    python bench/serving.py --checkpoint runs/cars_dev_exits/best_model.pt --split-point 9 \
        --images ../shared/data/stanford_cars_dev/stanford_cars/cars_test --out serving_cars_dev
    ... [--out serving_cars_dev_worker] forward_process=true    # trailing key=value go to python -m cloud
    ... --input-size 224 --out serving_cars_dev_224_worker forward_process=true   # same weights at 224 px

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
import subprocess
import sys
import tempfile
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
from models.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from models.datasets import Preprocess  # noqa: E402
from models.partition import head, tail  # noqa: E402
from models.quickstart import render_sample  # noqa: E402
from proto import spinn_v1_pb2 as pb  # noqa: E402
from proto import spinn_v1_pb2_grpc as pb_grpc  # noqa: E402
from proto.codec import CodecSpec, encode  # noqa: E402

from probes import free_port, tree_cpu_seconds  # noqa: E402  (bench/: this script's folder)

CLIENTS = 16
CODECS = ("float32+none", "float16+zstd", "int8+zstd", "int4+zstd")


def in_process(model, split: int, activation: torch.Tensor, batch: int, seconds: float,
               threads: int) -> tuple[float, float]:
    """Images/s and CPU ms per image of ``tail(split)`` on batches of ``batch`` in this process with ``threads``."""
    t = tail(model, split)
    x = activation[:1].repeat(batch, 1, 1, 1)
    default = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _forward_rate(t, x, seconds)
    finally:
        torch.set_num_threads(default)


def _forward_rate(t, x: torch.Tensor, seconds: float) -> tuple[float, float]:
    batch = x.shape[0]
    with torch.no_grad():
        t(x)
        done, started, cpu0 = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - started < seconds:
            t(x)
            done += batch
    return done / (time.perf_counter() - started), 1000 * (time.process_time() - cpu0) / done


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
            server_cpu0 = tree_cpu_seconds(proc.pid)
            child.start()
            results.append(queue.get(timeout=duration + 300))
            server_cpu1 = tree_cpu_seconds(proc.pid)
            child.join()
        stats = results[-1]
        # The window also spans the client process's start-up, when the daemon idles: per image it adds nothing.
        stats["server_cpu_s"] = stats["server_worker_cpu_s"] = None
        if server_cpu0 is not None and server_cpu1 is not None:
            stats["server_cpu_s"] = sum(server_cpu1) - sum(server_cpu0)
            stats["server_worker_cpu_s"] = server_cpu1[1] - server_cpu0[1]
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


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", default="runs/quickstart/best_model.pt")
    parser.add_argument("--split-point", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--codec", default="int8+zstd")
    parser.add_argument("--images", default=None, help="folder of JPEGs for the bytes comparison")
    parser.add_argument("--out", default="serving", help="result file stem under bench/results/")
    parser.add_argument("--modes", default="batching,no_batching,batching_stream")
    parser.add_argument("--input-size", type=int, default=None,
                        help="serve the checkpoint's weights at this input size (px) instead of its own: the "
                             "forward's cost per image grows with it while the serving cost does not")
    parser.add_argument("daemon_overrides", nargs="*", help="key=value passed to python -m cloud")
    return parser.parse_args()


def served_checkpoint(args: argparse.Namespace, workdir: Path):
    """The checkpoint and the path the daemon serves it from (re-saved under ``workdir`` at ``--input-size``)."""
    ckpt = load_checkpoint(args.checkpoint)
    if not args.input_size:
        return ckpt, args.checkpoint
    # Throughput only: the weights were trained at another size, so the answers' accuracy means nothing.
    pre = ckpt.preprocess
    ckpt.preprocess = Preprocess(args.input_size, args.input_size, pre.mean, pre.std)
    path = str(workdir / "model.pt")
    save_checkpoint(path, ckpt.model, ckpt.class_names, ckpt.preprocess)
    ckpt.digest = load_checkpoint(path).digest  # another input size is another model identity
    return ckpt, path


def measure_mode(model, served: str, req: pb.FeatureRequest, activations: torch.Tensor, max_batch: int,
                 stream: bool, args: argparse.Namespace, threads: tuple[int, int]) -> tuple[dict, int]:
    """One serving mode against the in-process forward at the batch the server formed; returns the result row
    and that batch size. ``threads``: (all of this process's intra-op threads, the server's)."""
    # This machine's speed drifts (shared VM), so the reference is measured right before and right after
    # the server run and averaged; the batch size is the one the server formed in a short pilot.
    pilot = run_mode(served, req, max_batch, stream, 2.0, args.daemon_overrides)
    ref_batch = max(1, int(round(float(np.mean(pilot["batches"])))))
    before = [in_process(model, args.split_point, activations, ref_batch, args.seconds / 4, n) for n in threads]
    stats = run_mode(served, req, max_batch, stream, args.seconds, args.daemon_overrides)
    after = [in_process(model, args.split_point, activations, ref_batch, args.seconds / 4, n) for n in threads]
    (ref, ref_cpu_ms), (ref_same_threads, ref_same_cpu_ms) = [
        ((b[0] + a[0]) / 2, (b[1] + a[1]) / 2) for b, a in zip(before, after)]
    rps = stats["images"] / stats["wall_s"]
    row = {
        "throughput_images_per_s": rps, "p50_ms": float(np.percentile(stats["latencies"], 50)),
        "p95_ms": float(np.percentile(stats["latencies"], 95)), "mean_batch_size": float(np.mean(stats["batches"])),
        "in_process_images_per_s_same_batch": ref, "ratio_server_over_in_process": rps / ref,
        "in_process_images_per_s_server_threads": ref_same_threads,
        "ratio_server_over_in_process_server_threads": rps / ref_same_threads,
        "client_cpu_share": stats["client_cpu_s"] / (stats["wall_s"] * (os.cpu_count() or 1)),
        "server_forward_busy": stats["forward_busy"],
        "server_forward_ms_per_image": 1000 * stats["forward_busy"] / rps,
        "in_process_forward_ms_per_image": 1000 / ref,
        "in_process_cpu_ms_per_image": ref_cpu_ms,
        "in_process_cpu_ms_per_image_server_threads": ref_same_cpu_ms,
        "client_cpu_ms_per_image": 1000 * stats["client_cpu_s"] / stats["images"],
        "server_cpu_ms_per_image": None, "server_worker_cpu_ms_per_image": None,
        "ceiling_ratio_on_this_machine": None,
    }
    if stats["server_cpu_s"] is not None:
        row["server_cpu_ms_per_image"] = 1000 * stats["server_cpu_s"] / stats["images"]
        row["server_worker_cpu_ms_per_image"] = 1000 * stats["server_worker_cpu_s"] / stats["images"]
        # What the cores could serve if every core-ms went to the daemon and the clients with no contention
        # at all, over the in-process rate: no server on this machine can beat this ratio.
        cores = os.cpu_count() or 1
        ceiling = 1000 * cores / (row["server_cpu_ms_per_image"] + row["client_cpu_ms_per_image"])
        row["ceiling_ratio_on_this_machine"] = ceiling / ref
    return row, ref_batch


def print_row(mode: str, row: dict, ref_batch: int, threads: tuple[int, int]) -> None:
    all_threads, server_threads = threads
    rps, ref, ref_same = (row["throughput_images_per_s"], row["in_process_images_per_s_same_batch"],
                          row["in_process_images_per_s_server_threads"])
    print(f"{mode}: {rps:.0f} img/s, p50 {row['p50_ms']:.1f} ms, p95 {row['p95_ms']:.1f} ms, mean batch "
          f"{row['mean_batch_size']:.1f}; in-process tail at batch {ref_batch}: {ref:.0f} img/s with {all_threads} "
          f"threads (ratio {rps / ref:.2f}), {ref_same:.0f} img/s with the server's {server_threads} "
          f"(ratio {rps / ref_same:.2f}); "
          f"clients used {100 * row['client_cpu_share']:.0f}% of the machine's CPU; the server's forward was "
          f"busy {100 * row['server_forward_busy']:.0f}% of the time at "
          f"{row['server_forward_ms_per_image']:.2f} ms/image "
          f"(in-process {row['in_process_forward_ms_per_image']:.2f})", flush=True)
    if row["server_cpu_ms_per_image"] is not None:
        print(f"  CPU per image: daemon {row['server_cpu_ms_per_image']:.2f} ms (forward process "
              f"{row['server_worker_cpu_ms_per_image']:.2f}) + clients "
              f"{row['client_cpu_ms_per_image']:.2f} ms vs in-process {row['in_process_cpu_ms_per_image']:.2f} ms "
              f"({all_threads} threads) / {row['in_process_cpu_ms_per_image_server_threads']:.2f} ms "
              f"({server_threads}); at these costs this machine's "
              f"{os.cpu_count()} cores cap the ratio at {row['ceiling_ratio_on_this_machine']:.2f}", flush=True)


def codec_sizes(req: pb.FeatureRequest, activations: torch.Tensor, images: list) -> dict[str, float]:
    """Mean bytes per image: the input JPEG and a one-image request with each codec in CODECS."""
    sizes = {"input_jpeg": float(np.mean([n for _, n in images]))}
    for name in CODECS:
        spec = CodecSpec.from_name(name)
        per_image = []
        for i in range(activations.shape[0]):
            r = pb.FeatureRequest.FromString(req.SerializeToString())
            r.features.CopyFrom(encode(activations[i:i + 1], spec))
            per_image.append(r.ByteSize())
        sizes[f"request_{name}"] = float(np.mean(per_image))
    return sizes


def markdown(results: dict, args: argparse.Namespace, threads: tuple[int, int]) -> str:
    all_threads, server_threads = threads
    sizes = results["bytes_per_image_mean"]
    lines = [f"# Serving: {CLIENTS} concurrent gRPC clients vs in-process tail forward", "",
             f"checkpoint {args.checkpoint} at {results['input_size']} px, split point {args.split_point}, "
             f"codec {args.codec}; "
             f"{results['cpu_cores']} CPU cores shared by daemon and clients (separate processes); daemon "
             f"overrides: {' '.join(args.daemon_overrides) or 'none'}", "",
             f"Server forward on {server_threads} intra-op thread(s); in-process reference at the same batch with "
             f"all {all_threads} threads and with the server's {server_threads}.", "",
             "| mode | img/s | p50 ms | p95 ms | mean batch | in-process img/s | ratio | in-process img/s, "
             "server threads | ratio | client CPU | CPU ms/img: daemon (its forward process) + clients | "
             "CPU ms/img: in-process "
             "(all / server threads) | ratio ceiling from CPU |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for mode, r in results["modes"].items():
        cpu = ceiling = "n/a"
        if r["server_cpu_ms_per_image"] is not None:
            cpu = (f"{r['server_cpu_ms_per_image']:.2f} ({r['server_worker_cpu_ms_per_image']:.2f}) + "
                   f"{r['client_cpu_ms_per_image']:.2f}")
            ceiling = f"{r['ceiling_ratio_on_this_machine']:.2f}"
        lines.append(f"| {mode} | {r['throughput_images_per_s']:.0f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
                     f"{r['mean_batch_size']:.1f} | {r['in_process_images_per_s_same_batch']:.0f} | "
                     f"{r['ratio_server_over_in_process']:.2f} | {r['in_process_images_per_s_server_threads']:.0f} | "
                     f"{r['ratio_server_over_in_process_server_threads']:.2f} | {100 * r['client_cpu_share']:.0f}% | "
                     f"{cpu} | {r['in_process_cpu_ms_per_image']:.2f} / "
                     f"{r['in_process_cpu_ms_per_image_server_threads']:.2f} | {ceiling} |")
    lines += ["", "Ratio ceiling from CPU: the rate this machine's cores would reach if they did nothing but the "
              "daemon's and the clients' work at the CPU per image measured here, over the in-process rate (all "
              "threads).",
              "", f"Bytes per image ({results['images']}): "
              + ", ".join(f"{k} {v:.0f}" for k, v in sizes.items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="spinn-bench-") as workdir:
        ckpt, served = served_checkpoint(args, Path(workdir))
        model = ckpt.model.eval()
        images = input_images(args.images, ckpt.preprocess, 32)
        transform = ckpt.preprocess.eval_transform()
        with torch.no_grad():
            activations = head(model, args.split_point)(torch.stack([transform(im) for im, _ in images])).activation
        req = pb.FeatureRequest(request_id="bench", model=pb.ModelRef(model_id="spinn", digest=ckpt.digest),
                                split_point=args.split_point,
                                features=encode(activations[:1], CodecSpec.from_name(args.codec)))
        overrides = dict(o.split("=", 1) for o in args.daemon_overrides)
        server_threads = intra_op_threads_for(CloudConfig(intra_op_threads=int(overrides.get("intra_op_threads", 0))))
        threads = (torch.get_num_threads(), server_threads)
        results = {"checkpoint": args.checkpoint, "input_size": ckpt.preprocess.input_size,
                   "server_intra_op_threads": server_threads, "split_point": args.split_point, "clients": CLIENTS,
                   "codec": args.codec, "daemon_overrides": args.daemon_overrides, "cpu_cores": os.cpu_count(),
                   "in_process_threads": threads[0], "modes": {}}
        for mode, max_batch, stream in (("batching", CLIENTS, False), ("no_batching", 1, False),
                                        ("batching_stream", CLIENTS, True)):
            if mode in args.modes.split(","):
                row, ref_batch = measure_mode(model, served, req, activations, max_batch, stream, args, threads)
                results["modes"][mode] = row
                print_row(mode, row, ref_batch, threads)

    sizes = results["bytes_per_image_mean"] = codec_sizes(req, activations, images)
    results["images"] = args.images or "quickstart test images, JPEG q90 at the input size"
    print("bytes per image (mean of", len(images), "images):", ", ".join(f"{k} {v:.0f}" for k, v in sizes.items()))
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.out}.json").write_text(json.dumps(results, indent=2))
    (out / f"{args.out}.md").write_text(markdown(results, args, threads))

if __name__ == "__main__":
    main()
