"""End-to-end SPINN on real sockets: fixed strategies and the scheduler through a bandwidth schedule and an outage.

    python test.py app:apps/cars_dev_test.yml checkpoint=CKPT split_point=all   # writes profile.json beside CKPT
    sudo python bench/e2e.py app:apps/cars_dev_test.yml checkpoint=CKPT [profile=PATH] [--rtt-ms 40] \
        [--device-p50-ms 250] [--device-cpu 0.35] [--images-per-phase 60] [--phases 20,5,1,0.25,down,20] \
        [--objective min_latency] [--latency-bound-ms 0] [--accuracy-tolerance 0.01] [--strategies ...] \
        [--tbf-only] [--name cars_dev]

Setup. The cloud (``python -m cloud``, one intra-op thread) and a device driver run as separate processes in two
network namespaces joined by a veth pair shaped with ``tc tbf`` each way (bench/netns.py). ``tc netem`` does not
exist on the benchmark machine, so the added round-trip time comes from a user-space TCP proxy
(bench/delay_proxy.py, ``--rtt-ms / 2`` each way), a process of its own in the device namespace: the device
connects to it on 127.0.0.1 and it forwards to the cloud's veth address, so every device->cloud byte crosses the
shaped veth and gets the delay. The proxy also serialises each direction at the phase's rate (unless
``--tbf-only``): tbf lets a message that fits its 4 KB token bucket through at line rate, so without it a 1.3 KB
upload at 0.25 Mbit/s would cost nothing instead of 41 ms (measured: the same p50 at 20 and 0.25 Mbit/s). The
driver runs inside a cgroup whose CFS quota sets the device's speed (bench/slow_device.py; the proxy and the
cloud are outside it) with ``torch.set_num_threads(1)``. The speed is calibrated, not given: starting from
``--device-cpu`` of one core, the quota is scaled until the whole model's device-only p50 is ``--device-p50-ms``
(250 ms, a Raspberry-Pi-class device; bench/device_speed.py), so the run means the same on a fast and a slow
machine; the report states the rounds (``--device-p50-ms 0`` keeps ``--device-cpu``). The driver is pinned to
CPU 0 and the cloud and the proxy to CPU 1 (``taskset``), so that the two sides never compete for one core
(measured without the pinning: the device-only p50 of one run moved between 111 and 227 ms from phase to phase).

Phases (``--phases``: link rates in Mbit/s, ``down`` = the cloud process terminated, a rate after ``down`` = the
cloud restarted and SERVING again). Before each phase the parent sets the rate (``tc qdisc change``) or stops /
restarts the cloud, then tells the driver to go (lines on the driver's stdin/stdout, each wait with a deadline).
In each phase every strategy classifies the same ``--images-per-phase`` validation images one after another
(strategy order rotated per phase):

- ``device-only``: the whole model on the device, no link (split = number of blocks, threshold 1.0, answered
  by the final classifier unless an exit is exactly certain);
- ``cloud-only``: split point 0, the input uploaded as a JPEG, the cloud runs the whole network;
- ``static``: the plan's <split, threshold> for the first phase's link and the device's measured block times
  (with the codec the cloud announces for each split), then kept fixed;
- ``fixed s/t``: every other pair the plan picks for some phase's link, each kept fixed for the whole run (so
  each phase has the best fixed strategy to compare with, not only the first phase's);
- ``scheduler``: the device's scheduler (``scheduler: true``) re-plans from its live measurements.

The static pair is also where the scheduler starts, and the scheduler is told the first phase's rate and RTT as
its initial estimates (``initial_bandwidth_mbit``, ``initial_rtt_ms``): both start from the same knowledge. All
runtimes live in the one driver process, so the idle ones' background threads (health probes, the scheduler's
thread) share the device's CPU quota; the report gives the driver's CPU use per strategy to show how much.

Per phase and strategy: accuracy (a lost answer counts as wrong), p50/p95 latency, bytes per image, answers lost
(a classify call that raised), throughput (images/s over the strategy's wall time in the phase); for the
scheduler its predicted p50 vs the measured one. Checks: in every phase the scheduler's p95 is within 10 % of
the best fixed strategy's (the fastest of those within 1 point of the most accurate) at accuracy within 1 point
of it; in the phases at <= 1 Mbit/s its p95 is at most half the static choice's at equal or better accuracy;
while the cloud is down its accuracy is within 1 point of device-only; the predicted p50 is within 25 % of the
measured p50 in every phase; no strategy loses an answer; the calibration converged. The report says per phase
why the scheduler chose what it chose (its predicted numbers). Writes ``bench/results/e2e_<name>.{json,md,png}``.
Needs root (namespaces, cgroup): exits 2 with the reason otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import select
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import device_speed, netns, slow_device  # noqa: E402
from bench.progressive_link import wait_serving  # noqa: E402
from bench.report import write_results  # noqa: E402

log = logging.getLogger("e2e")

PORT = 50051
STRATEGIES = ("device-only", "cloud-only", "static", "fixed", "scheduler")
FIXED = "fixed"  # expands to one strategy per other pair the plan picks for some phase (``fixed_pairs``)
CALIBRATION_IMAGES = 15  # device-only requests per calibration round (their p50)
TBF_ARGS = ("burst", "4kb", "latency", "200ms")  # as bench/netns.py sets the qdisc up: only the rate changes
LOW_BANDWIDTH_BIT_S = 1_000_000  # phases at or below this rate are where the scheduler must beat static
PROTOCOL = "E2E "  # prefix of the driver's protocol lines on stdout (anything else there is ignored)
SETUP_TIMEOUT_S = 1200.0  # driver start: data, four runtimes and the warm-up on a fraction of a core
GO_TIMEOUT_S = 600.0  # the driver waits this long for the parent's GO (a cloud restart takes seconds)
CLOUD_START_TIMEOUT_S = 120.0


@dataclass
class Phase:
    """One step of the schedule: ``rate_bit_s`` of the link each way, ``cloud_up`` False: cloud terminated."""

    label: str
    rate_bit_s: int
    cloud_up: bool


def parse_phases(text: str) -> list[Phase]:
    """``"20,5,1,0.25,down,20"`` (Mbit/s, ``down``) -> phases; ``down`` keeps the previous rate. ValueError."""
    phases: list[Phase] = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        if item == "down":
            if not phases:
                raise ValueError("--phases: the first phase needs a rate, not 'down'")
            phases.append(Phase("cloud down", phases[-1].rate_bit_s, False))
            continue
        mbit = float(item)
        if not mbit > 0:
            raise ValueError(f"--phases: rate {item!r} must be > 0 Mbit/s")
        back = " (back)" if phases and not phases[-1].cloud_up else ""
        phases.append(Phase(f"{mbit:g} Mbit/s{back}", int(round(mbit * 1e6)), True))
    if not phases:
        raise ValueError("--phases: no phase given")
    return phases


# -- parent: namespaces, cloud, proxy, driver --------------------------------------------------------------


def set_rate(hosts: netns.TwoHosts, rate_bit_s: int) -> None:
    """Change the tbf rate of both ends of the veth pair (the cloud's end is ``vc<tag>`` for ``vd<tag>``, as
    bench/netns.py names them). Raises netns.SetupError naming the command."""
    cloud_link = "vc" + hosts.device_link[2:]
    for ns, link in ((hosts.device_ns, hosts.device_link), (hosts.cloud_ns, cloud_link)):
        cmd = (*hosts.exec(ns), "tc", "qdisc", "change", "dev", link, "root", "tbf", "rate", f"{rate_bit_s}bit",
               *TBF_ARGS)
        done = netns.sh(*cmd)
        if done.returncode != 0:
            raise netns.SetupError(f"{' '.join(cmd)} failed: {done.stderr.strip()}")


DEVICE_CPU = ["taskset", "-c", "0"]  # the device's core (its CFS quota is a share of it)
CLOUD_CPU = ["taskset", "-c", "1"]  # the cloud's and the network's (the proxy)


def start_cloud(hosts: netns.TwoHosts, checkpoint: str, log_path: Path) -> subprocess.Popen:
    """``python -m cloud`` in the cloud namespace, waited for until SERVING across the link."""
    address = f"{hosts.cloud_ip}:{PORT}"
    with open(log_path, "ab") as out:
        cloud = subprocess.Popen(
            [*CLOUD_CPU, *hosts.exec(hosts.cloud_ns), sys.executable, "-m", "cloud", f"checkpoint={checkpoint}",
             f"address={address}", "insecure=true", "log_level=WARNING", "intra_op_threads=1"],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_serving(hosts, address, cloud, CLOUD_START_TIMEOUT_S)
    except RuntimeError:
        stop_process(cloud)
        raise RuntimeError(f"the cloud did not become SERVING; its log:\n{tail(log_path)}") from None
    return cloud


def stop_process(proc: Optional[subprocess.Popen], timeout_s: float = 30.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout_s`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


class Lines:
    """The stdout of a child process as lines in a queue (a reader thread), so that every wait has a deadline."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.lines = proc, queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)  # end of stream

    def expect(self, prefix: str, timeout_s: float) -> str:
        """The first line starting with ``prefix`` within ``timeout_s`` seconds (others skipped); RuntimeError on
        the deadline or the end of the child's output."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"no {prefix!r} line within {timeout_s:.0f} s") from None
            if line is None:
                raise RuntimeError(f"the process ended (status {self.proc.wait(timeout=10)}) before {prefix!r}")
            if line.startswith(prefix):
                return line


@dataclass
class Proxy:
    """The delay proxy's process, the address it listens on and its stdout lines (``RATE ... OK`` answers)."""

    proc: subprocess.Popen
    address: str
    lines: Lines
    paced: bool  # it also serialises at the link rate (not --tbf-only)

    def set_rate(self, rate_bit_s: int) -> None:
        """The proxy's serialisation rate, bit/s (a no-op with ``--tbf-only``); RuntimeError without its ack."""
        if not self.paced:
            return
        self.proc.stdin.write(f"RATE {rate_bit_s}\n")
        self.proc.stdin.flush()
        self.lines.expect(f"RATE {rate_bit_s} OK", 10.0)


