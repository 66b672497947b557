"""Admission control, shared by both daemons: at most ``limit`` calls of a kind are admitted
at once, and the next one is answered RESOURCE_EXHAUSTED at once with the limit in the message, instead of
waiting in gRPC's thread pool (where it would also delay health checks).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator, Optional


class Overloaded(Exception):
    """A call was refused because ``limit`` calls were already admitted; the message names the config key."""


class Admission:
    """A counter of admitted calls with a hard ``limit`` (non-blocking: a call over it is refused, never queued)."""

    def __init__(self, limit: int, key: str, what: str = "requests") -> None:
        self.limit = limit
        self.key = key
        self.what = what
        self._in = 0
        self._lock = threading.Lock()

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Hold one place for the ``with`` block; raises Overloaded when none is free."""
        with self._lock:
            if self._in >= self.limit:
                raise Overloaded(f"overloaded: {self.limit} {self.what} in flight already (limit {self.key}); "
                                 "retry later")
            self._in += 1
        try:
            yield
        finally:
            with self._lock:
                self._in -= 1


def pending_call_options(soft_limit: Optional[int]) -> list[tuple[str, int]]:
    """gRPC server options bounding the calls gRPC core holds before the Python server picks them up: random
    early drops above ``soft_limit``, all beyond twice it; None: core's defaults (no options).

    A call core drops from that queue reaches the client as CANCELLED, not RESOURCE_EXHAUSTED. Core's keys are
    GRPC_ARG_SERVER_MAX_PENDING_REQUESTS(_HARD_LIMIT), with a dot after "server" (an unknown key is ignored
    silently). Measured with bench/load.py (bench/results/load_pending*.md): 16 kept health checks under 100 ms in
    a 4x flood but dropped steady calls; 64 dropped none of those but dropped calls of the default suite's short
    in-process flood (tests/test_fuzz_small.py), which core's defaults do not: hence no bound by default.
    """
    if soft_limit is None:
        return []
    return [("grpc.server.max_pending_requests", soft_limit),
            ("grpc.server.max_pending_requests_hard_limit", 2 * soft_limit)]
