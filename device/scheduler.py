"""SPINN's scheduler: the ⟨split point, confidence threshold⟩ pair chosen at run time.

``predict`` turns the offline profile (models/offline_profile.py) and what the device measures (``Conditions``)
into a prediction for every candidate pair: latency (mean, p50, p95), accuracy, bytes per image, cloud load and
throughput. ``choose`` applies the user's objective (``Objective``); ``Scheduler`` re-decides as measurements
move, with hysteresis, and logs every decision as one JSON line.

Latency of one image is a mixture: an image answered by device exit ``e`` costs the blocks before ``e`` and the
exit heads up to ``e``; an uploaded one costs the whole head and every device exit head, then ``bytes /
bandwidth + RTT + cloud queue + cloud compute``. For a latency bound the upload part is planned for the tail:
its time above the head is log-normal, with the median at the mean bandwidth and RTT and the 95th percentile at
their tails (5th percentile of bandwidth, p95 of RTT), and the mixture's quantile is read off (SPINN, Neurosurgeon and Edgent all plan with the mean bandwidth).

A profile's accuracy is a sample: a pair is judged by ``accuracy_low``, its accuracy less ``ACCURACY_Z`` standard
errors of its difference to the final classifier on the profile's images (the difference is nonzero only on
the images an exit answered differently from the final classifier). Accuracy floors, ties and ``max_accuracy``
compare that bound, so a pair that the profile finds as accurate only by the luck of the sample does not win.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional

import numpy as np

from models.offline_profile import JPEG, OfflineProfile, SplitEntry

log = logging.getLogger("device.scheduler")

OBJECTIVES = ("min_latency", "max_accuracy", "min_bytes", "min_cloud_load", "max_throughput")
_NORMAL = statistics.NormalDist()
_Z95 = _NORMAL.inv_cdf(0.95)
ACCURACY_TIE = 0.002  # accuracies are compared in steps of this (about 2 images of an evaluation set of 1,000)
#: A pair is judged by its accuracy less this many standard errors of its difference to the final classifier
#: (one-sided 95 %): a pair whose profile accuracy rests on many images its exits answered differently must
#: beat the others by more than that noise (README, "Scheduler").
ACCURACY_Z = 1.645


@dataclass
class Conditions:
    """What the device measures now. Bandwidth in bytes/s (upload), times in ms for one image.

    ``device_block_ms`` / ``device_exit_ms``: measured per block index / exit boundary; blocks the device has
    not run are estimated from the profile's times scaled by what it did measure. ``cloud_compute_scale``: the
    cloud's measured compute time over the profile's estimate at the split it was measured on.
    """

    bandwidth_bytes_per_s: float
    bandwidth_p05_bytes_per_s: float
    rtt_ms: float
    rtt_p95_ms: float
    cloud_queue_ms: float = 0.0
    cloud_compute_scale: float = 1.0
    device_block_ms: dict[int, float] = field(default_factory=dict)
    device_exit_ms: dict[int, float] = field(default_factory=dict)
    cloud_up: bool = True
    device_tail: float = 1.0  # p95 / mean of the device's compute per request (>= 1: a shared or throttled CPU)

    @classmethod
    def from_link(cls, bandwidth_bit_s: float, rtt_ms: float) -> "Conditions":
        """A steady link: ``bandwidth_bit_s`` (bit/s) and ``rtt_ms``, no spread (``python -m device plan``)."""
        bw = bandwidth_bit_s / 8.0
        return cls(bw, bw, rtt_ms, rtt_ms)

    def summary(self) -> dict:
        """The inputs of a decision, for its log line (device time of all blocks summed, not per block)."""
        return {"bandwidth_bit_s": round(8 * self.bandwidth_bytes_per_s), "bandwidth_p05_bit_s":
                round(8 * self.bandwidth_p05_bytes_per_s), "rtt_ms": round(self.rtt_ms, 2),
                "rtt_p95_ms": round(self.rtt_p95_ms, 2), "cloud_queue_ms": round(self.cloud_queue_ms, 2),
                "cloud_compute_scale": round(self.cloud_compute_scale, 3), "cloud_up": self.cloud_up,
                "device_tail": round(self.device_tail, 3),
                "device_blocks_measured": len(self.device_block_ms),
                "device_blocks_ms": round(sum(self.device_block_ms.values()), 2)}


@dataclass
class Objective:
    """``max_accuracy`` subject to p95 latency <= ``latency_ms``; ``min_latency`` (the smallest p95) /
    ``min_bytes`` / ``min_cloud_load`` / ``max_throughput`` subject to accuracy >= ``accuracy`` (and p95 <=
    ``latency_ms`` when that is given too). ``DeviceConfig.objective_spec`` gives ``min_latency`` a floor of the
    model's own accuracy less a tolerance when none is configured, so it needs no bound from the user."""

    kind: str = "min_latency"
    latency_ms: Optional[float] = None
    accuracy: Optional[float] = None

    def validate(self) -> None:
        if self.kind not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.kind!r}")
        if self.kind == "max_accuracy" and self.latency_ms is None:
            raise ValueError("objective max_accuracy needs a latency bound (latency_bound_ms)")
        if self.latency_ms is not None and not (math.isfinite(self.latency_ms) and self.latency_ms > 0):
            raise ValueError(f"latency bound must be a number > 0 ms, got {self.latency_ms}")
        if self.accuracy is not None and not 0.0 <= self.accuracy <= 1.0:  # also false for NaN
            raise ValueError(f"accuracy floor must be in [0, 1], got {self.accuracy}")


