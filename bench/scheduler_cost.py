"""The scheduler's own cost, side by side with the request it serves.

    python bench/scheduler_cost.py app:apps/cars_dev_test.yml checkpoint=PATH profile=PATH [--rounds 200]

Times one full decision (``Scheduler.update``: predict every ⟨split, threshold⟩ of the profile, choose, log) on
changing link conditions, and in the same process the device's classify latency of validation images with the
whole model on this CPU (one thread, no network: the fastest request there is, so the ratio is an upper bound).
The scheduler decides at most once per ``scheduler_interval_seconds`` and off the request path; the ratio below
charges one whole decision to every request. Writes bench/results/scheduler_cost_<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.progressive import load  # noqa: E402
from device.config import DeviceConfig  # noqa: E402
from device.runtime import DeviceRuntime  # noqa: E402
from device.scheduler import Conditions, Objective, Scheduler  # noqa: E402
from models.app_config import AppConfig  # noqa: E402
from models.checkpoint import load_checkpoint  # noqa: E402
from models.config import from_dict, parse_app_argv  # noqa: E402
from models.offline_profile import load_profile  # noqa: E402


def decision_ms(profile, rounds: int) -> list[float]:
    """Wall time (ms) of ``rounds`` decisions, the link alternating between 0.25 and 20 Mbit/s (each one due)."""
    sched = Scheduler(profile, Objective("max_accuracy", latency_ms=300.0))
    out = []
    for i in range(rounds):
        cond = Conditions.from_link((20e6 if i % 2 else 0.25e6), 40.0)
        started = time.perf_counter()
        sched.update(cond)
        out.append((time.perf_counter() - started) * 1000.0)
    return out


def request_ms(checkpoint: str, images: list, n: int) -> list[float]:
    """Classify latency (ms) of ``n`` images with the whole model on the device (split N, no cloud)."""
    ckpt = load_checkpoint(checkpoint)
    cfg = from_dict(DeviceConfig, {"checkpoint": checkpoint, "split_point": ckpt.model.num_blocks,
                                   "z_confidence_threshold": 1.0, "log_level": "WARNING"}, source="bench")
    runtime = DeviceRuntime(cfg, ckpt, None, None)
    try:
        return [runtime.classify_tensor(images[i % len(images)]).latency_ms for i in range(n)]
    finally:
        runtime.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--name", default="cars_dev")
    args, rest = parser.parse_known_args()
    profile_path = next((a.split("=", 1)[1] for a in rest if a.startswith("profile=")), None)
    if profile_path is None:
        parser.error("profile=PATH is needed (python test.py app:... split_point=all)")
    app = parse_app_argv(AppConfig, [a for a in rest if not a.startswith("profile=")])
    logging.getLogger("device.scheduler").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    profile = load_profile(profile_path)
    _, batches = load(app, 64)
    images = [x for xs, _ in batches for x in xs]
    requests = request_ms(str(app.checkpoint_path()), images, 100)[10:]
    decisions = decision_ms(profile, args.rounds)
    candidates = sum(len(s.rows) for s in profile.splits)
    result = {"command": "python bench/scheduler_cost.py " + " ".join(sys.argv[1:]), "profile": profile_path,
              "profile_pairs": candidates, "decision_ms_p50": float(np.median(decisions)),
              "decision_ms_p95": float(np.percentile(decisions, 95)),
              "request_ms_p50": float(np.median(requests)),
              "ratio_p50": float(np.median(decisions) / np.median(requests))}
    out = ROOT / "bench" / "results"
    (out / f"scheduler_cost_{args.name}.json").write_text(json.dumps(result, indent=2))
    md = (f"# Scheduler cost: {args.name}\n\n`{result['command']}`\n\n"
          f"- one decision over the profile's {candidates} ⟨split, threshold⟩ rows: p50 "
          f"{result['decision_ms_p50']:.2f} ms, p95 {result['decision_ms_p95']:.2f} ms\n"
          f"- one request, whole model on this CPU (1 thread, no network): p50 {result['request_ms_p50']:.1f} ms\n"
          f"- **ratio {100 * result['ratio_p50']:.1f} %** if every request paid a whole decision; the scheduler "
          "decides at most once per scheduler_interval_seconds (0.5 s), on its own thread\n")
    (out / f"scheduler_cost_{args.name}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
