"""Train a learned bottleneck into a trained, frozen model: ``python train.py app:... train_mode=bottleneck``.

The model of ``base_checkpoint`` is frozen (weights and BN statistics); only the bottleneck at
``bottleneck_split`` learns, from the frozen model itself: MSE to its activation at the split, KL to its outputs
after the split, plus the rate the prior charges (``models.bottleneck.bottleneck_loss``).

With ``bottleneck_cache: true`` (default) the frozen head's activations and the frozen tail's outputs are
computed once per image (eval transform, no augmentation) and kept in memory: the head is frozen and in eval
mode, so with a fixed input they are exactly what it would compute at every step, and an epoch then costs only
the bottleneck and the tail's forward and backward. ``bottleneck_cache_views`` > 1 adds cached views of every
image (a mirrored one, then random resized crops): augmentation paid once, not per epoch. ``false`` runs the head and the teacher tail on augmented
images at every step instead (slower; see the README for both measured).

Writes into ``log_dir``: ``best_model.pt`` (the base model with the bottleneck, entropy tables refreshed; the
last epoch's, not one picked on the validation set), ``train_log.{csv,json}``.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from torchvision import transforms
from tqdm import tqdm

from models.app_config import AppConfig
from models.bottleneck import BottleneckConfig, LossWeights, bottleneck_loss, kl_to_teacher
from models.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from models.config import ConfigError
from models.datasets import DataBundle, build_datasets
from models.early_exit import EarlyExitMobileNetV2, run_segment
from models.hardware import resolve_device
from models.partition import Tail, tail
from models.schedule import lr_factor

log = logging.getLogger("train.bottleneck")

Batch = tuple[Tensor, list[Tensor], Tensor]  # activation (B, C, H, W), teacher outputs [(B, classes)], labels (B,)


@dataclass
class SplitData:
    """Per image, what the frozen model computes around the split: ``activations`` ``(N, C, H, W)``,
    ``teacher`` its outputs after the split (later exits, then final; each ``(N, classes)`` logits), ``labels``
    ``(N,)``."""

    activations: Tensor
    teacher: list[Tensor]
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[Batch]:
        """Batches in order, or shuffled by ``generator`` (then the last incomplete batch is dropped, as in
        train.py: a batch of one would upset the bottleneck's BN)."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        stop = n - n % batch_size if generator is not None and n > batch_size else n
        for i in range(0, stop, batch_size):
            idx = order[i:i + batch_size]
            yield self.activations[idx], [t[idx] for t in self.teacher], self.labels[idx]


@torch.no_grad()
def frozen_batch(model: EarlyExitMobileNetV2, split_tail: Tail, images: Tensor, labels: Tensor) -> Batch:
    """The frozen model's activation at the split and its outputs after it, for a batch of images."""
    activation, _ = run_segment(model.features, {}, images, 0, split_tail.split_point)
    return activation, split_tail(activation), labels


@torch.no_grad()
def cache_split(model: EarlyExitMobileNetV2, split_tail: Tail, loader: DataLoader, device: torch.device,
                desc: str) -> SplitData:
    """Run the frozen model once over ``loader``, keeping ``SplitData`` (on ``device``)."""
    acts, outs, labels = [], [], []
    for images, y in tqdm(loader, desc=desc, leave=False):
        a, t, _ = frozen_batch(model, split_tail, images.to(device), y)
        acts.append(a)
        outs.append(t)
        labels.append(y.to(device))
    return SplitData(torch.cat(acts), [torch.cat(o) for o in zip(*outs)], torch.cat(labels))


def cached_split(cfg: AppConfig, model: EarlyExitMobileNetV2, split_tail: Tail, dataset, device: torch.device,
                 name: str) -> SplitData:
    """``cache_split`` over ``dataset``, kept in ``bottleneck_cache_dir`` when set: the file's name hashes
    everything the activations depend on (the base checkpoint's bytes, the split, the data and its
    preprocessing), so a run on other inputs never reads a stale file."""
    loader = DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.data_loader_workers)
    if cfg.bottleneck_cache_dir is None:
        return cache_split(model, split_tail, loader, device, f"caching {name}")
    key = hashlib.sha256(Path(str(cfg.base_checkpoint)).read_bytes())
    key.update(json.dumps([split_tail.split_point, cfg.dataset, str(Path(cfg.data_root).resolve()), name,
                           len(dataset), cfg.quickstart_train_samples, cfg.quickstart_val_samples,
                           cfg.seed]).encode())
    path = Path(cfg.bottleneck_cache_dir) / f"split{split_tail.split_point}_{name}_{key.hexdigest()[:16]}.pt"
    if path.is_file():
        saved = torch.load(path, map_location=device, weights_only=True)
        log.info("read the cached %s activations from %s", name, path)
        return SplitData(saved["activations"], list(saved["teacher"]), saved["labels"])
    data = cache_split(model, split_tail, loader, device, f"caching {name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"activations": data.activations, "teacher": data.teacher, "labels": data.labels}, tmp)
    tmp.replace(path)
    return data


def view_dataset(data: DataBundle, view: int, crop_scale_min: float):
    """The training images as cached view ``view``: 0 the eval transform, 1 the same mirrored, 2.. a random
    resized crop + flip (train.py's augmentation)."""
    if view == 0:
        return data.train
    dataset = copy.copy(data.train)
    dataset.transform = (transforms.Compose([transforms.RandomHorizontalFlip(p=1.0), data.preprocess.eval_transform()])
                         if view == 1 else data.preprocess.train_transform(crop_scale_min))
    return dataset


def cache_views(cfg: AppConfig, model: EarlyExitMobileNetV2, split_tail: Tail, data: DataBundle,
                device: torch.device) -> SplitData:
    """``bottleneck_cache_views`` cached views of every training image, one ``SplitData`` (an epoch goes over
    all of them)."""
    views = [cached_split(cfg, model, split_tail, view_dataset(data, v, cfg.crop_scale_min), device,
                          "train" if v == 0 else f"train_view{v}") for v in range(cfg.bottleneck_cache_views)]
    return SplitData(torch.cat([v.activations for v in views]),
                     [torch.cat(t) for t in zip(*(v.teacher for v in views))], torch.cat([v.labels for v in views]))


def train_epoch(model: EarlyExitMobileNetV2, split_tail: Tail, batches: Iterator[Batch], steps: int,
                optimizer: torch.optim.Optimizer, schedule: list[float], weights: LossWeights) -> dict[str, float]:
    """One pass; ``schedule[i]`` is the lr factor of step ``i``. Returns the mean of each loss part."""
    bottleneck = model.bottleneck
    assert bottleneck is not None
    bottleneck.train()
    base = [g["initial_lr"] for g in optimizer.param_groups]
    sums: dict[str, float] = {}
    seen = 0
    for i, (activation, teacher, labels) in enumerate(tqdm(batches, total=steps, leave=False, desc="bottleneck")):
        for g, lr in zip(optimizer.param_groups, base):
            g["lr"] = lr * schedule[i]
        out = bottleneck(activation)
        loss, parts = bottleneck_loss(out, activation, split_tail(out.reconstruction), teacher, weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v * len(labels)
        seen += len(labels)
    return {k: v / max(seen, 1) for k, v in sums.items()}


@torch.no_grad()
def evaluate_split(model: EarlyExitMobileNetV2, split_tail: Tail, data: SplitData, batch_size: int
                   ) -> dict[str, float]:
    """Final-classifier accuracy through the bottleneck (rounded code, as on the wire) and without it, the
    prior's estimate of the code's bits per image, the activation MSE and the final output's KL to the frozen
    model (nats)."""
    bottleneck = model.bottleneck
    assert bottleneck is not None
    bottleneck.eval()
    correct = teacher_correct = bits = mse = kl = 0.0
    for activation, teacher, labels in data.batches(batch_size):
        out = bottleneck(activation)
        final = split_tail(out.reconstruction)[-1]
        correct += float((final.argmax(1) == labels).sum())
        kl += float(kl_to_teacher(final, teacher[-1])) * len(labels)
        teacher_correct += float((teacher[-1].argmax(1) == labels).sum())
        bits += float(out.bits_per_image) * len(labels)
        mse += float(torch.nn.functional.mse_loss(out.reconstruction, activation)) * len(labels)
    n = max(len(data), 1)
    return {"val_accuracy": correct / n, "val_accuracy_without": teacher_correct / n,
            "val_bits_per_image": bits / n, "val_mse": mse / n, "val_kl": kl / n}


def load_base(cfg: AppConfig, device: torch.device) -> Checkpoint:
    """The frozen base model, with a new bottleneck attached at ``cfg.bottleneck_split``."""
    base = load_checkpoint(cfg.base_checkpoint, map_location=device)  # type: ignore[arg-type]
    model = base.model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    config = BottleneckConfig(split_point=int(cfg.bottleneck_split), channels=cfg.bottleneck_channels,  # type: ignore[arg-type]
                              hidden=cfg.bottleneck_hidden)
    if not 1 <= config.split_point <= model.num_blocks - 1:
        raise ConfigError(f"config key 'bottleneck_split': {config.split_point} is outside 1..{model.num_blocks - 1}")
    model.attach_bottleneck(config)
    return base


def load_data(cfg: AppConfig, base: Checkpoint) -> DataBundle:
    """Training and validation images, preprocessed as the base model was trained (its checkpoint decides)."""
    pre = base.preprocess
    if cfg.image_size != pre.input_size:
        raise ConfigError(f"config key 'image_size': {cfg.image_size}, the base checkpoint wants {pre.input_size}")
    data = build_datasets(cfg.dataset, cfg.data_root, pre.input_size, pre.resize_size, cfg.crop_scale_min,
                          cfg.quickstart_train_samples, cfg.quickstart_val_samples, cfg.seed,
                          augment=not cfg.bottleneck_cache)
    if data.class_names != base.class_names:
        raise ConfigError(f"config key 'dataset': its classes differ from the base checkpoint's")
    return data


def make_optimizer(cfg: AppConfig, model: EarlyExitMobileNetV2) -> torch.optim.Optimizer:
    """AdamW or SGD over the bottleneck's parameters; weight decay on conv weights only."""
    assert model.bottleneck is not None
    params = list(model.bottleneck.parameters())
    groups = [{"params": [p for p in params if p.ndim == 4], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim != 4], "weight_decay": 0.0}]
    for g in groups:
        g["initial_lr"] = cfg.lr
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def train_bottleneck(cfg: AppConfig) -> dict:
    """Train the bottleneck of ``cfg`` into the frozen ``base_checkpoint``; returns the last epoch's metrics."""
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    base = load_base(cfg, device)
    model, split = base.model, int(cfg.bottleneck_split)  # type: ignore[arg-type]
    data = load_data(cfg, base)
    split_tail = tail(model, split)
    loader_args = dict(batch_size=cfg.batch_size, num_workers=cfg.data_loader_workers)
    started = time.time()
    val = cached_split(cfg, model, split_tail, data.val, device, "val")
    train_cache = cache_views(cfg, model, split_tail, data, device) if cfg.bottleneck_cache else None
    log.info("cached the frozen model's split-%d activations in %.0f s (%s)", split, time.time() - started,
             "train and val" if train_cache is not None else "val only")
    generator = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(data.train, shuffle=True, drop_last=True, generator=generator, **loader_args)
    steps = len(train_cache) // cfg.batch_size if train_cache is not None else len(loader)
    optimizer = make_optimizer(cfg, model)
    weights = LossWeights(cfg.bottleneck_rate_weight, cfg.bottleneck_mse_weight, cfg.bottleneck_kl_weight,
                          cfg.bottleneck_exit_kl_weight)
    history: list[dict] = []
    for epoch in range(cfg.num_epochs):
        t0 = time.time()
        batches = (train_cache.batches(cfg.batch_size, generator) if train_cache is not None else
                   (frozen_batch(model, split_tail, x.to(device), y.to(device)) for x, y in loader))
        schedule = [lr_factor(cfg, epoch * steps + i, steps) for i in range(steps)]
        parts = train_epoch(model, split_tail, batches, steps, optimizer, schedule, weights)
        seconds = time.time() - t0
        row = {"epoch": epoch + 1, **{f"train_{k}": v for k, v in parts.items()}, "seconds": seconds,
               **evaluate_split(model, split_tail, val, cfg.batch_size)}
        history.append(row)
        log.info("epoch %d: %s", epoch + 1, ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch"))
        save_result(cfg, base, history)
    return history[-1] if history else {}


def save_result(cfg: AppConfig, base: Checkpoint, history: list[dict]) -> None:
    """``best_model.pt`` (entropy tables refreshed from the prior) and the logs, in ``log_dir``."""
    model = base.model
    assert model.bottleneck is not None
    model.bottleneck.update_tables()
    keys = [k for k in vars(cfg) if k.startswith("bottleneck_")] + ["lr", "optimizer", "num_epochs", "batch_size"]
    metrics = {**history[-1], "history": history, "base_checkpoint": str(cfg.base_checkpoint),
               "train_config": {k: getattr(cfg, k) for k in keys},
               "val_accuracy_final": history[-1]["val_accuracy"], "exit_points": model.exit_points}
    out = Path(cfg.log_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / "best_model.pt", model, base.class_names, base.preprocess, metrics)
    (out / "train_log.json").write_text(json.dumps(history, indent=2))
    with open(out / "train_log.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[-1]))
        writer.writeheader()
        writer.writerows(history)
