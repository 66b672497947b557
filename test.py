"""Evaluate a trained early-exit model offline: the confidence-threshold table.

    python test.py app:apps/quickstart_test.yml [z_confidence_threshold=0.5] [split_point=7] [key=value ...]
    python test.py app:apps/quickstart_test.yml --live 127.0.0.1:50051   # also through a running cloud
    python test.py app:apps/quickstart_test.yml split_point=all          # the scheduler's offline profile

One pass over the validation set caches every exit's output; each threshold is then a cheap replay of the
first-confident-exit policy (models/exit_policy.py). Writes ``test_results.json``, ``test_results.csv`` and
``test_results.png`` (accuracy vs uploading rate) into ``log_dir``.

``--live HOST:PORT`` then sends the same images, one request at a time, through the real device runtime
(device/runtime.py) to a running cloud, for each threshold, and reports the same table measured live plus bytes
per image and latency; results in ``test_results_live.json``. On the same checkpoint the live accuracy equals the
offline one up to the codec's loss.

``split_point=all`` instead profiles every split point and threshold (models/offline_profile.py) and writes
``profile.json`` into ``log_dir``: the file the device's scheduler (``scheduler: true``, ``profile: PATH``) plans
from.
"""

from __future__ import annotations

import csv
import dataclasses
from dataclasses import dataclass
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.app_config import AppConfig
from models.calibration import expected_calibration_error
from models.checkpoint import load_checkpoint
from models.cli import app_main
from models.config import ConfigError, parse_app_argv
from models.datasets import build_datasets
from models.early_exit import EarlyExitMobileNetV2
from models.exit_policy import CachedOutputs, ThresholdRow, confidence, device_only_accuracy, evaluate_threshold
from models.hardware import follow, resolve_device
from models.offline_profile import OfflineProfile, build_profile
from models.partition import check_split_point, profile

log = logging.getLogger("test")


@dataclass
class OutputStats:
    """Top-1 confidence (as the model answers, i.e. calibrated when it has temperatures, and uncalibrated)
    and correctness of every output (exits in boundary order, then final), each ``(outputs, N)``."""

    confidence: torch.Tensor
    uncalibrated_confidence: torch.Tensor
    correct: torch.Tensor

    def rows(self, model: EarlyExitMobileNetV2) -> list[dict]:
        """Per output: boundary (None for the final classifier), accuracy, temperature, ECE with and without it."""
        temperatures = model.config.temperatures or [1.0] * len(model.outputs())
        boundaries: list[int | None] = [*model.exit_points, None]
        return [{"boundary": b, "accuracy": float(c.float().mean()), "temperature": t,
                 "ece": expected_calibration_error(conf, c), "ece_uncalibrated": expected_calibration_error(raw, c)}
                for b, t, conf, raw, c in zip(boundaries, temperatures, self.confidence,
                                              self.uncalibrated_confidence, self.correct)]


@torch.no_grad()
def cache_outputs(
    model: EarlyExitMobileNetV2, loader: DataLoader, split_point: int, kind: str, device: torch.device
) -> tuple[CachedOutputs, OutputStats]:
    """Run the model once over ``loader`` and keep what every threshold needs (see ``CachedOutputs``), and
    every output's top-1 confidence and correctness (``OutputStats``)."""
    model.eval().to(device)
    device_exits = [i for i, k in enumerate(model.exit_points) if k <= split_point]
    temperatures = model.config.temperatures or [1.0] * len(model.outputs())
    policy, top1, raw, corrects = [], [], [], []
    for images, labels in tqdm(loader, desc="evaluating", leave=False):
        images, labels = follow(images, model), labels.to(device)
        outputs = model(images)
        policy.append(torch.stack([confidence(outputs[i], kind) for i in device_exits]).cpu()
                      if device_exits else torch.zeros(0, len(labels)))
        top1.append(torch.stack([confidence(o) for o in outputs]).cpu())
        raw.append(torch.stack([confidence(o.float() * t) for o, t in zip(outputs, temperatures)]).cpu())
        corrects.append(torch.stack([o.argmax(1) == labels for o in outputs]).cpu())
    correct = torch.cat(corrects, dim=1)
    cache = CachedOutputs(
        device_confidence=torch.cat(policy, dim=1),
        device_correct=correct[device_exits],
        final_correct=correct[-1],
        exit_points=[model.exit_points[i] for i in device_exits],
    )
    return cache, OutputStats(torch.cat(top1, dim=1), torch.cat(raw, dim=1), correct)


