"""One model at a time: content identity, several versions served, skew answered on the device, rollout.

Real checkpoints of one architecture that differ, a real cloud on a loopback port, real device runtimes."""

import copy
import shutil
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch

from cloud.inference import RequestError, ServedModel
from cloud.server import CloudConfig, build_server, load_versions
from cloud.versions import ModelRegistry, VersionRefused, version_rank
from device.config import DeviceConfig
from device.runtime import DeviceRuntime
from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from models.config import from_dict
from models.early_exit import EarlyExitMobileNetV2, ModelConfig
from models.identity import model_digest, short_digest
from proto import spinn_v1_pb2 as pb
from proto import spinn_v1_pb2_grpc as pb_grpc
from proto.codec import CodecSpec, encode
from tests.conftest import NAMES, PREPROCESS, SIZE, digest_of
from tests.test_device import wait_until


def decisive(model: EarlyExitMobileNetV2, seed: int) -> EarlyExitMobileNetV2:
    """A copy with every weight perturbed (``seed``) and a sharp final classifier: two such versions differ in
    head and tail alike, and 16-bit weights never flip their top-1 (so answers can be compared exactly)."""
    other = copy.deepcopy(model)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.3 * p.std().nan_to_num(0.0) * torch.randn_like(p))
        other.final.classifier[-1].weight.mul_(30.0)
    return other.eval()


def save(model, path: Path) -> Path:
    save_checkpoint(path, model, NAMES, PREPROCESS)
    return path


def cloud_on(checkpoint, **overrides):
    cfg = CloudConfig(**{"checkpoint": str(checkpoint), "address": "127.0.0.1:0", "log_level": "WARNING",
                         **overrides})
    running = build_server(cfg, None)
    folder = load_versions(cfg, running)
    running.serving()
    if folder is not None:
        running.watch(folder)
    return running


def feature_request(model, split: int, x: torch.Tensor, digest: str) -> pb.FeatureRequest:
    from models.partition import head

    with torch.no_grad():
        activation = head(model, split)(x).activation
    return pb.FeatureRequest(model=pb.ModelRef(model_id="spinn", digest=digest), split_point=split,
                             features=encode(activation, CodecSpec("float32", "none")), top_k=1)


# -- content identity ------------------------------------------------------------------------------------------

def test_the_digest_covers_weights_buffers_config_preprocessing_and_names(small_model, tmp_path):
    base = digest_of(small_model)
    assert load_checkpoint(save(small_model, tmp_path / "a.pt")).digest == base  # saved, loaded: the same
    changed = copy.deepcopy(small_model)
    with torch.no_grad():
        changed.features[3].conv[0][0].weight[0, 0, 0, 0] += 1e-6  # one weight, by a hair
    assert digest_of(changed) != base
    buffered = copy.deepcopy(small_model)
    buffered.features[1].conv[0][1].running_var[0] += 1e-3  # a buffer
    assert digest_of(buffered) != base
    calibrated = copy.deepcopy(small_model)
    calibrated.set_temperatures([1.0, 1.0, 1.0, 2.0])  # the model config
    assert digest_of(calibrated) != base
    assert digest_of(small_model, names=NAMES[::-1]) != base
    assert digest_of(small_model, preprocess=type(PREPROCESS)(SIZE, SIZE + 4, (0.5,) * 3, (0.25,) * 3)) != base
    metrics = tmp_path / "m.pt"
    save_checkpoint(metrics, small_model, NAMES, PREPROCESS, metrics={"accuracy": 0.5})  # metrics are not identity
    assert load_checkpoint(metrics).digest == base


def test_a_checkpoint_whose_weights_were_altered_is_refused(small_model, tmp_path):
    path = save(small_model, tmp_path / "a.pt")
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["final.classifier.1.bias"][0] += 1.0
    torch.save(payload, tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match="does not match the digest stored in it"):
        load_checkpoint(tmp_path / "b.pt")


def test_a_checkpoint_can_start_a_fine_tune_of_the_same_architecture_only(small_model, tmp_path):
    from models.config import ConfigError
    from models.early_exit import load_pretrained

    path = save(decisive(small_model, 3), tmp_path / "v1.pt")
    fresh = EarlyExitMobileNetV2(small_model.config)
    load_pretrained(fresh, str(path))
    assert digest_of(fresh) == load_checkpoint(path).digest  # every tensor, exits and classifier included
    wider = EarlyExitMobileNetV2(ModelConfig(width_mult=0.5, num_classes=10, exits=[0.15, 0.45, 0.75],
                                             exit_channels=16))
    with pytest.raises(ConfigError, match="'pretrained'.*another architecture"):
        load_pretrained(wider, str(path))


