"""Admission control, shared by both daemons: at most ``limit`` calls of a kind are admitted
at once, and the next one is answered RESOURCE_EXHAUSTED at once with the limit in the message, instead of
waiting in gRPC's thread pool (where it would also delay health checks); streaming calls that stay idle are
closed (``IdleCalls``), so that an admitted stream cannot keep its thread by sending nothing.
"""

from __future__ import annotations

import math
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional


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


class IdleCalls:
    """Closes streaming calls that stay idle too long, so that an admitted stream cannot hold its RPC thread (and
    its place under the admission limit) forever by sending nothing.

    A call is ``watch``-ed for the life of its handler; it is idle while it waits for the client's next message
    (``busy`` while its handler works on one). One thread checks every ``period_s`` and cancels (via ``cancel``,
    e.g. ``grpc.ServicerContext.cancel``) every call idle for more than ``idle_s``: the handler's wait for the
    next message then raises, and the client sees CANCELLED. gRPC's sync server offers no way to end such a wait
    with a status of our choosing.
    """

    def __init__(self, idle_s: float, on_close: Optional[Callable[[], None]] = None) -> None:
        self.idle_s = idle_s
        self.on_close = on_close  # called once per call closed for idleness (metrics, logs)
        self._calls: dict[int, tuple[Callable[[], None], float]] = {}  # id -> (cancel, idle since; inf: busy)
        self._lock = threading.Lock()
        self._next_id = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spinn-idle-calls", daemon=True)
        self._thread.start()

    @contextmanager
    def watch(self, cancel: Callable[[], None]) -> Iterator["IdleCall"]:
        """Watch one call for the ``with`` block; yields the handle the handler marks busy/idle with."""
        with self._lock:
            call_id, self._next_id = self._next_id, self._next_id + 1
            self._calls[call_id] = (cancel, time.monotonic())
        try:
            yield IdleCall(self, call_id)
        finally:
            with self._lock:
                self._calls.pop(call_id, None)

    def _mark(self, call_id: int, busy: bool) -> None:
        with self._lock:
            if call_id in self._calls:
                self._calls[call_id] = (self._calls[call_id][0], math.inf if busy else time.monotonic())

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.idle_s / 4)):
            now = time.monotonic()
            with self._lock:
                expired = [(i, cancel) for i, (cancel, since) in self._calls.items() if now - since > self.idle_s]
                for i, _ in expired:
                    del self._calls[i]
            for _, cancel in expired:
                cancel()
                if self.on_close is not None:
                    self.on_close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)


class IdleCall:
    """One watched call: ``busy()`` while its handler works on a message, ``idle()`` once it waits again."""

    def __init__(self, owner: IdleCalls, call_id: int) -> None:
        self._owner, self._id = owner, call_id

    def busy(self) -> None:
        self._owner._mark(self._id, True)

    def idle(self) -> None:
        self._owner._mark(self._id, False)
