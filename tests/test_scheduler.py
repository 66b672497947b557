"""The scheduler: decisions on synthetic profiles, the profile of a real small model, the runtime switching split
points under load, the predictor against measured latency on loopback, and ``python -m device plan``."""

import json
import subprocess
import sys
import threading
import time

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from device.config import DeviceConfig
from device.runtime import DeviceRuntime
from device.scheduler import Conditions, Objective, Scheduler, choose, predict
from models.config import ConfigError, from_dict
from models.offline_profile import (BytesStats, OfflineProfile, ProfileError, SplitEntry, ThresholdOutcome,
                                    build_profile, load_profile)
from tests.conftest import BOTTLENECK_SPLIT, ROOT, SIZE
from tests.test_device import image_bytes, start_cloud
from tests.test_learned_wire import sharp_bottleneck_checkpoint  # noqa: F401 (a fixture)

THRESHOLDS = [0.0, 0.5, 0.9, 1.0]


def synthetic_profile() -> OfflineProfile:
    """Four blocks, exits after blocks 2 and 4: deeper splits send fewer bytes and answer more on the device,
    at a lower accuracy for low thresholds (the trade-off every scheduler faces)."""
    rates = {0.0: (1.0, 0.0), 0.5: (0.4, 0.3), 0.9: (0.1, 0.1), 1.0: (0.0, 0.0)}  # exit 2, exit 4 shares
    acc = {0.0: 0.60, 0.5: 0.75, 0.9: 0.80, 1.0: 0.82}
    sizes = [20_000, 16_000, 8_000, 6_000, 2_000]
    splits = []
    for s in range(5):
        exits = [e for e in (2, 4) if e <= s]
        rows = []
        for t in THRESHOLDS:
            r = [rates[t][i] for i, _ in enumerate(exits)]
            rows.append(ThresholdOutcome(t, 1.0 - sum(r), acc[t] if exits else 0.82, r))
        bytes_ = {"int8+zstd": BytesStats(sizes[s], sizes[s] * 1.2)}
        if s == 0:
            bytes_["jpeg"] = BytesStats(10_000, 12_000)
        splits.append(SplitEntry(s, exits, [8, 8, 8], s * 10_000_000, (4 - s) * 10_000_000, bytes_, rows))
    return OfflineProfile("synthetic", "top1", 1000, 4, [2, 4], THRESHOLDS, 0.82, [30.0, 30.0, 30.0, 30.0],
                          {2: 2.0, 4: 2.0}, 5.0, splits)


def link(mbit: float, rtt_ms: float = 20.0) -> Conditions:
    """A steady link to a cloud 10x faster than the (profiled) device."""
    cond = Conditions.from_link(mbit * 1e6, rtt_ms)
    cond.cloud_compute_scale = 0.1
    return cond


def test_a_pair_accurate_only_by_the_sample_does_not_win():
    """Thresholds 0.5 and 1.0 at split 2 have the same profile accuracy and 0.5 sends fewer bytes (its exit
    answers 40 %), but on 400 of the 1,000 images its exit answered differently from the final classifier: its
    lower bound (accuracy less 1.645 standard errors of the difference, about 0.033) falls below the floor, so the
    pair whose accuracy rests on no such luck is chosen; with few changed images the frugal pair wins."""
    def decide(changed: int):
        profile = synthetic_profile()
        for row in profile.split(2).rows:
            row.accuracy = 0.82 if row.threshold >= 0.5 else row.accuracy
            row.changed = changed if row.threshold == 0.5 else (100 if row.threshold == 0.9 else row.changed)
        return choose(profile, link(0.5, 30.0), Objective("min_bytes", accuracy=0.81), splits=[2])

    noisy = decide(400)
    assert (noisy.split_point, noisy.threshold) == (2, 1.0) and noisy.feasible
    assert decide(4).threshold == 0.5  # the same pair with 4 changed images: its accuracy is firm
    cands = {c.threshold: c for c in predict(synthetic_profile(), link(0.5, 30.0), splits=[2])}
    assert cands[1.0].accuracy_low == cands[1.0].accuracy  # nothing answered differently: no uncertainty


