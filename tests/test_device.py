"""The device runtime and daemon against a real cloud on loopback, with a real (small) model."""

import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from cloud.inference import ServedModel
from cloud.server import CloudConfig, build_server
from device.breaker import CircuitBreaker
from device.config import DeviceConfig
from device.images import ImageError, decode_image
from device.link import channel_target
from device.runtime import DeviceRuntime
from device.server import build_server as build_device_server
from device.stats import LinkStats
from device.watch import FolderWatcher
from models.checkpoint import load_checkpoint
from models.config import ConfigError, from_dict
from proto import spinn_v1_pb2 as pb
from proto import spinn_v1_pb2_grpc as pb_grpc
from tests.conftest import NAMES, ROOT, SIZE, make_cert


def start_cloud(checkpoint, built_in_thread: bool = False, **overrides):
    """A cloud serving ``checkpoint`` on a free loopback port. ``built_in_thread``: the model is served as from no
    file, so its progressive packages are built in the cloud's thread (under a second for the small model), not
    in a process started for each (about 4 s, mostly importing torch there); that path keeps tests of its own
    (tests/test_delta_wire.py's ``files-process``, the ``start_cloud`` calls that leave this off)."""
    cfg = CloudConfig(checkpoint=str(checkpoint), **{"address": "127.0.0.1:0", "log_level": "WARNING",
                                                     **overrides})
    served = (ServedModel.from_checkpoint(load_checkpoint(str(checkpoint)), cfg.model_id, cfg.model_version)
              if built_in_thread else ServedModel.from_file(str(checkpoint), cfg.model_id, cfg.model_version))
    return build_server(cfg, served)


def device(checkpoint, port, **overrides) -> DeviceRuntime:
    cfg = from_dict(DeviceConfig, {"checkpoint": str(checkpoint), "cloud": f"127.0.0.1:{port}",
                                   "split_point": 9, "deadline_ms": 5000, "fallback": "exit", **overrides})
    return DeviceRuntime.start(cfg)


def image_bytes(seed: int, size: int = SIZE, fmt: str = "PNG", mode: str = "RGB") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cloud(checkpoint):
    running = start_cloud(checkpoint)
    yield running
    running.stop()


def test_local_exits_answer_without_any_rpc(checkpoint, cloud):
    runtime = device(checkpoint, cloud.port, z_confidence_threshold=0.0)
    try:
        results = [runtime.classify_bytes(image_bytes(i)) for i in range(10)]
    finally:
        runtime.close()
    first_exit = runtime.head.exit_points[0]
    assert {r.answered_by for r in results} == {f"device:exit-{first_exit}"}
    assert all(r.bytes_sent == 0 and not r.degraded for r in results)
    assert runtime.rpc_calls == 0 and sum(cloud.servicer.counts.values()) == 0  # counted on both sides


def test_offloaded_answers_equal_the_offline_model(checkpoint, cloud):
    runtime = device(checkpoint, cloud.port, z_confidence_threshold=1.0, codec="float32+none", top_k=3)
    model = load_checkpoint(checkpoint).model
    try:
        for i in range(6):
            x = torch.randn(3, SIZE, SIZE)
            result = runtime.classify_tensor(x)
            with torch.no_grad():
                want = torch.softmax(model(x.unsqueeze(0))[-1][0], -1)
            values, ids = want.topk(3)
            assert result.answered_by == "cloud" and not result.degraded and result.bytes_sent > 0
            assert [c for c, _, _ in result.top_k] == ids.tolist()
            assert [n for _, n, _ in result.top_k] == [NAMES[j] for j in ids.tolist()]
            np.testing.assert_allclose([p for _, _, p in result.top_k], values.numpy(), atol=1e-5)
        stats = runtime.measurements()
        assert stats["offloads"] == 6 and stats["rtt_ms"] > 0 and len(stats["block_ms"]) == 9
    finally:
        runtime.close()
    assert cloud.servicer.counts["OK"] == 6


