"""Circuit breaker for the cloud link: stop paying a timeout on every request while the cloud is down."""

from __future__ import annotations

import threading
import time
from typing import Callable


class CircuitBreaker:
    """Closed -> open after ``failures`` consecutive network failures; open -> closed when a probe succeeds.

    While open, ``allow()`` is False and callers answer locally at once. ``probe`` (e.g. a gRPC health check
    returning True when the cloud is SERVING) runs on a background thread every ``probe_seconds`` while open,
    so no request ever waits for it. Thread-safe.
    """

    def __init__(self, failures: int, probe: Callable[[], bool], probe_seconds: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = failures
        self._probe = probe
        self._probe_seconds = probe_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._consecutive = 0
        self._open = False
        self.last_error = ""
        self.opened_count = 0
        self._prober: threading.Thread | None = None
        self._closed_event = threading.Event()  # set by close(): stops the prober for good

    @property
    def is_open(self) -> bool:
        with self._lock:
            return self._open

    def allow(self) -> bool:
        """True when a request may go to the cloud."""
        return not self.is_open

    def record_success(self) -> None:
        with self._lock:
            self._consecutive = 0
            self._open = False

    def record_failure(self, error: str) -> None:
        """A network-level failure (unreachable, timeout, overloaded); opens the breaker at the threshold."""
        with self._lock:
            self._consecutive += 1
            self.last_error = error
            if self._open or self._consecutive < self.threshold:
                return
            self._open = True
            self.opened_count += 1
            if self._prober is None or not self._prober.is_alive():
                self._prober = threading.Thread(target=self._probe_loop, name="spinn-breaker-probe", daemon=True)
                self._prober.start()

    def close(self) -> None:
        """Stop probing (the runtime is shutting down)."""
        self._closed_event.set()

    def _probe_loop(self) -> None:
        while not self._closed_event.wait(self._probe_seconds):
            try:
                healthy = self._probe()
            except Exception:  # a probe that fails in any way means "still down"
                healthy = False
            if healthy:
                self.record_success()
                return
