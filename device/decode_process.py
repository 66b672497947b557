"""The progressive decoder in a process of its own (device config ``stream_decode_process``).

Decoding a chunk is a few milliseconds of numpy and zstd, much of it holding the GIL: on the streaming thread
it delays classify's Python steps (scratch replay on 2 cores: classify p50 7 -> 11 ms while chunks decode in
a thread, 7.9 ms while they decode in another process). Here a child process owns the
``models.progressive.Decoder`` and the weights cache's writes: the stream sends it each chunk as it comes and
does not wait (``submit``); the child verifies, decodes and stores it; the stream collects what changed only
when it swaps new weights in (``sync``, then ``tensors``). Each wake-up of a background thread in the device's
process takes the GIL from the threads that answer: per chunk, a round trip to the decoder cost the device's
own answers 0.11 ms at p99 and storing the chunk 0.05 ms, a send 0.05 ms (``bench/stream_interference.py``).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import select
import socket
import threading
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Iterable, Optional

import numpy as np
import torch

from models.progressive import Decoder, Manifest, ProgressiveError, Progress
from models.progressive.decoder import progress_of
from serving.priority import become_background_child

if TYPE_CHECKING:
    from device.cache import ChunkStore

#: Longest waits for the child to start (it imports torch) and to answer a call (a sync decodes what is queued).
START_TIMEOUT_S = 120.0
CALL_TIMEOUT_S = 60.0
#: Bytes of chunks sent and not yet synced, to keep the queue (and what a refusal throws away) short.
PIPELINE_BYTES = 128 * 1024


class DecoderDied(RuntimeError):
    """The decode process died, hung past its deadline or could not start; its state is lost (the stream
    rebuilds it from the verified chunks on disk)."""


def _serve(conn: Connection, nice: int) -> None:
    """Child main loop: ``("manifest", m, store)`` -> ``("ok",)`` (a fresh decoder for ``m``, verified chunks
    saved in ``store`` unless None); ``("apply", index, payload, keep)`` -> no answer: verify, decode, save when
    ``keep`` (after a refused chunk, later ones are ignored until the next sync); ``("sync",)`` ->
    ``("ok", changed, next, bytes, progress, refused)`` with the tensors changed since the last sync and the
    refusal's text or None; ``("tensors", names)`` -> ``("ok", {name: array})``; ``("digest",)`` -> ``("ok",
    sha256)``; ``None`` ends it."""
    become_background_child(nice)  # the device stops this process itself, after draining
    torch.set_num_threads(1)
    conn.send(("ready",))
    decoder: Optional[Decoder] = None
    store: Optional[ChunkStore] = None
    changed: set[str] = set()
    refused: Optional[str] = None
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the device is gone
            return
        if message is None:
            return
        if message[0] == "manifest":
            store, changed, refused = message[2], set(), None
            decoder = store.decoder(message[1]) if store is not None else Decoder(message[1])
            conn.send(("ok",))
            continue
        assert decoder is not None, "the parent sends the manifest first"
        if message[0] == "apply":
            if refused is None:
                _, index, payload, keep = message
                try:
                    changed.update(decoder.apply(index, payload))
                except ProgressiveError as err:
                    refused = str(err)
                    continue
                if keep and store is not None:
                    store.save(index, payload)
        elif message[0] == "sync":
            conn.send(("ok", sorted(changed), decoder.next_chunk, decoder.bytes, decoder.progress(), refused))
            changed, refused = set(), None
        elif message[0] == "digest":
            conn.send(("ok", decoder.digest()))
        elif message[0] == "tensors":
            conn.send(("ok", {name: t.numpy() for name, t in decoder.tensors(message[1]).items()}))


class DecoderProcess:
    """A ``Decoder`` computed in a child process, with the calls ``WeightStream`` makes: ``submit``, ``sync``,
    ``tensors``, ``progress``, ``digest``, ``next_chunk``, ``bytes``.

    The child starts at construction without waiting for it (``WeightStream`` decodes in its own thread until
    ``ready()``); ``begin(manifest)`` waits for it (START_TIMEOUT_S) and gives it the package. Calls are
    serialised (one stream thread makes them); each send and each answer has a deadline of ``timeout_s``; a
    child that dies or misses it is killed and the call raises DecoderDied. ``nice``: the child's nice value
    increment.

    A send waits (under the deadline) until the socket pair is writable, which on Linux means at most a quarter
    of its buffer is used, so a message of up to half the buffer then goes through without blocking; a larger
    one is sent on a thread of its own, so that a child that stops reading cannot hold the stream past the
    deadline.
    """

    def __init__(self, manifest: Optional[Manifest] = None, nice: int = 0,
                 timeout_s: float = CALL_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self.next_chunk = 0  # counts the chunks submitted (``sync`` corrects it when the child refused one)
        self.bytes = 0  # as of the last sync
        self._in_flight = 0  # chunks submitted since the last sync, and their bytes
        self._in_flight_bytes = 0
        self._changed: set[str] = set()  # collected by a sync, not yet returned by ``sync``
        self._lock = threading.Lock()
        self._started = False
        ctx = mp.get_context("spawn")  # never fork a process that runs gRPC threads
        self._conn, child = ctx.Pipe()
        self.process: Optional[mp.process.BaseProcess] = ctx.Process(target=_serve, args=(child, nice),
                                                                     name="spinn-decode", daemon=True)
        self.process.start()
        child.close()
        with socket.socket(fileno=os.dup(self._conn.fileno())) as sock:
            self.send_buffer_bytes = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        if manifest is not None:
            self.begin(manifest)

    def ready(self) -> bool:
        """Whether ``begin`` would not wait: the child is up (or already gone, which ``begin`` reports)."""
        return self._started or self.process is None or self._conn.poll(0)

    def begin(self, manifest: Manifest, store: Optional[ChunkStore] = None) -> "DecoderProcess":
        """Wait for the child to be up and give it ``manifest`` (and ``store``, where it saves each chunk it has
        verified, unless submitted with ``keep=False``); returns self. Raises DecoderDied."""
        with self._lock:
            if not self._started:
                self._receive("start", START_TIMEOUT_S)
                self._started = True
        self._call(("manifest", manifest, store), "the manifest")
        self.manifest = manifest
        self.next_chunk = self.bytes = self._in_flight = self._in_flight_bytes = 0
        self._changed = set()
        self._progress = progress_of(manifest, {}, 0, 0)  # nothing received: computed here, no round trip
        return self

    def _receive(self, what: str, timeout_s: Optional[float] = None) -> tuple:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        if self.process is None:
            raise DecoderDied(f"decode process closed before {what}")
        if not self._conn.poll(timeout_s):
            self._kill()  # not close(): a child that does not answer may not read a goodbye either
            raise DecoderDied(f"decode process: no answer to {what} within {timeout_s:.0f} s")
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            code = self.process.exitcode
            self._kill()
            raise DecoderDied(f"decode process died during {what} (exit code {code})") from None

    def _call(self, message: tuple, what: str) -> tuple:
        with self._lock:
            self._send(message, what)
            return self._receive(what)

    def _send(self, message: tuple, what: str, size: int = 0) -> None:
        """Send ``message`` (``size``: its payload's bytes) under the deadline; caller holds _lock.
        Raises DecoderDied."""
        if self.process is None:
            raise DecoderDied(f"decode process closed before {what}")
        if size > self.send_buffer_bytes // 2:
            self._send_on_thread(message, what)
            return
        if not self._writable(self.timeout_s):
            self._kill()
            raise DecoderDied(f"decode process: {what} not read within {self.timeout_s:.0f} s")
        try:
            self._conn.send(message)
        except (OSError, ValueError):
            self._kill()
            raise DecoderDied(f"decode process died before {what}") from None

    def _writable(self, timeout_s: float) -> bool:
        poller = select.poll()
        poller.register(self._conn.fileno(), select.POLLOUT)
        return bool(poller.poll(timeout_s * 1000))  # also true when the child is gone: the send then says so

    def submit(self, index: int, payload: bytes, keep: bool = True) -> None:
        """Queue chunk ``index`` to be verified, decoded and (``keep``) saved in the store, and return without
        waiting: ``next_chunk`` counts it at once, a refused chunk (hash, order, malformed) is reported by the
        next ``sync``. Raises DecoderDied when the child is gone, ProgressiveError when the sync that keeps the
        queue short finds a refused chunk."""
        if self._in_flight and self._in_flight_bytes + len(payload) > PIPELINE_BYTES:
            self._collect()
        with self._lock:
            self._send(("apply", index, payload, keep), f"chunk {index}", len(payload))
        self._in_flight += 1
        self._in_flight_bytes += len(payload)
        self.next_chunk = index + 1

    def _send_on_thread(self, message: tuple, what: str) -> None:
        """Send a message that may not fit the socket's buffer, so the send waits for the child to read it: on
        a thread, so that a child that stops reading is killed at the deadline. Caller holds _lock."""
        failed: list[Exception] = []

        def send() -> None:
            try:
                self._conn.send(message)
            except Exception as err:  # the child is gone, or killed below
                failed.append(err)

        sender = threading.Thread(target=send, name="spinn-decode-send", daemon=True)
        sender.start()
        sender.join(self.timeout_s)
        if sender.is_alive():
            self._kill(sender)
            raise DecoderDied(f"decode process: {what} not read within {self.timeout_s:.0f} s")
        if failed:
            self._kill()
            raise DecoderDied(f"decode process died before {what}")

    def sync(self) -> list[str]:
        """Wait until every submitted chunk is decoded; the names of the tensors changed since the last
        ``sync``. Raises ProgressiveError for a refused chunk (``next_chunk`` is then that chunk; what the
        chunks before it changed comes with the next ``sync``), DecoderDied when the child is gone."""
        self._collect()
        changed, self._changed = self._changed, set()
        return sorted(changed)

    def _collect(self) -> None:
        if not self._in_flight:
            return
        _, changed, self.next_chunk, self.bytes, self._progress, refused = self._call(("sync",), "sync")
        self._in_flight = self._in_flight_bytes = 0
        self._changed.update(changed)
        if refused is not None:
            raise ProgressiveError(refused)

    def tensors(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors that have a value, as of the last chunk submitted (copies: never modified
        afterwards).
        Raises DecoderDied when the child is gone."""
        values = self._call(("tensors", list(names)), "tensors")[1]
        return {name: torch.from_numpy(np.asarray(a)) for name, a in values.items()}

    def progress(self) -> Progress:
        """As of the last ``sync``."""
        return self._progress

    def digest(self) -> str:
        """``Decoder.digest`` of the child's weights after every chunk submitted."""
        return self._call(("digest",), "digest")[1]

    def close(self, wait_s: float = 5.0) -> None:
        """Ask the child to exit; kill it if it has not within ``wait_s``. Safe to call twice."""
        process: Optional[mp.process.BaseProcess] = getattr(self, "process", None)
        if process is None:
            return
        if self._writable(0):  # else the child has not read what it has: no goodbye to wait on
            try:
                self._conn.send(None)
            except (OSError, ValueError):
                pass
            process.join(wait_s)
        self._kill()

    def _kill(self, sender: Optional[threading.Thread] = None) -> None:
        """Kill the child at once and close the connection once ``sender`` (a thread writing to it) has ended:
        the kill closes the child's end, which fails the write."""
        process: Optional[mp.process.BaseProcess] = self.process
        if process is None:
            return
        self.process = None
        if process.is_alive():
            process.kill()
            process.join(5)
        if sender is not None:
            sender.join(5.0)
            if sender.is_alive():  # never seen; closing now could hand its descriptor to another file
                return
        self._conn.close()