def test_codec_comes_from_the_cloud_unless_configured(checkpoint, cloud):
    runtime = device(checkpoint, cloud.port)
    assert runtime.codec.name == "int8+zstd"  # the cloud's default (no codec table)
    runtime.close()
    runtime = device(checkpoint, cloud.port, codec="int4+zlib")
    assert runtime.codec.name == "int4+zlib"
    runtime.close()


def test_device_started_before_the_cloud_adopts_its_codec_later(checkpoint, tmp_path):
    port = free_port()
    runtime = device(checkpoint, port, z_confidence_threshold=1.0, deadline_ms=300, breaker_probe_seconds=0.2)
    table = tmp_path / "codec.json"
    table.write_text('{"defaults": {"9": "float16+zstd"}}')
    try:
        assert runtime.codec.name == "int8+zstd"  # the cloud did not answer: the offline codec
        assert runtime.classify_bytes(image_bytes(0)).degraded
        late = start_cloud(checkpoint, address=f"127.0.0.1:{port}", codec_table=str(table))
        try:
            assert wait_until(lambda: runtime.classify_bytes(image_bytes(1)).answered_by == "cloud", 30)
            assert wait_until(lambda: runtime.codec.name == "float16+zstd", 10)
            result = runtime.classify_bytes(image_bytes(2))
            assert result.answered_by == "cloud" and not result.degraded
        finally:
            late.stop()
    finally:
        runtime.close()


def test_checkpoint_downloaded_from_the_cloud(checkpoint, cloud):
    runtime = device("cloud", cloud.port, z_confidence_threshold=0.0)
    local = load_checkpoint(checkpoint)
    try:
        assert runtime.class_names == NAMES
        for a, b in zip(runtime.model.state_dict().values(), local.model.state_dict().values()):
            assert torch.equal(a, b)
    finally:
        runtime.close()


