"""The progressive package's manifest <-> ``spinn.v1.Manifest`` (models/progressive/ holds the coding).

A manifest comes from the network, so the device validates all of it before it stores or builds anything
(``manifest_from_message``): every field in range, names that can never become a path, metadata of bounded
size and depth, tensor names and shapes exactly those the metadata's model config builds, sizes bounded by
``max_package_bytes``, and the package digest recomputed. A manifest that fails is refused whole with a
ProgressiveError naming the field.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Callable, Optional

import numpy as np
import torch

from models.identity import check_digest
from models.progressive import ORDERS, PLANE_CODERS, ChunkInfo, Manifest, ProgressiveError, TensorInfo
from models.progressive.delta import DELTA_ORDER
from proto import spinn_v1_pb2 as pb

#: A model id or version label: what may name a model, never a path (no "/", no "..", no NUL, bounded).
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_METADATA_BYTES = 1 << 20
MAX_METADATA_DEPTH = 32
MAX_TENSORS = 4096
MAX_CHUNKS = 1 << 16
MAX_STAGE_CHARS = 64
#: Default bound of a package's bytes and of its decoded float32 weights (a device's ``max_package_bytes``).
DEFAULT_MAX_PACKAGE_BYTES = 256 << 20


def check_name(value: str, field: str) -> str:
    """``value`` when it can name a model (``NAME``: letters, digits, ``_ . -``, at most 64, not starting with a
    dot, so never a path), else ProgressiveError naming ``field``."""
    if not NAME.match(value) or ".." in value:
        shown = value if len(value) <= 80 else value[:80] + "..."
        raise ProgressiveError(f"{field}: {shown!r} is not a name (letters, digits, '_', '.', '-'; at most 64; "
                               "no '..')")
    return value


def package_digest_of(msg: pb.Manifest) -> str:
    """Hex SHA-256 of ``msg`` serialized deterministically with ``package_digest`` and ``signature`` empty: the
    package's identity (chunks and final weights are bound to it by their hashes)."""
    bare = pb.Manifest()
    bare.CopyFrom(msg)
    bare.package_digest = ""
    bare.signature = b""
    return hashlib.sha256(bare.SerializeToString(deterministic=True)).hexdigest()


def seal(manifest: Manifest, sign: Optional[Callable[[str], bytes]] = None) -> Manifest:
    """Give ``manifest`` (a built package's) its package digest and, with ``sign`` (``Signer.sign``), its
    signature; returns it."""
    manifest.package_digest, manifest.signature = "", b""
    manifest.package_digest = package_digest_of(manifest_message(manifest))
    if sign is not None:
        manifest.signature = sign(manifest.package_digest)
    return manifest


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
                                shift_spread=0 if t.spread is None else t.spread + 1, zero_planes=t.zero_planes)
                 for t in m.tensors],
        corrected_planes=m.corrected_planes,
        chunks=[pb.ChunkEntry(index=c.index, unit_groups=[g for g, _ in c.units],
                              unit_planes=[p for _, p in c.units], raw=list(c.raw), size=c.size, sha256=c.sha256,
                              stage=c.stage)
                for c in m.chunks],
        package_digest=m.package_digest, signature=m.signature,
        plane_coder="" if m.plane_coder == "zstd" else m.plane_coder,  # empty: what packages before it used
        base_sha256=m.base_sha256,
    )


def _tensor(i: int, t: pb.TensorEntry, count: int, bits: int, max_zero: int) -> TensorInfo:
    where = f"manifest.tensors[{i}]"
    if t.dtype not in ("float32", "int64", "int32") or any(d < 0 for d in t.shape) or not 0 <= t.group < count:
        raise ProgressiveError(f"{where}: bad dtype, shape or group ({t.name!r})")
    scales = offsets = None
    if not 0 <= t.zero_planes <= (max_zero if t.planes else 0):
        raise ProgressiveError(f"{where}.zero_planes: {t.zero_planes} is outside 0..{max_zero if t.planes else 0} "
                               f"({t.name!r})")
    if t.planes:
        if not t.shape or len(t.scales) != 4 * t.shape[0]:
            raise ProgressiveError(f"{where}.scales: need one float32 per output channel ({t.name!r})")
        scales = np.frombuffer(t.scales, "<f4").astype(np.float32)
        offsets = _offsets(t.offsets, bits, f"{where}.offsets ({t.name!r})")
    return TensorInfo(t.name, tuple(t.shape), t.dtype, "planes" if t.planes else "raw", t.group, t.part, scales,
                      offsets, t.shift_target - 1 if t.planes and t.shift_target else None,
                      t.shift_spread - 1 if t.planes and t.shift_target and t.shift_spread else None, t.zero_planes)


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


