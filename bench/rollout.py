"""A model update rolled out to a live cloud and a live streaming device (README "Model versions").

    python train.py app:apps/cars_dev_train_exits.yml exit_channels=128 exit_loss_weights=0.3 distill_weight=0 \
        calibration_fraction=0 pretrained=../shared/models/cars_dev_joint20.pt num_epochs=1 lr=0.005 \
        warmup_epochs=0 seed=1 log_dir=runs/cars_dev_v2                    # v2: a 1-epoch fine-tune of v1
    python bench/rollout.py app:apps/cars_dev_test.yml checkpoint=../shared/models/cars_dev_joint20.pt \
        image_size=128 resize_size=128 data_loader_workers=0 --v2 runs/cars_dev_v2/best_model.pt --split 9 \
        --name cars_dev

The cloud (``python -m cloud``, its own process, loopback) serves a model folder holding ``v1.pt``. A device
(``DeviceRuntime``, ``checkpoint: stream``, in this process) streams v1 and then classifies test images at a
steady rate; a probe client sends v1 feature requests to the cloud at a steady rate. Then ``v2.pt`` is dropped in
the folder: the cloud loads it beside v1, the device learns of it from its manifest poll, streams it while answering
with v1, switches when v2's head is usable and deletes v1's package once v2 is verified; later v1 is removed from
the folder. The device's manifest poll is triggered by the bench once the cloud has built v2's package, so that
the cloud's load and build and the device's download are measured apart. Every answer is checked against the offline prediction of the version it names (its full model on
the image, at full precision; an answer from a partly received head may legitimately differ, so those are counted
apart).

Reported: answers per version over time, degraded answers, bytes streamed, the device's p99 before / during /
after its switch (goal: during <= 1.2x before), the cloud's p99 for v1 requests before / while it loads v2 (goal:
<= 1.2x before), and the cloud's RSS with one and two versions. Writes ``bench/results/rollout_<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import grpc
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.probes import free_port  # noqa: E402  (not bench/ on the path: its serving.py would hide the package)
from bench.report import write_results  # noqa: E402



def p99(values: list[float]) -> float | None:
    return float(np.percentile(values, 99)) if values else None


def rss_mib(pid: int) -> float:
    """Resident set of ``pid`` and its live children (the forward process, if any), MiB, from /proc."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(entry.name) == pid or fields.get("PPid", "").strip() == str(pid):
            total += int(fields.get("VmRSS", "0 kB").split()[0])
    return total / 1024


class Cloud:
    """``python -m cloud`` on a model folder, on a free loopback port."""

    def __init__(self, folder: Path, split: int, log: Path) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from proto import spinn_v1_pb2_grpc as pb_grpc

        self.address = f"127.0.0.1:{free_port()}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cloud", f"checkpoint={folder}", f"address={self.address}",
             "model_dir_poll_seconds=0.5", f"delivery_prebuild=[{split}]", "log_level=INFO"],
            cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)
        self.channel = grpc.insecure_channel(self.address)
        self.inference = pb_grpc.InferenceStub(self.channel)
        health = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == 1:
                    return
            except grpc.RpcError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"the cloud exited ({self.proc.returncode}); see {log}")
            time.sleep(0.3)
        raise RuntimeError("the cloud did not become SERVING")

    def versions(self) -> list[str]:
        from proto import spinn_v1_pb2 as pb

        return [v.model_version for v in self.inference.GetModelInfo(pb.ModelInfoRequest(), timeout=10).versions]

    def close(self) -> None:
        self.channel.close()
        self.proc.terminate()
        self.proc.wait(60)


class Recorder:
    """Rows of timed events from several threads (``t``: seconds since the bench started)."""

    def __init__(self) -> None:
        self.started = time.time()  # wall clock: the cloud probe runs in a process of its own
        self.rows: list[dict] = []
        self.events: dict[str, float] = {}
        self.rss: dict[str, float] = {}  # the cloud's RSS (MiB) at each event
        self._lock = threading.Lock()

    def now(self) -> float:
        return time.time() - self.started

    def add(self, **row) -> None:
        with self._lock:
            self.rows.append(row)

    def mark(self, name: str, pid: Optional[int] = None) -> None:
        self.events[name] = self.now()
        if pid is not None:
            self.rss[name] = rss_mib(pid)
        print(f"{self.events[name]:7.1f} s  {name}", flush=True)


