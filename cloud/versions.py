"""The versions of one model the cloud serves at once, by content digest (as Triton's model versions with a
"latest N" version policy), free of gRPC but for the statuses it refuses with.

A request names the digest its head came from and is answered only by that version's tail; a version beyond the
policy (or whose file is gone) stops taking new requests at once and is unloaded after its last request in
flight. A label (``model_version``) is bound to one digest for the life of the process: a file that reuses a
label for other weights is refused, so a name can never silently change what it means.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import grpc

from cloud.inference import RequestError, ServedModel
from models.identity import check_digest, short_digest
from proto import spinn_v1_pb2 as pb
from proto.metadata import SERVED_VERSIONS_KEY

log = logging.getLogger("cloud")


class VersionRefused(ValueError):
    """A checkpoint that cannot become a version: its label is bound to other weights, it is served already
    under another label, or it is of another architecture. The message names both digests."""


@dataclass
class _Version:
    served: ServedModel
    rank: tuple  # order among versions: the largest is the latest
    leases: int = 0  # requests in flight on it
    retiring: bool = False  # no new requests; unloaded once leases reach 0


def version_rank(label: str) -> tuple:
    """Natural sort key of a version label: ``v2`` < ``v10``, ``2`` < ``10`` (numbers compared as numbers)."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                 for part in re.findall(r"\d+|\D+", label))


