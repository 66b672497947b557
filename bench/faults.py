"""Fault injection over loopback: nothing is lost when parts hang, die or restart.

    python bench/faults.py [--images 600] [--files 120] [--name faults]

1. offload path: ``python -m cloud`` (forward in a worker process, ``forward_timeout_s=2``) and a device runtime
   in this process classifying ``--images`` images from 4 threads, every image offloaded (threshold 1). During
   the run the worker is SIGSTOPped (a hung forward: the watchdog kills it), later SIGKILLed, then the cloud
   itself is SIGKILLed and started again on the same port. Pass: every image gets an answer (from the cloud, or
   degraded from a device exit with its reason), none raises, and the restarted cloud answers again.
2. folder watch: ``python -m device serve`` watching a folder while ``--files`` images are written into it a
   few at a time (each written in two halves, like a copy in progress); the device is SIGKILLed halfway and
   started again. Pass: every file appears in the results exactly once, none as an error.

Results in bench/results/<name>.{json,md}. A small random model is served (the faults are about the wire).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.fuzz import serving, small_checkpoint  # noqa: E402
from bench.probes import free_port  # noqa: E402


def child_pids(pid: int) -> list[int]:
    """Live child processes of ``pid`` (the cloud's forward worker), from /proc."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    children.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return children


def png(seed: int, size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def start_cloud(checkpoint: Path, address: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "cloud", "--config", "apps/cloud.yml", f"checkpoint={checkpoint}",
                             f"address={address}", "forward_process=true", "forward_timeout_s=2",
                             "log_level=WARNING"], cwd=ROOT)
    deadline = time.monotonic() + 120
    while not serving(address):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("the cloud did not become SERVING")
        time.sleep(0.2)
    return proc


def offload_faults(checkpoint: Path, images: int) -> dict:
    """Scenario 1 (see the module docstring): 4 client threads classify until ``images`` are answered and the
    restarted cloud has answered again; faults are injected as the count of answers passes 1/5, 2/5 and 3/5."""
    from device.config import DeviceConfig
    from device.runtime import DeviceRuntime
    from models.config import from_dict

    address = f"127.0.0.1:{free_port()}"
    cloud = start_cloud(checkpoint, address)
    cfg = from_dict(DeviceConfig, {"checkpoint": str(checkpoint), "cloud": address, "split_point": 9,
                                   "z_confidence_threshold": 1.0, "deadline_ms": 3000, "breaker_probe_seconds": 0.3,
                                   "log_level": "ERROR"})
    runtime = DeviceRuntime.start(cfg)
    outcomes: Counter = Counter()
    errors: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    events: list[str] = []
    after_restart = Counter()
    restarted = threading.Event()

    def client(seed: int) -> None:
        i = seed
        while not stop.is_set():
            i += 4
            try:
                r = runtime.classify_bytes(png(i))
                key = "cloud" if r.answered_by == "cloud" else f"degraded: {r.reason.split(':')[0][:40]}"
            except Exception as err:  # an answer lost: the benchmark fails
                with lock:
                    errors.append(f"{type(err).__name__}: {err}")
                continue
            with lock:
                outcomes[key] += 1
                if restarted.is_set():
                    after_restart[key] += 1
            time.sleep(0.02)

    def answered() -> int:
        with lock:
            return sum(outcomes.values()) + len(errors)

    def wait_for(n: int) -> None:
        while answered() < n:
            time.sleep(0.05)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    started = time.monotonic()
    for t in threads:
        t.start()
    try:
        wait_for(images // 5)
        for signum, what in ((signal.SIGSTOP, "SIGSTOPped (hung forward)"), (signal.SIGKILL, "SIGKILLed")):
            worker = child_pids(cloud.pid)
            if worker:
                os.kill(worker[0], signum)
                events.append(f"{answered()}: worker {worker[0]} {what}")
            wait_for(answered() + images // 5)
        cloud.kill()
        cloud.wait()
        events.append(f"{answered()}: cloud SIGKILLed")
        cloud = start_cloud(checkpoint, address)
        restarted.set()
        events.append(f"{answered()}: cloud restarted (SERVING)")
        deadline = time.monotonic() + 120
        while (answered() < images or after_restart["cloud"] < 20) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join()
        runtime.close()
        cloud.terminate()
        cloud.wait(30)
    total = sum(outcomes.values())
    return {"images": total + len(errors), "answered": total, "lost": len(errors), "errors": errors[:10],
            "outcomes": dict(outcomes), "after_restart": dict(after_restart), "events": events,
            "seconds": time.monotonic() - started}


def watch_faults(checkpoint: Path, files: int) -> dict:
    """Scenario 2 (see the module docstring)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder, results = Path(tmp) / "in", Path(tmp) / "results.jsonl"
        folder.mkdir()
        cmd = [sys.executable, "-m", "device", "serve", "--config", "apps/device.yml", f"checkpoint={checkpoint}",
               f"cloud=127.0.0.1:{free_port()}", f"listen=127.0.0.1:{free_port()}", f"watch_dir={folder}",
               f"watch_results={results}", "watch_interval_seconds=0.2", "split_point=9", "deadline_ms=500",
               "log_level=ERROR"]
        device = subprocess.Popen(cmd, cwd=ROOT)
        events = []
        try:
            for i in range(files):
                data = png(10_000 + i)
                path = folder / f"img{i:04d}.png"
                with open(path, "wb") as f:  # a copy in progress: half, a pause, the rest
                    f.write(data[: len(data) // 2])
                    f.flush()
                    time.sleep(0.02)
                    f.write(data[len(data) // 2:])
                if i == files // 2:
                    device.kill()
                    device.wait()
                    events.append(f"device SIGKILLed after writing {i + 1} files")
                    device = subprocess.Popen(cmd, cwd=ROOT)
                    events.append("device restarted")
                time.sleep(0.03)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                lines = results.read_text().splitlines() if results.exists() else []
                if len({json.loads(line)["image"] for line in lines if line.strip()}) >= files:
                    break
                time.sleep(0.3)
            time.sleep(1.0)  # anything answered twice would show up now
        finally:
            device.terminate()
            device.wait(30)
        records = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    names = Counter(r["image"] for r in records)
    return {"files": files, "answered_once": sum(1 for n in names.values() if n == 1),
            "answered_twice_or_more": sum(1 for n in names.values() if n > 1), "missing": files - len(names),
            "errors": [r for r in records if "error" in r][:10], "events": events}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--files", type=int, default=120)
    parser.add_argument("--name", default="faults")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = small_checkpoint(Path(tmp))
        result = {"command": "python bench/faults.py " + " ".join(argv),
                  "offload": offload_faults(checkpoint, args.images), "watch": watch_faults(checkpoint, args.files)}
    o, w = result["offload"], result["watch"]
    result["passed"] = (o["lost"] == 0 and o["after_restart"].get("cloud", 0) > 0 and w["missing"] == 0
                        and w["answered_twice_or_more"] == 0 and not w["errors"])
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Faults ({result['command']})", "",
             f"- offload: {o['images']} images, {o['answered']} answered, {o['lost']} lost; "
             + ", ".join(f"{k} {v}" for k, v in sorted(o["outcomes"].items()))
             + "; after the restart: " + ", ".join(f"{k} {v}" for k, v in sorted(o["after_restart"].items())),
             "  - " + "; ".join(o["events"]),
             f"- folder watch: {w['files']} files, {w['answered_once']} answered once, "
             f"{w['answered_twice_or_more']} more than once, {w['missing']} missing, {len(w['errors'])} errors",
             "  - " + "; ".join(w["events"]),
             f"- passed: {result['passed']}"]
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
