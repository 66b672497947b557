"""What a Python gRPC server costs per call on this machine, before any model work: the floor under
bench/serving.py's ratio.

    python bench/grpc_floor.py [--seconds 6] [--out grpc_floor]

Four servers answer ``spinn.v1.Inference/Infer`` with a fixed top-5 reply to 16 client threads (another process)
sending a request of the size an int8+zstd activation makes (2.9 kB): the sync server (thread pool, as
``python -m cloud`` runs) and ``grpc.aio``, each answering at once or through a batcher thread like the
daemon's (collect up to 16 requests or 2 ms, sleep 2 ms for the "forward" with the GIL released, answer all).
Prints calls/s, the server process's CPU ms per call and its context switches per call. Results:
bench/results/<out>.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import sys
import threading
import time
from concurrent import futures
from concurrent.futures import Future
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from proto import spinn_v1_pb2 as pb  # noqa: E402
from proto import spinn_v1_pb2_grpc as pb_grpc  # noqa: E402

from probes import context_switches, free_port, tree_cpu_seconds  # noqa: E402  (bench/: this script's folder)

CLIENTS = 16
REQUEST = pb.FeatureRequest(request_id="floor", split_point=9, features=pb.Tensor(data=os.urandom(2900)))
REPLY = pb.Prediction(request_id="floor", images=[pb.ImagePrediction(
    top_k=[pb.ClassScore(class_id=i, name=f"class {i}", probability=0.1) for i in range(5)])])


class Batcher:
    """The daemon's batching pattern without a model: up to 16 requests or 2 ms, a 2 ms GIL-free 'forward'."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._items: list[tuple[float, Future]] = []
        threading.Thread(target=self._loop, daemon=True).start()

    def submit(self) -> Future:
        future: Future = Future()
        with self._cond:
            self._items.append((time.monotonic(), future))
            self._cond.notify()
        return future

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if not self._items:
                        self._cond.wait()
                        continue
                    wait = self._items[0][0] + 0.002 - time.monotonic()
                    if len(self._items) >= CLIENTS or wait <= 0:
                        break
                    self._cond.wait(timeout=wait)
                batch, self._items = self._items[:CLIENTS], self._items[CLIENTS:]
            time.sleep(0.002)
            for _, future in batch:
                future.set_result(REPLY)


class Direct(pb_grpc.InferenceServicer):
    def Infer(self, request, context):
        return REPLY


class Batched(pb_grpc.InferenceServicer):
    def __init__(self) -> None:
        self.batcher = Batcher()

    def Infer(self, request, context):
        return self.batcher.submit().result()


class AioDirect(pb_grpc.InferenceServicer):
    async def Infer(self, request, context):
        return REPLY


class AioBatched(pb_grpc.InferenceServicer):
    def __init__(self) -> None:
        self.batcher = Batcher()

    async def Infer(self, request, context):
        return await asyncio.wrap_future(self.batcher.submit())


def serve(kind: str, port: int) -> None:
    """Child process: the server ``kind`` on ``port`` until killed."""
    if kind.startswith("aio"):
        async def main() -> None:
            server = grpc.aio.server()
            pb_grpc.add_InferenceServicer_to_server(AioBatched() if kind.endswith("batched") else AioDirect(),
                                                    server)
            server.add_insecure_port(f"127.0.0.1:{port}")
            await server.start()
            await server.wait_for_termination()
        asyncio.run(main())
        return
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    pb_grpc.add_InferenceServicer_to_server(Batched() if kind.endswith("batched") else Direct(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def clients(port: int, seconds: float, results) -> None:
    """Child process: CLIENTS threads call back to back for ``seconds``; puts the number of calls answered."""
    stop = time.monotonic() + seconds
    counts: list[int] = []

    def run() -> None:
        stub = pb_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        n = 0
        while time.monotonic() < stop:
            stub.Infer(REQUEST, timeout=30)
            n += 1
        counts.append(n)

    threads = [threading.Thread(target=run) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put(sum(counts))


def measure(kind: str, seconds: float) -> dict:
    ctx = mp.get_context("spawn")
    port = free_port()
    server = ctx.Process(target=serve, args=(kind, port), daemon=True)
    server.start()
    try:
        grpc.channel_ready_future(grpc.insecure_channel(f"127.0.0.1:{port}")).result(timeout=60)
        for duration in (1.0, seconds):  # warm-up, then the measurement
            results = ctx.Queue()
            load = ctx.Process(target=clients, args=(port, duration, results))
            cpu0, switches0 = tree_cpu_seconds(server.pid)[0], context_switches(server.pid)
            started = time.monotonic()
            load.start()
            calls = results.get(timeout=duration + 120)
            wall = time.monotonic() - started
            cpu1, switches1 = tree_cpu_seconds(server.pid)[0], context_switches(server.pid)
            load.join()
    finally:
        server.kill()
        server.join()
    return {"calls_per_s": calls / wall, "server_cpu_ms_per_call": 1000 * (cpu1 - cpu0) / calls,
            "context_switches_per_call": (switches1 - switches0) / calls}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--out", default="grpc_floor", help="result file stem under bench/results/")
    args = parser.parse_args()
    if not Path("/proc/self/stat").exists():
        raise SystemExit("this benchmark reads CPU time from /proc (Linux only)")
    rows = {}
    for kind in ("sync", "aio", "sync_batched", "aio_batched"):
        rows[kind] = measure(kind, args.seconds)
        r = rows[kind]
        print(f"{kind}: {r['calls_per_s']:.0f} calls/s, server CPU {r['server_cpu_ms_per_call']:.3f} ms/call, "
              f"{r['context_switches_per_call']:.1f} context switches/call", flush=True)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    results = {"clients": CLIENTS, "request_bytes": REQUEST.ByteSize(), "cpu_cores": os.cpu_count(),
               "grpcio": grpc.__version__, "servers": rows}
    (out / f"{args.out}.json").write_text(json.dumps(results, indent=2))
    lines = ["# Python gRPC floor: CPU per call with no model work", "",
             f"{CLIENTS} client threads (another process), {REQUEST.ByteSize()} B requests, top-5 replies; grpcio "
             f"{grpc.__version__}; {os.cpu_count()} CPU cores.", "",
             "| server | calls/s | server CPU ms/call | context switches/call |", "|---|---|---|---|"]
    for kind, r in rows.items():
        lines.append(f"| {kind} | {r['calls_per_s']:.0f} | {r['server_cpu_ms_per_call']:.3f} | "
                     f"{r['context_switches_per_call']:.1f} |")
    (out / f"{args.out}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
