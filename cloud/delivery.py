"""Progressive weight delivery, free of gRPC: packages built once per (model, split point, order) and cached,
manifests, and the stream of a package's chunks from any chunk on in messages of bounded size.

A device that holds another version's weights complete says so (ManifestRequest.held_sha256); when that version
is still served and the delta from it is worth it (``DELTA_MAX_FRACTION``), it gets a delta package
(models/progressive/delta.py) instead of the full one."""

from __future__ import annotations

import collections
import logging
import multiprocessing
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Iterator, Optional

import grpc

import torch

from cloud.inference import RequestError, ServedModel
from models.checkpoint import load_checkpoint_bytes
from models.bias_correction import bias_inputs
from models.identity import check_digest
from models.progressive import DEFAULT_BITS, DEFAULT_CHUNK_BYTES, DEFAULT_USABLE_PLANES, ORDERS, Package, \
    build_package
from models.progressive.delta import DELTA_ORDER, build_delta_package, final_weights, weights_digest
from proto.manifest import seal
from serving.priority import become_background_child
from serving.signing import Signer
from proto import spinn_v1_pb2 as pb

log = logging.getLogger("cloud")

#: Payload bytes per StreamWeights message; with the envelope, well under the 1 MiB message bound. Small chunks
#: share a message: each message wakes a thread on the device, which costs its answers' tail latency (README).
MESSAGE_BYTES = 64 * 1024
#: Nice of the package build process: the forward's (``forward_nice``, 10 by default), below the RPC threads. Lower
#: priorities were tried: SCHED_IDLE never finished on busy cores, and nice 19 (a seventieth of a core against
#: one busy at nice 0) stalled a device's upgrade for minutes while the cloud answered it at full load.
BUILD_NICE = 10
#: The longest a package build may take (MobileNetV2 at width 1.0: about 3 s of a core).
BUILD_TIMEOUT_S = 600.0
#: A delta is offered only when its whole stream is at most this fraction of the full package's. From a version
#: trained apart (not fine-tuned from the base) it is about as large as the full package, and the device keeps
#: serving the old version until the delta's head is complete, later than a full package's head is usable.
DELTA_MAX_FRACTION = 0.75
#: A delta whose build failed is not tried again for this long (a build that fails fails again: a timeout under load,
#: a bug); a delta found too large is never tried again for that version and base.
DELTA_RETRY_S = 600.0


class BuildsBusy(Exception):
    """A package must be built but ``max_package_builds`` builds are running already (RESOURCE_EXHAUSTED)."""


class BuildFailed(Exception):
    """Building a package raised (logged with its traceback); the next request tries again (INTERNAL)."""


