"""The offline profile a device's scheduler plans from (``python test.py ... split_point=all``).

For every split point 0..N and every threshold of the grid: uploading rate, accuracy and exit rates on an
evaluation set; per split point the encoded bytes of one offload with each codec (mean and p95 over the set),
device and cloud FLOPs; per block and exit head the compute time of one image on the profiling machine. A device
scales those times by what it measures itself, so a profile made on a workstation still plans on a phone.

A model with a learned bottleneck also gets, at the bottleneck's split, the bytes of its code (``learned+ans``,
``learned+zstd``) and ``learned_rows``: the same thresholds with the uploads answered by the final classifier
after the bottleneck's decoder (the code is lossy; the other codecs' rows assume float32 features).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.early_exit import EarlyExitMobileNetV2, run_segment
from models.exit_policy import CachedOutputs, confidence, evaluate_threshold
from models.hardware import follow
from models.partition import bottleneck_at, profile as split_profiles
from proto.codec import CodecSpec, encode, encode_code_message, encode_jpeg, encoded_size

PROFILE_VERSION = 2  # 2: rows carry ``changed``
DEFAULT_CODECS = ("float32+none", "float16+zstd", "int8+zstd", "int4+zstd", "int8-pc+zstd", "int4-pc+zstd")
JPEG = "jpeg"  # the input itself at split point 0, as a JPEG (device config ``input_codec: jpeg``)
LEARNED_CODECS = ("learned+ans", "learned+zstd")  # measured at a bottleneck's split


class ProfileError(ValueError):
    """A profile file is missing, unreadable or not of this version; the message names the file and field."""


@dataclass
class ThresholdOutcome:
    """The first-confident-exit policy at one threshold for one split: fractions of all images."""

    threshold: float
    uploading_rate: float
    accuracy: float  # device exits + the cloud's final classifier for the uploads (float32 features; in
    # ``learned_rows``, after the bottleneck's decoder)
    exit_rates: list[float]  # per device exit of the split, boundary order
    changed: int = 0  # images whose correctness differs from the final classifier's alone (see accuracy_se)

    def accuracy_se(self, num_images: int, final_accuracy: float) -> float:
        """Standard error of ``accuracy - final_accuracy`` measured on ``num_images`` images (a fraction): the
        per-image difference d is -1, 0 or +1, nonzero on the ``changed`` images (0 when nothing differs)."""
        if num_images <= 0:
            return 0.0
        gap = self.accuracy - final_accuracy
        return math.sqrt(max(self.changed / num_images - gap * gap, 0.0) / num_images)


@dataclass
class BytesStats:
    """Size of one offload's encoded features (protobuf ``Tensor``), bytes."""

    mean: float
    p95: float


@dataclass
class SplitEntry:
    split_point: int
    device_exits: list[int]
    activation_shape: list[int]  # (C, H, W)
    device_flops: int  # blocks before the split and every device exit (an image that reaches the split)
    cloud_flops: int
    bytes: dict[str, BytesStats]  # codec name (or "jpeg" at split 0) -> size of one offload
    rows: list[ThresholdOutcome]
    # at a bottleneck's split: the uploads answered through its decoder (module docstring); else empty
    learned_rows: list[ThresholdOutcome] = field(default_factory=list)

    def row(self, threshold: float) -> ThresholdOutcome:
        """The outcome at ``threshold`` (the nearest threshold of the grid)."""
        return min(self.rows, key=lambda r: abs(r.threshold - threshold))

    def rows_for(self, codec: str) -> list[ThresholdOutcome]:
        """The rows of offloads sent with ``codec``: ``learned_rows`` for a learned codec where measured."""
        return self.learned_rows if codec.startswith("learned") and self.learned_rows else self.rows


@dataclass
class OfflineProfile:
    """Everything the scheduler needs about one checkpoint. Times are ms for one image (batch 1)."""

    checkpoint: str
    confidence: str
    num_images: int
    num_blocks: int
    exit_points: list[int]
    thresholds: list[float]
    final_accuracy: float
    block_ms: list[float]  # per block on the profiling machine
    exit_ms: dict[int, float]  # per exit head, by boundary
    final_ms: float  # the final classifier
    splits: list[SplitEntry]
    version: int = PROFILE_VERSION
    bytes_images: int = 0  # images the byte sizes were measured on

    def split(self, split_point: int) -> SplitEntry:
        return self.splits[split_point]

    def to_json(self) -> dict:
        return asdict(self)


