"""Collect the StanfordCars dev-set measurements into bench/results/cars_dev.{json,md}.

Reproduce (needs ../shared; each training run is ~2 h on 2 CPU cores when two run side by side with one thread
each, ``OMP_NUM_THREADS=1 ... data_loader_workers=1``; on a GPU, minutes):

    python train.py app:apps/cars_dev_train_exits.yml log_dir=runs/cars_dev_distill
    python train.py app:apps/cars_dev_train_exits.yml exits=[] exit_channels=128 exit_loss_weights=[] \\
        log_dir=runs/cars_dev_plain
    for s in 18 15; do
        python test.py app:apps/cars_dev_test.yml checkpoint=runs/cars_dev_distill/best_model.pt \\
            split_point=$s log_dir=runs/cars_dev_distill/split$s
    done
    python bench/cars_dev_report.py distill=runs/cars_dev_distill plain=runs/cars_dev_plain

Every ``NAME=DIR`` is a training run (``DIR/train_log.json``, ``DIR/best_model.pt``); its ``DIR/split*/``
folders hold test.py results. A run with a test table is judged on the goal of the real-data issue: the
smallest uploading rate at which accuracy is within 1 point of cloud-only, at each split point.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.checkpoint import load_checkpoint  # noqa: E402

WITHIN = 0.01  # "within 1 point of cloud-only"


def run_summary(name: str, folder: Path) -> dict:
    """Training log, best checkpoint's metrics and calibration, and the test tables of one run."""
    log = json.loads((folder / "train_log.json").read_text())
    best = load_checkpoint(folder / "best_model.pt")
    tests = {}
    for result in sorted(folder.glob("split*/test_results.json")):
        table = json.loads(result.read_text())
        tests[table["split_point"]] = {**table, "within_1pt": within_one_point(table["rows"], table),
                                       "within_1pt_uncalibrated": within_one_point(
                                           table.get("rows_uncalibrated") or [], table)}
    return {
        "name": name,
        "folder": str(folder),
        "epochs": log[-1]["epoch"],
        "train_seconds": sum(r["seconds"] for r in log),
        "best_epoch": best.metrics.get("epoch"),
        "final_accuracy": best.metrics.get("val_accuracy_final"),
        "exit_points": best.model.exit_points,
        "exit_accuracy": best.metrics.get("val_accuracy_per_exit", []),
        "exit_fraction_of_backbone_flops": best.model.flops().exits_fraction,
        "calibration": best.metrics.get("calibration"),
        "tests": tests,
    }


def within_one_point(rows: list[dict], table: dict) -> dict | None:
    """The row with the lowest uploading rate whose accuracy is within 1 point of cloud-only (None if none)."""
    good = [r for r in rows if r["accuracy"] >= table["cloud_only_accuracy"] - WITHIN - 1e-12]
    return min(good, key=lambda r: r["uploading_rate"]) if good else None


def markdown(runs: list[dict]) -> list[str]:
    lines = ["# StanfordCars dev set (128 px, ImageNet init, 1,243 test images)", "",
             "| run | epochs | final top-1 | exits top-1 (boundary: acc) | heads / backbone FLOPs | train time |",
             "|---|---|---|---|---|---|"]
    for r in runs:
        exits = ", ".join(f"{k}: {a:.3f}" for k, a in zip(r["exit_points"], r["exit_accuracy"])) or "none"
        lines.append(f"| {r['name']} | {r['epochs']} | {r['final_accuracy']:.4f} | {exits} | "
                     f"{100 * r['exit_fraction_of_backbone_flops']:.1f} % | {r['train_seconds'] / 60:.0f} min |")
    for r in runs:
        if r["calibration"]:
            c = r["calibration"]
            lines += ["", f"## {r['name']}: calibration ({c['num_images']} held-out training images)", "",
                      "| output | temperature | ECE held-out before | after |", "|---|---|---|---|"]
            names = [f"exit@{k}" for k in r["exit_points"]] + ["final"]
            for n, t, b, a in zip(names, c["temperatures"], c["ece_before"], c["ece_after"]):
                lines.append(f"| {n} | {t:.3f} | {b:.4f} | {a:.4f} |")
        for split, table in sorted(r["tests"].items()):
            lines += ["", f"## {r['name']}: test.py at split point {split} (device exits "
                      f"{table['device_exit_points']}), cloud-only {table['cloud_only_accuracy']:.4f}", ""]
            best, raw = table["within_1pt"], table["within_1pt_uncalibrated"]
            lines.append("Within 1 point of cloud-only from an uploading rate of "
                         + (f"**{best['uploading_rate']:.3f}** (τ {best['threshold']:g})" if best else "never")
                         + ("" if not table.get("rows_uncalibrated") else
                            "; with the uncalibrated softmax " + (f"{raw['uploading_rate']:.3f} (τ {raw['threshold']:g})"
                                                                  if raw else "never")) + ".")
            lines += ["", "| output | accuracy | ECE (test) | ECE uncalibrated |", "|---|---|---|---|"]
            for o in table.get("outputs", []):
                name = "final" if o["boundary"] is None else f"exit@{o['boundary']}"
                lines.append(f"| {name} | {o['accuracy']:.4f} | {o['ece']:.4f} | {o['ece_uncalibrated']:.4f} |")
            lines += ["", "| τ | uploading rate | accuracy | bytes/img (float32) | exit rates | exit accuracies |",
                      "|---|---|---|---|---|---|"]
            for row in table["rows"]:
                accs = ", ".join("-" if a is None else f"{a:.3f}" for a in row["exit_accuracies"])
                lines.append(f"| {row['threshold']:g} | {row['uploading_rate']:.3f} | {row['accuracy']:.4f} | "
                             f"{row['upload_bytes_per_image']:.0f} | "
                             + ", ".join(f"{x:.3f}" for x in row["exit_rates"]) + f" | {accs} |")
    return lines


def main(argv: list[str]) -> dict:
    pairs = [a.split("=", 1) for a in argv] if argv else [["distill", "runs/cars_dev_distill"],
                                                          ["plain", "runs/cars_dev_plain"]]
    runs = [run_summary(name, ROOT / folder if not Path(folder).is_absolute() else Path(folder))
            for name, folder in pairs]
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "cars_dev.json").write_text(json.dumps({"runs": runs}, indent=2))
    lines = markdown(runs)
    (out / "cars_dev.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return {"runs": runs}


if __name__ == "__main__":
    main(sys.argv[1:])
