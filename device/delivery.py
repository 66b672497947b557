"""Progressive weight delivery on the device: fetch the manifest, stream the chunks into a decoder, verify and
persist each one, and hand the refined model to the runtime as chunks arrive (``checkpoint: stream``).

Nothing from the cloud is trusted before it is checked: a manifest is validated whole before anything is stored
(proto/manifest.py) and, with ``delivery_public_key``, must carry a valid signature; a chunk must match its
SHA-256 in the manifest; the complete model is handed out only when its final digest matches the manifest's.
A device that holds a version complete says so when it asks for a manifest (its final digest); the cloud may
answer with a delta package from those weights, which the device takes only when its base is what it holds, and
switches to once the delta's head is v2's exactly (the delta's ``usable_chunk``).
The streams' and the poller's threads survive any exception (logged with its traceback, retried with backoff),
so no answer of the cloud can stop the device from answering with what it has.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import grpc
import torch

from device.cache import ChunkStore, cached_manifests, package_dir, package_dirs, quarantine
from device.decode_process import DecoderDied, DecoderProcess
from device.link import NETWORK_CODES, CloudLink
from serving.priority import lower_thread_priority
from models.checkpoint import Checkpoint, checkpoint_from_metadata
from models.progressive import Decoder, Manifest, ProgressiveError, Progress, updated_model
from proto import spinn_v1_pb2 as pb
from proto.manifest import DEFAULT_MAX_PACKAGE_BYTES, manifest_from_message
from serving.signing import SignatureError, Verifier

log = logging.getLogger("device")

AnyDecoder = Union[Decoder, DecoderProcess]
#: Decode processes a stream starts again after one died, before it decodes in its own thread for good.
MAX_DECODER_RESTARTS = 3
#: Times one package is fetched again after its final digest did not match, before it is given up.
MAX_FINAL_RETRIES = 3


class PackageGone(Exception):
    """The cloud no longer serves the package the stream asked for (FAILED_PRECONDITION on its digest)."""


class FinalMismatch(Exception):
    """Every chunk matched its hash but the decoded weights do not match the manifest's final digest."""


@dataclass(frozen=True)
class Snapshot:
    """One state of a streamed model: never modified after it is handed out (requests may hold it)."""

    manifest: Manifest
    checkpoint: Checkpoint  # model in eval mode, on the device's torch device
    progress: Progress


def blank_state(manifest: Manifest) -> dict[str, torch.Tensor]:
    """Weights before any chunk: coded weights 0; norm layers at identity (scale and running_var 1, the rest 0)
    so that a layer whose statistics have not arrived passes its input through instead of exploding."""
    state = {}
    for t in manifest.tensors:
        dtype = getattr(torch, t.dtype)  # float32, int64 or int32: proto/manifest.py admits no other
        one = t.kind == "raw" and (t.name.endswith("running_var") or (t.name.endswith(".weight") and
                                                                       len(t.shape) == 1))
        state[t.name] = (torch.ones if one else torch.zeros)(t.shape, dtype=dtype)
    return state


