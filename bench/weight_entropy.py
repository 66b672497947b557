"""How far entropy coding of the 16-bit weights can go: each tensor's histogram entropy of its per-channel 16-bit
values (what a perfect coder of its value distribution would spend), against plain per-channel 16-bit packing.

    python bench/weight_entropy.py --checkpoint ../shared/models/cars_dev_joint20.pt \\
        --torchvision ../shared/weights/mobilenet_v2_imagenet_tflite.pth

Each conv/linear weight is quantised as the progressive package does (models/progressive/planes.py quantize); its
bits are ``-sum(count * log2(count / n))`` over its signed values plus 32 bits a channel for the scales; every other
tensor is counted whole. Writes ``bench/results/weight_entropy.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.progressive import plain_package_bytes  # noqa: E402
from bench.report import write_results  # noqa: E402
from models.checkpoint import load_checkpoint  # noqa: E402
from models.progressive import quantize  # noqa: E402



def histogram_bits(mag: np.ndarray, negative: np.ndarray) -> float:
    """Bits a perfect coder of the histogram of the signed values ``where(negative, -mag, mag)`` spends on them."""
    _, counts = np.unique(np.where(negative, -mag, mag), return_counts=True)
    return float(-(counts * np.log2(counts / counts.sum())).sum())


def entropy_bits(state: dict[str, torch.Tensor], bits_of: Callable[[torch.Tensor], int]) -> tuple[float, int, int]:
    """``(coded bits, raw bytes, coded weights)`` of ``state``: each conv/linear weight ``t`` quantised per
    channel to ``bits_of(t)`` bits and coded at its histogram entropy plus 32 bits a channel for the scales;
    every other tensor whole (raw bytes)."""
    coded, weights, raw = 0.0, 0, 0
    for t in state.values():
        if t.dtype == torch.float32 and t.dim() >= 2:
            mag, neg, _ = quantize(t, bits_of(t))
            coded += histogram_bits(mag, neg) + 32 * t.shape[0]
            weights += t.numel()
        else:
            raw += t.numel() * t.element_size()
    return coded, raw, weights


def entropy_bound(state: dict[str, torch.Tensor], bits: int = 16) -> dict:
    """Histogram-entropy bytes of ``state`` at ``bits`` bits, bits per weight, and the ratio to plain packing."""
    coded, raw, weights = entropy_bits(state, lambda t: bits)
    total = coded / 8 + raw
    plain = plain_package_bytes(state, bits)
    return {"weights": weights, "bits_per_weight": coded / weights, "bytes": total, "plain_bytes": plain,
            "ratio_to_plain": total / plain}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", action="append", default=[], help="a train.py checkpoint")
    parser.add_argument("--torchvision", action="append", default=[], help="a torchvision state dict (.pth)")
    args = parser.parse_args(argv)
    models = {Path(p).name: load_checkpoint(p).model.state_dict() for p in args.checkpoint}
    models.update({Path(p).name: torch.load(p, weights_only=True) for p in args.torchvision})
    result = {"command": "python bench/weight_entropy.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "models": {name: entropy_bound(state) for name, state in models.items()}}
    lines = ["# Histogram entropy of the 16-bit weights", "", f"`{result['command']}`", "",
             "| model | weights | bits per weight | entropy-coded bytes | plain 16-bit bytes | ratio |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {r['weights']:,} | {r['bits_per_weight']:.2f} | {r['bytes']:,.0f} | {r['plain_bytes']:,} | "
              f"{r['ratio_to_plain']:.3f} |" for n, r in result["models"].items()]
    write_results("weight_entropy", result, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
