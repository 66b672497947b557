import re
import subprocess
import sys
from pathlib import Path

import pytest

from models.app_config import AppConfig
from models.config import ConfigError, load_config, parse_app_argv, parse_overrides
from tests.conftest import ROOT


def write(tmp_path, text):
    p = tmp_path / "app.yml"
    p.write_text(text)
    return p


def test_yaml_and_overrides_become_typed_fields(tmp_path):
    p = write(tmp_path, "lr: 1\nexits: [3, 0.5]\nnum_epochs: 4\n")
    cfg = parse_app_argv(AppConfig, [f"app:{p}", "num_epochs=2", "pretrained=none", "exit_loss_weights=[1, 0.5]"])
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)  # int widened to float
    assert cfg.exits == [3, 0.5] and isinstance(cfg.exits[0], int)
    assert cfg.num_epochs == 2
    assert cfg.exit_weights() == [1.0, 0.5]


@pytest.mark.parametrize("text, key", [
    ("learning_rate: 0.1\n", "learning_rate"),
    ("num_epochs: two\n", "num_epochs"),
    ("num_epochs: 2.5\n", "num_epochs"),
    ("optimizer: rmsprop\n", "optimizer"),
    ("exits: 3\n", "exits"),
    ("exits: [3, x]\n", r"exits\[1\]"),
    ("nesterov: 1\n", "nesterov"),
    ("lr: -1\n", "lr"),
    ("exit_loss_weights: [1, 2]\n", "exit_loss_weights"),
    ("thresholds: [0.5, 1.5]\n", r"thresholds\[1\]"),
    ("width_mult: 0\n", "width_mult"),
    ("lr: .nan\n", "'lr': must be a finite number"),  # NaN passes every comparison check: refused as such
    ("momentum: .inf\n", "'momentum': must be a finite number"),
    ("thresholds: [0.5, .nan]\n", r"thresholds\[1\]'"),
])
def test_bad_keys_are_named(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key):
        load_config(AppConfig, write(tmp_path, text))


def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(AppConfig, tmp_path / "missing.yml")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(AppConfig, write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["lr"])
    with pytest.raises(ConfigError, match="one app"):
        parse_app_argv(AppConfig, ["app:a.yml", "app:b.yml"])


def test_shipped_apps_are_valid():
    """Every shipped app validates. Where ``../shared`` is absent (a fresh machine) an app that names a file in
    it may fail, but only on that file, by name; relative paths resolve from the working directory, as in
    train.py."""
    shared_here = Path("../shared").is_dir()
    for path in sorted((ROOT / "apps").glob("*.yml")):
        if path.name.startswith(("cloud", "device")):  # daemon configs: tested in test_cloud.py
            continue
        try:
            load_config(AppConfig, path)
        except ConfigError as err:
            if shared_here or not re.search(r"config key '\w+': file '\.\./shared/[^']+' does not exist", str(err)):
                raise


def test_train_py_reports_the_bad_key_and_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "app:apps/quickstart_train.yml", "bogus_key=1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "bogus_key" in proc.stderr


def test_resolve_device_names_the_key():
    import torch

    from models.hardware import resolve_device

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="'torch_device'"):
        resolve_device("gpu", "torch_device")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="'torch_device'.*no CUDA"):
            resolve_device("cuda", "torch_device")
