"""Dynamic batching: requests that share a key (split point) and arrive within a short delay run as one forward.

A single worker thread owns the model, so torch's intra-op threads are the only parallelism and batches never
compete with each other for cores.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The bounded queue is full (the server answers RESOURCE_EXHAUSTED)."""


class DeadlineExpired(Exception):
    """The request's deadline passed while it waited; it was dropped without computing."""


class ShuttingDown(Exception):
    """The batcher no longer accepts work."""


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
    oldest request waits for company; ``max_queue_size`` bounds the number of waiting requests.
    """

    def __init__(
        self,
        run: Callable[[int, torch.Tensor], list[torch.Tensor]],
        max_batch_size: int = 16,
        max_queue_delay_ms: float = 2.0,
        max_queue_size: int = 256,
    ) -> None:
        self._run = run
        self.max_batch_size = max_batch_size
        self.max_delay = max_queue_delay_ms / 1000.0
        self.max_queue_size = max_queue_size
        self._pending: list[_Item] = []
        self._cond = threading.Condition()
        self._accepting = True
        self._stopped = False
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

    def close(self, drain: bool = True) -> None:
        """Stop accepting; with ``drain`` finish what is queued, then stop the worker."""
        with self._cond:
            self._accepting = False
            if not drain:
                for item in self._pending:
                    item.future.set_exception(ShuttingDown("the server is shutting down"))
                self._pending.clear()
            self._stopped = True
            self._cond.notify_all()
        self._thread.join()

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
            try:
                outputs = self._run(live[0].key, torch.cat([i.inputs for i in live]))
            except Exception as err:  # a failing forward fails its batch, never the worker
                log.exception("batch forward failed")
                for item in live:
                    item.future.set_exception(err)
                continue
            compute_ms = (time.monotonic() - started) * 1000.0
            size = sum(i.inputs.shape[0] for i in live)
            offset = 0
            for item in live:
                b = item.inputs.shape[0]
                item.future.set_result(BatchResult(
                    outputs=[o[offset:offset + b] for o in outputs],
                    queue_ms=(started - item.enqueued) * 1000.0,
                    compute_ms=compute_ms,
                    batch_size=size,
                ))
                offset += b
