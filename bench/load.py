"""Load and overload of the cloud daemon over loopback.

    python bench/load.py [--clients 32] [--requests 1000] [--overload 4] [--overload-seconds 10]
                         [--generators 2] [--split-point N] [--checkpoint PATH] [--name load]
                         [key=value ... for python -m cloud]

1. steady: ``--clients`` threads, each sending ``--requests`` Infer calls back to back. Pass: 0 errors; the
   daemon's resident memory (VmRSS) at the end within 10 % (and 50 MiB) of what it was after a warm-up.
2. overload: requests issued open-loop (futures, not waiting for answers) at ``--overload`` x the steady
   throughput for ``--overload-seconds`` by ``--generators`` processes, while a prober checks health every
   50 ms. Pass: every call ends OK or RESOURCE_EXHAUSTED (no other status, nothing lost), refusals come back
   fast (their p99 is reported), the accepted calls' p99 is bounded by the admission limit, and every health
   check answers within 100 ms.

Results in bench/results/<name>.{json,md}. A small random model is served unless ``--checkpoint`` is given;
its forward costs less than a gRPC call, so its "capacity" is that of Python gRPC on the machine, and 4x of it
is more calls than these two cores can even refuse. A trained model (e.g. ``--checkpoint
../shared/models/cars_dev_joint20.pt --split-point 9``) measures overload of the forward, the case admission
control exists for.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import grpc
import numpy as np
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.fuzz import serving, small_checkpoint  # noqa: E402
from bench.probes import free_port  # noqa: E402
from proto import spinn_v1_pb2 as pb  # noqa: E402
from proto import spinn_v1_pb2_grpc as pb_grpc  # noqa: E402
from proto.codec import CodecSpec, encode  # noqa: E402


def rss_mb(pid: int) -> float:
    """Resident memory (VmRSS) of process ``pid`` now, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def template(stub: pb_grpc.InferenceStub, split_point: int | None = None) -> pb.FeatureRequest:
    """A valid one-image request at ``split_point`` (default: the deepest exit's) of the served model."""
    info = stub.GetModelInfo(pb.ModelInfoRequest(), timeout=30)
    split = split_point if split_point is not None else max(info.exit_points or [0])
    shape = next(s.activation_shape for s in info.split_points if s.split_point == split)
    return pb.FeatureRequest(model=info.model, split_point=split,
                             features=encode(torch.randn(1, *shape), CodecSpec("int8", "zstd")), top_k=1)


def steady(address: str, clients: int, requests: int, split_point: Optional[int] = None) -> dict:
    """``clients`` threads x ``requests`` back-to-back calls; status counts, latency percentiles (ms), rate."""
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.InferenceStub(channel)
    req = template(stub, split_point)
    codes: Counter = Counter()
    latencies: list[float] = []
    lock = threading.Lock()

    def client() -> None:
        mine, seen = [], Counter()
        for _ in range(requests):
            started = time.perf_counter()
            try:
                stub.Infer(req, timeout=30)
                seen["OK"] += 1
            except grpc.RpcError as err:
                seen[err.code().name] += 1
            mine.append((time.perf_counter() - started) * 1000)
        with lock:
            latencies.extend(mine)
            codes.update(seen)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    channel.close()
    return {"clients": clients, "requests": clients * requests, "codes": dict(codes), "seconds": seconds,
            "throughput_rps": clients * requests / seconds, "p50_ms": float(np.percentile(latencies, 50)),
            "p99_ms": float(np.percentile(latencies, 99))}


def probe_health(address: str, seconds: float, period_s: float, out: "mp.Queue") -> None:
    """Health-check ``address`` every ``period_s`` for ``seconds``; put the latencies (ms, inf = failed) on
    ``out``. Runs in a process of its own, so the load generator's GIL does not show up as server latency."""
    latencies = []
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            started = time.perf_counter()
            try:
                health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                latencies.append((time.perf_counter() - started) * 1000)
            except grpc.RpcError:
                latencies.append(float("inf"))
            time.sleep(period_s)
    out.put(latencies)


def generate(address: str, rate: float, seconds: float, split_point: Optional[int], ready: "mp.Queue",
             go: "mp.Event", out: "mp.Queue") -> None:
    """Once ``go`` is set (after putting one item on ``ready``), issue Infer calls open-loop (futures, not
    waiting for answers) at ``rate`` per second for ``seconds`` on a channel of its own; put ``(issued,
    [(status name, latency ms)])`` on ``out``. Runs in a process of its own: one Python client cannot issue and
    complete thousands of calls a second by itself."""
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.InferenceStub(channel)
    req = template(stub, split_point)
    ready.put(True)
    if not go.wait(120):
        raise RuntimeError("the flood was never started")
    results: list[tuple[str, float]] = []
    lock = threading.Lock()

    def finished(future: grpc.Future, started: float) -> None:
        try:
            future.result()
            code = "OK"
        except grpc.RpcError as err:
            code = err.code().name
        with lock:
            results.append((code, (time.perf_counter() - started) * 1000))

    futures = []  # a call whose future is garbage-collected is cancelled: keep them all
    issued, begin = 0, time.perf_counter()
    while (now := time.perf_counter()) - begin < seconds:
        due = int((now - begin) * rate)
        while issued < due:
            future = stub.Infer.future(req, timeout=30)
            future.add_done_callback(lambda f, t=time.perf_counter(): finished(f, t))
            futures.append(future)
            issued += 1
        time.sleep(0.001)
    deadline = time.monotonic() + 60
    while len(results) < issued and time.monotonic() < deadline:
        time.sleep(0.05)
    with lock:
        done = list(results)
    out.put((issued, done))
    channel.close()


