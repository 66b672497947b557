"""The learning-rate schedule every training mode shares."""

from __future__ import annotations

import math

from models.app_config import AppConfig


def lr_factor(cfg: AppConfig, step: int, steps_per_epoch: int) -> float:
    """Multiplier of the base lr at optimisation ``step``: linear warm-up, then cosine or step decay."""
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.lr_scheduler == "cosine":
        total = max(1, cfg.num_epochs * steps_per_epoch - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / total)))
    return cfg.lr_gamma ** (step // (cfg.lr_step_epochs * steps_per_epoch))