class WeightStream:
    """Streams one package into a decoder on a thread of its own.

    ``snapshot`` holds the model after the cached chunks; ``on_snapshot`` gets a new one (on the stream's
    thread) with every chunk decoded since the last: when a message arrives ``swap_interval_s`` or more after
    the last one was handed out, at once when the head becomes usable or the model complete, and when a call
    ends (a cut, a refused chunk) or the decode process is rebuilt (0: after every chunk). The decoder and the
    model of the previous snapshot are never modified in place (``updated_model`` shares unchanged tensors).
    A chunk whose hash does not match is refused and fetched again; a cut stream is resumed from the next
    chunk with a bounded backoff; every call has a deadline. The complete model is handed out only once its
    final digest matches the manifest's; on a mismatch the package is deleted and the stream ends
    (``outcome`` "mismatch"); when the cloud no longer serves the package it ends with "gone"; ``on_end`` is
    told either way (the owner fetches the manifest again).

    With ``decode_process``, a ``DecoderProcess`` is started beside the stream and takes over decoding once its
    interpreter is up (it replays the verified chunks from disk first); until then, and for good if it
    cannot start or dies MAX_DECODER_RESTARTS times, chunks are decoded on the stream's thread.
    """

    def __init__(self, link: CloudLink, manifest: Manifest, store: ChunkStore, device: torch.device,
                 on_snapshot: Callable[[Snapshot], None], call_timeout_s: float = 600.0, nice: int = 0,
                 decode_process: bool = False, swap_interval_s: float = 0.0) -> None:
        """``call_timeout_s``: deadline of one StreamWeights call; a stream still running then is resumed.
        ``nice``: added to the stream thread's nice value (see ``lower_thread_priority``)."""
        self.link = link
        self.swap_interval_s = swap_interval_s
        self._unswapped: set[str] = set()  # tensors decoded since the last snapshot handed out
        self._last_swap = float("-inf")  # time.monotonic() of that snapshot
        self.nice = nice
        self.manifest = manifest
        self.store = store
        self.on_snapshot = on_snapshot
        self.call_timeout_s = call_timeout_s
        self.decoder: AnyDecoder = store.decoder(manifest)  # ProgressiveError: a delta without its base
        self.decoder_restarts = 0
        self.helper = _spawn_decoder(nice) if decode_process else None  # takes over when up (_hand_over)
        self.final_digest: Optional[str] = None  # the decoder's, once complete (the decoder is closed then)
        self.on_verified: Optional[Callable[[], None]] = None  # called once the final digest matched
        self.on_end: Optional[Callable[["WeightStream"], None]] = None  # called when the thread ends, not stopped
        self.outcome: Optional[str] = None  # "complete" (verified), "gone", "mismatch"; None while it runs
        self.refused = 0  # chunks whose hash did not match (tests and logs)
        self._stop = threading.Event()
        self._call = None  # the StreamWeights call in progress (cancelled by stop)
        start = {**blank_state(manifest), **self.decoder.state_dict()} if manifest.base_sha256 else \
            blank_state(manifest)  # a delta starts from its base, a whole model
        ckpt = checkpoint_from_metadata(manifest.metadata, start,
                                        f"manifest of {manifest.model_id} {manifest.model_version}", assign=True)
        ckpt.model.to(device)
        self.snapshot = Snapshot(manifest, ckpt, self.decoder.progress())
        self._load_cached()
        self._thread = threading.Thread(target=self._run, name="spinn-weights", daemon=True)

    def start(self) -> "WeightStream":
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        call = self._call
        if call is not None:
            call.cancel()  # a stream waiting for its next message ends now, not when the message comes
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
        if not self._thread.is_alive():  # also when it never started; a running one closes it on its way out
            self._close_decoders()

    @property
    def complete(self) -> bool:
        """Every chunk verified, decoded and swapped into ``snapshot``."""
        return self.snapshot.progress.complete

    def digest(self) -> str:
        """SHA-256 of the decoded weights so far (``manifest.final_sha256`` once complete and intact). Raises
        DecoderDied when the decode process is closed before the stream's final check (a stopped stream)."""
        return self.final_digest if self.final_digest is not None else self.decoder.digest()

    def _load_cached(self) -> None:
        """Decode the verified chunks on disk. A complete package whose final digest does not match loses its
        chunks and the decoder starts again from nothing (the stream fetches them all)."""
        try:
            self._decode_cached()
        except FinalMismatch as err:
            log.warning("cached %s: %s; deleting its chunks and fetching them again", self.store.dir, err)
            self.store.drop_chunks()
            self.decoder = self.store.decoder(self.manifest)
            self.snapshot = Snapshot(self.manifest, self.snapshot.checkpoint, self.decoder.progress())

    def _decode_cached(self) -> None:
        changed: set[str] = set()
        while self.decoder.next_chunk < len(self.manifest.chunks):
            index = self.decoder.next_chunk
            payload = self.store.load(index)
            if payload is None:
                break
            try:
                changed.update(self.decoder.apply(index, payload))
            except ProgressiveError as err:
                log.warning("cached chunk %d refused (%s); fetching it again", index, err)
                self.refused += 1
                self.store.drop(index)
                break
        if changed:
            log.info("resumed %s version %s from the weights cache: %d of %d chunks", self.manifest.model_id,
                     self.manifest.model_version, self.decoder.next_chunk, len(self.manifest.chunks))
            self._refine(changed)

    def _refine(self, changed: set[str]) -> None:
        """A new snapshot with ``changed`` tensors; the complete model only after its final digest matched.
        Raises FinalMismatch (nothing handed out)."""
        if self.decoder.next_chunk == len(self.manifest.chunks) and self.final_digest is None:
            digest = self.decoder.digest()
            if digest != self.manifest.final_sha256:
                raise FinalMismatch(f"final weights SHA-256 {digest} is not the manifest's {self.manifest.final_sha256}")
            self.final_digest = digest
        old = self.snapshot.checkpoint
        ckpt = Checkpoint(updated_model(old.model, self.decoder.tensors(changed)), old.class_names, old.preprocess)
        self.snapshot = Snapshot(self.manifest, ckpt, self.decoder.progress())

    def _run(self) -> None:
        lower_thread_priority(self.nice)
        backoff, logged = 1.0, False
        try:
            while not self._stop.is_set():
                try:
                    self._stream_until_complete()
                    break
                except Exception:  # a state nobody foresaw must not end the stream for good: logged, retried
                    if not logged:
                        log.exception("weight stream of %s version %s failed; retrying", self.manifest.model_id,
                                      self.manifest.model_version)
                        logged = True
                    else:
                        log.warning("weight stream failed again; retrying in %.0f s", backoff)
                    self._stop.wait(backoff)
                    backoff = min(30.0, backoff * 2)
        finally:
            self._close_decoders()
            if self.on_end is not None and not self._stop.is_set():
                self.on_end(self)

    def _close_decoders(self) -> None:
        helper, self.helper = self.helper, None
        for decoder in (helper, self.decoder):
            if isinstance(decoder, DecoderProcess):
                decoder.close()

    def _hand_over(self) -> None:
        """Once the helper process is up, bring it to this decoder's chunk from the verified chunks on disk
        and decode there from now on; on any failure keep decoding here."""
        helper = self.helper
        if helper is None or not helper.ready():
            return
        self.helper = None
        try:
            helper.begin(self.manifest, self.store)
            for index in range(self.decoder.next_chunk):
                payload = self.store.load(index)
                if payload is None:
                    raise DecoderDied(f"chunk {index} is not in the weights cache")
                helper.submit(index, payload, keep=False)
            helper.sync()  # at this decoder's chunk (what changed is in the snapshot or in _unswapped)
        except (DecoderDied, ProgressiveError) as err:
            log.warning("decoding stays in the stream's thread: %s", err)
            helper.close()
            return
        self.decoder = helper

    def _restart_decoder(self, err: DecoderDied) -> None:
        """Back to a decoder in this process, brought to where the dead one was from the chunks on disk, and
        (a bounded number of times) a new helper process to take over again."""
        self.decoder_restarts += 1
        again = self.decoder_restarts <= MAX_DECODER_RESTARTS
        log.warning("%s; decoding in the stream's thread%s", err, " until a new decode process is up" if again
                    else f" from now on ({MAX_DECODER_RESTARTS} restarts)")
        self._close_decoders()
        self.decoder = self.store.decoder(self.manifest)
        self._load_cached()  # refines every tensor the verified chunks on disk give
        self._unswapped = set()
        self._last_swap = time.monotonic()
        self.on_snapshot(self.snapshot)  # it may hold the usable head or the whole model: serve it now
        if again:
            self.helper = _spawn_decoder(self.nice)

    def _stream_until_complete(self) -> None:
        try:
            self._stream_with_retries()
        except PackageGone as err:
            self.outcome = "gone"
            log.warning("%s; the device serves what it has and fetches the new manifest", err)
        except FinalMismatch as err:
            log.error("%s version %s: %s; deleting the package (the device serves what it has)",
                      self.manifest.model_id, self.manifest.model_version, err)
            self.store.drop_all()
            self.outcome = "mismatch"  # only now: the poller may start the package again into the same folder
        if self.complete:
            self.store.prune()
            log.info("%s version %s complete: %d bytes, final weights SHA-256 verified", self.manifest.model_id,
                     self.manifest.model_version, self.manifest.total_bytes)
            try:
                if self.on_verified is not None:
                    self.on_verified()
            finally:  # last, so that "complete" means the other versions' packages are already deleted
                self.outcome = "complete"

    def _stream_with_retries(self) -> None:
        """Stream until complete (or stopped), resuming cut calls with a bounded backoff. Raises PackageGone,
        FinalMismatch."""
        backoff = 0.2
        while not self._stop.is_set() and not self.complete:
            wait = 0.0
            try:
                self._stream_once()
                backoff = 0.2
            except grpc.RpcError as err:
                if self._stop.is_set():
                    break
                if err.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    raise PackageGone(f"the cloud no longer serves package {self.manifest.package_digest[:12]} "
                                      f"({err.details()})") from None
                log.warning("weight stream from %s cut after %d chunks sent to decode (%s: %s); resuming in %.1f s",
                            self.link.target, self.decoder.next_chunk, err.code().name, err.details(), backoff)
                wait, backoff = backoff, min(5.0, backoff * 2)
            except ProgressiveError as err:
                self._count_refused(err)
                wait, backoff = backoff, min(5.0, backoff * 2)  # a cloud that keeps sending bad chunks
            except DecoderDied as err:
                if self._stop.is_set():
                    break
                self._restart_decoder(err)
            self._swap_or_restart()  # what arrived before a cut or a refused chunk serves meanwhile
            self._stop.wait(wait)

    def _count_refused(self, err: ProgressiveError) -> None:
        self.refused += 1
        log.warning("chunk refused (%s)%s", err, "" if self._stop.is_set() else "; fetching it again")

    def _stream_once(self) -> None:
        m = self.manifest
        request = pb.WeightRequest(model=pb.ModelRef(model_id=m.model_id, model_version=m.model_version,
                                                     digest=m.model_digest),
                                   split_point=m.split_point, order=m.order, from_chunk=self.decoder.next_chunk,
                                   package_digest=m.package_digest, base_sha256=m.base_sha256)
        calls = self._call = self.link.stream_weights(request, self.call_timeout_s)
        buffer = bytearray()  # the start of chunk decoder.next_chunk
        try:
            for message in calls:
                if self._stop.is_set():
                    return
                if message.index != self.decoder.next_chunk or message.offset != len(buffer):
                    raise ProgressiveError(f"chunk {message.index} at offset {message.offset} does not continue "
                                           f"chunk {self.decoder.next_chunk} at {len(buffer)}")
                self._take_message(message.data, buffer)
                if buffer and self._swap_due():  # also within a chunk of many messages on a slow link
                    self._swap()
                self._hand_over()
        finally:
            calls.cancel()

    def _take_message(self, data: bytes, buffer: bytearray) -> None:
        """Cut one message's ``data`` at the manifest's chunk sizes: ``_take`` each chunk it completes (and swap
        when due), keep the start of the next in ``buffer``. Raises ProgressiveError for data past the last
        chunk."""
        chunks, rest = self.manifest.chunks, memoryview(data)
        while rest:
            index = self.decoder.next_chunk
            if index >= len(chunks):
                raise ProgressiveError(f"{len(rest)} bytes past the last chunk")
            room = chunks[index].size - len(buffer)
            buffer += rest[:room]
            rest = rest[room:]
            if len(buffer) == chunks[index].size:
                payload = bytes(buffer)
                buffer.clear()
                self._take(index, payload)
                if self._swap_due(message_end=not rest):
                    self._swap()

    def _take(self, index: int, payload: bytes) -> None:
        """Verify chunk ``index`` (its hash first), decode it and keep it on disk: in the decode process, queued
        there (what changed is collected at the next swap, a refusal too), or here. Raises ProgressiveError for
        a refused chunk (not kept), DecoderDied."""
        if isinstance(self.decoder, DecoderProcess):
            self.decoder.submit(index, payload)
        else:
            self._unswapped.update(self.decoder.apply(index, payload))
            self.store.save(index, payload)
        log.debug("weights %s v%s: chunk %d/%d (%s) received", self.manifest.model_id, self.manifest.model_version,
                  index + 1, len(self.manifest.chunks), self.manifest.chunks[index].stage)

    def _swap_due(self, message_end: bool = True) -> bool:
        """At once for the usable head and the complete model (and every chunk with ``swap_interval_s`` 0);
        otherwise at the end of a message once ``swap_interval_s`` has passed since the last swap."""
        # Each swap costs the serving threads GIL time (tensors from the decoder, path copying, a new head), so
        # swaps are coalesced to one per swap_interval_s (README, "stream_swap_ms").
        m, received = self.manifest, self.decoder.next_chunk
        if received == len(m.chunks) or (received > m.usable_chunk and not self.snapshot.progress.usable):
            return True
        return (message_end or self.swap_interval_s == 0) and \
            time.monotonic() - self._last_swap >= self.swap_interval_s

    def _swap_or_restart(self) -> None:
        try:
            try:
                self._swap()
            except ProgressiveError as err:  # refused in the decode process, found after the call ended
                self._count_refused(err)
                self._swap()  # what the chunks before it changed
        except DecoderDied as err:  # the tensors could not be had: rebuilt from disk, the snapshot handed out
            self._restart_decoder(err)

    def _swap(self) -> None:
        """Hand the model with every chunk decoded so far to ``on_snapshot`` (nothing when none is new).
        Raises DecoderDied when the decode process cannot give the tensors, ProgressiveError when it refused a
        chunk (the chunks before it are swapped in by the next call)."""
        if isinstance(self.decoder, DecoderProcess):
            self._unswapped.update(self.decoder.sync())  # ProgressiveError: the chunks before it come next time
        if not self._unswapped and self.decoder.progress().chunks == self.snapshot.progress.chunks:
            return
        self._refine(self._unswapped)
        self._unswapped = set()
        self._last_swap = time.monotonic()
        p, m = self.snapshot.progress, self.manifest
        log.info("weights %s v%s: %d/%d chunks swapped in, %d bytes, %.1f %% of the weights, head %.1f bits",
                 m.model_id, m.model_version, p.chunks, p.total_chunks, p.bytes, 100 * p.weights_fraction,
                 p.head_bits)
        self.on_snapshot(self.snapshot)