# -- the registry -------------------------------------------------------------------------------------------

def served(model, label, tmp_path) -> ServedModel:
    return ServedModel.from_file(str(save(model, tmp_path / f"{label}.pt")), "spinn", label)


def test_versions_follow_the_policy_and_unload_after_their_last_request(small_model, tmp_path):
    unloaded = []
    registry = ModelRegistry("spinn", keep=2, on_unload=lambda s: unloaded.append(s.model_version))
    v1, v2, v3 = (served(decisive(small_model, i), f"v{i}", tmp_path) for i in (1, 2, 3))
    registry.add(v1, version_rank("v1"))
    registry.add(v2, version_rank("v2"))
    with registry.lease(v1.ref) as held:  # a request in flight on v1
        registry.add(v3, version_rank("v3"))  # v1 is beyond "latest 2": retired, not yet unloaded
        assert held is v1 and unloaded == [] and [v.model_version for v in registry.versions()] == ["v2", "v3"]
        with pytest.raises(RequestError) as err:
            with registry.lease(v1.ref):
                pass
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and v1.digest in err.value.detail
        assert v2.digest in err.value.detail and v3.digest in err.value.detail
    assert unloaded == ["v1"]  # after its last request
    assert registry.latest() is v3


def test_a_label_reused_for_other_weights_another_architecture_and_duplicates_are_refused(small_model, tmp_path):
    registry = ModelRegistry("spinn", keep=3)
    v1 = served(small_model, "v1", tmp_path)
    registry.add(v1)
    (tmp_path / "again").mkdir()
    impostor = served(decisive(small_model, 5), "v1", tmp_path / "again")
    with pytest.raises(VersionRefused, match=f"'v1' is bound to digest {v1.digest}.*{impostor.digest}"):
        registry.add(impostor)
    with pytest.raises(VersionRefused, match="served already"):
        registry.add(ServedModel.from_file(v1.source, "spinn", "v9"))
    wider = EarlyExitMobileNetV2(ModelConfig(width_mult=0.5, num_classes=10, exits=[0.15, 0.45, 0.75],
                                             exit_channels=16)).eval()
    with pytest.raises(VersionRefused, match="another architecture"):
        registry.add(served(wider, "v2", tmp_path))
    assert [v.digest for v in registry.versions()] == [v1.digest]


# -- the cloud ----------------------------------------------------------------------------------------------

def test_the_cloud_answers_each_version_from_its_own_tail(small_model, tmp_path):
    models = {label: decisive(small_model, seed) for label, seed in (("v1", 1), ("v2", 2))}
    folder = tmp_path / "models"
    folder.mkdir()
    for label, model in models.items():
        save(model, folder / f"{label}.pt")
    cloud = cloud_on(folder)
    stub = pb_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{cloud.port}"))
    x = torch.randn(4, 3, SIZE, SIZE)
    try:
        info = stub.GetModelInfo(pb.ModelInfoRequest(), timeout=30)
        assert [v.model_version for v in info.versions] == ["v1", "v2"] and info.model.model_version == "v2"
        for label, model in models.items():
            reply = stub.Infer(feature_request(model, 5, x, digest_of(model)), timeout=30)
            with torch.no_grad():
                want = model(x)[-1].argmax(-1).tolist()
            assert [i.top_k[0].class_id for i in reply.images] == want
            assert reply.model.model_version == label and reply.model.digest == digest_of(model)
        # v1's head with v2's digest: the cloud cannot tell, but a device never sends that; a digest it does not
        # serve is refused with what it serves, in the detail and the trailing metadata
        with pytest.raises(grpc.RpcError) as err:
            stub.Infer(feature_request(models["v1"], 5, x, "0" * 64), timeout=30)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "0" * 64 in err.value.details() and digest_of(models["v2"]) in err.value.details()
        assert dict(err.value.trailing_metadata())["spinn-served-versions"] == \
            f"v1={digest_of(models['v1'])},v2={digest_of(models['v2'])}"
    finally:
        cloud.stop()


