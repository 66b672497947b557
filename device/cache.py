"""The device's weights cache (``weights_cache``): verified chunks on disk, so that a cut stream or a restart
resumes where it was.

Layout, every part of it the device's own: ``<root>/<model_id>/<model digest>/split<S>-<order>-<final>/``
holding ``manifest.pb`` and ``chunks/<chunk SHA-256>.bin``, ``<final>`` the first 16 hex characters of the
package's final digest (one version's packages at other precisions, ``delivery_snr_db`` say, never share a
folder). A delta package (order ``delta``) also keeps the weights it applies to, ``base.bin`` (every tensor's
little-endian bytes in manifest order, checked against the manifest's base_sha256 when loaded), so that it
resumes after a restart without the base version's package, which is deleted once the delta is verified. The
model id has passed ``proto.manifest.check_name`` (never a path), the digest and the final digest are 64 hex
characters, the order one of ``ORDERS``: nothing the wire says becomes a path. Chunks are named by their hash,
so a package cut again (another chunk size, a restarted cloud) keeps every chunk whose hash it still lists.
Every write is atomic and durable (temp file, fsync, rename, fsync of the folder). One process holds the cache
at a time (``CacheLock``, an OS file lock). A stored manifest that no longer validates is moved to
``<root>/quarantine/`` and the device starts as if it had none.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

from google.protobuf.message import DecodeError

from models.config import ConfigError
import torch

from models.progressive import ORDERS, Decoder, Manifest, ProgressiveError
from models.progressive.delta import DELTA_ORDER
from models.progressive.sections import from_raw_bytes, raw_bytes, raw_size
from proto import spinn_v1_pb2 as pb
from proto.manifest import DEFAULT_MAX_PACKAGE_BYTES, check_name, manifest_from_message, manifest_message
from serving.signing import SignatureError, Verifier

log = logging.getLogger("device")

QUARANTINE = "quarantine"
LOCK = ".lock"
BASE = "base.bin"


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one, never a part: a temp file
    beside it, fsync, rename over, fsync of the folder (which makes the rename itself durable)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def package_dir(root: Path, manifest: Manifest) -> Path:
    """Where ``manifest``'s package lives, from validated values only; ProgressiveError naming the value
    otherwise."""
    check_name(manifest.model_id, "manifest.model.model_id")
    for value, field in ((manifest.model_digest, "manifest.model.digest"), (manifest.final_sha256,
                                                                            "manifest.final_sha256")):
        if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            raise ProgressiveError(f"{field}: not 64 hex characters")
    order, split_point = manifest.order, manifest.split_point
    if order not in (*ORDERS, DELTA_ORDER) or not isinstance(split_point, int) or not 0 <= split_point <= 1024:
        raise ProgressiveError(f"manifest: split point {split_point!r} / order {order[:80]!r} out of range")
    return root / manifest.model_id / manifest.model_digest / \
        f"split{split_point}-{order}-{manifest.final_sha256[:16]}"


class ChunkStore:
    """Verified chunks of one package on disk (see the module docstring). Picklable: the decode process saves
    through it too. ``base``: a delta's base weights by name, written beside it (before its manifest)."""

    def __init__(self, root: Path, manifest: Manifest, base: Optional[dict[str, torch.Tensor]] = None) -> None:
        self.dir = package_dir(root, manifest)
        self.chunks = self.dir / "chunks"
        self.hashes = [c.sha256 for c in manifest.chunks]
        self.tensors = [(t.name, t.shape, t.dtype) for t in manifest.tensors] if manifest.base_sha256 else []
        self.chunks.mkdir(parents=True, exist_ok=True)
        if base is not None:
            write_atomic(self.dir / BASE, b"".join(raw_bytes(base[name]) for name, _, _ in self.tensors))
        known = self.dir / "manifest.pb"
        data = manifest_message(manifest).SerializeToString(deterministic=True)
        if not known.is_file() or known.read_bytes() != data:
            write_atomic(known, data)

    def base(self) -> dict[str, torch.Tensor]:
        """A delta's base weights, as written (the decoder checks their digest). Raises ProgressiveError when
        ``base.bin`` is missing or not the size the manifest's tensors make."""
        path = self.dir / BASE
        sizes = [raw_size(shape, dtype) for _, shape, dtype in self.tensors]
        try:
            data = path.read_bytes() if path.stat().st_size == sum(sizes) else None
        except OSError as err:
            raise ProgressiveError(f"{path}: the delta's base weights cannot be read ({err})") from None
        if data is None:
            raise ProgressiveError(f"{path}: the delta's base weights are {path.stat().st_size} bytes, not "
                                   f"{sum(sizes)}")
        out, at = {}, 0
        for (name, shape, dtype), size in zip(self.tensors, sizes):
            out[name] = from_raw_bytes(data, at, shape, dtype)
            at += size
        return out

    def decoder(self, manifest: Manifest) -> Decoder:
        """A fresh decoder for this store's package: a delta's starts from ``base()`` (ProgressiveError when
        that is missing or not the manifest's base)."""
        return Decoder(manifest, self.base() if manifest.base_sha256 else None)

    def path(self, index: int) -> Path:
        return self.chunks / f"{self.hashes[index]}.bin"

    def save(self, index: int, payload: bytes) -> None:
        write_atomic(self.path(index), payload)

    def load(self, index: int) -> Optional[bytes]:
        path = self.path(index)
        return path.read_bytes() if path.is_file() else None

    def drop(self, index: int) -> None:
        self.path(index).unlink(missing_ok=True)

    def prune(self) -> None:
        """Delete chunk files this package does not list (left by an earlier cut of the same model)."""
        wanted = {f"{h}.bin" for h in self.hashes}
        for path in self.chunks.iterdir():
            if path.name not in wanted:
                path.unlink(missing_ok=True)

    def drop_chunks(self) -> None:
        """Delete every chunk (their decoded weights failed the final digest); the manifest and base stay."""
        shutil.rmtree(self.chunks, ignore_errors=True)
        self.chunks.mkdir(parents=True, exist_ok=True)

    def drop_all(self) -> None:
        """Delete the whole package (its final digest did not match: nothing of it is trusted)."""
        shutil.rmtree(self.dir, ignore_errors=True)