def test_the_profile_counts_images_an_exit_answered_differently():
    """``changed`` is the number of images where the policy's correctness differs from the final classifier's,
    so a threshold no exit reaches changes none, and the standard error is that of a -1/0/+1 mean."""
    from models.exit_policy import CachedOutputs, evaluate_threshold
    conf = torch.tensor([[0.9, 0.9, 0.9, 0.1]])
    device_correct = torch.tensor([[True, False, True, True]])
    final = torch.tensor([False, True, True, False])
    cache = CachedOutputs(conf, device_correct, final, [2])
    assert evaluate_threshold(cache, 0.5, 0.0).changed == 2  # image 0 gained, image 1 lost
    assert evaluate_threshold(cache, 1.0, 0.0).changed == 0
    row = ThresholdOutcome(0.5, 0.25, 0.5, [0.75], changed=2)
    assert row.accuracy_se(4, 0.5) == pytest.approx((0.5 / 4) ** 0.5)


@pytest.mark.parametrize("objective", [Objective("max_accuracy", latency_ms=120.0),
                                       Objective("min_latency", accuracy=0.75),
                                       Objective("min_bytes", accuracy=0.75),
                                       Objective("min_cloud_load", accuracy=0.75),
                                       Objective("max_throughput", accuracy=0.75)])
def test_decisions_respect_constraints_and_are_the_best_candidate(objective):
    profile = synthetic_profile()
    for mbit in (50.0, 10.0, 2.0, 0.5):
        cond = link(mbit, 30.0)
        d = choose(profile, cond, objective)
        cands = predict(profile, cond)
        feasible = [c for c in cands if (objective.latency_ms is None or c.latency_p95_ms <= objective.latency_ms)
                    and (objective.accuracy is None or c.accuracy >= objective.accuracy)]
        assert d.feasible == bool(feasible)
        if not feasible:
            continue
        if objective.latency_ms is not None:
            assert d.predicted["latency_p95_ms"] <= objective.latency_ms
        if objective.accuracy is not None:
            assert d.predicted["accuracy"] >= objective.accuracy
        key = {"max_accuracy": lambda c: -c.accuracy, "min_bytes": lambda c: c.bytes_per_image,
               "min_latency": lambda c: c.latency_p95_ms,
               "min_cloud_load": lambda c: c.cloud_mflops_per_image,
               "max_throughput": lambda c: -c.throughput_per_s}[objective.kind]
        best = min(key(c) for c in feasible)
        chosen = next(c for c in cands if (c.split_point, c.threshold) == (d.split_point, d.threshold))
        assert key(chosen) == pytest.approx(best, abs=0.003)


def test_less_bandwidth_never_means_more_bytes_for_a_latency_bound():
    profile = synthetic_profile()
    objective = Objective("max_accuracy", latency_ms=100.0)
    sent = []
    for mbit in (100.0, 20.0, 5.0, 1.0, 0.25, 0.05):
        d = choose(profile, link(mbit), objective)
        sent.append(d.predicted["bytes_per_image"])
    assert sent == sorted(sent, reverse=True)
    assert sent[0] > sent[-1]  # it did move: fast links upload, slow ones answer on the device


def test_tail_planning_uses_the_p95_of_the_link():
    profile = synthetic_profile()
    steady = link(2.0, 30.0)
    jittery = link(2.0, 30.0)
    jittery.bandwidth_p05_bytes_per_s /= 4
    jittery.rtt_p95_ms = 120.0
    a, b = predict(profile, steady), predict(profile, jittery)
    uploads = [(x, y) for x, y in zip(a, b) if x.uploading_rate > 0.2]
    assert uploads and all(y.latency_p95_ms > x.latency_p95_ms for x, y in uploads)
    only = [(x, y) for x, y in uploads if x.uploading_rate == 1.0]  # the median upload: mean conditions
    assert only and all(y.latency_p50_ms == pytest.approx(x.latency_p50_ms) for x, y in only)


