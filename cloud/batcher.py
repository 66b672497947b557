"""Dynamic batching: requests that share a key (split point) and arrive within a short delay run as one forward.

A single worker thread owns the model, so torch's intra-op threads are the only parallelism and batches never
compete with each other for cores.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Callable

import torch

from serving.priority import lower_thread_priority

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The bounded queue is full (the server answers RESOURCE_EXHAUSTED)."""


class DeadlineExpired(Exception):
    """The request's deadline passed while it waited; it was dropped without computing."""


class ShuttingDown(Exception):
    """The batcher no longer accepts work."""


class ForwardHung(Exception):
    """The batch's forward ran past the watchdog's limit; its requests were failed (UNAVAILABLE)."""


@dataclass
class BatchResult:
    """One request's share of a batch: its logits (list over outputs of ``(b, classes)``) and timings (ms)."""

    outputs: list[torch.Tensor]
    queue_ms: float
    compute_ms: float
    batch_size: int


@dataclass
class _Item:
    key: int
    inputs: torch.Tensor
    deadline: float | None  # time.monotonic() seconds
    enqueued: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)


class DynamicBatcher:
    """Collects submitted tensors per key and runs ``run(key, batch) -> list[(N, classes)]`` on batches.

    ``max_batch_size`` counts images (a request may carry several); ``max_queue_delay_ms`` is how long the
    oldest request waits for company; ``max_queue_size`` bounds the number of waiting requests. ``nice``: the
    batching thread (which runs the forward) runs that much nicer than the caller's threads.
    """

    def __init__(
        self,
        run: Callable[[int, torch.Tensor], list[torch.Tensor]],
        max_batch_size: int = 16,
        max_queue_delay_ms: float = 2.0,
        max_queue_size: int = 256,
        nice: int = 0,
    ) -> None:
        self._run = run
        self.nice = nice
        self.max_batch_size = max_batch_size
        self.max_delay = max_queue_delay_ms / 1000.0
        self.max_queue_size = max_queue_size
        self._pending: list[_Item] = []
        self._cond = threading.Condition()
        self._accepting = True
        self._stopped = False
        self._running: tuple[float, list[_Item]] | None = None  # (monotonic start, items) of the batch computing
        self._thread = threading.Thread(target=self._loop, name="spinn-batcher", daemon=True)
        self._thread.start()

    def submit(self, key: int, inputs: torch.Tensor, deadline: float | None = None) -> Future:
        """Queue ``inputs`` ``(b, ...)``; the future resolves to a BatchResult or raises one of the errors above."""
        item = _Item(key, inputs, deadline)
        with self._cond:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down")
            if len(self._pending) >= self.max_queue_size:
                raise QueueFull(f"queue full ({self.max_queue_size} requests waiting)")
            self._pending.append(item)
            self._cond.notify_all()
        return item.future

    def queued(self) -> int:
        with self._cond:
            return len(self._pending)

    def running_for(self) -> float:
        """Seconds the batch now computing has been running (0 when idle)."""
        with self._cond:
            return 0.0 if self._running is None else time.monotonic() - self._running[0]

    def fail_running(self, err: Exception) -> int:
        """Fail every request of the batch now computing with ``err`` (the watchdog's way out of a hung
        forward); returns how many were failed. Their late results, if any, are dropped."""
        with self._cond:
            items = [] if self._running is None else self._running[1]
        failed = 0
        for item in items:
            try:
                item.future.set_exception(err)
                failed += 1
            except InvalidStateError:  # answered meanwhile
                pass
        return failed

    def close(self, drain: bool = True, timeout_s: float | None = None) -> bool:
        """Stop accepting; with ``drain`` finish what is queued, then stop the worker thread. Waits at most
        ``timeout_s`` for it (a hung forward never returns); returns whether it stopped."""
        with self._cond:
            self._accepting = False
            if not drain:
                for item in self._pending:
                    item.future.set_exception(ShuttingDown("the server is shutting down"))
                self._pending.clear()
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.error("the batcher did not stop within %.1f s (a forward is hung); leaving it", timeout_s or 0)
            return False
        return True

    def _take_batch(self) -> list[_Item] | None:
        with self._cond:
            while True:
                if not self._pending:
                    if self._stopped:
                        return None
                    self._cond.wait()
                    continue
                first = self._pending[0]
                same = [i for i in self._pending if i.key == first.key]
                images = sum(i.inputs.shape[0] for i in same)
                wait = first.enqueued + self.max_delay - time.monotonic()
                if images >= self.max_batch_size or wait <= 0 or self._stopped:
                    break
                self._cond.wait(timeout=wait)
            batch, count = [], 0
            for item in same:
                if batch and count + item.inputs.shape[0] > self.max_batch_size:
                    break
                batch.append(item)
                count += item.inputs.shape[0]
            taken = set(map(id, batch))
            self._pending = [i for i in self._pending if id(i) not in taken]
            return batch

    def _loop(self) -> None:
        lower_thread_priority(self.nice)
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            now = time.monotonic()
            live = []
            for item in batch:
                if item.deadline is not None and now > item.deadline:
                    item.future.set_exception(DeadlineExpired("deadline passed while queued"))
                elif item.future.set_running_or_notify_cancel():
                    live.append(item)
            if not live:
                continue
            started = time.monotonic()
            with self._cond:
                self._running = (started, live)
            try:
                outputs = self._run(live[0].key, torch.cat([i.inputs for i in live]))
            except Exception as err:  # a failing forward fails its batch, never the worker
                log.exception("batch forward failed")
                self._finish(live, err)
                continue
            finally:
                with self._cond:
                    self._running = None
            compute_ms = (time.monotonic() - started) * 1000.0
            size = sum(i.inputs.shape[0] for i in live)
            offset = 0
            for item in live:
                b = item.inputs.shape[0]
                self._finish([item], BatchResult(
                    outputs=[o[offset:offset + b] for o in outputs],
                    queue_ms=(started - item.enqueued) * 1000.0,
                    compute_ms=compute_ms,
                    batch_size=size,
                ))
                offset += b

    @staticmethod
    def _finish(items: list[_Item], outcome: BatchResult | Exception) -> None:
        """Resolve each item's future, unless the watchdog already failed it."""
        for item in items:
            try:
                if isinstance(outcome, Exception):
                    item.future.set_exception(outcome)
                else:
                    item.future.set_result(outcome)
            except InvalidStateError:
                pass