def _spawn_decoder(nice: int) -> Optional[DecoderProcess]:
    try:
        return DecoderProcess(nice=nice)
    except OSError as err:  # no process to be had (limits): decode in the stream's thread
        log.warning("could not start a decode process: %s", err)
        return None


def fetch_manifest(link: CloudLink, split_point: int, order: str, timeout_s: float,
                   max_package_bytes: int = DEFAULT_MAX_PACKAGE_BYTES, verifier: Optional[Verifier] = None,
                   held_sha256: str = "") -> Manifest:
    """The manifest of the package the cloud serves for this split point and order, validated whole (and its
    signature checked when ``verifier`` is given); ``held_sha256``: the final digest of the weights the device
    holds complete (the cloud may answer with a delta from them).

    Raises grpc.RpcError (cloud down or refusing), ProgressiveError (malformed manifest, or a delta from weights
    other than ``held_sha256``: refused before a byte of it is fetched) or SignatureError.
    """
    message = link.manifest(pb.ManifestRequest(split_point=split_point, order=order, held_sha256=held_sha256),
                            timeout_s)
    manifest = manifest_from_message(message, max_package_bytes)
    if verifier is not None:
        verifier.verify(manifest.package_digest, manifest.signature)
    if manifest.base_sha256 and manifest.base_sha256 != held_sha256:
        raise ProgressiveError(f"manifest.base_sha256: a delta from {manifest.base_sha256[:12]}, but the device "
                               f"holds {held_sha256[:12] or 'no complete model'}; refused")
    return manifest


