"""Prometheus metrics of both daemons, scraped over HTTP from real servers, and the device's admission control."""

import threading
import time
import urllib.request

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2

from device.config import DeviceConfig
from device.metrics import reason_label
from device.runtime import DeviceRuntime
from device.server import build_server as build_device_server
from models.config import ConfigError, from_dict
from proto import spinn_v1_pb2 as pb
from proto import spinn_v1_pb2_grpc as pb_grpc
from tests.conftest import SIZE
from tests.test_cloud import request, start
from tests.test_cloud_overload import health_ms
from tests.test_device import image_bytes, wait_until


def scrape(port: int) -> dict[str, float]:
    """``/metrics`` as {sample line name with labels: value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_cloud_metrics_count_requests_by_status_and_batches(checkpoint, small_model):
    running = start(checkpoint, metrics_address="127.0.0.1:0")
    stub = pb_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{running.port}"))
    x = torch.randn(1, 3, SIZE, SIZE)
    try:
        for _ in range(3):
            stub.Infer(request(small_model, 5, x), timeout=30)
        bad = request(small_model, 5, x)
        bad.split_point = 99
        with pytest.raises(grpc.RpcError):
            stub.Infer(bad, timeout=30)
        list(stub.InferStream(iter([request(small_model, 5, x)]), timeout=30))
        m = scrape(running.exporter.port)
    finally:
        running.stop()
    assert m['spinn_cloud_requests_total{method="Infer",status="OK"}'] == 3
    assert m['spinn_cloud_requests_total{method="Infer",status="FAILED_PRECONDITION"}'] == 1
    assert m['spinn_cloud_requests_total{method="InferStream",status="OK"}'] == 1
    assert m['spinn_cloud_request_seconds_count{method="Infer"}'] == 4
    assert m["spinn_cloud_batch_images_count"] == 4 and m["spinn_cloud_queue_seconds_count"] == 4
    assert m["spinn_cloud_queue_depth"] == 0 and m["spinn_cloud_in_flight"] == 0


def test_a_metrics_address_that_cannot_be_bound_is_named(checkpoint):
    with pytest.raises(ConfigError, match="metrics_address"):
        start(checkpoint, metrics_address="no-port")


def test_device_metrics_and_admission(checkpoint, small_model):
    # A cloud that holds every request 1.5 s in its batcher: the device's one admitted call is busy meanwhile.
    cloud = start(checkpoint, max_queue_delay_ms=1500.0, max_batch_size=64)
    cfg = from_dict(DeviceConfig, {"checkpoint": str(checkpoint), "cloud": f"127.0.0.1:{cloud.port}",
                                   "split_point": 9, "z_confidence_threshold": 1.0, "deadline_ms": 10_000,
                                   "listen": "127.0.0.1:0", "max_in_flight": 1, "metrics_address": "127.0.0.1:0",
                                   "codec": "float32+none"})
    daemon = build_device_server(cfg, DeviceRuntime.start(cfg))
    stub = pb_grpc.DeviceStub(grpc.insecure_channel(f"127.0.0.1:{daemon.port}"))
    outcomes: dict[int, tuple[str, str, float]] = {}  # call -> (status, details, when it ended); asserted below

    def call(i):
        try:
            stub.Classify(pb.ClassifyRequest(request_id=str(i), image=image_bytes(i)), timeout=30)
            outcomes[i] = ("OK", "", time.monotonic())
        except grpc.RpcError as err:
            outcomes[i] = (err.code().name, err.details(), time.monotonic())

    try:
        threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
        threads[0].start()
        assert wait_until(lambda: cloud.batcher.queued() == 1, 10)  # the first call waits in the cloud
        for t in threads[1:]:
            t.start()
        status, _ = health_ms(daemon.port)
        for t in threads:
            t.join()
        m = scrape(daemon.exporter.port)
    finally:
        daemon.stop()
        cloud.stop()
    assert outcomes[0][0] == "OK"
    for i in (1, 2, 3):
        code, details, ended = outcomes[i]
        assert code == "RESOURCE_EXHAUSTED" and "max_in_flight" in details
        assert ended < outcomes[0][2]  # refused while the admitted call still waited, not queued behind it
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert m['spinn_device_answers_total{answered_by="cloud",degraded_reason="none"}'] == 1
    assert m["spinn_device_bytes_sent_total"] > 0 and m["spinn_device_classify_seconds_count"] == 1
    assert m["spinn_device_weights_fraction"] == 1.0


def test_degraded_reasons_become_bounded_labels():
    assert reason_label("") == "none"
    assert reason_label("UNAVAILABLE: failed to connect to all addresses; ...") == "UNAVAILABLE"
    assert reason_label("cloud circuit open after DEADLINE_EXCEEDED: ...") == "circuit_open"
    assert reason_label("bad reply: an empty top_k") == "bad_reply"
    assert reason_label("something new: 123") == "other"