def test_infeasible_bound_is_reported_and_the_fastest_pair_picked():
    profile = synthetic_profile()
    d = choose(profile, link(1.0, 30.0), Objective("max_accuracy", latency_ms=1.0))
    assert not d.feasible and "no pair meets" in d.reason
    fastest = min(c.latency_p95_ms for c in predict(profile, link(1.0, 30.0)))
    assert d.predicted["latency_p95_ms"] == pytest.approx(fastest)


def test_cloud_down_plans_on_the_device_and_never_loses_accuracy():
    profile = synthetic_profile()
    cond = link(10.0, 30.0)
    cond.cloud_up = False
    d = choose(profile, cond, Objective("max_accuracy", latency_ms=1000.0))
    assert d.predicted["bytes_per_image"] == 0.0
    assert d.predicted["accuracy"] == pytest.approx(profile.final_accuracy)


def test_only_splits_whose_weights_arrived_are_candidates():
    profile = synthetic_profile()
    d = choose(profile, link(0.1, 30.0), Objective("max_accuracy", latency_ms=50.0),
               splits=[0, 1, 2], local_final=False)
    assert d.split_point in (0, 1, 2)


def test_hysteresis_no_flapping_on_jitter_but_a_real_change_redecides():
    profile = synthetic_profile()
    sched = Scheduler(profile, Objective("max_accuracy", latency_ms=100.0), margin=0.15)
    first = sched.update(link(20.0))
    assert first is not None and first.predicted["bytes_per_image"] > 0
    for i in range(40):  # +-10 % jitter: inside the margin
        assert sched.update(link(20.0 * (1.1 if i % 2 else 0.9))) is None
    assert sched.decisions == 1
    moved = sched.update(link(0.05))
    assert moved is not None and moved.predicted["bytes_per_image"] < first.predicted["bytes_per_image"]
    assert sched.decisions == 2


def test_a_decision_is_one_json_log_line_with_inputs_choice_and_prediction(caplog):
    caplog.set_level("INFO", logger="device.scheduler")
    sched = Scheduler(synthetic_profile(), Objective("min_bytes", accuracy=0.75))
    sched.update(link(2.0))
    line = json.loads(caplog.records[-1].getMessage())
    assert line["event"] == "decision" and line["inputs"]["bandwidth_bit_s"] == 2_000_000
    assert set(line["choice"]) == {"split_point", "threshold"} and "latency_p95_ms" in line["predicted"]


# -- the profile of a real model -------------------------------------------------------------------------------

@pytest.fixture
def real_profile(small_model, tmp_path):
    torch.manual_seed(1)
    data = TensorDataset(torch.randn(48, 3, SIZE, SIZE), torch.randint(0, 10, (48,)))
    prof = build_profile(small_model, DataLoader(data, batch_size=16), SIZE, "top1", [0.0, 0.2, 0.5, 1.0],
                         "model.pt", (0.5,) * 3, (0.25,) * 3, bytes_images=16)
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(prof.to_json()))
    return prof, path


def test_profile_covers_every_split_and_round_trips(real_profile, small_model):
    prof, path = real_profile
    again = load_profile(path)
    assert again == prof
    assert [s.split_point for s in prof.splits] == list(range(small_model.num_blocks + 1))
    assert prof.bytes_images == 16 and "jpeg" in prof.splits[0].bytes
    for s in prof.splits:
        assert s.device_exits == [k for k in small_model.exit_points if k <= s.split_point]
        for r in s.rows:
            assert r.uploading_rate + sum(r.exit_rates) == pytest.approx(1.0)
    # a threshold of 0 answers every image at the first exit once the split has one
    first = small_model.exit_points[0]
    assert prof.splits[first].row(0.0).exit_rates[0] == pytest.approx(1.0)
    assert prof.splits[first - 1].row(0.0).uploading_rate == pytest.approx(1.0)


def test_malformed_profiles_name_the_file(tmp_path, real_profile):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ProfileError, match="bad.json"):
        load_profile(bad)
    doc = json.loads(real_profile[1].read_text())
    doc["splits"] = doc["splits"][:-1]
    bad.write_text(json.dumps(doc))
    with pytest.raises(ProfileError, match="every split point"):
        load_profile(bad)