def paced(rate: float, stop: threading.Event, step) -> None:
    """Call ``step()`` ``rate`` times a second until ``stop`` (open loop: a slow step is not made up for)."""
    period, due = 1.0 / rate, time.perf_counter()
    while not stop.is_set():
        step()
        due += period
        time.sleep(max(0.0, due - time.perf_counter()))


def probe_cloud(address: str, request: bytes, started: float, rate: float, stop, out) -> None:
    """In a process of its own (so that the device's work in the bench's process does not delay it): v1 feature
    requests to the cloud at ``rate`` per second until ``stop``; puts the rows on ``out``. The cloud's latency
    for one version while it loads another."""
    from proto import spinn_v1_pb2 as pb
    from proto import spinn_v1_pb2_grpc as pb_grpc

    stub = pb_grpc.InferenceStub(grpc.insecure_channel(address))
    message = pb.FeatureRequest.FromString(request)
    rows = []

    def step() -> None:
        t = time.time() - started
        begin = time.perf_counter()
        try:
            stub.Infer(message, timeout=30)
            status = "OK"
        except grpc.RpcError as err:
            status = err.code().name
        rows.append({"kind": "cloud", "t": t, "ms": (time.perf_counter() - begin) * 1000, "status": status})

    paced(rate, stop, step)
    out.put(rows)


def drive_device(runtime, images: list[torch.Tensor], expected: dict[str, list[int]], rec: Recorder, rate: float,
                 stop: threading.Event) -> None:
    """The device's steady flow: one image after another at ``rate`` per second, every answer recorded with the
    version it names and whether it equals that version's full model (and the other version's)."""
    i = 0

    def step() -> None:
        nonlocal i
        k = i % len(images)
        i += 1
        active = runtime.active
        t = rec.now()
        result = runtime.classify_tensor(images[k])
        rec.add(kind="device", t=t, ms=result.latency_ms, version=result.model_version, digest=result.model_digest,
                degraded=result.degraded, reason=result.reason, answered_by=result.answered_by,
                complete=bool(active and active.complete and active.ref.digest == result.model_digest),
                image=k, class_id=result.class_id)

    paced(rate, stop, step)


def wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def run(args: argparse.Namespace, app_args: list[str]) -> dict:
    from bench.progressive import load
    from device.config import DeviceConfig
    from device.runtime import DeviceRuntime
    from models.app_config import AppConfig
    from models.checkpoint import load_checkpoint
    from models.config import from_dict, parse_app_argv
    from models.partition import head
    from proto import spinn_v1_pb2 as pb
    from proto.codec import CodecSpec, encode

    app = parse_app_argv(AppConfig, app_args)
    v1, batches = load(app, args.images)
    v2 = load_checkpoint(args.v2)
    images = [x for xs, _ in batches for x in xs][:args.images]
    with torch.no_grad():
        expected = {c.digest: [int(c.model(x.unsqueeze(0))[-1].argmax()) for x in images] for c in (v1, v2)}
        activation = head(v1.model, args.split)(images[0].unsqueeze(0)).activation
    probe_request = pb.FeatureRequest(model=pb.ModelRef(model_id="spinn", digest=v1.digest), split_point=args.split,
                                      features=encode(activation, CodecSpec("int8", "zstd")), top_k=1)
    work = Path(tempfile.mkdtemp(prefix="spinn-rollout-"))
    folder = work / "models"
    folder.mkdir()
    shutil.copy(app.checkpoint_path(), folder / "v1.pt")
    rec = Recorder()
    cloud = Cloud(folder, args.split, work / "cloud.log")
    out: dict = {"versions": {"v1": v1.digest, "v2": v2.digest}, "split_point": args.split,
                 "threshold": args.threshold}
    torch.set_num_threads(1)  # the device: one core; the cloud has its own process
    cfg = from_dict(DeviceConfig, {"checkpoint": "stream", "cloud": cloud.address, "split_point": args.split,
                                   "z_confidence_threshold": args.threshold, "deadline_ms": 5000,
                                   # the bench tells the device when to poll (check_soon), so that the cloud's load
                                   # and package build are measured apart from the device's download
                                   "weights_cache": str(work / "cache"), "stream_poll_seconds": 3600.0,
                                   "log_level": "WARNING"})
    ctx = multiprocessing.get_context("spawn")
    probe_stop, probe_out = ctx.Event(), ctx.Queue()
    probe = ctx.Process(target=probe_cloud, args=(cloud.address, probe_request.SerializeToString(), rec.started,
                                                  args.cloud_rate, probe_stop, probe_out))
    probe.start()  # its interpreter's start-up is over before anything is measured
    runtime = DeviceRuntime.start(cfg)
    stop = threading.Event()
    threads = [threading.Thread(target=drive_device, args=(runtime, images, expected, rec, args.rate, stop))]
    log = work / "cloud.log"
    try:
        pid = cloud.proc.pid
        wait(lambda: runtime.active is not None and runtime.active.complete, 600, "v1 on the device")
        rec.mark("v1 complete on the device", pid)
        for thread in threads:
            thread.start()
        time.sleep(args.phase_seconds)
        rec.mark("v2 dropped in the model folder", pid)
        shutil.copy(args.v2, folder / "v2.pt")
        wait(lambda: "v2" in cloud.versions(), 300, "the cloud to load v2")
        rec.mark("v2 loaded by the cloud", pid)
        wait(lambda: log.read_text().count("built progressive package") >= 2, 300, "v2's package")
        rec.mark("v2 packaged by the cloud", pid)
        runtime.streamed.check_soon()  # the device's manifest poll
        rec.mark("device polled the manifest", pid)
        wait(lambda: runtime.active.ref.digest == v2.digest, 600, "the device to switch to v2")
        rec.mark("device switched to v2", pid)
        wait(lambda: runtime.active.complete, 600, "v2 complete on the device")
        rec.mark("v2 complete on the device", pid)
        time.sleep(args.phase_seconds / 2)
        rec.mark("two versions, steady", pid)
        (folder / "v1.pt").unlink()
        rec.mark("v1 removed from the model folder", pid)
        wait(lambda: cloud.versions() == ["v2"], 60, "the cloud to retire v1")
        rec.mark("v1 retired by the cloud", pid)
        time.sleep(args.phase_seconds)
        rec.mark("end", pid)
        stream = runtime.streamed.current
        out["v2_package_bytes"] = stream.manifest.total_bytes
        out["v2_float32_bytes"] = stream.manifest.float32_bytes
        out["device_caches"] = sorted(str(p.parent.relative_to(work)) for p in (work / "cache").rglob("manifest.pb"))
    finally:
        stop.set()
        probe_stop.set()
        for thread in threads:
            if thread.is_alive():
                thread.join(60)
        if probe.pid is not None:
            rec.rows.extend(probe_out.get(timeout=60))
            probe.join(30)
        runtime.close()
        cloud.close()
    out.update(summarise(rec, expected, v1.digest, v2.digest))
    shutil.rmtree(work, ignore_errors=True)
    return out


def version_check(device: list[dict], expected: dict[str, list[int]], v1: str, v2: str) -> dict:
    """Per answer by a complete model: equal to its own version's full model, or (a mix) to the other's only."""
    other = {v1: v2, v2: v1}
    checked = [r for r in device if r["complete"] and r["digest"] in expected]
    own = sum(r["class_id"] == expected[r["digest"]][r["image"]] for r in checked)
    crossed = sum(r["class_id"] != expected[r["digest"]][r["image"]] and
                  r["class_id"] == expected[other[r["digest"]]][r["image"]] for r in checked)
    return {"complete_answers_checked": len(checked), "complete_answers_equal_own": own,
            "complete_answers_equal_other_only": crossed,
            "unknown_version_answers": sum(r["digest"] not in expected for r in device)}


