"""Load and overload of the cloud daemon over loopback.

    python bench/load.py [--clients 32] [--requests 1000] [--overload 4] [--overload-seconds 10]
                         [--generators 2] [--daemons 1] [--split-point N] [--checkpoint PATH] [--name load]
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
control exists for. ``--daemons N`` runs N daemons on the one port (gRPC sets SO_REUSEPORT, the kernel spreads
connections over them), and the report says how many cores the daemons and the generators kept busy: whether
more server processes would take a flood one cannot, or the cores are simply spent.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

import grpc
import numpy as np
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.fuzz import serving, small_checkpoint  # noqa: E402
from bench.probes import free_port, tree_cpu_seconds  # noqa: E402
from proto import spinn_v1_pb2 as pb  # noqa: E402
from proto import spinn_v1_pb2_grpc as pb_grpc  # noqa: E402
from proto.codec import CodecSpec, encode  # noqa: E402


def rss_mb(pid: int) -> float:
    """Resident memory (VmRSS) of process ``pid`` now, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


CONNECTIONS = 4  # TCP connections per client process: with several daemons on one port, the kernel spreads these


def connections(address: str) -> list[grpc.Channel]:
    """``CONNECTIONS`` channels to ``address``, each on a TCP connection of its own (channels with the same
    arguments would share one)."""
    return [grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(CONNECTIONS)]


def template(stub: pb_grpc.InferenceStub, split_point: int | None = None) -> pb.FeatureRequest:
    """A valid one-image request at ``split_point`` (default: the deepest exit's) of the served model."""
    info = stub.GetModelInfo(pb.ModelInfoRequest(), timeout=30)
    split = split_point if split_point is not None else max(info.exit_points or [0])
    shape = next(s.activation_shape for s in info.split_points if s.split_point == split)
    return pb.FeatureRequest(model=info.model, split_point=split,
                             features=encode(torch.randn(1, *shape), CodecSpec("int8", "zstd")), top_k=1)