class PackageCache:
    """Built packages by (version digest, split point, order): at most ``max_packages`` of them and
    ``max_bytes`` of payload (least recently used evicted; the newest is kept even when it alone is larger). A
    package is built once: concurrent first requests wait for the same build. At most ``max_builds`` builds run
    at once (a build is zstd at level 19 over the whole model, seconds of a core); a request that needs another
    raises BuildsBusy instead of queueing behind them."""

    def __init__(self, max_packages: int = 4, chunk_bytes: int = DEFAULT_CHUNK_BYTES, bits: int = DEFAULT_BITS,
                 usable_planes: int = DEFAULT_USABLE_PLANES, max_bytes: int = 256 << 20, max_builds: int = 1,
                 signer: Optional[Signer] = None, plane_coder: str = "zstd", snr_db: float = 0.0) -> None:
        """``signer``: signs every package's digest (``delivery_signing_key``); None: packages are unsigned.
        ``plane_coder``: how the packages' planes are coded (``delivery_plane_coder``); ``snr_db``: each layer's
        final precision (``delivery_snr_db``, ``models.progressive.build_package``)."""
        self.plane_coder, self.snr_db = plane_coder, snr_db
        self.max_packages, self.max_bytes, self.max_builds = max_packages, max_bytes, max_builds
        self.signer = signer
        self.chunk_bytes, self.bits, self.usable_planes = chunk_bytes, bits, usable_planes
        self._lock = threading.Lock()
        self._builds = 0  # builds running now
        self._entries: collections.OrderedDict[tuple, tuple[threading.Lock, list[Package]]] = \
            collections.OrderedDict()
        self._weights_digests: dict[str, str] = {}  # version digest -> weights_digest of its packages
        self._digesting = threading.Lock()  # one weights_digest computed at a time
        # (version, split point, base) -> until when no delta is built for it (too large: forever; failed: a while)
        self._no_delta: dict[tuple[str, int, str], float] = {}

    @property
    def builds_running(self) -> int:
        with self._lock:
            return self._builds

    @property
    def cached_bytes(self) -> int:
        """Payload bytes of the packages held now."""
        with self._lock:
            return sum(_size(slot) for _, slot in self._entries.values())

    def weights_digest(self, served: ServedModel) -> str:
        """The ``final_sha256`` every package of ``served`` ends on (``models.progressive.delta.weights_digest``
        at this cache's bits), computed once per version (a quantisation of the whole model: 0.06 s for the cars
        model), one at a time: first requests that arrive together do not each compute it."""
        with self._digesting:
            with self._lock:
                known = self._weights_digests.get(served.digest)
            if known is None:
                known = weights_digest(served.model.state_dict(), self.bits, self.snr_db)
                with self._lock:
                    self._weights_digests[served.digest] = known
        return known

    def get(self, served: ServedModel, split_point: int, order: str, base: Optional[ServedModel] = None
            ) -> Package:
        """The package of ``served`` for ``split_point`` and ``order`` (validated by the caller); with ``base``
        (order ``delta``), the delta package from ``base``'s package weights to ``served``'s. Raises BuildsBusy
        when it must be built and ``max_builds`` builds are running, BuildFailed when its build failed."""
        key = (served.digest, split_point, order, base.digest if base is not None else "")
        with self._lock:
            entry = self._entries.get(key)
            builder = entry is None
            if builder:
                if self._builds >= self.max_builds:
                    raise BuildsBusy(f"{self._builds} package build(s) running already (limit max_package_builds); "
                                     "retry later")
                entry = self._entries[key] = (threading.Lock(), [])
                entry[0].acquire()  # a new lock: never blocks; later requests for this package wait on it
                self._builds += 1  # reserved under the lock, so two new packages cannot both pass the check
            self._entries.move_to_end(key)
        build_lock, slot = entry
        if builder:
            try:
                self._build(served, split_point, order, key, slot, base)
            finally:
                build_lock.release()
        else:
            with build_lock:  # the build is done (or failed) once it is free
                pass
        if not slot:
            raise BuildFailed(f"building the package for split point {split_point}, order {order} failed (the "
                              "cloud logged why)")
        return slot[0]

    def _build(self, served: ServedModel, split_point: int, order: str, key: tuple, slot: list[Package],
               base: Optional[ServedModel]) -> None:
        """Build into ``slot``; releases the build place ``get`` reserved."""
        started = time.monotonic()
        try:
            slot.append(self._built(served, split_point, order, base))
        except Exception:
            log.exception("building the package for split point %d, order %s failed", split_point, order)
            with self._lock:
                self._entries.pop(key, None)  # the next request builds again
            return
        finally:
            with self._lock:
                self._builds -= 1
        m = slot[0].manifest
        log.info("built progressive package for split point %d, order %s: %d chunks, %d bytes (%.1f %% "
                 "of float32) in %.1f s", split_point, order, len(m.chunks), m.total_bytes,
                 100 * m.total_bytes / m.float32_bytes, time.monotonic() - started)
        self._evict(keep=key)

    def drop(self, digest: str) -> None:
        """Forget every package of version ``digest`` (it was unloaded), deltas from it included; streams in
        progress keep theirs."""
        with self._lock:
            for key in [k for k in self._entries if digest in (k[0], k[3])]:
                del self._entries[key]
            self._weights_digests.pop(digest, None)
            self._no_delta = {k: v for k, v in self._no_delta.items() if digest not in (k[0], k[2])}

    def delta(self, served: ServedModel, split_point: int, base: ServedModel, max_bytes: float
              ) -> Optional[Package]:
        """The delta package from ``base`` to ``served`` when its stream is at most ``max_bytes``, else None: a
        delta found larger is remembered and neither kept nor built again; one whose build failed is not tried
        again for ``DELTA_RETRY_S``. Raises BuildsBusy as ``get``."""
        key = (served.digest, split_point, base.digest)
        with self._lock:
            if self._no_delta.get(key, 0.0) > time.monotonic():
                return None
        try:
            delta = self.get(served, split_point, DELTA_ORDER, base)
        except BuildFailed:
            with self._lock:
                self._no_delta[key] = time.monotonic() + DELTA_RETRY_S
            return None
        if delta.manifest.total_bytes <= max_bytes:
            return delta
        log.info("no delta from version %s to %s at split point %d: %d bytes, over %d", base.model_version,
                 served.model_version, split_point, delta.manifest.total_bytes, max_bytes)
        with self._lock:
            self._no_delta[key] = float("inf")
            self._entries.pop((served.digest, split_point, DELTA_ORDER, base.digest), None)
        return None

    def _built(self, served: ServedModel, split_point: int, order: str, base: Optional[ServedModel]) -> Package:
        """Build the package in a process of its own at nice ``BUILD_NICE`` (from the checkpoint's bytes), then
        seal it here. A build is seconds of a core, mostly Python and numpy holding the GIL: on a thread it slowed
        the answers of the versions served meanwhile (bench/rollout.py). A model that came from no file is built
        in the caller's thread."""
        args = (served.model_id, served.model_version, split_point, order, self.bits, self.usable_planes,
                self.chunk_bytes, self.plane_coder, self.snr_db)
        models = [served] if base is None else [served, base]
        if all(m.checkpoint_bytes for m in models):
            context = multiprocessing.get_context("spawn")  # never fork a process that runs gRPC threads
            files = [(m.checkpoint_bytes, m.source) for m in models]
            with ProcessPoolExecutor(1, mp_context=context, initializer=become_background_child,
                                     initargs=(BUILD_NICE,)) as pool:
                package = pool.submit(_build_from_bytes, files, *args).result(BUILD_TIMEOUT_S)
        else:
            package = _build_from_model(served, base, *args)
        seal(package.manifest, self.signer.sign if self.signer is not None else None)
        return package

    def _evict(self, keep: tuple) -> None:
        """Drop the least recently used packages beyond the count and byte bounds, never ``keep``."""
        with self._lock:
            total = sum(_size(slot) for _, slot in self._entries.values())
            for key in list(self._entries):
                if len(self._entries) <= self.max_packages and total <= self.max_bytes:
                    break
                if key != keep:
                    total -= _size(self._entries.pop(key)[1])


