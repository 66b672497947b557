"""Confidence calibration: one temperature per model output, fitted on held-out images, and the expected
calibration error (ECE) that says how far confidence is from the probability of being right.

Why: the device answers at the first exit whose confidence reaches one threshold. Raw softmax confidences of
different exits mean different things (a shallow exit trained with label smoothing is under-confident, a deep
one over-confident), so one threshold would be strict at one exit and lax at the next. Dividing each output's
logits by a temperature fitted to minimise its negative log-likelihood on held-out images (Guo et al., 2017)
makes a confidence of 0.8 mean "right about 80 % of the time" at every exit; it never changes an argmax.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from models.early_exit import EarlyExitMobileNetV2
from models.hardware import follow

log = logging.getLogger(__name__)

#: Bins of the expected calibration error (equal width over [0, 1], as in Guo et al.).
ECE_BINS = 15


def expected_calibration_error(confidence: Tensor, correct: Tensor, bins: int = ECE_BINS) -> float:
    """ECE of ``confidence`` ``(N,)`` in [0, 1] against ``correct`` ``(N,)`` bool: the mean over images of
    ``|accuracy - mean confidence|`` of the equal-width bin each image falls in. 0 for an empty set."""
    n = confidence.numel()
    if n == 0:
        return 0.0
    conf = confidence.double().clamp(0.0, 1.0)
    index = torch.clamp((conf * bins).long(), max=bins - 1)  # confidence 1.0 goes in the last bin
    total = 0.0
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        if count:
            total += count * abs(float(correct[members].double().mean()) - float(conf[members].mean()))
    return total / n


def temperature_nll(logits: Tensor, labels: Tensor, temperature: float) -> float:
    """Mean negative log-likelihood of ``labels`` ``(N,)`` under ``softmax(logits / temperature)``,
    ``logits`` ``(N, classes)``."""
    return float(torch.nn.functional.cross_entropy(logits.double() / temperature, labels))


def fit_temperature(logits: Tensor, labels: Tensor, low: float = 0.05, high: float = 20.0,
                    iterations: int = 80) -> float:
    """The temperature in ``[low, high]`` that minimises ``temperature_nll``.

    The NLL is convex in ``beta = 1 / T`` (a log-sum-exp of functions linear in beta minus a linear term), so a
    golden-section search over beta finds its minimum to ~1e-12 of the interval in 80 steps.
    """
    if logits.shape[0] == 0:
        raise ValueError("fit_temperature needs at least one image")
    a, b = 1.0 / high, 1.0 / low
    ratio = (math.sqrt(5.0) - 1.0) / 2.0

    def nll(beta: float) -> float:
        return temperature_nll(logits, labels, 1.0 / beta)

    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = nll(c), nll(d)
    for _ in range(iterations):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = nll(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = nll(d)
    return 1.0 / ((a + b) / 2.0)


@dataclass
class CalibrationReport:
    """What ``calibrate`` fitted and how much it helped, per output (exits in boundary order, then final).

    ECEs are measured on the calibration images themselves; test.py reports them on the evaluation set.
    """

    temperatures: list[float]
    ece_before: list[float]
    ece_after: list[float]
    num_images: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def collect_logits(model: EarlyExitMobileNetV2, loader: DataLoader, device: torch.device
                   ) -> tuple[list[Tensor], Tensor]:
    """Every output's logits ``(N, classes)`` (float32, on the CPU) and the labels ``(N,)`` over ``loader``."""
    model.eval()
    outputs: list[list[Tensor]] = [[] for _ in model.outputs()]
    labels = []
    for images, target in loader:
        for store, out in zip(outputs, model(follow(images, model))):
            store.append(out.float().cpu())
        labels.append(target.cpu())
    return [torch.cat(o) for o in outputs], torch.cat(labels)


def calibrate(model: EarlyExitMobileNetV2, loader: DataLoader, device: torch.device) -> CalibrationReport:
    """Fit one temperature per output of ``model`` on ``loader`` (held-out images) and set them on the model.

    Any earlier temperatures are undone first, so calibrating twice gives the same result.
    """
    model.set_temperatures([1.0] * len(model.outputs()))
    logits, labels = collect_logits(model, loader, device)
    temperatures, before, after = [], [], []
    for out in logits:
        t = fit_temperature(out, labels)
        correct = out.argmax(1) == labels
        before.append(expected_calibration_error(torch.softmax(out, 1).max(1).values, correct))
        after.append(expected_calibration_error(torch.softmax(out / t, 1).max(1).values, correct))
        temperatures.append(t)
    model.set_temperatures(temperatures)
    report = CalibrationReport(temperatures, before, after, int(labels.numel()))
    log.info("calibrated on %d held-out images: temperatures %s, ECE %s -> %s", report.num_images,
             [round(t, 3) for t in temperatures], [round(e, 4) for e in before], [round(e, 4) for e in after])
    return report


def calibrate_checkpoint(argv: list[str]) -> None:
    """``python -m models.calibration app:apps/X.yml [checkpoint=PATH] [calibration_fraction=0.05]``: fit the
    temperatures of an existing checkpoint (e.g. one trained before calibration existed) on the same held-out
    slice train.py would use, and write them into the checkpoint. Raises ConfigError / CheckpointError."""
    from models.app_config import AppConfig
    from models.checkpoint import load_checkpoint, save_checkpoint
    from models.config import ConfigError, parse_app_argv
    from models.datasets import build_datasets
    from models.hardware import resolve_device

    cfg = parse_app_argv(AppConfig, argv)
    if cfg.calibration_fraction <= 0:
        raise ConfigError("config key 'calibration_fraction': must be > 0 to hold images out for calibration")
    path = cfg.checkpoint_path()
    device = resolve_device(cfg.device)
    ckpt = load_checkpoint(path, map_location=device)
    pre = ckpt.preprocess
    data = build_datasets(cfg.dataset, cfg.data_root, pre.input_size, pre.resize_size, cfg.crop_scale_min,
                          cfg.quickstart_train_samples, cfg.quickstart_val_samples, cfg.seed,
                          calibration_fraction=cfg.calibration_fraction)
    if data.class_names != ckpt.class_names:
        raise ConfigError(f"config key 'dataset': its classes differ from the checkpoint's ({path})")
    loader = DataLoader(data.calibration, batch_size=cfg.batch_size, num_workers=cfg.data_loader_workers)
    report = calibrate(ckpt.model, loader, device)
    save_checkpoint(path, ckpt.model, ckpt.class_names, ckpt.preprocess,
                    {**ckpt.metrics, "calibration": report.to_dict()})
    log.info("wrote the temperatures into %s", path)


def main(argv: list[str]) -> int:
    from models.cli import app_main

    return app_main(calibrate_checkpoint, argv, "calibration")


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
