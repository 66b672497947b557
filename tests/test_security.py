"""Secure defaults: where the token comes from, which exposures a config may ask for, authentication on every
service but health, and admission of the calls that hold a thread (InferStreams, delivery calls, builds)."""

import subprocess
import sys
import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry

from cloud.delivery import BuildsBusy, PackageCache
from cloud.inference import ServedModel
from cloud.server import CloudConfig
from device.config import DeviceConfig
from models.checkpoint import load_checkpoint
from models.config import ConfigError, from_dict
from proto import spinn_v1_pb2 as pb
from proto import spinn_v1_pb2_grpc as pb_grpc
from serving.metrics import start_exporter
from serving.security import TOKEN_ENV, is_loopback, read_token
from tests.conftest import ROOT, SIZE, digest_of, make_cert
from tests.test_cloud import request, start


def test_loopback_is_localhost_127_8_and_ipv6_one_only():
    assert all(is_loopback(a) for a in ("localhost:1", "127.0.0.1:50051", "127.3.2.1:0", "[::1]:5"))
    assert not any(is_loopback(a) for a in ("0.0.0.0:1", "[::]:1", ":50051", "10.0.0.5:1", "cloud.example:1"))


def test_the_token_comes_from_a_file_or_the_environment(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    assert read_token(str(token_file), {TOKEN_ENV: "other"}) == "s3cret"  # the file wins
    assert read_token(None, {TOKEN_ENV: "from-env"}) == "from-env"
    assert read_token(None, {}) is None
    for bad in ("", "two words", "x" * 5000):
        token_file.write_text(bad)
        with pytest.raises(ConfigError, match="auth_token_file"):
            read_token(str(token_file), {})
    with pytest.raises(ConfigError, match="auth_token_file"):
        read_token(str(tmp_path / "missing"), {})
    with pytest.raises(ConfigError, match=TOKEN_ENV):
        read_token(None, {TOKEN_ENV: "  "})


@pytest.mark.parametrize("config", [CloudConfig, DeviceConfig])
def test_a_token_given_as_a_value_is_refused_with_the_reason(config, checkpoint):
    with pytest.raises(ConfigError, match="'auth_token' was removed.*auth_token_file"):
        from_dict(config, {"checkpoint": str(checkpoint), "auth_token": "s3cret"})


@pytest.mark.parametrize("overrides, key", [
    ({"address": "0.0.0.0:50051"}, "insecure"),  # plaintext off loopback
    ({"address": "10.1.2.3:50051"}, "insecure"),
    ({"address": "[::]:50051", "tls": True}, "insecure"),  # TLS, but anyone may call
    ({"address": "0.0.0.0:50051", "insecure": True, "token": True}, "address"),  # a token in the clear
])
def test_the_cloud_refuses_exposed_ports_naming_the_key(overrides, key, tmp_path, monkeypatch):
    cert, tls_key = make_cert(tmp_path)
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    data = {"address": overrides["address"], "insecure": overrides.get("insecure", False)}
    if overrides.get("tls"):
        data.update(tls_cert=str(cert), tls_key=str(tls_key))
    if overrides.get("token"):
        monkeypatch.setenv(TOKEN_ENV, "s3cret")
    with pytest.raises(ConfigError, match=f"'{key}'"):
        from_dict(CloudConfig, data)


def test_the_cloud_allows_exposure_only_with_protection_or_insecure(tmp_path, monkeypatch):
    cert, tls_key = make_cert(tmp_path)
    token_file = tmp_path / "token"
    token_file.write_text("s3cret")
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    from_dict(CloudConfig, {"address": "0.0.0.0:1", "tls_cert": str(cert), "tls_key": str(tls_key),
                            "auth_token_file": str(token_file)})
    from_dict(CloudConfig, {"address": "0.0.0.0:1", "tls_cert": str(cert), "tls_key": str(tls_key),
                            "tls_client_ca": str(cert)})
    from_dict(CloudConfig, {"address": "0.0.0.0:1", "insecure": True})
    from_dict(CloudConfig, {"address": "127.0.0.1:1"})


def test_a_tokenless_plaintext_bind_off_loopback_exits_2_naming_the_key(checkpoint):
    proc = subprocess.run([sys.executable, "-m", "cloud", f"checkpoint={checkpoint}", "address=0.0.0.0:0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "'insecure'" in proc.stderr and "without TLS" in proc.stderr


@pytest.mark.parametrize("overrides, key", [
    ({"cloud": "10.1.2.3:50051"}, "insecure"),
    ({"cloud": "127.0.0.1:1,10.1.2.3:50051"}, "insecure"),
    ({"cloud": "10.1.2.3:50051", "insecure": True, "token": True}, "cloud"),
    ({"listen": "0.0.0.0:50061"}, "insecure"),
])
def test_the_device_refuses_plaintext_to_other_hosts_naming_the_key(overrides, key, checkpoint, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    if overrides.pop("token", False):
        monkeypatch.setenv(TOKEN_ENV, "s3cret")
    with pytest.raises(ConfigError, match=f"'{key}'"):
        from_dict(DeviceConfig, {"checkpoint": str(checkpoint), **overrides})
    if key == "insecure":  # what insecure allows: plaintext, but never a token in the clear
        from_dict(DeviceConfig, {"checkpoint": str(checkpoint), **overrides, "insecure": True})


def test_metrics_without_a_host_bind_loopback_only():
    exporter = start_exporter(":0", CollectorRegistry())
    try:
        assert exporter.server.server_address[0] == "127.0.0.1"
    finally:
        exporter.stop()


def _rpc_code(call) -> grpc.StatusCode:
    try:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, (bytes, str)):
            list(result)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def test_without_the_token_every_service_but_health_is_unauthenticated(checkpoint, small_model, tmp_path,
                                                                         monkeypatch):
    cert, tls_key = make_cert(tmp_path)
    token_file = tmp_path / "token"
    token_file.write_text("s3cret")
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    running = start(checkpoint, tls_cert=str(cert), tls_key=str(tls_key), auth_token_file=str(token_file),
                    address="localhost:0")
    channel = grpc.secure_channel(f"localhost:{running.port}", grpc.ssl_channel_credentials(cert.read_bytes()))
    inference, delivery = pb_grpc.InferenceStub(channel), pb_grpc.ModelDeliveryStub(channel)
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    req = request(small_model, 3, torch.randn(1, 3, SIZE, SIZE))
    model = pb.ModelRef(model_id="spinn", digest=digest_of(small_model))
    calls = {
        "Infer": lambda md: inference.Infer(req, timeout=30, metadata=md),
        "InferStream": lambda md: inference.InferStream(iter([req]), timeout=30, metadata=md),
        "GetModelInfo": lambda md: inference.GetModelInfo(pb.ModelInfoRequest(), timeout=30, metadata=md),
        "GetManifest": lambda md: delivery.GetManifest(pb.ManifestRequest(split_point=3), timeout=60, metadata=md),
        "StreamWeights": lambda md: delivery.StreamWeights(pb.WeightRequest(
            model=model, split_point=3, package_digest=running.packages.get(running.models.latest(), 3, "split")
            .manifest.package_digest), timeout=60, metadata=md),
        "GetCheckpoint": lambda md: delivery.GetCheckpoint(pb.CheckpointRequest(), timeout=30, metadata=md),
        "ServerReflectionInfo": lambda md: reflect.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30, metadata=md),
    }
    try:
        for name, call in calls.items():
            for metadata in (None, [("authorization", "Bearer wrong")]):
                assert _rpc_code(lambda: call(metadata)) == grpc.StatusCode.UNAUTHENTICATED, name
            assert _rpc_code(lambda: call([("authorization", "Bearer s3cret")])) == grpc.StatusCode.OK, name
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        channel.close()
        running.stop()


def test_idle_infer_streams_leave_health_and_infer_alone_and_are_closed(checkpoint, small_model):
    running = start(checkpoint, max_infer_streams=4, infer_stream_idle_seconds=2.0)
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    stub = pb_grpc.InferenceStub(channel)
    hold = threading.Event()

    def nothing():  # an open stream that never sends a request
        hold.wait(60)
        return
        yield

    streams = [stub.InferStream(nothing(), timeout=60) for _ in range(200)]
    codes: list[grpc.StatusCode] = []
    lock = threading.Lock()

    def drain(call):
        code = _rpc_code(lambda: call)
        with lock:
            codes.append(code)

    readers = [threading.Thread(target=drain, args=(s,)) for s in streams]
    try:
        for r in readers:
            r.start()
        deadline = time.monotonic() + 30
        while len(codes) < 196 and time.monotonic() < deadline:  # every stream beyond the 4 refused
            time.sleep(0.05)
        refused = list(codes)
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        reply = stub.Infer(request(small_model, 3, torch.randn(1, 3, SIZE, SIZE)), timeout=30)
        for r in readers:  # the 4 admitted ones are closed as idle after 2 s
            r.join(timeout=30)
    finally:
        hold.set()
        channel.close()
        running.stop()
    assert refused.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 196
    assert health.status == health_pb2.HealthCheckResponse.SERVING and len(reply.images) == 1
    assert codes.count(grpc.StatusCode.CANCELLED) == 4 and len(codes) == 200


def test_a_busy_infer_stream_is_not_closed_as_idle(checkpoint, small_model):
    running = start(checkpoint, infer_stream_idle_seconds=0.5)
    stub = pb_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{running.port}"))

    def requests():
        for i in range(6):
            yield request(small_model, 3, torch.randn(1, 3, SIZE, SIZE))
            time.sleep(0.2)  # under the idle limit between requests, 1.2 s in all

    try:
        answers = list(stub.InferStream(requests(), timeout=60))
    finally:
        running.stop()
    assert len(answers) == 6 and all(len(a.images) == 1 for a in answers)


def test_delivery_calls_are_admitted(checkpoint):
    running = start(checkpoint, max_delivery_calls=1)
    stub = pb_grpc.ModelDeliveryStub(grpc.insecure_channel(f"127.0.0.1:{running.port}"))
    try:
        with running.delivery.calls.admit():  # one delivery call in progress
            with pytest.raises(grpc.RpcError) as err:
                stub.GetManifest(pb.ManifestRequest(split_point=3), timeout=30)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_delivery_calls" in err.value.details()
        assert len(stub.GetManifest(pb.ManifestRequest(split_point=3), timeout=60).chunks) > 0
    finally:
        running.stop()


def test_package_builds_are_capped_and_the_cache_is_bounded_in_bytes(checkpoint):
    # served as from no file: built in the calling thread, not a process started for each build (seconds apiece)
    served = ServedModel.from_checkpoint(load_checkpoint(str(checkpoint)), "spinn", "1")
    cache = PackageCache(max_packages=4, max_bytes=1, max_builds=1)
    busy: list[Exception] = []
    for split_point in range(1, served.model.num_blocks):  # until a second build is asked during the first
        builder = threading.Thread(target=cache.get, args=(served, split_point, "split"))
        builder.start()
        while builder.is_alive() and not cache.builds_running:
            time.sleep(0.0005)
        try:
            if cache.builds_running:
                cache.get(served, 0, "value")
        except BuildsBusy as err:
            busy.append(err)
        builder.join()
        if busy:
            break
    assert busy and "max_package_builds" in str(busy[0])
    # max_bytes=1: every package is larger, so only the newest is kept
    first = cache.get(served, 0, "split")
    cache.get(served, 1, "split")
    assert cache.cached_bytes == sum(len(p) for p in cache.get(served, 1, "split").payloads)
    assert cache.get(served, 0, "split") is not first  # evicted, built again
