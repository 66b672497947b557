"""The cloud under overload and with parts that hang, fail or die: every call ends with an answer or a status,
fast, and health keeps answering. Real server on loopback, real small model; faults are injected into the
forward (a blocking one, a SIGSTOPped worker process, a failing answer step)."""

import os
import signal
import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto import spinn_v1_pb2_grpc as pb_grpc
from serving.admission import Admission, Overloaded
from tests.conftest import SIZE
from tests.test_cloud import request, start, start_with_worker


def health_ms(port: int) -> tuple[int, float]:
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    started = time.perf_counter()
    status = stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status
    return status, (time.perf_counter() - started) * 1000.0


def test_admission_refuses_past_the_limit_and_frees_places():
    gate = Admission(2, "max_in_flight")
    with gate.admit(), gate.admit():
        assert gate.in_flight == 2
        with pytest.raises(Overloaded, match="2 requests in flight.*max_in_flight"):
            with gate.admit():
                pass
    assert gate.in_flight == 0
    with pytest.raises(RuntimeError):
        with gate.admit():
            raise RuntimeError("a failing call still gives its place back")
    assert gate.in_flight == 0


def test_excess_requests_are_refused_at_once_and_health_still_answers(checkpoint, small_model):
    # Each admitted request waits 1.5 s in the batcher for company that never fills the batch.
    running = start(checkpoint, max_in_flight=2, max_infer_streams=1, max_delivery_calls=1, rpc_threads=8,
                    max_queue_delay_ms=1500.0, max_batch_size=64)
    stub = pb_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{running.port}"))
    x = torch.randn(1, 3, SIZE, SIZE)
    outcomes: list[tuple[str, str, float]] = []  # (status, details, when it ended), asserted in the test's thread

    def client():
        try:
            stub.Infer(request(small_model, 5, x), timeout=30)
            outcomes.append(("OK", "", time.monotonic()))
        except grpc.RpcError as err:
            outcomes.append((err.code().name, err.details(), time.monotonic()))

    try:
        threads = [threading.Thread(target=client) for _ in range(12)]
        for t in threads:
            t.start()
        time.sleep(0.5)  # the admitted two are waiting in the batcher now
        status, _ = health_ms(running.port)
        health_done = time.monotonic()
        for t in threads:
            t.join()
    finally:
        running.stop()
    ok = [ended for code, _, ended in outcomes if code == "OK"]
    refused = [(code, details, ended) for code, details, ended in outcomes if code != "OK"]
    assert len(ok) == 2 and len(outcomes) == 12
    assert all(code == "RESOURCE_EXHAUSTED" and "max_in_flight" in details for code, details, _ in refused)
    # Refused at once and health answered while the admitted two still waited, not queued behind them.
    assert max(ended for _, _, ended in refused) < min(ok) and health_done < min(ok)
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert running.servicer.counts["RESOURCE_EXHAUSTED"] == 10


def test_a_hung_forward_fails_its_batch_and_health_says_so(checkpoint, small_model):
    running = start(checkpoint, forward_timeout_s=0.5, grace_seconds=1.0)
    release = threading.Event()
    running.servicer.forward = lambda digest, split, x: release.wait(60) and []  # hangs until released
    stub = pb_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{running.port}"))
    try:
        started = time.perf_counter()
        with pytest.raises(grpc.RpcError) as err:
            stub.Infer(request(small_model, 5, torch.randn(1, 3, SIZE, SIZE)), timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "forward_timeout_s" in err.value.details()
        assert time.perf_counter() - started < 5
        assert health_ms(running.port)[0] == health_pb2.HealthCheckResponse.NOT_SERVING
        release.set()
        running.servicer.forward = None  # back to the real forward
        deadline = time.monotonic() + 10
        while health_ms(running.port)[0] != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "health did not come back after the forward returned"
            time.sleep(0.1)
        assert len(stub.Infer(request(small_model, 5, torch.randn(1, 3, SIZE, SIZE)), timeout=30).images) == 1
    finally:
        release.set()
        stopped = time.perf_counter()
        running.stop()
    assert time.perf_counter() - stopped < 10


def test_a_hung_worker_process_is_killed_and_replaced(checkpoint, small_model):
    running, worker, _ = start_with_worker(checkpoint, forward_timeout_s=1.0)
    stub = pb_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{running.port}"))
    x = torch.randn(1, 3, SIZE, SIZE)
    try:
        assert len(stub.Infer(request(small_model, 5, x), timeout=60).images) == 1
        hung = worker.process.pid
        os.kill(hung, signal.SIGSTOP)  # alive, never answers
        with pytest.raises(grpc.RpcError) as err:
            stub.Infer(request(small_model, 5, x), timeout=60)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert len(stub.Infer(request(small_model, 5, x), timeout=120).images) == 1  # a new worker answers
        assert worker.process.pid != hung and not os.path.exists(f"/proc/{hung}")
    finally:
        running.stop()


def test_a_failing_answer_step_is_internal_and_counted_so(checkpoint, small_model, monkeypatch):
    import cloud.server

    running = start(checkpoint)
    stub = pb_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{running.port}"))

    def broken(*args, **kwargs):
        raise KeyError("class name")

    monkeypatch.setattr(cloud.server, "answer", broken)
    try:
        with pytest.raises(grpc.RpcError) as err:
            stub.Infer(request(small_model, 5, torch.randn(1, 3, SIZE, SIZE)), timeout=30)
    finally:
        running.stop()
    assert err.value.code() == grpc.StatusCode.INTERNAL and "KeyError" in err.value.details()
    assert running.servicer.counts == {"INTERNAL": 1}


def test_one_bad_message_costs_one_answer_of_a_stream(checkpoint, small_model):
    running = start(checkpoint)
    stub = pb_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{running.port}"))
    x = torch.randn(1, 3, SIZE, SIZE)
    bad = request(small_model, 5, x)
    bad.features.data = bad.features.data[:-4]  # a truncated tensor
    wrong_model = request(small_model, 5, x)
    wrong_model.model.model_version = "9"
    try:
        replies = list(stub.InferStream(iter([request(small_model, 2, x), bad, wrong_model,
                                              request(small_model, 9, x)]), timeout=30))
    finally:
        running.stop()
    assert [len(r.images) for r in replies] == [1, 0, 0, 1]
    assert replies[1].status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "features" in replies[1].status.message
    assert replies[2].status.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert replies[0].status.code == 0 and replies[3].status.code == 0


def test_a_forward_worker_that_fails_at_start_exits_2_naming_it(checkpoint, monkeypatch, caplog):
    """The model loads in the daemon but its worker process cannot start (out of memory, say)."""
    import cloud.__main__
    import cloud.server
    from cloud.worker import WorkerError

    def no_worker(*args, **kwargs):
        raise WorkerError("forward process failed: MemoryError")

    monkeypatch.setattr(cloud.server, "ForwardWorker", no_worker)
    code = cloud.__main__.main(["--config", "apps/cloud.yml", f"checkpoint={checkpoint}", "forward_process=true",
                                "address=127.0.0.1:0"])
    assert code == 2 and "MemoryError" in caplog.text