# -- the runtime ------------------------------------------------------------------------------------------------

def sched_device(checkpoint, port, profile_path, **overrides) -> DeviceRuntime:
    cfg = from_dict(DeviceConfig, {"checkpoint": str(checkpoint), "cloud": f"127.0.0.1:{port}", "split_point": 3,
                                   "deadline_ms": 5000, "fallback": "exit", "scheduler": True,
                                   "profile": str(profile_path), "scheduler_interval_seconds": 0.05,
                                   "latency_bound_ms": 300.0, "log_level": "WARNING", **overrides})
    return DeviceRuntime.start(cfg)


def test_split_switch_under_concurrent_classify_never_errors(checkpoint, real_profile):
    cloud = start_cloud(checkpoint)
    runtime = sched_device(checkpoint, cloud.port, real_profile[1], scheduler=False, profile=None)
    n = runtime.model.num_blocks
    errors, results, stop = [], [], threading.Event()

    def work(seed):
        i = 0
        while not stop.is_set():
            try:
                results.append(runtime.classify_bytes(image_bytes(seed * 1000 + i)))
            except Exception as err:  # noqa: BLE001 - any exception is the failure under test
                errors.append(err)
            i += 1

    threads = [threading.Thread(target=work, args=(s,)) for s in range(3)]
    try:
        for t in threads:
            t.start()
        for i in range(60):
            runtime.set_plan(i % (n + 1), 0.5 if i % 3 else 1.0)
            time.sleep(0.02)  # requests run on every plan
        stop.set()
        for t in threads:
            t.join(30)
    finally:
        stop.set()
        runtime.close()
        cloud.stop()
    assert not errors and len(results) > 10
    assert len({r.split_point for r in results}) > 2 and not any(r.degraded for r in results)
    with pytest.raises(ValueError, match="outside"):
        runtime.set_plan(n + 1, 0.5)


def test_last_split_with_the_whole_model_answers_locally(checkpoint):
    cfg = from_dict(DeviceConfig, {"checkpoint": str(checkpoint), "cloud": "127.0.0.1:1", "deadline_ms": 200,
                                   "log_level": "WARNING"})
    runtime = DeviceRuntime.start(cfg)
    try:
        runtime.set_plan(runtime.model.num_blocks, 1.0)
        r = runtime.classify_bytes(image_bytes(1))
    finally:
        runtime.close()
    assert r.answered_by == "device:final" and not r.degraded and r.bytes_sent == 0 and runtime.rpc_calls == 0


def test_scheduler_runs_on_the_device_and_its_prediction_matches_loopback(checkpoint, real_profile):
    """Predicted mean latency of the pair in use vs the measured mean, on loopback: within 50 % + 3 ms (the
    device's block times are measured by the runtime itself; loopback RTT is sub-millisecond)."""
    cloud = start_cloud(checkpoint)
    runtime = sched_device(checkpoint, cloud.port, real_profile[1], latency_bound_ms=1000.0,
                           scheduler_interval_seconds=3600)  # rounds by hand: the plan cannot move under the test
    try:
        for i in range(40):  # measurements settle: block times, RTT pings, cloud compute
            runtime.classify_bytes(image_bytes(i))
        runtime.adaptive.scheduler.last = None  # a due round whatever moved
        runtime.adaptive.step()
        decision = runtime.adaptive.last
        assert decision is not None and decision.feasible
        assert (runtime.active.split_point, runtime.threshold) == \
            (decision.split_point, decision.threshold)
        cond = runtime.adaptive.conditions()
        pair = next(c for c in predict(runtime.adaptive.profile, cond, runtime.codec_names())
                    if (c.split_point, c.threshold) == (decision.split_point, decision.threshold))
        x = torch.randn(3, SIZE, SIZE)
        measured = [runtime.classify_tensor(x).latency_ms for _ in range(30)]
        m = runtime.measurements()
    finally:
        runtime.close()
        cloud.stop()
    mean = sum(measured) / len(measured)
    assert "scheduler" in m and m["scheduler"]["split_point"] == decision.split_point
    assert m["scheduler"]["link"]["rtt_ms"] == pytest.approx(cond.rtt_ms, abs=0.01)
    assert abs(pair.latency_mean_ms - mean) <= 0.5 * mean + 3.0, (pair.latency_mean_ms, mean)


