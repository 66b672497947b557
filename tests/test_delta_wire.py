"""Delta upgrades on the wire: a device that holds v1 complete says so, the cloud answers with the delta to v2 when
v1 is still served and the delta is worth it, and the device ends bit-exact on v2 from fewer bytes; every other case
gets the full package, and a delta from weights the device does not hold is refused before a byte of it.

Real checkpoints, a real cloud on a loopback port, real device runtimes (``stream_decode_process`` off and on)."""

import time

import grpc
import pytest
import torch

from bench.hostile import HostileCloud
from cloud.delivery import PackageCache, offered_package
from cloud.inference import ServedModel
from cloud.server import CloudConfig, build_server
from device.runtime import DeviceRuntime
from models.checkpoint import load_checkpoint, save_checkpoint
from models.progressive import build_package
from models.progressive.delta import DELTA_ORDER, weights_digest
from proto import spinn_v1_pb2 as pb
from proto import spinn_v1_pb2_grpc as pb_grpc
from tests.conftest import NAMES, PREPROCESS, SIZE, digest_of
from tests.test_delta import fine_tuned
from tests.test_device import wait_until
from tests.test_versions import cloud_on, decisive, device_cfg, save


def in_memory(model: torch.nn.Module, label: str, tmp_path) -> ServedModel:
    """``model`` served with no file behind it: its packages are built in the cloud's thread, not in a process
    started for each (seconds apiece); the process path is exercised by the test of a device's upgrade."""
    return ServedModel.from_checkpoint(load_checkpoint(save(model, tmp_path / f"{label}.pt")), "spinn", label)


def memory_cloud(v1: torch.nn.Module, tmp_path, **overrides):
    """A cloud serving ``v1`` (label v1) from memory."""
    cloud = build_server(CloudConfig(checkpoint=str(save(v1, tmp_path / "v1.pt")), address="127.0.0.1:0",
                                     model_version="v1", log_level="WARNING", **overrides), None)
    cloud.set_model(in_memory(v1, "v1", tmp_path))
    return cloud


@pytest.fixture
def versions(small_model, tmp_path):
    """A cloud serving v1 (the small model) and v2 (v1 fine-tuned, the latest); yields (cloud, v1, v2, stub)."""
    v1, v2 = small_model, fine_tuned(small_model)
    cloud = memory_cloud(v1, tmp_path)
    cloud.models.add(in_memory(v2, "v2", tmp_path), (2,))
    channel = grpc.insecure_channel(f"127.0.0.1:{cloud.port}")
    yield cloud, v1, v2, pb_grpc.ModelDeliveryStub(channel)
    channel.close()
    cloud.stop()


def test_the_weights_digest_is_what_every_package_of_a_version_ends_on(small_model):
    meta = {"model_config": {}, "class_names": NAMES, "preprocess": {}}
    state = small_model.state_dict()
    ends = {build_package(state, meta, "spinn", "v1", split, small_model.exit_points, order).manifest.final_sha256
            for split, order in ((5, "split"), (9, "whole"))}
    assert ends == {weights_digest(state)}
    assert weights_digest(fine_tuned(small_model).state_dict()) != weights_digest(state)


def test_the_cloud_offers_a_delta_only_from_a_served_version_the_device_holds(versions, tmp_path):
    cloud, v1, v2, stub = versions
    held = weights_digest(v1.state_dict())
    delta = stub.GetManifest(pb.ManifestRequest(split_point=5, held_sha256=held), timeout=60)
    assert delta.order == DELTA_ORDER and delta.base_sha256 == held and delta.model.digest == digest_of(v2)
    assert delta.final_sha256 == weights_digest(v2.state_dict())
    full = stub.GetManifest(pb.ManifestRequest(split_point=5), timeout=60)
    assert full.order == "split" and not full.base_sha256 and full.final_sha256 == delta.final_sha256
    assert sum(c.size for c in delta.chunks) < 0.75 * sum(c.size for c in full.chunks)
    for other in (weights_digest(v2.state_dict()), "ab" * 32):  # the latest itself; weights nobody serves
        answer = stub.GetManifest(pb.ManifestRequest(split_point=5, held_sha256=other), timeout=60)
        assert answer.package_digest == full.package_digest
    cloud.models.add(in_memory(decisive(v1, 3), "v3", tmp_path), (3,))
    unrelated = stub.GetManifest(pb.ManifestRequest(split_point=5, held_sha256=held), timeout=60)
    assert unrelated.order == "split"  # a delta to a version trained apart is not worth it: the full package


