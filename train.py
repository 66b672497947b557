"""Train an early-exit MobileNetV2 from an app config.

    python train.py app:apps/quickstart_train.yml [key=value ...]
    torchrun --nproc_per_node=N train.py app:apps/...yml        # DDP, one process per GPU (or CPU, gloo)

Writes ``best_model.pt`` (best final-exit validation accuracy), ``last_model.pt`` (with optimizer state, for
``resume=true``), ``train_log.csv`` and ``train_log.json`` into ``log_dir``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from models.app_config import AppConfig
from models.calibration import calibrate
from models.checkpoint import load_checkpoint, save_checkpoint
from models.cli import app_main
from models.hardware import follow, resolve_device
from models.config import ConfigError, parse_app_argv
from models.datasets import DataBundle, build_datasets
from models.early_exit import EarlyExitMobileNetV2, load_pretrained
from models.schedule import lr_factor

log = logging.getLogger("train")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    device = resolve_device(name)
    if device.type == "cuda" and dist.is_initialized():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def build_optimizer(cfg: AppConfig, model: EarlyExitMobileNetV2) -> torch.optim.Optimizer:
    if cfg.train_mode == "exits_only":
        for p in model.backbone_parameters():
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    # No weight decay on BN and biases (1-D tensors), as in torchvision's reference recipes.
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, mean over the batch.

    ``student``, ``teacher``: ``(B, classes)`` logits. The teacher is detached (an exit learns from the final
    classifier, never the reverse); ``T^2`` keeps the gradient scale independent of ``T`` (Hinton et al.).
    """
    t = temperature
    target = F.log_softmax(teacher.detach().float() / t, dim=-1)
    log_q = F.log_softmax(student.float() / t, dim=-1)
    return F.kl_div(log_q, target, log_target=True, reduction="batchmean") * (t * t)


