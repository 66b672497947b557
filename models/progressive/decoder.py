"""The device's side: ``Decoder`` applies verified chunks in order and hands out the current weights."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

import numpy as np
import torch

from models.bias_correction import shift_decode, spread_step
from models.progressive.format import Manifest, ProgressiveError, TensorInfo
from models.progressive.planes import PlaneState, base_integers, decode_plane, delta_values, dequantize
from models.progressive.sections import DTYPES, INT_CODES, join_halves, raw_bytes, read_section, unshuffle

def state_digest(tensors: Iterable[tuple[TensorInfo, torch.Tensor]]) -> str:
    """SHA-256 over the names and little-endian bytes of the tensors in manifest order (the final-weights
    digest)."""
    return named_digest((info.name, t) for info, t in tensors)


def named_digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """``state_digest`` of (name, tensor) pairs."""
    h = hashlib.sha256()
    for name, t in tensors:
        h.update(name.encode())
        h.update(raw_bytes(t))
    return h.hexdigest()


@dataclass
class Progress:
    """How much of the package a decoder holds. Fractions are of the weights (planes tensors' elements
    weighted by planes received); ``head_bits`` is the mean bits per weight of the head (sign included)."""

    chunks: int
    total_chunks: int
    bytes: int
    total_bytes: int
    weights_fraction: float
    head_bits: float
    usable: bool
    complete: bool


class Decoder:
    """Incremental decoder: ``apply`` chunks in order; ``tensor``/``state_dict`` give the current weights.

    Only the tensors a chunk touched are dequantised again (``apply`` returns their names). Not thread-safe:
    one streaming thread applies chunks; readers take the tensors it hands out (never modified afterwards).
    """

    def __init__(self, manifest: Manifest, base: Optional[Mapping[str, torch.Tensor]] = None) -> None:
        """``base``: for a delta package (``manifest.base_sha256``), the weights it applies to, by name; refused
        (ProgressiveError) unless their state digest is the manifest's ``base_sha256``."""
        self.manifest = manifest
        self.next_chunk = 0
        self.bytes = 0
        self._planes: dict[int, PlaneState] = {}
        self._values: dict[int, torch.Tensor] = {}
        self._high: dict[int, np.ndarray] = {}  # float32 raw tensors whose low halves are still missing
        self._shifts: dict[int, np.ndarray] = {}  # target tensor -> output shift of its layer's known planes
        self._shown: dict[int, torch.Tensor] = {}  # target tensor -> its value with the shift added
        self._raw_of: dict[int, list[int]] = {}  # group -> its raw tensors, in order
        self._index = {t.name: i for i, t in enumerate(manifest.tensors)}
        for i, t in enumerate(manifest.tensors):
            if t.kind == "planes":
                self._planes[i] = PlaneState(np.zeros(t.numel, np.int32), np.zeros(t.numel, bool), rows=t.shape[0])
            else:
                self._raw_of.setdefault(t.group, []).append(i)
        self._base: dict[int, np.ndarray] = {}  # delta: planes tensor -> the base's integers on its grid
        if manifest.base_sha256:
            self._start_from(base)

    def _start_from(self, base: Optional[Mapping[str, torch.Tensor]]) -> None:
        """A delta's starting point: the base's weights, checked against ``base_sha256`` before any chunk."""
        m = self.manifest
        if base is None or any(t.name not in base for t in m.tensors) or \
                state_digest((t, base[t.name]) for t in m.tensors) != m.base_sha256:
            raise ProgressiveError(f"manifest.base_sha256: the weights held are not this delta's base "
                                   f"({m.base_sha256[:12]}); refused before any chunk")
        for i, t in enumerate(m.tensors):
            if t.kind == "planes":
                assert t.scales is not None
                self._base[i] = base_integers(base[t.name], t.scales, m.bits - 1, t.zero_planes)
                self._values[i] = self._dequantize(i)
            else:
                self._values[i] = base[t.name].detach().cpu().clone()

    def apply(self, index: int, payload: bytes) -> list[str]:
        """Verify chunk ``index`` (it must be the next one) against its SHA-256 and decode it.

        Returns the names of the tensors that changed. Raises ProgressiveError, leaving the state unchanged
        when the hash or the position is wrong.
        """
        m = self.manifest
        if index != self.next_chunk or index >= len(m.chunks):
            raise ProgressiveError(f"chunk {index} out of order: expected chunk {self.next_chunk}")
        info = m.chunks[index]
        if len(payload) != info.size or hashlib.sha256(payload).hexdigest() != info.sha256:
            raise ProgressiveError(f"chunk {index}: SHA-256 mismatch (tampered or corrupt); refused")
        buf = io.BytesIO(payload)
        changed: set[int] = set()
        planes = {g: s.planes_known for g, s in self._planes.items()}
        for g, plane in info.units:
            if plane != planes[g]:
                raise ProgressiveError(f"chunk {index}: plane {plane} of {m.tensors[g].name} out of order")
            planes[g] += 1
        raw, high, shifts = dict(self._values), dict(self._high), dict(self._shifts)
        for g, plane in info.units:
            group_raw = self._raw_of.get(g, []) if plane in (0, m.raw_low_plane) else []
            for r in group_raw if plane == 0 else []:
                raw[r], high = self._read_first(r, buf, index, high)
            for r in [r for r in group_raw if r in high] if plane == m.raw_low_plane else []:
                raw[r] = self._read_low(r, buf, index, high.pop(r))
            changed.update(group_raw)
            decode_plane(self._planes[g], buf, m.planes, f"chunk {index} ({m.tensors[g].name})", m.plane_coder)
            changed.add(g)
            target = m.tensors[g].target
            if target is not None:
                self._read_shift(g, target, plane + 1, buf, index, shifts, raw)
                changed.add(target)
        if buf.read(1):
            raise ProgressiveError(f"chunk {index}: trailing bytes")
        self._values, self._high, self._shifts = raw, high, shifts
        for i in changed:
            if i in self._planes:
                self._values[i] = self._dequantize(i)
            elif i in shifts and i in raw:
                self._shown[i] = raw[i] + torch.from_numpy(shifts[i]).reshape(raw[i].shape)
            else:
                self._shown.pop(i, None)
        self.next_chunk += 1
        self.bytes += info.size
        return [m.tensors[i].name for i in sorted(changed)]

    def _read_shift(self, g: int, target: int, known: int, buf: io.BytesIO, index: int,
                    shifts: dict[int, np.ndarray], raw: dict[int, torch.Tensor]) -> None:
        """The output shift of layer ``g`` with ``known`` planes (sent while ``known <= corrected_planes``;
        past that, the weights are close enough and the target is left as sent). A shift coded in steps of a
        running_var's spread reads that tensor's current value (it travels with the layer's first plane)."""
        if known > self.manifest.corrected_planes:
            shifts.pop(target, None)
            return
        what = f"chunk {index} ({self.manifest.tensors[g].name} output shift)"
        channels = self.manifest.tensors[target].numel
        spread = self.manifest.tensors[g].spread
        step = None if spread is None else spread_step(raw[spread].numpy().reshape(-1))
        shift = shift_decode(read_section(buf, 4 + 2 * channels, what), channels, step)
        if shift is None:
            kind = "int16 codes" if step is not None else "int8 codes and a finite scale"
            raise ProgressiveError(f"{what}: not {channels} {kind}")
        shifts[target] = shift

    def _read_array(self, info: TensorInfo, buf: io.BytesIO, index: int, dtype: str) -> np.ndarray:
        itemsize = np.dtype(dtype).itemsize
        data = read_section(buf, 8 * info.numel, f"chunk {index} ({info.name})")
        if len(data) != itemsize * info.numel:
            raise ProgressiveError(f"chunk {index} ({info.name}): {len(data)} bytes for {info.numel} values")
        return np.frombuffer(unshuffle(data, itemsize), dtype).astype(dtype[1:])

    def _read_first(self, r: int, buf: io.BytesIO, index: int,
                    high: dict[int, np.ndarray]) -> tuple[torch.Tensor, dict[int, np.ndarray]]:
        """Raw tensor ``r`` from its first piece: integers whole, float32 high halves (low ones to come)."""
        info = self.manifest.tensors[r]
        if info.dtype in INT_CODES:
            return torch.from_numpy(self._read_array(info, buf, index, INT_CODES[info.dtype]).reshape(info.shape)), high
        high_half = self._read_array(info, buf, index, "<u2")
        return torch.from_numpy(join_halves(high_half, None).reshape(info.shape)), {**high, r: high_half}

    def _read_low(self, r: int, buf: io.BytesIO, index: int, high_half: np.ndarray) -> torch.Tensor:
        info = self.manifest.tensors[r]
        low_half = self._read_array(info, buf, index, "<u2")
        return torch.from_numpy(join_halves(high_half, low_half).reshape(info.shape))

    def _dequantize(self, i: int) -> torch.Tensor:
        info, state = self.manifest.tensors[i], self._planes[i]
        assert info.scales is not None
        rows = info.shape[0]
        offset = None if info.offsets is None else float(info.offsets[state.planes_known])
        missing = self.manifest.planes - state.planes_known
        mag, negative = state.mag.reshape(rows, -1), state.negative.reshape(rows, -1)
        if i in self._base:
            return torch.from_numpy(delta_values(self._base[i], mag, negative, info.scales, missing, offset)
                                    .reshape(info.shape))
        values = dequantize(mag, negative, info.scales, missing, offset)
        return torch.from_numpy(values.reshape(info.shape))

    def tensor(self, index: int) -> Optional[torch.Tensor]:
        """Current value of tensor ``index``: planes tensors are zeros before their first plane; a raw tensor
        is None until its chunk arrived."""
        if index in self._shown:
            return self._shown[index]
        if index in self._values:
            return self._values[index]
        if index in self._planes:
            return torch.zeros(self.manifest.tensors[index].shape)
        return None

    def state_dict(self) -> dict[str, Optional[torch.Tensor]]:
        """Every tensor by name (see ``tensor``)."""
        return {t.name: self.tensor(i) for i, t in enumerate(self.manifest.tensors)}

    def tensors(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors that have a value (e.g. those ``apply`` says changed), without building the rest."""
        out = {}
        for name in names:
            value = self.tensor(self._index[name])
            if value is not None:
                out[name] = value
        return out

    def digest(self) -> str:
        """``state_digest`` of the current weights (equals ``manifest.final_sha256`` once complete)."""
        pairs = []
        for i, t in enumerate(self.manifest.tensors):
            value = self.tensor(i)
            pairs.append((t, value if value is not None else torch.zeros(t.shape, dtype=DTYPES[t.dtype][0])))
        return state_digest(pairs)

    def progress(self) -> Progress:
        return progress_of(self.manifest, {i: s.planes_known for i, s in self._planes.items()}, self.next_chunk,
                           self.bytes)


def progress_of(m: Manifest, known: Mapping[int, int], chunks: int, received_bytes: int) -> Progress:
    """The progress of a decoder of ``m`` after ``chunks`` chunks (``received_bytes``) with ``known[g]`` planes of
    each planes tensor ``g`` (none given: 0)."""
    planes = [(t, known.get(i, 0)) for i, t in enumerate(m.tensors) if t.kind == "planes"]
    weights = sum(t.numel for t, _ in planes)
    received = sum(t.numel * k for t, k in planes) / max(1, weights * m.planes)
    head = [(t.numel, k) for t, k in planes if t.part == "head"]
    head_n = sum(n for n, _ in head)
    head_bits = sum(n * (1 + k if k else 0) for n, k in head) / head_n if head_n else 0.0
    return Progress(chunks, len(m.chunks), received_bytes, m.total_bytes, received, head_bits,
                    usable=chunks > m.usable_chunk, complete=chunks == len(m.chunks))
