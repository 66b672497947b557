"""Checkpoint format: everything needed to rebuild and use a trained model, loadable with weights_only=True.

A checkpoint is a plain dict of tensors and builtins (so ``torch.load(..., weights_only=True)`` accepts it):

- ``format``: ``"spinn-checkpoint/1"``
- ``model_config``: ``ModelConfig`` as a dict, exits resolved to block boundaries
- ``state_dict``: the model's weights
- ``class_names``: list of ``num_classes`` strings
- ``metrics``: dict of training metrics (accuracies per exit, epoch, ...)
- ``preprocess``: how images must be preprocessed for this model (``Preprocess`` as a dict)
- ``training_state`` (optional, only in ``last_model.pt``): optimizer/scheduler/scaler states and the epoch,
  for ``resume``
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.config import from_dict
from models.datasets import Preprocess
from models.early_exit import EarlyExitMobileNetV2, ModelConfig

FORMAT = "spinn-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or not in this project's format."""


@dataclass
class Checkpoint:
    """A loaded checkpoint. ``model`` is built and has its weights; it is in eval mode."""

    model: EarlyExitMobileNetV2
    class_names: list[str]
    preprocess: Preprocess
    metrics: dict[str, Any] = field(default_factory=dict)
    training_state: dict[str, Any] | None = None


def save_checkpoint(
    path: str | Path,
    model: EarlyExitMobileNetV2,
    class_names: list[str],
    preprocess: Preprocess,
    metrics: dict[str, Any] | None = None,
    training_state: dict[str, Any] | None = None,
) -> None:
    """Write a checkpoint atomically (temp file + rename, so a crash never leaves half a file)."""
    if len(class_names) != model.config.num_classes:
        raise ValueError(f"class_names has {len(class_names)} names for {model.config.num_classes} classes")
    payload: dict[str, Any] = {
        "format": FORMAT,
        "model_config": dataclasses.asdict(model.config),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "class_names": list(class_names),
        "preprocess": {
            "input_size": int(preprocess.input_size),
            "resize_size": int(preprocess.resize_size),
            "mean": [float(m) for m in preprocess.mean],
            "std": [float(s) for s in preprocess.std],
        },
        "metrics": dict(metrics or {}),
    }
    if training_state is not None:
        payload["training_state"] = training_state
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the model from a checkpoint file alone.

    Raises CheckpointError naming the file and what is wrong with it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist (train one with train.py first)")
    return load_checkpoint_bytes(path.read_bytes(), str(path), map_location)


def load_checkpoint_bytes(data: bytes, source: str, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the model from the bytes of a checkpoint file (e.g. downloaded from the cloud).

    ``source`` names where the bytes came from in errors. Raises CheckpointError.
    """
    try:
        payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as err:  # pickle/zip errors of several types: all mean "not a readable checkpoint"
        raise CheckpointError(f"checkpoint {source!r} cannot be read: {err}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {source!r} is not a {FORMAT} file")
    for key in ("model_config", "state_dict", "class_names", "preprocess"):
        if key not in payload:
            raise CheckpointError(f"checkpoint {source!r} lacks '{key}'")
    config = from_dict(ModelConfig, payload["model_config"], source=f"{source} model_config")
    model = EarlyExitMobileNetV2(config, exit_points=[int(k) for k in config.exits])
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {source!r}: weights do not fit its model_config: {err}") from None
    model.eval()
    pre = payload["preprocess"]
    return Checkpoint(
        model=model,
        class_names=list(payload["class_names"]),
        preprocess=Preprocess(
            int(pre["input_size"]), int(pre["resize_size"]), tuple(pre["mean"]), tuple(pre["std"])  # type: ignore
        ),
        metrics=dict(payload.get("metrics", {})),
        training_state=payload.get("training_state"),
    )
