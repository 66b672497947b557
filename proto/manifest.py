"""The progressive package's manifest <-> ``spinn.v1.Manifest`` (models/progressive.py holds the coding)."""

from __future__ import annotations

import json

import numpy as np

from models.identity import check_digest
from models.progressive import ChunkInfo, Manifest, ProgressiveError, TensorInfo
from proto import spinn_v1_pb2 as pb


def manifest_message(m: Manifest) -> pb.Manifest:
    """The wire form of a manifest."""
    return pb.Manifest(
        model=pb.ModelRef(model_id=m.model_id, model_version=m.model_version, digest=m.model_digest),
        metadata_json=json.dumps(m.metadata), bits=m.bits, order=m.order, split_point=m.split_point,
        usable_planes=m.usable_planes, usable_chunk=m.usable_chunk, final_sha256=m.final_sha256,
        tensors=[pb.TensorEntry(name=t.name, shape=list(t.shape), dtype=t.dtype, planes=t.kind == "planes",
                                group=t.group, part=t.part,
                                scales=b"" if t.scales is None else t.scales.astype("<f4").tobytes(),
                                offsets=b"" if t.offsets is None else t.offsets.astype("<f4").tobytes(),
                                shift_target=0 if t.target is None else t.target + 1,
                                shift_spread=0 if t.spread is None else t.spread + 1)
                 for t in m.tensors],
        corrected_planes=m.corrected_planes,
        chunks=[pb.ChunkEntry(index=c.index, unit_groups=[g for g, _ in c.units],
                              unit_planes=[p for _, p in c.units], raw=list(c.raw), size=c.size, sha256=c.sha256,
                              stage=c.stage)
                for c in m.chunks],
    )


def _tensor(i: int, t: pb.TensorEntry, count: int, bits: int) -> TensorInfo:
    where = f"manifest.tensors[{i}]"
    if t.dtype not in ("float32", "int64") or any(d < 0 for d in t.shape) or not 0 <= t.group < count:
        raise ProgressiveError(f"{where}: bad dtype, shape or group ({t.name!r})")
    scales = offsets = None
    if t.planes:
        if not t.shape or len(t.scales) != 4 * t.shape[0]:
            raise ProgressiveError(f"{where}.scales: need one float32 per output channel ({t.name!r})")
        scales = np.frombuffer(t.scales, "<f4").astype(np.float32)
        offsets = _offsets(t.offsets, bits, f"{where}.offsets ({t.name!r})")
    return TensorInfo(t.name, tuple(t.shape), t.dtype, "planes" if t.planes else "raw", t.group, t.part, scales,
                      offsets, t.shift_target - 1 if t.planes and t.shift_target else None,
                      t.shift_spread - 1 if t.planes and t.shift_target and t.shift_spread else None)


def _check_targets(tensors: list[TensorInfo], corrected_planes: int, bits: int) -> None:
    if not 0 <= corrected_planes <= bits - 2:
        raise ProgressiveError(f"manifest.corrected_planes: {corrected_planes} is outside 0..{bits - 2}")
    for i, t in enumerate(tensors):
        if t.target is None:
            continue
        target = tensors[t.target] if 0 <= t.target < len(tensors) else None
        if target is None or target.kind != "raw" or target.dtype != "float32" or target.group != i or \
                target.numel != t.shape[0]:
            raise ProgressiveError(f"manifest.tensors[{i}].shift_target: not a float32 tensor of its group with "
                                   f"one value per output channel ({t.name!r})")
        spread = None if t.spread is None else tensors[t.spread] if 0 <= t.spread < len(tensors) else False
        if spread is False or spread is not None and (
                spread.kind != "raw" or spread.dtype != "float32" or spread.group != i or spread.numel != t.shape[0]
                or t.spread == t.target):
            raise ProgressiveError(f"manifest.tensors[{i}].shift_spread: not another float32 tensor of its group "
                                   f"with one value per output channel ({t.name!r})")


def _offsets(data: bytes, bits: int, where: str) -> np.ndarray | None:
    if not data:
        return None
    if len(data) != 4 * bits:
        raise ProgressiveError(f"{where}: need {bits} float32 values, got {len(data)} bytes")
    offsets = np.frombuffer(data, "<f4").astype(np.float32)
    top = 2.0 ** (bits - 1 - np.arange(bits)) - 1  # the largest value the missing bits can take
    if not np.all(np.isfinite(offsets)) or np.any(offsets < 0) or np.any(offsets > top):
        raise ProgressiveError(f"{where}: values outside [0, 2**missing - 1]")
    return offsets


def manifest_from_message(msg: pb.Manifest) -> Manifest:
    """Parse and check a manifest from the wire; raises ProgressiveError naming the bad field."""
    try:
        metadata = json.loads(msg.metadata_json)
    except ValueError as err:
        raise ProgressiveError(f"manifest.metadata_json: {err}") from None
    if not isinstance(metadata, dict):
        raise ProgressiveError("manifest.metadata_json: not a JSON object")
    if not 2 <= msg.bits <= 24:
        raise ProgressiveError(f"manifest.bits: {msg.bits} is outside 2..24")
    tensors = [_tensor(i, t, len(msg.tensors), msg.bits) for i, t in enumerate(msg.tensors)]
    _check_targets(tensors, msg.corrected_planes, msg.bits)
    chunks = []
    for i, c in enumerate(msg.chunks):
        units = tuple(zip(c.unit_groups, c.unit_planes))
        if c.index != i or len(c.unit_groups) != len(c.unit_planes) or any(
                not 0 <= g < len(tensors) or tensors[g].kind != "planes" or not 0 <= p < msg.bits - 1
                for g, p in units) or any(not 0 <= r < len(tensors) for r in c.raw) or len(c.sha256) != 64 \
                or c.size <= 0 or not (units or c.raw):
            raise ProgressiveError(f"manifest.chunks[{i}]: malformed")
        chunks.append(ChunkInfo(c.index, units, tuple(c.raw), c.size, c.sha256, c.stage))
    try:
        digest = check_digest(msg.model.digest, "manifest.model.digest")
    except ValueError as err:
        raise ProgressiveError(str(err)) from None
    return Manifest(msg.model.model_id, msg.model.model_version, metadata, msg.bits, msg.order, msg.split_point,
                    msg.usable_planes, tensors, chunks, msg.final_sha256, msg.usable_chunk, msg.corrected_planes,
                    digest)