def _build_from_model(served: ServedModel, base: Optional[ServedModel], model_id: str, version: str,
                      split_point: int, order: str, bits: int, usable_planes: int, chunk_bytes: int,
                      plane_coder: str, snr_db: float) -> Package:
    """The package of ``served``: the full one, or with a ``base`` (order ``delta``) the delta from its package
    weights."""
    if base is not None:
        return build_delta_package(served.model.state_dict(), final_weights(base.model.state_dict(), bits, snr_db),
                                   served.metadata, model_id, version, split_point, served.model.exit_points, bits,
                                   usable_planes, chunk_bytes, plane_coder, snr_db)
    return build_package(served.model.state_dict(), served.metadata, model_id, version, split_point,
                         served.model.exit_points, order, bits, usable_planes, chunk_bytes,
                         bias_inputs(served.model, served.input_size), plane_coder=plane_coder, snr_db=snr_db)


def _build_from_bytes(files: list[tuple[bytes, str]], *args) -> Package:
    """In the build process: the checkpoints' models (checkpoint bytes, source), then the package
    (``_build_from_model``'s arguments)."""
    torch.set_num_threads(1)
    models = [ServedModel.from_checkpoint(load_checkpoint_bytes(data, source), "", None) for data, source in files]
    return _build_from_model(models[0], models[1] if len(models) > 1 else None, *args)


