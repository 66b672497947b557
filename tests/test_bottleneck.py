"""The learned bottleneck codec: shapes, payload codings, the split property, checkpoints, config, training."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from models.app_config import AppConfig
from models.bottleneck import (Bottleneck, BottleneckConfig, LossWeights, bottleneck_loss, decode_payload,
                               encode_payload, flops_shares, quantize_pmf)
from models.bottleneck_codec import CODERS, CodeError, decode_code, encode_code
from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from models.config import ConfigError, from_dict
from models.datasets import Preprocess
from models.early_exit import EarlyExitMobileNetV2, ModelConfig
from models.partition import head, profile, tail

from conftest import BOTTLENECK, BOTTLENECK_SPLIT, NAMES, SIZE, with_bottleneck

SPLIT = BOTTLENECK_SPLIT
CONFIG = BOTTLENECK


def laplace_counts(channels: int, code_max: int, scale: float = 2.0) -> torch.Tensor:
    k = torch.arange(-code_max, code_max + 1, dtype=torch.float64)
    return quantize_pmf(torch.exp(-k.abs() / scale).expand(channels, -1))


def random_code(shape, code_max: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    code = torch.distributions.Laplace(0.0, 2.0).sample(shape).round().clamp(-code_max, code_max).int()
    code.view(-1)[: 2] = torch.tensor([-code_max, code_max], dtype=torch.int32)  # the extremes too
    return code[torch.randperm(code.shape[0], generator=g)]


def test_shapes_and_ranges(small_model):
    model = with_bottleneck(small_model)
    b = model.bottleneck
    a = torch.randn(3, 24, 2, 2) * 5
    code = b.encode(a)
    assert code.shape == (3, 4, 2, 2) and code.dtype == torch.int32
    assert int(code.abs().max()) <= CONFIG.code_max and int(code.abs().max()) > 1
    assert b.decode(code).shape == a.shape
    # Exactly the rounded, clamped latent (the straight-through trick must not shift a value in the cast).
    big = torch.randn(64, 24, 2, 2) * 20
    with torch.no_grad():
        expected = torch.round(b.encoder(big).clamp(-CONFIG.code_max, CONFIG.code_max))
    assert torch.equal(b.encode(big), expected.to(torch.int32))
    out = b(a)
    assert out.reconstruction.shape == a.shape and out.likelihoods.shape == code.shape
    assert bool(((out.likelihoods > 0) & (out.likelihoods <= 1)).all())
    assert b.code_counts.shape == (4, 2 * CONFIG.code_max + 1)
    assert b.code_counts.sum(1).tolist() == [1 << 16] * 4 and bool((b.code_counts >= 1).all())


def test_prior_pmf_is_a_distribution():
    b = Bottleneck(BottleneckConfig(split_point=1, channels=3, code_max=127), 8)
    pmf = b.prior.pmf(127)
    assert pmf.shape == (3, 255)
    # The initial prior spreads over about +-10: nearly all its mass lies inside +-127.
    assert torch.allclose(pmf.sum(1), torch.ones(3, dtype=torch.float64), atol=1e-3)


@pytest.mark.parametrize("coder", CODERS)
def test_payload_round_trip(coder):
    counts = laplace_counts(4, 15)
    for seed, shape in enumerate([(1, 4, 8, 8), (5, 4, 3, 2), (1, 4, 1, 1)]):
        code = random_code(shape, 15, seed)
        payload = encode_code(code, coder, counts)
        assert torch.equal(decode_code(payload, shape, coder, counts), code)


def test_ans_is_near_the_entropy_and_beats_nothing_worse_than_zstd():
    counts = laplace_counts(4, 15)
    code = random_code((16, 4, 8, 8), 15)
    p = counts.double() / counts.sum(1, keepdim=True)
    ideal_bits = -torch.log2(p[torch.arange(4).view(1, 4, 1, 1), code + 15]).sum()
    ans = len(encode_code(code, "ans", counts))
    assert ans * 8 <= ideal_bits * 1.02 + 64  # within 2 % of the model's entropy plus the final state
    assert ans < len(encode_code(code, "zstd", counts))


def test_payload_through_the_bottleneck(small_model):
    model = with_bottleneck(small_model)
    a = torch.randn(2, 24, 2, 2) * 5
    for coder in CODERS:
        payload = encode_payload(model.bottleneck, a, coder)
        restored = decode_payload(model.bottleneck, payload, (2, 4, 2, 2), coder)
        assert torch.equal(restored, model.bottleneck.decode(model.bottleneck.encode(a)))


def test_encode_refuses_codes_out_of_range():
    counts = laplace_counts(4, 15)
    with pytest.raises(CodeError, match="code"):
        encode_code(torch.full((1, 4, 2, 2), 16, dtype=torch.int32), "ans", counts)
    with pytest.raises(CodeError, match="shape"):
        encode_code(torch.zeros(1, 5, 2, 2, dtype=torch.int32), "zstd", counts)


@pytest.mark.parametrize("coder", CODERS)
def test_random_payloads_are_refused(coder):
    """Random bytes of any length: a CodeError naming the payload; the rare stream that happens to decode
    still gives values in range (integrity is the transport's job)."""
    counts = laplace_counts(4, 15)
    rng = np.random.default_rng(0)
    shape = (1, 4, 8, 8)
    refused = 0
    for _ in range(500):
        data = rng.bytes(int(rng.integers(0, 400)))
        try:
            code = decode_code(data, shape, coder, counts)
        except CodeError as err:
            assert str(err).startswith("payload")
            refused += 1
        else:
            assert code.shape == shape and int(code.abs().max()) <= 15
    assert refused >= 495


def test_truncated_and_altered_payloads_are_refused():
    counts = laplace_counts(4, 15)
    shape = (1, 4, 8, 8)
    code = random_code(shape, 15)
    ans = encode_code(code, "ans", counts)
    for bad in (b"", ans[:-1], ans + b"\0", ans[4:], ans + ans):
        with pytest.raises(CodeError, match="payload"):
            decode_code(bad, shape, "ans", counts)
    zstd = encode_code(code, "zstd", counts)
    for bad in (b"", zstd[:-1], zstd[:5]):
        with pytest.raises(CodeError, match="payload"):
            decode_code(bad, shape, "zstd", counts)
    # A valid zstd frame of the right size whose bytes are not codes of this range.
    import zstandard

    out_of_range = zstandard.ZstdCompressor().compress(np.full(256, 100, np.int8).tobytes())
    with pytest.raises(CodeError, match="payload: values outside"):
        decode_code(out_of_range, shape, "zstd", counts)
    # A payload for one shape does not decode as another.
    with pytest.raises(CodeError, match="payload"):
        decode_code(zstd, (1, 4, 8, 4), "zstd", counts)


@pytest.mark.parametrize("shape", [(1, 4, 8), (1, 4, 8, 8, 1), (0, 4, 8, 8), (1, 4, -1, 8), (1, 3, 8, 8),
                                   (1 << 20, 4, 64, 64), (1, 4, 8.0, 8)])
def test_wrong_shapes_are_refused(shape):
    counts = laplace_counts(4, 15)
    for coder in CODERS:
        with pytest.raises(CodeError, match="^shape"):
            decode_code(b"\1\2\3\4", shape, coder, counts)


def test_unknown_coder_and_non_bytes_are_refused():
    counts = laplace_counts(4, 15)
    with pytest.raises(CodeError, match="coder"):
        decode_code(b"1234", (1, 4, 1, 1), "gzip", counts)
    with pytest.raises(CodeError, match="payload"):
        decode_code("1234", (1, 4, 1, 1), "ans", counts)


def test_split_equivalence(small_model):
    """Head (with the encoder) then the tail's decoder and tail equal the full model through the bottleneck."""
    model = with_bottleneck(small_model)
    x = torch.randn(4, 3, SIZE, SIZE)
    with torch.no_grad():
        full = model(x)
        out = head(model, SPLIT)(x)
        t = tail(model, SPLIT)
        cloud = t(t.decode(out.code))
        cloud_direct = t(model.bottleneck.decoder(out.code))
    n_device = len(out.exit_logits)
    assert out.code is not None and out.code.dtype == torch.int32
    for a, b in zip(full, out.exit_logits + cloud):
        assert torch.equal(a, b)
    for a, b in zip(cloud, cloud_direct):
        assert torch.equal(a, b)
    # The bottleneck changes the cloud's outputs (the property is not vacuous) and not the device's exits.
    plain = tail(model, SPLIT)(out.activation)
    assert not torch.allclose(plain[-1], full[-1])
    assert n_device == len([k for k in model.exit_points if k <= SPLIT])


def test_split_elsewhere_is_untouched(small_model):
    model = with_bottleneck(small_model)
    h, t = head(model, SPLIT - 1), tail(model, SPLIT - 1)
    assert h.encoder is None and t.decoder is None
    assert h(torch.randn(1, 3, SIZE, SIZE)).code is None
    with pytest.raises(ValueError, match="no bottleneck at split point 7"):
        t.decode(torch.zeros(1, 4, 2, 2))


def test_checkpoint_round_trip_with_bottleneck(small_model, tmp_path):
    model = with_bottleneck(small_model)
    path = tmp_path / "b.pt"
    save_checkpoint(path, model, NAMES, Preprocess(SIZE, SIZE, (0.5,) * 3, (0.25,) * 3))
    loaded = load_checkpoint(path).model
    assert loaded.config.bottleneck == CONFIG and loaded.bottleneck is not None
    assert torch.equal(loaded.bottleneck.code_counts, model.bottleneck.code_counts)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        for a, b in zip(model(x), loaded(x)):
            assert torch.equal(a, b)


def test_checkpoint_round_trip_without_bottleneck(checkpoint, small_model):
    """A checkpoint with no bottleneck, and one written before the key existed, load as before."""
    loaded = load_checkpoint(checkpoint).model
    assert loaded.bottleneck is None and loaded.config.bottleneck is None
    assert not any(k.startswith("bottleneck") for k in loaded.state_dict())
    payload = torch.load(checkpoint, weights_only=True)
    del payload["model_config"]["bottleneck"]  # as written before bottlenecks existed
    torch.save(payload, checkpoint)
    old = load_checkpoint(checkpoint).model
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        for a, b in zip(small_model(x), old(x)):
            assert torch.equal(a, b)


def test_checkpoint_missing_bottleneck_weights_is_refused(small_model, tmp_path):
    model = with_bottleneck(small_model)
    path = tmp_path / "b.pt"
    save_checkpoint(path, model, NAMES, Preprocess(SIZE, SIZE, (0.5,) * 3, (0.25,) * 3))
    payload = torch.load(path, weights_only=True)
    payload["state_dict"] = {k: v for k, v in payload["state_dict"].items() if not k.startswith("bottleneck.")}
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="bottleneck"):
        load_checkpoint(path)


