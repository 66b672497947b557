"""Self-distillation, temperature calibration and where the calibrated confidence is used."""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import train
from cloud.inference import ServedModel, answer, run_tail
from device.runtime import DeviceRuntime
from device.config import DeviceConfig
from models.calibration import calibrate, expected_calibration_error, fit_temperature, temperature_nll
from models.checkpoint import load_checkpoint, save_checkpoint
from models.config import ConfigError, from_dict
from models.datasets import Preprocess
from models.early_exit import EarlyExitMobileNetV2, ModelConfig
from tests.conftest import NAMES, SIZE

PRE = Preprocess(SIZE, SIZE, (0.5,) * 3, (0.25,) * 3)


def test_expected_calibration_error_by_hand():
    # Bin of 0.9 (two images, one right): |0.5 - 0.9|; bin of 0.6 (two images, both right): |1.0 - 0.6|.
    conf = torch.tensor([0.9, 0.9, 0.6, 0.6])
    correct = torch.tensor([True, False, True, True])
    assert expected_calibration_error(conf, correct) == pytest.approx((2 * 0.4 + 2 * 0.4) / 4)
    assert expected_calibration_error(torch.tensor([1.0, 0.0]), torch.tensor([True, False])) == 0.0
    assert expected_calibration_error(torch.zeros(0), torch.zeros(0, dtype=torch.bool)) == 0.0


def test_fitted_temperature_matches_the_closed_form():
    # Two classes, logits (a, 0): three of four images are class 0. The NLL is smallest where
    # sigmoid(a / T) = 3/4, i.e. T = a / ln 3.
    a = 2.0
    logits = torch.tensor([[a, 0.0]] * 4)
    labels = torch.tensor([0, 0, 0, 1])
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(a / math.log(3.0), rel=1e-6)
    assert temperature_nll(logits, labels, t) < min(temperature_nll(logits, labels, t * f) for f in (0.9, 1.1))
    with pytest.raises(ValueError):
        fit_temperature(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))


def test_distillation_loss_by_hand():
    student = torch.tensor([[0.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[math.log(3.0), 0.0]], requires_grad=True)
    # T = 1: teacher (3/4, 1/4), student (1/2, 1/2): KL = 3/4 ln(3/2) + 1/4 ln(1/2).
    want = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert train.distillation_loss(student, teacher, 1.0).item() == pytest.approx(want, rel=1e-6)
    # T = 2: teacher softened to (sqrt3, 1) / (sqrt3 + 1); the loss is scaled by T^2.
    p = math.sqrt(3.0) / (math.sqrt(3.0) + 1.0)
    want2 = 4.0 * (p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p)))
    loss = train.distillation_loss(student, teacher, 2.0)
    assert float(loss) == pytest.approx(want2, rel=1e-6)
    loss.backward()
    assert teacher.grad is None and student.grad is not None  # the final classifier only teaches


def test_joint_loss_mixes_label_and_distillation_terms():
    torch.manual_seed(0)
    logits = [torch.randn(4, 5) for _ in range(3)]
    target = torch.tensor([0, 1, 2, 3])
    ce = nn.CrossEntropyLoss()
    kd = [train.distillation_loss(z, logits[2], 3.0) for z in logits[:2]]
    want = ce(logits[2], target) + 0.5 * (0.75 * ce(logits[0], target) + 0.25 * kd[0]) \
        + 2.0 * (0.75 * ce(logits[1], target) + 0.25 * kd[1])
    got = train.joint_loss(logits, target, [0.5, 2.0], ce, distill_weight=0.25, distill_temperature=3.0)
    torch.testing.assert_close(got, want)


def test_training_config_keys_are_checked():
    from models.app_config import AppConfig

    for key, value in [("distill_weight", 1.5), ("distill_temperature", 0.0), ("calibration_fraction", 0.7)]:
        with pytest.raises(ConfigError, match=key):
            from_dict(AppConfig, {key: value})
    with pytest.raises(ConfigError, match="exit_channels"):
        from_dict(AppConfig, {"exits": [3, 5], "exit_channels": [8, 8, 8]})
    with pytest.raises(ConfigError, match="temperatures"):
        ModelConfig(exits=[3], temperatures=[1.0]).validate()  # one exit + final: two values
    with pytest.raises(ConfigError, match="temperatures"):
        ModelConfig(exits=[3], temperatures=[1.0, -2.0]).validate()


def test_per_exit_widths_build_heads_of_those_widths():
    model = EarlyExitMobileNetV2(ModelConfig(width_mult=0.35, num_classes=10, exits=[3, 9], exit_channels=[8, 24]))
    assert [head[0][0].out_channels for head in model.exits] == [8, 24]


def separable_data(model: EarlyExitMobileNetV2, n: int = 96) -> DataLoader:
    """Images labelled by the model's own final answer, so outputs are right often enough to calibrate."""
    torch.manual_seed(3)
    x = torch.randn(n, 3, SIZE, SIZE)
    with torch.no_grad():
        y = model(x)[-1].argmax(1)
    return DataLoader(TensorDataset(x, y), batch_size=32)


