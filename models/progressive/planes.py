"""Sign-magnitude bit planes of one weight tensor: quantisation, reconstruction, and one plane's three sections
(significance of weights still zero, their signs, refinement of the others) coded and decoded."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from models.progressive.context import (REFINEMENT_CONTEXTS, SIGN_CONTEXTS, SIGNIFICANCE_CONTEXTS, decode_section,
                                        encode_section, plane_contexts)
from models.progressive.sections import read_section, section, unpack_bits

def quantize(weight: torch.Tensor, bits: int, snr_db: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``coarse_quantize`` without the count of zero planes."""
    mag, negative, scales, _ = coarse_quantize(weight, bits, snr_db)
    return mag, negative, scales


def coarse_quantize(weight: torch.Tensor, bits: int, snr_db: float = 0.0
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Per-output-channel sign-magnitude quantisation of ``weight (C_out, ...)``.

    Returns ``(magnitude int64 (C_out, K), negative bool (C_out, K), scales float32 (C_out,), k)`` with
    ``K = numel / C_out`` and magnitudes in ``[0, 2**(bits-1) - 1]``. With ``snr_db`` > 0 the magnitudes of a
    weight that is not a depthwise kernel are rounded to multiples of ``2**k``, ``k`` (``coarse_planes``) the most
    low planes it can lose while every output channel keeps at least ``snr_db`` of signal to quantisation noise:
    those planes are all zero (``k`` of them; 0 without a floor).
    """
    w = weight.detach().cpu().double().reshape(weight.shape[0], -1).numpy()
    levels = 2 ** (bits - 1) - 1
    scales = (np.abs(w).max(axis=1) / levels).astype(np.float32)
    safe = np.where(scales > 0, scales, 1.0).astype(np.float64)
    mag = np.clip(np.rint(np.abs(w) / safe[:, None]), 0, levels).astype(np.int64)
    k = 0
    if snr_db > 0 and not (weight.dim() == 4 and weight.shape[1] == 1):
        # Not depthwise kernels: they filter neighbouring pixels, which are strongly correlated, so a (high-pass)
        # kernel's response is far below what its weights' energy suggests and their noise matters more; they
        # are under 2 % of MobileNetV2's weights, and coarsening them cost the cars model all of its 0.4 point
        # loss at 50 dB (README, "Coarser final precision").
        k = coarse_planes(mag, np.abs(w), scales, bits, snr_db)
        mag = round_low_planes(mag, k, levels)
    return mag, (w < 0) & (mag > 0), scales, k


def round_low_planes(mag: np.ndarray, k: int, levels: int) -> np.ndarray:
    """``mag`` rounded to the nearest multiple of ``2**k``, but at most the largest multiple within ``levels``
    (the channel's largest weight may so lose up to a step: ``coarse_planes`` counts that error too)."""
    if k == 0:
        return mag
    step = 1 << k
    return np.minimum((mag + step // 2) >> k << k, levels - levels % step)


def coarse_planes(mag: np.ndarray, magnitude: np.ndarray, scales: np.ndarray, bits: int, snr_db: float) -> int:
    """The most low magnitude planes (at most ``bits - 2``: one stays) that ``mag (C_out, K)``, the weights'
    ``magnitude`` on ``scales``' grid, can lose with every output channel's signal to noise (energy of its weights
    over that of their error) at least ``snr_db``."""
    energy = np.maximum((magnitude ** 2).sum(axis=1), 1e-300)
    bound = energy * 10.0 ** (-snr_db / 10)
    levels = 2 ** (bits - 1) - 1
    k = 0
    while k < bits - 2:
        coarse = round_low_planes(mag, k + 1, levels) * scales[:, None].astype(np.float64)
        if np.any(((magnitude - coarse) ** 2).sum(axis=1) > bound):
            break
        k += 1
    return k


def dequantize(mag: np.ndarray, negative: np.ndarray, scales: np.ndarray, missing: int,
               offset: Optional[float] = None) -> np.ndarray:
    """Weights ``(C_out, K)`` float32 from known top magnitude bits (``missing`` low planes unknown, valued at
    ``offset`` quantisation steps for significant weights; None: the middle, ``(2**missing - 1) / 2``)."""
    values = mag.astype(np.float32)  # in place from here on: this runs after every chunk on the device
    if missing > 0:
        fill = (2 ** missing - 1) / 2 if offset is None else offset
        values += np.float32(fill) * (mag > 0)
    values *= np.where(negative, -scales[:, None], scales[:, None])
    return values


def fill_offsets(mag: np.ndarray, planes: int) -> np.ndarray:
    """``offsets[p]`` (float32, ``planes + 1`` values): the mean of the ``planes - p`` missing low bits over the
    weights whose top ``p`` bits are not all 0 (the middle of the interval where there are none)."""
    offsets = np.zeros(planes + 1, np.float32)
    for p in range(planes):
        missing = planes - p
        significant = (mag >> missing) > 0
        low = mag[significant] & ((1 << missing) - 1)
        offsets[p] = low.mean() if low.size else (2 ** missing - 1) / 2
    return offsets


def base_integers(base: torch.Tensor, scales: np.ndarray, bits: int, zero_planes: int = 0) -> np.ndarray:
    """``round(base / scales)`` per output channel, int64 ``(rows, K)``, within the ``bits``-bit range (a base
    weight far off v2's grid saturates: the delta then carries the rest), magnitudes rounded to multiples of
    ``2**zero_planes`` (v2's grid under a floor, so that the delta's low planes are zero too)."""
    levels = 2 ** (bits - 1) - 1
    w = base.detach().cpu().double().reshape(base.shape[0], -1).numpy()
    safe = np.where(scales > 0, scales, 1.0).astype(np.float64)
    a = np.clip(np.rint(w / safe[:, None]), -levels, levels).astype(np.int64)
    return np.sign(a) * round_low_planes(np.abs(a), zero_planes, levels)


def delta_values(a1: np.ndarray, mag: np.ndarray, negative: np.ndarray, scales: np.ndarray, missing: int,
                 offset: Optional[float]) -> np.ndarray:
    """Weights ``(rows, K)`` float32 from the base integers ``a1`` and the delta's known top magnitude bits
    (``missing`` planes unknown, valued at ``offset`` steps; None: the middle). With none missing,
    ``(a1 + d) * scales`` computed exactly as a full package's decoder computes ``a2 * scales``."""
    if missing == 0:
        d = np.where(negative, -mag.astype(np.int64), mag.astype(np.int64))
        a = a1 + d
        return dequantize(np.abs(a), a < 0, scales, 0)
    fill = (2 ** missing - 1) / 2 if offset is None else offset
    d = (mag + fill * (mag > 0)) * np.where(negative, -1.0, 1.0)
    return ((a1 + d) * scales[:, None].astype(np.float64)).astype(np.float32)


def encode_plane(mag: np.ndarray, negative: np.ndarray, plane: int, planes: int, coder: str = "zstd",
                 rows: int = 1) -> bytes:
    """Plane ``plane`` (0 = MSB) of flat magnitudes of a ``(rows, K)`` tensor: significance, new signs,
    refinement sections, each zstd-or-raw (``coder`` zstd) or context-modelled ANS (``coder`` context)."""
    shift = planes - 1 - plane
    bit = ((mag >> shift) & 1).astype(bool)
    known = mag >> (shift + 1)
    significant = known > 0
    newly = ~significant & bit
    if coder == "context":
        _, sig_ctx, sign_ctx, ref_ctx = plane_contexts(known, negative & significant, rows)
        return (encode_section(bit[~significant], sig_ctx[~significant], SIGNIFICANCE_CONTEXTS)
                + encode_section(negative[newly], sign_ctx[newly], SIGN_CONTEXTS)
                + encode_section(bit[significant], ref_ctx[significant], REFINEMENT_CONTEXTS))
    return b"".join(section(np.packbits(b).tobytes())
                    for b in (bit[~significant], negative[newly], bit[significant]))


@dataclass
class PlaneState:
    """Decoder state of one planes tensor of ``rows`` output channels: the magnitude bits known so far and the
    signs."""

    mag: np.ndarray  # int32 (numel,): magnitudes have at most 23 bits
    negative: np.ndarray  # bool (numel,)
    planes_known: int = 0
    rows: int = 1


def decode_plane(state: PlaneState, payload: io.BytesIO, planes: int, what: str, coder: str = "zstd") -> None:
    """Apply the next plane of ``state`` from ``payload`` (integer accumulation, in place); ``coder`` as the
    package's ``plane_coder``. Raises ProgressiveError for sections that do not fit."""
    n = state.mag.size
    shift = planes - 1 - state.planes_known
    significant = state.mag > 0
    free = ~significant
    count = int(np.count_nonzero(significant))
    if coder == "context":
        _, sig_ctx, sign_ctx, ref_ctx = plane_contexts(state.mag >> (shift + 1), state.negative, state.rows)
        sig = decode_section(payload, sig_ctx[free], SIGNIFICANCE_CONTEXTS, what)
        newly = np.zeros(n, bool)
        newly[free] = sig
        signs = decode_section(payload, sign_ctx[newly], SIGN_CONTEXTS, what)
        ref = decode_section(payload, ref_ctx[significant], REFINEMENT_CONTEXTS, what)
    else:
        sig = unpack_bits(read_section(payload, n // 8 + 1, what), n - count, what)
        newly = np.zeros(n, bool)
        newly[free] = sig
        signs = unpack_bits(read_section(payload, n // 8 + 1, what), int(np.count_nonzero(sig)), what)
        ref = unpack_bits(read_section(payload, n // 8 + 1, what), count, what)
    state.negative[newly] = signs
    bits = newly  # the plane's bits: the new significance bits and the refinement bits of the others
    bits[significant] = ref
    state.mag |= bits.astype(np.int32) << shift
    state.planes_known += 1