class ModelRegistry:
    """Versions served now, oldest first; at most ``keep`` of them (the latest by rank).

    ``before_add(served)`` runs (outside the lock) before a new version takes requests, e.g. to load it into a
    forward process; an exception from it refuses the version. ``on_unload(served)`` runs (outside the lock)
    when a retired version's last request has finished, e.g. to drop it from the forward process and from the
    package cache.
    """

    def __init__(self, model_id: str, keep: int = 2,
                 on_unload: Optional[Callable[[ServedModel], None]] = None,
                 before_add: Optional[Callable[[ServedModel], None]] = None) -> None:
        self.model_id = model_id
        self.keep = keep
        self.on_unload = on_unload
        self.before_add = before_add
        self._lock = threading.Lock()
        self._serving: list[_Version] = []  # by rank, latest last
        self._retiring: dict[str, _Version] = {}
        self._labels: dict[str, str] = {}  # label -> digest, for the life of the process

    # -- what is served --------------------------------------------------------------------------------------

    def versions(self) -> list[ServedModel]:
        """Every version taking requests, oldest first."""
        with self._lock:
            return [v.served for v in self._serving]

    def digests(self) -> set[str]:
        with self._lock:
            return {v.served.digest for v in self._serving}

    def latest(self) -> ServedModel:
        """The latest version; RequestError UNAVAILABLE while none is loaded yet."""
        with self._lock:
            if not self._serving:
                raise RequestError(grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry shortly")
            return self._serving[-1].served

    def resolve(self, ref: pb.ModelRef) -> ServedModel:
        """The version ``ref`` names: by digest, else by label, else (both empty) the latest. RequestError:
        INVALID_ARGUMENT for a malformed digest, FAILED_PRECONDITION for one not served (naming those served)."""
        with self._lock:
            return self._find(ref).served

    @contextlib.contextmanager
    def lease(self, ref: pb.ModelRef) -> Iterator[ServedModel]:
        """The version whose digest ``ref`` names (required), held for the ``with`` block: it is not unloaded
        before the block ends. RequestError INVALID_ARGUMENT / FAILED_PRECONDITION as ``resolve``."""
        if not ref.digest:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               "model.digest: required (the SHA-256 of the model the features' head came from)")
        with self._lock:
            version = self._find(ref)
            version.leases += 1
        try:
            yield version.served
        finally:
            self._release(version)

    def _find(self, ref: pb.ModelRef) -> _Version:
        if ref.model_id and ref.model_id != self.model_id:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"model.model_id {ref.model_id!r} is not served; this cloud serves {self.model_id!r}")
        if not self._serving:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry shortly")
        if ref.digest:
            try:
                check_digest(ref.digest, "model.digest")
            except ValueError as err:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None
            found = [v for v in self._serving if v.served.digest == ref.digest]
            what = f"model.digest {ref.digest}"
            if found and ref.model_version and ref.model_version != found[0].served.model_version:
                raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"model.model_version {ref.model_version!r} is not the label of model.digest "
                                   f"{ref.digest} (that is {found[0].served.model_version!r})",
                                   ((SERVED_VERSIONS_KEY, self._served_metadata()),))
        elif ref.model_version:
            found = [v for v in self._serving if v.served.model_version == ref.model_version]
            what = f"model.model_version {ref.model_version!r}"
        else:
            return self._serving[-1]
        if not found:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"{what} is not served; this cloud serves {self._describe()}",
                               ((SERVED_VERSIONS_KEY, self._served_metadata()),))
        return found[0]

    def _describe(self) -> str:
        return ", ".join(f"{v.served.model_id} {v.served.model_version} (digest {v.served.digest})"
                         for v in self._serving)

    def _served_metadata(self) -> str:
        return ",".join(f"{v.served.model_version}={v.served.digest}" for v in self._serving)

    def _release(self, version: _Version) -> None:
        with self._lock:
            version.leases -= 1
            unload = version.retiring and version.leases == 0 and \
                self._retiring.pop(version.served.digest, None) is not None
        if unload:
            self._unloaded(version)

    def _unloaded(self, version: _Version) -> None:
        log.info("unloaded %s version %s (digest %s): its last request has finished", self.model_id,
                 version.served.model_version, version.served.digest)
        if self.on_unload is not None:
            self.on_unload(version.served)

    # -- changes -------------------------------------------------------------------------------------------------

    def add(self, served: ServedModel, rank: tuple = ()) -> None:
        """Serve ``served`` from now on, placed by ``rank`` (the largest is the latest); versions beyond the
        policy's ``keep`` latest retire. Raises VersionRefused (nothing changes)."""
        with self._lock:
            self._check_new(served)
        if self.before_add is not None:
            try:
                self.before_add(served)
            except Exception as err:
                raise VersionRefused(f"{served.source or 'the new checkpoint'} (digest {served.digest}) could not "
                                     f"be made ready: {err}") from None
        with self._lock:
            self._check_new(served)  # the poller is the only writer, but say so in code, not in hope
            self._labels[served.model_version] = served.digest
            self._serving.append(_Version(served, rank))
            self._serving.sort(key=lambda v: v.rank)
            beyond = self._serving[:-self.keep] if len(self._serving) > self.keep else []
        log.info("loaded %s version %s (digest %s) from %s", self.model_id, served.model_version, served.digest,
                 served.source or "memory")
        for version in beyond:
            self.retire(version.served.digest, "beyond the version policy (latest "
                        f"{self.keep})")

    def _check_new(self, served: ServedModel) -> None:
        bound = self._labels.get(served.model_version)
        if bound is not None and bound != served.digest:
            raise VersionRefused(f"version label {served.model_version!r} is bound to digest {bound}; "
                                 f"{served.source or 'the new checkpoint'} holds digest {served.digest} (other "
                                 "weights): not loaded; give it a new version label")
        same = [v for v in self._serving if v.served.digest == served.digest]
        if same:
            raise VersionRefused(f"digest {served.digest} ({served.source}) is served already as version "
                                 f"{same[0].served.model_version!r}: not loaded twice")
        if self._serving and served.architecture != self._serving[-1].served.architecture:
            latest = self._serving[-1].served
            raise VersionRefused(f"{served.source or 'the new checkpoint'} (digest {served.digest}) is another "
                                 f"architecture than version {latest.model_version!r} (digest {latest.digest}): "
                                 "versions of one model must share every tensor's name and shape and the input size")

    def retire(self, digest: str, why: str) -> bool:
        """Stop taking requests for ``digest``; unload it after its last request in flight. False when it is not
        served."""
        with self._lock:
            version = next((v for v in self._serving if v.served.digest == digest), None)
            if version is None:
                return False
            self._serving.remove(version)
            version.retiring = True
            unload_now = version.leases == 0
            if not unload_now:
                self._retiring[digest] = version
        log.info("retiring %s version %s (digest %s): %s; %s", self.model_id, version.served.model_version, digest,
                 why, "unloading now" if unload_now else f"unloading after its {version.leases} request(s) in flight")
        if unload_now:
            self._unloaded(version)
        return True

    def held(self, digest: str) -> ServedModel:
        """The version ``digest``, serving or retiring (a request holding a lease may still run on it);
        KeyError when it is unloaded."""
        with self._lock:
            for v in [*self._serving, *self._retiring.values()]:
                if v.served.digest == digest:
                    return v.served
        raise KeyError(digest)

    def in_flight(self, digest: str) -> int:
        """Requests in flight on ``digest`` (serving or retiring; 0 when unknown)."""
        with self._lock:
            for v in [*self._serving, *self._retiring.values()]:
                if v.served.digest == digest:
                    return v.leases
        return 0

    def label_of(self, digest: str) -> str:
        """A short readable name of ``digest``: its label when one is bound, else its short form."""
        with self._lock:
            return next((label for label, d in self._labels.items() if d == digest), short_digest(digest))