def format_table(rows: list[ThresholdRow], exit_points: list[int]) -> str:
    head = f"{'threshold':>9} {'upload':>7} {'accuracy':>8} {'bytes/img':>10}  " + " ".join(
        f"{'exit@' + str(k):>9}" for k in exit_points)
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.threshold:9.3f} {r.uploading_rate:7.3f} {r.accuracy:8.4f} "
                     f"{r.upload_bytes_per_image:10.0f}  " + " ".join(f"{x:9.3f}" for x in r.exit_rates))
    lines.append("(exit@K columns: fraction of images answered by the device exit at block boundary K)")
    return "\n".join(lines)


def format_outputs(outputs: list[dict], calibrated: bool) -> str:
    """Per-output accuracy and expected calibration error (top-1 confidence, 15 bins)."""
    lines = [f"{'output':>8} {'accuracy':>8} {'temperature':>11} {'ECE':>7} {'ECE uncal.':>10}"]
    for o in outputs:
        name = "final" if o["boundary"] is None else f"exit@{o['boundary']}"
        lines.append(f"{name:>8} {o['accuracy']:8.4f} {o['temperature']:11.3f} {o['ece']:7.4f} "
                     f"{o['ece_uncalibrated']:10.4f}")
    if not calibrated:
        lines.append("(checkpoint not calibrated: train with calibration_fraction > 0 to fit temperatures)")
    return "\n".join(lines)