def package_dirs(root: Path, model_id: str, split_point: int, order: str) -> list[Path]:
    """The folders of every cached package of ``model_id`` for this split point: of ``order`` and deltas, also
    those named before folders carried the final digest (``cached_manifests`` renames them)."""
    return [path for kind in (order, DELTA_ORDER) for pattern in (f"split{split_point}-{kind}",
                                                                   f"split{split_point}-{kind}-*")
            for path in (root / model_id).glob(f"*/{pattern}")]


def cached_manifests(root: Path, model_id: str, split_point: int, order: str, verifier: Optional[Verifier] = None,
                     max_package_bytes: int = DEFAULT_MAX_PACKAGE_BYTES) -> list[Manifest]:
    """The stored manifests of this device's packages (those of ``order`` and deltas), newest first. One that no
    longer validates (truncated, malformed, unsigned while a key is required) is quarantined and left out; one in
    a folder not named as ``package_dir`` names it (an older layout) is moved there, or quarantined when that is
    taken."""
    found = []
    paths = sorted([folder / "manifest.pb" for folder in package_dirs(root, model_id, split_point, order)
                    if (folder / "manifest.pb").is_file()], key=lambda p: p.stat().st_mtime, reverse=True)
    for path in paths:
        try:
            manifest = manifest_from_message(pb.Manifest.FromString(path.read_bytes()), max_package_bytes)
            if verifier is not None:
                verifier.verify(manifest.package_digest, manifest.signature)
            _move_to(path.parent, package_dir(root, manifest))
            found.append(manifest)
        except (ProgressiveError, SignatureError, DecodeError, ValueError, OSError) as err:
            quarantine(root, path.parent, str(err))
    return found


def _move_to(folder: Path, wanted: Path) -> None:
    """Rename ``folder`` to ``wanted`` unless it is there already. Raises ProgressiveError when ``wanted`` is
    another package's folder."""
    if folder.resolve() == wanted.resolve():
        return
    if wanted.exists():
        raise ProgressiveError(f"{folder.name}: a copy of the package in {wanted}")
    wanted.parent.mkdir(parents=True, exist_ok=True)
    folder.rename(wanted)
    fsync_dir(wanted.parent)
    log.info("weights cache: %s moved to %s (the folder names its final digest now)", folder, wanted)


def quarantine(root: Path, folder: Path, why: str) -> None:
    """Move ``folder`` (a package) under ``<root>/quarantine/``, logged: kept for inspection, never loaded."""
    target = root / QUARANTINE / f"{int(time.time())}-{folder.parent.name[:12]}-{folder.name}"
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        folder.rename(target)
    except OSError:
        shutil.rmtree(folder, ignore_errors=True)
        target = None
    log.warning("weights cache: %s does not load (%s): %s", folder, why,
                f"moved to {target}" if target else "deleted")


class CacheLock:
    """An exclusive OS lock on a weights cache for the life of the process (or until ``release``): two
    processes on one cache would overwrite each other's chunks and manifests."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / LOCK
        self._fd: Optional[int] = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self._fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(self._fd)
            self._fd = None
            raise ConfigError(f"config key 'weights_cache': {str(root)!r} is in use by {holder}; one process per "
                              "cache (give this one another weights_cache)") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"pid {os.getpid()} ({' '.join(sys.argv)[:300]})".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None
