"""Progressive delivery benchmark: accuracy after every chunk against cumulative bytes, ours vs the anchor.

    python bench/progressive.py app:apps/quickstart_test.yml --threshold 0.7 --name quickstart
    python bench/progressive.py app:apps/cars_dev_test.yml checkpoint=../shared/models/cars_dev_joint20.pt \
        image_size=128 resize_size=128 --threshold 0.5 --name cars_dev

Any app config works (its checkpoint, dataset and ``split_point``); or ``--imagenet DIR WEIGHTS``: the torchvision
MobileNetV2 weights WEIGHTS (imported as an exit-less checkpoint) on the images of DIR (``labels.csv``:
``filename,imagenet_index``, e.g. ``../shared/data/imagenet_dev_500``), torchvision's preprocessing, split
``--imagenet-split``:

    python bench/progressive.py --imagenet ../shared/data/imagenet_dev_500 \
        ../shared/weights/mobilenet_v2_imagenet_tflite.pth --plane-coders zstd context --name imagenet_coders

Curves, per scheme:

- *system at the split*: the device runs its head and exits at the app's split point with the weights received
  so far and answers when an exit reaches ``--threshold``; the other images go to the cloud, which finishes at
  full precision (from the device's features). Evaluated after every chunk that changes the head.
- *device-only*: the final classifier of the whole model as received so far (what answers when the cloud is
  gone), after every chunk up to ``--max-points`` points spread over the bytes (every chunk for small models).

Schemes: ours (models/progressive/) in the ``split``, ``value`` and ``whole`` orders, the ``value`` order
without the output-bias correction, and the anchor (bench/progressivenet.py: per-tensor range, 2-bit slices,
layer order). ``--device-only``: just the ``value`` (with and without bias correction) and ``whole`` curves,
device-only (cheap enough for a whole test set). ``--plane-coders zstd context``: every scheme of ours once per
plane coder (``models/progressive`` ``PLANE_CODERS``), side by side. Bytes are cumulative chunk payloads (ours) or part sizes
(anchor), as a fraction of the float32 size of the weights. Writes
``bench/results/progressive_<name>.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import progressivenet  # noqa: E402
from bench.report import write_results  # noqa: E402
from device.delivery import blank_state  # noqa: E402
from models.app_config import AppConfig  # noqa: E402
from models.checkpoint import Checkpoint, checkpoint_from_metadata, checkpoint_metadata, load_checkpoint  # noqa
from models.config import parse_app_argv  # noqa: E402
from models.datasets import build_datasets  # noqa: E402
from models.exit_policy import CachedOutputs, confidence, evaluate_threshold  # noqa: E402
from models.partition import Head, tail  # noqa: E402
from models.bias_correction import bias_inputs  # noqa: E402
from models.progressive import (DEFAULT_CORRECTED_PLANES, ORDERS, PLANE_CODERS, Decoder, build_package,  # noqa
                                updated_model)



@dataclass
class Evaluator:
    """Accuracy of partially received models on a fixed evaluation set (``batches`` of ``(x, y)``)."""

    full: torch.nn.Module
    split_point: int
    threshold: float
    confidence: str
    batches: list[tuple[torch.Tensor, torch.Tensor]]

    def __post_init__(self) -> None:
        self.cloud = tail(self.full, self.split_point)

    @torch.no_grad()
    def system(self, model) -> tuple[float, float]:
        """(accuracy, uploading rate) of the device at the split with ``model``'s head, the cloud at full
        precision."""
        conf, correct, final = [], [], []
        head = Head(model, self.split_point)
        for x, y in self.batches:
            out = head(x)
            conf.append(torch.stack([confidence(e, self.confidence) for e in out.exit_logits])
                        if out.exit_logits else torch.zeros(0, len(y)))
            correct.append(torch.stack([e.argmax(1) == y for e in out.exit_logits])
                           if out.exit_logits else torch.zeros(0, len(y), dtype=torch.bool))
            final.append(self.cloud(out.activation)[-1].argmax(1) == y)
        cache = CachedOutputs(torch.cat(conf, 1), torch.cat(correct, 1), torch.cat(final))
        row = evaluate_threshold(cache, self.threshold, 0.0)
        return row.accuracy, row.uploading_rate

    @torch.no_grad()
    def device_final(self, model) -> float:
        right = sum(int((model(x)[-1].argmax(1) == y).sum()) for x, y in self.batches)
        return right / sum(len(y) for _, y in self.batches)


def eval_points(sizes: list[int], max_points: int) -> set[int]:
    """Chunk indices to evaluate: about ``max_points`` spread evenly over log(bytes), and the last one."""
    if len(sizes) <= max_points:
        return set(range(len(sizes)))
    total, cum, chosen, step = sum(sizes), 0, set(), 0
    marks = [total * (0.0005 * (2000 ** (i / (max_points - 1)))) for i in range(max_points)]
    for i, size in enumerate(sizes):
        cum += size
        while step < len(marks) and cum >= marks[step]:
            chosen.add(i)
            step += 1
    return chosen | {len(sizes) - 1}


def ours_curve(ckpt: Checkpoint, ev: Evaluator, order: str, max_points: int, with_system: bool = True,
               dense: Optional[tuple[float, float]] = None, **package_args) -> dict:
    """Ours: build the package, apply its chunks one by one, evaluate (the system at the split too unless
    ``with_system`` is False) at ``max_points`` points and at every chunk ending within ``dense`` (a range of
    shares of the float32 bytes); also times decode + swap per chunk."""
    meta = checkpoint_metadata(ckpt.model, ckpt.class_names, ckpt.preprocess)
    started = time.perf_counter()
    package = build_package(ckpt.model.state_dict(), meta, "bench", "1", ev.split_point, ckpt.model.exit_points,
                            order, **package_args)
    build_s = time.perf_counter() - started
    m = package.manifest
    head_names = {t.name for t in m.tensors if t.part == "head"}
    decoder = Decoder(m)
    model = checkpoint_from_metadata(meta, blank_state(m), "bench", assign=True).model
    wanted = eval_points([c.size for c in m.chunks], max_points)
    if dense is not None:
        ends = np.cumsum([c.size for c in m.chunks]) / m.float32_bytes
        wanted |= {i for i, end in enumerate(ends) if dense[0] <= end <= dense[1]}
    points, cum, system, swap_ms = [], 0, None, []
    for i, payload in enumerate(package.payloads):
        started = time.perf_counter()
        changed = decoder.apply(i, payload)
        model = updated_model(model, decoder.tensors(changed))
        swap_ms.append((time.perf_counter() - started) * 1000)
        cum += m.chunks[i].size
        head_changed = with_system and bool(head_names & set(changed))
        if head_changed:
            system = ev.system(model)
        if head_changed or i in wanted:
            points.append({"chunk": i, "stage": m.chunks[i].stage, "bytes": cum,
                           "fraction": cum / m.float32_bytes, "system_accuracy": system and system[0],
                           "uploading_rate": system and system[1], "head_bits": decoder.progress().head_bits,
                           "device_accuracy": ev.device_final(model) if i in wanted else None})
    return {"order": order, "chunks": len(m.chunks), "total_bytes": m.total_bytes,
            "usable_chunk": m.usable_chunk, "usable_bytes": sum(c.size for c in m.chunks[:m.usable_chunk + 1]),
            "swap_ms_mean": sum(swap_ms) / len(swap_ms), "swap_ms_max": max(swap_ms), "build_s": build_s,
            "plane_coder": m.plane_coder, "points": points}


def anchor_curve(ckpt: Checkpoint, ev: Evaluator) -> dict:
    """The anchor after each of its 8 parts (the device needs whole parts: they hold every tensor)."""
    state = ckpt.model.state_dict()
    meta = checkpoint_metadata(ckpt.model, ckpt.class_names, ckpt.preprocess)
    sizes = progressivenet.part_bytes(state)
    float32 = sum(4 * t.numel() for t in state.values())
    points, cum, bits = [], 0, 0
    for k, size in enumerate(sizes):
        cum += size
        bits += progressivenet.SLICES[k]
        model = checkpoint_from_metadata(meta, progressivenet.decode_state(state, bits), "anchor", assign=True).model
        system = ev.system(model)
        points.append({"part": k + 1, "bits": bits, "bytes": cum, "fraction": cum / float32,
                       "system_accuracy": system[0], "uploading_rate": system[1],
                       "device_accuracy": ev.device_final(model)})
    return {"total_bytes": cum, "points": points}


def within(points: list[dict], key: str, target: float) -> float | None:
    """Smallest byte fraction from which every later evaluated point is within 1 point of ``target``."""
    best = None
    for p in reversed([p for p in points if p.get(key) is not None]):
        if p[key] < target - 0.01:
            break
        best = p["fraction"]
    return best


@torch.no_grad()
def predictions(model: torch.nn.Module, batches: list) -> torch.Tensor:
    """The final classifier's top-1 class for every image of ``batches``, ``(N,)``."""
    return torch.cat([model(x)[-1].argmax(1) for x, _ in batches])