@pytest.mark.parametrize("request_, code, names", [
    (pb.ManifestRequest(split_point=5, held_sha256="xyz"), grpc.StatusCode.INVALID_ARGUMENT, "held_sha256"),
    (pb.ManifestRequest(split_point=5, order=DELTA_ORDER), grpc.StatusCode.INVALID_ARGUMENT, "order"),
], ids=["held-malformed", "delta-asked"])
def test_bad_manifest_requests_are_refused_naming_the_field(versions, request_, code, names):
    stub = versions[3]
    with pytest.raises(grpc.RpcError) as err:
        stub.GetManifest(request_, timeout=60)
    assert err.value.code() == code and names in err.value.details()


def test_a_delta_stream_names_a_served_base(versions):
    cloud, v1, v2, stub = versions
    held = weights_digest(v1.state_dict())
    m = stub.GetManifest(pb.ManifestRequest(split_point=5, held_sha256=held), timeout=60)
    request = pb.WeightRequest(model=m.model, split_point=5, order=DELTA_ORDER, package_digest=m.package_digest)
    for base, code in (("", grpc.StatusCode.INVALID_ARGUMENT), ("ab" * 32, grpc.StatusCode.FAILED_PRECONDITION)):
        request.base_sha256 = base
        with pytest.raises(grpc.RpcError) as err:
            list(stub.StreamWeights(request, timeout=60))
        assert err.value.code() == code and "base_sha256" in err.value.details()
    request.base_sha256 = held
    data = b"".join(message.data for message in stub.StreamWeights(request, timeout=60))
    assert len(data) == sum(c.size for c in m.chunks)


def stream_device(port: int, cache, decode_process: bool, poll_seconds: float = 0.3) -> DeviceRuntime:
    return DeviceRuntime.start(device_cfg("stream", port, cache, stream_decode_process=decode_process,
                                          stream_poll_seconds=poll_seconds))


def complete_on(runtime: DeviceRuntime, model: torch.nn.Module, timeout_s: float = 90) -> bool:
    return wait_until(lambda: runtime.active is not None and runtime.active.complete and
                      runtime.active.ref.digest == digest_of(model), timeout_s)


@pytest.mark.parametrize("files", [False, True], ids=["memory-thread", "files-process"])
def test_a_device_holding_v1_moves_to_v2_by_delta_and_resumes_it_from_its_cache(small_model, tmp_path, files):
    """With ``files``, the cloud builds from checkpoint files in its build process (both versions' bytes for the
    delta) and the device decodes in its decode process; otherwise both in their own threads."""
    v1, v2 = small_model, fine_tuned(small_model)
    cloud = cloud_on(save(v1, tmp_path / "v1.pt"), model_version="v1") if files else memory_cloud(v1, tmp_path)
    cache = tmp_path / "cache"
    try:
        runtime = stream_device(cloud.port, cache, decode_process=files)
        try:
            assert complete_on(runtime, v1)
            full_bytes = runtime.streamed.current.manifest.total_bytes
            cloud.models.add(ServedModel.from_file(str(save(v2, tmp_path / "v2.pt")), "spinn", "v2") if files
                             else in_memory(v2, "v2", tmp_path), (2,))
            assert complete_on(runtime, v2)
            stream = runtime.streamed.current
            assert stream.manifest.order == DELTA_ORDER
            assert wait_until(lambda: stream.outcome == "complete", 10)  # set once the others are deleted
            assert stream.digest() == weights_digest(v2.state_dict())  # bit-exact on v2's package weights
            assert stream.decoder.bytes < 0.75 * full_bytes
            x = torch.randn(3, SIZE, SIZE)
            answer = runtime.classify_tensor(x)
            assert answer.model_digest == digest_of(v2) and answer.answered_by == "cloud"
            assert not (cache / "spinn" / digest_of(v1)).exists()  # v1's package deleted once v2 verified
        finally:
            runtime.close()
    finally:
        cloud.stop()
    offline = DeviceRuntime.start(device_cfg("stream", 1, cache))  # no cloud: from the cache alone
    try:
        assert complete_on(offline, v2, 30)
        assert offline.streamed.current.manifest.order == DELTA_ORDER
    finally:
        offline.close()


