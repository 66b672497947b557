"""Delta upgrades against full packages: bytes until a device holding v1 is within 1 point of v2, side by side.

    python train.py app:apps/cars_dev_train_exits.yml num_epochs=1 image_size=128 resize_size=128 \\
        exit_channels=128 train_mode=joint exit_loss_weights=0.3 pretrained=../shared/models/cars_dev_joint20.pt \\
        seed=1 lr=0.005 warmup_epochs=0 log_dir=runs/cars_dev_ft1_seed1  # v2: v1 fine-tuned one epoch, another seed
    python bench/delta.py app:apps/cars_dev_test.yml checkpoint=runs/cars_dev_ft1_seed1/best_model.pt \\
        --base ../shared/models/cars_dev_joint20.pt --name cars_dev

For each plane coder: v2's full package (``whole`` order, what a device with nothing or another model gets) and
the delta from v1's package weights (models/progressive/delta.py), each applied chunk by chunk to a device-only
model (the final classifier on the evaluation set after about ``--max-points`` chunks spread over the bytes; the
delta's device starts from v1). Reports the whole streams, the bytes from which every later point is within 1 point
of v2's full-precision accuracy, their ratios (goals: delta stream <= 0.5 of the full one, bytes to within 1 point
<= 0.25), and that both end on the same weights (final digests). Writes ``bench/results/delta_<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.progressive import Evaluator, eval_points, load, predictions, within  # noqa: E402
from bench.report import write_results  # noqa: E402
from device.delivery import blank_state  # noqa: E402
from models.app_config import AppConfig  # noqa: E402
from models.bias_correction import bias_inputs  # noqa: E402
from models.checkpoint import checkpoint_from_metadata, checkpoint_metadata, load_checkpoint  # noqa: E402
from models.config import parse_app_argv  # noqa: E402
from models.progressive import PLANE_CODERS, Decoder, Package, build_package, updated_model  # noqa: E402
from models.progressive.delta import build_delta_package, final_weights  # noqa: E402



def point(model: torch.nn.Module, batches: list, labels: torch.Tensor, target: torch.Tensor, **where) -> dict:
    """Accuracy and top-1 agreement with v2's full-precision answers (``target``) of ``model``."""
    got = predictions(model, batches)
    return {**where, "device_accuracy": float((got == labels).float().mean()),
            "agreement": float((got == target).float().mean())}