def _size(slot: list[Package]) -> int:
    return sum(len(p) for p in slot[0].payloads) if slot else 0


def check_package_request(served: ServedModel, split_point: int, order: str) -> str:
    """Validate what names a package of ``served`` (the version the request named); returns the order (empty
    means ``split``).

    Raises RequestError INVALID_ARGUMENT for a split point outside 0..N or an unknown order (``delta`` is
    streamed, never asked a manifest for: see ``offered_package``).
    """
    if not 0 <= split_point <= served.model.num_blocks:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"split_point {split_point} is outside 0..{served.model.num_blocks}")
    order = order or "split"
    if order not in ORDERS:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"order must be one of {ORDERS}, got {order!r}")
    return order


def held_base(packages: PackageCache, versions: list[ServedModel], served: ServedModel, held_sha256: str,
              field: str) -> Optional[ServedModel]:
    """The version among ``versions``, other than ``served`` and of its architecture, whose package weights are
    ``held_sha256`` (the device's), or None. Raises RequestError INVALID_ARGUMENT naming ``field`` for a
    malformed digest."""
    try:
        check_digest(held_sha256, field)
    except ValueError as err:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None
    for version in versions:
        if version.digest != served.digest and version.architecture == served.architecture and \
                packages.weights_digest(version) == held_sha256:
            return version
    return None


def offered_package(packages: PackageCache, versions: list[ServedModel], served: ServedModel, split_point: int,
                    order: str, held_sha256: str) -> Package:
    """What a ManifestRequest gets: the delta from the weights the device holds (``held_sha256``; empty: none)
    when they are another version served now and the delta's stream is at most ``DELTA_MAX_FRACTION`` of the
    full package's; the full package otherwise, also when the delta's build failed. Raises RequestError as
    ``held_base``, BuildsBusy (the device asks again: a busy cloud must not make it stream the whole model),
    BuildFailed (the full package's)."""
    base = held_base(packages, versions, served, held_sha256, "held_sha256") if held_sha256 else None
    full = packages.get(served, split_point, order)
    if base is None:
        return full
    delta = packages.delta(served, split_point, base, DELTA_MAX_FRACTION * full.manifest.total_bytes)
    return delta if delta is not None else full


def weight_messages(package: Package, from_chunk: int, message_bytes: int = MESSAGE_BYTES,
                    package_digest: Optional[str] = None) -> Iterator[pb.WeightChunk]:
    """The package's chunks from ``from_chunk`` on, as one run of bytes cut into messages of at most
    ``message_bytes``: a message may end inside a chunk or carry several. A message also ends with the chunk
    that makes the head usable, so that the device does not wait for more bytes to move to its split.

    Raises RequestError INVALID_ARGUMENT for ``from_chunk`` outside 0..chunks, FAILED_PRECONDITION when
    ``package_digest`` (the request's) is not this package's: the device then fetches the new manifest.
    """
    if package_digest is not None and package_digest != package.manifest.package_digest:
        raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                           f"package_digest {package_digest[:80]!r} is not served; the package for split point "
                           f"{package.manifest.split_point}, order {package.manifest.order} of version "
                           f"{package.manifest.model_version} is now {package.manifest.package_digest} (fetch "
                           "the manifest again)")
    if not 0 <= from_chunk <= len(package.payloads):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"from_chunk {from_chunk} is outside 0..{len(package.payloads)}")
    return _messages(package, from_chunk, message_bytes)


def _messages(package: Package, from_chunk: int, message_bytes: int) -> Iterator[pb.WeightChunk]:
    payloads, usable = package.payloads, package.manifest.usable_chunk
    index, offset = from_chunk, 0
    while index < len(payloads):
        message = pb.WeightChunk(index=index, offset=offset)
        data = bytearray()
        while index < len(payloads) and len(data) < message_bytes:
            piece = payloads[index][offset:offset + message_bytes - len(data)]
            data += piece
            offset += len(piece)
            if offset == len(payloads[index]):
                index, offset = index + 1, 0
                if index == usable + 1:
                    break
        message.data, message.last = bytes(data), offset == 0
        yield message