def test_a_delta_cache_without_its_base_is_quarantined(small_model, tmp_path):
    v1, v2 = small_model, fine_tuned(small_model)
    cloud = memory_cloud(v1, tmp_path)
    cache = tmp_path / "cache"
    try:
        runtime = stream_device(cloud.port, cache, False)
        try:
            assert complete_on(runtime, v1)
            cloud.models.add(in_memory(v2, "v2", tmp_path), (2,))
            assert complete_on(runtime, v2)
            # v1's package is deleted after the last swap; closed before that, the device would keep it
            assert wait_until(lambda: runtime.streamed.current.outcome == "complete", 10)
        finally:
            runtime.close()
    finally:
        cloud.stop()
    (base,) = cache.glob(f"spinn/*/split5-{DELTA_ORDER}-*/base.bin")
    base.write_bytes(base.read_bytes()[:-4] + b"\0\0\0\1")  # the right size, other weights
    offline = DeviceRuntime.start(device_cfg("stream", 1, cache))
    try:
        assert offline.active is None or offline.active.model is None  # nothing installed from it
        assert list((cache / "quarantine").iterdir())
    finally:
        offline.close()


def test_a_delta_from_weights_the_device_does_not_hold_is_refused_before_a_byte(small_model, tmp_path):
    v1, v2 = small_model, fine_tuned(small_model)
    cloud = memory_cloud(v1, tmp_path)
    proxy = HostileCloud(f"127.0.0.1:{cloud.port}")
    cache = tmp_path / "cache"

    def other_base(m: pb.Manifest) -> pb.Manifest:
        if m.order == DELTA_ORDER:
            m.base_sha256 = "cd" * 32
        return m

    try:
        runtime = stream_device(int(proxy.address.rsplit(":", 1)[1]), cache, False)
        try:
            assert complete_on(runtime, v1)
            proxy.manifest = other_base
            refused = runtime.streamed.refused_manifests
            cloud.models.add(in_memory(v2, "v2", tmp_path), (2,))
            assert wait_until(lambda: runtime.streamed.refused_manifests >= refused + 2, 30)
            assert runtime.active.ref.digest == digest_of(v1) and runtime.streamed.pending is None
            assert not list(cache.glob(f"spinn/*/split5-{DELTA_ORDER}-*"))  # nothing of it stored
            proxy.honest()
            assert complete_on(runtime, v2)
        finally:
            runtime.close()
    finally:
        proxy.stop()
        cloud.stop()


def test_a_delta_under_way_is_not_streamed_twice(small_model, tmp_path):
    """Once switched to the delta (its head exact, the rest coming), the device holds nothing complete and the
    cloud offers it v2's full package: it ends on the same weights, so it is not started beside the delta."""
    v1, v2 = small_model, fine_tuned(small_model)
    cloud = memory_cloud(v1, tmp_path, delivery_message_bytes=4096)
    proxy = HostileCloud(f"127.0.0.1:{cloud.port}")
    try:
        runtime = stream_device(int(proxy.address.rsplit(":", 1)[1]), tmp_path / "cache", False)
        try:
            assert complete_on(runtime, v1)
            proxy.chunk = lambda message, i: (time.sleep(0.01), message)[1]  # a slow link: polls meanwhile
            cloud.models.add(in_memory(v2, "v2", tmp_path), (2,))
            streamed = runtime.streamed
            assert wait_until(lambda: streamed.current.manifest.model_digest == digest_of(v2), 60)
            seen = set()
            while not streamed.current.complete:
                seen.add(streamed.pending.manifest.order if streamed.pending is not None else None)
                time.sleep(0.05)
            assert seen == {None} and streamed.current.manifest.order == DELTA_ORDER
            assert complete_on(runtime, v2)
        finally:
            runtime.close()
    finally:
        proxy.stop()
        cloud.stop()


def counting(monkeypatch, name: str) -> dict[str, int]:
    """Count the calls of ``cloud.delivery.<name>`` (a package builder), which still runs."""
    import cloud.delivery as delivery

    calls, real = {"n": 0}, getattr(delivery, name)

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(delivery, name, counted)
    return calls


