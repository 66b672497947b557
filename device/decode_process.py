"""The progressive decoder in a process of its own (device config ``stream_decode_process``).

Decoding a chunk is a few milliseconds of numpy and zstd, much of it holding the GIL: on the streaming thread
it delays classify's Python steps (scratch replay on 2 cores: classify p50 7 -> 11 ms while chunks decode in
a thread, 7.9 ms while they decode in another process). Here a child process owns the
``models.progressive.Decoder``; this one only sends payloads and, when the stream swaps new weights in,
asks for the dequantised tensors that changed since the last swap (once per swap, not per chunk: each
transfer holds this process's GIL while it is unpickled).
"""

from __future__ import annotations

import multiprocessing as mp
import threading
from multiprocessing.connection import Connection
from typing import Iterable, Optional

import numpy as np
import torch

from models.progressive import Decoder, Manifest, ProgressiveError, Progress
from serving.priority import become_background_child

#: Longest waits for the child to start (it imports torch) and to decode one chunk.
START_TIMEOUT_S = 120.0
CALL_TIMEOUT_S = 60.0


class DecoderDied(RuntimeError):
    """The decode process died, hung past its deadline or could not start; its state is lost (the stream
    rebuilds it from the verified chunks on disk)."""


def _serve(conn: Connection, nice: int) -> None:
    """Child main loop: ``("manifest", m)`` -> ``("ok",)`` (a fresh decoder for ``m``); ``("apply", index,
    payload)`` -> ``("ok", changed, next, bytes, progress)`` or ``("refused", text)``; ``("tensors", names)``
    -> ``("ok", {name: array})``; ``("digest",)`` -> ``("ok", sha256)``; ``None`` ends it."""
    become_background_child(nice)  # the device stops this process itself, after draining
    torch.set_num_threads(1)
    conn.send(("ready",))
    decoder: Optional[Decoder] = None
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the device is gone
            return
        if message is None:
            return
        if message[0] == "manifest":
            decoder = Decoder(message[1])
            conn.send(("ok",))
            continue
        assert decoder is not None, "the parent sends the manifest first"
        if message[0] == "digest":
            conn.send(("ok", decoder.digest()))
            continue
        if message[0] == "tensors":
            conn.send(("ok", {name: t.numpy() for name, t in decoder.tensors(message[1]).items()}))
            continue
        _, index, payload = message
        try:
            changed = decoder.apply(index, payload)
        except ProgressiveError as err:
            conn.send(("refused", str(err)))
            continue
        conn.send(("ok", changed, decoder.next_chunk, decoder.bytes, decoder.progress()))


class DecoderProcess:
    """A ``Decoder`` computed in a child process, with the calls ``WeightStream`` makes: ``apply``, ``tensors``,
    ``progress``, ``digest``, ``next_chunk``, ``bytes``.

    The child starts at construction without waiting for it (``WeightStream`` decodes in its own thread until
    ``ready()``); ``begin(manifest)`` waits for it (START_TIMEOUT_S) and gives it the package. Calls are
    serialised (one stream thread makes them) and each has a deadline of ``timeout_s``; a child that dies or
    misses it is killed and the call raises DecoderDied. ``nice``: the child's nice value increment.
    """

    def __init__(self, manifest: Optional[Manifest] = None, nice: int = 0,
                 timeout_s: float = CALL_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self.next_chunk = 0
        self.bytes = 0
        self._lock = threading.Lock()
        self._started = False
        ctx = mp.get_context("spawn")  # never fork a process that runs gRPC threads
        self._conn, child = ctx.Pipe()
        self.process: Optional[mp.process.BaseProcess] = ctx.Process(target=_serve, args=(child, nice),
                                                                     name="spinn-decode", daemon=True)
        self.process.start()
        child.close()
        if manifest is not None:
            self.begin(manifest)

    def ready(self) -> bool:
        """Whether ``begin`` would not wait: the child is up (or already gone, which ``begin`` reports)."""
        return self._started or self.process is None or self._conn.poll(0)

    def begin(self, manifest: Manifest) -> "DecoderProcess":
        """Wait for the child to be up and give it ``manifest``; returns self. Raises DecoderDied."""
        with self._lock:
            if not self._started:
                self._receive("start", START_TIMEOUT_S)
                self._started = True
        self._call(("manifest", manifest), "the manifest")
        self.manifest = manifest
        self._progress = Decoder(manifest).progress()  # nothing received: computed here, no round trip
        return self

    def _receive(self, what: str, timeout_s: Optional[float] = None) -> tuple:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        if self.process is None:
            raise DecoderDied(f"decode process closed before {what}")
        if not self._conn.poll(timeout_s):
            self.close(wait_s=0)
            raise DecoderDied(f"decode process: no answer to {what} within {timeout_s:.0f} s")
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            code = self.process.exitcode
            self.close()
            raise DecoderDied(f"decode process died during {what} (exit code {code})") from None

    def _call(self, message: tuple, what: str) -> tuple:
        with self._lock:
            try:
                self._conn.send(message)
            except (BrokenPipeError, OSError, ValueError):
                self.close()
                raise DecoderDied(f"decode process died before {what}") from None
            return self._receive(what)

    def apply(self, index: int, payload: bytes) -> list[str]:
        """As ``Decoder.apply``: verify and decode chunk ``index``; the names of the tensors that changed.
        Raises ProgressiveError (state unchanged) for a bad chunk, DecoderDied when the child is gone."""
        reply = self._call(("apply", index, payload), f"chunk {index}")
        if reply[0] == "refused":
            raise ProgressiveError(reply[1])
        _, changed, self.next_chunk, self.bytes, self._progress = reply
        return changed

    def tensors(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors that have a value, as of the last ``apply`` (copies: never modified afterwards).
        Raises DecoderDied when the child is gone."""
        values = self._call(("tensors", list(names)), "tensors")[1]
        return {name: torch.from_numpy(np.asarray(a)) for name, a in values.items()}

    def progress(self) -> Progress:
        return self._progress

    def digest(self) -> str:
        """``Decoder.digest`` of the child's current weights."""
        return self._call(("digest",), "digest")[1]

    def close(self, wait_s: float = 5.0) -> None:
        """Ask the child to exit; kill it if it has not within ``wait_s``. Safe to call twice."""
        process: Optional[mp.process.BaseProcess] = getattr(self, "process", None)
        if process is None:
            return
        try:
            self._conn.send(None)
        except (BrokenPipeError, OSError, ValueError):
            pass
        process.join(wait_s)
        if process.is_alive():
            process.kill()
            process.join(5)
        self._conn.close()
        self.process = None