@pytest.mark.parametrize("change, key", [
    ({"channels": 0}, "bottleneck.channels"), ({"hidden": 0}, "bottleneck.hidden"),
    ({"code_max": 128}, "bottleneck.code_max"), ({"split_point": 0}, "bottleneck.split_point"),
    ({"chanels": 3}, "chanels"),
])
def test_model_config_errors_name_keys(change, key):
    data = dataclasses.asdict(ModelConfig(num_classes=10, bottleneck=BottleneckConfig(split_point=8)))
    data["bottleneck"].update(change)
    with pytest.raises(ConfigError, match=f"'{key}'"):
        from_dict(ModelConfig, data)


def test_split_outside_the_network_names_the_key(small_model):
    with pytest.raises(ConfigError, match="'bottleneck.split_point'"):
        small_model.attach_bottleneck(BottleneckConfig(split_point=19))


@pytest.mark.parametrize("overrides, key", [
    ({"train_mode": "bottleneck", "bottleneck_split": 8}, "base_checkpoint"),
    ({"train_mode": "bottleneck", "base_checkpoint": __file__}, "bottleneck_split"),
    ({"train_mode": "bottleneck", "base_checkpoint": "/no/such.pt", "bottleneck_split": 8}, "base_checkpoint"),
    ({"bottleneck_channels": 0}, "bottleneck_channels"),
    ({"bottleneck_hidden": 0}, "bottleneck_hidden"),
    ({"bottleneck_rate_weight": -1.0}, "bottleneck_rate_weight"),
    ({"bottleneck_kl_weight": float("nan")}, "bottleneck_kl_weight"),
    ({"bottleneck_split": 0}, "bottleneck_split"),
    ({"bottleneck_cache": "yes"}, "bottleneck_cache"),
    ({"bottleneck_cache_views": 0}, "bottleneck_cache_views"),
])
def test_app_config_errors_name_keys(overrides, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        from_dict(AppConfig, overrides)


def test_app_config_bottleneck_accepted():
    cfg = from_dict(AppConfig, {"train_mode": "bottleneck", "base_checkpoint": __file__, "bottleneck_split": 8,
                                "bottleneck_rate_weight": 3e-4})
    assert cfg.bottleneck_rate_weight == 3e-4


def test_training_steps_reduce_the_loss(small_model):
    """A few optimiser steps on one batch lower the loss; the frozen model does not change."""
    model = with_bottleneck(small_model)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("bottleneck")}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.bottleneck.parameters():
        p.requires_grad_(True)
    t = tail(model, SPLIT)
    torch.manual_seed(0)
    a = torch.randn(16, 24, 2, 2) * 3
    with torch.no_grad():
        teacher = t(a)
    weights = LossWeights(rate=1e-3)

    def eval_loss() -> float:  # deterministic: rounded code, BN in eval mode
        model.bottleneck.eval()
        with torch.no_grad():
            out = model.bottleneck(a)
            return bottleneck_loss(out, a, t(out.reconstruction), teacher, weights)[1]["loss"]

    before = eval_loss()
    opt = torch.optim.Adam(model.bottleneck.parameters(), lr=1e-2)
    for _ in range(40):
        model.bottleneck.train()
        out = model.bottleneck(a)
        loss, _ = bottleneck_loss(out, a, t(out.reconstruction), teacher, weights)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_loss() < 0.7 * before
    for k, v in model.state_dict().items():
        if not k.startswith("bottleneck"):
            assert torch.equal(v, frozen[k]), k


