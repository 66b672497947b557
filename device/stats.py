"""Live measurements the device keeps for a scheduler: link RTT and upload bandwidth, per-block compute time."""

from __future__ import annotations

import threading
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


class LinkStats:
    """Per offloaded call: the client-side latency minus the server's queue+compute time is network time.

    RTT is the EWMA of network time. The fastest network time seen approximates the propagation floor; what a
    call spends above it is taken as the time its bytes needed, giving an upload bandwidth sample.
    """

    def __init__(self, alpha: float) -> None:
        self._lock = threading.Lock()
        self.rtt = Ewma(alpha)
        self.bandwidth = Ewma(alpha)
        self.floor_ms: float | None = None
        self.calls = 0
        self.failures = 0

    def record_call(self, total_ms: float, server_ms: float, bytes_sent: int) -> None:
        network_ms = max(0.0, total_ms - server_ms)
        with self._lock:
            self.calls += 1
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
    """EWMA of the device's compute time per backbone block and per exit head (ms), by index/boundary."""

    def __init__(self, alpha: float) -> None:
        self._alpha = alpha
        self._lock = threading.Lock()
        self.blocks: dict[int, Ewma] = {}
        self.exits: dict[int, Ewma] = {}

    def record(self, table: str, key: int, ms: float) -> None:
        with self._lock:
            entries = self.blocks if table == "block" else self.exits
            entries.setdefault(key, Ewma(self._alpha)).add(ms)

    def snapshot(self) -> dict[str, dict[int, float]]:
        """``{"block_ms": {block index: ms}, "exit_ms": {boundary: ms}}``."""
        with self._lock:
            return {"block_ms": {k: e.value for k, e in sorted(self.blocks.items()) if e.value is not None},
                    "exit_ms": {k: e.value for k, e in sorted(self.exits.items()) if e.value is not None}}
