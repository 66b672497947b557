"""Set the emulated device's speed by what it measures, not by a CPU fraction (bench/e2e.py).

A CPU fraction means different devices on different machines (the same 0.35 of a core gave a 30 ms and a 160 ms
device-only p50 on two machines). The device is instead defined by its device-only latency: the CFS quota of
its cgroup (bench/slow_device.py) is adjusted until the whole model's p50 on the device is ``target_ms``
(250 ms by default: a Raspberry-Pi-class device running the 128-px MobileNetV2).

The quota to latency map is close to inverse-proportional for CPU-bound work (a throttled process runs in
bursts of the quota every period), so each round scales the fraction by ``measured / target``; a few rounds
reach the tolerance. The driver measures; the parent (outside the cgroup) owns the quota:

    driver:  CALIBRATE <p50 ms>        parent: QUOTA <fraction>   (set; measure again)
                                       parent: CALIBRATED         (done)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

#: Accept a device-only p50 within this relative distance of the target.
TOLERANCE = 0.05
#: At most this many measurements (the last is kept even when outside the tolerance; the report says so).
MAX_ROUNDS = 6
#: The fraction of one core is kept within these bounds (the kernel's 1 ms minimum quota in a 1 s period at the
#: low end; the device is pinned to one core at the high end).
MIN_SHARE, MAX_SHARE = 0.01, 1.0


@dataclass
class Calibration:
    """What the calibration did: the target, each round's fraction of a core and measured p50 (ms), the
    fraction kept, and whether its p50 is within the tolerance."""

    target_ms: float
    rounds: list[dict] = field(default_factory=list)
    share: float = 0.0
    converged: bool = False
    tolerance: float = TOLERANCE

    def summary(self) -> str:
        """One sentence for a report."""
        steps = ", ".join(f"{r['share']:.3f} -> {r['p50_ms']:.0f} ms" for r in self.rounds)
        state = "within" if self.converged else "NOT within"
        return (f"device speed calibrated to a device-only p50 of {self.target_ms:g} ms: CFS quota "
                f"{self.share:.3f} of a core after {len(self.rounds)} rounds ({steps}; {state} "
                f"{100 * self.tolerance:g} %)")

    def to_json(self) -> dict:
        return asdict(self)


def next_share(share: float, p50_ms: float, target_ms: float) -> float:
    """The fraction of a core that should turn a device-only p50 of ``p50_ms`` at ``share`` into ``target_ms``
    (inverse-proportional), clamped to ``[MIN_SHARE, MAX_SHARE]``. ValueError for values <= 0."""
    if not (share > 0 and p50_ms > 0 and target_ms > 0):
        raise ValueError(f"share, p50_ms and target_ms must be > 0, got {share}, {p50_ms}, {target_ms}")
    return min(MAX_SHARE, max(MIN_SHARE, share * p50_ms / target_ms))


def calibrate(share: float, target_ms: float, measure: Callable[[], float], set_share: Callable[[float], None],
              tolerance: float = TOLERANCE, max_rounds: int = MAX_ROUNDS) -> Calibration:
    """Adjust the fraction of a core, starting at ``share``, until ``measure()`` (a device-only p50, ms, taken
    at the fraction last given to ``set_share``) is within ``tolerance`` of ``target_ms`` or ``max_rounds``
    measurements were made. ``set_share`` is called before every measurement but the first."""
    result = Calibration(target_ms, tolerance=tolerance)
    for round_ in range(max_rounds):
        if round_:
            set_share(share)
        p50 = measure()
        result.rounds.append({"share": share, "p50_ms": p50})
        result.share = share
        if abs(p50 / target_ms - 1.0) <= tolerance:
            result.converged = True
            break
        share = next_share(share, p50, target_ms)
    return result
