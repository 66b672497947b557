"""The cloud daemon on a real loopback port with a real (small) model."""

import os
import queue
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloud.batcher import DeadlineExpired, DynamicBatcher, QueueFull
from cloud.inference import ServedModel
from cloud.server import CloudConfig, build_server, load_codec_table
from models.config import ConfigError
from models.checkpoint import load_checkpoint
from models.partition import head
from proto import spinn_v1_pb2 as pb
from proto import spinn_v1_pb2_grpc as pb_grpc
from proto.codec import CodecSpec, encode
from tests.conftest import NAMES, ROOT, SIZE, digest_of, make_cert
from tests.test_device import wait_until



def start(checkpoint, **overrides):
    cfg = CloudConfig(checkpoint=str(checkpoint), **{"address": "127.0.0.1:0", **overrides})
    served = ServedModel.from_file(str(checkpoint), cfg.model_id, cfg.model_version)
    return build_server(cfg, served)


def start_with_worker(checkpoint, nice: int = 0, **overrides):
    """A cloud whose forward runs in a ForwardWorker holding the checkpoint's one version."""
    from cloud.worker import ForwardWorker

    cfg = CloudConfig(checkpoint=str(checkpoint), **{"address": "127.0.0.1:0", **overrides})
    served = ServedModel.from_file(str(checkpoint), cfg.model_id, cfg.model_version)
    worker = ForwardWorker(torch.device("cpu"), 1, nice=nice)
    worker.load(served.digest, served.checkpoint_bytes, str(checkpoint))
    running = build_server(cfg, None)
    running.set_model(served, worker)
    return running, worker, served


@pytest.fixture
def cloud(checkpoint):
    running = start(checkpoint, max_queue_delay_ms=5.0)
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    yield running, pb_grpc.InferenceStub(channel), load_checkpoint(checkpoint).model
    channel.close()
    running.stop()


def request(model, split, x, spec=CodecSpec("float32", "none"), **kw):
    with torch.no_grad():
        activation = head(model, split)(x).activation
    return pb.FeatureRequest(request_id=f"r{split}", model=pb.ModelRef(model_id="spinn", digest=digest_of(model)),
                             split_point=split, features=encode(activation, spec), top_k=3, **kw)


def test_every_split_point_answers_like_the_full_model(cloud):
    _, stub, model = cloud
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        want = torch.softmax(model(x)[-1], -1)
    for split in range(model.num_blocks + 1):
        reply = stub.Infer(request(model, split, x), timeout=30)
        assert reply.request_id == f"r{split}" and len(reply.images) == 2
        for i, image in enumerate(reply.images):
            assert image.answered_by_exit == -1
            values, ids = want[i].topk(3)
            assert [c.class_id for c in image.top_k] == ids.tolist()
            assert [c.name for c in image.top_k] == [NAMES[j] for j in ids.tolist()]
            torch.testing.assert_close(torch.tensor([c.probability for c in image.top_k]), values,
                                       atol=1e-5, rtol=0)


def test_int8_codec_and_cloud_exits(cloud):
    _, stub, model = cloud
    x = torch.randn(1, 3, SIZE, SIZE)
    reply = stub.Infer(request(model, 3, x, CodecSpec("int8", "zstd")), timeout=30)
    assert len(reply.images[0].top_k) == 3
    # threshold tiny: the first cloud-side exit answers
    early = stub.Infer(request(model, 3, x, cloud_exit_threshold=1e-6), timeout=30)
    first_cloud_exit = min(k for k in model.exit_points if k > 3)
    assert early.images[0].answered_by_exit == first_cloud_exit


def mutated(model, fn):
    req = request(model, 5, torch.randn(1, 3, SIZE, SIZE), CodecSpec("int8", "zlib"))
    fn(req)
    return req