def steady(address: str, clients: int, requests: int, split_point: Optional[int] = None) -> dict:
    """``clients`` threads x ``requests`` back-to-back calls; status counts, latency percentiles (ms), rate."""
    channels = connections(address)
    stubs = [pb_grpc.InferenceStub(c) for c in channels]
    req = template(stubs[0], split_point)
    codes: Counter = Counter()
    latencies: list[float] = []
    lock = threading.Lock()

    def client(stub: pb_grpc.InferenceStub) -> None:
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
    threads = [threading.Thread(target=client, args=(stubs[i % len(stubs)],)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    for channel in channels:
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
    waiting for answers) at ``rate`` per second for ``seconds`` on ``connections`` of its own; put ``(issued,
    [(status name, latency ms)], CPU seconds this process used meanwhile)`` on ``out``. Runs in a process of its own: one Python client cannot issue and
    complete thousands of calls a second by itself."""
    channels = connections(address)
    stubs = [pb_grpc.InferenceStub(c) for c in channels]
    req = template(stubs[0], split_point)
    ready.put(True)
    if not go.wait(120):
        raise RuntimeError("the flood was never started")
    cpu0 = time.process_time()
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
            future = stubs[issued % len(stubs)].Infer.future(req, timeout=30)
            future.add_done_callback(lambda f, t=time.perf_counter(): finished(f, t))
            futures.append(future)
            issued += 1
        time.sleep(0.001)
    deadline = time.monotonic() + 60
    while len(results) < issued and time.monotonic() < deadline:
        time.sleep(0.05)
    with lock:
        done = list(results)
    out.put((issued, done, time.process_time() - cpu0))
    for channel in channels:
        channel.close()


def overload(address: str, rate: float, seconds: float, generators: int = 2,
             split_point: Optional[int] = None, daemon_pids: Sequence[int] = ()) -> dict:
    """Calls open-loop at ``rate`` per second in total from ``generators`` processes for ``seconds``; health
    probed every 50 ms meanwhile from another process. ``daemon_pids``: the daemons whose CPU seconds (with
    their children's) over the flood are reported next to the generators', to show what the cores did."""
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
    cpu0, wall0 = daemons_cpu_seconds(daemon_pids), time.perf_counter()
    go.set()
    parts = [calls_out.get(timeout=seconds + 180) for _ in flood]
    daemon_cpu_s, wall_s = daemons_cpu_seconds(daemon_pids) - cpu0, time.perf_counter() - wall0
    health_ms = health_out.get(timeout=60)
    for proc in (prober, *flood):
        proc.join(30)
    issued = sum(n for n, _, _ in parts)
    results = [r for _, rs, _ in parts for r in rs]
    codes = Counter(c for c, _ in results)
    ok = [ms for c, ms in results if c == "OK"]
    refused = [ms for c, ms in results if c == "RESOURCE_EXHAUSTED"]
    # A call gRPC core drops before the server sees it ends CANCELLED at the client: it ended, but nobody
    # answered or refused it, so it is counted apart (answered + refused == issued means nothing was lost).
    return {"rate_rps": rate, "seconds": seconds, "generators": generators, "issued": issued,
            "ended": len(results), "answered": len(ok), "refused": len(refused),
            "cancelled": codes.get("CANCELLED", 0), "codes": dict(codes), "accepted_rps": len(ok) / seconds,
            "accepted_p99_ms": float(np.percentile(ok, 99)) if ok else None,
            "refused_p99_ms": float(np.percentile(refused, 99)) if refused else None,
            "health_checks": len(health_ms), "health_max_ms": max(health_ms) if health_ms else None,
            "health_p99_ms": float(np.percentile(health_ms, 99)) if health_ms else None,
            # cores busy from the start of the flood until its last answer: what the machine had left
            "daemon_cores": daemon_cpu_s / wall_s, "generator_cores": sum(c for _, _, c in parts) / wall_s,
            "cpu_window_s": wall_s}


def daemons_cpu_seconds(pids: Sequence[int]) -> float:
    """CPU seconds used so far by the processes ``pids`` and their live children (0 for one that is gone)."""
    return sum(sum(tree_cpu_seconds(pid) or (0.0, 0.0)) for pid in pids)


def verdict(result: dict) -> dict:
    s, o = result["steady"], result["overload"]
    growth = result["rss_end_mb"] - result["rss_start_mb"]
    return {
        "steady_no_errors": set(s["codes"]) == {"OK"},
        "memory_steady": growth <= max(50.0, 0.1 * result["rss_start_mb"]),
        "overload_nothing_lost": o["answered"] + o["refused"] == o["issued"],
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
             f"the steady throughput) for {o['seconds']:g} s from {o.get('generators', 1)} processes: {o['codes']}; "
             f"{o['answered']} answered, {o['refused']} refused, {o['cancelled']} cancelled (dropped before the "
             f"server saw them), {o['issued'] - o['ended']} never ended; accepted "
             f"{o['accepted_rps']:.0f} req/s, p99 {o['accepted_p99_ms']} ms; refusals p99 {o['refused_p99_ms']} ms; "
             f"{o['health_checks']} health checks, max {o['health_max_ms']:.1f} ms, p99 {o['health_p99_ms']:.1f} ms",
             f"- cores busy from the flood's start to its last answer ({o['cpu_window_s']:.1f} s; "
             f"{os.cpu_count()} on this machine): {result['daemons']} daemon(s) {o['daemon_cores']:.2f}, "
             f"generators {o['generator_cores']:.2f}",
             "", "| check | passed |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in result["verdict"].items()]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def start_daemons(count: int, checkpoint: Path, address: str, overrides: list[str]) -> list[subprocess.Popen]:
    """``count`` cloud daemons on ``address``, each SERVING before the next starts; several share the port
    (gRPC sets SO_REUSEPORT on Linux, so the kernel spreads connections over them)."""
    daemons: list[subprocess.Popen] = []
    try:
        for _ in range(count):
            daemons.append(subprocess.Popen([sys.executable, "-m", "cloud", "--config", "apps/cloud.yml",
                                             f"checkpoint={checkpoint}", f"address={address}", "log_level=WARNING",
                                             *overrides], cwd=ROOT))
            deadline = time.monotonic() + 120
            while not serving(address):
                if time.monotonic() > deadline or daemons[-1].poll() is not None:
                    raise RuntimeError("the cloud did not become SERVING")
                time.sleep(0.3)
    except BaseException:
        stop_daemons(daemons)
        raise
    return daemons


def stop_daemons(daemons: list[subprocess.Popen]) -> None:
    for daemon in daemons:
        daemon.terminate()
    for daemon in daemons:
        daemon.wait(30)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--overload", type=float, default=4.0)
    parser.add_argument("--overload-seconds", type=float, default=10.0)
    parser.add_argument("--generators", type=int, default=2, help="processes issuing the overload")
    parser.add_argument("--daemons", type=int, default=1, help="cloud daemons sharing the port (SO_REUSEPORT)")
    parser.add_argument("--split-point", type=int, default=None,
                        help="split point of the requests (default: the served model's deepest exit's)")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--name", default="load")
    args, cloud_overrides = parser.parse_known_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint) if args.checkpoint else small_checkpoint(Path(tmp))
        address = f"127.0.0.1:{free_port()}"
        daemons = start_daemons(args.daemons, checkpoint, address, cloud_overrides)
        pids = [d.pid for d in daemons]
        try:
            steady(address, 4, 50, args.split_point)  # warm-up: allocator and gRPC pools at their working size
            result = {"command": "python bench/load.py " + " ".join(argv), "overload_factor": args.overload,
                      "daemons": args.daemons, "rss_start_mb": sum(rss_mb(pid) for pid in pids)}
            result["steady"] = steady(address, args.clients, args.requests, args.split_point)
            result["rss_end_mb"] = sum(rss_mb(pid) for pid in pids)
            result["overload"] = overload(address, args.overload * result["steady"]["throughput_rps"],
                                          args.overload_seconds, args.generators, args.split_point, pids)
            result["cloud_serving_after"] = serving(address)
        finally:
            stop_daemons(daemons)
    result["verdict"] = verdict(result)
    report(args.name, result)
    return 0 if all(result["verdict"].values()) and result["cloud_serving_after"] else 1

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