def start_cloud_process(checkpoint, port):
    proc = subprocess.Popen([sys.executable, "-m", "cloud", f"checkpoint={checkpoint}",
                             f"address=127.0.0.1:{port}", "log_level=WARNING"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc


def wait_until(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_cloud_killed_mid_run_loses_no_answer_and_offloading_resumes(checkpoint):
    port = free_port()
    proc = start_cloud_process(checkpoint, port)
    runtime = device(checkpoint, port, z_confidence_threshold=1.0, deadline_ms=2000, breaker_failures=2,
                     breaker_probe_seconds=0.2)
    try:
        assert wait_until(lambda: runtime.link.healthy(1.0), 60), "cloud did not start"
        results, killed_at = [None] * 200, [None]
        lock = threading.Lock()
        answered = [0]

        def work(indices):
            for i in indices:
                started = time.monotonic()
                result = runtime.classify_tensor(torch.randn(3, SIZE, SIZE))
                results[i] = (started, result)
                with lock:
                    answered[0] += 1
                    if answered[0] == 60:
                        proc.send_signal(signal.SIGKILL)
                        proc.wait()
                        killed_at[0] = time.monotonic()

        threads = [threading.Thread(target=work, args=(range(k, 200, 4),)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(r is not None for r in results)  # all 200 answered, none raised
        after = [r for started, r in results if started > killed_at[0]]
        before = [r for started, r in results if started <= killed_at[0]]
        assert len(after) > 100 and all(r.degraded and r.answered_by.startswith("device:") for r in after)
        assert sum(not r.degraded for r in before) >= 55
        assert runtime.breaker.opened_count >= 1 and runtime.rpc_calls < 200  # the breaker spared timeouts

        proc = start_cloud_process(checkpoint, port)
        assert wait_until(lambda: not runtime.breaker.is_open, 60), "the breaker never closed"
        resumed = runtime.classify_tensor(torch.randn(3, SIZE, SIZE))
        assert resumed.answered_by == "cloud" and not resumed.degraded
    finally:
        runtime.close()
        proc.kill()
        proc.wait()


def test_slow_cloud_falls_back_within_the_deadline(checkpoint):
    slow = start_cloud(checkpoint, max_queue_delay_ms=3000.0, max_batch_size=64)
    runtime = device(checkpoint, slow.port, z_confidence_threshold=1.0, deadline_ms=300, max_attempts=1)
    try:
        result = runtime.classify_tensor(torch.randn(3, SIZE, SIZE))
    finally:
        runtime.close()
        slow.stop()
    assert result.degraded and result.reason.startswith("DEADLINE_EXCEEDED")
    assert result.answered_by == f"device:exit-{runtime.head.exit_points[-1]}"  # the deepest one computed
    assert result.latency_ms < 2000  # long before the cloud's 3 s batching delay would have answered


def test_a_device_with_the_whole_model_falls_back_to_the_final_classifier(other_checkpoint, cloud):
    runtime = device(other_checkpoint, cloud.port, z_confidence_threshold=1.0, fallback="final")
    x = torch.randn(3, SIZE, SIZE)
    try:
        result = runtime.classify_tensor(x)
        expected = int(runtime.model(x.unsqueeze(0))[-1].argmax())
    finally:
        runtime.close()
    assert result.degraded and result.reason.startswith("version skew")
    assert result.answered_by == "device:final" and result.class_id == expected


def test_refusal_and_no_device_exit_still_answers(other_checkpoint, cloud):
    # split 1 lies before the first exit: the fallback runs on to the next exit on the device.
    runtime = device(other_checkpoint, cloud.port, z_confidence_threshold=1.0, split_point=1)
    try:
        result = runtime.classify_tensor(torch.randn(3, SIZE, SIZE))
    finally:
        runtime.close()
    assert result.degraded and result.reason.startswith("version skew")
    assert result.answered_by == f"device:exit-{runtime.model.exit_points[0]}"
    assert not runtime.breaker.is_open  # a refusal is not an outage


def test_token_and_tls_to_the_cloud(checkpoint, tmp_path, monkeypatch):
    cert, key = make_cert(tmp_path)
    (tmp_path / "token").write_text("s3cret\n")
    (tmp_path / "wrong").write_text("nope")
    monkeypatch.delenv("SPINN_AUTH_TOKEN", raising=False)
    secure = start_cloud(checkpoint, tls_cert=str(cert), tls_key=str(key), auth_token_file=str(tmp_path / "token"),
                         address="localhost:0")
    try:
        good = device(checkpoint, 0, cloud=f"localhost:{secure.port}", tls_ca=str(cert),
                      auth_token_file=str(tmp_path / "token"), z_confidence_threshold=1.0)
        assert good.classify_tensor(torch.randn(3, SIZE, SIZE)).answered_by == "cloud"
        good.close()
        monkeypatch.setenv("SPINN_AUTH_TOKEN", "s3cret")  # the same token from the environment
        from_env = device(checkpoint, 0, cloud=f"localhost:{secure.port}", tls_ca=str(cert), z_confidence_threshold=1.0)
        assert from_env.classify_tensor(torch.randn(3, SIZE, SIZE)).answered_by == "cloud"
        from_env.close()
        wrong = device(checkpoint, 0, cloud=f"localhost:{secure.port}", tls_ca=str(cert),
                       auth_token_file=str(tmp_path / "wrong"), z_confidence_threshold=1.0)
        result = wrong.classify_tensor(torch.randn(3, SIZE, SIZE))
        wrong.close()
        assert result.degraded and result.reason.startswith("UNAUTHENTICATED")
    finally:
        secure.stop()


def test_bad_images_get_clear_errors_and_the_daemon_stays_up(checkpoint, cloud):
    cfg = from_dict(DeviceConfig, {"checkpoint": str(checkpoint), "cloud": f"127.0.0.1:{cloud.port}",
                                   "listen": "127.0.0.1:0", "max_image_pixels": 4_000_000})
    daemon = build_device_server(cfg, DeviceRuntime.start(cfg))
    stub = pb_grpc.DeviceStub(grpc.insecure_channel(f"127.0.0.1:{daemon.port}"))
    try:
        jpeg = image_bytes(1, 64, "JPEG")
        huge = io.BytesIO()
        Image.new("RGB", (3000, 3000)).save(huge, format="PNG")  # 9 Mpixel, a few kB compressed
        for data, words in ((b"", "empty"), (jpeg[: len(jpeg) // 2], "decoded"), (b"not an image" * 10, "format"),
                            (huge.getvalue(), "max_image_pixels"), (thin_png(2_000_000), "max_image_aspect")):
            with pytest.raises(grpc.RpcError) as err:
                stub.Classify(pb.ClassifyRequest(request_id="bad", image=data), timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details().startswith("image:") and words in err.value.details()
        for data in (image_bytes(2, 1), image_bytes(3, 64, "PNG", "L"), image_bytes(4, 300, "JPEG")):
            reply = stub.Classify(pb.ClassifyRequest(request_id="ok", image=data, top_k=2), timeout=30)
            assert reply.request_id == "ok" and len(reply.top_k) == 2 and reply.label in NAMES
    finally:
        daemon.stop()


def thin_png(width: int = 20_000_000) -> bytes:
    """A 58 kB PNG of width x 1 pixels: under the byte and pixel limits, but resizing its 1 px short side to
    the model's input would ask for a ~90 GB image."""
    buf = io.BytesIO()
    Image.new("L", (width, 1)).save(buf, format="PNG")
    return buf.getvalue()


def test_a_thin_image_is_refused_by_the_cli_before_any_resize(checkpoint, tmp_path):
    path = tmp_path / "thin.png"
    path.write_bytes(thin_png())
    out = subprocess.run([sys.executable, "-m", "device", "classify", "--config", str(ROOT / "apps/device.yml"),
                          f"checkpoint={checkpoint}", "cloud=127.0.0.1:9", "--json", str(path)],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 1, out.stderr[-2000:]
    row = json.loads(out.stdout.splitlines()[-1])
    assert row["image"] == str(path) and "max_image_aspect" in row["error"]
    assert "Traceback" not in out.stderr


def test_decode_image_limits():
    with pytest.raises(ImageError, match="max_image_bytes"):
        decode_image(image_bytes(0), max_bytes=10, max_pixels=10**6)
    assert decode_image(image_bytes(0, 8, "PNG", "L"), 10**6, 10**6).mode == "RGB"


def test_folder_watch_answers_each_image_once(checkpoint, cloud, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        (folder / f"img{i}.png").write_bytes(image_bytes(i))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (folder / "notes.txt").write_text("not an image")
    runtime = device(checkpoint, cloud.port)
    results = tmp_path / "results.jsonl"
    try:
        watcher = FolderWatcher(runtime, folder, results, 1.0)
        assert watcher.scan_once() == 0  # first sight: a file must stay unchanged for one interval
        assert watcher.scan_once() == 4
        (folder / "img3.png").write_bytes(image_bytes(3))
        restarted = FolderWatcher(runtime, folder, results, 1.0)
        assert restarted.scan_once() + restarted.scan_once() == 1  # a restart skips answered ones
    finally:
        runtime.close()
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert sorted(r["image"] for r in lines) == ["broken.jpg", "img0.png", "img1.png", "img2.png", "img3.png"]
    assert "error" in next(r for r in lines if r["image"] == "broken.jpg")
    for r in lines:
        if r["image"] != "broken.jpg":
            assert {"class_id", "label", "confidence", "answered_by", "degraded", "reason", "bytes_sent",
                    "latency_ms"} <= set(r)


def test_folder_watch_waits_for_a_copy_and_answers_a_replaced_file_again(checkpoint, cloud, tmp_path):
    import os

    folder = tmp_path / "in"
    folder.mkdir()
    data = image_bytes(7, 64)
    target = folder / "big.png"
    runtime = device(checkpoint, cloud.port)
    results = tmp_path / "results.jsonl"
    watcher = FolderWatcher(runtime, folder, results, 1.0)
    try:
        for end in (len(data) // 3, 2 * len(data) // 3):  # a copy in progress: grows between scans
            target.write_bytes(data[:end])
            os.utime(target, ns=(end, end))
            assert watcher.scan_once() == 0
        target.write_bytes(data)
        os.utime(target, ns=(1, 1))
        assert watcher.scan_once() == 0 and watcher.scan_once() == 1  # complete and settled: answered
        assert watcher.scan_once() == 0  # once
        target.write_bytes(image_bytes(8, 48))  # replaced under the same name
        os.utime(target, ns=(2, 2))
        assert watcher.scan_once() == 0 and watcher.scan_once() == 1
    finally:
        runtime.close()
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(lines) == 2 and all("error" not in r and r["image"] == "big.png" for r in lines)
    assert lines[0]["size"] == len(data) and lines[1]["mtime_ns"] == 2


def test_classify_cli_json(checkpoint, cloud, tmp_path):
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"x{i}.png")
        paths[-1].write_bytes(image_bytes(i))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"")
    proc = subprocess.run(
        [sys.executable, "-m", "device", "classify", "--json", *map(str, paths), str(bad),
         f"checkpoint={checkpoint}", f"cloud=127.0.0.1:{cloud.port}", "split_point=9", "z_confidence_threshold=1.0"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr  # one image was unreadable
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["image"] for r in rows] == [*map(str, paths), str(bad)]
    assert all(r["answered_by"] == "cloud" and r["bytes_sent"] > 0 for r in rows[:2])
    assert "empty" in rows[2]["error"]


@pytest.mark.parametrize("overrides, key", [
    ({"z_confidence_threshold": 1.5}, "z_confidence_threshold"),
    ({"cloud": "no-port"}, "cloud"),
    ({"cloud": []}, "cloud"),
    ({"listen": "x"}, "listen"),
    ({"codec": "int9+zstd"}, "codec"),
    ({"checkpoint": "missing.pt"}, "checkpoint"),
    ({"deadline_ms": 0}, "deadline_ms"),
    ({"max_attempts": 9}, "max_attempts"),
    ({"tls_cert": "c.pem"}, "tls_cert"),
    ({"split_pont": 3}, "split_pont"),
    ({"stream_nice": 20}, "stream_nice"),
    ({"stream_swap_ms": -1}, "stream_swap_ms"),
    ({"stream_order": "random"}, "stream_order"),
    ({"jpeg_quality": 0}, "jpeg_quality"),
])
def test_device_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        from_dict(DeviceConfig, {"checkpoint": str(ROOT / "pyproject.toml"), **overrides})


def test_split_point_beyond_the_model_names_the_key(checkpoint, cloud):
    with pytest.raises(ConfigError, match="'split_point'"):
        device(checkpoint, cloud.port, split_point=99)


def test_breaker_opens_after_failures_and_a_probe_closes_it():
    healthy = threading.Event()
    breaker = CircuitBreaker(failures=2, probe=healthy.is_set, probe_seconds=0.05)
    breaker.record_failure("UNAVAILABLE")
    assert breaker.allow()
    breaker.record_failure("UNAVAILABLE")
    assert not breaker.allow() and breaker.opened_count == 1
    time.sleep(0.2)
    assert not breaker.allow()  # probes keep failing
    healthy.set()
    assert wait_until(breaker.allow, 5)
    breaker.close()


def test_link_stats_separate_rtt_from_transfer_time():
    stats = LinkStats(alpha=1.0)  # alpha 1: the last sample
    stats.record_call(total_ms=12.0, server_ms=2.0, bytes_sent=100)  # 10 ms network: the floor
    assert stats.snapshot().rtt_ms == 10.0 and stats.snapshot().upload_bytes_per_s is None
    stats.record_call(total_ms=32.0, server_ms=2.0, bytes_sent=20_000)  # 20 ms above the floor
    snap = stats.snapshot()
    assert snap.rtt_ms == 30.0 and snap.upload_bytes_per_s == pytest.approx(1_000_000.0)


def test_channel_target_for_replicas():
    assert channel_target(["cloud.example:50051"]) == "cloud.example:50051"
    assert channel_target(["10.0.0.1:1", "10.0.0.2:2"]) == "ipv4:10.0.0.1:1,10.0.0.2:2"
    assert channel_target(["[::1]:1", "[::1]:2"]) == "ipv6:[::1]:1,[::1]:2"
    with pytest.raises(ConfigError, match="'cloud'"):
        channel_target(["10.0.0.1:1", "[::1]:2"])


def test_round_robin_spreads_offloads_over_replicas(checkpoint):
    replicas = [start_cloud(checkpoint), start_cloud(checkpoint)]
    runtime = device(checkpoint, 0, cloud=",".join(f"127.0.0.1:{r.port}" for r in replicas),
                     z_confidence_threshold=1.0)
    try:
        for _ in range(10):
            assert runtime.classify_tensor(torch.randn(3, SIZE, SIZE)).answered_by == "cloud"
    finally:
        runtime.close()
        for r in replicas:
            r.stop()
    assert all(r.servicer.counts["OK"] >= 3 for r in replicas)


def test_device_daemon_serves_and_exits_zero_on_sigterm(checkpoint, cloud):
    proc = subprocess.Popen([sys.executable, "-m", "device", "serve", f"checkpoint={checkpoint}",
                             f"cloud=127.0.0.1:{cloud.port}", "listen=127.0.0.1:0"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        port = None
        for line in proc.stderr:
            if "device API on port" in line:
                port = int(line.split("device API on port ")[1].split()[0].rstrip(","))
                break
        assert port, "the daemon did not report its port"
        stub = pb_grpc.DeviceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        reply = stub.Classify(pb.ClassifyRequest(request_id="a", image=image_bytes(7)), timeout=30)
        assert reply.request_id == "a" and reply.label in NAMES
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_unusual_image_modes_are_converted():
    pixels = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    for image in (Image.fromarray(pixels), Image.new("RGBA", (8, 8)), Image.new("P", (8, 8))):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        assert decode_image(buf.getvalue(), 10**7, 10**7).mode == "RGB"


class HostileCloud(pb_grpc.InferenceServicer):
    """A cloud that answers every Infer with the same malformed Prediction."""

    def __init__(self, reply: pb.Prediction) -> None:
        self.reply = reply

    def Infer(self, request, context):
        return self.reply


@pytest.mark.parametrize("reply, words", [
    (pb.Prediction(), "0 images"),
    (pb.Prediction(images=[pb.ImagePrediction()]), "empty top_k"),
    (pb.Prediction(images=[pb.ImagePrediction(top_k=[pb.ClassScore(class_id=99, probability=0.5)])]), "class_id 99"),
    (pb.Prediction(images=[pb.ImagePrediction(top_k=[pb.ClassScore(class_id=1, probability=float("nan"))])]),
     "probability nan"),
])
def test_a_malformed_prediction_falls_back_to_a_device_exit(checkpoint, reply, words):
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_InferenceServicer_to_server(HostileCloud(reply), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    runtime = device(checkpoint, port, z_confidence_threshold=1.0, codec="float32+none")
    try:
        result = runtime.classify_bytes(image_bytes(5))
    finally:
        runtime.close()
        server.stop(0)
    assert result.degraded and result.reason.startswith("bad reply") and words in result.reason
    assert result.answered_by.startswith("device:exit-") and result.label in NAMES