def test_a_delta_not_worth_it_is_neither_kept_nor_built_again(small_model, tmp_path, monkeypatch):
    v1, v2 = in_memory(decisive(small_model, 1), "v1", tmp_path), in_memory(decisive(small_model, 2), "v2", tmp_path)
    deltas = counting(monkeypatch, "build_delta_package")
    cache = PackageCache(max_packages=4)
    held = weights_digest(v1.model.state_dict())
    for _ in range(3):
        for split in (3, 5, 9):
            assert offered_package(cache, [v1, v2], v2, split, "split", held).manifest.order == "split"
    assert deltas["n"] == 3 and len(cache._entries) == 3  # one delta per split point, weighed once, not kept


def test_a_delta_that_cannot_be_built_gives_the_full_package(small_model, tmp_path, monkeypatch):
    import cloud.delivery as delivery

    v1, v2 = in_memory(small_model, "v1", tmp_path), in_memory(fine_tuned(small_model), "v2", tmp_path)
    cache = PackageCache()
    held = weights_digest(small_model.state_dict())

    def broken(*args, **kwargs):
        raise ValueError("a delta build that fails")

    monkeypatch.setattr(delivery, "build_delta_package", broken)
    attempts = counting(monkeypatch, "build_delta_package")
    for _ in range(2):
        assert offered_package(cache, [v1, v2], v2, 5, "split", held).manifest.order == "split"
    assert attempts["n"] == 1  # a failed build is not tried on every poll


def test_a_version_with_the_same_weights_and_other_metadata_is_taken(small_model, tmp_path):
    """v2 relabels v1's classes: the same package weights, another version. The device moves to it (a delta of
    nothing), though its packages end on the weights the device holds."""
    cloud = memory_cloud(small_model, tmp_path)
    try:
        runtime = stream_device(cloud.port, tmp_path / "cache", False)
        try:
            assert complete_on(runtime, small_model)
            save_checkpoint(tmp_path / "v2.pt", small_model, NAMES[::-1], PREPROCESS)
            v2 = ServedModel.from_checkpoint(load_checkpoint(tmp_path / "v2.pt"), "spinn", "v2")
            cloud.models.add(v2, (2,))
            assert wait_until(lambda: runtime.active.ref.digest == v2.digest and runtime.active.complete, 30)
            assert runtime.active.class_names == NAMES[::-1]
        finally:
            runtime.close()
    finally:
        cloud.stop()


def test_a_restart_mid_delta_serves_the_base_version_until_the_delta_head_is_exact(small_model, tmp_path):
    v1, v2 = small_model, fine_tuned(small_model)
    cloud = memory_cloud(v1, tmp_path, delivery_message_bytes=1024)
    proxy = HostileCloud(f"127.0.0.1:{cloud.port}")
    cache = tmp_path / "cache"
    try:
        runtime = stream_device(int(proxy.address.rsplit(":", 1)[1]), cache, False)
        try:
            assert complete_on(runtime, v1)
            proxy.chunk = lambda message, i: (time.sleep(0.5), message)[1]  # the delta's head does not arrive
            cloud.models.add(in_memory(v2, "v2", tmp_path), (2,))
            assert wait_until(lambda: runtime.streamed.pending is not None, 30)
        finally:
            runtime.close()
    finally:
        proxy.stop()
        cloud.stop()
    offline = DeviceRuntime.start(device_cfg("stream", 1, cache))
    try:
        streamed = offline.streamed
        assert streamed.current.manifest.model_digest == digest_of(v1) and offline.active.complete
        assert streamed.pending is not None and streamed.pending.manifest.order == DELTA_ORDER
    finally:
        offline.close()


