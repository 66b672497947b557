"""Delta upgrades: a device that holds version v1 whole moves to v2 by receiving the difference of the quantised
weights, most valuable first, and ends bit-exact on the weights v2's own package would give it.

For every conv/linear weight, on v2's grid (its per-channel scales ``s2``): the device's weights ``w1`` (v1's package
weights, ``final_weights``) become integers ``a1 = round(w1 / s2)``; v2's are ``a2`` (sign-magnitude, as in a full
package); ``d = a2 - a1`` travels as sign-magnitude bit planes (``bits`` magnitude planes, since
``|d| <= 2 * (2**(bits-1) - 1)``; a ``bits + 1``-bit manifest), coded like any package's planes. With some planes of
``d`` the device holds ``(a1 + d_known + offset) * s2``; with all of them ``a2 * s2``, v2's weights exactly. A
fine-tuned v2 differs from v1 in its low bits only, so the top planes of ``d`` are nearly all zero and cost almost
nothing. Small tensors (BatchNorm, biases) travel whole as in a full package. The head's units come first (stage
``delta-head``: the manifest's ``usable_chunk`` ends it), so that a device switches to v2 only once its head is v2's
exactly and never sends the cloud v1's features under v2's name; then the rest (``delta-rest``); within each, units
go by value per byte (the drop of the layer's relative squared error to v2). The manifest names its base:
``base_sha256``, the ``state_digest`` of the weights the device must hold (any package of v1 at the same ``bits``
ends on them); a decoder given other weights refuses the delta before a byte is applied.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from models.identity import model_digest
from models.progressive.build import describe_tensors, raw_sections
from models.progressive.format import (DEFAULT_BITS, DEFAULT_CHUNK_BYTES, DEFAULT_USABLE_PLANES, PLANE_CODERS,
                                       Manifest, Package, TensorInfo, raw_low_plane)
from models.progressive.ordering import Units, greedy_by_value, pack_chunks
from models.progressive.planes import (base_integers, coarse_quantize, delta_values, dequantize, encode_plane,
                                       fill_offsets, quantize)

DELTA_ORDER = "delta"  # a delta package's order: the head's layers, then the rest, each by value per byte


def final_weights(state: Mapping[str, torch.Tensor], bits: int = DEFAULT_BITS, snr_db: float = 0.0
                  ) -> dict[str, torch.Tensor]:
    """What a device holds once every chunk of a ``bits``-bit package of ``state`` (built with ``snr_db``, see
    ``build_package``) arrived: the quantised conv/linear weights, every other tensor as it is."""
    out = {}
    for name, t in state.items():
        if t.dtype == torch.float32 and t.dim() >= 2:
            mag, neg, scales = quantize(t, bits, snr_db)
            out[name] = torch.from_numpy(dequantize(mag, neg, scales, 0).reshape(t.shape))
        else:
            out[name] = t.detach().cpu().clone()
    return out


def delta_units(state: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], infos: list[TensorInfo],
                bits: int, usable_planes: int, plane_coder: str, snr_db: float = 0.0) -> Units:
    """Every unit of the delta from ``base`` (the device's weights) to ``state``: ``bits`` magnitude planes of
    ``d`` per conv/linear weight (raw tensors whole with their group), and each layer's error after each plane."""
    planes = bits
    tensors = list(state.values())
    data: dict[tuple[int, int], bytes] = {}
    distortion: dict[int, list[float]] = {}
    out = []
    for i, info in enumerate(infos):
        if info.kind != "planes":
            out.append(info)
            continue
        mag2, neg2, scales, zero = coarse_quantize(tensors[i], bits, snr_db)
        a1 = base_integers(base[info.name], scales, bits, zero)
        d = np.where(neg2, -mag2, mag2) - a1
        mag, neg = np.abs(d), d < 0
        offsets = fill_offsets(mag, planes)
        out.append(TensorInfo(info.name, info.shape, info.dtype, info.kind, info.group, info.part, scales, offsets,
                              zero_planes=zero))
        target = dequantize(mag2, neg2, scales, 0).astype(np.float64)
        energy = np.maximum((target ** 2).sum(axis=1), 1e-30)
        errors = []
        for p in range(planes + 1):
            missing = planes - p
            approx = delta_values(a1, (mag >> missing) << missing, neg & ((mag >> missing) > 0), scales, missing,
                                  float(offsets[p]))
            errors.append(float((((target - approx) ** 2).sum(axis=1) / energy).mean()))
            if p < planes:
                data[(i, p)] = encode_plane(mag.reshape(-1), neg.reshape(-1), p, planes, plane_coder, mag.shape[0])
        distortion[i] = errors
    low_plane = raw_low_plane(bits + 1, usable_planes)
    for g, (first, low) in raw_sections(tensors, out).items():
        data[(g, low_plane)] = low + data[(g, low_plane)]
        data[(g, 0)] = first + data[(g, 0)]
    return Units(out, data, distortion)


def build_delta_package(
    state: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], metadata: dict, model_id: str,
    model_version: str, split_point: int, exit_points: list[int], bits: int = DEFAULT_BITS,
    usable_planes: int = DEFAULT_USABLE_PLANES, chunk_bytes: int = DEFAULT_CHUNK_BYTES, plane_coder: str = "zstd",
    snr_db: float = 0.0,
) -> Package:
    """A package that takes a device holding ``base`` (``final_weights`` of v1 at ``bits``) to ``state`` (v2,
    the same architecture). Its manifest has ``bits + 1`` bits, order ``delta`` and ``base_sha256``; its
    ``final_sha256`` is that of v2's own ``bits``-bit package built with ``snr_db``. Raises ValueError when a tensor's name, shape or
    dtype differs from the base's, or for an unknown plane coder."""
    from models.progressive.decoder import Decoder, state_digest

    if plane_coder not in PLANE_CODERS:
        raise ValueError(f"plane_coder must be one of {PLANE_CODERS}, got {plane_coder!r}")
    if list(state) != list(base) or any(state[n].shape != base[n].shape or state[n].dtype != base[n].dtype
                                        for n in state):
        raise ValueError("a delta needs a base of the same architecture (tensor names, shapes and dtypes)")
    bottleneck = (metadata.get("model_config") or {}).get("bottleneck")
    infos = describe_tensors(dict(state), split_point, exit_points, {},
                             bottleneck["split_point"] if bottleneck else None)
    units = delta_units(state, base, infos, bits, usable_planes, plane_coder, snr_db)
    stages = [(f"delta-{part}", greedy_by_value(units, dict.fromkeys(
        [i for i, t in enumerate(units.infos) if t.kind == "planes" and t.part == part], 0), bits))
        for part in ("head", "rest")]
    chunks, payloads = pack_chunks(stages, units, chunk_bytes, bits + 1, usable_planes)
    manifest = Manifest(model_id, model_version, metadata, bits + 1, DELTA_ORDER, split_point, usable_planes,
                        units.infos, chunks, final_sha256="", model_digest=model_digest(metadata, dict(state)),
                        plane_coder=plane_coder,
                        base_sha256=state_digest((t, base[t.name]) for t in units.infos))
    decoder = Decoder(manifest, base)
    for i, payload in enumerate(payloads):
        decoder.apply(i, payload)
    manifest.final_sha256 = decoder.digest()
    target = final_weights(state, bits, snr_db)
    if manifest.final_sha256 != state_digest((t, target[t.name]) for t in units.infos):
        raise AssertionError("delta package does not end on the target's package weights")  # a bug, not input
    head = [c.index for c in chunks if c.stage == "delta-head"]
    manifest.usable_chunk = head[-1] if head else -1
    return Package(manifest, payloads)


def weights_digest(state: Mapping[str, torch.Tensor], bits: int = DEFAULT_BITS, snr_db: float = 0.0) -> str:
    """The ``final_sha256`` of every ``bits``-bit package of ``state`` built with ``snr_db`` (whatever its split
    point, order or chunk size): what a device that holds it complete says it holds, and a delta from it names as
    its base."""
    from models.progressive.decoder import named_digest

    return named_digest(final_weights(state, bits, snr_db).items())
