import pytest
import torch
import torchvision

from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from models.config import ConfigError
from models.datasets import Preprocess
from models.early_exit import EarlyExitMobileNetV2, ModelConfig, load_pretrained

PRE = Preprocess(32, 36, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def test_round_trip_rebuilds_the_same_model(small_model, tmp_path):
    names = [f"class{i}" for i in range(10)]
    path = tmp_path / "m.pt"
    save_checkpoint(path, small_model, names, PRE, {"val_accuracy_final": 0.5})
    raw = torch.load(path, weights_only=True)  # the format must stay weights_only-safe
    assert raw["model_config"]["exits"] == small_model.exit_points
    ckpt = load_checkpoint(path)
    assert ckpt.class_names == names and ckpt.preprocess == PRE
    assert ckpt.metrics["val_accuracy_final"] == 0.5
    assert ckpt.model.exit_points == small_model.exit_points
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(ckpt.model(x), small_model(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_checkpoints_are_refused_with_the_file_named(small_model, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(garbage)
    plain = tmp_path / "plain.pt"
    torch.save(small_model.state_dict(), plain)
    with pytest.raises(CheckpointError, match="not a spinn-checkpoint"):
        load_checkpoint(plain)
    with pytest.raises(ValueError, match="class_names"):
        save_checkpoint(tmp_path / "x.pt", small_model, ["a"], PRE)


def test_pretrained_from_a_local_torchvision_file(tmp_path):
    torch.manual_seed(1)
    reference = torchvision.models.mobilenet_v2()
    path = tmp_path / "mnv2.pth"
    torch.save(reference.state_dict(), path)
    model = EarlyExitMobileNetV2(ModelConfig(num_classes=7))
    load_pretrained(model, str(path))
    torch.testing.assert_close(model.features[5].conv[0][0].weight, reference.features[5].conv[0][0].weight)
    assert model.final.classifier[1].weight.shape == (7, 1280)  # replaced for num_classes
    same = EarlyExitMobileNetV2(ModelConfig(num_classes=1000))
    load_pretrained(same, str(path))
    torch.testing.assert_close(same.final.classifier[1].weight, reference.classifier[1].weight)
    narrow = EarlyExitMobileNetV2(ModelConfig(num_classes=7, width_mult=0.5))
    with pytest.raises(ConfigError, match="pretrained.*width_mult"):
        load_pretrained(narrow, str(path))
    with pytest.raises(ConfigError, match="pretrained"):
        load_pretrained(model, str(tmp_path / "missing.pth"))


def test_imagenet_download_failure_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # nothing cached
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # a closed port: the download must fail
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    model = EarlyExitMobileNetV2(ModelConfig(num_classes=7, exits=[5]))
    with pytest.raises(ConfigError, match="pretrained.*download"):
        load_pretrained(model, "imagenet")


def test_shared_imagenet_weights_load(shared_dir):
    path = shared_dir / "weights" / "mobilenet_v2_imagenet_tflite.pth"
    if not path.is_file():
        pytest.skip("no shared weights file")
    model = EarlyExitMobileNetV2(ModelConfig(num_classes=196))
    load_pretrained(model, str(path))
    state = torch.load(path, weights_only=True)
    torch.testing.assert_close(model.features[0][0].weight, state["features.0.0.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.features[18][1].running_var, state["features.18.1.running_var"],
                               rtol=0, atol=0)