def start_proxy(hosts: netns.TwoHosts, delay_ms: float, rate_bit_s: Optional[int], log_path: Path) -> Proxy:
    """bench/delay_proxy.py in the device namespace (outside the CPU-limited group: it stands for the network,
    not the device), serialising at ``rate_bit_s`` (None: delay only)."""
    rate = [] if rate_bit_s is None else ["--rate-bit-s", str(rate_bit_s)]
    with open(log_path, "ab") as err:
        proc = subprocess.Popen(
            [*CLOUD_CPU, *hosts.exec(hosts.device_ns), sys.executable, str(ROOT / "bench" / "delay_proxy.py"),
             "--listen",
             "127.0.0.1:0", "--target", f"{hosts.cloud_ip}:{PORT}", "--delay-ms", f"{delay_ms:g}", *rate,
             "--control", "--log-level", "INFO"], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=err, text=True)
    lines = Lines(proc)
    try:
        address = lines.expect("LISTENING ", 30.0).split()[1]
    except RuntimeError as failure:
        stop_process(proc)
        raise RuntimeError(f"delay proxy: {failure}; its log:\n{tail(log_path)}") from None
    return Proxy(proc, address, lines, rate_bit_s is not None)


def apply_phase(hosts: netns.TwoHosts, proxy: Proxy, phase: Phase, cloud: Optional[subprocess.Popen],
                checkpoint: str, cloud_log: Path) -> Optional[subprocess.Popen]:
    """Bring the link and the cloud to ``phase``; returns the cloud process (None while it is down)."""
    if not phase.cloud_up:
        stop_process(cloud)
        return None
    set_rate(hosts, phase.rate_bit_s)
    proxy.set_rate(phase.rate_bit_s)
    return cloud if cloud is not None and cloud.poll() is None else start_cloud(hosts, checkpoint, cloud_log)


def phase_timeout_s(args: argparse.Namespace) -> float:
    """Worst case of one phase: every request of every strategy at its deadline, twice, plus slack (seconds)."""
    strategies = len(args.strategies) + (6 if FIXED in args.strategies else 0)  # the fixed pairs: a few
    return args.images_per_phase * strategies * (2 * args.deadline_ms / 1000 + 1) + 120


