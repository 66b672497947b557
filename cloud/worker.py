"""The tail forward in a process of its own.

In the daemon's process every torch op of the forward releases the GIL and must win it back from the gRPC
threads; on a busy server that hand-off costs more than the convolutions (bench/serving.py measured the forward
1.7-2.4x slower per image than in a quiet process). A worker process owns the model and computes whole batches;
the daemon's threads only decode, batch and answer.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import threading
import time
from multiprocessing.connection import Connection

import numpy as np
import torch

from serving.priority import become_background_child

log = logging.getLogger("cloud.worker")

START_TIMEOUT_S = 300.0


class WorkerError(RuntimeError):
    """The forward process failed to start, died, or raised; the message says which."""


def _serve(conn: Connection, device: str, threads: int, nice: int) -> None:
    """Worker main loop. Messages: ``("load", digest, checkpoint bytes, source)``, ``("unload", digest)``,
    ``("run", digest, split_point, activations)``; answers ``("ok", payload)`` or ``("error", text)``."""
    from cloud.inference import ServedModel, run_tail  # in the child: spawn imports afresh
    from models.checkpoint import load_checkpoint_bytes

    become_background_child(nice)  # the daemon drains first, then stops this process (CloudConfig.forward_nice)
    torch.set_num_threads(threads)
    models: dict[str, ServedModel] = {}
    conn.send(("ready", None))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the daemon is gone (exited, or killed: the pipe is reset)
            return
        if message is None:
            return
        try:
            if message[0] == "load":
                _, digest, checkpoint, source = message
                models[digest] = ServedModel.from_checkpoint(load_checkpoint_bytes(checkpoint, source), "", None,
                                                             b"", torch.device(device))
                conn.send(("ok", None))
            elif message[0] == "unload":
                models.pop(message[1], None)
                conn.send(("ok", None))
            else:
                _, digest, split_point, array = message
                outputs = run_tail(models[digest], split_point, torch.from_numpy(array))
                conn.send(("ok", [o.numpy() for o in outputs]))
        except Exception as err:
            conn.send(("error", f"{type(err).__name__}: {err}"))


class ForwardWorker:
    """``run(digest, split_point, activations)`` computed in a child process that holds its own copy of every
    model version ``load``-ed (by digest).

    A worker that dies is restarted on the next call, which waits while it loads every version again. Thread-safe;
    calls are serialised, which is what the single batcher thread does anyway.
    """

    def __init__(self, device: torch.device, threads: int, nice: int = 0) -> None:
        self._args = (str(device), threads, nice)
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self.process: mp.process.BaseProcess | None = None
        self.ready_at = float("inf")  # time.monotonic() when the current process had loaded its models
        self._versions: dict[str, tuple[bytes, str]] = {}  # digest -> (checkpoint bytes, source): reloaded on restart
        with self._lock:
            self._start()

    def load(self, digest: str, checkpoint: bytes, source: str) -> None:
        """Load a version into the process (and into every process started after a restart). Raises
        WorkerError when it cannot be loaded."""
        with self._lock:
            self._versions[digest] = (checkpoint, source)
            try:
                if self.process is None or not self.process.is_alive():
                    self._start()  # loads every version, this one included
                else:
                    self._call(("load", digest, checkpoint, source))
            except WorkerError:
                del self._versions[digest]
                raise

    def unload(self, digest: str) -> None:
        """Free a version's copy in the process (a dead process has none to free)."""
        with self._lock:
            self._versions.pop(digest, None)
            if self.process is not None and self.process.is_alive():
                try:
                    self._call(("unload", digest))
                except WorkerError as err:
                    log.warning("forward process could not unload %s: %s", digest, err)

    def busy_for(self, running_s: float) -> float:
        """How long of a batch that has run ``running_s`` seconds was spent computing (not starting a process)."""
        return max(0.0, min(running_s, time.monotonic() - self.ready_at))

    def _start(self) -> None:
        """A new process with every loaded version (under ``_lock``)."""
        self._reap()
        self.ready_at = float("inf")
        ctx = mp.get_context("spawn")  # never fork a process that runs gRPC threads
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, *self._args), name="spinn-forward", daemon=True)
        self.process.start()
        child.close()
        self._wait_answer("start")
        for digest, (checkpoint, source) in self._versions.items():
            self._call(("load", digest, checkpoint, source))
        self.ready_at = time.monotonic()

    def _wait_answer(self, what: str) -> object:
        assert self._conn is not None
        if not self._conn.poll(START_TIMEOUT_S):
            self._reap()
            raise WorkerError(f"forward process did not {what} within {START_TIMEOUT_S:.0f} s")
        status, detail = self._receive()
        if status not in ("ready", "ok"):
            raise WorkerError(f"forward process failed to {what}: {detail}")
        return detail

    def _call(self, message: tuple) -> object:
        """Send one message and wait for its answer (under ``_lock``; a load may take seconds)."""
        assert self._conn is not None
        try:
            self._conn.send(message)
        except (BrokenPipeError, OSError):
            raise WorkerError("forward process died") from None
        return self._wait_answer(message[0])

    def _reap(self) -> None:
        """Close the pipe to the previous process and make sure it is gone (a restart leaks neither)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self.process is not None:
            if self.process.is_alive():
                self.process.kill()
            self.process.join(timeout=10)
            if self.process.exitcode is not None:
                self.process.close()
            self.process = None

    def kill(self) -> None:
        """Kill the process now, from any thread (the watchdog's answer to a hung forward): a call waiting for
        it fails with WorkerError, and the next call starts a new one."""
        process = self.process
        if process is not None and process.pid is not None:
            process.kill()

    def _receive(self) -> tuple[str, object]:
        conn, process = self._conn, self.process  # close() may reap them from another thread meanwhile
        assert conn is not None and process is not None
        try:
            return conn.recv()
        except (EOFError, OSError, ValueError):
            try:
                process.join(timeout=1)
                code = process.exitcode
            except ValueError:  # already reaped by close()
                code = None
            raise WorkerError(f"forward process died (exit code {code})") from None

    def run(self, digest: str, split_point: int, activations: torch.Tensor) -> list[torch.Tensor]:
        """Logits ``(B, classes)`` of the later exits and the final classifier of version ``digest`` for
        ``activations (B, C, H, W)``."""
        array = np.ascontiguousarray(activations.detach().cpu().numpy())
        with self._lock:
            if self.process is None or not self.process.is_alive():
                log.warning("forward process died (exit code %s); restarting it",
                            None if self.process is None else self.process.exitcode)
                self._start()
            assert self._conn is not None
            try:
                self._conn.send(("run", digest, split_point, array))
            except (BrokenPipeError, OSError):
                raise WorkerError("forward process died") from None
            status, payload = self._receive()
        if status != "ok":
            raise WorkerError(str(payload))
        return [torch.from_numpy(a) for a in payload]  # type: ignore[union-attr]

    def close(self) -> None:
        """Ask the process to exit, then kill it if it has not within 10 s. Does not wait for a call in flight
        (the watchdog may be closing a hung worker)."""
        if self._lock.acquire(timeout=1.0):
            try:
                if self._conn is not None:
                    self._conn.send(None)
                if self.process is not None:
                    self.process.join(timeout=10)
            except (BrokenPipeError, OSError, ValueError):
                pass
            finally:
                self._lock.release()
        self.kill()
        self._reap()