def test_a_bad_file_in_the_model_folder_is_logged_and_the_rest_served(small_model, tmp_path, caplog):
    folder = tmp_path / "models"
    folder.mkdir()
    save(small_model, folder / "v1.pt")
    cloud = cloud_on(folder, model_dir_poll_seconds=0.2)
    try:
        v1 = cloud.models.latest().digest
        (folder / "v2.pt").write_bytes(b"not a checkpoint")
        impostor = decisive(small_model, 9)
        save(impostor, tmp_path / "v1.pt")
        shutil.copy(tmp_path / "v1.pt", folder / "v1.pt")  # the label v1 reused for other weights
        assert wait_until(lambda: "v1.pt" in caplog.text and "bound to digest" in caplog.text, 20), caplog.text
        assert wait_until(lambda: "v2.pt not served" in caplog.text, 20)
        assert f"bound to digest {v1}" in caplog.text and digest_of(impostor) in caplog.text
        assert [v.digest for v in cloud.models.versions()] == [v1]  # still served, nothing else
    finally:
        cloud.stop()


def test_a_version_in_flight_is_answered_by_itself_after_it_is_retired(small_model, tmp_path):
    v1_model, v2_model = decisive(small_model, 1), decisive(small_model, 2)
    cloud = cloud_on(save(v1_model, tmp_path / "v1.pt"), keep_versions=1, max_queue_delay_ms=1500.0,
                     max_batch_size=64)
    stub = pb_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{cloud.port}"))
    x = torch.randn(1, 3, SIZE, SIZE)
    v1 = digest_of(v1_model)
    replies = []
    caller = threading.Thread(target=lambda: replies.append(stub.Infer(feature_request(v1_model, 5, x, v1),
                                                                       timeout=60)))
    try:
        caller.start()
        assert wait_until(lambda: cloud.models.in_flight(v1) == 1, 10)
        cloud.models.add(ServedModel.from_file(str(save(v2_model, tmp_path / "v2.pt")), "spinn", "v2"), (2,))
        with pytest.raises(grpc.RpcError) as err:  # retired: no new requests ...
            stub.Infer(feature_request(v1_model, 5, x, v1), timeout=30)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        caller.join(30)
        with torch.no_grad():  # ... but the one in flight is answered by v1's own tail
            assert replies[0].images[0].top_k[0].class_id == int(v1_model(x)[-1].argmax())
        assert replies[0].model.digest == v1
        with pytest.raises(KeyError):
            cloud.models.held(v1)  # unloaded after it
    finally:
        cloud.stop()


# -- the device ---------------------------------------------------------------------------------------------

def device_cfg(checkpoint, port, cache, **overrides) -> DeviceConfig:
    return from_dict(DeviceConfig, {"checkpoint": str(checkpoint), "cloud": f"127.0.0.1:{port}", "split_point": 5,
                                    "z_confidence_threshold": 1.0, "deadline_ms": 10_000, "fallback": "exit",
                                    "weights_cache": str(cache), "stream_poll_seconds": 0.5,
                                    "stream_decode_process": False, "stream_swap_ms": 0,
                                    "input_codec": "float32+none", "log_level": "WARNING", **overrides})


def test_version_skew_is_answered_on_the_device_and_a_streaming_device_converges(small_model, tmp_path, caplog):
    v1_model, v2_model = decisive(small_model, 1), decisive(small_model, 2)
    v1_path = save(v1_model, tmp_path / "v1.pt")
    cloud = cloud_on(save(v2_model, tmp_path / "v2.pt"), model_version="v2")  # the cloud serves only v2
    xs = [torch.randn(3, SIZE, SIZE) for _ in range(6)]
    try:
        local = DeviceRuntime.start(device_cfg(v1_path, cloud.port, tmp_path / "c1"))
        try:
            results = [local.classify_tensor(x) for x in xs]
            calls = local.rpc_calls
        finally:
            local.close()
        assert all(r.degraded and r.answered_by.startswith("device:") for r in results)
        assert all(r.reason.startswith(f"version skew: cloud serves v2 ({short_digest(digest_of(v2_model))}), "
                                       f"device holds {short_digest(digest_of(v1_model))}") for r in results)
        assert calls == 1  # refused once; the other images did not ask again within skew_retry_seconds
        assert caplog.text.count("version skew: cloud serves") == 2  # at start and at the refusal, not per image
        streamed = DeviceRuntime.start(device_cfg("stream", cloud.port, tmp_path / "c2"))
        try:
            assert wait_until(lambda: streamed.active is not None and streamed.active.complete, 60)
            answers = [streamed.classify_tensor(x) for x in xs]
        finally:
            streamed.close()
        with torch.no_grad():
            want = [int(v2_model(x.unsqueeze(0))[-1].argmax()) for x in xs]
        assert all(a.answered_by == "cloud" and not a.degraded and a.model_digest == digest_of(v2_model)
                   for a in answers)
        assert [a.class_id for a in answers] == want
    finally:
        cloud.stop()