def run(args: argparse.Namespace, checkpoint: str, phases: list[Phase], logs: Path) -> dict:
    """The whole schedule; returns the driver's raw results plus the CPU group's throttling counters."""
    tag = os.getpid() % 200 + 20
    with netns.two_hosts(phases[0].rate_bit_s, tag) as hosts, \
            slow_device.cpu_share(args.device_cpu, f"spinn-e2e-{tag}") as group:
        out = logs / "driver.json"
        cloud = proxy = driver = None
        try:
            cloud = start_cloud(hosts, checkpoint, logs / "cloud.log")
            proxy = start_proxy(hosts, args.rtt_ms / 2, None if args.tbf_only else phases[0].rate_bit_s,
                                logs / "proxy.log")
            with open(logs / "driver.log", "ab") as err:
                # the group prefix goes first: ``ip netns exec`` remounts /sys, hiding the cgroup files
                driver = subprocess.Popen(
                    [*group.command_prefix(), *DEVICE_CPU, *hosts.exec(hosts.device_ns), sys.executable,
                     str(Path(__file__)),
                     "--driver", "--cloud", proxy.address, "--out", str(out), *sys.argv[1:]],
                    cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
            lines = Lines(driver)
            calibration = calibrate_parent(args, lines, driver, group)
            log.info("%s", calibration.summary())
            marks = []  # at each phase's start and at the end: the CPU group's counters and the machine's load
            for i, phase in enumerate(phases):
                lines.expect(f"{PROTOCOL}READY {i}", SETUP_TIMEOUT_S if i == 0 else phase_timeout_s(args))
                marks.append({"cpu_stat": group.stats(), "loadavg_1min": os.getloadavg()[0]})
                cloud = apply_phase(hosts, proxy, phase, cloud, checkpoint, logs / "cloud.log")
                log.info("phase %d: %s", i, phase.label)
                driver.stdin.write(f"GO {i}\n")
                driver.stdin.flush()
            lines.expect(f"{PROTOCOL}FINISHED", phase_timeout_s(args))
            marks.append({"cpu_stat": group.stats(), "loadavg_1min": os.getloadavg()[0]})
            raw = json.loads(out.read_text())
            raw["cpu_stat"], raw["phase_conditions"] = group.stats(), marks
            raw["calibration"] = calibration.to_json()
            return raw
        except (RuntimeError, OSError) as failure:
            raise RuntimeError(f"{failure}\n-- driver log:\n{tail(logs / 'driver.log')}") from None
        finally:
            stop_process(driver, 10)
            stop_process(proxy.proc if proxy else None, 10)
            stop_process(cloud)


def calibrate_parent(args: argparse.Namespace, lines: "Lines", driver: subprocess.Popen,
                     group: slow_device.CpuGroup) -> device_speed.Calibration:
    """The parent's side of the calibration (bench/device_speed.py): read the driver's device-only p50, set the
    quota, until it is ``--device-p50-ms`` (0: keep ``--device-cpu``, one measurement reported)."""
    def measure() -> float:
        return float(lines.expect(f"{PROTOCOL}CALIBRATE ", SETUP_TIMEOUT_S).split()[-1])

    def set_share(share: float) -> None:
        slow_device.resize(group, share)
        driver.stdin.write(f"QUOTA {share:.4f}\n")
        driver.stdin.flush()

    if args.device_p50_ms > 0:
        calibration = device_speed.calibrate(args.device_cpu, args.device_p50_ms, measure, set_share)
    else:
        calibration = device_speed.Calibration(0.0, [{"share": args.device_cpu, "p50_ms": measure()}],
                                               args.device_cpu)
    driver.stdin.write("CALIBRATED\n")
    driver.stdin.flush()
    return calibration


# -- driver: the device, inside its namespace and CPU group --------------------------------------------------


def calibrate_driver(device_only, images: list) -> None:
    """The driver's side: measure the device-only p50 over CALIBRATION_IMAGES requests, report it, and again
    after each new quota, until the parent says CALIBRATED."""
    while True:
        latencies = []
        for i in range(CALIBRATION_IMAGES):
            latencies.append(device_only.classify_tensor(images[i % len(images)][0]).latency_ms)
        say(f"CALIBRATE {float(np.median(latencies)):.2f}")
        ready, _, _ = select.select([sys.stdin], [], [], SETUP_TIMEOUT_S)
        line = sys.stdin.readline().strip() if ready else ""
        if line == "CALIBRATED":
            return
        if not line.startswith("QUOTA "):
            raise RuntimeError(f"expected QUOTA or CALIBRATED from the parent, got {line!r}")


def device_config(args: argparse.Namespace, checkpoint: str, **keys: Any):
    """A DeviceConfig for one strategy: the local checkpoint, the proxy as the cloud, generous deadline."""
    from device.config import DeviceConfig
    from models.config import from_dict

    return from_dict(DeviceConfig, {"checkpoint": checkpoint, "cloud": args.cloud, "deadline_ms": args.deadline_ms,
                                    "log_level": "WARNING", "intra_op_threads": 1, **keys}, source="e2e")


def objective_keys(args: argparse.Namespace) -> dict:
    """The objective of the scheduler and of every fixed choice, as device config keys."""
    return {"objective": args.objective, "accuracy_tolerance": args.accuracy_tolerance,
            **({"latency_bound_ms": args.latency_bound_ms} if args.latency_bound_ms > 0 else {})}


def static_choice(args: argparse.Namespace, profile, objective, block_times: dict, rate_bit_s: int, codecs: dict):
    """The scheduler's decision for a steady link (rate, ``--rtt-ms``) with the device's block times as measured
    on the limited CPU (so that the fixed choice fits this device, not the profiling machine) and the codec the
    cloud announces per split (``codecs``)."""
    from device.scheduler import Conditions, choose

    conditions = Conditions.from_link(bandwidth_bit_s=float(rate_bit_s), rtt_ms=args.rtt_ms)
    if block_times.get("block_ms"):
        conditions.device_block_ms = dict(block_times["block_ms"])
    if block_times.get("exit_ms"):
        conditions.device_exit_ms = dict(block_times["exit_ms"])
    return choose(profile, conditions, objective, codecs)


def fixed_pairs(args: argparse.Namespace, profile, objective, block_times: dict, codecs: dict,
                phases: list) -> dict:
    """``{strategy name: decision}`` for the other fixed pairs: the plan's choice for each phase's link with the
    cloud up, each once (and not the first phase's, which is ``static``)."""
    first = static_choice(args, profile, objective, block_times, phases[0].rate_bit_s, codecs)
    seen, out = {(first.split_point, first.threshold)}, {}
    candidates = [static_choice(args, profile, objective, block_times, p.rate_bit_s, codecs)
                  for p in phases if p.cloud_up]
    for d in candidates:
        if (d.split_point, d.threshold) not in seen:
            seen.add((d.split_point, d.threshold))
            out[f"fixed {d.split_point}/{d.threshold:g}"] = d
    return out


def build_runtimes(args: argparse.Namespace, checkpoint: str, profile, images: list, phases: list):
    """The runtimes of ``args.strategies`` (``fixed`` expanded into its pairs) and the static decision.
    Device-only is built first: it calibrates the device's speed, and its block times feed the fixed choices
    (the first phase's is also the scheduler's starting pair); cloud-only is next, connected, so the codec the
    cloud announces per split is known to the plans."""
    from device.runtime import DeviceRuntime
    from models.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    device_only = DeviceRuntime(device_config(args, checkpoint, split_point=ckpt.model.num_blocks,
                                              z_confidence_threshold=1.0, fallback="final"), ckpt, None, None)
    warm_up(device_only, images, max(args.warmup, 10))
    calibrate_driver(device_only, images)
    warm_up(device_only, images, 20)  # the block-time averages follow the calibrated speed
    cloud_only = DeviceRuntime.start(device_config(args, checkpoint, split_point=0, input_codec="jpeg"))
    codecs = cloud_only.codec_names()
    times = device_only.block_times.snapshot()
    objective = device_config(args, checkpoint, **objective_keys(args)).objective_spec(profile.final_accuracy)
    decision = static_choice(args, profile, objective, times, phases[0].rate_bit_s, codecs)
    log.warning("static choice: split %d threshold %.2f (%s)", decision.split_point, decision.threshold,
                decision.reason)
    keys = {"static": {"split_point": decision.split_point, "z_confidence_threshold": decision.threshold},
            "scheduler": {"split_point": decision.split_point, "z_confidence_threshold": decision.threshold,
                          "scheduler": True, "profile": str(args.profile), **objective_keys(args),
                          # it starts from what the static choice was told about the first phase's link
                          "initial_bandwidth_mbit": phases[0].rate_bit_s / 1e6, "initial_rtt_ms": args.rtt_ms}}
    if FIXED in args.strategies:
        for name, d in fixed_pairs(args, profile, objective, times, codecs, phases).items():
            keys[name] = {"split_point": d.split_point, "z_confidence_threshold": d.threshold}
    runtimes = {"device-only": device_only, "cloud-only": cloud_only}
    for name in expand(args.strategies, keys):
        if name not in runtimes:
            runtimes[name] = DeviceRuntime.start(device_config(args, checkpoint, **keys[name]))
        warm_up(runtimes[name], images, args.warmup)
    return {name: runtimes[name] for name in expand(args.strategies, keys)}, decision


def expand(strategies: list[str], keys: dict) -> list[str]:
    """The strategies in order, ``fixed`` replaced by the fixed pairs' names."""
    fixed = [k for k in keys if k.startswith(FIXED + " ")]
    return [n for s in strategies for n in (fixed if s == FIXED else [s])]


def warm_up(runtime, images: list, count: int) -> None:
    """``count`` unrecorded requests (cycling through ``images``): the first ones pay for connection set-up and
    allocator warm-up."""
    for i in range(count):
        x = images[i % len(images)][0]
        try:
            runtime.classify_tensor(x)
        except Exception as err:  # noqa: BLE001 - warm-up only; the phases count failures
            log.warning("warm-up request failed: %r", err)


def jsonable(value: Any) -> Any:
    """Floats for numpy scalars and tensors, recursively (the scheduler's predictions)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item"):
        return value.item()
    return value


def classify(runtime, strategy: str, phase: int, x, label: int, t0: float) -> dict:
    """One request; an exception is an answer lost (recorded, never raised)."""
    t = time.perf_counter() - t0
    row = {"phase": phase, "strategy": strategy, "t": t}
    try:
        result = runtime.classify_tensor(x)
    except Exception as err:  # noqa: BLE001 - counting lost answers is the point
        row.update(lost=True, error=repr(err)[:300], latency_ms=(time.perf_counter() - t0 - t) * 1000,
                   correct=False, bytes_sent=0, answered_by="", split_point=None, degraded=True)
        return row
    row.update(lost=False, latency_ms=result.latency_ms, correct=result.class_id == label,
               bytes_sent=result.bytes_sent, answered_by=result.answered_by, split_point=result.split_point,
               degraded=result.degraded, codec=result.codec)
    # the decision in force after this request (the scheduler re-plans on a thread of its own, between requests)
    adaptive = getattr(runtime, "adaptive", None)
    last = getattr(adaptive, "last", None)
    if last is not None:
        row["predicted"] = jsonable(dict(last.predicted))
        row["link"] = jsonable(adaptive.link.summary())  # the estimates it planned with
        row["choice"] = [int(last.split_point), float(last.threshold)]
        row["reason"] = last.reason
    return row


def run_phase(index: int, strategies: list[str], runtimes: dict, images: list, t0: float,
              rows: list[dict]) -> dict:
    """Every strategy over the images, in an order rotated by ``index``; returns the phase's time marks."""
    k = index % len(strategies)
    order = strategies[k:] + strategies[:k]
    marks = {"phase": index, "order": order, "start": time.perf_counter() - t0, "strategies": {}}
    for name in order:
        start, cpu, own = time.perf_counter() - t0, time.process_time(), time.thread_time()
        adaptive = getattr(runtimes[name], "adaptive", None)
        sched_cpu = adaptive.cpu_ms if adaptive is not None else 0.0
        for x, label in images:
            rows.append(classify(runtimes[name], name, index, x, label, t0))
        if adaptive is not None:  # the scheduler thread's CPU while its own requests ran
            marks.setdefault("scheduler_cpu_ms", 0.0)
            marks["scheduler_cpu_ms"] += adaptive.cpu_ms - sched_cpu
        # CPU seconds of the whole driver (every runtime's threads) and of this thread (the requests themselves)
        # during this strategy's requests: the difference is background work sharing the device's quota
        marks["strategies"][name] = {"start": start, "end": time.perf_counter() - t0,
                                     "cpu_s": time.process_time() - cpu, "request_cpu_s": time.thread_time() - own}
    marks["end"] = time.perf_counter() - t0
    return marks


def wait_go(index: int, timeout_s: float) -> None:
    """Block until the parent's ``GO <index>`` line (the protocol is lock-step, so at most one line is ever
    pending and select on the raw stdin cannot miss a line held in Python's buffer)."""
    ready, _, _ = select.select([sys.stdin], [], [], timeout_s)
    line = sys.stdin.readline().strip() if ready else None
    if line != f"GO {index}":
        raise RuntimeError(f"expected 'GO {index}' from the parent within {timeout_s:.0f} s, got {line!r}")


def say(text: str) -> None:
    print(PROTOCOL + text, flush=True)


def drive(args: argparse.Namespace, app_args: list[str], phases: list[Phase]) -> None:
    """The driver process: load the images and the runtimes, then one phase per GO; raw results to --out."""
    import torch

    from bench.progressive import load
    from models.app_config import AppConfig
    from models.config import parse_app_argv
    from models.offline_profile import load_profile

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(1)  # the device: one thread, itself limited to a share of a core by its cgroup
    app = parse_app_argv(AppConfig, app_args)
    checkpoint = str(app.checkpoint_path())
    _, batches = load(app, args.images_per_phase)
    images = [(x, int(y)) for xs, ys in batches for x, y in zip(xs, ys)][:args.images_per_phase]
    runtimes, decision = build_runtimes(args, checkpoint, load_profile(args.profile), images, phases)
    names = list(runtimes)
    rows: list[dict] = []
    marks = []
    try:
        t0 = time.perf_counter()
        for i in range(len(phases)):
            say(f"READY {i}")
            wait_go(i, GO_TIMEOUT_S)
            marks.append(run_phase(i, names, runtimes, images, t0, rows))
        static = {"split_point": decision.split_point, "threshold": decision.threshold,
                  "feasible": decision.feasible, "predicted": jsonable(dict(decision.predicted)),
                  "reason": decision.reason}
        adaptive = getattr(runtimes.get("scheduler"), "adaptive", None)
        cost = None if adaptive is None else {
            "rounds": adaptive.rounds, "cpu_ms": adaptive.cpu_ms, "decisions": adaptive.scheduler.decisions,
            "cpu_ms_own_turns": sum(m.get("scheduler_cpu_ms", 0.0) for m in marks),
            "requests": sum(1 for r in rows if r["strategy"] == "scheduler"),
            "request_ms_mean": float(np.mean([r["latency_ms"] for r in rows if r["strategy"] == "scheduler"]))}
        model = runtimes["device-only"].active.model
        learned_split = None if model.bottleneck is None else model.bottleneck.config.split_point
        Path(args.out).write_text(json.dumps({"rows": rows, "marks": marks, "static": static, "strategies": names,
                                              "num_blocks": model.num_blocks, "learned_split": learned_split,
                                              "images": len(images), "scheduler_cost": cost}))
        say("FINISHED")
    finally:
        for runtime in runtimes.values():
            runtime.close()


# -- summary, checks, report ---------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> Optional[float]:
    return float(np.percentile(values, q)) if values else None


def summarize_cell(rows: list[dict], wall_s: float) -> dict:
    """One phase x strategy: accuracy (lost = wrong), latency percentiles (answered requests), bytes, lost."""
    answered = [r for r in rows if not r["lost"]]
    lat = [r["latency_ms"] for r in answered]
    out = {"n": len(rows), "accuracy": sum(r["correct"] for r in rows) / len(rows) if rows else None,
           "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95),
           "bytes_per_image": sum(r["bytes_sent"] for r in rows) / len(rows) if rows else None,
           "lost": len(rows) - len(answered), "degraded": sum(r["degraded"] for r in answered),
           "device_answered": sum(r["answered_by"].startswith("device") for r in answered),
           "throughput_per_s": len(rows) / wall_s if wall_s > 0 else None,
           "splits": dict(Counter(str(r["split_point"]) for r in answered)),
           "codecs": dict(Counter(r["codec"] for r in answered if r.get("codec")))}
    predicted = [r["predicted"]["latency_p50_ms"] for r in rows
                 if isinstance(r.get("predicted"), dict) and r["predicted"].get("latency_p50_ms") is not None]
    if predicted:
        out["predicted_p50_ms"] = float(np.mean(predicted))
        if out["p50_ms"]:
            out["prediction_error"] = (out["predicted_p50_ms"] - out["p50_ms"]) / out["p50_ms"]
        choices = Counter(tuple(r["choice"]) for r in rows if r.get("choice"))
        out["choices"] = [{"split_point": s, "threshold": t, "requests": c} for (s, t), c in choices.most_common()]
        if choices:
            most = choices.most_common(1)[0][0]
            top = next(r for r in reversed(rows) if r.get("choice") and tuple(r["choice"]) == most)
            q = top["predicted"]
            link = top.get("link") or {}
            planned = "" if not link else (
                f" (link as estimated: {link['bandwidth_bit_s'] / 1e6:.2f} Mbit/s, p05 "
                f"{link['bandwidth_p05_bit_s'] / 1e6:.2f}; RTT {link['rtt_ms']:.0f} ms, p95 {link['rtt_p95_ms']:.0f})")
            out["why"] = (f"split {q['split_point']}/{q['threshold']:g} {q['codec']}: predicted p95 "
                          f"{q['latency_p95_ms']:.0f} ms, {q['bytes_per_image']:.0f} B/image, accuracy "
                          f"{q['accuracy']:.3f} (lower bound {q.get('accuracy_low', q['accuracy']):.3f}){planned}; "
                          f"{top.get('reason', '')}")
    return out


def summarize(raw: dict, phases: list[Phase]) -> list[dict]:
    """Per phase: its conditions and one cell per strategy."""
    out = []
    for mark, phase in zip(raw["marks"], phases):
        cells = {}
        for name in mark["order"]:
            span = mark["strategies"][name]
            rows = [r for r in raw["rows"] if r["phase"] == mark["phase"] and r["strategy"] == name]
            cells[name] = summarize_cell(rows, span["end"] - span["start"])
            if "cpu_s" in span and span["end"] > span["start"]:
                wall = span["end"] - span["start"]
                cells[name]["driver_cpu_share"] = span["cpu_s"] / wall
                cells[name]["background_cpu_share"] = (span["cpu_s"] - span["request_cpu_s"]) / wall
        out.append({"phase": mark["phase"], **asdict(phase), "order": mark["order"], "strategies": cells})
    marks = raw.get("phase_conditions", [])  # one at each phase's start, one at the end
    for p, before, after in zip(out, marks, marks[1:]):
        p["throttled_periods"] = after["cpu_stat"].get("nr_throttled", 0) - before["cpu_stat"].get("nr_throttled", 0)
        p["loadavg_1min"] = after["loadavg_1min"]
    return out


def checks(summary: list[dict]) -> list[dict]:
    """The goals, one entry each: ``{"check", "phase", "passed", "detail"}``."""
    out = []

    def add(name: str, phase: dict, passed: bool, detail: str) -> None:
        out.append({"check": name, "phase": phase["label"], "passed": bool(passed), "detail": detail})

    for p in summary:
        s = p["strategies"]
        lost = {k: v["lost"] for k, v in s.items()}
        add("no answer lost", p, sum(lost.values()) == 0, f"lost per strategy {lost}")
        if "scheduler" not in s:  # a run without the scheduler (--strategies): only the check above applies
            continue
        sched, static, local = s["scheduler"], s.get("static"), s.get("device-only")
        if static and p["cloud_up"] and p["rate_bit_s"] <= LOW_BANDWIDTH_BIT_S and sched["p95_ms"] \
                and static["p95_ms"]:
            ratio = sched["p95_ms"] / static["p95_ms"]
            add("low bandwidth: scheduler p95 <= 0.5 x static, accuracy >= static", p,
                ratio <= 0.5 and sched["accuracy"] >= static["accuracy"],
                f"p95 {sched['p95_ms']:.0f} vs {static['p95_ms']:.0f} ms (x{ratio:.2f}), accuracy "
                f"{sched['accuracy']:.3f} vs {static['accuracy']:.3f}")
        if local and not p["cloud_up"]:
            add("cloud down: scheduler accuracy >= device-only - 1 point, nothing lost", p,
                sched["accuracy"] >= local["accuracy"] - 0.01 and sched["lost"] == 0,
                f"accuracy {sched['accuracy']:.3f} vs {local['accuracy']:.3f}, lost {sched['lost']}")
        best = best_fixed(s)
        if best is not None:
            name, cell = best
            add("scheduler p95 <= 1.1 x the best fixed strategy's, accuracy >= its - 1 point", p,
                sched["p95_ms"] <= 1.1 * cell["p95_ms"] and sched["accuracy"] >= cell["accuracy"] - 0.01,
                f"best fixed: {name} (p95 {cell['p95_ms']:.0f} ms, accuracy {cell['accuracy']:.3f}); scheduler p95 "
                f"{sched['p95_ms']:.0f} ms (x{sched['p95_ms'] / cell['p95_ms']:.2f}), accuracy {sched['accuracy']:.3f}")
        err = sched.get("prediction_error")
        add("predicted p50 within 25 % of measured", p, err is not None and abs(err) <= 0.25,
            "no prediction recorded" if err is None else
            f"predicted {sched['predicted_p50_ms']:.0f} ms vs measured {sched['p50_ms']:.0f} ms ({100 * err:+.0f} %)")
    return out


def learned_check(summary: list[dict]) -> Optional[dict]:
    """Whether the scheduler sent its bottleneck's code (a learned codec: only ever at the bottleneck's split, an
    intermediate one) in some phase; None without a scheduler."""
    used = []
    for p in summary:
        cell = p["strategies"].get("scheduler")
        if cell is None:
            return None
        learned = {name: n for name, n in cell.get("codecs", {}).items() if name.startswith("learned")}
        if learned:
            used.append(f"{p['label']}: " + ", ".join(f"{n} of {cell['n']} sent as {name}"
                                                      for name, n in learned.items()))
    return {"check": "the scheduler sends the learned codec (an intermediate split) in some phase", "phase": "-",
            "passed": bool(used), "detail": "; ".join(used) or "in no phase"}


def best_fixed(cells: dict) -> Optional[tuple[str, dict]]:
    """The phase's best fixed strategy: the smallest p95 among the fixed strategies (all but the scheduler)
    within 1 point of the most accurate of them; None when none answered."""
    fixed = {k: v for k, v in cells.items() if k != "scheduler" and v["p95_ms"] is not None}
    if not fixed:
        return None
    top = max(v["accuracy"] for v in fixed.values())
    return min(((k, v) for k, v in fixed.items() if v["accuracy"] >= top - 0.01), key=lambda kv: kv[1]["p95_ms"])


def fmt(value: Optional[float], spec: str = ".0f", unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def setup_text(result: dict) -> str:
    """The report's paragraph on how the run was emulated."""
    a, cpu = result["setup"], result["cpu_stat"]
    pacing = ("the proxy does not pace (--tbf-only): a message within tbf's 4 KB burst crosses at line rate"
              if a["tbf_only"] else "the proxy also serialises each direction at the phase's rate, since tbf "
              "lets a message within its 4 KB burst through at line rate")
    return (f"Device and cloud as separate processes in two network namespaces over a veth pair shaped with "
            f"`tc tbf` each way (rate per phase below). RTT: {a['rtt_ms']:g} ms added by a user-space TCP proxy "
            f"(bench/delay_proxy.py, {a['rtt_ms'] / 2:g} ms each way; netem does not exist on this machine) on "
            f"top of the veth's own; {pacing}. The device's speed: {result['calibration_text']}; the CFS "
            f"quota of a cgroup (bench/slow_device.py; throttled in {cpu.get('nr_throttled', 0)} of "
            f"{cpu.get('nr_periods', 0)} periods), one torch thread; the cloud has one intra-op thread and no CPU "
            f"limit. {a['images']} validation images per phase, the same for every strategy and phase; per-request "
            f"deadline {a['deadline_ms']:g} ms; objective {a['objective']}"
            + (f", latency bound {a['latency_bound_ms']:g} ms." if a["latency_bound_ms"] > 0 else
               f" (the fastest pair within {100 * a.get('accuracy_tolerance', 0.01):g} point(s) of the model's "
               "accuracy, judged at its lower bound)."))


def table(result: dict) -> list[str]:
    """One row per phase x strategy."""
    lines = ["| phase | strategy | accuracy | p50 ms | p95 ms | bytes/img | sent as | lost | degraded | on device |"
             " img/s | driver CPU | of it background | predicted p50 ms |", "|---" * 14 + "|"]
    for p in result["summary"]:
        for name in result["setup"]["strategies"]:
            c = p["strategies"][name]
            pred = "" if "predicted_p50_ms" not in c else \
                f"{c['predicted_p50_ms']:.0f} ({100 * c.get('prediction_error', 0):+.0f} %)"
            lines.append(f"| {p['label']} | {name} | {fmt(c['accuracy'], '.3f')} | {fmt(c['p50_ms'])} | "
                         f"{fmt(c['p95_ms'])} | {fmt(c['bytes_per_image'])} | {sent_as(c)} | {c['lost']} | "
                         f"{c['degraded']} | "
                         f"{c['device_answered']}/{c['n']} | {fmt(c['throughput_per_s'], '.1f')} | "
                         f"{fmt(c.get('driver_cpu_share'), '.2f')} | {fmt(c.get('background_cpu_share'), '.2f')} | "
                         f"{pred} |")
    return lines


def sent_as(cell: dict) -> str:
    """The codecs a cell's uploads used, most used first (``-`` when nothing was sent)."""
    codecs = sorted(cell.get("codecs", {}).items(), key=lambda kv: -kv[1])
    return ", ".join(f"{name} {n}" for name, n in codecs) or "-"


def markdown(result: dict) -> str:
    """The report: setup, one table row per phase x strategy, the checks, what each strategy is."""
    st, summary = result["static"], result["summary"]
    lines = [f"# End-to-end SPINN: {result['setup']['name']}", "", f"`{result['command']}`", "",
             setup_text(result), "", *table(result)]
    load = ", ".join(f"{p['label']} {p.get('loadavg_1min', 0):.2f}" for p in summary)
    throttled = ", ".join(str(p.get("throttled_periods", "-")) for p in summary)
    lines += ["", "*driver CPU*: CPU time of the whole driver process (all runtimes' threads) over the "
              "strategy's wall time, in cores (at most the quota); *of it background*: the part not spent by the "
              "thread making the requests (gRPC, health probes, the scheduler's thread, of every runtime). Machine "
              f"load (1-min average) at the end of each phase: {load}; CFS-throttled periods per phase: {throttled}.",
              "", "Checks:", ""]
    lines += [f"- {'PASS' if c['passed'] else 'FAIL'} [{c['phase']}] {c['check']}: {c['detail']}"
              for c in result["checks"]]
    cost = result.get("scheduler_cost")
    if cost:
        own = cost.get("cpu_ms_own_turns", cost["cpu_ms"]) / max(1, cost["requests"])
        whole = cost["cpu_ms"] / max(1, cost["requests"])
        lines += ["", f"Scheduler's own cost (CPU time of its thread: pings, probes, estimates, decisions): "
                  f"{own:.2f} ms per request while its own requests ran = **{100 * own / cost['request_ms_mean']:.2f}"
                  f" %** of its mean request latency ({cost['request_ms_mean']:.0f} ms); over the whole run "
                  f"({cost['rounds']} rounds, {cost['decisions']} switches, also while the other strategies had their "
                  f"turns) {whole:.2f} ms per request ({100 * whole / cost['request_ms_mean']:.2f} %)."]
    lines += ["", "Why, per phase (the scheduler's most used decision: its reason and prediction): " + "; ".join(
        f"{p['label']}: {p['strategies']['scheduler'].get('why', '-')}" for p in summary
        if "scheduler" in p["strategies"])]
    lines += ["", "Scheduler choices per phase (split/threshold: requests): " + "; ".join(
        f"{p['label']}: " + ", ".join(f"{c['split_point']}/{c['threshold']:g}: {c['requests']}"
                                      for c in p["strategies"].get("scheduler", {}).get("choices", []))
        for p in summary), "",
        "Strategies: **device-only** runs the whole model on the device with no link (split = number of blocks, "
        "threshold 1.0: the final classifier answers); **cloud-only** uploads every input as a JPEG (split point "
        "0) and the cloud runs the whole network; **static** is the scheduler's own choice for the first phase's "
        f"link and this device's measured block times, then fixed (split {st['split_point']}, threshold "
        f"{st['threshold']:g}: {st['reason']}); **fixed s/t** are the other pairs the plan picks for some phase's "
        "link, each fixed through every phase (every pair the profile lists would be hundreds of runs: these are the ones any phase could want); "
        "**scheduler** re-plans from its live measurements (`scheduler: true`, the same objective). The best fixed "
        "strategy of a phase is the fastest (p95) of those within 1 point of the most accurate of them. "
        "Accuracy counts a lost answer as "
        "wrong; latency is the device's wall time per request; img/s is sequential requests over the strategy's "
        "wall time in the phase; *degraded* answers were meant for the cloud and answered on the device.", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Latency per request over time per strategy (log scale), phase boundaries, the scheduler's split point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 5))
    for name in result["setup"]["strategies"]:
        rows = [r for r in result["rows"] if r["strategy"] == name]
        ok = [r for r in rows if not r["lost"]]
        ax.scatter([r["t"] for r in ok], [max(r["latency_ms"], 0.1) for r in ok], s=6, label=name)
        lost = [r for r in rows if r["lost"]]
        if lost:
            ax.scatter([r["t"] for r in lost], [max(r["latency_ms"], 0.1) for r in lost], marker="x", c="k", s=20)
    ax.set_yscale("log")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("latency per request (ms)")
    for mark, p in zip(result["marks"], result["summary"]):
        ax.axvline(mark["start"], color="grey", lw=0.8, ls="--")
        if not p["cloud_up"]:
            ax.axvspan(mark["start"], mark["end"], color="red", alpha=0.08)
        ax.text(mark["start"], 1.0, " " + p["label"], transform=ax.get_xaxis_transform(), va="top", fontsize=8)
    sched = sorted((r for r in result["rows"] if r["strategy"] == "scheduler" and not r["lost"]),
                   key=lambda r: r["t"])
    if sched:
        ax2 = ax.twinx()
        for i, phase in enumerate(sorted({r["phase"] for r in sched})):  # one line per phase: no line across gaps
            part = [r for r in sched if r["phase"] == phase]
            ax2.step([r["t"] for r in part], [r["split_point"] for r in part], where="post", color="k", lw=0.8,
                     label="scheduler split point" if i == 0 else None)
        ax2.set_ylabel("scheduler split point")
        ax2.set_ylim(-0.5, max(r["split_point"] for r in sched) + 1.5)
    fig.legend(loc="lower center", ncol=len(STRATEGIES) + 1, fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def split_profile_arg(app_args: list[str], profile: Optional[str]) -> tuple[list[str], Optional[str]]:
    """``profile=PATH`` is this script's, not an app config key: take it out of the app arguments."""
    rest = [a for a in app_args if not a.startswith("profile=")]
    given = [a[len("profile="):] for a in app_args if a.startswith("profile=")]
    return rest, (given[-1] if given else profile)


def parse_args() -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default=None, help="the offline profile (or profile=PATH)")
    parser.add_argument("--rtt-ms", type=float, default=40.0, help="round-trip time added by the proxy, ms")
    parser.add_argument("--device-p50-ms", type=float, default=250.0,
                        help="calibrate the device's CFS quota until its device-only p50 is this (ms); 0: use "
                             "--device-cpu as it is")
    parser.add_argument("--device-cpu", type=float, default=0.35,
                        help="device CPU, fraction of one core (the calibration's starting point)")
    parser.add_argument("--objective", default="min_latency",
                        help="the scheduler's and the fixed choices' objective (device config 'objective')")
    parser.add_argument("--images-per-phase", type=int, default=60)
    parser.add_argument("--phases", default="20,5,1,0.25,down,20", help="Mbit/s each way, or 'down'")
    parser.add_argument("--latency-bound-ms", type=float, default=0.0,
                        help="p95 bound, ms (needed by max_accuracy; 0: none)")
    parser.add_argument("--accuracy-tolerance", type=float, default=0.01,
                        help="min_latency's accuracy floor below the model's (device config 'accuracy_tolerance')")
    parser.add_argument("--deadline-ms", type=float, default=3000.0, help="the device's per-request deadline")
    parser.add_argument("--tbf-only", action="store_true",
                        help="the proxy only delays: serialisation left to tc tbf (whose 4 KB burst hides it)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="a subset, comma-separated")
    parser.add_argument("--warmup", type=int, default=3, help="unrecorded requests per strategy before phase 0")
    parser.add_argument("--name", default="quickstart")
    parser.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cloud", default="", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args, app_args = parser.parse_known_args()
    app_args, args.profile = split_profile_arg(app_args, args.profile)
    if args.profile is None:
        parser.error("give the offline profile: profile=PATH (python test.py app:... split_point=all)")
    wanted = set(args.strategies.split(","))
    if not wanted <= set(STRATEGIES):
        parser.error(f"--strategies: choose from {', '.join(STRATEGIES)}")
    args.strategies = [s for s in STRATEGIES if s in wanted]
    if args.images_per_phase < 1 or not args.device_cpu > 0:
        parser.error("--images-per-phase must be >= 1 and --device-cpu > 0")
    return args, app_args


def report(args: argparse.Namespace, raw: dict, phases: list[Phase]) -> dict:
    """Summary, checks and the three result files; returns the result document."""
    summary = summarize(raw, phases)
    result = {"command": "python bench/e2e.py " + " ".join(sys.argv[1:]),
              "setup": {"name": args.name, "rtt_ms": args.rtt_ms, "device_cpu": args.device_cpu,
                        "device_p50_ms": args.device_p50_ms, "objective": args.objective,
                        "images": raw["images"], "deadline_ms": args.deadline_ms,
                        "latency_bound_ms": args.latency_bound_ms, "accuracy_tolerance": args.accuracy_tolerance,
                        "phases": [asdict(p) for p in phases],
                        "strategies": raw.get("strategies", args.strategies), "tbf_only": args.tbf_only,
                        "profile": str(args.profile)},
              "static": raw["static"], "cpu_stat": raw.get("cpu_stat", {}), "summary": summary,
              "scheduler_cost": raw.get("scheduler_cost"),
              "checks": checks(summary), "marks": raw["marks"], "rows": raw["rows"],
              "calibration": raw.get("calibration")}
    calibration = raw.get("calibration")
    result["calibration_text"] = (device_speed.Calibration(**calibration).summary() if calibration else
                                  f"{args.device_cpu:g} of one core, not calibrated")
    learned = learned_check(summary)
    if learned is not None and raw.get("learned_split") is not None:  # a model with a bottleneck
        result["checks"].append(learned)
    if calibration and not calibration["converged"]:
        result["checks"].append({"check": "device speed calibrated", "phase": "-", "passed": False,
                                 "detail": result["calibration_text"]})
    result["passed"] = all(c["passed"] for c in result["checks"])
    stem = write_results(f"e2e_{args.name}", result, markdown(result), echo=False)
    plot(result, stem.with_suffix(".png"))
    return result


def main() -> int:
    args, app_args = parse_args()
    try:
        phases = parse_phases(args.phases)
    except ValueError as err:
        print(f"e2e: {err}", file=sys.stderr)
        return 2
    if args.driver:
        drive(args, app_args, phases)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    reason = netns.why_not() or slow_device.why_not()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    from models.app_config import AppConfig
    from models.config import parse_app_argv

    checkpoint = str(parse_app_argv(AppConfig, app_args).checkpoint_path())
    with tempfile.TemporaryDirectory(prefix="spinn-e2e-") as tmp:
        try:
            raw = run(args, checkpoint, phases, Path(tmp))
        except (RuntimeError, netns.SetupError) as err:
            log.error("%s", err)
            return 1
    result = report(args, raw, phases)
    print(markdown(result))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
