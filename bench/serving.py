"""Serving benchmark: gRPC Infer with 16 concurrent clients (batching on/off) vs the in-process tail forward.

    python bench/serving.py --checkpoint runs/quickstart/best_model.pt --split-point 7 [--seconds 10]

For each mode it prints throughput (images/s) and p50/p95 latency, and the ratio server / in-process at the
same batch size (1.0 is the physical limit; the goal with batching is >= 0.9). It also prints bytes per request
for each codec next to the PNG and JPEG size of the input image. Results: bench/results/serving.{json,md}.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cloud.inference import ServedModel  # noqa: E402
from cloud.server import CloudConfig, build_server  # noqa: E402
from models.checkpoint import load_checkpoint  # noqa: E402
from models.partition import head, tail  # noqa: E402
from proto import spinn_v1_pb2 as pb  # noqa: E402
from proto import spinn_v1_pb2_grpc as pb_grpc  # noqa: E402
from proto.codec import CodecSpec, encode  # noqa: E402

CLIENTS = 16


def in_process(model, split, activation, batch, seconds) -> float:
    """Images/s of ``tail(split)`` on batches of ``batch`` activations in this process."""
    t = tail(model, split)
    x = activation.repeat(batch, 1, 1, 1)
    done, started = 0, time.perf_counter()
    with torch.no_grad():
        while time.perf_counter() - started < seconds:
            t(x)
            done += batch
    return done / (time.perf_counter() - started)


def grpc_load(port, req, seconds) -> tuple[float, list[float], list[int]]:
    stop = time.perf_counter() + seconds
    latencies, batches, lock = [], [], threading.Lock()

    def client():
        stub = pb_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            reply = stub.Infer(req, timeout=30)
            with lock:
                latencies.append((time.perf_counter() - t0) * 1000)
                batches.append(reply.timings.batch_size)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return len(latencies) / (time.perf_counter() - started), latencies, batches


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", default="runs/quickstart/best_model.pt")
    parser.add_argument("--split-point", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--codec", default="int8+zstd")
    args = parser.parse_args()

    ckpt = load_checkpoint(args.checkpoint)
    model, size = ckpt.model, ckpt.preprocess.input_size
    torch.manual_seed(0)
    image = torch.rand(1, 3, size, size)
    with torch.no_grad():
        activation = head(model, args.split_point)(image).activation
    spec = CodecSpec.from_name(args.codec)
    req = pb.FeatureRequest(request_id="bench", model=pb.ModelRef(model_id="spinn", model_version="1"),
                            split_point=args.split_point, features=encode(activation, spec))

    results = {"checkpoint": args.checkpoint, "split_point": args.split_point, "clients": CLIENTS,
               "codec": args.codec, "modes": {}}
    for mode, max_batch in (("batching", CLIENTS), ("no_batching", 1)):
        cfg = CloudConfig(checkpoint=args.checkpoint, address="127.0.0.1:0", max_batch_size=max_batch,
                          max_queue_delay_ms=2.0, log_level="WARNING")
        served = ServedModel.from_checkpoint(ckpt, cfg.model_id, cfg.model_version)
        running = build_server(cfg, served)
        logging.getLogger("cloud").setLevel(logging.WARNING)  # one log line per request would skew timings
        try:
            grpc_load(running.port, req, 1.0)  # warm-up
            rps, lat, batches = grpc_load(running.port, req, args.seconds)
        finally:
            running.stop()
        mean_batch = float(np.mean(batches))
        ref_batch = max(1, int(round(mean_batch)))
        ref = in_process(model, args.split_point, activation, ref_batch, args.seconds / 2)
        results["modes"][mode] = {
            "throughput_images_per_s": rps, "p50_ms": float(np.percentile(lat, 50)),
            "p95_ms": float(np.percentile(lat, 95)), "mean_batch_size": mean_batch,
            "in_process_images_per_s_same_batch": ref, "ratio_server_over_in_process": rps / ref,
        }
        print(f"{mode}: {rps:.0f} img/s, p50 {results['modes'][mode]['p50_ms']:.1f} ms, "
              f"p95 {results['modes'][mode]['p95_ms']:.1f} ms, mean batch {mean_batch:.1f}; in-process tail at "
              f"batch {ref_batch}: {ref:.0f} img/s; ratio {rps / ref:.2f}", flush=True)

    pixels = (image[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    sizes = {}
    for fmt, kw in (("PNG", {}), ("JPEG", {"quality": 90})):
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format=fmt, **kw)
        sizes[f"input_{fmt.lower()}"] = len(buf.getvalue())
    for name in ("float32+none", "float16+zstd", "int8+zstd", "int4+zstd"):
        r = pb.FeatureRequest.FromString(req.SerializeToString())
        r.features.CopyFrom(encode(activation, CodecSpec.from_name(name)))
        sizes[f"request_{name}"] = r.ByteSize()
    results["bytes"] = sizes
    print("bytes per request:", ", ".join(f"{k} {v}" for k, v in sizes.items()))
    print("(the input here is random noise, the worst case for PNG/JPEG; see bench/results/codec_*.md for real "
          "images)")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "serving.json").write_text(json.dumps(results, indent=2))
    lines = ["# Serving: 16 concurrent gRPC clients vs in-process tail forward", "",
             f"checkpoint {args.checkpoint}, split point {args.split_point}, codec {args.codec}", "",
             "| mode | img/s | p50 ms | p95 ms | mean batch | in-process img/s (same batch) | ratio |",
             "|---|---|---|---|---|---|---|"]
    for mode, r in results["modes"].items():
        lines.append(f"| {mode} | {r['throughput_images_per_s']:.0f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
                     f"{r['mean_batch_size']:.1f} | {r['in_process_images_per_s_same_batch']:.0f} | "
                     f"{r['ratio_server_over_in_process']:.2f} |")
    lines += ["", "Bytes: " + ", ".join(f"{k} {v}" for k, v in sizes.items())]
    (out / "serving.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