def test_a_device_that_downloads_its_checkpoint_follows_the_cloud_to_a_new_version(small_model, tmp_path):
    v1_model, v2_model = decisive(small_model, 1), decisive(small_model, 2)
    cloud = cloud_on(save(v1_model, tmp_path / "v1.pt"), model_version="v1", keep_versions=1)
    try:
        runtime = DeviceRuntime.start(device_cfg("cloud", cloud.port, tmp_path / "c"))
        try:
            x = torch.randn(3, SIZE, SIZE)
            assert runtime.classify_tensor(x).model_digest == digest_of(v1_model)
            cloud.models.add(ServedModel.from_file(str(save(v2_model, tmp_path / "v2.pt")), "spinn", "v2"), (2,))
            skewed = runtime.classify_tensor(x)
            assert skewed.degraded and skewed.reason.startswith("version skew")
            assert wait_until(lambda: runtime.active.ref.digest == digest_of(v2_model), 30)
            after = runtime.classify_tensor(x)
        finally:
            runtime.close()
        with torch.no_grad():
            assert after.class_id == int(v2_model(x.unsqueeze(0))[-1].argmax())
        assert after.answered_by == "cloud" and after.model_digest == digest_of(v2_model) and not after.degraded
    finally:
        cloud.stop()


def test_rollout_every_answer_is_its_own_versions_and_nothing_is_lost(small_model, tmp_path):
    """Cloud serves v1 from a folder; a streaming device answers a steady flow; v2 is dropped in the folder, later
    v1 is removed. Every answer equals the offline prediction of the version it names; the device ends on v2
    and deletes v1's cached package once v2 is verified."""
    models = {"v1": decisive(small_model, 1), "v2": decisive(small_model, 2)}
    digests = {digest_of(m): label for label, m in models.items()}
    folder = tmp_path / "models"
    folder.mkdir()
    save(models["v1"], folder / "v1.pt")
    # a head is usable only with all its planes: answers at the split then come from 16-bit weights, which never
    # flip these models' top-1, so each answer can be compared with its version's full model exactly
    cloud = cloud_on(folder, model_dir_poll_seconds=0.2, delivery_usable_planes=15)
    xs = [torch.randn(3, SIZE, SIZE) for _ in range(8)]
    with torch.no_grad():
        want = {label: [int(m(x.unsqueeze(0))[-1].argmax()) for x in xs] for label, m in models.items()}
    runtime = DeviceRuntime.start(device_cfg("stream", cloud.port, tmp_path / "cache"))
    answers, errors, stop = [], [], threading.Event()

    def flow():
        i = 0
        while not stop.is_set():
            try:
                answers.append((i % len(xs), runtime.classify_tensor(xs[i % len(xs)])))
            except Exception as err:  # lost: asserted below
                errors.append(repr(err))
            i += 1

    loop = threading.Thread(target=flow)
    try:
        loop.start()
        assert wait_until(lambda: runtime.active is not None and runtime.active.complete, 60)
        save(models["v2"], folder / "v2.pt")
        v2 = digest_of(models["v2"])
        assert wait_until(lambda: runtime.active.ref.digest == v2 and runtime.active.complete, 60)
        (folder / "v1.pt").unlink()
        assert wait_until(lambda: [v.digest for v in cloud.models.versions()] == [v2], 20)
        time.sleep(0.5)  # answers after v1 is gone
        # v1's package is deleted after v2's last swap: wait for it before closing, which would stop that
        assert wait_until(lambda: len(list((tmp_path / "cache").rglob("manifest.pb"))) == 1, 30)
    finally:
        stop.set()
        loop.join(30)
        runtime.close()
        cloud.stop()
    assert not errors and len(answers) > 20
    seen = set()
    for i, result in answers:
        label = digests[result.model_digest]  # a KeyError would be an answer from neither version
        seen.add(label)
        assert not result.degraded, result.reason
        assert result.class_id == want[label][i], (label, result)
    assert seen == {"v1", "v2"} and digests[answers[-1][1].model_digest] == "v2"
    cached = [p.parent.name for p in (tmp_path / "cache").rglob("manifest.pb")]
    assert len(cached) == 1  # v1's package deleted after v2's final digest was verified
