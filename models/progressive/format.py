"""The package's data: its constants, the manifest (``Manifest``, ``TensorInfo``, ``ChunkInfo``) and ``Package``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

ORDERS = ("split", "value", "whole")
DEFAULT_BITS = 16
DEFAULT_USABLE_PLANES = 7
DEFAULT_CHUNK_BYTES = 16 * 1024
DEFAULT_CORRECTED_PLANES = 6  # 8 made the quickstart stream 1.003x the plain 16-bit package
PLANE_CODERS = ("zstd", "context")  # zstd-or-raw sections; context-modelled ANS (models/progressive/context.py)


class ProgressiveError(ValueError):
    """A chunk or manifest does not fit the package: wrong hash, wrong order, malformed bytes."""


@dataclass(frozen=True)
class TensorInfo:
    """One state-dict tensor. ``planes`` tensors are coded as bit planes with per-channel ``scales``
    (``shape[0]`` float32 values) and reconstruction ``offsets`` (``offsets[p]``: the value, in quantisation
    steps, given to the missing low bits of a significant weight while ``p`` planes are known; None: the middle
    of their interval); ``raw`` tensors travel as bytes. ``group`` is the index of the planes tensor it travels
    with; ``part`` is ``head`` or ``rest`` (relative to the package's split point)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    kind: str  # "planes" | "raw"
    group: int
    part: str
    scales: Optional[np.ndarray] = None
    offsets: Optional[np.ndarray] = None  # float32 (bits,) for planes tensors
    target: Optional[int] = None  # planes tensors: the raw tensor of its group its output shift goes to
    spread: Optional[int] = None  # and the raw tensor (a running_var) whose spread_step codes that shift
    zero_planes: int = 0  # planes tensors: low magnitude planes all zero (``quantize``'s snr_db floor)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)  # progress() asks for it per tensor after every chunk: no numpy call


@dataclass(frozen=True)
class ChunkInfo:
    """A chunk: ``units`` are (group, plane) pairs in order; ``raw`` the raw tensors it carries whole or in part
    (indices)."""

    index: int
    units: tuple[tuple[int, int], ...]
    raw: tuple[int, ...]
    size: int
    sha256: str
    stage: str


@dataclass
class Manifest:
    """What a device needs before the first chunk: the model's metadata (``metadata``: the checkpoint's
    model_config, class_names, preprocess), the tensors, the chunks with their sizes and hashes, and the
    SHA-256 of the final decoded weights (``final_sha256``, see ``state_digest``)."""

    model_id: str
    model_version: str
    metadata: dict
    bits: int
    order: str
    split_point: int
    usable_planes: int
    tensors: list[TensorInfo]
    chunks: list[ChunkInfo]
    final_sha256: str
    usable_chunk: int = -1  # after chunks[0..usable_chunk] every head layer has >= usable_planes planes
    corrected_planes: int = 0  # output shifts travel while 1..corrected_planes planes of a layer are known
    model_digest: str = ""  # the content digest of the model the package was coded from (models/identity.py)
    package_digest: str = ""  # this package's identity (proto/manifest.py package_digest_of); set by the cloud
    signature: bytes = b""  # optional Ed25519 signature of the package digest (serving/signing.py)
    plane_coder: str = "zstd"  # PLANE_CODERS: how each plane's sections are coded
    base_sha256: str = ""  # a delta package (models/progressive/delta.py): the state digest of the weights it applies to

    @property
    def planes(self) -> int:
        return self.bits - 1

    @property
    def raw_low_plane(self) -> int:
        """The plane whose unit carries the low 16 bits of its group's float32 raw tensors."""
        return raw_low_plane(self.bits, self.usable_planes)

    @property
    def total_bytes(self) -> int:
        return sum(c.size for c in self.chunks)

    @property
    def float32_bytes(self) -> int:
        """Size of the weights as float32 (planes and raw tensors), the yardstick for byte fractions."""
        return sum(4 * t.numel for t in self.tensors)

    def groups(self) -> list[int]:
        """Tensor indices of the planes tensors (a group is named by its planes tensor's index)."""
        return [i for i, t in enumerate(self.tensors) if t.kind == "planes"]


@dataclass
class Package:
    """A built package: the manifest and the chunk payloads (``payloads[i]`` is chunk ``i``)."""

    manifest: Manifest
    payloads: list[bytes]


def raw_low_plane(bits: int, usable_planes: int) -> int:
    """Plane with which the low halves of float32 raw tensors travel: the first one past the usable ones."""
    return min(usable_planes, bits - 2)