def test_a_delta_that_fails_its_final_digest_gives_way_to_the_full_package(small_model, tmp_path):
    """The delta is in use from its exact head on, so once it fails the device holds nothing complete: it asks
    without naming a base and gets v2's full package."""
    v1, v2 = small_model, fine_tuned(small_model)
    cloud = memory_cloud(v1, tmp_path)
    proxy = HostileCloud(f"127.0.0.1:{cloud.port}")

    def wrong_delta_final(m: pb.Manifest) -> pb.Manifest:
        if m.order == DELTA_ORDER:
            m.final_sha256 = "ef" * 32
        return m

    try:
        # polled only when asked: a poll while the delta streams would start v2's full package beside it, which
        # takes over and stops the delta before its final check
        runtime = stream_device(int(proxy.address.rsplit(":", 1)[1]), tmp_path / "cache", False, 600)
        try:
            assert complete_on(runtime, v1)
            proxy.manifest = wrong_delta_final
            cloud.models.add(in_memory(v2, "v2", tmp_path), (2,))
            runtime.streamed.check_soon()  # the delta; its failure asks again (on_end), for the full package
            assert complete_on(runtime, v2, 60)
            assert runtime.streamed.current.manifest.order == "split"
            assert sum(runtime.streamed.failures.values()) >= 1  # the delta was streamed and failed first
        finally:
            runtime.close()
    finally:
        proxy.stop()
        cloud.stop()


def test_a_cloud_with_a_precision_floor_offers_deltas_on_its_grid(small_model, tmp_path):
    v1, v2 = small_model, fine_tuned(small_model)
    cloud = memory_cloud(v1, tmp_path, delivery_snr_db=40.0)
    cloud.models.add(in_memory(v2, "v2", tmp_path), (2,))
    channel = grpc.insecure_channel(f"127.0.0.1:{cloud.port}")
    stub = pb_grpc.ModelDeliveryStub(channel)
    try:
        held = weights_digest(v1.state_dict(), 16, 40.0)
        delta = stub.GetManifest(pb.ManifestRequest(split_point=5, held_sha256=held), timeout=60)
        full = stub.GetManifest(pb.ManifestRequest(split_point=5), timeout=60)
        assert delta.order == DELTA_ORDER and delta.final_sha256 == weights_digest(v2.state_dict(), 16, 40.0)
        assert sum(c.size for c in delta.chunks) < 0.75 * sum(c.size for c in full.chunks)
        exact = stub.GetManifest(pb.ManifestRequest(split_point=5, held_sha256=weights_digest(v1.state_dict())),
                                 timeout=60)
        assert exact.order == "split"  # weights from before the floor are not a base it serves
    finally:
        channel.close()
        cloud.stop()


def test_a_new_precision_of_the_held_version_streams_into_a_folder_of_its_own(small_model, tmp_path):
    """The cloud restarts with a floor: the same version, another package and final digest. The device streams it
    beside the complete model it holds, which serves until the new one is complete too."""
    exact = memory_cloud(small_model, tmp_path)
    proxy = HostileCloud(f"127.0.0.1:{exact.port}")
    floored = None
    try:
        runtime = stream_device(int(proxy.address.rsplit(":", 1)[1]), tmp_path / "cache", False)
        try:
            assert complete_on(runtime, small_model)
            held = runtime.streamed.current.store.dir
            floored = memory_cloud(small_model, tmp_path, delivery_snr_db=40.0, delivery_message_bytes=4096)
            proxy.chunk = lambda message, i: (time.sleep(0.01), message)[1]  # slow: the device is seen meanwhile
            proxy.retarget(f"127.0.0.1:{floored.port}")
            target = weights_digest(small_model.state_dict(), 16, 40.0)
            assert wait_until(lambda: runtime.streamed.pending is not None, 30)
            while runtime.streamed.current.manifest.final_sha256 != target:
                assert runtime.active.complete  # the exact model serves until the floored one is complete
                time.sleep(0.02)
            assert runtime.active.complete
            assert runtime.streamed.current.store.dir != held  # the held package was never written over
        finally:
            runtime.close()
    finally:
        proxy.stop()
        for cloud in (exact, floored):
            if cloud is not None:
                cloud.stop()


def test_a_cache_from_before_folders_named_their_final_digest_is_moved_and_resumed(small_model, tmp_path):
    cloud = memory_cloud(small_model, tmp_path)
    cache = tmp_path / "cache"
    try:
        runtime = stream_device(cloud.port, cache, False)
        try:
            assert complete_on(runtime, small_model)
            folder = runtime.streamed.current.store.dir
        finally:
            runtime.close()
    finally:
        cloud.stop()
    old = folder.with_name(folder.name.rsplit("-", 1)[0])  # split5-split-<final> -> split5-split
    folder.rename(old)
    offline = DeviceRuntime.start(device_cfg("stream", 1, cache))
    try:
        assert complete_on(offline, small_model, 30)
        assert folder.is_dir() and not old.exists()
    finally:
        offline.close()
