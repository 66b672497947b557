"""The tail forward in a process of its own.

In the daemon's process every torch op of the forward releases the GIL and must win it back from the gRPC
threads; on a busy server that hand-off costs more than the convolutions (bench/serving.py measured the forward
1.7-2.4x slower per image than in a quiet process). A worker process owns the model and computes whole batches;
the daemon's threads only decode, batch and answer.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import threading
from multiprocessing.connection import Connection

import numpy as np
import torch

log = logging.getLogger("cloud.worker")

START_TIMEOUT_S = 300.0


class WorkerError(RuntimeError):
    """The forward process failed to start, died, or raised; the message says which."""


def _serve(conn: Connection, checkpoint: bytes, source: str, device: str, threads: int) -> None:
    """Worker main loop: ``(split_point, activations)`` in, ``("ok", [logits...])`` or ``("error", text)`` out."""
    from cloud.inference import ServedModel, run_tail  # in the child: spawn imports afresh
    from models.checkpoint import load_checkpoint_bytes

    # Ctrl-C and SIGTERM reach the whole process group; the daemon drains first and then stops this process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(threads)
    try:
        served = ServedModel.from_checkpoint(load_checkpoint_bytes(checkpoint, source), "", "", b"",
                                             torch.device(device))
    except Exception as err:  # reported to the parent, which raises it
        conn.send(("error", f"loading {source}: {err}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the daemon is gone
            return
        if message is None:
            return
        split_point, array = message
        try:
            outputs = run_tail(served, split_point, torch.from_numpy(array))
            conn.send(("ok", [o.numpy() for o in outputs]))
        except Exception as err:
            conn.send(("error", f"{type(err).__name__}: {err}"))


class ForwardWorker:
    """``run(split_point, activations)`` computed in a child process that holds its own copy of the model.

    A worker that dies is restarted on the next call (that call waits for the reload). Thread-safe; calls are
    serialised, which is what the single batcher thread does anyway.
    """

    def __init__(self, checkpoint: bytes, source: str, device: torch.device, threads: int) -> None:
        self._args = (checkpoint, source, str(device), threads)
        self._lock = threading.Lock()
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")  # never fork a process that runs gRPC threads
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, *self._args), name="spinn-forward", daemon=True)
        self.process.start()
        child.close()
        if not self._conn.poll(START_TIMEOUT_S):
            self.process.kill()
            raise WorkerError(f"forward process did not load the model within {START_TIMEOUT_S:.0f} s")
        status, detail = self._receive()
        if status != "ready":
            raise WorkerError(f"forward process failed: {detail}")

    def _receive(self) -> tuple[str, object]:
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            raise WorkerError(f"forward process died (exit code {self.process.exitcode})") from None

    def run(self, split_point: int, activations: torch.Tensor) -> list[torch.Tensor]:
        """Logits ``(B, classes)`` of the later exits and the final classifier for ``activations (B, C, H, W)``."""
        array = np.ascontiguousarray(activations.detach().cpu().numpy())
        with self._lock:
            if not self.process.is_alive():
                log.warning("forward process died (exit code %s); restarting it", self.process.exitcode)
                self._start()
            try:
                self._conn.send((split_point, array))
            except (BrokenPipeError, OSError):
                raise WorkerError("forward process died") from None
            status, payload = self._receive()
        if status != "ok":
            raise WorkerError(str(payload))
        return [torch.from_numpy(a) for a in payload]  # type: ignore[union-attr]

    def close(self) -> None:
        with self._lock:
            try:
                self._conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self.process.join(timeout=10)
            if self.process.is_alive():
                self.process.kill()
            self._conn.close()