def plain_package_bytes(state: dict[str, torch.Tensor], bits: int) -> int:
    """Per-channel ``bits``-bit weights packed plainly, float32 scales, small tensors whole."""
    total = 0
    for t in state.values():
        coded = t.dtype == torch.float32 and t.dim() >= 2
        total += (t.numel() * bits + 7) // 8 + 4 * t.shape[0] if coded else t.numel() * t.element_size()
    return total


def load_imagenet(folder: str, weights: str, limit: int | None, batch_size: int = 50
                  ) -> tuple[Checkpoint, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The torchvision MobileNetV2 ``weights`` as a checkpoint (no exits) and the images of ``folder`` listed in
    its ``labels.csv`` (``filename,imagenet_index``) with torchvision's preprocessing, in batches."""
    import csv
    import tempfile

    from PIL import Image

    from models.import_torchvision import import_mobilenet_v2

    with tempfile.TemporaryDirectory() as tmp:
        import_mobilenet_v2(weights, f"{tmp}/imagenet.pt")
        ckpt = load_checkpoint(f"{tmp}/imagenet.pt")
    transform = ckpt.preprocess.eval_transform()
    with open(Path(folder) / "labels.csv") as f:
        rows = list(csv.DictReader(f))[:limit]
    xs = [transform(Image.open(Path(folder) / r["filename"]).convert("RGB")) for r in rows]
    ys = torch.tensor([int(r["imagenet_index"]) for r in rows])
    return ckpt, [(torch.stack(xs[i:i + batch_size]), ys[i:i + batch_size]) for i in range(0, len(xs), batch_size)]


def load_either(imagenet: Optional[list[str]], app_args: list[str], limit: int | None
                ) -> tuple[Checkpoint, list[tuple[torch.Tensor, torch.Tensor]]]:
    """``load_imagenet(*imagenet, limit)`` when ``imagenet`` (DIR, WEIGHTS) is given, else ``load`` of the app
    config ``app_args`` name (its checkpoint and validation images)."""
    if imagenet:
        return load_imagenet(*imagenet, limit)
    return load(parse_app_argv(AppConfig, app_args), limit)


def load(cfg: AppConfig, limit: int | None) -> tuple[Checkpoint, list[tuple[torch.Tensor, torch.Tensor]]]:
    ckpt = load_checkpoint(cfg.checkpoint_path())
    pre = ckpt.preprocess
    data = build_datasets(cfg.dataset, cfg.data_root, pre.input_size, pre.resize_size, cfg.crop_scale_min,
                          cfg.quickstart_train_samples, cfg.quickstart_val_samples, cfg.seed, with_train=False)
    batches, seen = [], 0
    for x, y in DataLoader(data.val, batch_size=cfg.batch_size, num_workers=cfg.data_loader_workers):
        batches.append((x, y))
        seen += len(y)
        if limit is not None and seen >= limit:
            break
    return ckpt, batches


def markdown(result: dict) -> str:
    full = result["full"]
    lines = [f"# Progressive delivery: {result['name']}", "",
             f"`{result['command']}`", "",
             f"Split point {result['split_point']}, threshold {result['threshold']}, {result['images']} images; "
             f"float32 weights {result['float32_bytes']:,} B. Full precision: system at the split "
             f"{'-' if full['system_accuracy'] is None else round(full['system_accuracy'], 4)} (uploading "
             f"{'-' if full['uploading_rate'] is None else round(full['uploading_rate'], 3)}), device-only final "
             f"{full['device_accuracy']:.4f}.", "",
             "| scheme | stream bytes | vs plain 16-bit | system within 1 pt from | device-only within 1 pt from |",
             "|---|---|---|---|---|"]
    for name, curve in result["schemes"].items():
        s, d = curve["within_1pt"]["system"], curve["within_1pt"]["device"]
        lines.append(f"| {name} | {curve['total_bytes']:,} | {curve['total_bytes'] / result['plain16_bytes']:.3f} "
                     f"| {'-' if s is None else f'{100 * s:.2f} %'} | {'-' if d is None else f'{100 * d:.2f} %'} |")
    lines += ["", "Percentages are cumulative bytes as a share of the float32 weights (smallest share from which "
              "every later point stays within 1 point of full precision).", ""]
    for name, curve in result["schemes"].items():
        if "swap_ms_mean" in curve:
            lines.append(f"- {name}: {curve['chunks']} chunks, head usable after chunk {curve['usable_chunk']} "
                         f"({curve['usable_bytes']:,} B, {100 * curve['usable_bytes'] / result['float32_bytes']:.2f}"
                         f" %); decode + swap per chunk {curve['swap_ms_mean']:.1f} ms mean, "
                         f"{curve['swap_ms_max']:.1f} ms max.")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, key, title in ((axes[0], "system_accuracy", f"system at split {result['split_point']}"),
                           (axes[1], "device_accuracy", "device-only final classifier")):
        for name, curve in result["schemes"].items():
            pts = [p for p in curve["points"] if p.get(key) is not None]
            ax.plot([100 * p["fraction"] for p in pts], [p[key] for p in pts], marker=".", label=name)
        full = result["full"][key]
        if full is None:  # --device-only
            continue
        ax.axhline(full - 0.01, color="grey", linestyle="--", linewidth=1, label="full precision - 1 pt")
        ax.set_xscale("log")
        ax.set_xlabel("bytes received, % of float32 weights")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[1].legend(loc="lower right")
    fig.suptitle(f"Progressive delivery: {result['name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threshold", type=float, default=0.7, help="device exit confidence threshold")
    parser.add_argument("--name", default="quickstart", help="results file suffix")
    parser.add_argument("--max-points", type=int, default=48, help="device-only evaluations per curve")
    parser.add_argument("--limit", type=int, default=None, help="evaluate on the first N images only")
    parser.add_argument("--usable-planes", type=int, default=7)
    parser.add_argument("--chunk-bytes", type=int, default=16384)
    parser.add_argument("--device-only", action="store_true",
                        help="only the device-only curves of the value (with and without bias correction) and "
                             "whole orders (the whole-model question, cheap enough for a whole test set)")
    parser.add_argument("--orders", nargs="+", choices=ORDERS, default=None, help="only these orders' curves")
    parser.add_argument("--dense", nargs=2, type=float, metavar=("LO", "HI"), default=None,
                        help="also evaluate after every chunk ending between LO and HI percent of the float32 bytes")
    parser.add_argument("--corrected-planes", type=int, default=DEFAULT_CORRECTED_PLANES,
                        help="planes per layer that carry its output-bias correction (0: none)")
    parser.add_argument("--plane-coders", nargs="+", choices=PLANE_CODERS, default=["zstd"],
                        help="run every scheme of ours with each of these plane coders")
    parser.add_argument("--imagenet", nargs=2, metavar=("DIR", "WEIGHTS"), default=None,
                        help="torchvision MobileNetV2 WEIGHTS on DIR/labels.csv instead of an app config")
    parser.add_argument("--imagenet-split", type=int, default=9, help="with --imagenet: the split point")
    args, rest = parser.parse_known_args(argv)
    cfg = parse_app_argv(AppConfig, rest)
    torch.manual_seed(0)
    if args.imagenet:
        ckpt, batches = load_imagenet(*args.imagenet, args.limit)
        split = args.imagenet_split
    else:
        ckpt, batches = load(cfg, args.limit)
        split = cfg.split_point if cfg.split_point is not None else max(ckpt.model.exit_points)
    ev = Evaluator(ckpt.model, split, args.threshold, cfg.confidence, batches)
    system, upload = (None, None) if args.device_only else ev.system(ckpt.model)
    state = ckpt.model.state_dict()
    result = {"name": args.name, "command": "python bench/progressive.py " + " ".join(sys.argv[1:] if argv is None
                                                                                    else argv),
              "split_point": split, "threshold": args.threshold, "images": sum(len(y) for _, y in batches),
              "float32_bytes": sum(4 * t.numel() for t in state.values()), "plain16_bytes":
              plain_package_bytes(state, 16),
              "full": {"system_accuracy": system, "uploading_rate": upload, "device_accuracy": ev.device_final(
                  ckpt.model)}, "schemes": {}}
    bias = bias_inputs(ckpt.model, ckpt.preprocess.input_size)
    schemes = [("split order", "split", args.corrected_planes), ("value order", "value", args.corrected_planes),
               ("value order, no bias correction", "value", 0), ("whole order", "whole", args.corrected_planes)]
    for (name, order, corrected), coder in itertools.product(schemes[1:] if args.device_only else schemes,
                                                             args.plane_coders):
        if args.orders and order not in args.orders:
            continue
        dense = None if args.dense is None else (args.dense[0] / 100, args.dense[1] / 100)
        curve = ours_curve(ckpt, ev, order, args.max_points, not args.device_only, dense,
                           usable_planes=args.usable_planes, chunk_bytes=args.chunk_bytes, bias=bias,
                           corrected_planes=corrected, plane_coder=coder)
        label = f"ours ({name}{'' if coder == 'zstd' else f', {coder} coder'})"
        result["schemes"][label] = curve
        print(f"{label}: {len(curve['points'])} points, {curve['total_bytes']:,} B, built in "
              f"{curve['build_s']:.1f} s", flush=True)
    if not args.device_only:
        result["schemes"]["anchor (ProgressiveNet)"] = anchor_curve(ckpt, ev)
    for curve in result["schemes"].values():
        curve["within_1pt"] = {"system": None if system is None else within(curve["points"], "system_accuracy",
                                                                             system),
                               "device": within(curve["points"], "device_accuracy", result["full"]["device_accuracy"])}
    stem = write_results(f"progressive_{args.name}", result, markdown(result))
    plot(result, stem.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