def test_a_probe_measures_a_silent_link_off_the_request_path(checkpoint, real_profile):
    cloud = start_cloud(checkpoint)
    # the thread's rounds an hour apart: this test drives the rounds by hand
    runtime = sched_device(checkpoint, cloud.port, real_profile[1], probe_interval_seconds=0.2,
                           scheduler_interval_seconds=3600)
    try:
        runtime.set_plan(runtime.model.num_blocks, 1.0)  # the final classifier on the device: nothing uploads
        answers = [runtime.classify_bytes(image_bytes(i)) for i in range(3)]
        calls = runtime.link_stats.calls
        time.sleep(0.25)
        runtime.adaptive.step()
        again = runtime.adaptive.probe_due()  # just probed: not due again before the interval
    finally:
        runtime.close()
        cloud.stop()
    assert all(a.answered_by == "device:final" and a.bytes_sent == 0 for a in answers)
    assert runtime.link_stats.calls == calls + 1 and runtime.probe_bytes > 0 and not again


def test_a_throttled_device_plans_its_tail():
    profile = synthetic_profile()
    steady, jittery = link(0.05), link(0.05)
    jittery.device_tail = 1.5
    a, b = predict(profile, steady), predict(profile, jittery)
    local = [(x, y) for x, y in zip(a, b) if x.uploading_rate == 0.0]
    assert local and all(y.latency_p95_ms == pytest.approx(1.5 * x.latency_p95_ms) for x, y in local)
    assert all(y.latency_p50_ms == x.latency_p50_ms for x, y in zip(a, b))


@pytest.mark.parametrize("overrides,key", [({"scheduler": True, "profile": None, "checkpoint": "stream"}, "profile"),
                                           ({"profile": "/nonexistent.json"}, "profile"),
                                           ({"objective": "fastest"}, "objective"),
                                           ({"objective": "min_bytes"}, "accuracy_floor"),
                                           ({"objective": "max_accuracy", "latency_bound_ms": None},
                                            "latency_bound_ms"),
                                           ({"accuracy_tolerance": -0.1}, "accuracy_tolerance"),
                                           ({"latency_bound_ms": -1.0}, "latency_bound_ms"),
                                           ({"latency_bound_ms": float("nan")}, "latency_bound_ms"),
                                           ({"accuracy_floor": 1.5, "objective": "min_bytes"}, "accuracy_floor"),
                                           ({"scheduler_interval_seconds": float("inf")},
                                            "scheduler_interval_seconds"),
                                           ({"scheduler_margin": 1.5}, "scheduler_margin")])
def test_scheduler_config_errors_name_the_key(checkpoint, real_profile, overrides, key):
    keys = {"checkpoint": str(checkpoint), "scheduler": True, "profile": str(real_profile[1]),
            "latency_bound_ms": 300.0, **overrides}
    with pytest.raises(ConfigError, match=key):
        from_dict(DeviceConfig, keys)


def test_infeasible_with_a_floor_stays_above_the_floor():
    profile = synthetic_profile()
    d = choose(profile, link(1.0, 30.0), Objective("min_bytes", latency_ms=1.0, accuracy=0.8))
    assert not d.feasible and d.predicted["accuracy"] >= 0.8 and "accuracy >= 0.8" in d.reason