def joint_loss(
    logits: list[torch.Tensor], target: torch.Tensor, weights: list[float], criterion: nn.Module,
    distill_weight: float = 0.0, distill_temperature: float = 1.0,
) -> torch.Tensor:
    """``L_final + sum_i w_i * L_exit_i``; ``logits`` is exits then final, as the model returns them.

    ``L_exit_i = (1 - a) * CE(exit_i, target) + a * distillation_loss(exit_i, final, T)`` with
    ``a = distill_weight`` (self-distillation: each exit also learns the final classifier's softened output).
    """
    final = logits[-1]
    loss = criterion(final, target)
    for w, exit_logits in zip(weights, logits[:-1]):
        term = criterion(exit_logits, target)
        if distill_weight > 0:
            term = (1 - distill_weight) * term + distill_weight * distillation_loss(
                exit_logits, final, distill_temperature)
        loss = loss + w * term
    return loss


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, num_outputs: int) -> list[float]:
    """Top-1 accuracy of every output (exits, then final) on ``loader``, summed over DDP ranks."""
    model.eval()
    correct = torch.zeros(num_outputs, dtype=torch.float64, device=device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for images, labels in loader:
        images, labels = follow(images, model), labels.to(device)
        for i, out in enumerate(model(images)):
            correct[i] += (out.argmax(1) == labels).sum()
        total += labels.numel()
    if dist.is_initialized():
        dist.all_reduce(correct)
        dist.all_reduce(total)
    return (correct / total.clamp(min=1)).tolist()


@dataclass
class Job:
    """What one training run holds between epochs."""

    cfg: AppConfig
    device: torch.device
    rank: int
    data: DataBundle
    model: EarlyExitMobileNetV2
    net: nn.Module  # the model, wrapped in DDP when distributed
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    train_loader: DataLoader
    val_loader: DataLoader
    train_sampler: DistributedSampler | None
    history: list[dict] = field(default_factory=list)
    start_epoch: int = 0
    best_acc: float = -1.0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def use_amp(self) -> bool:
        return self.cfg.amp and self.device.type == "cuda"


def build_model(cfg: AppConfig, num_classes: int, device: torch.device) -> EarlyExitMobileNetV2:
    """The model of ``cfg``, initialised from ``cfg.pretrained``, on ``device`` (channels-last when
    ``cfg.channels_last``; checkpoints store contiguous tensors either way)."""
    model = EarlyExitMobileNetV2(cfg.model_config(num_classes))
    load_pretrained(model, cfg.pretrained)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def make_loaders(cfg: AppConfig, data: DataBundle, device: torch.device, distributed: bool
                 ) -> tuple[DataLoader, DataLoader, DistributedSampler | None]:
    """Training loader (shuffled, seeded; DDP-sharded when distributed), validation loader, training sampler."""
    generator = torch.Generator().manual_seed(cfg.seed)
    train_sampler = DistributedSampler(data.train, seed=cfg.seed) if distributed else None
    val_sampler = DistributedSampler(data.val, shuffle=False) if distributed else None
    loader_args = dict(num_workers=cfg.data_loader_workers, pin_memory=device.type == "cuda",
                       persistent_workers=cfg.data_loader_workers > 0)
    train_loader = DataLoader(data.train, batch_size=cfg.batch_size, shuffle=train_sampler is None,
                              sampler=train_sampler, drop_last=len(data.train) > cfg.batch_size,
                              generator=generator, **loader_args)
    val_loader = DataLoader(data.val, batch_size=cfg.batch_size, sampler=val_sampler, **loader_args)
    return train_loader, val_loader, train_sampler


def start_job(cfg: AppConfig) -> Job:
    """Process group, device, data, model, optimizer and loaders; the state of ``last_model.pt`` when
    ``cfg.resume``."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo")
    rank = dist.get_rank() if distributed else 0
    device = pick_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    seed_everything(cfg.seed + rank)
    data = build_datasets(
        cfg.dataset, cfg.data_root, cfg.image_size, cfg.resize_size, cfg.crop_scale_min,
        cfg.quickstart_train_samples, cfg.quickstart_val_samples, cfg.seed,
        calibration_fraction=cfg.calibration_fraction,
    )
    num_classes = cfg.num_classes or len(data.class_names)
    if num_classes != len(data.class_names):
        raise ConfigError(f"config key 'num_classes': {num_classes}, but the dataset has {len(data.class_names)}")
    model = build_model(cfg, num_classes, device)
    # Re-seed after building: the training stream (dropout, shuffling) then does not depend on how many exits
    # were initialised, so a model with and without exits sees the same batches.
    seed_everything(cfg.seed + rank)
    if rank == 0:
        table = model.flops()
        log.info("exits at block boundaries %s; exits cost %.1f%% of backbone FLOPs at 224 px",
                 model.exit_points, 100 * table.exits_fraction)
    train_loader, val_loader, train_sampler = make_loaders(cfg, data, device, distributed)
    net: nn.Module = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if distributed else model
    job = Job(cfg, device, rank, data, model, net, build_optimizer(cfg, model),
              torch.amp.GradScaler("cuda", enabled=cfg.amp and device.type == "cuda"),
              train_loader, val_loader, train_sampler)
    if cfg.resume:
        resume(job)
    return job


def resume(job: Job) -> None:
    """Load weights, optimizer, scaler, epoch and history from ``<log_dir>/last_model.pt``."""
    last = Path(job.cfg.log_dir) / "last_model.pt"
    ckpt = load_checkpoint(last)
    if ckpt.training_state is None:
        raise ConfigError(f"config key 'resume': {last} holds no training state")
    job.model.load_state_dict(ckpt.model.state_dict())
    job.optimizer.load_state_dict(ckpt.training_state["optimizer"])
    job.scaler.load_state_dict(ckpt.training_state["scaler"])
    job.start_epoch = int(ckpt.training_state["epoch"]) + 1
    job.best_acc = float(ckpt.training_state["best_acc"])
    job.history = list(ckpt.metrics.get("history", []))
    log.info("resumed from %s at epoch %d", last, job.start_epoch)


def train_one_epoch(job: Job, epoch: int, base_lrs: list[float]) -> float:
    """One pass over the training set; returns the mean training loss."""
    cfg, steps_per_epoch = job.cfg, len(job.train_loader)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    weights = cfg.exit_weights()
    if job.train_sampler is not None:
        job.train_sampler.set_epoch(epoch)
    job.net.train()
    if cfg.train_mode == "exits_only":
        job.model.features.eval()  # a frozen backbone keeps its BN statistics too
    loss_sum, seen = 0.0, 0
    bar = tqdm(job.train_loader, desc=f"epoch {epoch + 1}/{cfg.num_epochs}", disable=not job.is_main, leave=False)
    for i, (images, labels) in enumerate(bar):
        factor = lr_factor(cfg, epoch * steps_per_epoch + i, steps_per_epoch)
        for g, base in zip(job.optimizer.param_groups, base_lrs):
            g["lr"] = base * factor
        images, labels = follow(images, job.model), labels.to(job.device, non_blocking=True)
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.float16) if job.use_amp else nullcontext():
            logits = job.net(images, detach_exits=cfg.train_mode == "detached_exits")
            loss = joint_loss(logits, labels, weights, criterion, cfg.distill_weight, cfg.distill_temperature)
        job.optimizer.zero_grad(set_to_none=True)
        job.scaler.scale(loss).backward()
        job.scaler.step(job.optimizer)
        job.scaler.update()
        loss_sum += loss.item() * labels.numel()
        seen += labels.numel()
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}")
    return loss_sum / max(seen, 1)


def end_epoch(job: Job, epoch: int, train_loss: float, seconds: float) -> dict:
    """Validate, log, and (main rank) write ``last_model.pt``, ``best_model.pt`` and the logs; returns metrics."""
    model = job.model
    accs = evaluate(job.net, job.val_loader, job.device, len(model.exit_points) + 1)
    row = {"epoch": epoch + 1, "train_loss": train_loss, "lr": job.optimizer.param_groups[0]["lr"],
           "seconds": seconds, "final_accuracy": accs[-1],
           **{f"exit{k}_accuracy": a for k, a in zip(model.exit_points, accs[:-1])}}
    job.history.append(row)
    metrics = {"exit_points": model.exit_points, "val_accuracy_per_exit": accs[:-1],
               "val_accuracy_final": accs[-1], "epoch": epoch + 1, "history": job.history}
    if not job.is_main:
        return metrics
    log.info("epoch %d: loss %.4f, accuracy per exit %s, final %.4f (%.0f s)", epoch + 1, train_loss,
             [round(a, 4) for a in accs[:-1]], accs[-1], seconds)
    is_best = accs[-1] > job.best_acc
    job.best_acc = max(job.best_acc, accs[-1])
    log_dir, data = Path(job.cfg.log_dir), job.data
    state = {"optimizer": job.optimizer.state_dict(), "scaler": job.scaler.state_dict(), "epoch": epoch,
             "best_acc": job.best_acc}
    save_checkpoint(log_dir / "last_model.pt", model, data.class_names, data.preprocess, metrics, state)
    if is_best:
        save_checkpoint(log_dir / "best_model.pt", model, data.class_names, data.preprocess, metrics)
    write_log(log_dir, job.history)
    return metrics


def calibrate_best(job: Job) -> dict | None:
    """Fit each output's temperature of ``best_model.pt`` on the held-out calibration images and write it back
    (temperatures in its model config, the report in its metrics). None when nothing was held out."""
    if job.data.calibration is None or not job.is_main:
        return None
    path = Path(job.cfg.log_dir) / "best_model.pt"
    best = load_checkpoint(path, map_location=job.device)
    loader = DataLoader(job.data.calibration, batch_size=job.cfg.batch_size,
                        num_workers=job.cfg.data_loader_workers)
    report = calibrate(best.model, loader, job.device).to_dict()
    save_checkpoint(path, best.model, best.class_names, best.preprocess, {**best.metrics, "calibration": report})
    return report


def train(cfg: AppConfig) -> dict:
    """Run the whole training job described by ``cfg``; returns the final metrics dict."""
    if cfg.train_mode == "bottleneck":
        from models.bottleneck_training import train_bottleneck

        return train_bottleneck(cfg)
    job = start_job(cfg)
    base_lrs = [g["lr"] for g in job.optimizer.param_groups]
    metrics: dict = {}
    started = time.time()
    for epoch in range(job.start_epoch, cfg.num_epochs):
        epoch_start = time.time()
        loss = train_one_epoch(job, epoch, base_lrs)
        metrics = end_epoch(job, epoch, loss, time.time() - epoch_start)
    report = calibrate_best(job)
    if report is not None:
        metrics["calibration"] = report
    if job.is_main:
        log.info("trained epochs %d..%d in %.0f s", job.start_epoch + 1, cfg.num_epochs, time.time() - started)
    if dist.is_initialized():
        dist.destroy_process_group()
    return metrics


def write_log(log_dir: Path, history: list[dict]) -> None:
    """Per-epoch metrics as CSV and JSON."""
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "train_log.json").write_text(json.dumps(history, indent=2))
    with open(log_dir / "train_log.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[-1]))
        writer.writeheader()
        writer.writerows(history)


def main(argv: list[str]) -> int:
    return app_main(lambda args: train(parse_app_argv(AppConfig, args)), argv, "train")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
