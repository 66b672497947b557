"""The anchor: ProgressiveNet's weight coding, re-implemented from its source (github.com/Prev/progressivenet,
``progressivenet/src/quantization.ts`` and ``converter/src/main.ts``) to compare against models/progressive/.

- Every float32 tensor (kernels, biases, BatchNorm parameters alike) gets ONE range ``[min, max]`` and 32-bit
  codes ``floor((w - min) / (max - min) * 2**32)`` (``w == max`` -> ``2**32 - 1``).
- The top 16 bits travel as 8 slices of 2 bits, most significant first; part k holds slice k of every tensor in
  state-dict (layer) order, each packed with a 1-byte header (npm ``uint-n-array``); integer tensors travel
  raw in part 0. No entropy coding.
- After B received bits the client rebuilds every tensor: ``min + (max - min) * (q_B + 0.5) / 2**B``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SLICES = (2,) * 8


def part_bytes(state: dict[str, torch.Tensor], slices: tuple[int, ...] = SLICES) -> list[int]:
    """Bytes of each part (uint-n-array packing: ceil(bits * n / 8) + 1 header byte per tensor slice)."""
    sizes = []
    for k, bits in enumerate(slices):
        size = 0
        for t in state.values():
            if t.dtype.is_floating_point:
                size += math.ceil(bits * t.numel() / 8) + 1
            elif k == 0:
                size += t.numel() * t.element_size()
        sizes.append(size)
    return sizes


def decode_state(state: dict[str, torch.Tensor], received_bits: int) -> dict[str, torch.Tensor]:
    """Every tensor as the client holds it after ``received_bits`` bits (a whole number of parts)."""
    out = {}
    for name, t in state.items():
        if not t.dtype.is_floating_point:
            out[name] = t.clone()
            continue
        w = t.detach().double().cpu().numpy()
        lo, hi = float(w.min()), float(w.max())
        scale = hi - lo
        if scale == 0:
            out[name] = t.clone()
            continue
        codes = np.where(w == hi, 2 ** 32 - 1, np.floor((w - lo) / scale * 2 ** 32)).astype(np.uint64)
        top = codes >> np.uint64(32 - received_bits)
        value = lo + scale * (top.astype(np.float64) + 0.5) / 2 ** received_bits
        out[name] = torch.from_numpy(value.astype(np.float32))
    return out
