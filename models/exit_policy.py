"""Early-exit decisions: confidence of an exit and the offline evaluation of a confidence threshold.

Policy: the device evaluates its exits in order and answers at the first one whose confidence reaches the
threshold; if none does, it uploads the split activation and the cloud answers with the final classifier.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


def confidence(logits: Tensor, kind: str = "top1") -> Tensor:
    """Confidence of each row of ``logits`` ``(..., classes)`` in [0, 1]; higher means surer.

    ``top1``: the top-1 softmax probability. ``entropy``: ``1 - H(p) / log(classes)`` (1 for a one-hot
    distribution, 0 for a uniform one), so one threshold scale serves both.
    """
    p = torch.softmax(logits.float(), dim=-1)
    if kind == "top1":
        return p.max(dim=-1).values
    if kind == "entropy":
        h = -(p * torch.log(p.clamp_min(1e-12))).sum(-1)
        return 1.0 - h / math.log(logits.shape[-1])
    raise ValueError(f"confidence must be 'top1' or 'entropy', got {kind!r}")


@dataclass
class ThresholdRow:
    """The outcome of one threshold on a cached evaluation.

    Rates and accuracies are fractions of all images; ``exit_accuracies[i]`` is the accuracy on the images
    that exit i answered (None if it answered none).
    """

    threshold: float
    uploading_rate: float
    accuracy: float
    exit_rates: list[float]
    exit_accuracies: list[float | None]
    cloud_accuracy: float | None  # on the uploaded images
    upload_bytes_per_image: float  # mean over all images
    changed: int = 0  # images whose correctness differs from the final classifier's (the accuracy's uncertainty)


@dataclass
class CachedOutputs:
    """Every output of the network on an evaluation set, computed once.

    ``device_confidence``: ``(E, N)`` confidence of each device-side exit; ``device_correct``: ``(E, N)`` bool;
    ``final_correct``: ``(N,)`` bool, the final classifier (the cloud's answer).
    """

    device_confidence: Tensor
    device_correct: Tensor
    final_correct: Tensor
    exit_points: list[int] = field(default_factory=list)


def evaluate_threshold(cache: CachedOutputs, threshold: float, upload_bytes: float,
                       reference: Tensor | None = None) -> ThresholdRow:
    """Apply the first-confident-exit policy at ``threshold`` to ``cache``.

    ``upload_bytes``: bytes sent for one uploaded image (the encoded split activation). ``reference``: ``(N,)``
    bool correctness that ``changed`` counts differences from (default ``cache.final_correct``; a lossy upload
    path, e.g. a learned bottleneck, is compared with the model's own final classifier).
    """
    n = cache.final_correct.numel()
    if reference is not None and reference.shape != cache.final_correct.shape:
        raise ValueError(f"reference: shape {tuple(reference.shape)}, the cache has {n} images")
    e = cache.device_confidence.shape[0]
    undecided = torch.ones(n, dtype=torch.bool)
    correct = torch.zeros(n, dtype=torch.bool)
    rates, accs = [], []
    for i in range(e):
        takes = undecided & (cache.device_confidence[i] >= threshold)
        count = int(takes.sum())
        rates.append(count / n)
        accs.append(float(cache.device_correct[i][takes].float().mean()) if count else None)
        correct |= takes & cache.device_correct[i]
        undecided &= ~takes
    uploaded = int(undecided.sum())
    correct |= undecided & cache.final_correct
    return ThresholdRow(
        threshold=threshold,
        uploading_rate=uploaded / n,
        accuracy=float(correct.float().mean()),
        exit_rates=rates,
        exit_accuracies=accs,
        cloud_accuracy=float(cache.final_correct[undecided].float().mean()) if uploaded else None,
        upload_bytes_per_image=upload_bytes * uploaded / n,
        changed=int((correct != (cache.final_correct if reference is None else reference)).sum()),
    )


def device_only_accuracy(cache: CachedOutputs) -> float | None:
    """Accuracy when nothing is uploaded: each image answered by the deepest device exit (None if no exit)."""
    if cache.device_correct.shape[0] == 0:
        return None
    return float(cache.device_correct[-1].float().mean())
