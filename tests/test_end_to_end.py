"""train.py -> test.py on the embedded quickstart set, as a user runs them (subprocesses, real models)."""

import json
import subprocess
import sys

import pytest

from models.checkpoint import load_checkpoint
from models.offline_profile import load_profile
from tests.conftest import ROOT

TINY = ["quickstart_train_samples=256", "quickstart_val_samples=128", "width_mult=0.35", "exit_channels=8",
        "batch_size=64", "image_size=32"]


def run(script, *args, check=True):
    proc = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def check_results(results: dict, n_device_exits: int) -> None:
    rows = results["rows"]
    assert isinstance(results["split_point"], int) and isinstance(results["cloud_only_accuracy"], float)
    for row in rows:
        assert set(["threshold", "uploading_rate", "accuracy", "exit_rates"]) <= set(row)
        assert len(row["exit_rates"]) == n_device_exits
        assert row["uploading_rate"] + sum(row["exit_rates"]) == pytest.approx(1.0)
        assert 0.0 <= row["accuracy"] <= 1.0
    ordered = sorted(rows, key=lambda r: r["threshold"])
    uploads = [r["uploading_rate"] for r in ordered]
    assert uploads == sorted(uploads)  # a higher threshold never uploads less
    for row in rows:
        if row["uploading_rate"] == 1.0:  # nothing answered on the device: the cloud's accuracy exactly
            assert row["accuracy"] == pytest.approx(results["cloud_only_accuracy"])


def test_tiny_quickstart_train_resume_and_test(tmp_path):
    log_dir = tmp_path / "run"
    run("train.py", "app:apps/quickstart_train.yml", *TINY, "num_epochs=1", f"log_dir={log_dir}")
    assert (log_dir / "best_model.pt").is_file() and (log_dir / "train_log.csv").is_file()
    run("train.py", "app:apps/quickstart_train.yml", *TINY, "num_epochs=2", "resume=true", f"log_dir={log_dir}")
    history = json.loads((log_dir / "train_log.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    ckpt = load_checkpoint(log_dir / "last_model.pt")
    assert ckpt.training_state["epoch"] == 1

    proc = run("test.py", "app:apps/quickstart_test.yml", *TINY, f"log_dir={log_dir}", "split_point=7")
    results = json.loads((log_dir / "test_results.json").read_text())
    # The printed table: its header, then one line per threshold that matches the JSON row.
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:4] == ["threshold", "upload", "accuracy",
                                                                            "bytes/img"])
    for line, row in zip(lines[header + 2:], results["rows"]):
        threshold, upload, accuracy = (float(v) for v in line.split()[:3])
        assert (threshold, upload, accuracy) == pytest.approx(
            (row["threshold"], row["uploading_rate"], row["accuracy"]), abs=6e-4)
    best = load_checkpoint(log_dir / "best_model.pt")
    device_exits = [k for k in best.model.exit_points if k <= 7]
    check_results(results, len(device_exits))
    # test.py's cloud-only accuracy is the final exit on the same validation set that train.py scored
    assert results["cloud_only_accuracy"] == pytest.approx(best.metrics["val_accuracy_final"], abs=1e-9)
    assert (log_dir / "test_results.csv").is_file() and (log_dir / "test_results.png").stat().st_size > 1000

    # The scheduler's profile: computed block by block (models/offline_profile.py), not by test.py's table
    # code, so its split-7 rows agreeing with the table is a check of both.
    run("test.py", "app:apps/quickstart_test.yml", *TINY, f"log_dir={log_dir}", "split_point=all")
    prof = load_profile(log_dir / "profile.json")
    by_threshold = {r.threshold: r for r in prof.split(7).rows}
    for row in results["rows"]:
        mine = by_threshold[row["threshold"]]
        assert (mine.uploading_rate, mine.accuracy) == pytest.approx((row["uploading_rate"], row["accuracy"]),
                                                                     abs=1e-9)
        assert mine.exit_rates == pytest.approx(row["exit_rates"], abs=1e-9)

    single = run("test.py", "app:apps/quickstart_test.yml", *TINY, f"log_dir={log_dir}",
                 "z_confidence_threshold=0.5")
    rows = json.loads((log_dir / "test_results.json").read_text())["rows"]
    assert [r["threshold"] for r in rows] == [0.5], single.stdout


