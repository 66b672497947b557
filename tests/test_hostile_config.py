"""Inputs that used to end in a traceback or a wrong value: each now gets an error naming the key or file."""

import subprocess
import sys

import pytest
import torch

from models.app_config import AppConfig
from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from models.config import ConfigError, load_config, parse_app_argv
from models.datasets import Preprocess
from models.early_exit import EarlyExitMobileNetV2, ModelConfig, load_pretrained
from tests.conftest import NAMES, ROOT, SIZE


def test_exponent_floats_are_floats_on_the_command_line_and_in_files(tmp_path):
    cfg = parse_app_argv(AppConfig, ["lr=1e-3", "weight_decay=4E-5", "warmup_epochs=+2e0"])
    assert cfg.lr == 1e-3 and cfg.weight_decay == 4e-5 and cfg.warmup_epochs == 2.0
    (tmp_path / "a.yml").write_text("lr: 5e-2\nlog_dir: 1e3run\n")
    cfg = load_config(AppConfig, tmp_path / "a.yml")
    assert cfg.lr == 0.05 and cfg.log_dir == "1e3run"  # only whole numbers in exponent form are floats


def test_a_binary_file_as_config_is_named(tmp_path):
    path = tmp_path / "model.yml"
    path.write_bytes(b"\x80\x04\x95PK\x03\x04\xff\xfe" * 20)
    with pytest.raises(ConfigError, match="model.yml.*not a text file"):
        load_config(AppConfig, path)


def test_unknown_keys_of_mixed_types_are_named(tmp_path):
    path = tmp_path / "a.yml"
    path.write_text("1: x\nzzz: 2\nlr: 0.1\n")
    with pytest.raises(ConfigError, match="unknown config key '1'"):
        load_config(AppConfig, path)


def test_a_corrupt_pretrained_file_is_named(tmp_path):
    path = tmp_path / "weights.pth"
    path.write_bytes(b"PK\x03\x04 truncated zip")
    model = EarlyExitMobileNetV2(ModelConfig(width_mult=0.35, num_classes=10, exits=[3]))
    with pytest.raises(ConfigError, match="pretrained.*weights.pth.*cannot be read"):
        load_pretrained(model, str(path))


@pytest.mark.parametrize("preprocess", [
    "not a mapping",
    {"input_size": 0, "resize_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3},
    {"input_size": 32, "resize_size": 32, "mean": [0.5] * 2, "std": [0.25] * 3},
    {"input_size": 32, "resize_size": 32, "mean": [0.5] * 3, "std": [0.25, 0.0, 0.25]},
    {"input_size": 32, "resize_size": 32, "mean": [0.5] * 3},
])
def test_a_malformed_preprocess_in_a_checkpoint_is_named(small_model, tmp_path, preprocess):
    path = tmp_path / "m.pt"
    save_checkpoint(path, small_model, NAMES, Preprocess(SIZE, SIZE, (0.5,) * 3, (0.25,) * 3))
    payload = torch.load(path, weights_only=True)
    payload["preprocess"] = preprocess
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="m.pt.*malformed metadata"):
        load_checkpoint(path)


def test_test_py_on_a_model_without_exits_evaluates_cloud_only(tmp_path):
    common = ["app:apps/quickstart_train.yml", "quickstart_train_samples=128", "quickstart_val_samples=64",
              "width_mult=0.35", "exits=[]", "exit_loss_weights=[]", "num_epochs=1", "data_loader_workers=0",
              f"log_dir={tmp_path}"]
    subprocess.run([sys.executable, "train.py", *common], cwd=ROOT, check=True, capture_output=True, timeout=300)
    out = subprocess.run([sys.executable, "test.py", *common[1:]], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "split point 0: device exits at []" in out.stdout