def test_while_streaming_every_split_up_to_the_usable_head_stays_a_candidate(checkpoint):
    import dataclasses

    cfg = from_dict(DeviceConfig, {"checkpoint": str(checkpoint), "cloud": "127.0.0.1:1", "split_point": 5,
                                   "deadline_ms": 200, "log_level": "WARNING"})
    runtime = DeviceRuntime.start(cfg)
    try:
        partial = dataclasses.replace(runtime.active, complete=False, usable=True)
        runtime.active = partial
        assert runtime.plan_splits() == (list(range(6)), False)
        runtime.set_plan(0, 0.5)  # the scheduler moved to the input upload ...
        assert runtime.plan_splits() == (list(range(6)), False)  # ... and may come back: the head is still held
        with pytest.raises(ValueError, match="not usable"):
            runtime.set_plan(6, 0.5)
        runtime.active = dataclasses.replace(partial, usable=False)
        assert runtime.plan_splits() == ([0], False)
        before = runtime.active
        with pytest.raises(ValueError, match="z_confidence_threshold"):
            runtime.set_plan(0, 1.5)
        assert runtime.active is before  # a refused plan changes nothing
    finally:
        runtime.close()


def test_a_profile_of_another_model_is_refused(checkpoint, tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(synthetic_profile().to_json()))
    cloud = start_cloud(checkpoint)
    try:
        with pytest.raises(ConfigError, match="profile"):
            sched_device(checkpoint, cloud.port, path)
    finally:
        cloud.stop()


# -- python -m device plan --------------------------------------------------------------------------------------

def plan_json(capsys, cfg_keys: dict, bandwidth: str, rtt: str) -> dict:
    from device.plan import run_plan

    cfg = from_dict(DeviceConfig, cfg_keys)
    assert run_plan(cfg, bandwidth, rtt, 1.0, as_json=True) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_prints_the_decision_and_table(capsys, checkpoint, real_profile):
    from device.plan import parse_ms, parse_rate, run_plan

    keys = {"checkpoint": str(checkpoint), "profile": str(real_profile[1]), "latency_bound_ms": 300.0}
    fast = plan_json(capsys, keys, "50mbit", "5ms")
    slow = plan_json(capsys, {**keys, "latency_bound_ms": 150.0}, "20kbit", "200ms")
    assert fast["conditions"]["bandwidth_bit_s"] == 50_000_000 and len(fast["per_split"]) == len(real_profile[0].splits)
    assert slow["decision"]["predicted"]["bytes_per_image"] <= fast["decision"]["predicted"]["bytes_per_image"]
    assert run_plan(from_dict(DeviceConfig, keys), "2mbit", "40ms", 1.0, as_json=False) == 0
    text = capsys.readouterr().out
    assert "split point" in text and "<-" in text
    assert parse_rate("2Mbit/s") == parse_rate("2mbit") == parse_rate("2e6") == 2e6 and parse_ms("0.04s") == 40.0
    with pytest.raises(ConfigError, match="--bandwidth"):
        run_plan(from_dict(DeviceConfig, keys), "fast", "40ms", 1.0, as_json=False)
    with pytest.raises(ConfigError, match="latency_bound_ms"):
        run_plan(from_dict(DeviceConfig, {**keys, "objective": "max_accuracy", "latency_bound_ms": None}), "2mbit",
                 "4ms", 1.0, as_json=False)