def manifest_from_message(msg: pb.Manifest, max_package_bytes: int = DEFAULT_MAX_PACKAGE_BYTES) -> Manifest:
    """Parse and check a manifest from the wire (all of it; see the module docstring). Raises ProgressiveError
    naming the bad field."""
    _check_header(msg)
    metadata = _metadata(msg.metadata_json)
    if len(msg.tensors) > MAX_TENSORS or len(msg.chunks) > MAX_CHUNKS:
        raise ProgressiveError(f"manifest: {len(msg.tensors)} tensors and {len(msg.chunks)} chunks (at most "
                               f"{MAX_TENSORS} and {MAX_CHUNKS})")
    # zero planes of the weights' own grid: a delta's manifest has one plane more than that grid
    max_zero = msg.bits - (3 if msg.order == DELTA_ORDER else 2)
    tensors = [_tensor(i, t, len(msg.tensors), msg.bits, max_zero) for i, t in enumerate(msg.tensors)]
    _check_targets(tensors, msg.corrected_planes, msg.bits)
    float32_bytes = sum(4 * t.numel for t in tensors)
    if float32_bytes > max_package_bytes:
        raise ProgressiveError(f"manifest.tensors: {float32_bytes:,} bytes of weights, over max_package_bytes "
                               f"({max_package_bytes:,})")
    chunks = _chunks(msg, tensors, max_package_bytes)
    if not -1 <= msg.usable_chunk < len(chunks):
        raise ProgressiveError(f"manifest.usable_chunk: {msg.usable_chunk} is outside -1..{len(chunks) - 1}")
    _check_against_config(metadata, tensors, msg.split_point)
    plane_coder = msg.plane_coder or "zstd"
    if plane_coder not in PLANE_CODERS:
        raise ProgressiveError(f"manifest.plane_coder: {plane_coder[:40]!r} is not one of {', '.join(PLANE_CODERS)}")
    if msg.package_digest != package_digest_of(msg):
        raise ProgressiveError("manifest.package_digest: not the digest of this manifest")
    return Manifest(msg.model.model_id, msg.model.model_version, metadata, msg.bits, msg.order, msg.split_point,
                    msg.usable_planes, tensors, chunks, msg.final_sha256, msg.usable_chunk, msg.corrected_planes,
                    msg.model.digest, msg.package_digest, msg.signature, plane_coder, msg.base_sha256)


def _check_header(msg: pb.Manifest) -> None:
    check_name(msg.model.model_id, "manifest.model.model_id")
    check_name(msg.model.model_version, "manifest.model.model_version")
    try:
        check_digest(msg.model.digest, "manifest.model.digest")
        check_digest(msg.final_sha256, "manifest.final_sha256")
        check_digest(msg.package_digest, "manifest.package_digest")
    except ValueError as err:
        raise ProgressiveError(str(err)) from None
    if msg.order not in (*ORDERS, DELTA_ORDER):
        raise ProgressiveError(f"manifest.order: {msg.order[:80]!r} is not one of {(*ORDERS, DELTA_ORDER)}")
    if (msg.order == DELTA_ORDER) != bool(msg.base_sha256):
        raise ProgressiveError("manifest.base_sha256: a delta package (order 'delta') names its base, no other does")
    if msg.base_sha256:
        try:
            check_digest(msg.base_sha256, "manifest.base_sha256")
        except ValueError as err:
            raise ProgressiveError(str(err)) from None
    if not 2 <= msg.bits <= 24:
        raise ProgressiveError(f"manifest.bits: {msg.bits} is outside 2..24")
    if not 1 <= msg.usable_planes <= msg.bits - 1:
        raise ProgressiveError(f"manifest.usable_planes: {msg.usable_planes} is outside 1..{msg.bits - 1}")
    if not 0 <= msg.split_point <= 1024:
        raise ProgressiveError(f"manifest.split_point: {msg.split_point} is outside 0..1024")


