"""Building a package from a state dict: which tensors are the head's, the coded units, the chunks."""

from __future__ import annotations

import math
import numbers
from typing import Optional

import numpy as np
import torch

from models.bias_correction import BiasInput, output_shift, shift_code, spread_step
from models.identity import model_digest
from models.progressive.decoder import Decoder
from models.progressive.format import (DEFAULT_BITS, DEFAULT_CHUNK_BYTES, DEFAULT_CORRECTED_PLANES,
                                       DEFAULT_USABLE_PLANES, ORDERS, PLANE_CODERS, Manifest, Package, TensorInfo,
                                       raw_low_plane)
from models.progressive.ordering import Units, pack_chunks, stages
from models.progressive.planes import coarse_quantize, dequantize, encode_plane, fill_offsets
from models.progressive.sections import halves, raw_bytes, section, shuffle

def tensor_part(name: str, split_point: int, exit_points: list[int], bottleneck_split: Optional[int] = None) -> str:
    """``head`` for blocks before ``split_point``, the exits at boundaries <= it and, when the bottleneck sits at
    ``bottleneck_split`` <= it, the bottleneck's encoder, prior and frequency table (all a device needs to send its
    code); else ``rest`` (the bottleneck's decoder always: only the cloud runs it)."""
    parts = name.split(".")
    if parts[0] == "features" and int(parts[1]) < split_point:
        return "head"
    if parts[0] == "exits" and exit_points[int(parts[1])] <= split_point:
        return "head"
    if parts[0] == "bottleneck" and parts[1] != "decoder" and bottleneck_split is not None \
            and bottleneck_split <= split_point:
        return "head"
    return "rest"


def describe_tensors(state: dict[str, torch.Tensor], split_point: int, exit_points: list[int],
                     scales: dict[str, np.ndarray], bottleneck_split: Optional[int] = None) -> list[TensorInfo]:
    """TensorInfo for every state-dict entry: floating tensors of >= 2 dims are ``planes``, the rest ``raw`` and
    grouped with the planes tensor before them (in state-dict order) when it is of the same part, else with the
    next one of their part: a bottleneck's frequency table, a buffer of its own module, comes right after the
    exits in the state dict but must travel with the head."""
    kinds = []
    for name, t in state.items():
        if t.dtype not in (torch.float32, torch.int64, torch.int32):
            raise ValueError(f"tensor {name!r}: dtype {t.dtype} is not float32, int64 or int32")
        kinds.append("planes" if t.dtype == torch.float32 and t.dim() >= 2 else "raw")
    if "planes" not in kinds:
        raise ValueError("the state dict has no conv/linear weight to code")
    parts = [tensor_part(name, split_point, exit_points, bottleneck_split) for name in state]
    planes = [i for i, kind in enumerate(kinds) if kind == "planes"]
    infos = []
    for i, ((name, t), kind) in enumerate(zip(state.items(), kinds)):
        infos.append(TensorInfo(name, tuple(t.shape), str(t.dtype).removeprefix("torch."), kind,
                                i if kind == "planes" else _raw_group(i, planes, parts), parts[i], scales.get(name)))
    return infos


def _raw_group(i: int, planes: list[int], parts: list[str]) -> int:
    """The planes tensor raw tensor ``i`` travels with: the one before it if of its part, else the next one of
    its part, else the one before (else the first)."""
    before = [g for g in planes if g < i]
    if before and parts[before[-1]] == parts[i]:
        return before[-1]
    after = next((g for g in planes if g > i and parts[g] == parts[i]), None)
    if after is not None:
        return after
    return before[-1] if before else planes[0]


def _shift_target(i: int, infos: list[TensorInfo], bias: dict[str, BiasInput]) -> Optional[int]:
    """Index of the tensor that takes planes tensor ``i``'s output shift: a float32 raw tensor of its group with
    one value per output channel (where the checkpoint's layout is another, no correction)."""
    b = bias.get(infos[i].name)
    for t, info in enumerate(infos):
        if b is not None and info.name == b.target and info.group == i and info.kind == "raw" and \
                info.dtype == "float32" and info.shape == (infos[i].shape[0],) and \
                b.mean.shape == (infos[i].shape[1] * b.groups if len(infos[i].shape) > 1 else 0,):
            return t
    return None


def _spread_index(i: int, infos: list[TensorInfo], bias: dict[str, BiasInput]) -> Optional[int]:
    """Index of the running_var of planes tensor ``i``'s BatchNorm: a float32 raw tensor of its group with one
    value per output channel (None: the shift is coded with a per-layer scale)."""
    b = bias.get(infos[i].name)
    for t, info in enumerate(infos):
        if b is not None and b.spread is not None and info.name == b.spread and info.group == i and \
                info.kind == "raw" and info.dtype == "float32" and info.shape == (infos[i].shape[0],):
            return t
    return None