def delta_base(manifest: Manifest, held: "WeightStream") -> dict[str, torch.Tensor]:
    """The weights of ``held`` (complete and verified) that the delta ``manifest`` applies to, by name, on the CPU.
    Raises ProgressiveError, before anything of the delta is stored, unless the delta names exactly the held
    package's tensors (names, shapes, dtypes, in order) and its final digest as its base."""
    if manifest.base_sha256 != held.final_digest or \
            [(t.name, t.shape, t.dtype) for t in manifest.tensors] != \
            [(t.name, t.shape, t.dtype) for t in held.manifest.tensors]:
        raise ProgressiveError("manifest.tensors: a delta's base is not the weights the device holds; refused")
    state = held.snapshot.checkpoint.model.state_dict()
    return {t.name: state[t.name].detach().cpu() for t in held.manifest.tensors}


class StreamedModel:
    """The device's model when it streams its weights (``checkpoint: stream``).

    Keeps one ``WeightStream`` for the package in use and, when the cloud starts serving another package (a new
    version, or the same model cut again), a second one beside it; ``install`` (the runtime) gets every snapshot
    of the package in use, and the new package's first usable snapshot, after which the old stream stops. The
    cloud is asked for its manifest every ``poll_seconds`` and whenever ``check_soon`` is called (e.g. after the
    cloud refused a version, or a stream ended because its package is gone or failed its final digest: such a
    package is fetched again at most MAX_FINAL_RETRIES times). ``timeout_s`` is the deadline of one GetManifest
    call; ``decode_process``, ``swap_interval_s``: see ``WeightStream``; ``verifier``: signed packages only;
    ``max_package_bytes``: larger manifests are refused.
    """

    def __init__(self, link: CloudLink, root: Path, split_point: int, order: str, device: torch.device,
                 install: Callable[[Snapshot], None], poll_seconds: float, timeout_s: float, nice: int = 0,
                 decode_process: bool = False, swap_interval_s: float = 0.0, verifier: Optional[Verifier] = None,
                 max_package_bytes: int = DEFAULT_MAX_PACKAGE_BYTES) -> None:
        self.link, self.root, self.split_point, self.order = link, root, split_point, order
        self.nice = nice
        self.decode_process = decode_process
        self.swap_interval_s = swap_interval_s
        self.device, self.install = device, install
        self.poll_seconds, self.timeout_s = poll_seconds, timeout_s
        self.verifier, self.max_package_bytes = verifier, max_package_bytes
        self.current: Optional[WeightStream] = None
        self.pending: Optional[WeightStream] = None
        self.failures: collections.Counter[str] = collections.Counter()  # package digest -> final mismatches
        self.gone: dict[str, tuple[int, float]] = {}  # package digest -> (times the cloud refused it, when last)
        self.refused_manifests = 0  # manifests that failed validation or the signature (tests, logs)
        self._last_refusal = ""
        self._lock = threading.Lock()
        self._claimed: set[Path] = set()  # folders being made for a stream not registered yet (never deleted)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="spinn-manifest", daemon=True)

    def start(self) -> None:
        """Resume the newest cached package (if any) at once, and beside it the one it replaces while that is still
        cached, then ask the cloud for its manifest on the poller's thread: no request waits for the manifest (with
        no weights, requests go to the cloud at split 0)."""
        cached = cached_manifests(self.root, self.link.model.model_id, self.split_point, self.order,
                                  self.verifier, self.max_package_bytes)
        for i, manifest in enumerate(cached):
            # The package this one replaces, while still cached (until this one is verified), serves until it
            # takes over (_takes_over): a delta's base, or the same version at another precision. Resumed first.
            base = next((m for m in cached[i + 1:] if m.final_sha256 == manifest.base_sha256 or
                         m.model_digest == manifest.model_digest), None)
            held = self._resume(base, start=False) if base is not None else None
            resumed = self._resume(manifest)  # before the base's thread may verify it and delete other folders
            if held is not None:
                held.start()
            if resumed is not None or self.current is not None:
                break
        self._wake.set()  # first poll right away
        self._poller.start()

    def _takes_over(self, snapshot: Snapshot) -> bool:
        """Whether the pending stream's ``snapshot`` replaces the current model (under ``_lock``): once usable (a
        delta: once its head is exact), but the same version at another precision (the cloud changed
        ``delivery_snr_db``) only once complete, when the current model is."""
        current = self.current
        if current is not None and current.complete and \
                current.manifest.model_digest == snapshot.manifest.model_digest:
            return snapshot.progress.complete
        return snapshot.progress.usable

    def _register(self, stream: WeightStream) -> Optional[WeightStream]:
        """Make ``stream`` the one in use, or the one beside it (under ``_lock``); returns a pending stream it
        replaces (to be stopped outside the locks)."""
        if self.current is None:
            self.current = stream
            return None
        m = stream.manifest
        log.info("cloud serves %s version %s (package %s): streaming it beside version %s, which keeps serving",
                 m.model_id, m.model_version, m.package_digest[:12], self.current.manifest.model_version)
        replaced, self.pending = self.pending, stream
        return replaced

    def _resume(self, manifest: Manifest, start: bool = True) -> Optional[WeightStream]:
        """``_begin`` a cached package; a delta whose base file is gone or not its base is quarantined (None)."""
        try:
            return self._begin(manifest, start=start)
        except ProgressiveError as err:
            quarantine(self.root, package_dir(self.root, manifest), str(err))
            return None

    def check_soon(self) -> None:
        self._wake.set()

    def _begin(self, manifest: Manifest, base: Optional[dict[str, torch.Tensor]] = None, start: bool = True
               ) -> Optional[WeightStream]:
        """Stream ``manifest``'s package (beside the one in use, if any); returns the stream (None once closed).
        ``base``: a delta's base weights, kept with it on disk; ``start``: False leaves starting its thread to the
        caller. Raises ProgressiveError for a delta without its base."""
        folder = package_dir(self.root, manifest).resolve()
        with self._lock:
            self._claimed.add(folder)  # before the folder is made: _drop_others leaves it alone
        try:
            stream = WeightStream(self.link, manifest, ChunkStore(self.root, manifest, base), self.device,
                                  lambda snap: self._on_snapshot(stream, snap), nice=self.nice,
                                  decode_process=self.decode_process, swap_interval_s=self.swap_interval_s)
            stream.on_verified = lambda: self._drop_others(stream)
            stream.on_end = self._on_end
            with self._lock:
                closed = self._stop.is_set()  # closed while the manifest was on its way: never start a stream
                replaced = None if closed else self._register(stream)
        finally:
            with self._lock:
                self._claimed.discard(folder)
        if closed:
            stream.stop()
            return None
        if replaced is not None:
            replaced.stop()
        self._on_snapshot(stream, stream.snapshot)
        if start:
            stream.start()
        return stream

    def _on_end(self, stream: WeightStream) -> None:
        """A stream ended on its own: its package is gone or failed its final digest; ask for the manifest."""
        digest = stream.manifest.package_digest
        if stream.outcome == "mismatch":
            self.failures[digest] += 1
        if stream.outcome == "gone":
            count, _ = self.gone.get(digest, (0, 0.0))
            self.gone[digest] = (count + 1, time.monotonic())
        if stream.outcome in ("gone", "mismatch"):
            self.check_soon()

    def _on_snapshot(self, stream: WeightStream, snapshot: Snapshot) -> None:
        old = None
        with self._lock:
            if stream is self.pending and self._takes_over(snapshot):
                old, self.current, self.pending = self.current, stream, None
            if stream is not self.current:
                return
            self.install(snapshot)
        if old is not None:  # outside the lock: the old stream's thread may be waiting for it
            old.stop()
            log.info("switched to %s version %s", snapshot.manifest.model_id, snapshot.manifest.model_version)

    def _drop_others(self, stream: WeightStream) -> None:
        """``stream``'s package is complete and its final digest verified: delete the cached packages of the
        other versions for this split point and order (before, a device cut off mid-rollout could only go back
        to the old version's chunks), but for the one streaming beside it (a delta from it, say)."""
        for other in package_dirs(self.root, stream.manifest.model_id, self.split_point, self.order):
            with self._lock:  # against _begin: a folder claimed or in use is never deleted; none once closed
                if stream is not self.current or self._stop.is_set():
                    return
                live = {s.store.dir.resolve() for s in (self.current, self.pending) if s is not None}
                if other.resolve() in live | self._claimed or not (other / "manifest.pb").is_file():
                    continue
                shutil.rmtree(other, ignore_errors=True)
                with contextlib.suppress(OSError):  # the model's folder, when no other package is in it
                    other.parent.rmdir()
            log.info("deleted the cached package %s: version %s is verified", other, stream.manifest.model_version)

    def _poll(self) -> None:
        retry, backoff, logged = 1.0, 1.0, False
        while not self._stop.is_set():
            self._wake.wait(self.poll_seconds if self.current is not None else retry)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                retry = self._poll_once(retry)
                backoff = 1.0
            except Exception:  # the poller must outlive any answer: logged once with its traceback, retried
                if not logged:
                    log.exception("manifest poll failed; retrying")
                    logged = True
                self._stop.wait(backoff)
                backoff = min(60.0, backoff * 2)

    def _poll_once(self, retry: float) -> float:
        """Fetch the cloud's manifest and start streaming it when it is new; returns the next retry period
        (while the device has no package, a failed fetch is retried soon, not a poll period later)."""
        held = self._held()
        try:
            manifest = fetch_manifest(self.link, self.split_point, self.order, self.timeout_s,
                                      self.max_package_bytes, self.verifier, held.final_digest if held else "")
        except (grpc.RpcError, ProgressiveError, SignatureError) as err:
            if isinstance(err, grpc.RpcError) and err.code() in NETWORK_CODES:
                log.debug("no manifest from %s: %s", self.link.target, _describe(err))
            else:
                self._refused(err)
            return min(self.poll_seconds, retry * 2)
        digest = manifest.package_digest
        if self.failures[digest] >= MAX_FINAL_RETRIES:
            if self.failures[digest] == MAX_FINAL_RETRIES:
                log.error("package %s failed its final digest %d times: given up until the cloud serves another",
                          digest[:12], MAX_FINAL_RETRIES)
                self.failures[digest] += 1
            return 1.0
        with self._lock:
            live = {(s.manifest.model_digest, s.manifest.final_sha256) for s in (self.current, self.pending)
                    if s is not None and s.outcome in (None, "complete")}
        refused, last = self.gone.get(digest, (0, 0.0))
        if refused and time.monotonic() - last < min(60.0, 2.0 ** refused):
            return 1.0  # a cloud that lists a package but refuses its stream: not again at once
        # A package of a version a live stream ends on the same weights of is not started beside it: the device
        # holds them, or a delta to them is under way (the cloud offers the full package to a device that holds
        # nothing complete). A live package the cloud stops serving ends "gone", and its successor is taken then.
        if (manifest.model_digest, manifest.final_sha256) in live:
            return 1.0
        try:
            base = delta_base(manifest, held) if manifest.base_sha256 and held is not None else None
        except ProgressiveError as err:
            self._refused(err)
            return 1.0
        self._begin(manifest, base)
        return 1.0

    def _held(self) -> Optional[WeightStream]:
        """The stream in use when its model is complete and verified (what the device says it holds)."""
        with self._lock:
            current = self.current
        return current if current is not None and current.final_digest is not None else None

    def _refused(self, err: Exception) -> None:
        """A manifest refused (or a refusal from the cloud): counted, logged when the reason changes (a cloud
        that keeps sending the same bad manifest is not logged every poll)."""
        self.refused_manifests += 1
        if _describe(err) != self._last_refusal:
            self._last_refusal = _describe(err)
            log.warning("manifest from %s refused: %s; the device keeps serving what it has", self.link.target,
                        self._last_refusal)

    def close(self) -> None:
        with self._lock:  # after this, _begin starts no stream (see there)
            self._stop.set()
            streams = (self.current, self.pending)
        self._wake.set()
        for stream in streams:
            if stream is not None:
                stream.stop()
        if self._poller.is_alive():
            self._poller.join(5.0)


def _describe(err: Exception) -> str:
    if isinstance(err, grpc.RpcError):
        return f"{err.code().name}: {err.details()}"
    return str(err)