def write_plot(path: Path, rows: list[ThresholdRow], cloud_only: float, device_only: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot([r.uploading_rate for r in rows], [r.accuracy for r in rows], "o-", label="early exits + cloud")
    for r in rows:
        ax.annotate(f"{r.threshold:g}", (r.uploading_rate, r.accuracy), fontsize=7,
                    textcoords="offset points", xytext=(3, 3))
    ax.axhline(cloud_only, color="gray", ls="--", label="cloud only")
    if device_only is not None:
        ax.axhline(device_only, color="gray", ls=":", label="deepest device exit only")
    ax.set_xlabel("uploading rate")
    ax.set_ylabel("accuracy")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_live(cfg: AppConfig, address: str, split: int, dataset, offline: list[ThresholdRow]) -> dict:
    """Send ``dataset`` through a DeviceRuntime talking to the cloud at ``address``, once per threshold.

    Returns (and writes to ``test_results_live.json``) per threshold: uploading rate, accuracy, per-exit rates,
    mean bytes sent per image, latency p50/p95 (ms), degraded count, and the offline accuracy next to it.
    """
    from device.config import DeviceConfig
    from device.runtime import DeviceRuntime
    from models.config import from_dict

    device_cfg = from_dict(DeviceConfig, {"checkpoint": str(cfg.checkpoint_path()), "cloud": address,
                                          "split_point": split, "confidence": cfg.confidence,
                                          "deadline_ms": 30_000.0, "log_level": "WARNING"},
                           source="--live")
    runtime = DeviceRuntime.start(device_cfg)
    rows = []
    try:
        exit_points = runtime.head.exit_points
        for threshold, ref in zip([r.threshold for r in offline], offline):
            runtime.set_threshold(threshold)
            by, correct, sent, latency, degraded = [], 0, 0, [], 0
            for x, label in tqdm(dataset, desc=f"live tau={threshold:g}", leave=False, disable=None):
                result = runtime.classify_tensor(x)
                by.append(result.answered_by)
                correct += int(result.class_id == int(label))
                sent += result.bytes_sent
                latency.append(result.latency_ms)
                degraded += int(result.degraded)
            n = len(by)
            rows.append({
                "threshold": threshold, "uploading_rate": by.count("cloud") / n, "accuracy": correct / n,
                "exit_rates": [by.count(f"device:exit-{k}") / n for k in exit_points],
                "bytes_per_image": sent / n, "latency_p50_ms": float(np.percentile(latency, 50)),
                "latency_p95_ms": float(np.percentile(latency, 95)), "degraded": degraded,
                "offline_accuracy": ref.accuracy, "offline_uploading_rate": ref.uploading_rate,
            })
    finally:
        runtime.close()
    return {"address": address, "codec": runtime.codec.name, "split_point": split, "num_images": len(dataset),
            "exit_points": exit_points, "rows": rows}


def format_live_table(live: dict) -> str:
    head = (f"{'threshold':>9} {'upload':>7} {'accuracy':>8} {'offline':>8} {'bytes/img':>10} {'p50 ms':>7} "
            f"{'p95 ms':>7} {'degraded':>8}")
    lines = [head, "-" * len(head)]
    for r in live["rows"]:
        lines.append(f"{r['threshold']:9.3f} {r['uploading_rate']:7.3f} {r['accuracy']:8.4f} "
                     f"{r['offline_accuracy']:8.4f} {r['bytes_per_image']:10.0f} {r['latency_p50_ms']:7.1f} "
                     f"{r['latency_p95_ms']:7.1f} {r['degraded']:8d}")
    return "\n".join(lines)


def run_profile(cfg: AppConfig) -> dict:
    """``split_point=all``: profile every split point and threshold; writes ``<log_dir>/profile.json``."""
    ckpt = load_checkpoint(cfg.checkpoint_path())
    data = _val_data(cfg, ckpt)
    loader = DataLoader(data.val, batch_size=cfg.batch_size, num_workers=cfg.data_loader_workers)
    model = ckpt.model.eval().to(resolve_device(cfg.device))
    thresholds = sorted(set(cfg.thresholds) | {1.0})  # 1.0: every image uploaded at any split
    pre = ckpt.preprocess
    prof = build_profile(model, loader, pre.input_size, cfg.confidence, thresholds, str(cfg.checkpoint_path()),
                         pre.mean, pre.std, bytes_images=cfg.profile_bytes_images)
    out = Path(cfg.log_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(prof.to_json(), indent=1))
    print(format_profile(prof))
    print(f"wrote {out / 'profile.json'}")
    return prof.to_json()


def format_profile(prof: OfflineProfile) -> str:
    """Per split point: device/cloud MFLOPs, mean offload bytes per codec, and the smallest uploading rate whose
    accuracy is within 1 point of the final classifier's."""
    codecs = sorted({c for s in prof.splits for c in s.bytes})
    head = f"{'split':>5} {'dev MFLOP':>9} {'cloud MFLOP':>11} " + " ".join(f"{c:>12}" for c in codecs) + \
        "  upload@-1pt"
    lines = [f"{prof.num_images} images, final accuracy {prof.final_accuracy:.4f}; bytes per offload (mean):", head]
    for s in prof.splits:
        near = [r for r in s.rows if r.accuracy >= prof.final_accuracy - 0.01]
        best = min(near, key=lambda r: r.uploading_rate) if near else None
        lines.append(f"{s.split_point:5d} {s.device_flops / 1e6:9.1f} {s.cloud_flops / 1e6:11.1f} " + " ".join(
            f"{s.bytes[c].mean:12.0f}" if c in s.bytes else f"{'-':>12}" for c in codecs) +
            ("" if best is None else f"  {best.uploading_rate:.3f} (tau {best.threshold:g})"))
    return "\n".join(lines)


def _val_data(cfg: AppConfig, ckpt):
    pre = ckpt.preprocess
    data = build_datasets(cfg.dataset, cfg.data_root, pre.input_size, pre.resize_size, cfg.crop_scale_min,
                          cfg.quickstart_train_samples, cfg.quickstart_val_samples, cfg.seed, with_train=False)
    if data.class_names != ckpt.class_names:
        raise ConfigError(f"config key 'dataset': its classes differ from the checkpoint's ({cfg.checkpoint_path()})")
    return data


def run(cfg: AppConfig, live: str | None = None) -> dict:
    """Evaluate ``cfg.checkpoint`` and write the reports; returns the JSON written to test_results.json.

    With ``live`` (``HOST:PORT`` of a running cloud) also runs the live evaluation (``run_live``);
    ``split_point=all`` writes the offline profile instead (``run_profile``)."""
    if cfg.split_point == "all":
        if live is not None:
            raise ConfigError("config key 'split_point': 'all' (the offline profile) does not go with --live")
        return run_profile(cfg)
    ckpt = load_checkpoint(cfg.checkpoint_path())
    model = ckpt.model
    # Default: after the deepest exit; a model with no exits is evaluated cloud-only (split 0).
    split = cfg.split_point if cfg.split_point is not None else max(model.exit_points, default=0)
    try:
        check_split_point(model, split)
    except ValueError as err:
        raise ConfigError(f"config key 'split_point': {err}") from None
    pre = ckpt.preprocess
    data = _val_data(cfg, ckpt)
    device = resolve_device(cfg.device)
    loader = DataLoader(data.val, batch_size=cfg.batch_size, num_workers=cfg.data_loader_workers)
    cache, stats = cache_outputs(model, loader, split, cfg.confidence, device)

    upload_bytes = profile(model, pre.input_size)[split].activation_bytes
    thresholds = [cfg.z_confidence_threshold] if cfg.z_confidence_threshold is not None else cfg.thresholds
    rows = [evaluate_threshold(cache, t, upload_bytes) for t in thresholds]
    uncalibrated = None
    if model.config.temperatures is not None and cfg.confidence == "top1":
        # The same policy on the raw softmax: what calibration changes in the trade-off.
        device_exits = [model.exit_points.index(k) for k in cache.exit_points]
        raw = dataclasses.replace(cache, device_confidence=stats.uncalibrated_confidence[device_exits])
        uncalibrated = [dataclasses.asdict(evaluate_threshold(raw, t, upload_bytes)) for t in thresholds]
    cloud_only = float(cache.final_correct.float().mean())
    device_only = device_only_accuracy(cache)
    result = {
        "checkpoint": str(cfg.checkpoint_path()),
        "split_point": split,
        "device_exit_points": cache.exit_points,
        "confidence": cfg.confidence,
        "num_images": int(cache.final_correct.numel()),
        "cloud_only_accuracy": cloud_only,
        "device_only_accuracy": device_only,
        "upload_bytes_per_offload": upload_bytes,
        "upload_codec": "float32",
        "calibrated": model.config.temperatures is not None,
        "outputs": stats.rows(model),
        "rows": [dataclasses.asdict(r) for r in rows],
        "rows_uncalibrated": uncalibrated,
    }
    out = Path(cfg.log_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "test_results.json").write_text(json.dumps(result, indent=2))
    with open(out / "test_results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["threshold", "uploading_rate", "accuracy", "upload_bytes_per_image"]
                        + [f"exit{k}_rate" for k in cache.exit_points]
                        + [f"exit{k}_accuracy" for k in cache.exit_points])
        for r in rows:
            writer.writerow([r.threshold, r.uploading_rate, r.accuracy, r.upload_bytes_per_image]
                            + r.exit_rates + ["" if a is None else a for a in r.exit_accuracies])
    write_plot(out / "test_results.png", rows, cloud_only, device_only)

    print(f"split point {split}: device exits at {cache.exit_points}, {result['num_images']} images, "
          f"{upload_bytes} bytes per upload (float32, no codec)")
    print(f"cloud-only accuracy {cloud_only:.4f}; deepest-device-exit-only accuracy "
          f"{'n/a' if device_only is None else f'{device_only:.4f}'}")
    print(format_table(rows, cache.exit_points))
    print(format_outputs(result["outputs"], result["calibrated"]))
    print(f"wrote {out / 'test_results.json'}, .csv and .png")
    if live is not None:
        result["live"] = run_live(cfg, live, split, data.val, rows)
        (out / "test_results_live.json").write_text(json.dumps(result["live"], indent=2))
        print(f"live through the device runtime and the cloud at {live} (codec {result['live']['codec']}):")
        print(format_live_table(result["live"]))
        print(f"wrote {out / 'test_results_live.json'}")
    return result


def split_live(argv: list[str]) -> tuple[list[str], str | None]:
    """Take ``--live HOST:PORT`` (or ``--live=HOST:PORT``) out of ``argv``; ConfigError if it has no value."""
    rest, live = [], None
    items = iter(argv)
    for item in items:
        if item == "--live":
            live = next(items, None)
            if live is None or "=" in live:
                raise ConfigError("--live needs the cloud's HOST:PORT")
        elif item.startswith("--live="):
            live = item.split("=", 1)[1]
        else:
            rest.append(item)
    return rest, live


def main(argv: list[str]) -> int:
    def evaluate(args: list[str]) -> None:
        rest, live = split_live(args)
        run(parse_app_argv(AppConfig, rest), live)

    return app_main(evaluate, argv, "test")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