def test_flops_shares_small_and_full_width(small_model):
    """Encoder <= 5 % of the head's FLOPs and decoder <= 10 % of the tail's: on the small test model, and on
    the full-width 196-class model at 128 px (measured on the meta device: no memory, no compute)."""
    model = with_bottleneck(small_model)
    shares = flops_shares(model, SIZE)
    assert shares["encoder_flops"] > 0 and shares["decoder_flops"] > 0
    assert shares["encoder_share"] <= 0.05 and shares["decoder_share"] <= 0.10
    for split in (8, 9):
        with torch.device("meta"):
            full = EarlyExitMobileNetV2(ModelConfig(num_classes=196, exits=[3, 5, 9, 13, 15, 18],
                                                    bottleneck=BottleneckConfig(split_point=split)))
        shares = flops_shares(full, 128)
        assert shares["head_flops"] == profile(full, 128)[split].device_flops
        assert shares["encoder_share"] <= 0.05 and shares["decoder_share"] <= 0.10, shares


def test_train_py_bottleneck_mode(tmp_path):
    """``train.py`` with train_mode=bottleneck on a tiny quickstart set writes a checkpoint with a bottleneck
    that changes nothing but the bottleneck."""
    import train
    from models import quickstart

    torch.manual_seed(0)
    base = EarlyExitMobileNetV2(ModelConfig(width_mult=0.35, num_classes=10, exits=[3, 9], exit_channels=8))
    base_path = tmp_path / "base.pt"
    save_checkpoint(base_path, base.eval(), list(quickstart.CLASS_NAMES),
                    Preprocess(32, 32, quickstart.MEAN, quickstart.STD))
    log_dir = tmp_path / "run"
    status = train.main([f"train_mode=bottleneck", f"base_checkpoint={base_path}", "bottleneck_split=8",
                         "bottleneck_channels=2", "bottleneck_hidden=8", "quickstart_train_samples=128",
                         "quickstart_val_samples=64", "batch_size=32", "num_epochs=2", "optimizer=adamw",
                         "bottleneck_cache_views=2", f"bottleneck_cache_dir={tmp_path / 'cache'}",
                         "lr=0.003", "data_loader_workers=0", f"log_dir={log_dir}"])
    assert status == 0
    ckpt = load_checkpoint(log_dir / "best_model.pt")
    assert ckpt.model.config.bottleneck.split_point == 8 and ckpt.model.bottleneck is not None
    assert len(ckpt.metrics["history"]) == 2 and "val_bits_per_image" in ckpt.metrics
    assert ckpt.metrics["val_accuracy_without"] >= 0
    for k, v in base.state_dict().items():
        assert torch.equal(ckpt.model.state_dict()[k], v), k
    # Two views of 128 images were trained on (4 batches of 32 each epoch) and cached on disk for the next run.
    assert sorted(p.name.split("_")[1] for p in (tmp_path / "cache").iterdir()) == ["train", "train", "val"]


def test_train_py_refuses_a_split_outside_the_base(tmp_path, checkpoint):
    import train

    status = train.main(["train_mode=bottleneck", f"base_checkpoint={checkpoint}", "bottleneck_split=19",
                         "image_size=32", f"log_dir={tmp_path}"])
    assert status == 2


def test_shared_checkpoint_still_loads(shared_dir):
    path = shared_dir / "models" / "cars_dev_joint20.pt"
    if not path.is_file():
        pytest.skip("the shared cars dev checkpoint is absent")
    model = load_checkpoint(path).model
    assert model.bottleneck is None and model.exit_points == [3, 5, 9, 13, 15, 18]