def _metadata(text: str) -> dict:
    """The metadata JSON object, bounded in size and nesting before it is parsed (Python's parser recurses: a
    deeply nested document would exhaust the stack)."""
    if len(text) > MAX_METADATA_BYTES:
        raise ProgressiveError(f"manifest.metadata_json: {len(text):,} characters (at most {MAX_METADATA_BYTES:,})")
    depth = _nesting(text)
    if depth > MAX_METADATA_DEPTH:
        raise ProgressiveError(f"manifest.metadata_json: nested {depth} deep (at most {MAX_METADATA_DEPTH})")
    try:
        metadata = json.loads(text)
    except ValueError as err:
        raise ProgressiveError(f"manifest.metadata_json: {err}") from None
    if not isinstance(metadata, dict):
        raise ProgressiveError("manifest.metadata_json: not a JSON object")
    return metadata


def _nesting(text: str) -> int:
    """The deepest nesting of ``[`` and ``{`` outside strings."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _chunks(msg: pb.Manifest, tensors: list[TensorInfo], max_package_bytes: int) -> list[ChunkInfo]:
    chunks, total = [], 0
    for i, c in enumerate(msg.chunks):
        units = tuple(zip(c.unit_groups, c.unit_planes))
        if c.index != i or len(c.unit_groups) != len(c.unit_planes) or any(
                not 0 <= g < len(tensors) or tensors[g].kind != "planes" or not 0 <= p < msg.bits - 1
                for g, p in units) or any(not 0 <= r < len(tensors) for r in c.raw) or \
                not re.fullmatch(r"[0-9a-f]{64}", c.sha256) or c.size <= 0 or not (units or c.raw) or \
                len(c.stage) > MAX_STAGE_CHARS:
            raise ProgressiveError(f"manifest.chunks[{i}]: malformed")
        total += c.size
        if total > max_package_bytes:
            raise ProgressiveError(f"manifest.chunks: over {max_package_bytes:,} bytes in all (max_package_bytes)")
        chunks.append(ChunkInfo(c.index, units, tuple(c.raw), c.size, c.sha256, c.stage))
    return chunks


def _check_against_config(metadata: dict, tensors: list[TensorInfo], split_point: int) -> None:
    """The tensors must be exactly the state dict the metadata's model config builds (names, shapes, dtypes),
    built on the meta device (no memory), and the split point one of its boundaries."""
    if "model_config" not in metadata:
        raise ProgressiveError("manifest.metadata_json: no model_config")
    try:
        expected, blocks = _expected_state(metadata["model_config"])
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError, OverflowError, MemoryError) as err:
        raise ProgressiveError(f"manifest.metadata_json: not a model this device can build ({err})") from None
    got = {t.name: (tuple(t.shape), t.dtype) for t in tensors}
    if len(got) != len(tensors) or got != expected:
        names = sorted(set(got) ^ set(expected)) or sorted(n for n in got if got[n] != expected.get(n)) or ["?"]
        raise ProgressiveError(f"manifest.tensors: not what the metadata's model config builds (first difference: "
                               f"{names[0][:80]!r})")
    if not 0 <= split_point <= blocks:
        raise ProgressiveError(f"manifest.split_point: {split_point} is outside 0..{blocks}")


def _expected_state(model_config: dict) -> tuple[dict[str, tuple[tuple[int, ...], str]], int]:
    """Name -> (shape, dtype) of the state dict ``model_config`` builds (on the meta device: no memory), and its
    block count. Raises ConfigError (a ValueError) and whatever a nonsensical config makes the constructor raise."""
    from models.config import from_dict
    from models.early_exit import EarlyExitMobileNetV2, ModelConfig

    config = from_dict(ModelConfig, model_config, source="manifest model_config")
    with torch.device("meta"):
        model = EarlyExitMobileNetV2(config, exit_points=[int(k) for k in config.exits])
    state = {name: (tuple(t.shape), str(t.dtype).removeprefix("torch."))
             for name, t in model.state_dict().items()}
    return state, model.num_blocks