def test_test_py_errors_are_clear(tmp_path):
    proc = run("test.py", "app:apps/quickstart_test.yml", f"log_dir={tmp_path}", check=False)
    assert proc.returncode == 2 and "best_model.pt" in proc.stderr and "does not exist" in proc.stderr


def test_bad_split_point_names_the_key(tmp_path):
    log_dir = tmp_path / "run"
    run("train.py", "app:apps/quickstart_train.yml", *TINY, "num_epochs=1", "quickstart_train_samples=64",
        f"log_dir={log_dir}")
    proc = run("test.py", "app:apps/quickstart_test.yml", *TINY, f"log_dir={log_dir}", "split_point=40", check=False)
    assert proc.returncode == 2 and "split_point" in proc.stderr


def test_live_evaluation_through_device_and_cloud_matches_offline(tmp_path):
    from cloud.inference import ServedModel
    from cloud.server import CloudConfig, build_server

    log_dir = tmp_path / "run"
    run("train.py", "app:apps/quickstart_train.yml", *TINY, "num_epochs=1", f"log_dir={log_dir}")
    checkpoint = str(log_dir / "best_model.pt")
    cloud = build_server(CloudConfig(checkpoint=checkpoint, address="127.0.0.1:0", log_level="WARNING"),
                         ServedModel.from_file(checkpoint, "spinn", "1"))
    try:
        proc = run("test.py", "app:apps/quickstart_test.yml", *TINY, f"log_dir={log_dir}", "split_point=7",
                   "thresholds=[0.0,0.5,1.0]", "--live", f"127.0.0.1:{cloud.port}")
    finally:
        cloud.stop()
    assert "live through the device runtime" in proc.stdout
    live = json.loads((log_dir / "test_results_live.json").read_text())
    assert live["codec"] == "int8+zstd" and live["num_images"] == 128
    by_threshold = {r["threshold"]: r for r in live["rows"]}
    assert by_threshold[0.0]["accuracy"] == by_threshold[0.0]["offline_accuracy"]  # device exits only: exact
    assert by_threshold[0.0]["bytes_per_image"] == 0
    assert by_threshold[1.0]["uploading_rate"] == 1.0 and by_threshold[1.0]["bytes_per_image"] > 0
    for row in live["rows"]:
        assert row["degraded"] == 0
        assert abs(row["uploading_rate"] - row["offline_uploading_rate"]) <= 1 / 128
        assert abs(row["accuracy"] - row["offline_accuracy"]) <= 2 / 128  # int8 codec loss, if any
    bad = run("test.py", "app:apps/quickstart_test.yml", f"log_dir={log_dir}", "--live", check=False)
    assert bad.returncode == 2 and "--live" in bad.stderr


@pytest.mark.slow
def test_full_quickstart_shows_a_real_trade_off(tmp_path):
    """The README's quickstart at its real size (about 3-4 minutes on 2 cores)."""
    log_dir = tmp_path / "qs"
    run("train.py", "app:apps/quickstart_train.yml", f"log_dir={log_dir}")
    run("test.py", "app:apps/quickstart_test.yml", f"log_dir={log_dir}")
    results = json.loads((log_dir / "test_results.json").read_text())
    best = load_checkpoint(log_dir / "best_model.pt")
    check_results(results, len(results["device_exit_points"]))
    chance = 1.0 / len(best.class_names)
    assert min(best.metrics["val_accuracy_per_exit"]) > chance + 0.1
    assert results["cloud_only_accuracy"] > 0.6
    rows = sorted(results["rows"], key=lambda r: r["threshold"])
    middle = [r for r in rows if 0.0 < r["uploading_rate"] < 1.0]
    assert len(middle) >= 3  # the threshold really trades uploads for accuracy
    assert rows[0]["accuracy"] < results["cloud_only_accuracy"]


@pytest.mark.slow
def test_torchrun_ddp_on_cpu(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "train.py",
         "app:apps/quickstart_train.yml", *TINY, "num_epochs=1", "device=cpu", f"log_dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_checkpoint(tmp_path / "best_model.pt").metrics["epoch"] == 1