def code_units(state: dict[str, torch.Tensor], infos_no_scales: list[TensorInfo], bits: int,
                usable_planes: int, bias: Optional[dict[str, BiasInput]] = None, corrected_planes: int = 0,
                plane_coder: str = "zstd", snr_db: float = 0.0) -> Units:
    """Every unit's bytes (a layer's plane, with its group's raw tensors and output shifts) and each layer's
    distortion after every plane; ``infos`` come back with their scales, offsets and shift targets. ``snr_db``:
    see ``quantize``."""
    planes = bits - 1
    bias = bias or {}
    data: dict[tuple[int, int], bytes] = {}
    distortion: dict[int, list[float]] = {}
    infos = []
    tensors = list(state.values())
    for i, info in enumerate(infos_no_scales):
        if info.kind != "planes":
            infos.append(info)
            continue
        mag, neg, scales, zero = coarse_quantize(tensors[i], bits, snr_db)
        offsets = fill_offsets(mag, planes)
        target = _shift_target(i, infos_no_scales, bias)
        spread = _spread_index(i, infos_no_scales, bias) if target is not None else None
        step = None if spread is None else spread_step(tensors[spread].detach().cpu().numpy())
        infos.append(TensorInfo(info.name, info.shape, info.dtype, info.kind, info.group, info.part, scales,
                                offsets, target, spread, zero))
        w = tensors[i].detach().cpu().double().reshape(mag.shape[0], -1).numpy()
        energy = np.maximum((w ** 2).sum(axis=1), 1e-30)
        flat_mag, flat_neg = mag.reshape(-1), neg.reshape(-1)
        errors = []
        for p in range(planes + 1):
            missing = planes - p
            approx = dequantize((mag >> missing) << missing, neg, scales, missing, float(offsets[p]))
            errors.append(float((((w - approx) ** 2).sum(axis=1) / energy).mean()))
            if p < planes:
                data[(i, p)] = encode_plane(flat_mag, flat_neg, p, planes, plane_coder, mag.shape[0])
            if target is not None and 1 <= p <= corrected_planes:  # travels with the unit that makes p planes
                b = bias[info.name]
                shift = b.sign * output_shift((approx - w).reshape(info.shape), b.mean, b.groups)
                data[(i, p - 1)] += section(shift_code(shift, step))
        distortion[i] = errors
    low_plane = raw_low_plane(bits, usable_planes)
    for g, (first, low) in raw_sections(tensors, infos).items():  # decoded before the plane, first then low
        data[(g, low_plane)] = low + data[(g, low_plane)]
        data[(g, 0)] = first + data[(g, 0)]
    return Units(infos, data, distortion)


def check_layer_weights(infos: list[TensorInfo], layer_weights: dict[str, float]) -> dict[str, float]:
    """``layer_weights`` as floats, one for every planes tensor of ``infos``. Raises ValueError naming a planes
    tensor without one, a name that is no planes tensor, or a weight that is not a finite real number >= 0
    (a bool is refused: it is more likely a mistake than a weight)."""
    names = [t.name for t in infos if t.kind == "planes"]
    unknown = sorted(set(layer_weights) - set(names))
    if unknown:
        raise ValueError(f"layer_weights: {unknown[0]!r} is not a coded weight tensor of this state dict")
    out = {}
    for name in names:
        if name not in layer_weights:
            raise ValueError(f"layer_weights: no weight for tensor {name!r}")
        weight = layer_weights[name]
        try:
            value = float(weight) if isinstance(weight, numbers.Real) and not isinstance(weight, bool) else None
        except OverflowError:
            value = None
        if value is None or not math.isfinite(value) or value < 0:
            raise ValueError(f"layer_weights[{name!r}]: must be a finite number >= 0, got {weight!r}")
        out[name] = value
    return out


def weigh_distortion(units: Units, layer_weights: dict[str, float]) -> None:
    """Scale each layer's distortion in ``units`` (in place) by its weight (``check_layer_weights``'s)."""
    for g in units.distortion:
        units.distortion[g] = [d * layer_weights[units.infos[g].name] for d in units.distortion[g]]


