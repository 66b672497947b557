import pytest
import torch

from models.config import ConfigError
from models.early_exit import (SPINN_EXIT_FRACTIONS, EarlyExitMobileNetV2, ModelConfig, resolve_exit_points)
from models.partition import head, profile, tail


def test_tail_of_head_equals_full_model_at_every_split(small_model):
    x = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        reference = small_model(x)
        for s in range(small_model.num_blocks + 1):
            h = head(small_model, s)(x)
            outputs = h.exit_logits + tail(small_model, s)(h.activation)
            assert len(outputs) == len(reference), s
            for got, want in zip(outputs, reference):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_head_and_tail_share_weights_not_copies(small_model):
    s = 7
    h, t = head(small_model, s), tail(small_model, s)
    assert h.blocks[0] is small_model.features[0]
    assert t.final is small_model.final
    with torch.no_grad():
        small_model.features[0][0].weight.add_(1.0)
    assert h.blocks[0][0].weight.data_ptr() == small_model.features[0][0].weight.data_ptr()
    # exits before or at the split are on the device, later ones in the cloud
    assert all(k <= s for k in h.exit_points) and all(k > s for k in t.exit_points)
    assert sorted(h.exit_points + t.exit_points) == small_model.exit_points


@pytest.mark.parametrize("bad", [-1, 20, 2.5, True])
def test_bad_split_point_is_refused(small_model, bad):
    with pytest.raises(ValueError, match="split_point"):
        head(small_model, bad)


def test_profile_adds_up(small_model):
    table = small_model.flops(224)
    total = table.backbone + sum(table.exits.values())
    n_params = sum(p.numel() for p in small_model.parameters())
    profiles = profile(small_model)
    assert [p.split_point for p in profiles] == list(range(small_model.num_blocks + 1))
    for p in profiles:
        assert p.device_flops + p.cloud_flops == total
        assert p.device_params + p.cloud_params == n_params
        assert p.activation_bytes == 4 * p.activation_shape[0] * p.activation_shape[1] * p.activation_shape[2]
    assert profiles[0].activation_shape == (3, 224, 224) and profiles[0].device_flops == 0
    assert profiles[-1].activation_shape[1:] == (7, 7)


def test_exit_heads_cost_at_most_ten_percent_of_backbone_at_224():
    model = EarlyExitMobileNetV2(ModelConfig(num_classes=196))  # SPINN's six exits, width 1.0
    table = model.flops(224)
    assert len(model.exit_points) == 6
    assert table.exits_fraction <= 0.10
    # the fractions land near their targets (the nearest block boundary)
    cumulative = [sum(table.blocks[:k]) / sum(table.blocks) for k in range(model.num_blocks + 1)]
    for k, target in zip(model.exit_points, SPINN_EXIT_FRACTIONS):
        assert abs(cumulative[k] - target) < 0.06


def test_forward_returns_every_exit_then_final(small_model):
    out = small_model(torch.randn(2, 3, 32, 32))
    assert len(out) == len(small_model.exit_points) + 1
    assert all(o.shape == (2, 10) for o in out)


def test_exit_resolution_errors_name_the_key():
    flops = [10] * 19
    assert resolve_exit_points([3, 0.45], flops) == [3, 9]  # 9/19 is nearest to 0.45
    with pytest.raises(ConfigError, match=r"exits\[0\]"):
        resolve_exit_points([19], flops)
    with pytest.raises(ConfigError, match="same block boundary"):
        resolve_exit_points([9, 0.45], flops)
    with pytest.raises(ConfigError, match=r"exits\[1\]"):
        ModelConfig(exits=[0.2, 1.5]).validate()


def test_head_steps_match_forward(small_model):
    x = torch.randn(2, 3, 32, 32)
    h = head(small_model, 9)
    with torch.no_grad():
        want = h(x)
        steps = list(h.steps(x))
    assert [b for b, _, _ in steps] == list(range(1, 10))
    assert torch.equal(steps[-1][1], want.activation)
    got = [logits for _, _, logits in steps if logits is not None]
    assert [b for b, _, logits in steps if logits is not None] == h.exit_points
    for a, b in zip(got, want.exit_logits):
        assert torch.equal(a, b)


@pytest.mark.parametrize("size", [32, 33, 97, 128, 224])
def test_activation_shapes_by_arithmetic_equal_a_forward_pass(small_model, size):
    from models.partition import activation_shapes

    with torch.no_grad():
        x, want = torch.randn(1, 3, size, size), {0: (3, size, size)}
        for k, block in enumerate(small_model.features):
            x = block(x)
            want[k + 1] = tuple(x.shape[1:])
    assert activation_shapes(small_model, size) == want
