"""What each part of receiving a weight stream costs the device's own answers, measured apart on this machine.

    python bench/stream_interference.py app:apps/quickstart_test.yml --name quickstart

The answering thread runs the device's head (the app's split point, its exits) on one image, one torch thread,
back to back for ``--seconds``; meanwhile a thread at the stream's nice (10) does, ``--rate`` times a second,
one chunk's worth of one part of what ``device/delivery.py`` does per chunk:

- ``none``: nothing (the baseline);
- ``grpc``: read the next ``StreamWeights`` message from a cloud process on loopback (``python -m cloud``; the
  reader's pace holds the stream back, so every message costs the device's Python what a paced link would);
- ``decode``: a round trip to the decode process (``DecoderProcess.submit`` then ``sync``: send the chunk,
  wait, read the changed names and the progress), as the stream did per chunk before;
- ``save``: store the chunk in a ``ChunkStore`` (write, rename), as the stream's thread did before;
- ``before``: the three in turn, the stream's thread's work per chunk before;
- ``submit``: hand the chunk to the decode process without waiting (it verifies, decodes and stores it; a
  sync every 128 KB keeps its queue short), and ``now``: ``grpc`` and ``submit``, the work per chunk now.

Variants are interleaved over ``--repeats`` rounds (the machine's own noise moves a p99 by ~0.1 ms between
runs). Reported: answer latency p50/p99 per variant and round, and each variant's mean p99 minus the baseline's.
Writes ``bench/results/stream_interference_<name>.{json,md}``. Loopback only.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import torch  # noqa: E402

from bench.probes import free_port  # noqa: E402
from bench.report import write_results  # noqa: E402
from cloud.delivery import PackageCache  # noqa: E402
from cloud.inference import ServedModel  # noqa: E402
from device.decode_process import DecoderProcess  # noqa: E402
from device.cache import ChunkStore  # noqa: E402
from models.app_config import AppConfig  # noqa: E402
from models.config import parse_app_argv  # noqa: E402
from models.partition import Head  # noqa: E402
from proto import spinn_v1_pb2 as pb  # noqa: E402
from proto import spinn_v1_pb2_grpc as pb_grpc  # noqa: E402
from serving.priority import lower_thread_priority  # noqa: E402

VARIANTS = ("none", "grpc", "decode", "save", "before", "submit", "now")


class Parts:
    """The per-chunk parts, each callable with the chunk's index (cycling through the package)."""

    def __init__(self, served: ServedModel, split: int, port: int) -> None:
        self.package = PackageCache().get(served, split, "split")
        self.split = split
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(self.channel).result(timeout=120)
        self.stub = pb_grpc.ModelDeliveryStub(self.channel)
        self.messages = None
        self.store = ChunkStore(Path(tempfile.mkdtemp(prefix="spinn-interference-")), self.package.manifest)
        self.decoder = DecoderProcess(nice=10)
        self.decoder.begin(self.package.manifest, self.store)  # up before any measurement

    def grpc(self, index: int) -> None:
        if self.messages is None:
            ref = pb.ModelRef(model_id=self.package.manifest.model_id,
                              model_version=self.package.manifest.model_version,
                              digest=self.package.manifest.model_digest)
            self.messages = self.stub.StreamWeights(pb.WeightRequest(
                model=ref, split_point=self.split, order="split",
                package_digest=self.package.manifest.package_digest), timeout=600)
        if next(self.messages, None) is None:  # the stream ended: start it again on the next chunk
            self.messages = None

    def submit(self, index: int) -> None:
        n = len(self.package.payloads)
        if index % n == 0 and self.decoder.next_chunk:
            self.decoder.begin(self.package.manifest, self.store)  # the package again, from its first chunk
        self.decoder.submit(index % n, self.package.payloads[index % n])

    def decode(self, index: int) -> None:
        self.submit(index)
        self.decoder.sync()

    def save(self, index: int) -> None:
        n = len(self.package.payloads)
        self.store.save(index % n, self.package.payloads[index % n])

    def step(self, variant: str) -> Callable[[int], None] | None:
        """One chunk's work of ``variant`` (None for ``none``)."""
        parts = {"grpc": [self.grpc], "decode": [self.decode], "save": [self.save],
                 "before": [self.grpc, self.decode, self.save], "submit": [self.submit],
                 "now": [self.grpc, self.submit]}.get(variant)
        if parts is None:
            return None

        def run_parts(index: int) -> None:
            for part in parts:
                part(index)

        return run_parts

    def close(self) -> None:
        if self.messages is not None:
            self.messages.cancel()
        self.decoder.close()
        self.channel.close()


