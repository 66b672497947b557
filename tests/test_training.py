import math

import pytest
import torch
from torch import nn

import train
from models.app_config import AppConfig


def test_joint_loss_is_final_plus_weighted_exits():
    torch.manual_seed(0)
    logits = [torch.randn(4, 5) for _ in range(3)]
    target = torch.tensor([0, 1, 2, 3])
    ce = nn.CrossEntropyLoss()
    want = ce(logits[2], target) + 0.5 * ce(logits[0], target) + 2.0 * ce(logits[1], target)
    torch.testing.assert_close(train.joint_loss(logits, target, [0.5, 2.0], ce), want)


def test_detached_exits_do_not_train_the_backbone(small_model):
    small_model.train()
    x = torch.randn(2, 3, 32, 32)
    exit_only_loss = sum(o.sum() for o in small_model(x, detach_exits=True)[:-1])
    exit_only_loss.backward()
    assert all(p.grad is None for p in small_model.features.parameters())
    assert all(p.grad is not None for p in small_model.exits.parameters())
    small_model.zero_grad(set_to_none=True)
    sum(o.sum() for o in small_model(x)[:-1]).backward()  # joint: exit losses do reach the backbone
    assert small_model.features[0][0].weight.grad is not None


def test_lr_schedule_warmup_cosine_and_step():
    cfg = AppConfig(num_epochs=10, warmup_epochs=1, lr_scheduler="cosine")
    assert train.lr_factor(cfg, 0, 100) == pytest.approx(0.01)
    assert train.lr_factor(cfg, 99, 100) == pytest.approx(1.0)
    assert train.lr_factor(cfg, 100 + 450, 100) == pytest.approx(0.5)
    assert train.lr_factor(cfg, 1000, 100) == pytest.approx(0.0, abs=1e-12)
    step = AppConfig(num_epochs=10, lr_scheduler="step", lr_step_epochs=3, lr_gamma=0.1)
    assert train.lr_factor(step, 299, 100) == 1.0 and train.lr_factor(step, 300, 100) == pytest.approx(0.1)
    assert math.isclose(train.lr_factor(step, 650, 100), 0.01)


def test_exits_only_freezes_the_backbone(small_model):
    cfg = AppConfig(train_mode="exits_only")
    optimizer = train.build_optimizer(cfg, small_model)
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert trained == {id(p) for p in small_model.exits.parameters()}