def curve(package: Package, start: dict[str, torch.Tensor], meta: dict, ev: Evaluator, max_points: int,
          base: dict[str, torch.Tensor] | None, target: torch.Tensor) -> dict:
    """Device-only accuracy and agreement with v2 after the chunks ``eval_points`` picks, the device starting
    from ``start``."""
    m = package.manifest
    labels = torch.cat([y for _, y in ev.batches])
    decoder = Decoder(m, base)
    model = checkpoint_from_metadata(meta, start, "bench", assign=True).model
    wanted = eval_points([c.size for c in m.chunks], max_points)
    points, cum = [point(model, ev.batches, labels, target, chunk=-1, bytes=0, fraction=0.0)], 0
    for i, payload in enumerate(package.payloads):
        model = updated_model(model, decoder.tensors(decoder.apply(i, payload)))
        cum += m.chunks[i].size
        if i in wanted:
            points.append(point(model, ev.batches, labels, target, chunk=i, bytes=cum,
                                fraction=cum / m.float32_bytes))
    return {"total_bytes": m.total_bytes, "chunks": len(m.chunks), "final_sha256": decoder.digest(),
            "points": points}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="v1: the checkpoint the device holds")
    parser.add_argument("--name", default="cars_dev")
    parser.add_argument("--max-points", type=int, default=24)
    parser.add_argument("--limit", type=int, default=None, help="evaluate on the first N images only")
    parser.add_argument("--plane-coders", nargs="+", choices=PLANE_CODERS, default=list(PLANE_CODERS))
    parser.add_argument("--snr-db", type=float, default=0.0, help="the packages' precision floor (delivery_snr_db)")
    args, rest = parser.parse_known_args(argv)
    cfg = parse_app_argv(AppConfig, rest)
    v2, batches = load(cfg, args.limit)
    v1 = load_checkpoint(args.base)
    ev = Evaluator(v2.model, max(v2.model.exit_points), 1.0, cfg.confidence, batches)
    meta = checkpoint_metadata(v2.model, v2.class_names, v2.preprocess)
    state, base = v2.model.state_dict(), final_weights(v1.model.state_dict(), snr_db=args.snr_db)
    full_accuracy = ev.device_final(v2.model)
    target = predictions(v2.model, batches)
    result = {"name": args.name, "command": "python bench/delta.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "images": sum(len(y) for _, y in batches), "v2_accuracy": full_accuracy,
              "v1_accuracy": ev.device_final(v1.model), "snr_db": args.snr_db, "coders": {}}
    for coder in args.plane_coders:
        started = time.perf_counter()
        full = build_package(state, meta, "bench", "2", ev.split_point, v2.model.exit_points, "whole",
                             bias=bias_inputs(v2.model, v2.preprocess.input_size), plane_coder=coder,
                             snr_db=args.snr_db)
        delta = build_delta_package(state, base, meta, "bench", "2", ev.split_point, v2.model.exit_points,
                                    plane_coder=coder, snr_db=args.snr_db)
        built = time.perf_counter() - started
        entry = {"full": curve(full, blank_state(full.manifest), meta, ev, args.max_points, None, target),
                 "delta": curve(delta, base, meta, ev, args.max_points, base, target), "build_s": built}
        for kind in ("full", "delta"):
            entry[kind]["within_1pt_bytes"] = within_bytes(entry[kind]["points"], full_accuracy)
            entry[kind]["agree_99_bytes"] = next((p["bytes"] for i, p in enumerate(entry[kind]["points"])
                                                  if all(q["agreement"] >= 0.99 for q in entry[kind]["points"][i:])),
                                                 None)
        entry["same_final_weights"] = entry["full"]["final_sha256"] == entry["delta"]["final_sha256"]
        result["coders"][coder] = entry
        print(f"{coder}: full {entry['full']['total_bytes']:,} B, delta {entry['delta']['total_bytes']:,} B, "
              f"within 1 pt from {entry['full']['within_1pt_bytes']} / {entry['delta']['within_1pt_bytes']} B",
              flush=True)
    write_results(f"delta_{args.name}", result, markdown(result))
    return 0


def pair(full: int | None, delta: int | None) -> str:
    """``full / delta (ratio)`` of two byte counts (``-`` for one never reached)."""
    text = f"{'-' if full is None else f'{full:,}'} / {'-' if delta is None else f'{delta:,}'}"
    return text + (f" ({delta / full:.3f})" if full and delta is not None else "")


def within_bytes(points: list[dict], target: float) -> int | None:
    """Bytes from which every later evaluated point is within 1 point of ``target`` (None: never)."""
    fraction = within(points, "device_accuracy", target)
    return None if fraction is None else next(p["bytes"] for p in points if p["fraction"] == fraction)


def markdown(result: dict) -> str:
    lines = [f"# Delta upgrades: {result['name']}", "", f"`{result['command']}`", "",
             f"{result['images']} images, device-only final classifier: v1 {result['v1_accuracy']:.4f}, v2 "
             f"{result['v2_accuracy']:.4f} (the target: within 1 point of v2). Precision floor (delivery_snr_db): "
             f"{result.get('snr_db', 0.0):g} dB (0: exact 16-bit).", "",
             "| plane coder | full stream B | delta stream B | delta / full | within 1 pt of v2's accuracy from B "
             "(full / delta) | 99 % of answers as v2's from B (full / delta) | same final weights |",
             "|---|---|---|---|---|---|---|"]
    for coder, e in result["coders"].items():
        f, d = e["full"], e["delta"]
        lines.append(f"| {coder} | {f['total_bytes']:,} | {d['total_bytes']:,} | "
                     f"{d['total_bytes'] / f['total_bytes']:.3f} | {pair(f['within_1pt_bytes'], d['within_1pt_bytes'])}"
                     f" | {pair(f['agree_99_bytes'], d['agree_99_bytes'])} | {e['same_final_weights']} |")
    lines += ["", "Goals: delta stream <= 0.5 of the full one; bytes until within 1 point of v2 <= 0.25 of the full "
              "package's. The delta's device starts on v1's package weights (0 bytes: its first point), which may "
              "already be within 1 point of v2: the agreement column is the stricter measure.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
