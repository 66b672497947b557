"""Coarser final precision (``delivery_snr_db``): the whole stream against the final model's accuracy, side by side
with exact 16-bit planes in one run.

    python bench/final_precision.py app:apps/cars_dev_test.yml checkpoint=../shared/models/cars_dev_joint20.pt \\
        image_size=128 resize_size=128 --snr-db 0 50 45 40 --name cars_dev
    python bench/final_precision.py --imagenet ../shared/data/imagenet_dev_500 \\
        ../shared/weights/mobilenet_v2_imagenet_tflite.pth --snr-db 0 50 45 40 --name imagenet

For each floor (0: every plane exact, the default): the ``whole`` package's bytes (zstd planes, output-bias
correction on), their ratio to plain per-channel 16-bit (goal <= 0.7), and the final weights' top-1 accuracy and
agreement with the float32 model's answers on the evaluation set (final classifier, the model alone). Writes
``bench/results/final_precision_<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.progressive import load_either, plain_package_bytes, predictions  # noqa: E402
from bench.report import write_results  # noqa: E402
from models.bias_correction import bias_inputs  # noqa: E402
from models.checkpoint import Checkpoint, checkpoint_from_metadata, checkpoint_metadata  # noqa: E402
from models.progressive import Decoder, build_package  # noqa: E402



def floor_row(ckpt: Checkpoint, batches: list, snr_db: float, reference: torch.Tensor, plain: int) -> dict:
    """Build the ``whole`` package at ``snr_db``, decode it whole, and measure the final weights."""
    model, meta = ckpt.model, checkpoint_metadata(ckpt.model, ckpt.class_names, ckpt.preprocess)
    started = time.perf_counter()
    package = build_package(model.state_dict(), meta, "bench", "1", 9,
                            model.exit_points, "whole", bias=bias_inputs(model, ckpt.preprocess.input_size),
                            snr_db=snr_db)
    built = time.perf_counter() - started
    decoder = Decoder(package.manifest)
    for i, payload in enumerate(package.payloads):
        decoder.apply(i, payload)
    final = checkpoint_from_metadata(meta, decoder.state_dict(), "bench", assign=True).model.eval()
    got, labels = predictions(final, batches), torch.cat([y for _, y in batches])
    return {"snr_db": snr_db, "total_bytes": package.manifest.total_bytes,
            "vs_plain16": package.manifest.total_bytes / plain, "accuracy": float((got == labels).float().mean()),
            "agreement": float((got == reference).float().mean()), "build_s": built}


def markdown(result: dict) -> str:
    lines = [f"# Coarser final precision: {result['name']}", "", f"`{result['command']}`", "",
             f"{result['images']} images; float32 model: top-1 {result['float_accuracy']:.4f}. Plain per-channel "
             f"16-bit: {result['plain16_bytes']:,} B.", "",
             "| delivery_snr_db | whole stream B | vs plain 16-bit | final top-1 | agreement with float32 |",
             "|---|---|---|---|---|"]
    for r in result["rows"]:
        floor = "0 (exact 16-bit)" if r["snr_db"] == 0 else f"{r['snr_db']:g}"
        lines.append(f"| {floor} | {r['total_bytes']:,} | {r['vs_plain16']:.3f} | {r['accuracy']:.4f} | "
                     f"{r['agreement']:.4f} |")
    lines += ["", "Goal: the whole stream <= 0.7 of plain 16-bit. Depthwise kernels stay exact at every floor "
              "(models/progressive/planes.py says why).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--snr-db", nargs="+", type=float, default=[0.0, 50.0, 45.0, 40.0])
    parser.add_argument("--imagenet", nargs=2, metavar=("DIR", "WEIGHTS"), default=None,
                        help="the torchvision MobileNetV2 WEIGHTS on the images of DIR (labels.csv)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate on the first N images only")
    parser.add_argument("--name", default="cars_dev")
    args, rest = parser.parse_known_args(argv)
    ckpt, batches = load_either(args.imagenet, rest, args.limit)
    ckpt.model.eval()
    reference = predictions(ckpt.model, batches)
    labels = torch.cat([y for _, y in batches])
    plain = plain_package_bytes(ckpt.model.state_dict(), 16)
    result = {"name": args.name, "images": len(labels), "plain16_bytes": plain,
              "float_accuracy": float((reference == labels).float().mean()),
              "command": "python bench/final_precision.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "rows": []}
    for snr_db in args.snr_db:
        result["rows"].append(floor_row(ckpt, batches, snr_db, reference, plain))
        print(json.dumps(result["rows"][-1]), flush=True)
    write_results(f"final_precision_{args.name}", result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
