"""A reference point for the progressive stream: accuracy against bytes of per-channel uniformly quantised
weights at one bit width, not progressive, coded at each tensor's histogram entropy (what a coder of its value
distribution that knew the histogram for free would spend; a coder with contexts could spend less).

    python bench/rate_accuracy.py --imagenet ../shared/data/imagenet_dev_500 \\
        ../shared/weights/mobilenet_v2_imagenet_tflite.pth --name imagenet
    python bench/rate_accuracy.py app:apps/cars_dev_test.yml checkpoint=../shared/models/cars_dev_joint20.pt \\
        image_size=128 resize_size=128 data_loader_workers=0 --name cars_dev

For each bit width ``b`` (``--bits``): every conv/linear weight quantised per output channel to ``b`` bits
(sign + ``b - 1`` magnitude bits, nearest, as models/progressive/planes.py quantises at 16 bits), with the
output-bias correction of models/bias_correction.py (what the stream sends with its first planes), and the
final classifier's top-1 accuracy; bytes are each tensor's histogram entropy (bench/weight_entropy.py) plus
float32 scales and every other tensor whole, as a share of the float32 weights. Rows ``b, depthwise 8``: the
same with the depthwise kernels (under 2 % of the weights) at 8 bits. Writes
``bench/results/rate_accuracy_<name>.{json,md}``.
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

from bench.progressive import load_either, predictions  # noqa: E402
from bench.report import write_results  # noqa: E402
from bench.weight_entropy import entropy_bits  # noqa: E402
from models.bias_correction import BiasInput, bias_inputs, output_shift  # noqa: E402
from models.progressive import dequantize, quantize  # noqa: E402



def width(bits: int, depthwise_bits: int) -> Callable[[torch.Tensor], int]:
    """The bit width of a weight tensor: ``depthwise_bits`` for depthwise kernels ``(C, 1, k, k)``, else ``bits``."""
    return lambda t: depthwise_bits if t.dim() == 4 and t.shape[1] == 1 else bits


def quantised_state(state: dict[str, torch.Tensor], bits_of: Callable[[torch.Tensor], int],
                    bias: dict[str, BiasInput]) -> dict[str, torch.Tensor]:
    """``state`` with every conv/linear weight ``t`` on its per-channel ``bits_of(t)``-bit grid and each layer's
    output shift corrected (as models/progressive/build.py ``code_units`` does)."""
    out = {k: v.clone() for k, v in state.items()}
    for name, t in state.items():
        if not (t.dtype == torch.float32 and t.dim() >= 2):
            continue
        approx = dequantize(*quantize(t, bits_of(t)), 0).reshape(t.shape)
        out[name] = torch.from_numpy(approx)
        if name in bias:
            b = bias[name]
            shift = b.sign * output_shift(approx.astype(np.float64) - t.double().numpy(), b.mean, b.groups)
            out[b.target] = out[b.target] + torch.from_numpy(shift).float()
    return out


def accuracy(model: torch.nn.Module, batches: list) -> float:
    """Top-1 accuracy of ``model``'s final classifier on ``batches`` of ``(x, y)``."""
    return float((predictions(model, batches) == torch.cat([y for _, y in batches])).float().mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="quickstart", help="results file suffix")
    parser.add_argument("--bits", nargs="+", type=int, default=[4, 5, 6, 7, 8])
    parser.add_argument("--limit", type=int, default=None, help="evaluate on the first N images only")
    parser.add_argument("--imagenet", nargs=2, metavar=("DIR", "WEIGHTS"), default=None,
                        help="torchvision MobileNetV2 WEIGHTS on DIR/labels.csv instead of an app config")
    args, rest = parser.parse_known_args(argv)
    ckpt, batches = load_either(args.imagenet, rest, args.limit)
    model = ckpt.model.eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    float32 = sum(4 * t.numel() for t in state.values())
    bias = bias_inputs(model, ckpt.preprocess.input_size)
    full = accuracy(model, batches)
    rows = []
    for bits in args.bits:
        for depthwise in sorted({bits, 8}):
            coded, raw, _ = entropy_bits(state, width(bits, depthwise))
            size = coded / 8 + raw
            model.load_state_dict(quantised_state(state, width(bits, depthwise), bias))
            rows.append({"bits": bits, "depthwise_bits": depthwise, "bytes": size, "fraction": size / float32,
                         "accuracy": accuracy(model, batches)})
            print(rows[-1], flush=True)
    model.load_state_dict(state)
    result = {"name": args.name, "command": "python bench/rate_accuracy.py " + " ".join(
        sys.argv[1:] if argv is None else argv), "images": sum(len(y) for _, y in batches),
        "float32_bytes": float32, "full_accuracy": full, "rows": rows}
    lines = [f"# Rate and accuracy of per-channel uniform weights: {args.name}", "", f"`{result['command']}`", "",
             f"{result['images']} images; full precision {full:.4f}; float32 weights {float32:,} B.", "",
             "| bits | depthwise bits | entropy-coded bytes | share of float32 | accuracy | within 1 pt |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['bits']} | {r['depthwise_bits']} | {r['bytes']:,.0f} | {100 * r['fraction']:.2f} % | "
              f"{r['accuracy']:.4f} | {'yes' if r['accuracy'] >= full - 0.01 else 'no'} |" for r in rows]
    write_results(f"rate_accuracy_{args.name}", result, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
