"""Shared fixtures: small real models and paths to the optional ../shared data."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))  # train.py / test.py live at the repo root

from models.early_exit import EarlyExitMobileNetV2, ModelConfig  # noqa: E402


@pytest.fixture
def small_model() -> EarlyExitMobileNetV2:
    """A narrow 10-class model with three exits, in eval mode, deterministic weights."""
    torch.manual_seed(0)
    model = EarlyExitMobileNetV2(ModelConfig(width_mult=0.35, num_classes=10, exits=[0.15, 0.45, 0.75],
                                             exit_channels=16))
    # Random BN statistics so that eval mode is not the identity (a stronger equivalence check).
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared (real data and weights) is not present")
    return SHARED