def test_plan_cli_exit_status_and_messages(checkpoint, real_profile, tmp_path):
    common = ["--config", "apps/device.yml", f"checkpoint={checkpoint}", "objective=max_accuracy",
              "latency_bound_ms=300"]
    ok = subprocess.run([sys.executable, "-m", "device", "plan", *common, f"profile={real_profile[1]}",
                         "--bandwidth", "2mbit", "--rtt", "40ms", "--json"], cwd=ROOT, capture_output=True,
                        text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["decision"]["feasible"] in (True, False)
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    (elsewhere / "model.pt").write_bytes(checkpoint.read_bytes())  # a checkpoint with no profile beside it
    missing = subprocess.run([sys.executable, "-m", "device", "plan", "--config", "apps/device.yml",
                              f"checkpoint={elsewhere / 'model.pt'}", "--bandwidth", "2mbit", "--rtt", "4ms"],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "profile" in missing.stderr
    assert f"python test.py app:<your model's test app>.yml checkpoint={elsewhere / 'model.pt'}" in missing.stderr


def test_plan_needs_only_the_link_after_the_profile_is_written(checkpoint, real_profile):
    """The quickstart path: test.py ... split_point=all writes profile.json beside the checkpoint; plan then
    needs no profile key and no bound (fastest pair within 1 point of the model's accuracy)."""
    assert real_profile[1].parent == checkpoint.parent  # where test.py puts it: the checkpoint's log_dir
    ok = subprocess.run([sys.executable, "-m", "device", "plan", "--config", "apps/device.yml",
                         f"checkpoint={checkpoint}", "--bandwidth", "2mbit", "--rtt", "40ms", "--json"],
                        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    plan = json.loads(ok.stdout)
    floor = real_profile[0].final_accuracy - 0.01
    assert plan["objective"] == {"kind": "min_latency", "latency_ms": None, "accuracy": pytest.approx(floor)}
    feasible = [c for c in predict(real_profile[0], Conditions.from_link(2e6, 40.0))
                if c.accuracy_low >= floor - 1e-9]  # the rule: a pair is judged at its lower bound
    assert plan["decision"]["feasible"]
    assert plan["decision"]["predicted"]["latency_p95_ms"] == pytest.approx(min(c.latency_p95_ms for c in feasible),
                                                                           abs=1e-3)


def test_the_missing_profile_message_names_the_quickstart_command(tmp_path):
    cfg = DeviceConfig()  # the default checkpoint: the quickstart's
    assert "python test.py app:apps/quickstart_test.yml split_point=all" in str(cfg.missing_profile())


def test_a_transfer_too_short_to_time_never_lowers_the_bandwidth_estimate():
    """A sample whose network time is within the RTT's spread only bounds the bandwidth from below: it raises a
    lower estimate to the bound and leaves a higher one alone; a timed one sets it (not below the bounds)."""
    from device.adaptive import LinkEstimate
    from device.stats import CallSample

    pings = [(0.0, ms) for ms in (40, 40, 40, 40, 65)]  # RTT 45 ms mean, 60 p95: 15 ms resolution
    short = [CallSample(0.1, 50.0, 6000, 0.0, 5.0, 0)]  # 5 ms above the RTT: censored, bound 400 KB/s
    fast = LinkEstimate(20e6, 40.0)
    fast.update(short, pings, now=1.0)
    assert fast.bandwidth == pytest.approx(20e6 / 8) and fast.censored
    slow = LinkEstimate(0.25e6, 40.0)  # 31 KB/s: stale from a slow phase
    slow.update(short, pings, now=1.0)
    assert slow.bandwidth == pytest.approx(400_000) and slow.bandwidth_p05 == pytest.approx(400_000)
    timed = LinkEstimate(20e6, 40.0)
    timed.update([CallSample(0.1, 245.0, 6000, 0.0, 5.0, 0)], pings, now=1.0)  # 200 ms for 6 KB: 30 KB/s
    assert timed.bandwidth == pytest.approx(30_000) and not timed.censored


def test_the_rtt_is_bounded_by_the_fastest_offload_for_a_while():
    """Pings slowed by a busy CPU do not make the RTT longer than an answered offload's whole round trip; while
    no offload is fresh the last bound still holds."""
    from device.adaptive import RTT_BOUND_S, WINDOW_S, LinkEstimate
    from device.stats import CallSample

    slow_pings = [(0.0, ms) for ms in (70, 80, 90, 100, 110)]  # mean 90, p95 108
    link = LinkEstimate(20e6, 40.0)
    link.update([CallSample(0.1, 55.0, 300, 0.0, 5.0, 9), CallSample(0.2, 60.0, 300, 0.0, 5.0, 9)], slow_pings,
                now=1.0)
    assert link.rtt == pytest.approx(55.0) and link.rtt_p95 == pytest.approx(55.0 + 108.0 - 90.0)
    later = [(WINDOW_S + 5.0, ms) for ms in (70, 80, 90, 100, 110)]
    link.update([], later, now=WINDOW_S + 6.0)  # the offloads are stale: their bound stays
    assert link.rtt == pytest.approx(55.0)
    fast_pings = [(WINDOW_S + 7.0, 42.0)] * 3
    link.update([], fast_pings, now=WINDOW_S + 8.0)  # pings below the bound are the RTT
    assert link.rtt == pytest.approx(42.0)
    much_later = RTT_BOUND_S + 10.0
    link.update([], [(much_later - 1.0, ms) for ms in (70, 80, 90, 100, 110)], now=much_later)
    assert link.rtt == pytest.approx(90.0)  # the bound expired: a route may have changed


def test_uploads_too_small_to_time_get_a_probe_with_bytes_that_can(sharp_bottleneck_checkpoint, real_profile):
    """A learned code is a few dozen bytes: its network time says nothing of the bandwidth, so the scheduler
    probes although offloads are fresh, and the probe carries the activation as int8+zstd, not the code."""
    cloud = start_cloud(sharp_bottleneck_checkpoint)
    runtime = sched_device(sharp_bottleneck_checkpoint, cloud.port, real_profile[1], probe_interval_seconds=0.2,
                           scheduler_interval_seconds=3600, split_point=BOTTLENECK_SPLIT)
    try:
        runtime.set_plan(BOTTLENECK_SPLIT, 1.0)  # every image uploads its code
        sent = [runtime.classify_bytes(image_bytes(i)) for i in range(3)]
        for ms in (1.0, 1.0, 1.0, 30.0, 30.0):  # pings as jittery as on a throttled device: 15+ ms resolution
            runtime.link_stats.record_ping(ms)
        runtime.adaptive.conditions()  # the estimate reads the fresh offloads
        censored = runtime.adaptive.link.censored
        due = runtime.adaptive.probe_due()  # offloads a moment ago: due only because they are untimeable
        probed = runtime.probe_link(timeout_s=5.0)
    finally:
        runtime.close()
        cloud.stop()
    assert {r.codec for r in sent} == {"learned+ans"}
    assert censored and due and probed
    assert runtime.probe_bytes > max(r.bytes_sent for r in sent)  # int8 of the activation, not the code


def test_small_uploads_only_bound_the_bandwidth_and_pings_while_busy_are_not_rtt_samples(checkpoint,
                                                                                         real_profile):
    """A 2 KB upload that took 40 ms more than the RTT is mostly per-call overhead, not a 400 kbit/s link: it
    bounds the bandwidth from below only; a ping taken while a request's head computes also waited for the CPU
    and is no RTT sample."""
    from device.adaptive import MIN_RATE_BYTES, LinkEstimate
    from device.stats import CallSample

    pings = [(0.0, 40.0)] * 5
    link = LinkEstimate(20e6, 40.0)
    link.update([CallSample(0.1, 80.0, MIN_RATE_BYTES - 1, 0.0, 5.0, 9)], pings, now=1.0)
    assert link.bandwidth == pytest.approx(20e6 / 8) and link.censored
    slow = LinkEstimate(0.01e6, 40.0)  # below what the small upload proves: raised to its bound, no further
    slow.update([CallSample(0.1, 80.0, MIN_RATE_BYTES - 1, 0.0, 5.0, 9)], pings, now=1.0)
    assert slow.bandwidth == pytest.approx((MIN_RATE_BYTES - 1) / 0.040)
    link.update([CallSample(0.2, 80.0, 4 * MIN_RATE_BYTES, 0.0, 5.0, 9)], pings, now=1.0)
    assert link.bandwidth == pytest.approx(4 * MIN_RATE_BYTES / 0.040)  # a timed one of enough bytes sets it

    cloud = start_cloud(checkpoint)
    runtime = sched_device(checkpoint, cloud.port, real_profile[1], scheduler_interval_seconds=3600)
    try:
        pinged = len(runtime.link_stats.recent()[1])
        with runtime._compute():  # a request's head computing
            runtime.adaptive.ping()
            busy = len(runtime.link_stats.recent()[1])
        runtime.adaptive.ping()
        idle = len(runtime.link_stats.recent()[1])
    finally:
        runtime.close()
        cloud.stop()
    assert busy == pinged and idle == pinged + 1 and runtime.adaptive.failed_pings == 0