@pytest.mark.parametrize("fn, code, words", [
    (lambda r: setattr(r.model, "model_id", "other"), grpc.StatusCode.FAILED_PRECONDITION, "serves 'spinn'"),
    (lambda r: setattr(r.model, "model_version", "9"), grpc.StatusCode.FAILED_PRECONDITION, "'9' is not the label"),
    (lambda r: setattr(r.model, "digest", ""), grpc.StatusCode.INVALID_ARGUMENT, "model.digest: required"),
    (lambda r: setattr(r.model, "digest", "ab" * 31), grpc.StatusCode.INVALID_ARGUMENT, "model.digest: a model digest"),
    (lambda r: setattr(r.model, "digest", "zz" * 32), grpc.StatusCode.INVALID_ARGUMENT, "64 lowercase hex"),
    (lambda r: setattr(r.model, "digest", "ab" * 32), grpc.StatusCode.FAILED_PRECONDITION,
     "is not served; this cloud serves spinn"),
    (lambda r: setattr(r, "split_point", 77), grpc.StatusCode.FAILED_PRECONDITION, "split_point 77"),
    (lambda r: r.features.shape.__setitem__(1, 999), grpc.StatusCode.INVALID_ARGUMENT, "features.shape"),
    (lambda r: setattr(r.features, "dtype", "float64"), grpc.StatusCode.INVALID_ARGUMENT, "features.dtype"),
    (lambda r: setattr(r.features, "data", r.features.data[:5]), grpc.StatusCode.INVALID_ARGUMENT, "features.data"),
    (lambda r: setattr(r.features.codec, "quantization", 42), grpc.StatusCode.INVALID_ARGUMENT, "quantization"),
    (lambda r: setattr(r.features, "data", b"\xff\xfenot zlib"), grpc.StatusCode.INVALID_ARGUMENT, "corrupt"),
    (lambda r: setattr(r, "top_k", -1), grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
    (lambda r: setattr(r, "cloud_exit_threshold", 1.5), grpc.StatusCode.INVALID_ARGUMENT, "cloud_exit_threshold"),
    (lambda r: r.features.shape.__setitem__(0, 65), grpc.StatusCode.INVALID_ARGUMENT, "features.shape"),
])
def test_bad_requests_get_their_status_and_the_server_lives_on(cloud, fn, code, words):
    _, stub, model = cloud
    with pytest.raises(grpc.RpcError) as err:
        stub.Infer(mutated(model, fn), timeout=30)
    assert err.value.code() == code and words in err.value.details()
    assert len(stub.Infer(request(model, 5, torch.randn(1, 3, SIZE, SIZE)), timeout=30).images) == 1


def test_nan_features_and_oversize_messages(checkpoint, small_model):
    running = start(checkpoint, max_message_bytes=20_000)
    try:
        stub = pb_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{running.port}"))
        x = torch.randn(1, 3, SIZE, SIZE)
        req = request(small_model, 0, x)
        bad = torch.full((1, 3, SIZE, SIZE), float("nan"))
        req.features.CopyFrom(encode(bad, CodecSpec("float32", "none")))
        with pytest.raises(grpc.RpcError) as err:
            stub.Infer(req, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "NaN" in err.value.details()
        big = request(small_model, 0, torch.randn(8, 3, SIZE, SIZE))  # 98 kB > 20 kB limit
        with pytest.raises(grpc.RpcError) as err:
            stub.Infer(big, timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        running.stop()


def test_concurrent_clients_get_their_own_answers_in_batches(cloud):
    _, stub, model = cloud
    torch.manual_seed(3)
    inputs = [torch.randn(1, 3, SIZE, SIZE) for _ in range(32)]
    with torch.no_grad():
        want = [model(x)[-1].argmax(1).item() for x in inputs]
    got, batches = [None] * 32, []

    def client(i):
        reply = stub.Infer(request(model, 4, inputs[i]), timeout=60)
        got[i] = reply.images[0].top_k[0].class_id
        batches.append(reply.timings.batch_size)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want
    assert max(batches) > 1  # requests really shared forwards


def test_stream_and_model_info_and_health(cloud):
    running, stub, model = cloud
    x = torch.randn(1, 3, SIZE, SIZE)
    replies = list(stub.InferStream(iter([request(model, 2, x), request(model, 9, x)]), timeout=30))
    assert [r.request_id for r in replies] == ["r2", "r9"]
    info = stub.GetModelInfo(pb.ModelInfoRequest(), timeout=10)
    assert list(info.class_names) == NAMES and list(info.exit_points) == model.exit_points
    assert len(info.split_points) == model.num_blocks + 1
    assert info.split_points[5].default_codec.quantization == pb.Codec.INT8  # no codec_table: int8+zstd
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert status.status == health_pb2.HealthCheckResponse.SERVING


def test_not_serving_until_the_model_is_loaded(checkpoint, small_model):
    cfg = CloudConfig(checkpoint=str(checkpoint), address="127.0.0.1:0")
    running = build_server(cfg, None)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
        health_stub = health_pb2_grpc.HealthStub(channel)
        stub = pb_grpc.InferenceStub(channel)
        check = health_pb2.HealthCheckRequest(service="spinn.v1.Inference")
        assert health_stub.Check(check, timeout=10).status == health_pb2.HealthCheckResponse.NOT_SERVING
        x = torch.randn(1, 3, SIZE, SIZE)
        for call in (lambda: stub.Infer(request(small_model, 3, x), timeout=10),
                     lambda: stub.GetModelInfo(pb.ModelInfoRequest(), timeout=10)):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in err.value.details()
        running.set_model(ServedModel.from_checkpoint(load_checkpoint(checkpoint), "spinn", "1"))
        assert health_stub.Check(check, timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        assert len(stub.Infer(request(small_model, 3, x), timeout=10).images) == 1
    finally:
        running.stop()


def test_missing_checkpoint_exits_2_naming_the_key(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cloud", f"checkpoint={tmp_path / 'none.pt'}",
                           "address=127.0.0.1:0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "'checkpoint'" in proc.stderr, proc.stderr


def test_batcher_drops_expired_work_and_bounds_its_queue():
    calls, gate = [], threading.Event()

    def run(key, x):
        calls.append(x.shape[0])
        gate.wait(10)
        return [x.sum(dim=(1, 2, 3), keepdim=False).unsqueeze(1)]

    batcher = DynamicBatcher(run, max_batch_size=1, max_queue_delay_ms=0, max_queue_size=2)
    first = batcher.submit(0, torch.ones(1, 1, 1, 1))
    assert wait_until(lambda: calls, 5)  # the worker is now blocked inside run()
    expired = batcher.submit(0, torch.ones(1, 1, 1, 1), deadline=time.monotonic() + 0.05)
    kept = batcher.submit(0, torch.full((1, 1, 1, 1), 2.0))
    with pytest.raises(QueueFull):
        batcher.submit(0, torch.ones(1, 1, 1, 1))
    time.sleep(0.1)
    gate.set()
    assert first.result(5).outputs[0].item() == 1.0
    with pytest.raises(DeadlineExpired):
        expired.result(5)
    assert kept.result(5).outputs[0].item() == 2.0
    assert calls == [1, 1]  # the expired request never reached the model
    batcher.close()


def test_deadline_shorter_than_queue_delay(checkpoint, small_model):
    running = start(checkpoint, max_queue_delay_ms=1000.0, max_batch_size=64)
    try:
        stub = pb_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{running.port}"))
        with pytest.raises(grpc.RpcError) as err:
            stub.Infer(request(small_model, 3, torch.randn(1, 3, SIZE, SIZE)), timeout=0.2)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        running.stop()


def test_graceful_stop_finishes_in_flight_work(checkpoint, small_model):
    running = start(checkpoint, max_queue_delay_ms=300.0, max_batch_size=64)
    stub = pb_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{running.port}"))
    future = stub.Infer.future(request(small_model, 3, torch.randn(1, 3, SIZE, SIZE)), timeout=30)
    assert wait_until(lambda: running.batcher.queued() == 1, 10)  # in flight, held 300 ms in the batcher
    running.stop()
    assert len(future.result().images) == 1
    with pytest.raises(grpc.RpcError) as err:
        stub.Infer(request(small_model, 3, torch.randn(1, 3, SIZE, SIZE)), timeout=2)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # refused at once, not timed out


@pytest.mark.parametrize("forward_process", [False, True])
def test_sigterm_drains_and_exits_zero(checkpoint, small_model, forward_process):
    proc = subprocess.Popen([sys.executable, "-m", "cloud", f"checkpoint={checkpoint}", "address=127.0.0.1:0",
                             f"forward_process={str(forward_process).lower()}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        lines = []
        while time.time() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "serving spinn" in line:
                break
        assert "serving spinn" in "".join(lines), "".join(lines)
        port = int(lines[-1].rsplit("on port ", 1)[1])
        stub = pb_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        assert len(stub.Infer(request(small_model, 4, torch.randn(1, 3, SIZE, SIZE)), timeout=60).images) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        rest = proc.stdout.read()
        assert "Traceback" not in rest, rest
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_daemon_freezes_its_start_up_heap(checkpoint):
    # Full collections then scan only what serving made since (serving/heap.py): under a flood they stalled
    # every thread, health checks included, for up to 140 ms before.
    proc = subprocess.Popen([sys.executable, "-m", "cloud", f"checkpoint={checkpoint}", "address=127.0.0.1:0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()  # read on a thread, so that a silent daemon fails at the deadline
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        deadline, seen = time.time() + 60, [""]
        while " froze " not in seen[-1] and time.time() < deadline:
            try:
                seen.append(lines.get(timeout=max(0.01, deadline - time.time())))
            except queue.Empty:
                break
        assert " froze " in seen[-1], "".join(seen)
        assert int(seen[-1].split(" froze ")[1].split()[0]) > 10_000  # the interpreter, torch, grpc
    finally:
        proc.kill()
        proc.wait(30)


def test_codec_table_sets_default_codecs(tmp_path):
    table = tmp_path / "codec.json"
    table.write_text('{"defaults": {"5": "int4-pc+zlib"}}')
    assert load_codec_table(str(table))[5] == CodecSpec("int4", "zlib", per_channel=True)
    table.write_text('{"defaults": {"5": "int9"}}')
    with pytest.raises(ConfigError, match="codec_table"):
        load_codec_table(str(table))


@pytest.mark.parametrize("overrides, key", [
    ({"max_queue_delay_ms": -1.0}, "max_queue_delay_ms"),
    ({"intra_op_threads": -2}, "intra_op_threads"),
    ({"tls_cert": "cert.pem"}, "tls_cert"),
    ({"tls_client_ca": "ca.pem"}, "tls_client_ca"),
    ({"tls_cert": "missing.pem", "tls_key": "missing.key"}, "tls_cert"),
    ({"codec_table": "missing.json"}, "codec_table"),
    ({"log_level": "LOUD"}, "log_level"),
    ({"delivery_plane_coder": "lzma"}, "delivery_plane_coder"),
])
def test_cloud_config_validation_names_the_key(overrides, key):
    from models.config import from_dict

    with pytest.raises(ConfigError, match=f"'{key}'"):
        from_dict(CloudConfig, overrides)


def test_unbindable_address_is_a_config_error(checkpoint):
    with pytest.raises(ConfigError, match="'address'"):
        start(checkpoint, address="999.1.1.1:5")


def test_bad_cloud_config_names_the_key(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cloud", "max_batch_size=0"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "max_batch_size" in proc.stderr


def test_tls_and_bearer_token(checkpoint, small_model, tmp_path):
    cert, key = make_cert(tmp_path)
    (tmp_path / "token").write_text("s3cret")
    running = start(checkpoint, tls_cert=str(cert), tls_key=str(key), auth_token_file=str(tmp_path / "token"))
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        channel = grpc.secure_channel(f"localhost:{running.port}", creds)
        stub = pb_grpc.InferenceStub(channel)
        req = request(small_model, 3, torch.randn(1, 3, SIZE, SIZE))
        for metadata in (None, [("authorization", "Bearer wrong")]):
            with pytest.raises(grpc.RpcError) as err:
                stub.Infer(req, timeout=10, metadata=metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = stub.Infer(req, timeout=10, metadata=[("authorization", "Bearer s3cret")])
        assert len(reply.images) == 1
        plain = pb_grpc.InferenceStub(grpc.insecure_channel(f"localhost:{running.port}"))
        with pytest.raises(grpc.RpcError) as err:  # a plaintext client cannot talk to the TLS port
            plain.Infer(req, timeout=3, metadata=[("authorization", "Bearer s3cret")])
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop()


def test_mutual_tls_refuses_clients_without_a_certificate(checkpoint, small_model, tmp_path):
    cert, key = make_cert(tmp_path)  # self-signed CA certificate, used for server and client alike
    running = start(checkpoint, tls_cert=str(cert), tls_key=str(key), tls_client_ca=str(cert))
    try:
        req = request(small_model, 3, torch.randn(1, 3, SIZE, SIZE))
        anonymous = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.InferenceStub(grpc.secure_channel(f"localhost:{running.port}", anonymous)).Infer(req, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake fails; not a timeout
        with_cert = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes(),
                                                 private_key=key.read_bytes(), certificate_chain=cert.read_bytes())
        stub = pb_grpc.InferenceStub(grpc.secure_channel(f"localhost:{running.port}", with_cert))
        assert len(stub.Infer(req, timeout=10).images) == 1
    finally:
        running.stop()


def test_shipped_cloud_configs_are_valid():
    from models.config import from_dict, load_yaml

    for path in sorted((ROOT / "apps").glob("cloud*.yml")):
        from_dict(CloudConfig, load_yaml(path), source=str(path))


def test_intra_op_threads_leave_a_core_for_grpc():
    from cloud.server import intra_op_threads_for

    assert intra_op_threads_for(CloudConfig(), cores=2) == 1
    assert intra_op_threads_for(CloudConfig(), cores=1) == 1
    assert intra_op_threads_for(CloudConfig(), cores=16) == 15
    assert intra_op_threads_for(CloudConfig(intra_op_threads=3), cores=2) == 3


def test_checkpoint_download_is_the_served_file(cloud, checkpoint):
    import hashlib

    running, stub, _ = cloud
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    delivery = pb_grpc.ModelDeliveryStub(channel)
    chunks = list(delivery.GetCheckpoint(pb.CheckpointRequest(), timeout=30))
    data = b"".join(c.data for c in chunks)
    assert data == checkpoint.read_bytes() and chunks[0].total_bytes == len(data)
    assert chunks[-1].sha256 == hashlib.sha256(data).hexdigest()
    with pytest.raises(grpc.RpcError) as err:
        list(delivery.GetCheckpoint(pb.CheckpointRequest(model=pb.ModelRef(model_id="other", model_version="9")),
                                    timeout=30))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "'other'" in err.value.details()


def test_forward_process_answers_like_in_process_and_survives_its_death(checkpoint, small_model):
    from cloud.worker import ForwardWorker, WorkerError

    running, worker, served = start_with_worker(checkpoint, nice=3)
    pids = []
    if hasattr(os, "getpriority"):  # the whole worker process runs nicer than the daemon
        assert os.getpriority(os.PRIO_PROCESS, worker.process.pid) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 3)
    try:
        stub = pb_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{running.port}"))
        x = torch.randn(2, 3, SIZE, SIZE)
        with torch.no_grad():
            want = torch.softmax(small_model(x)[-1], -1)
        for attempt in range(2):
            reply = stub.Infer(request(small_model, 5, x), timeout=120)
            got = torch.tensor([[c.probability for c in image.top_k] for image in reply.images])
            torch.testing.assert_close(got, want.topk(3).values, atol=1e-5, rtol=0)
            pids.append(worker.process.pid)
            if attempt == 0:
                old_pipe = worker._conn
                worker.process.kill()  # dead between two batches: the next one restarts it
                worker.process.join()
        assert pids[0] != pids[1] and old_pipe.closed  # the restart left neither the old pipe nor a zombie
        assert not os.path.exists(f"/proc/{pids[0]}")
        with pytest.raises(WorkerError, match="KeyError|split"):
            worker.run(served.digest, 99, torch.zeros(1, 1, 1, 1))  # an error in the worker comes back as WorkerError
        with pytest.raises(WorkerError, match="KeyError"):
            worker.run("0" * 64, 5, torch.zeros(1, 1, 1, 1))  # a version it does not hold
    finally:
        running.stop()
    assert worker.process is None and not os.path.exists(f"/proc/{pids[1]}")


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="no per-thread nice value here")
def test_the_forward_runs_nicer_than_the_grpc_threads_and_the_range_is_checked():
    seen = []

    def run(key, batch):
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return [batch.sum(dim=(1, 2, 3)).unsqueeze(1)]

    batcher = DynamicBatcher(run, max_batch_size=4, max_queue_delay_ms=0, nice=4)
    try:
        batcher.submit(0, torch.ones(1, 1, 2, 2)).result(30)
    finally:
        batcher.close(drain=False)
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert seen == [min(19, mine + 4)] and mine == os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    for bad in (-1, 20):
        with pytest.raises(ConfigError, match="forward_nice"):
            CloudConfig(forward_nice=bad).validate()


def test_forward_process_with_a_bad_checkpoint_fails_clearly():
    from cloud.worker import ForwardWorker, WorkerError

    worker = ForwardWorker(torch.device("cpu"), 1)
    try:
        with pytest.raises(WorkerError, match="cannot be read"):
            worker.load("0" * 64, b"not a checkpoint", "bad.pt")
    finally:
        worker.close()


def test_a_failing_forward_answers_internal_and_the_server_stays_up(cloud):
    running, stub, model = cloud

    def broken(digest, split_point, activations):
        raise RuntimeError("boom")

    running.servicer.forward = broken
    with pytest.raises(grpc.RpcError) as err:
        stub.Infer(request(model, 3, torch.randn(1, 3, SIZE, SIZE)), timeout=30)
    assert err.value.code() == grpc.StatusCode.INTERNAL and "RuntimeError" in err.value.details()
    assert running.servicer.counts["INTERNAL"] == 1
    running.servicer.forward = None
    assert len(stub.Infer(request(model, 3, torch.randn(1, 3, SIZE, SIZE)), timeout=30).images) == 1


def test_the_delivery_plane_coder_reaches_the_packages_built(checkpoint):
    """``delivery_plane_coder`` is what the cloud's packages are coded with (built from the checkpoint's bytes in
    the build process), and the device side decodes them to the same weights as the default coder's."""
    from cloud.delivery import PackageCache
    from models.progressive import Decoder

    served = ServedModel.from_file(str(checkpoint), "m")
    finals = {}
    for coder in ("zstd", "context"):
        package = PackageCache(plane_coder=coder).get(served, 7, "split")
        assert package.manifest.plane_coder == coder
        decoder = Decoder(package.manifest)
        for i, payload in enumerate(package.payloads):
            decoder.apply(i, payload)
        finals[coder] = decoder.digest()
    assert finals["zstd"] == finals["context"]