@dataclass
class Candidate:
    """The prediction for one pair: times ms per image, bytes and cloud MFLOPs per image (mean over images),
    throughput images/s (the device's sequential compute or the link, whichever is slower)."""

    split_point: int
    threshold: float
    codec: str
    accuracy: float
    accuracy_low: float  # ``accuracy`` less ACCURACY_Z standard errors: what decisions compare (module docstring)
    uploading_rate: float
    bytes_per_image: float
    cloud_mflops_per_image: float
    latency_mean_ms: float
    latency_p50_ms: float
    latency_p95_ms: float
    throughput_per_s: float

    def predicted(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


@dataclass
class Decision:
    """The choice, whether it meets the objective's constraints, the prediction and why."""

    split_point: int
    threshold: float
    feasible: bool
    predicted: dict
    reason: str
    cost_ms: float = 0.0  # time the decision took (predict + choose), ms

    @classmethod
    def of(cls, c: Candidate, feasible: bool, reason: str) -> "Decision":
        return cls(c.split_point, c.threshold, feasible, c.predicted(), reason)


def _scaled(measured: dict[int, float], reference: list[float] | dict[int, float], keys: Iterable[int]) -> float:
    """Median of measured/reference over the keys measured (1.0 when none): how much slower this device is."""
    ratios = [measured[k] / reference[k] for k in keys if k in measured and reference[k] > 0]
    return statistics.median(ratios) if ratios else 1.0


def device_times(profile: OfflineProfile, cond: Conditions) -> tuple[np.ndarray, dict[int, float], float]:
    """Per-block and per-exit device time (ms) and the final classifier's, measured where known, else the
    profile's scaled by the device's measured/profile ratio."""
    block_scale = _scaled(cond.device_block_ms, profile.block_ms, range(profile.num_blocks))
    exit_scale = _scaled(cond.device_exit_ms, profile.exit_ms, profile.exit_ms) if cond.device_exit_ms \
        else block_scale
    blocks = np.array([cond.device_block_ms.get(k, profile.block_ms[k] * block_scale)
                       for k in range(profile.num_blocks)])
    exits = {k: cond.device_exit_ms.get(k, v * exit_scale) for k, v in profile.exit_ms.items()}
    return blocks, exits, profile.final_ms * block_scale


def cloud_ms(profile: OfflineProfile, split: int, scale: float = 1.0) -> float:
    """The cloud's compute for one image from ``split`` on (ms): the profile's batch-1 times x ``scale`` (what the
    cloud's answers report over that estimate)."""
    return (sum(profile.block_ms[split:]) + sum(v for k, v in profile.exit_ms.items() if k > split)
            + profile.final_ms) * scale


def _quantile(local: list[tuple[float, float]], up_median: float, sigma: float, floor: float, u: float,
              q: float) -> float:
    """Quantile ``q`` of one image's latency: ``local`` ``(time, mass)`` answers in time order, all no later than
    ``floor`` (the whole head), then a share ``u`` of uploads whose time above ``floor`` is log-normal with
    median ``up_median - floor`` and log-spread ``sigma`` (right-skewed, never below the head)."""
    cum = 0.0
    for t, mass in local:
        cum += mass
        if cum >= q - 1e-12:
            return t
    if u <= 0:
        return local[-1][0] if local else floor
    inner = min(max((q - cum) / u, 1e-6), 1 - 1e-6)
    return floor + (up_median - floor) * math.exp(sigma * _NORMAL.inv_cdf(inner))


def upload_bytes(entry: SplitEntry, codec: str) -> tuple[float, float]:
    """Mean and p95 bytes of one offload at ``entry`` with ``codec`` (int8+zstd's when it was not measured)."""
    stats = entry.bytes.get(codec) or entry.bytes.get("int8+zstd") or next(iter(entry.bytes.values()))
    return stats.mean, stats.p95


@dataclass
class _SplitCost:
    """Per split, what every threshold shares: exit answer times, the head's and the upload path's times (ms)."""

    exit_ms: list[float]  # time to the answer of each device exit (blocks before it + exit heads up to it)
    head_ms: float  # the whole head and every device exit head: an image that is uploaded
    up_mean_ms: float
    up_p95_ms: float
    mean_bytes: float
    local: bool  # the "uploads" are answered on the device by the final classifier (cloud down, or split N)


def _split_cost(profile: OfflineProfile, entry: SplitEntry, codec: str, cond: Conditions, prefix: list[float],
                exits: dict[int, float], final_ms: float, local_final: bool) -> _SplitCost:
    s, heads, times = entry.split_point, 0.0, []
    for e in entry.device_exits:
        heads += exits[e]
        times.append(prefix[e] + heads)
    head_ms = prefix[s] + heads
    mean_bytes, p95_bytes = upload_bytes(entry, codec)
    local = not cond.cloud_up or (local_final and s == profile.num_blocks)
    if not local:
        cloud = cond.cloud_queue_ms + cloud_ms(profile, s, cond.cloud_compute_scale)
        transfer = mean_bytes / cond.bandwidth_bytes_per_s * 1000
        up_mean = head_ms + transfer + cond.rtt_ms + cloud
        # the transfer's and the RTT's excess at their tails, combined as independent spreads (adding two
        # p95s would plan for a far rarer event than the p95)
        extra = math.hypot(p95_bytes / cond.bandwidth_p05_bytes_per_s * 1000 - transfer, cond.rtt_p95_ms - cond.rtt_ms)
        up_p95 = up_mean + extra
    else:  # the breaker is open, or the device holds the final classifier after the last block
        up_mean = up_p95 = prefix[-1] + heads + final_ms
    return _SplitCost(times, head_ms, up_mean, up_p95, mean_bytes, local)


def _candidate(entry: SplitEntry, row, codec: str, cond: Conditions, cost: _SplitCost, low: float) -> Candidate:
    local = [(t, r) for t, r in zip(cost.exit_ms, row.exit_rates) if r > 0]
    local_total = sum(t * r for t, r in local)
    u = row.uploading_rate
    above = max(cost.up_mean_ms - cost.head_ms, 1e-6)
    sigma = max(0.0, math.log(max(cost.up_p95_ms - cost.head_ms, above) / above)) / _Z95
    p50 = _quantile(local, cost.up_mean_ms, sigma, cost.head_ms, u, 0.5)
    # the p95 plan: device compute at its own tail too (the upload part keeps its network spread)
    tail = cond.device_tail
    slow_head = cost.head_ms * tail
    up_slow = cost.up_mean_ms * tail if cost.local else cost.up_mean_ms + slow_head - cost.head_ms
    p95 = _quantile([(t * tail, m) for t, m in local], up_slow, sigma, slow_head, u, 0.95)
    sent = 0.0 if cost.local else u * cost.mean_bytes
    device_ms = local_total + u * (cost.up_mean_ms if cost.local else cost.head_ms)
    rates = [1000.0 / max(device_ms, 1e-6)] + ([cond.bandwidth_bytes_per_s / sent] if sent > 0 else [])
    return Candidate(entry.split_point, row.threshold, codec, row.accuracy, low, 0.0 if cost.local else u, sent,
                     0.0 if cost.local else u * entry.cloud_flops / 1e6, local_total + u * cost.up_mean_ms, p50, p95,
                     min(rates))


def predict(profile: OfflineProfile, cond: Conditions, codecs: Optional[dict[int, str]] = None,
            splits: Optional[Iterable[int]] = None, local_final: bool = True) -> list[Candidate]:
    """A prediction for every ⟨split, threshold⟩ of ``profile`` (``splits``: only those, e.g. the ones whose
    weights the device holds). ``codecs``: the codec each split uploads with (default int8+zstd; "jpeg" at
    split 0 for an input upload). ``local_final``: the device holds the whole model, so at the last split
    point it answers with the final classifier itself instead of uploading (DeviceRuntime does)."""
    codecs = codecs or {}
    if not cond.cloud_up and local_final:
        # every split would answer on the device, but any split short of the last would also try the cloud
        # whenever the breaker half-opens: plan the one that never does
        splits = [profile.num_blocks]
    blocks, exits, final_ms = device_times(profile, cond)
    prefix = [0.0, *np.cumsum(blocks).tolist()]  # device time to each boundary
    chosen = range(profile.num_blocks + 1) if splits is None else sorted(set(splits))
    out = []
    for s in chosen:
        entry = profile.split(s)
        codec = codecs.get(s, JPEG if s == 0 and JPEG in entry.bytes else "int8+zstd")
        cost = _split_cost(profile, entry, codec, cond, prefix, exits, final_ms, local_final)
        seen = set()  # thresholds with the same outcome (no exit reaches them) are one candidate
        for row in entry.rows_for(codec):
            key = (row.uploading_rate, row.accuracy, tuple(row.exit_rates))
            if key not in seen:
                seen.add(key)
                low = row.accuracy - ACCURACY_Z * row.accuracy_se(profile.num_images, profile.final_accuracy)
                out.append(_candidate(entry, row, codec, cond, cost, low))
    return out


def feasible(c: Candidate, obj: Objective) -> bool:
    """Whether ``c`` meets the objective's constraints (p95 bound, accuracy floor)."""
    if obj.latency_ms is not None and c.latency_p95_ms > obj.latency_ms:
        return False
    return obj.accuracy is None or c.accuracy_low >= obj.accuracy - 1e-9


def score(c: Candidate, obj: Objective) -> tuple:
    """Sort key, smaller is better: the objective first, ties broken by accuracy, then tail latency, bytes, and
    last the deeper split (with the cloud gone every split predicts the same: the deepest does not try it)."""
    acc = round(c.accuracy_low / ACCURACY_TIE)
    if obj.kind == "max_accuracy":
        return (-acc, c.latency_p95_ms, c.bytes_per_image, -c.split_point)
    if obj.kind == "min_latency":
        return (c.latency_p95_ms, -acc, c.bytes_per_image, -c.split_point)
    primary = {"min_bytes": c.bytes_per_image, "min_cloud_load": c.cloud_mflops_per_image,
               "max_throughput": -c.throughput_per_s}[obj.kind]
    return (primary, -acc, c.latency_p95_ms, -c.split_point)


def choose_from(candidates: list[Candidate], obj: Objective) -> Decision:
    """The best feasible candidate; with none feasible the closest (the smallest p95 for a latency bound,
    else the most accurate), marked infeasible with the reason."""
    if not candidates:
        raise ValueError("no candidate split point (no weights for any head yet)")
    ok = [c for c in candidates if feasible(c, obj)]
    if ok:
        best = min(ok, key=lambda c: score(c, obj))
        return Decision.of(best, True, f"{obj.kind}: best of {len(ok)} feasible of {len(candidates)}")
    accurate = [c for c in candidates if obj.accuracy is None or c.accuracy_low >= obj.accuracy - 1e-9]
    if obj.latency_ms is not None and accurate:
        best = min(accurate, key=lambda c: (c.latency_p95_ms, -c.accuracy_low))
        why = f"no pair meets p95 <= {obj.latency_ms:g} ms; the fastest (p95 {best.latency_p95_ms:.1f} ms)" + (
            "" if obj.accuracy is None else f" of those with accuracy >= {obj.accuracy}")
    else:
        best = min(candidates, key=lambda c: (-c.accuracy_low, c.latency_p95_ms))
        why = f"no pair reaches accuracy {obj.accuracy}; the most accurate ({best.accuracy_low:.4f} at its lower bound)"
    return Decision.of(best, False, why)


def choose(profile: OfflineProfile, conditions: Conditions, objective: Objective,
           codecs: Optional[dict[int, str]] = None, splits: Optional[Iterable[int]] = None,
           local_final: bool = True) -> Decision:
    """``predict`` then ``choose_from``; the decision records its own cost (ms)."""
    started = time.perf_counter()
    decision = choose_from(predict(profile, conditions, codecs, splits, local_final), objective)
    decision.cost_ms = (time.perf_counter() - started) * 1000.0
    return decision


def _moved(old: Conditions, new: Conditions, margin: float) -> bool:
    """Whether the link, the cloud or the device moved by more than ``margin`` (relative; times with a 1 ms
    floor, so that sub-millisecond loopback jitter is no move) since ``old``, or the cloud came or went."""
    if old.cloud_up != new.cloud_up:
        return True
    pairs = [(old.bandwidth_bytes_per_s, new.bandwidth_bytes_per_s), (old.bandwidth_p05_bytes_per_s,
             new.bandwidth_p05_bytes_per_s), (old.rtt_ms + 1.0, new.rtt_ms + 1.0),
             (old.rtt_p95_ms + 1.0, new.rtt_p95_ms + 1.0), (old.cloud_queue_ms + 1.0, new.cloud_queue_ms + 1.0),
             (old.cloud_compute_scale, new.cloud_compute_scale), (old.device_tail, new.device_tail),
             (sum(old.device_block_ms.values()) + 1.0, sum(new.device_block_ms.values()) + 1.0)]
    return any(abs(b - a) > margin * max(abs(a), 1e-9) for a, b in pairs)


class Scheduler:
    """Re-decides when the measurements moved past ``margin`` since the last decision, and switches only when
    the current pair became infeasible or the new one is better by the margin (hysteresis: no flapping between
    two near-equal pairs as the estimates jitter)."""

    def __init__(self, profile: OfflineProfile, objective: Objective, margin: float = 0.15) -> None:
        objective.validate()
        self.profile = profile
        self.objective = objective
        self.margin = margin
        self.last: Optional[Decision] = None
        self._basis: Optional[Conditions] = None
        self._splits: Optional[tuple] = None
        self.decisions = 0
        self.costs_ms: deque[float] = deque(maxlen=256)  # of the recent due rounds

    def update(self, cond: Conditions, codecs: Optional[dict[int, str]] = None,
               splits: Optional[Iterable[int]] = None, local_final: bool = True,
               current: Optional[tuple[int, float]] = None) -> Optional[Decision]:
        """A new decision when one is due and differs from the pair in use, else None. ``current``: the pair
        the device actually serves (default: the last decision), so that a decision that could not be applied
        is not taken for the plan in force."""
        splits = None if splits is None else tuple(sorted(set(splits)))
        due = self.last is None or (splits, local_final) != self._splits or _moved(self._basis, cond, self.margin)
        if not due:
            return None
        started = time.perf_counter()
        candidates = predict(self.profile, cond, codecs, splits, local_final)
        best = choose_from(candidates, self.objective)
        in_use = current if current is not None else (
            None if self.last is None else (self.last.split_point, self.last.threshold))
        now = next((c for c in candidates if (c.split_point, c.threshold) == in_use), None)
        self._basis, self._splits = cond, (splits, local_final)
        cost = (time.perf_counter() - started) * 1000.0
        self.costs_ms.append(cost)
        if now is not None and not self._better(best, now):
            self.last = Decision.of(now, feasible(now, self.objective), "kept: no better pair by the margin")
            self.last.cost_ms = cost
            self._log(cond, self.last, "kept")
            return None
        best.cost_ms = cost
        self.last = best
        self.decisions += 1
        self._log(cond, best, "decision")
        return best

    def _log(self, cond: Conditions, d: Decision, event: str) -> None:
        log.info(json.dumps({"event": event, "inputs": cond.summary(), "objective": asdict(self.objective),
                             "choice": {"split_point": d.split_point, "threshold": d.threshold},
                             "feasible": d.feasible, "reason": d.reason, "predicted": d.predicted,
                             "cost_ms": round(d.cost_ms, 3)}))

    def _better(self, new: Decision, current: Candidate) -> bool:
        obj = self.objective
        if (new.split_point, new.threshold) == (current.split_point, current.threshold):
            return False
        if not feasible(current, obj):
            return True
        p = new.predicted
        if obj.kind == "max_accuracy":
            return (p["accuracy_low"] > current.accuracy_low + ACCURACY_TIE
                    or (p["accuracy_low"] >= current.accuracy_low - ACCURACY_TIE
                        and p["latency_p95_ms"] < current.latency_p95_ms * (1 - self.margin)))
        if obj.kind == "min_latency":
            return p["latency_p95_ms"] < current.latency_p95_ms * (1 - self.margin)
        key = {"min_bytes": "bytes_per_image", "min_cloud_load": "cloud_mflops_per_image"}.get(obj.kind)
        if key is not None:
            return p[key] < getattr(current, key) * (1 - self.margin)
        return p["throughput_per_s"] > current.throughput_per_s * (1 + self.margin)
