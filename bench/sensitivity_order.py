"""Does a measured per-layer sensitivity choose a better progressive prefix than the data-free proxy?

    python bench/sensitivity_order.py app:apps/cars_dev_test.yml checkpoint=../shared/models/cars_dev_joint20.pt \\
        image_size=128 resize_size=128 data_loader_workers=0 --name cars_dev
    python bench/sensitivity_order.py --imagenet ../shared/data/imagenet_dev_500 \\
        ../shared/weights/mobilenet_v2_imagenet_tflite.pth --limit 200 --order whole --name imagenet

The ``value`` and ``whole`` orders take each layer's units by the drop of its mean per-channel relative squared
error per byte, every layer alike. Here each layer's error is weighted by its measured sensitivity
(``build_package(layer_weights=...)``): the KL divergence of the output it feeds (its exit for ``exits.*``, else
the final classifier) from the full model's, per unit of relative squared error, when its weights get Gaussian
noise of that relative variance (``--noise``; ``--draws`` draws), on ``--calibration`` images apart from the
evaluated ones (the app's training images, not augmented; for ImageNet, the images after the first
``--limit``). Both curves: the final classifier's accuracy at about ``--max-points`` points each (the chunks
differ: so do the orders), side by side in one run. Writes ``bench/results/sensitivity_order_<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.progressive import Evaluator, load_either, load_imagenet, ours_curve, within  # noqa: E402
from bench.report import write_results  # noqa: E402
from models.app_config import AppConfig  # noqa: E402
from models.bias_correction import bias_inputs  # noqa: E402
from models.config import parse_app_argv  # noqa: E402
from models.datasets import build_datasets  # noqa: E402



@torch.no_grad()
def sensitivities(model: torch.nn.Module, images: torch.Tensor, noise: float, draws: int,
                  seed: int = 0) -> dict[str, float]:
    """Per conv/linear weight name: mean KL(full || noisy) in nats of the output it feeds over ``images``
    ``(N, 3, H, W)``, divided by ``noise`` (the relative variance of the Gaussian noise added to each output
    channel's weights, in units of that channel's mean squared weight)."""
    model = copy.deepcopy(model).eval()
    generator = torch.Generator().manual_seed(seed)
    reference = [torch.log_softmax(o, 1) for o in model(images)]
    out = {}
    for name, p in model.named_parameters():
        if p.dim() < 2:
            continue
        k = int(name.split(".")[1]) if name.startswith("exits.") else -1
        w = p.data.clone()
        rms = w.reshape(w.shape[0], -1).pow(2).mean(1).sqrt().reshape(-1, *([1] * (w.dim() - 1)))
        kls = []
        for _ in range(draws):
            p.data = w + torch.randn(w.shape, generator=generator) * rms * noise ** 0.5
            ref = reference[k]
            kls.append(float((ref.exp() * (ref - torch.log_softmax(model(images)[k], 1))).sum(1).mean()))
        p.data = w
        out[name] = float(np.mean(kls)) / noise
    return out


def calibration_images(args: argparse.Namespace, rest: list[str], ckpt) -> torch.Tensor:
    """Up to ``args.calibration`` images ``(N, 3, H, W)`` none of which is evaluated: for ImageNet those after
    the first ``args.limit`` (which must be given), else a seeded pick of the app's training images with the
    evaluation transform (no augmentation)."""
    if args.imagenet:
        if args.limit is None:
            raise SystemExit("--imagenet needs --limit: the images after the evaluated ones calibrate")
        _, batches = load_imagenet(*args.imagenet, None)
        images = torch.cat([x for x, _ in batches])[args.limit:][:args.calibration]
        if len(images) == 0:
            raise SystemExit(f"--limit {args.limit} leaves no image of {args.imagenet[0]} to calibrate on")
        return images
    cfg = parse_app_argv(AppConfig, rest)
    pre = ckpt.preprocess
    train = build_datasets(cfg.dataset, cfg.data_root, pre.input_size, pre.resize_size, cfg.crop_scale_min,
                           cfg.quickstart_train_samples, cfg.quickstart_val_samples, cfg.seed, augment=False).train
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:args.calibration]
    return torch.stack([train[int(i)][0] for i in pick])


def markdown(result: dict) -> str:
    """The result as a markdown report: both curves point by point, where each is within 1 point, the extremes
    of the sensitivities."""
    lines = [f"# Sensitivity-weighted order: {result['name']}", "", f"`{result['command']}`", "",
             f"{result['images']} images, `{result['order']}` order, device-only final classifier; full precision "
             f"{result['full']:.4f}; sensitivities from {result['calibration']} other images.", "",
             "| share of float32 | " + " | ".join(result["curves"]) + " |", "|---|---|---|"]
    a, b = (result["curves"][k]["points"] for k in result["curves"])
    for p, q in zip(a, b):
        if p["device_accuracy"] is not None and q["device_accuracy"] is not None:
            lines.append(f"| {100 * p['fraction']:.2f} % / {100 * q['fraction']:.2f} % | {p['device_accuracy']:.4f} | "
                         f"{q['device_accuracy']:.4f} |")
    shares = {k: "-" if c["within_1pt"] is None else f"{100 * c['within_1pt']:.2f} %"
              for k, c in result["curves"].items()}
    lines += ["", "Within 1 point from: " + "; ".join(f"{k} {v}" for k, v in shares.items()), "",
        "Largest sensitivities: " + ", ".join(f"{n} {v:.3g}" for n, v in result["top"]),
        "Smallest: " + ", ".join(f"{n} {v:.3g}" for n, v in result["bottom"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="quickstart", help="results file suffix")
    parser.add_argument("--order", default="value", choices=("value", "whole"))
    parser.add_argument("--max-points", type=int, default=30, help="evaluations per curve")
    parser.add_argument("--limit", type=int, default=None, help="evaluate on the first N images only")
    parser.add_argument("--calibration", type=int, default=64, help="images the sensitivities are measured on")
    parser.add_argument("--noise", type=float, default=1e-3, help="relative variance of the probe noise")
    parser.add_argument("--draws", type=int, default=2, help="noise draws per layer")
    parser.add_argument("--imagenet", nargs=2, metavar=("DIR", "WEIGHTS"), default=None,
                        help="torchvision MobileNetV2 WEIGHTS on DIR/labels.csv instead of an app config")
    args, rest = parser.parse_known_args(argv)
    torch.manual_seed(0)
    ckpt, batches = load_either(args.imagenet, rest, args.limit)
    model = ckpt.model.eval()
    calibration = calibration_images(args, rest, ckpt)
    sens = sensitivities(model, calibration, args.noise, args.draws)
    ev = Evaluator(model, 0, 1.0, "max_prob", batches)
    full = ev.device_final(model)
    bias = bias_inputs(model, ckpt.preprocess.input_size)
    curves = {}
    for label, weights in (("every layer alike", None), ("sensitivity-weighted", sens)):
        curve = ours_curve(ckpt, ev, args.order, args.max_points, False, bias=bias, layer_weights=weights)
        curve["within_1pt"] = within(curve["points"], "device_accuracy", full)
        curves[label] = curve
        print(label, curve["within_1pt"], flush=True)
    ranked = sorted(sens.items(), key=lambda kv: -kv[1])
    result = {"name": args.name, "command": "python bench/sensitivity_order.py " + " ".join(
        sys.argv[1:] if argv is None else argv), "order": args.order, "images": sum(len(y) for _, y in batches),
        "calibration": len(calibration), "full": full, "sensitivity": sens, "top": ranked[:5],
        "bottom": ranked[-3:], "curves": curves}
    write_results(f"sensitivity_order_{args.name}", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
