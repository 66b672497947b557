"""Collect the StanfordCars dev-subset measurement into bench/results/cars_dev.{json,md}.

Reproduce (about 30 minutes on 2 CPU cores, needs ../shared):
    python train.py app:apps/cars_dev_train_exits.yml
    python train.py app:apps/cars_dev_train_exits.yml 'exits=[]' log_dir=runs/cars_dev_plain
    python test.py app:apps/cars_dev_test.yml
    python bench/cars_dev_report.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(exits_dir: Path, plain_dir: Path, out_dir: Path) -> dict:
    exits_log = json.loads((exits_dir / "train_log.json").read_text())
    plain_log = json.loads((plain_dir / "train_log.json").read_text())
    test = json.loads((exits_dir / "test_results.json").read_text())
    last_exits, last_plain = exits_log[-1], plain_log[-1]
    exit_keys = [k for k in last_exits if k.startswith("exit") and k.endswith("_accuracy")]
    report = {
        "epochs": last_exits["epoch"],
        "per_exit_accuracy": {k[: -len("_accuracy")]: last_exits[k] for k in exit_keys},
        "final_accuracy_with_exits": last_exits["final_accuracy"],
        "final_accuracy_without_exits": last_plain["final_accuracy"],
        "final_accuracy_cost_points": 100 * (last_plain["final_accuracy"] - last_exits["final_accuracy"]),
        "train_seconds_with_exits": sum(r["seconds"] for r in exits_log),
        "train_seconds_without_exits": sum(r["seconds"] for r in plain_log),
        "test_table": test,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "cars_dev.json").write_text(json.dumps(report, indent=2))
    lines = [
        f"# StanfordCars dev subset ({test['num_images']} test images), {report['epochs']} epochs",
        "",
        "| model | final-exit top-1 | train time (s) |",
        "|---|---|---|",
        f"| early-exit | {report['final_accuracy_with_exits']:.4f} | {report['train_seconds_with_exits']:.0f} |",
        f"| plain (no exits) | {report['final_accuracy_without_exits']:.4f} | "
        f"{report['train_seconds_without_exits']:.0f} |",
        "",
        "Per-exit top-1 (exit at block boundary K): " + ", ".join(
            f"{k} {v:.4f}" for k, v in report["per_exit_accuracy"].items()),
        "",
        f"test.py table, split point {test['split_point']} (device exits {test['device_exit_points']}), "
        f"cloud-only {test['cloud_only_accuracy']:.4f}:",
        "",
        "| threshold | uploading rate | accuracy | exit rates |",
        "|---|---|---|---|",
    ]
    for r in test["rows"]:
        lines.append(f"| {r['threshold']:g} | {r['uploading_rate']:.3f} | {r['accuracy']:.4f} | "
                     + ", ".join(f"{x:.3f}" for x in r["exit_rates"]) + " |")
    (out_dir / "cars_dev.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    args = [Path(a) for a in sys.argv[1:]]
    main(*(args or [ROOT / "runs/cars_dev_exits", ROOT / "runs/cars_dev_plain", ROOT / "bench/results"]))
