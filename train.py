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
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from models.app_config import AppConfig
from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from models.hardware import resolve_device
from models.config import ConfigError, parse_app_argv
from models.datasets import build_datasets
from models.early_exit import EarlyExitMobileNetV2, load_pretrained

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


def lr_factor(cfg: AppConfig, step: int, steps_per_epoch: int) -> float:
    """Multiplier of the base lr at optimisation ``step``: linear warm-up, then cosine or step decay."""
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.lr_scheduler == "cosine":
        total = max(1, cfg.num_epochs * steps_per_epoch - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / total)))
    return cfg.lr_gamma ** (step // (cfg.lr_step_epochs * steps_per_epoch))


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


def joint_loss(
    logits: list[torch.Tensor], target: torch.Tensor, weights: list[float], criterion: nn.Module
) -> torch.Tensor:
    """``L_final + sum_i w_i * L_exit_i``; ``logits`` is exits then final, as the model returns them."""
    loss = criterion(logits[-1], target)
    for w, exit_logits in zip(weights, logits[:-1]):
        loss = loss + w * criterion(exit_logits, target)
    return loss


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, num_outputs: int) -> list[float]:
    """Top-1 accuracy of every output (exits, then final) on ``loader``, summed over DDP ranks."""
    model.eval()
    correct = torch.zeros(num_outputs, dtype=torch.float64, device=device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        for i, out in enumerate(model(images)):
            correct[i] += (out.argmax(1) == labels).sum()
        total += labels.numel()
    if dist.is_initialized():
        dist.all_reduce(correct)
        dist.all_reduce(total)
    return (correct / total.clamp(min=1)).tolist()


def train(cfg: AppConfig) -> dict:
    """Run the whole training job described by ``cfg``; returns the final metrics dict."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo")
    rank = dist.get_rank() if distributed else 0
    is_main = rank == 0
    device = pick_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    seed_everything(cfg.seed + rank)

    data = build_datasets(
        cfg.dataset, cfg.data_root, cfg.image_size, cfg.resize_size, cfg.crop_scale_min,
        cfg.quickstart_train_samples, cfg.quickstart_val_samples, cfg.seed,
    )
    num_classes = cfg.num_classes or len(data.class_names)
    if num_classes != len(data.class_names):
        raise ConfigError(f"config key 'num_classes': {num_classes}, but the dataset has {len(data.class_names)}")
    model = EarlyExitMobileNetV2(cfg.model_config(num_classes))
    load_pretrained(model, cfg.pretrained)
    model.to(device)
    # Re-seed after building: the training stream (dropout, shuffling) then does not depend on how many exits
    # were initialised, so a model with and without exits sees the same batches.
    seed_everything(cfg.seed + rank)
    if is_main:
        table = model.flops()
        log.info("exits at block boundaries %s; exits cost %.1f%% of backbone FLOPs at 224 px",
                 model.exit_points, 100 * table.exits_fraction)

    generator = torch.Generator().manual_seed(cfg.seed)
    train_sampler = DistributedSampler(data.train, seed=cfg.seed) if distributed else None
    val_sampler = DistributedSampler(data.val, shuffle=False) if distributed else None
    loader_args = dict(num_workers=cfg.data_loader_workers, pin_memory=device.type == "cuda",
                       persistent_workers=cfg.data_loader_workers > 0)
    train_loader = DataLoader(data.train, batch_size=cfg.batch_size, shuffle=train_sampler is None,
                              sampler=train_sampler, drop_last=len(data.train) > cfg.batch_size,
                              generator=generator, **loader_args)
    val_loader = DataLoader(data.val, batch_size=cfg.batch_size, sampler=val_sampler, **loader_args)

    optimizer = build_optimizer(cfg, model)
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    weights = cfg.exit_weights()
    log_dir = Path(cfg.log_dir)
    history: list[dict] = []
    start_epoch, best_acc = 0, -1.0

    if cfg.resume:
        last = log_dir / "last_model.pt"
        ckpt = load_checkpoint(last)
        if ckpt.training_state is None:
            raise ConfigError(f"config key 'resume': {last} holds no training state")
        model.load_state_dict(ckpt.model.state_dict())
        optimizer.load_state_dict(ckpt.training_state["optimizer"])
        scaler.load_state_dict(ckpt.training_state["scaler"])
        start_epoch = int(ckpt.training_state["epoch"]) + 1
        best_acc = float(ckpt.training_state["best_acc"])
        history = list(ckpt.metrics.get("history", []))
        log.info("resumed from %s at epoch %d", last, start_epoch)

    net: nn.Module = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if distributed else model
    steps_per_epoch = len(train_loader)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    metrics: dict = {}
    for epoch in range(start_epoch, cfg.num_epochs):
        if train_sampler is not None:
            train_sampler.set_epoch(epoch)
        net.train()
        if cfg.train_mode == "exits_only":
            model.features.eval()  # a frozen backbone keeps its BN statistics too
        started, loss_sum, seen = time.time(), 0.0, 0
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.num_epochs}", disable=not is_main, leave=False)
        for i, (images, labels) in enumerate(bar):
            step = epoch * steps_per_epoch + i
            for g, base in zip(optimizer.param_groups, base_lrs):
                g["lr"] = base * lr_factor(cfg, step, steps_per_epoch)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            autocast = torch.autocast("cuda", dtype=torch.float16) if use_amp else nullcontext()
            with autocast:
                logits = net(images, detach_exits=cfg.train_mode == "detached_exits")
                loss = joint_loss(logits, labels, weights, criterion)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.item() * labels.numel()
            seen += labels.numel()
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}")
        accs = evaluate(net, val_loader, device, len(model.exit_points) + 1)
        row = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "lr": optimizer.param_groups[0]["lr"],
               "seconds": time.time() - started, "final_accuracy": accs[-1],
               **{f"exit{k}_accuracy": a for k, a in zip(model.exit_points, accs[:-1])}}
        history.append(row)
        if is_main:
            log.info("epoch %d: loss %.4f, accuracy per exit %s, final %.4f (%.0f s)", epoch + 1,
                     row["train_loss"], [round(a, 4) for a in accs[:-1]], accs[-1], row["seconds"])
            metrics = {"exit_points": model.exit_points, "val_accuracy_per_exit": accs[:-1],
                       "val_accuracy_final": accs[-1], "epoch": epoch + 1, "history": history}
            is_best = accs[-1] > best_acc
            best_acc = max(best_acc, accs[-1])
            state = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                     "best_acc": best_acc}
            save_checkpoint(log_dir / "last_model.pt", model, data.class_names, data.preprocess, metrics, state)
            if is_best:
                save_checkpoint(log_dir / "best_model.pt", model, data.class_names, data.preprocess, metrics)
            write_log(log_dir, history)
    if distributed:
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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = parse_app_argv(AppConfig, argv)
        train(cfg)
    except (ConfigError, CheckpointError) as err:
        log.error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
