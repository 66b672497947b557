"""Learned bottleneck benchmark: bytes per offloaded image and accuracy of trained bottleneck checkpoints.

    python bench/bottleneck.py app:apps/cars_dev_bottleneck.yml [checkpoints=runs/a/best_model.pt,...] \
        [name=cars_dev] [limit=N: the first N images only, a quick check]

For every checkpoint (default: ``<log_dir>/best_model.pt``; each holds the frozen base model and one trained
bottleneck) on the validation set, one image at a time as a device sends them:

- bytes of the code payload per image (mean, p95): the learned prior with constriction's ANS coder vs the
  integer code as int8 bytes + zstd (``models/bottleneck_codec.py``; every payload is decoded again and must
  give the same code), next to the split activation with the existing int4+zstd / int8+zstd codecs
  (``proto/codec.py``, protobuf message bytes) and the input JPEG files as stored;
- accuracy of the final classifier through the bottleneck (code decoded from the ANS payload) vs without it
  (float32 activation, no codec) and vs int4+zstd;
- encoder / decoder FLOPs as shares of the head / tail (``models.bottleneck.flops_shares``);
- with the device's exits before the split (first confident exit, top-1 softmax): for each threshold the
  uploading rate, accuracy and mean bytes per image over all images (exits send nothing) relative to the
  mean input JPEG; the cheapest threshold within 1 point of the cloud-only accuracy without codec.

Writes ``bench/results/bottleneck_<name>.{json,md}``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.app_config import AppConfig  # noqa: E402
from models.bottleneck import flops_shares  # noqa: E402
from models.bottleneck_codec import decode_code, encode_code  # noqa: E402
from models.checkpoint import load_checkpoint  # noqa: E402
from models.config import ConfigError, parse_app_argv  # noqa: E402
from models.datasets import build_datasets  # noqa: E402
from models.exit_policy import confidence  # noqa: E402
from models.partition import head, tail  # noqa: E402
from proto.codec import CodecSpec, decode, encode  # noqa: E402

THRESHOLDS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0]
BASELINE_CODECS = [CodecSpec("int8", "zstd"), CodecSpec("int4", "zstd")]
MAX_LOSS_POINTS = 1.0


def jpeg_sizes(dataset) -> np.ndarray:
    """Bytes of each input image file as stored (torchvision's StanfordCars / ImageFolder keep the paths)."""
    samples = getattr(dataset, "_samples", None) or getattr(dataset, "samples", None)
    if samples is None:
        raise ConfigError("config key 'dataset': the bench needs image files (stanford_cars or imagefolder)")
    return np.array([os.path.getsize(path) for path, _ in samples], dtype=np.int64)


def summary(values: np.ndarray) -> dict:
    return {"mean": float(values.mean()), "p50": float(np.percentile(values, 50)),
            "p95": float(np.percentile(values, 95)), "max": int(values.max())}


@torch.no_grad()
def measure_checkpoint(path: str, cfg: AppConfig, jpeg: np.ndarray, limit: int | None = None) -> dict:
    """Everything of one bottleneck checkpoint on the validation set (see the module docstring)."""
    ckpt = load_checkpoint(path)
    model, pre = ckpt.model.eval(), ckpt.preprocess
    if model.bottleneck is None:
        raise ConfigError(f"config key 'checkpoints': {path} has no bottleneck (train one with train_mode=bottleneck)")
    split = model.bottleneck.config.split_point
    counts = model.bottleneck.code_counts
    data = build_datasets(cfg.dataset, cfg.data_root, pre.input_size, pre.resize_size, cfg.crop_scale_min,
                          cfg.quickstart_train_samples, cfg.quickstart_val_samples, cfg.seed, with_train=False)
    val = data.val if limit is None else torch.utils.data.Subset(data.val, range(min(limit, len(data.val))))
    loader = DataLoader(val, batch_size=cfg.batch_size, num_workers=cfg.data_loader_workers)
    h, t = head(model, split), tail(model, split)
    sizes: dict[str, list[int]] = {"ans": [], "zstd": [], **{c.name: [] for c in BASELINE_CODECS}}
    correct: dict[str, list[bool]] = {"bottleneck": [], "float32": [], **{c.name: [] for c in BASELINE_CODECS}}
    exit_conf, exit_correct, labels_all = [], [], []
    seconds = {"encode_ans": 0.0, "decode_ans": 0.0}
    for images, labels in loader:
        out = h(images)
        labels_all.append(labels)
        exit_conf.append(torch.stack([confidence(l) for l in out.exit_logits]) if out.exit_logits
                         else torch.zeros(0, len(labels)))
        exit_correct.append(torch.stack([l.argmax(1) == labels for l in out.exit_logits]) if out.exit_logits
                            else torch.zeros(0, len(labels), dtype=torch.bool))
        correct["float32"] += (t(out.activation)[-1].argmax(1) == labels).tolist()
        decoded = []
        for code in out.code.split(1):
            for coder in ("ans", "zstd"):
                t0 = time.perf_counter()
                payload = encode_code(code, coder, counts)
                t1 = time.perf_counter()
                back = decode_code(payload, tuple(code.shape), coder, counts)
                if coder == "ans":
                    seconds["encode_ans"] += t1 - t0
                    seconds["decode_ans"] += time.perf_counter() - t1
                    decoded.append(back)
                if not torch.equal(back, code):
                    raise AssertionError(f"{coder} payload did not decode to its code")
                sizes[coder].append(len(payload))
        correct["bottleneck"] += (t(t.decode(torch.cat(decoded)))[-1].argmax(1) == labels).tolist()
        for spec in BASELINE_CODECS:
            msgs = [encode(a.unsqueeze(0), spec) for a in out.activation]
            sizes[spec.name] += [m.ByteSize() for m in msgs]
            restored = torch.cat([decode(m) for m in msgs])
            correct[spec.name] += (t(restored)[-1].argmax(1) == labels).tolist()
    n = len(correct["float32"])
    result = {
        "checkpoint": path, "split_point": split, "bottleneck": vars(model.bottleneck.config).copy(),
        "code_shape": list(out.code.shape[1:]), "activation_shape": list(out.activation.shape[1:]),
        "num_images": n, "device_exits": list(h.exit_points),
        "bytes_per_image": {k: summary(np.array(v)) for k, v in sizes.items()},
        "accuracy": {k: float(np.mean(v)) for k, v in correct.items()},
        "ms_per_image": {k: 1000 * v / n for k, v in seconds.items()},
        "flops": flops_shares(model, pre.input_size),
        "train_metrics": {k: v for k, v in ckpt.metrics.items() if k != "history"},
        "train_epochs": len(ckpt.metrics.get("history", [])),
        "train_seconds_per_epoch": float(np.mean([h["seconds"] for h in ckpt.metrics.get("history", [])] or [0])),
    }
    result["accuracy_change_points"] = 100 * (result["accuracy"]["bottleneck"] - result["accuracy"]["float32"])
    result["exit_sweep"] = exit_sweep(torch.cat(exit_conf, 1), torch.cat(exit_correct, 1),
                                      np.array(correct["bottleneck"]), np.array(sizes["ans"]), jpeg[:n],
                                      result["accuracy"]["float32"], h.exit_points)
    return result


def exit_sweep(conf: torch.Tensor, exit_correct: torch.Tensor, cloud_correct: np.ndarray, ans_bytes: np.ndarray,
               jpeg: np.ndarray, cloud_only: float, exit_points: list[int]) -> dict:
    """First-confident-exit policy per threshold over the device exits (``conf``/``exit_correct``: ``(E, N)``);
    uploaded images cost their own ANS payload. ``best``: the lowest bytes/JPEG within ``MAX_LOSS_POINTS`` of
    ``cloud_only`` (the model without codec, every image to the cloud)."""
    rows = []
    for tau in THRESHOLDS:
        answered = np.full(len(cloud_correct), -1)
        for e in reversed(range(conf.shape[0])):  # the first confident exit wins: assign from the last one back
            answered[(conf[e] >= tau).numpy()] = e
        up = answered < 0
        right = np.where(up, cloud_correct, False)
        for e in range(conf.shape[0]):
            right = np.where(answered == e, exit_correct[e].numpy(), right)
        sent = np.where(up, ans_bytes, 0)
        rows.append({"threshold": tau, "uploading_rate": float(up.mean()), "accuracy": float(right.mean()),
                     "exit_rates": [float((answered == e).mean()) for e in range(conf.shape[0])],
                     "bytes_per_image": float(sent.mean()), "bytes_over_jpeg": float(sent.sum() / jpeg.sum())})
    near = [r for r in rows if r["accuracy"] >= cloud_only - MAX_LOSS_POINTS / 100]
    best = min(near, key=lambda r: r["bytes_over_jpeg"]) if near else None
    return {"exit_points": exit_points, "cloud_only_accuracy_without_codec": cloud_only, "rows": rows,
            "best_within_1_point": best}


def markdown(result: dict) -> str:
    lines = [f"# Learned bottleneck on {result['name']} ({result['num_images']} validation images)", "",
             f"Input JPEG files as stored: mean {result['jpeg_bytes']['mean']:.0f} B, "
             f"p95 {result['jpeg_bytes']['p95']:.0f} B. Bytes are the code payload alone (ans: learned prior + "
             "constriction ANS; zstd: int8 code + zstd) or the protobuf message of the activation "
             "(int8/int4+zstd). Accuracy: final classifier; `without` = float32 activation, no codec.", "",
             "| checkpoint | split | device FLOPs | code | ans B mean | ans B p95 | zstd B mean | zstd B p95 "
             "| int4+zstd B | int8+zstd B | acc bottleneck | acc without | change pt | acc int4+zstd "
             "| enc/head | dec/tail | epochs | s/epoch |", "|" + "---|" * 18]
    for r in result["checkpoints"]:
        b, f = r["bytes_per_image"], r["flops"]
        device_share = f["head_flops"] / (f["head_flops"] + f["tail_flops"])
        lines.append(
            f"| {r['checkpoint']} | {r['split_point']} | {100 * device_share:.1f} % | "
            f"{'x'.join(map(str, r['code_shape']))} | {b['ans']['mean']:.1f} | {b['ans']['p95']:.0f} | "
            f"{b['zstd']['mean']:.1f} | {b['zstd']['p95']:.0f} | {b['int4+zstd']['mean']:.0f} | "
            f"{b['int8+zstd']['mean']:.0f} | {r['accuracy']['bottleneck']:.4f} | {r['accuracy']['float32']:.4f} | "
            f"{r['accuracy_change_points']:+.2f} | {r['accuracy']['int4+zstd']:.4f} | "
            f"{100 * f['encoder_share']:.2f} % | {100 * f['decoder_share']:.2f} % | {r['train_epochs']} | "
            f"{r['train_seconds_per_epoch']:.0f} |")
    lines += ["", "## With the device's exits before the split (top-1 confidence, first confident exit)", ""]
    for r in result["checkpoints"]:
        sweep = r["exit_sweep"]
        lines += [f"### {r['checkpoint']} (split {r['split_point']}, device exits {sweep['exit_points']})", "",
                  "| threshold | uploading rate | accuracy | bytes/image (all images) | bytes / input JPEG |",
                  "|---|---|---|---|---|"]
        for row in sweep["rows"]:
            lines.append(f"| {row['threshold']:g} | {row['uploading_rate']:.3f} | {row['accuracy']:.4f} | "
                         f"{row['bytes_per_image']:.1f} | {row['bytes_over_jpeg']:.4f} |")
        best = sweep["best_within_1_point"]
        lines += ["", "Cheapest within 1 point of cloud-only without codec "
                  f"({sweep['cloud_only_accuracy_without_codec']:.4f}): " +
                  ("none" if best is None else f"threshold {best['threshold']:g}, accuracy {best['accuracy']:.4f}, "
                   f"{best['bytes_per_image']:.1f} B/image, {best['bytes_over_jpeg']:.4f} of the input JPEG"), ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    own = ("checkpoints=", "name=", "limit=")
    chosen, names, limits = ([a.split("=", 1)[1] for a in argv if a.startswith(key)] for key in own)
    cfg = parse_app_argv(AppConfig, [a for a in argv if not a.startswith(own)])
    limit = int(limits[-1]) if limits else None  # a quick check on the first images only
    paths = chosen[-1].split(",") if chosen else [str(cfg.checkpoint_path())]
    torch.set_num_threads(max(1, torch.get_num_threads()))
    first = load_checkpoint(paths[0]).preprocess
    val = build_datasets(cfg.dataset, cfg.data_root, first.input_size, first.resize_size, cfg.crop_scale_min,
                         cfg.quickstart_train_samples, cfg.quickstart_val_samples, cfg.seed, with_train=False).val
    jpeg = jpeg_sizes(val)[:limit]
    name = names[-1] if names else "cars_dev"
    result = {"name": name, "num_images": len(jpeg), "jpeg_bytes": summary(jpeg), "checkpoints": []}
    for path in paths:
        r = measure_checkpoint(path, cfg, jpeg, limit)
        result["checkpoints"].append(r)
        b = r["bytes_per_image"]
        print(f"{path}: split {r['split_point']}, ans {b['ans']['mean']:.1f} B (p95 {b['ans']['p95']:.0f}), "
              f"zstd {b['zstd']['mean']:.1f} B, int4+zstd {b['int4+zstd']['mean']:.0f} B; accuracy "
              f"{r['accuracy']['bottleneck']:.4f} vs {r['accuracy']['float32']:.4f} without "
              f"({r['accuracy_change_points']:+.2f} pt); encoder {100 * r['flops']['encoder_share']:.2f} % of the "
              f"head, decoder {100 * r['flops']['decoder_share']:.2f} % of the tail", flush=True)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bottleneck_{name}.json").write_text(json.dumps(result, indent=2))
    (out / f"bottleneck_{name}.md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {out / f'bottleneck_{name}.json'} and .md")


if __name__ == "__main__":
    main(sys.argv[1:])