def summarise(rec: Recorder, expected: dict[str, list[int]], v1: str, v2: str) -> dict:
    e = rec.events
    device = [r for r in rec.rows if r["kind"] == "device"]
    cloud = [r for r in rec.rows if r["kind"] == "cloud"]
    start, dropped, switched, done = (e["v1 complete on the device"], e["v2 dropped in the model folder"],
                                      e["device switched to v2"], e["v2 complete on the device"])
    packaged, polled = e["v2 packaged by the cloud"], e["device polled the manifest"]

    def window(rows, lo, hi):
        return [r["ms"] for r in rows if lo <= r["t"] < hi]

    before = window(device, start, dropped)
    during = window(device, polled, done)
    after = window(device, done, e["end"])
    cloud_before = [r["ms"] for r in cloud if start <= r["t"] < dropped and r["status"] == "OK"]
    # the cloud loads v2 and builds its package (delivery_prebuild); the load alone is too short (about 0.5 s) for
    # a p99 of its own. Then the device downloads v2 (over loopback: as fast as the cores allow), apart
    cloud_loading = [r["ms"] for r in cloud if dropped <= r["t"] < packaged and r["status"] == "OK"]
    cloud_download = [r["ms"] for r in cloud if polled <= r["t"] < done and r["status"] == "OK"]
    buckets: dict[int, dict[str, int]] = {}
    for r in device:
        b = buckets.setdefault(int(r["t"] // 5) * 5, {})
        b[r["version"]] = b.get(r["version"], 0) + 1
    return {
        "events_s": {k: round(v, 2) for k, v in e.items()},
        "cloud_rss_mib": {k: round(v) for k, v in rec.rss.items()},
        "device_answers": len(device), "device_degraded": sum(r["degraded"] for r in device),
        "degraded_reasons": sorted({r["reason"] for r in device if r["degraded"]})[:5],
        **version_check(device, expected, v1, v2),
        "answers_per_version_by_5s": {str(k): v for k, v in sorted(buckets.items())},
        "device_p99_ms": {"before": p99(before), "during": p99(during), "after": p99(after)},
        "device_counts": {"before": len(before), "during": len(during), "after": len(after)},
        "cloud_v1_p99_ms": {"before": p99(cloud_before), "while_loading_v2": p99(cloud_loading),
                            "while_the_device_downloads_v2": p99(cloud_download)},
        "cloud_counts": {"before": len(cloud_before), "while_loading_v2": len(cloud_loading),
                         "while_the_device_downloads_v2": len(cloud_download)},
        "cloud_errors": sum(r["status"] != "OK" for r in cloud if r["t"] < e["v1 removed from the model folder"]),
    }


def markdown(r: dict) -> str:
    d, c = r["device_p99_ms"], r["cloud_v1_p99_ms"]

    def ratio(a, b):
        return "-" if a is None or b is None else f"{a / b:.2f}x"

    lines = [f"# Rollout: {r['name']}", "", f"`{r['command']}`", "",
             f"v1 {r['versions']['v1']}, v2 {r['versions']['v2']}; split point {r['split_point']}, threshold "
             f"{r['threshold']}.", "",
             "| event | s | cloud RSS (MiB) |", "|---|---|---|",
             *[f"| {k} | {v} | {r['cloud_rss_mib'].get(k, '-')} |" for k, v in r["events_s"].items()], "",
             f"- device answers: {r['device_answers']}, degraded {r['device_degraded']}, from a version neither v1 "
             f"nor v2 {r['unknown_version_answers']}; answers by a complete (16-bit) model: "
             f"{r['complete_answers_checked']}, equal to the float32 full model of the version they name "
             f"{r['complete_answers_equal_own']}, equal to the other version's only (a mix of versions) "
             f"{r['complete_answers_equal_other_only']}",
             f"- bytes streamed for v2: {r['v2_package_bytes']:,} ({100 * r['v2_package_bytes'] / r['v2_float32_bytes']:.1f} "
             f"% of its float32 weights); packages cached at the end: {r['device_caches']}",
             f"- device p99: before {d['before']:.1f} ms, during {d['during']:.1f} ms "
             f"({ratio(d['during'], d['before'])}; goal <= 1.2x), after {d['after']:.1f} ms "
             f"({r['device_counts']})",
             f"- cloud p99 for v1 requests: before {c['before']:.1f} ms, while loading v2 "
             f"{c['while_loading_v2']:.1f} ms ({ratio(c['while_loading_v2'], c['before'])}; goal <= 1.2x; from the "
             f"drop of v2 until its package was built), while the device downloaded v2 over loopback "
             f"{c['while_the_device_downloads_v2']:.1f} ms ({ratio(c['while_the_device_downloads_v2'], c['before'])});"
             f" requests {r['cloud_counts']}; errors before v1 was removed: {r['cloud_errors']}", "",
             "Answers per version, by 5 s since the bench started:", "", "| t (s) | answers |", "|---|---|",
             *[f"| {t} | {v} |" for t, v in r["answers_per_version_by_5s"].items()]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--v2", required=True, help="the new version's checkpoint (same architecture)")
    parser.add_argument("--split", type=int, default=9)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--rate", type=float, default=8.0, help="device classifications per second")
    parser.add_argument("--cloud-rate", type=float, default=40.0, help="v1 probe requests per second")
    parser.add_argument("--phase-seconds", type=float, default=20.0)
    parser.add_argument("--name", default="cars_dev")
    args, app_args = parser.parse_known_args()
    result = run(args, app_args)
    result["name"] = args.name
    result["command"] = "python bench/rollout.py " + " ".join(sys.argv[1:])
    write_results(f"rollout_{args.name}", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
