"""Checkpoint format: everything needed to rebuild and use a trained model, loadable with weights_only=True.

A checkpoint is a plain dict of tensors and builtins (so ``torch.load(..., weights_only=True)`` accepts it):

- ``format``: ``"spinn-checkpoint/1"``
- ``model_config``: ``ModelConfig`` as a dict, exits resolved to block boundaries
- ``state_dict``: the model's weights
- ``class_names``: list of ``num_classes`` strings
- ``metrics``: dict of training metrics (accuracies per exit, epoch, ...)
- ``preprocess``: how images must be preprocessed for this model (``Preprocess`` as a dict)
- ``digest``: the model's content identity (``models.identity.model_digest``), checked on every load; files
  written before it existed have none and get it computed
- ``training_state`` (optional, only in ``last_model.pt``): optimizer/scheduler/scaler states and the epoch,
  for ``resume``
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.config import ConfigError, from_dict
from models.datasets import Preprocess
from models.early_exit import EarlyExitMobileNetV2, ModelConfig
from models.identity import model_digest

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
    digest: str = ""  # models.identity.model_digest; set by load_checkpoint*, empty for models built otherwise

    def metadata(self) -> dict:
        """``checkpoint_metadata`` of this checkpoint."""
        return checkpoint_metadata(self.model, self.class_names, self.preprocess)


def checkpoint_metadata(model: EarlyExitMobileNetV2, class_names: list[str], preprocess: Preprocess) -> dict:
    """What rebuilds the model without its weights (JSON-safe): ``model_config``, ``class_names``, ``preprocess``.

    Raises ValueError when the class names do not match the model's class count.
    """
    if len(class_names) != model.config.num_classes:
        raise ValueError(f"class_names has {len(class_names)} names for {model.config.num_classes} classes")
    return {
        "model_config": dataclasses.asdict(model.config),
        "class_names": list(class_names),
        "preprocess": {
            "input_size": int(preprocess.input_size),
            "resize_size": int(preprocess.resize_size),
            "mean": [float(m) for m in preprocess.mean],
            "std": [float(s) for s in preprocess.std],
        },
    }


def save_checkpoint(
    path: str | Path,
    model: EarlyExitMobileNetV2,
    class_names: list[str],
    preprocess: Preprocess,
    metrics: dict[str, Any] | None = None,
    training_state: dict[str, Any] | None = None,
) -> None:
    """Write a checkpoint atomically (temp file + rename, so a crash never leaves half a file), with its
    content digest."""
    metadata = checkpoint_metadata(model, class_names, preprocess)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    payload: dict[str, Any] = {
        "format": FORMAT,
        **metadata,
        "state_dict": state,
        "metrics": dict(metrics or {}),
        "digest": model_digest(metadata, state),
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
    if "state_dict" not in payload:
        raise CheckpointError(f"checkpoint {source!r} lacks 'state_dict'")
    ckpt = checkpoint_from_metadata(payload, payload["state_dict"], source)
    ckpt.metrics = dict(payload.get("metrics", {}))
    ckpt.training_state = payload.get("training_state")
    ckpt.digest = model_digest(ckpt.metadata(), ckpt.model.state_dict())
    stored = payload.get("digest")
    if stored is not None and stored != ckpt.digest:
        raise CheckpointError(f"checkpoint {source!r}: its content does not match the digest stored in it "
                              f"(stored {stored}, computed {ckpt.digest}): the file was altered")
    return ckpt


def checkpoint_from_metadata(metadata: dict[str, Any], state_dict: dict[str, torch.Tensor], source: str,
                             assign: bool = False) -> Checkpoint:
    """Build the model of ``metadata`` (see ``checkpoint_metadata``) with ``state_dict`` as its weights.

    ``assign=True`` builds the module on the meta device and adopts the given tensors without copying them
    (fast, and the tensors are shared: a caller that never modifies them can swap whole models cheaply).
    Raises CheckpointError naming ``source`` and the missing or malformed key.
    """
    for key in ("model_config", "class_names", "preprocess"):
        if key not in metadata:
            raise CheckpointError(f"checkpoint {source!r} lacks '{key}'")
    try:
        config = from_dict(ModelConfig, metadata["model_config"], source=f"{source} model_config")
        pre = metadata["preprocess"]
        preprocess = Preprocess(int(pre["input_size"]), int(pre["resize_size"]),
                                tuple(float(m) for m in pre["mean"]), tuple(float(s) for s in pre["std"]))
        class_names = [str(n) for n in metadata["class_names"]]
    except (ConfigError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {source!r}: malformed metadata ({err})") from None
    if len(class_names) != config.num_classes:
        raise CheckpointError(f"checkpoint {source!r}: {len(class_names)} class_names for "
                              f"{config.num_classes} classes")
    with torch.device("meta") if assign else contextlib.nullcontext():
        model = EarlyExitMobileNetV2(config, exit_points=[int(k) for k in config.exits])
    try:
        model.load_state_dict(state_dict, strict=True, assign=assign)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {source!r}: weights do not fit its model_config: {err}") from None
    return Checkpoint(model=model.eval(), class_names=class_names, preprocess=preprocess)