def raw_sections(tensors: list[torch.Tensor], infos: list[TensorInfo]) -> dict[int, tuple[bytes, bytes]]:
    """Per group, the sections its raw tensors add to its first plane (integer tensors whole, float32 high
    halves) and to its ``raw_low_plane`` (float32 low halves), in tensor order."""
    out: dict[int, tuple[bytes, bytes]] = {}
    for t, info in zip(tensors, infos):
        if info.kind != "raw":
            continue
        first, low = out.get(info.group, (b"", b""))
        if info.dtype == "float32":
            high_half, low_half = halves(t)
            first += section(shuffle(high_half.astype("<u2").tobytes(), 2))
            low += section(shuffle(low_half.astype("<u2").tobytes(), 2))
        else:
            first += section(shuffle(raw_bytes(t), t.element_size()))
        out[info.group] = (first, low)
    return out


def build_package(
    state: dict[str, torch.Tensor], metadata: dict, model_id: str, model_version: str, split_point: int,
    exit_points: list[int], order: str = "split", bits: int = DEFAULT_BITS,
    usable_planes: int = DEFAULT_USABLE_PLANES, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    bias: Optional[dict[str, BiasInput]] = None, corrected_planes: int = DEFAULT_CORRECTED_PLANES,
    plane_coder: str = "zstd", snr_db: float = 0.0, layer_weights: Optional[dict[str, float]] = None,
) -> Package:
    """Code ``state`` (an EarlyExitMobileNetV2 state dict) into a progressive package for ``split_point``.

    ``metadata`` is stored as is in the manifest (the checkpoint's model_config, class_names, preprocess); the
    manifest names the content digest of ``metadata`` and ``state`` (models/identity.py), the model delivered.
    ``bias`` (``models.bias_correction.bias_inputs``; None: no correction) makes each layer's first
    ``corrected_planes`` planes carry the output shift of the weights known so far. ``plane_coder``: how each
    plane's sections are coded (``PLANE_CODERS``). ``snr_db`` > 0: each layer's final precision is the coarsest
    grid that keeps every output channel's signal to quantisation noise at least that (``quantize``); the planes
    below it are all zero, nearly free, and the final weights are that grid's. ``layer_weights`` (every planes
    tensor's name -> a finite weight >= 0; None: all 1): what a unit of each layer's relative squared error costs
    in the stages that choose by value per byte (``ordering.stages``: the ``value`` and ``whole`` orders past
    their plane-by-plane stages; the ``split`` order has none and ignores them), e.g. a measured sensitivity of
    the output; they change the order only, never the final weights.
    Raises ValueError for an unknown order or plane coder, bits outside 2..24, a negative corrected_planes, a tensor
    of another dtype or bad ``layer_weights`` (``check_layer_weights``).
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if plane_coder not in PLANE_CODERS:
        raise ValueError(f"plane_coder must be one of {PLANE_CODERS}, got {plane_coder!r}")
    if not 2 <= bits <= 24:
        raise ValueError(f"bits must be in 2..24, got {bits}")
    if not 1 <= usable_planes <= bits - 1:
        raise ValueError(f"usable_planes must be in 1..{bits - 1}, got {usable_planes}")
    if corrected_planes < 0:
        raise ValueError(f"corrected_planes must be >= 0, got {corrected_planes}")
    corrected_planes = min(corrected_planes, bits - 2) if bias else 0  # the last plane never carries a shift
    bottleneck = (metadata.get("model_config") or {}).get("bottleneck")
    infos = describe_tensors(state, split_point, exit_points, {}, bottleneck["split_point"] if bottleneck else None)
    weights = None if layer_weights is None else check_layer_weights(infos, layer_weights)
    units = code_units(state, infos, bits, usable_planes, bias or {}, corrected_planes, plane_coder, snr_db)
    if weights is not None:
        weigh_distortion(units, weights)
    chunks, payloads = pack_chunks(stages(units, order, bits - 1, usable_planes), units, chunk_bytes, bits,
                                    usable_planes)
    manifest = Manifest(model_id, model_version, metadata, bits, order, split_point, usable_planes, units.infos,
                        chunks, final_sha256="", corrected_planes=corrected_planes,
                        model_digest=model_digest(metadata, state), plane_coder=plane_coder)
    decoder = Decoder(manifest)
    for i, payload in enumerate(payloads):
        decoder.apply(i, payload)
    manifest.final_sha256 = decoder.digest()
    manifest.usable_chunk = usable_chunk(manifest)
    return Package(manifest, payloads)


def usable_chunk(manifest: Manifest) -> int:
    """Index of the first chunk after which every head layer has ``usable_planes`` planes (-1: no head)."""
    need = {g for g in manifest.groups() if manifest.tensors[g].part == "head"}
    known = dict.fromkeys(need, 0)
    if not need:
        return -1
    for chunk in manifest.chunks:
        for g, _ in chunk.units:
            if g in known:
                known[g] += 1
        if all(k >= manifest.usable_planes for k in known.values()):
            return chunk.index
    return len(manifest.chunks) - 1
