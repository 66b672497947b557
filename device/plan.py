"""``python -m device plan``: the scheduler's decision and predicted table for a given link, without running
anything (for users sizing a deployment).

    python -m device plan --config apps/device.yml --bandwidth 2mbit --rtt 40ms [--device-slowdown 4] [--json]

The profile is ``profile`` or, by default, ``profile.json`` beside the checkpoint; the objective by default the
fastest pair within ``accuracy_tolerance`` (1 point) of the model's own accuracy.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict

from device.config import DeviceConfig
from device.scheduler import Candidate, Conditions, choose_from, feasible, predict, score
from models.config import ConfigError
from models.offline_profile import ProfileError, load_profile

_NUMBER = r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"
_RATE = re.compile(r"^\s*" + _NUMBER + r"\s*(bit|kbit|mbit|gbit)?(?:/s)?\s*$", re.IGNORECASE)
_TIME = re.compile(r"^\s*" + _NUMBER + r"\s*(ms|s)?\s*$", re.IGNORECASE)
_RATE_UNITS = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}


def parse_rate(text: str) -> float:
    """``2mbit`` / ``500kbit`` / ``2Mbit/s`` / ``1e6`` (bit/s, tc's units) -> bit/s; ValueError naming the
    text otherwise."""
    m = _RATE.match(text)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"--bandwidth {text!r}: expected a positive rate like 2mbit, 500kbit or 1000000 (bit/s)")
    return float(m.group(1)) * _RATE_UNITS[(m.group(2) or "bit").lower()]


def parse_ms(text: str) -> float:
    """``40ms`` / ``0.04s`` / ``40`` (ms) -> ms; ValueError naming the text otherwise."""
    m = _TIME.match(text)
    if not m:
        raise ValueError(f"--rtt {text!r}: expected a time like 40ms or 0.04s")
    return float(m.group(1)) * (1000.0 if (m.group(2) or "ms").lower() == "s" else 1.0)


def best_per_split(candidates: list[Candidate], objective) -> list[Candidate]:
    """Per split point, the candidate the objective ranks first, feasible ones first (the table ``plan`` prints)."""
    best: dict[int, Candidate] = {}
    for c in candidates:
        b = best.get(c.split_point)
        key = (not feasible(c, objective), score(c, objective))
        if b is None or key < (not feasible(b, objective), score(b, objective)):
            best[c.split_point] = c
    return [best[s] for s in sorted(best)]


def describe(objective) -> str:
    """The objective in words, e.g. ``min_latency (smallest p95) s.t. accuracy >= 0.8710``."""
    what = {"min_latency": "smallest p95", "max_accuracy": "highest accuracy", "min_bytes": "fewest bytes",
            "min_cloud_load": "least cloud compute", "max_throughput": "most images/s"}[objective.kind]
    bounds = ([f"p95 <= {objective.latency_ms:g} ms"] if objective.latency_ms is not None else []) + (
        [f"accuracy >= {objective.accuracy:.4f}"] if objective.accuracy is not None else [])
    return f"{objective.kind} ({what})" + (f" s.t. {' and '.join(bounds)}" if bounds else "")


def format_plan(decision, rows: list[Candidate], cond: Conditions, objective=None) -> str:
    head = (f"{'split':>5} {'tau':>5} {'codec':>12} {'accuracy':>8} {'acc-low':>8} {'upload':>6} {'B/img':>8} "
            f"{'p50 ms':>8} {'p95 ms':>8} {'img/s':>7}")
    lines = [f"link {8 * cond.bandwidth_bytes_per_s / 1e6:g} Mbit/s, RTT {cond.rtt_ms:g} ms: split point "
             f"{decision.split_point}, threshold {decision.threshold:g} "
             f"({'feasible' if decision.feasible else 'NOT feasible'}: {decision.reason})"]
    if objective is not None:
        lines.append(f"objective: {describe(objective)}")
    lines += [head, "-" * len(head)]
    for c in rows:
        mark = " <-" if (c.split_point, c.threshold) == (decision.split_point, decision.threshold) else ""
        lines.append(f"{c.split_point:5d} {c.threshold:5.2f} {c.codec:>12} {c.accuracy:8.4f} {c.accuracy_low:8.4f} "
                     f"{c.uploading_rate:6.3f} {c.bytes_per_image:8.0f} {c.latency_p50_ms:8.1f} {c.latency_p95_ms:8.1f} "
                     f"{c.throughput_per_s:7.1f}{mark}")
    lines.append("(per split point the pair the objective ranks first; acc-low: the accuracy less 1.645 standard "
                 "errors of its difference to the final classifier, what the objective compares; device times from "
                 "the profile x --device-slowdown; cloud compute from the profile)")
    return "\n".join(lines)


def run_plan(cfg: DeviceConfig, bandwidth: str, rtt: str, slowdown: float, as_json: bool) -> int:
    """Print the decision for a steady link of ``bandwidth`` and ``rtt``; 0, or ConfigError naming the bad
    option or key."""
    path = cfg.profile_path()
    if path is None:
        raise cfg.missing_profile()
    cfg.check_objective()
    try:
        profile = load_profile(path)
    except ProfileError as err:
        raise ConfigError(f"config key 'profile': {err}") from None
    try:
        cond = Conditions.from_link(parse_rate(bandwidth), parse_ms(rtt))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if slowdown <= 0:
        raise ConfigError(f"--device-slowdown must be > 0, got {slowdown}")
    cond.device_block_ms = {k: v * slowdown for k, v in enumerate(profile.block_ms)}
    cond.device_exit_ms = {k: v * slowdown for k, v in profile.exit_ms.items()}
    objective = cfg.objective_spec(profile.final_accuracy)
    candidates = predict(profile, cond)
    decision = choose_from(candidates, objective)
    rows = best_per_split(candidates, objective)
    if as_json:
        print(json.dumps({"conditions": cond.summary(), "objective": asdict(objective), "decision": asdict(decision),
                          "per_split": [c.predicted() for c in rows]}, indent=1))
    else:
        print(format_plan(decision, rows, cond, objective))
    return 0