def test_calibrate_sets_temperatures_that_lower_the_nll(small_model):
    loader = separable_data(small_model)
    report = calibrate(small_model, loader, torch.device("cpu"))
    assert small_model.config.temperatures == report.temperatures
    assert len(report.temperatures) == len(small_model.exit_points) + 1 and report.num_images == 96
    x, y = loader.dataset.tensors
    with torch.no_grad():
        calibrated = small_model(x)
    for out, t in zip(calibrated, report.temperatures):
        raw = out * t  # undo the temperature
        assert temperature_nll(raw, y, t) <= temperature_nll(raw, y, 1.0) + 1e-9
    assert sum(report.ece_after) < sum(report.ece_before)
    again = calibrate(small_model, loader, torch.device("cpu"))  # undoes the old temperatures first
    assert again.temperatures == pytest.approx(report.temperatures)


def test_temperatures_survive_a_checkpoint_and_old_checkpoints_still_load(small_model, tmp_path):
    small_model.set_temperatures([2.0, 3.0, 4.0, 0.5])
    path = tmp_path / "cal.pt"
    save_checkpoint(path, small_model, NAMES, PRE)
    loaded = load_checkpoint(path).model
    assert loaded.config.temperatures == [2.0, 3.0, 4.0, 0.5]
    assert [h.temperature for h in loaded.outputs()] == [2.0, 3.0, 4.0, 0.5]
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        for a, b in zip(loaded(x), small_model(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    old = torch.load(path, weights_only=True)
    del old["model_config"]["temperatures"]  # a checkpoint written before calibration existed ...
    del old["digest"]  # ... and before content digests
    torch.save(old, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt").model.config.temperatures is None


def runtime_with(checkpoint_path, threshold: float) -> DeviceRuntime:
    cfg = from_dict(DeviceConfig, {"checkpoint": str(checkpoint_path), "cloud": "127.0.0.1:9", "split_point": 19,
                                   "z_confidence_threshold": threshold, "deadline_ms": 500, "fallback": "final",
                                   "log_level": "WARNING"})
    return DeviceRuntime.start(cfg)


def test_the_device_exits_use_the_calibrated_confidence(small_model, tmp_path):
    """Same weights, only the first exit's temperature differs: sharpened it answers every image, softened
    it answers none (no cloud is listening at this address, so nothing else can answer)."""
    results = {}
    for name, t0 in (("sharp", 1e-3), ("soft", 1e3)):
        small_model.set_temperatures([t0, 1e3, 1e3, 1.0])
        path = tmp_path / f"{name}.pt"
        save_checkpoint(path, small_model, NAMES, PRE)
        runtime = runtime_with(path, threshold=0.5)
        try:
            results[name] = [runtime.classify_tensor(torch.randn(3, SIZE, SIZE)).answered_by for _ in range(5)]
        finally:
            runtime.close()
    first = f"device:exit-{small_model.exit_points[0]}"
    assert results["sharp"] == [first] * 5
    assert first not in results["soft"]


def test_the_cloud_reports_the_calibrated_probability(small_model, tmp_path):
    x = torch.randn(2, 3, SIZE, SIZE)
    probs = {}
    for t in (1.0, 4.0):
        small_model.set_temperatures([1.0, 1.0, 1.0, t])
        path = tmp_path / f"t{t}.pt"
        save_checkpoint(path, small_model, NAMES, PRE)
        served = ServedModel.from_file(str(path), "m", "1")
        logits = run_tail(served, 0, x)
        probs[t] = [p.top_k[0].probability for p in answer(served, 0, logits, 1, 0.0)]
    with torch.no_grad():
        small_model.set_temperatures([1.0] * 4)
        raw = small_model(x)[-1]
    assert probs[4.0] == pytest.approx(torch.softmax(raw / 4.0, 1).max(1).values.tolist(), rel=1e-5)
    assert all(a > b for a, b in zip(probs[1.0], probs[4.0]))


def test_the_calibration_command_fits_an_existing_checkpoint(small_model, tmp_path):
    from models import calibration

    from models.quickstart import CLASS_NAMES

    path = tmp_path / "old.pt"
    save_checkpoint(path, small_model, [str(n) for n in range(10)], PRE)
    assert calibration.main([f"checkpoint={path}", "calibration_fraction=0.1"]) == 2  # not the dataset's classes
    save_checkpoint(path, small_model, CLASS_NAMES, PRE)
    args = [f"checkpoint={path}", "quickstart_train_samples=60", "quickstart_val_samples=8", "image_size=32",
            "calibration_fraction=0.4", "data_loader_workers=0"]
    assert calibration.main(args) == 0
    ckpt = load_checkpoint(path)
    assert ckpt.model.config.temperatures == ckpt.metrics["calibration"]["temperatures"]
    assert ckpt.metrics["calibration"]["num_images"] == 24
    assert calibration.main([f"checkpoint={path}", "calibration_fraction=0"]) == 2
    assert calibration.main([f"checkpoint={tmp_path / 'none.pt'}", "calibration_fraction=0.1"]) == 2
