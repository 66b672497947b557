"""Codec benchmark: bytes per image and accuracy change of each feature codec at each split point.

    python bench/codec.py app:apps/cars_dev_test.yml [split_points=all|3,5,9] [key=value ...]

Runs the validation set through head(s) -> encode -> decode -> tail(s) for every codec and compares the final
classifier's accuracy with the float32 path. Writes ``bench/results/codec_<name>.{json,md}``; the JSON's
``defaults`` (the cheapest codec within ``max_loss_points`` of float32, per split point) is what
``apps/cloud.yml: codec_table`` points the cloud at.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.app_config import AppConfig  # noqa: E402
from models.checkpoint import load_checkpoint  # noqa: E402
from models.config import parse_app_argv  # noqa: E402
from models.datasets import build_datasets  # noqa: E402
from models.partition import head, tail  # noqa: E402
from proto.codec import CodecSpec, decode, encode  # noqa: E402

CODECS = [CodecSpec("float16", "zstd"), CodecSpec("int8", "zstd"), CodecSpec("int8", "zstd", per_channel=True),
          CodecSpec("int4", "zstd"), CodecSpec("int4", "zstd", per_channel=True)]
MAX_LOSS_POINTS = 0.5


@torch.no_grad()
def measure(cfg: AppConfig, split_points: list[int] | None) -> dict:
    ckpt = load_checkpoint(cfg.checkpoint_path())
    model, pre = ckpt.model, ckpt.preprocess
    data = build_datasets(cfg.dataset, cfg.data_root, pre.input_size, pre.resize_size, cfg.crop_scale_min,
                          cfg.quickstart_train_samples, cfg.quickstart_val_samples, cfg.seed, with_train=False)
    loader = DataLoader(data.val, batch_size=cfg.batch_size, num_workers=cfg.data_loader_workers)
    splits = split_points if split_points is not None else sorted(set(model.exit_points))
    batches = list(loader)
    n = sum(len(labels) for _, labels in batches)
    table = {}
    for s in splits:
        h, t = head(model, s), tail(model, s)
        correct = {"float32": 0, **{c.name: 0 for c in CODECS}}
        size = {"float32": 0, **{c.name: 0 for c in CODECS}}
        zlib_size = {c.name: 0 for c in CODECS}
        for images, labels in batches:
            activation = h(images).activation
            correct["float32"] += int((t(activation)[-1].argmax(1) == labels).sum())
            size["float32"] += sum(encode(a.unsqueeze(0), CodecSpec("float32", "none")).ByteSize()
                                   for a in activation)
            for codec in CODECS:
                # One message per image: that is what a device sends.
                decoded = []
                for a in activation:
                    msg = encode(a.unsqueeze(0), codec)
                    size[codec.name] += msg.ByteSize()
                    zlib_size[codec.name] += encode(a.unsqueeze(0), CodecSpec(codec.quantization, "zlib",
                                                                              codec.per_channel)).ByteSize()
                    decoded.append(decode(msg))
                correct[codec.name] += int((t(torch.cat(decoded))[-1].argmax(1) == labels).sum())
        rows = {name: {"bytes_per_image": size[name] / n, "accuracy": correct[name] / n,
                       "accuracy_change_points": 100 * (correct[name] - correct["float32"]) / n}
                for name in correct}
        for name, z in zlib_size.items():
            rows[name]["bytes_per_image_zlib"] = z / n
        ok = [c.name for c in CODECS if rows[c.name]["accuracy_change_points"] >= -MAX_LOSS_POINTS]
        default = min(ok, key=lambda name: rows[name]["bytes_per_image"]) if ok else "float16+zstd"
        table[s] = {"codecs": rows, "default": default}
        print(f"split {s}: " + ", ".join(f"{k} {v['bytes_per_image']:.0f} B {v['accuracy_change_points']:+.2f} pt"
                                         for k, v in rows.items()) + f" -> default {default}", flush=True)
    return {"checkpoint": str(cfg.checkpoint_path()), "num_images": n, "max_loss_points": MAX_LOSS_POINTS,
            "split_points": table, "defaults": {str(s): row["default"] for s, row in table.items()}}


def main(argv: list[str]) -> None:
    chosen = [a.split("=", 1)[1] for a in argv if a.startswith("split_points=")]
    cfg = parse_app_argv(AppConfig, [a for a in argv if not a.startswith("split_points=")])
    splits = None  # default: the exit boundaries
    if chosen and chosen[-1] == "all":
        splits = list(range(load_checkpoint(cfg.checkpoint_path()).model.num_blocks + 1))
    elif chosen:
        splits = [int(s) for s in chosen[-1].split(",")]
    result = measure(cfg, splits)
    name = Path(cfg.log_dir).name
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"codec_{name}.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Feature codecs on {name} ({result['num_images']} images); accuracy change vs float32, points",
             "", "| split | codec | bytes/image (zstd) | bytes/image (zlib) | accuracy | change |", "|---|---|---|---|---|---|"]
    for s, row in result["split_points"].items():
        for codec, r in row["codecs"].items():
            mark = " **default**" if codec == row["default"] else ""
            lines.append(f"| {s} | {codec}{mark} | {r['bytes_per_image']:.0f} | {r.get('bytes_per_image_zlib', 0):.0f} "
                         f"| {r['accuracy']:.4f} | {r['accuracy_change_points']:+.2f} |")
    (out / f"codec_{name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / f'codec_{name}.json'} and .md")


if __name__ == "__main__":
    main(sys.argv[1:])