def load_profile(path: str | Path) -> OfflineProfile:
    """Read a profile written by ``test.py ... split_point=all``; ProfileError naming the file otherwise."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ProfileError(f"profile {str(path)!r}: cannot be read ({err})") from None
    try:
        return profile_from_json(data)
    except (KeyError, TypeError, ValueError) as err:
        raise ProfileError(f"profile {str(path)!r}: malformed ({type(err).__name__}: {err}); write it again "
                           "with python test.py ... split_point=all") from None


def profile_from_json(data: dict) -> OfflineProfile:
    """The inverse of ``OfflineProfile.to_json``; KeyError/TypeError/ValueError on a malformed document."""
    if data.get("version") != PROFILE_VERSION:
        raise ValueError(f"version {data.get('version')!r}, this code reads {PROFILE_VERSION}")
    splits = [SplitEntry(
        split_point=int(s["split_point"]), device_exits=[int(k) for k in s["device_exits"]],
        activation_shape=[int(v) for v in s["activation_shape"]], device_flops=int(s["device_flops"]),
        cloud_flops=int(s["cloud_flops"]), bytes={k: BytesStats(float(v["mean"]), float(v["p95"]))
                                                  for k, v in s["bytes"].items()},
        rows=_rows(s["rows"]), learned_rows=_rows(s.get("learned_rows", [])))
        for s in data["splits"]]
    out = OfflineProfile(
        checkpoint=str(data["checkpoint"]), confidence=str(data["confidence"]), num_images=int(data["num_images"]),
        num_blocks=int(data["num_blocks"]), exit_points=[int(k) for k in data["exit_points"]],
        thresholds=[float(t) for t in data["thresholds"]], final_accuracy=float(data["final_accuracy"]),
        block_ms=[float(v) for v in data["block_ms"]], exit_ms={int(k): float(v) for k, v in data["exit_ms"].items()},
        final_ms=float(data["final_ms"]), splits=splits, bytes_images=int(data.get("bytes_images", 0)))
    if [s.split_point for s in splits] != list(range(out.num_blocks + 1)):
        raise ValueError("splits must list every split point 0..num_blocks in order")
    if len(out.block_ms) != out.num_blocks:
        raise ValueError(f"block_ms has {len(out.block_ms)} entries for {out.num_blocks} blocks")
    if sorted(out.exit_ms) != sorted(out.exit_points):
        raise ValueError(f"exit_ms is keyed {sorted(out.exit_ms)}, exit_points are {out.exit_points}")
    times = [*out.block_ms, *out.exit_ms.values(), out.final_ms]
    if not all(math.isfinite(t) and t >= 0 for t in times) or sum(times) <= 0:
        raise ValueError("block_ms / exit_ms / final_ms must be finite, >= 0 and not all 0")
    for s in splits:
        _check_split(s, out.num_images)
    return out


def _rows(data: list) -> list[ThresholdOutcome]:
    return [ThresholdOutcome(float(r["threshold"]), float(r["uploading_rate"]), float(r["accuracy"]),
                             [float(x) for x in r["exit_rates"]], int(r["changed"])) for r in data]


def _check_split(s: SplitEntry, num_images: int) -> None:
    """ValueError naming the split and field of an entry no planner can use."""
    if not s.rows:
        raise ValueError(f"split {s.split_point} has no threshold rows")
    if not s.bytes or any(not (b.mean > 0 and b.p95 >= 0) for b in s.bytes.values()):
        raise ValueError(f"split {s.split_point}: bytes must list at least one codec with sizes > 0")
    if s.learned_rows and [r.threshold for r in s.learned_rows] != [r.threshold for r in s.rows]:
        raise ValueError(f"split {s.split_point}: learned_rows must have the thresholds of rows")
    for r in s.rows + s.learned_rows:
        if len(r.exit_rates) != len(s.device_exits):
            raise ValueError(f"split {s.split_point}: exit_rates do not match device_exits")
        shares = [r.uploading_rate, *r.exit_rates]
        if not 0.0 <= r.threshold <= 1.0 or not 0.0 <= r.accuracy <= 1.0 or any(x < 0 for x in shares) \
                or abs(sum(shares) - 1.0) > 1e-3:
            raise ValueError(f"split {s.split_point}, threshold {r.threshold}: threshold and accuracy must be in "
                             "[0, 1] and uploading_rate + exit_rates must be 1")
        if not 0 <= r.changed <= num_images:
            raise ValueError(f"split {s.split_point}, threshold {r.threshold}: changed must be in 0..num_images "
                             f"({num_images}), got {r.changed}")


@dataclass
class _Pass:
    """What one evaluation pass keeps: confidences/correctness per output, offload sizes per split and codec."""

    confidence: list[Tensor] = field(default_factory=list)  # per batch (outputs, B)
    correct: list[Tensor] = field(default_factory=list)
    learned_correct: list[Tensor] = field(default_factory=list)  # per batch (B,): final after the bottleneck
    sizes: dict[tuple[int, str], list[int]] = field(default_factory=dict)
    sized: int = 0


@torch.no_grad()
def _evaluate(model: EarlyExitMobileNetV2, loader: DataLoader, kind: str, codecs: list[CodecSpec],
              bytes_images: int, jpeg: tuple[tuple[float, ...], tuple[float, ...], int]) -> _Pass:
    """One pass: every output's confidence and correctness; encoded sizes at every boundary for the first
    ``bytes_images`` images."""
    seen = _Pass()
    exits = model.exit_map()
    for images, labels in tqdm(loader, desc="profiling", leave=False):
        x = follow(images, model)
        labels = labels.to(x.device)
        outputs = []
        size_now = seen.sized < bytes_images
        if size_now:
            _record_sizes(seen, 0, x, codecs, jpeg)
        for k in range(model.num_blocks):
            x = model.features[k](x)
            if k + 1 in exits:
                outputs.append(exits[k + 1](x))
            if size_now:
                _record_sizes(seen, k + 1, x, codecs, None)
            if bottleneck_at(model, k + 1) is not None:
                _learned_pass(model, x, labels, seen, size_now)
        outputs.append(model.final(x))
        seen.sized += len(labels) if size_now else 0
        seen.confidence.append(torch.stack([confidence(o, kind) for o in outputs]).cpu())
        seen.correct.append(torch.stack([o.argmax(1) == labels for o in outputs]).cpu())
    return seen


def _learned_pass(model: EarlyExitMobileNetV2, x: Tensor, labels: Tensor, seen: _Pass, size_now: bool) -> None:
    """What the cloud answers from the bottleneck's code of the split activation ``x`` ``(B, C, H, W)``: the
    final classifier's correctness after the decoder, and (``size_now``) the code's message size per image."""
    bottleneck = model.bottleneck
    assert bottleneck is not None
    s = bottleneck.config.split_point
    code = bottleneck.encode(x)
    y, _ = run_segment(model.features, {}, bottleneck.decode(code), s, model.num_blocks)
    seen.learned_correct.append((model.final(y).argmax(1) == labels).cpu())
    if size_now:
        for name in LEARNED_CODECS:
            spec = CodecSpec.from_name(name)
            for i in range(code.shape[0]):
                message = encode_code_message(code[i:i + 1], spec, bottleneck.code_counts)
                seen.sizes.setdefault((s, name), []).append(encoded_size(message))


def _record_sizes(seen: _Pass, boundary: int, x: Tensor, codecs: list[CodecSpec],
                  jpeg: Optional[tuple[tuple[float, ...], tuple[float, ...], int]]) -> None:
    for i in range(x.shape[0]):
        one = x[i:i + 1].float().cpu()
        for spec in codecs:
            seen.sizes.setdefault((boundary, spec.name), []).append(encoded_size(encode(one, spec)))
        if jpeg is not None:
            mean, std, quality = jpeg
            seen.sizes.setdefault((boundary, JPEG), []).append(encoded_size(encode_jpeg(one, mean, std, quality)))


def _threshold_rows(cache: CachedOutputs, thresholds: list[float], reference: Optional[Tensor] = None
                    ) -> list[ThresholdOutcome]:
    """One row per threshold; ``changed`` counts differences from ``reference`` (default the cache's final)."""
    rows = []
    for t in thresholds:
        r = evaluate_threshold(cache, t, 0.0, reference)
        rows.append(ThresholdOutcome(t, r.uploading_rate, r.accuracy, r.exit_rates, r.changed))
    return rows


@torch.no_grad()
def time_blocks(model: EarlyExitMobileNetV2, input_size: int, repeats: int = 10) -> tuple[list[float], dict[int, float], float]:
    """Median batch-1 time (ms) of every block, exit head and the final classifier on this machine."""
    p = next(model.parameters())
    x = torch.randn(1, 3, input_size, input_size, device=p.device, dtype=p.dtype)
    exits = model.exit_map()
    block, head, final = [[] for _ in range(model.num_blocks)], {k: [] for k in exits}, []
    for _ in range(repeats + 1):  # the first round warms up allocators and kernels: dropped below
        y = x
        for k in range(model.num_blocks):
            block[k].append(_timed(model.features[k], y))
            y = model.features[k](y)
            if k + 1 in exits:
                head[k + 1].append(_timed(exits[k + 1], y))
        final.append(_timed(model.final, y))
    med = lambda v: float(np.median(v[1:]))  # noqa: E731
    return [med(v) for v in block], {k: med(v) for k, v in head.items()}, med(final)


def _timed(module: torch.nn.Module, x: Tensor) -> float:
    started = time.perf_counter()
    module(x)
    return (time.perf_counter() - started) * 1000.0


def build_profile(model: EarlyExitMobileNetV2, loader: DataLoader, input_size: int, kind: str,
                  thresholds: list[float], checkpoint: str, preprocess_mean: tuple[float, ...],
                  preprocess_std: tuple[float, ...], codecs: tuple[str, ...] = DEFAULT_CODECS,
                  bytes_images: int = 256, jpeg_quality: int = 90) -> OfflineProfile:
    """Profile ``model`` on ``loader`` for every split point and threshold (see the module docstring).

    Accuracies assume float32 features (the codecs' own loss is measured by bench/codec.py: under a point).
    """
    model.eval()
    specs = [CodecSpec.from_name(c) for c in codecs]
    seen = _evaluate(model, loader, kind, specs, bytes_images, (preprocess_mean, preprocess_std, jpeg_quality))
    conf, correct = torch.cat(seen.confidence, dim=1), torch.cat(seen.correct, dim=1)
    block_ms, exit_ms, final_ms = time_blocks(model, input_size)
    static = split_profiles(model, input_size)
    splits = []
    for sp in static:
        idx = [i for i, k in enumerate(model.exit_points) if k <= sp.split_point]
        exit_points = [model.exit_points[i] for i in idx]
        rows = _threshold_rows(CachedOutputs(conf[idx], correct[idx], correct[-1], exit_points), thresholds)
        learned_rows = []
        if bottleneck_at(model, sp.split_point) is not None:
            learned = CachedOutputs(conf[idx], correct[idx], torch.cat(seen.learned_correct), exit_points)
            learned_rows = _threshold_rows(learned, thresholds, reference=correct[-1])
        sizes = {name: BytesStats(float(np.mean(v)), float(np.percentile(v, 95)))
                 for (b, name), v in seen.sizes.items() if b == sp.split_point}
        splits.append(SplitEntry(sp.split_point, list(sp.device_exits), list(sp.activation_shape), sp.device_flops,
                                 sp.cloud_flops, sizes, rows, learned_rows))
    return OfflineProfile(
        checkpoint=checkpoint, confidence=kind, num_images=int(correct.shape[1]), num_blocks=model.num_blocks,
        exit_points=list(model.exit_points), thresholds=list(thresholds),
        final_accuracy=float(correct[-1].float().mean()), block_ms=block_ms, exit_ms=exit_ms, final_ms=final_ms,
        splits=splits, bytes_images=seen.sized)
