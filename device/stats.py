"""Live measurements the device keeps for a scheduler: link RTT and upload bandwidth, per-block compute time."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass


class Ewma:
    """Exponentially weighted moving average; ``value`` is None until the first sample."""

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.value: float | None = None

    def add(self, sample: float) -> float:
        self.value = sample if self.value is None else self.alpha * sample + (1 - self.alpha) * self.value
        return self.value


@dataclass
class LinkSnapshot:
    """Current estimates: ``rtt_ms`` (network round trip, server time removed), ``upload_bytes_per_s``
    (None until a call took measurably longer than the fastest one), and counters."""

    rtt_ms: float | None
    upload_bytes_per_s: float | None
    calls: int
    failures: int


@dataclass(frozen=True)
class CallSample:
    """One answered offload: when (``time.monotonic`` s), network time (client latency minus the server's
    queue and compute, ms), bytes sent, the server's queue and compute time (ms), the split point."""

    t: float
    network_ms: float
    bytes_sent: int
    queue_ms: float
    compute_ms: float
    split_point: int


class LinkStats:
    """Per offloaded call: the client-side latency minus the server's queue+compute time is network time.

    RTT is the EWMA of network time. The fastest network time seen approximates the propagation floor; what a
    call spends above it is taken as the time its bytes needed, giving an upload bandwidth sample. The last
    ``window`` calls and round trips of tiny health checks (``record_ping``) are kept as raw samples, from which
    the scheduler reads means and tails (device/adaptive.py).
    """

    def __init__(self, alpha: float, window: int = 64) -> None:
        self._lock = threading.Lock()
        self.rtt = Ewma(alpha)
        self.bandwidth = Ewma(alpha)
        self.floor_ms: float | None = None
        self.calls = 0
        self.failures = 0
        self.samples: deque[CallSample] = deque(maxlen=window)
        self.pings: deque[tuple[float, float]] = deque(maxlen=window)  # (monotonic s, round trip ms)

    def record_ping(self, rtt_ms: float) -> None:
        """The round trip of a health check (a few bytes each way: propagation and queueing only)."""
        with self._lock:
            self.pings.append((time.monotonic(), rtt_ms))

    def last_call_t(self) -> float:
        """``time.monotonic`` of the last answered offload (-inf: none yet)."""
        with self._lock:
            return self.samples[-1].t if self.samples else float("-inf")

    def recent(self) -> tuple[list[CallSample], list[tuple[float, float]]]:
        """Copies of the sample windows (calls, pings)."""
        with self._lock:
            return list(self.samples), list(self.pings)

    def record_call(self, total_ms: float, server_ms: float, bytes_sent: int, queue_ms: float = 0.0,
                    split_point: int = -1) -> None:
        """``server_ms``: the server's queue + compute; ``queue_ms``: the queue part of it."""
        network_ms = max(0.0, total_ms - server_ms)
        with self._lock:
            self.calls += 1
            self.samples.append(CallSample(time.monotonic(), network_ms, bytes_sent, queue_ms,
                                           server_ms - queue_ms, split_point))
            self.rtt.add(network_ms)
            self.floor_ms = network_ms if self.floor_ms is None else min(self.floor_ms, network_ms)
            transfer_ms = network_ms - self.floor_ms
            if transfer_ms > 0.05:  # below timer resolution the sample says nothing
                self.bandwidth.add(bytes_sent / (transfer_ms / 1000.0))

    def record_failure(self) -> None:
        with self._lock:
            self.failures += 1

    def snapshot(self) -> LinkSnapshot:
        with self._lock:
            return LinkSnapshot(self.rtt.value, self.bandwidth.value, self.calls, self.failures)


class BlockTimes:
    """EWMA of the device's compute time per backbone block and per exit head (ms), by index/boundary, and how
    much slower than those averages whole requests ran (a shared or throttled CPU gives device compute a tail
    of its own, which a p95 plan must include)."""

    def __init__(self, alpha: float, window: int = 64) -> None:
        self._alpha = alpha
        self._lock = threading.Lock()
        self.blocks: dict[int, Ewma] = {}
        self.exits: dict[int, Ewma] = {}
        self.slowness: deque[float] = deque(maxlen=window)

    def record(self, table: str, key: int, ms: float) -> None:
        with self._lock:
            entries = self.blocks if table == "block" else self.exits
            entries.setdefault(key, Ewma(self._alpha)).add(ms)

    def record_request(self, ran: list[tuple[str, int]], ms: float) -> None:
        """One request's device compute took ``ms`` over the blocks/exits ``ran``: keep its ratio to the sum of
        their averages."""
        with self._lock:
            expected = sum((self.blocks if t == "block" else self.exits)[k].value or 0.0 for t, k in ran)
            if expected > 0:
                self.slowness.append(ms / expected)

    def tail_factor(self) -> float:
        """The 95th percentile of the requests' slowness over its mean (>= 1; 1 with fewer than 10 requests)."""
        with self._lock:
            ratios = sorted(self.slowness)
        if len(ratios) < 10:
            return 1.0
        p95 = ratios[min(len(ratios) - 1, int(round(0.95 * (len(ratios) - 1))))]
        return max(1.0, p95 / (sum(ratios) / len(ratios)))

    def snapshot(self) -> dict[str, dict[int, float]]:
        """``{"block_ms": {block index: ms}, "exit_ms": {boundary: ms}}``."""
        with self._lock:
            return {"block_ms": {k: e.value for k, e in sorted(self.blocks.items()) if e.value is not None},
                    "exit_ms": {k: e.value for k, e in sorted(self.exits.items()) if e.value is not None}}