def measure(head: torch.nn.Module, x: torch.Tensor, step: Callable[[int], None] | None, rate: float,
            seconds: float) -> np.ndarray:
    """Answer latencies (ms) of ``head(x)`` back to back for ``seconds`` while ``step`` runs ``rate`` times a
    second on a thread at the stream's nice."""
    stop = threading.Event()

    def background() -> None:
        lower_thread_priority(10)
        index = 0
        while not stop.wait(1.0 / rate):
            step(index)
            index += 1

    thread = threading.Thread(target=background, daemon=True) if step else None
    if thread:
        thread.start()
    latencies = []
    with torch.no_grad():
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t = time.perf_counter()
            head(x)
            latencies.append(time.perf_counter() - t)
    stop.set()
    if thread:
        thread.join(60)
    return np.array(latencies) * 1e3


def run(args: argparse.Namespace, app: AppConfig) -> dict:
    torch.set_num_threads(1)
    checkpoint = app.checkpoint_path()
    served = ServedModel.from_file(str(checkpoint), "spinn")  # labelled as the cloud below labels it
    split = app.split_point if app.split_point is not None else max(served.model.exit_points)
    head = Head(served.model, split).eval()
    x = torch.randn(1, 3, served.input_size, served.input_size)
    port = free_port()
    cloud = subprocess.Popen([sys.executable, "-m", "cloud", f"checkpoint={checkpoint}",
                              f"address=127.0.0.1:{port}", "log_level=WARNING", "intra_op_threads=1",
                              f"delivery_prebuild=[{split}]"], cwd=ROOT)
    parts = None
    try:
        parts = Parts(served, split, port)
        with torch.no_grad():
            for _ in range(300):  # warm-up
                head(x)
        rounds = []
        for repeat in range(args.repeats):
            for variant in VARIANTS:
                lat = measure(head, x, parts.step(variant), args.rate, args.seconds)
                rounds.append({"round": repeat, "variant": variant, "n": len(lat),
                               "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))})
                print(rounds[-1], flush=True)
    finally:
        if parts is not None:
            parts.close()
        cloud.terminate()
        cloud.wait(30)
    base = np.mean([r["p99_ms"] for r in rounds if r["variant"] == "none"])
    summary = {v: {"mean_p99_ms": float(np.mean([r["p99_ms"] for r in rounds if r["variant"] == v])),
                   "mean_p50_ms": float(np.mean([r["p50_ms"] for r in rounds if r["variant"] == v]))}
               for v in VARIANTS}
    for v in VARIANTS:
        summary[v]["p99_minus_none_ms"] = summary[v]["mean_p99_ms"] - base
    return {"split_point": split, "rate": args.rate, "seconds": args.seconds, "repeats": args.repeats,
            "chunks": len(parts.package.payloads), "rounds": rounds, "summary": summary}


def markdown(result: dict, name: str, command: str) -> str:
    lines = [f"# What receiving a weight stream costs the device's answers: {name}", "", f"`{command}`", "",
             f"Head up to split point {result['split_point']} answering back to back ({result['seconds']:g} s per "
             f"variant and round, {result['repeats']} rounds interleaved); one chunk's part {result['rate']:g} "
             f"times a second on a thread at nice 10 (1 Mbit/s brings about 8 chunks of 16 KB a second).", "",
             "| variant | mean p50 | mean p99 | p99 minus none | p99 per round |", "|---|---|---|---|---|"]
    for v, s in result["summary"].items():
        per = ", ".join(f"{r['p99_ms']:.3f}" for r in result["rounds"] if r["variant"] == v)
        lines.append(f"| {v} | {s['mean_p50_ms']:.3f} ms | {s['mean_p99_ms']:.3f} ms | "
                     f"{s['p99_minus_none_ms']:+.3f} ms | {per} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=8.0, help="chunks a second")
    parser.add_argument("--seconds", type=float, default=10.0, help="per variant and round")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--name", default="quickstart")
    args, app_args = parser.parse_known_args()
    app = parse_app_argv(AppConfig, app_args)
    result = run(args, app)
    command = "python bench/stream_interference.py " + " ".join(sys.argv[1:])
    write_results(f"stream_interference_{args.name}", {"command": command, **result},
                  markdown(result, args.name, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