def overload(address: str, rate: float, seconds: float, generators: int = 2,
             split_point: Optional[int] = None) -> dict:
    """Calls open-loop at ``rate`` per second in total from ``generators`` processes for ``seconds``; health
    probed every 50 ms meanwhile from another process."""
    ctx = mp.get_context("spawn")
    health_out, calls_out, ready, go = ctx.Queue(), ctx.Queue(), ctx.Queue(), ctx.Event()
    prober = ctx.Process(target=probe_health, args=(address, seconds + 2.0, 0.05, health_out))
    flood = [ctx.Process(target=generate, args=(address, rate / generators, seconds, split_point, ready, go,
                                                calls_out))
             for _ in range(generators)]
    for g in flood:
        g.start()
    for _ in flood:  # every generator's interpreter is up, so the prober's window covers the whole flood
        ready.get(timeout=120)
    prober.start()
    time.sleep(1.0)  # the prober's interpreter is up before the flood starts
    go.set()
    parts = [calls_out.get(timeout=seconds + 180) for _ in flood]
    health_ms = health_out.get(timeout=60)
    for proc in (prober, *flood):
        proc.join(30)
    issued = sum(n for n, _ in parts)
    results = [r for _, rs in parts for r in rs]
    codes = Counter(c for c, _ in results)
    ok = [ms for c, ms in results if c == "OK"]
    refused = [ms for c, ms in results if c == "RESOURCE_EXHAUSTED"]
    return {"rate_rps": rate, "seconds": seconds, "generators": generators, "issued": issued,
            "answered": len(results), "codes": dict(codes), "accepted_rps": len(ok) / seconds,
            "accepted_p99_ms": float(np.percentile(ok, 99)) if ok else None,
            "refused_p99_ms": float(np.percentile(refused, 99)) if refused else None,
            "health_checks": len(health_ms), "health_max_ms": max(health_ms) if health_ms else None,
            "health_p99_ms": float(np.percentile(health_ms, 99)) if health_ms else None}


def verdict(result: dict) -> dict:
    s, o = result["steady"], result["overload"]
    growth = result["rss_end_mb"] - result["rss_start_mb"]
    return {
        "steady_no_errors": set(s["codes"]) == {"OK"},
        "memory_steady": growth <= max(50.0, 0.1 * result["rss_start_mb"]),
        "overload_nothing_lost": o["answered"] == o["issued"] and set(o["codes"]) <= {"OK", "RESOURCE_EXHAUSTED"},
        "overload_refused_some": o["codes"].get("RESOURCE_EXHAUSTED", 0) > 0,
        "health_within_100ms": o["health_max_ms"] is not None and o["health_max_ms"] < 100.0,
    }


def report(name: str, result: dict) -> None:
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    s, o = result["steady"], result["overload"]
    lines = [f"# Load ({result['command']})", "",
             f"- steady: {s['clients']} clients x {s['requests'] // s['clients']} requests: {s['codes']}, "
             f"{s['throughput_rps']:.0f} req/s, p50 {s['p50_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms; daemon RSS "
             f"{result['rss_start_mb']:.0f} MiB after warm-up -> {result['rss_end_mb']:.0f} MiB at the end",
             f"- overload: {o['issued']} calls offered at {o['rate_rps']:.0f} req/s ({result['overload_factor']:g}x "
             f"the steady throughput) for {o['seconds']:g} s from {o.get('generators', 1)} processes: {o['codes']}, {o['answered']} answered; accepted "
             f"{o['accepted_rps']:.0f} req/s, p99 {o['accepted_p99_ms']} ms; refusals p99 {o['refused_p99_ms']} ms; "
             f"{o['health_checks']} health checks, max {o['health_max_ms']:.1f} ms, p99 {o['health_p99_ms']:.1f} ms",
             "", "| check | passed |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in result["verdict"].items()]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--overload", type=float, default=4.0)
    parser.add_argument("--overload-seconds", type=float, default=10.0)
    parser.add_argument("--generators", type=int, default=2, help="processes issuing the overload")
    parser.add_argument("--split-point", type=int, default=None,
                        help="split point of the requests (default: the served model's deepest exit's)")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--name", default="load")
    args, cloud_overrides = parser.parse_known_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint) if args.checkpoint else small_checkpoint(Path(tmp))
        address = f"127.0.0.1:{free_port()}"
        cloud = subprocess.Popen([sys.executable, "-m", "cloud", "--config", "apps/cloud.yml",
                                  f"checkpoint={checkpoint}", f"address={address}", "log_level=WARNING",
                                  *cloud_overrides], cwd=ROOT)
        try:
            deadline = time.monotonic() + 120
            while not serving(address):
                if time.monotonic() > deadline or cloud.poll() is not None:
                    raise RuntimeError("the cloud did not become SERVING")
                time.sleep(0.3)
            steady(address, 4, 50, args.split_point)  # warm-up: allocator and gRPC pools at their working size
            result = {"command": "python bench/load.py " + " ".join(argv), "overload_factor": args.overload,
                      "rss_start_mb": rss_mb(cloud.pid)}
            result["steady"] = steady(address, args.clients, args.requests, args.split_point)
            result["rss_end_mb"] = rss_mb(cloud.pid)
            result["overload"] = overload(address, args.overload * result["steady"]["throughput_rps"],
                                          args.overload_seconds, args.generators, args.split_point)
            result["cloud_serving_after"] = serving(address)
        finally:
            cloud.terminate()
            cloud.wait(30)
    result["verdict"] = verdict(result)
    report(args.name, result)
    return 0 if all(result["verdict"].values()) and result["cloud_serving_after"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
