"""The learned codec on the wire: a device sends its bottleneck's code, the cloud restores the activation with the
decoder; every malformed or misplaced code gets its gRPC status naming the field. Real gRPC on loopback."""

from __future__ import annotations

import copy

import grpc
import numpy as np
import pytest
import torch
import zstandard

from models.checkpoint import load_checkpoint, save_checkpoint
from models.config import ConfigError
from models.partition import head, tail
from models.checkpoint import checkpoint_metadata
from models.progressive import Decoder, build_package
from proto.manifest import manifest_from_message, manifest_message, seal
from proto import spinn_v1_pb2 as pb
from proto import spinn_v1_pb2_grpc as pb_grpc
from proto.codec import CodecSpec, encode, encode_code_message
from tests.conftest import BOTTLENECK, BOTTLENECK_SPLIT, NAMES, PREPROCESS, SIZE, with_bottleneck
from tests.test_device import device, start_cloud

LEARNED = CodecSpec("learned", "ans")


@pytest.fixture
def sharp_bottleneck_checkpoint(small_model, tmp_path):
    """The bottleneck model with every norm layer's statistics those of random inputs: its answers then depend
    on the input (with small_model's random statistics the deep layers wash it out), so a wrong activation
    shows in the answer."""
    model = with_bottleneck(copy.deepcopy(small_model))  # small_model stays the plain ``checkpoint``
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: the statistics of the one batch below
    model.train()
    with torch.no_grad():
        torch.manual_seed(2)
        model(torch.randn(64, 3, SIZE, SIZE))
    model.eval()
    path = tmp_path / "sharp_bottleneck.pt"
    save_checkpoint(path, model, NAMES, PREPROCESS)
    return path


@pytest.fixture
def bn_cloud(sharp_bottleneck_checkpoint):
    running = start_cloud(sharp_bottleneck_checkpoint)
    yield running
    running.stop()


def test_the_cloud_announces_learned_where_the_bottleneck_is(sharp_bottleneck_checkpoint, checkpoint, bn_cloud):
    with grpc.insecure_channel(f"127.0.0.1:{bn_cloud.port}") as channel:
        info = pb_grpc.InferenceStub(channel).GetModelInfo(pb.ModelInfoRequest(), timeout=10)
    codecs = {s.split_point: CodecSpec.from_message(s.default_codec).name for s in info.split_points}
    assert codecs[BOTTLENECK_SPLIT] == "learned+ans"
    assert {name for s, name in codecs.items() if s != BOTTLENECK_SPLIT} == {"int8+zstd"}
    assert pb.Codec.LEARNED in info.quantizations and pb.Codec.ANS in info.compressions
    shapes = {s.split_point: list(s.code_shape) for s in info.split_points if s.code_shape}
    assert shapes == {BOTTLENECK_SPLIT: [BOTTLENECK.channels, 2, 2]}
    plain = start_cloud(checkpoint)  # no bottleneck: nothing learned announced
    try:
        with grpc.insecure_channel(f"127.0.0.1:{plain.port}") as channel:
            info = pb_grpc.InferenceStub(channel).GetModelInfo(pb.ModelInfoRequest(), timeout=10)
    finally:
        plain.stop()
    assert {CodecSpec.from_message(s.default_codec).name for s in info.split_points} == {"int8+zstd"}
    assert pb.Codec.LEARNED not in info.quantizations and not any(s.code_shape for s in info.split_points)


def test_a_device_sends_its_code_and_gets_the_models_answer(sharp_bottleneck_checkpoint, bn_cloud):
    runtime = device(sharp_bottleneck_checkpoint, bn_cloud.port, split_point=BOTTLENECK_SPLIT,
                     z_confidence_threshold=1.0, top_k=3)
    plain = device(sharp_bottleneck_checkpoint, bn_cloud.port, split_point=BOTTLENECK_SPLIT,
                   z_confidence_threshold=1.0, top_k=3, codec="int8+zstd")
    model = load_checkpoint(sharp_bottleneck_checkpoint).model
    try:
        assert runtime.codec.name == "learned+ans"  # the cloud's default at the bottleneck's split
        differs = set()
        for i in range(8):
            torch.manual_seed(100 + i)
            x = torch.randn(3, SIZE, SIZE)
            result, other = runtime.classify_tensor(x), plain.classify_tensor(x)
            with torch.no_grad():
                want = torch.softmax(model(x.unsqueeze(0))[-1][0], -1).topk(3)  # through the bottleneck
                activation = head(model, BOTTLENECK_SPLIT)(x.unsqueeze(0)).activation
                direct = torch.softmax(tail(model, BOTTLENECK_SPLIT)(activation)[-1][0], -1)
            assert result.answered_by == "cloud" and not result.degraded, result.reason
            assert [c for c, _, _ in result.top_k] == want.indices.tolist()
            np.testing.assert_allclose([p for _, _, p in result.top_k], want.values.numpy(), atol=1e-5)
            assert result.bytes_sent < other.bytes_sent  # the code, not the activation
            differs.add(int(direct.argmax()) != result.class_id)
        assert differs == {True, False} or differs == {True}  # the decoder's answer is not the plain activation's
    finally:
        runtime.close()
        plain.close()
    assert bn_cloud.servicer.counts["OK"] == 16


def request(checkpoint_path, features: pb.Tensor, split_point: int = BOTTLENECK_SPLIT) -> pb.FeatureRequest:
    digest = load_checkpoint(checkpoint_path).digest
    return pb.FeatureRequest(request_id="r", model=pb.ModelRef(digest=digest), split_point=split_point,
                             features=features, top_k=1)


def good_code(batch: int = 1) -> torch.Tensor:
    torch.manual_seed(3)
    return torch.randint(-4, 5, (batch, BOTTLENECK.channels, 2, 2), dtype=torch.int32)


def code_message(model, code: torch.Tensor, spec: CodecSpec = LEARNED) -> pb.Tensor:
    return encode_code_message(code, spec, model.bottleneck.code_counts)


def _mutations(model) -> list[tuple[str, pb.Tensor, grpc.StatusCode, str]]:
    """(what, features, expected status, field its detail names)."""
    ok = code_message(model, good_code())
    out = []

    def variant(what: str, code: grpc.StatusCode, field: str, **change) -> None:
        msg = copy.deepcopy(ok)
        for key, value in change.items():
            if key == "shape":
                del msg.shape[:]
                msg.shape.extend(value)
            elif key == "compression":
                msg.codec.compression = value
            else:
                setattr(msg, key, value)
        out.append((what, msg, code, field))

    invalid = grpc.StatusCode.INVALID_ARGUMENT
    variant("channels", invalid, "features.shape", shape=[1, BOTTLENECK.channels + 1, 2, 2])
    variant("spatial", invalid, "features.shape", shape=[1, BOTTLENECK.channels, 3, 2])
    variant("rank", invalid, "features.shape", shape=[BOTTLENECK.channels, 2, 2])
    variant("batch over max_batch", invalid, "features.shape", shape=[10_000, BOTTLENECK.channels, 2, 2])
    variant("truncated", invalid, "features.data", data=ok.data[:-4])
    variant("not whole words", invalid, "features.data", data=ok.data + b"\x01")
    variant("garbage", invalid, "features.data", data=bytes(range(7, 47)))
    variant("empty", invalid, "features.data", data=b"")
    variant("zlib", invalid, "features.codec.compression", compression=pb.Codec.ZLIB)
    variant("dtype", invalid, "features.dtype", dtype="float32")
    zstd = code_message(model, good_code(), CodecSpec("learned", "zstd"))
    out.append(("zstd out of range", pb.Tensor(shape=zstd.shape, dtype="int8", codec=zstd.codec,
                                               data=zstandard.ZstdCompressor().compress(
                                                   bytes([100]) * (BOTTLENECK.channels * 4))),
                invalid, "features.data"))
    return out


def test_malformed_codes_are_refused_naming_the_field(sharp_bottleneck_checkpoint, bn_cloud):
    model = load_checkpoint(sharp_bottleneck_checkpoint).model
    with grpc.insecure_channel(f"127.0.0.1:{bn_cloud.port}") as channel:
        stub = pb_grpc.InferenceStub(channel)
        good = stub.Infer(request(sharp_bottleneck_checkpoint, code_message(model, good_code())), timeout=10)
        assert good.images[0].top_k[0].class_id >= 0
        for what, features, code, field in _mutations(model):
            with pytest.raises(grpc.RpcError) as err:
                stub.Infer(request(sharp_bottleneck_checkpoint, features), timeout=10)
            assert err.value.code() == code, what
            assert field in err.value.details(), (what, err.value.details())
        # the same code at a split without the bottleneck: the model cannot decode it there
        with pytest.raises(grpc.RpcError) as err:
            stub.Infer(request(sharp_bottleneck_checkpoint, code_message(model, good_code()), split_point=5),
                       timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "bottleneck" in err.value.details() and f"split point {BOTTLENECK_SPLIT}" in err.value.details()
        # and a learned request is still answered after all that
        assert stub.Infer(request(sharp_bottleneck_checkpoint, code_message(model, good_code(2))),
                          timeout=10).images
    assert bn_cloud.servicer.counts["OK"] == 2


def test_learned_asked_of_a_model_without_bottleneck_is_a_failed_precondition(checkpoint, small_model):
    cloud = start_cloud(checkpoint)
    model = with_bottleneck(copy.deepcopy(small_model))  # only to make a well-formed code
    try:
        with grpc.insecure_channel(f"127.0.0.1:{cloud.port}") as channel:
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.InferenceStub(channel).Infer(request(checkpoint, code_message(model, good_code())),
                                                     timeout=10)
    finally:
        cloud.stop()
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "has none" in err.value.details()


def test_an_activation_codec_still_works_at_the_bottlenecks_split(sharp_bottleneck_checkpoint, bn_cloud):
    model = load_checkpoint(sharp_bottleneck_checkpoint).model
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        activation = head(model, BOTTLENECK_SPLIT)(x).activation
        want = int(tail(model, BOTTLENECK_SPLIT)(activation)[-1].argmax())
    with grpc.insecure_channel(f"127.0.0.1:{bn_cloud.port}") as channel:
        reply = pb_grpc.InferenceStub(channel).Infer(
            request(sharp_bottleneck_checkpoint, encode(activation, CodecSpec("float32", "none"))), timeout=10)
    assert reply.images[0].top_k[0].class_id == want


def test_device_config_learned_without_a_bottleneck_names_the_key(checkpoint, sharp_bottleneck_checkpoint,
                                                                  bn_cloud):
    with pytest.raises(ConfigError, match="'codec'.*split_point 9.*has none"):
        device(checkpoint, bn_cloud.port, codec="learned+ans")
    with pytest.raises(ConfigError, match="'codec'.*split_point 5.*one at split point 8"):
        device(sharp_bottleneck_checkpoint, bn_cloud.port, codec="learned+ans", split_point=5)
    with pytest.raises(ConfigError, match="'input_codec'"):
        device(checkpoint, bn_cloud.port, input_codec="learned+ans")
    with pytest.raises(ConfigError, match="'codec'"):
        device(checkpoint, bn_cloud.port, codec="learned+zlib")


def test_other_splits_and_models_fall_back_to_an_activation_codec(checkpoint, sharp_bottleneck_checkpoint,
                                                                   bn_cloud):
    """The cloud announces learned at its bottleneck's split; a device whose model has no bottleneck there (an
    older version) sends int8+zstd, and the scheduler plans with what is really sent."""
    runtime = device(sharp_bottleneck_checkpoint, bn_cloud.port, split_point=9)
    try:
        names = runtime.codec_names()
        assert names[BOTTLENECK_SPLIT] == "learned+ans" and names[9] == "int8+zstd"
    finally:
        runtime.close()
    runtime = device(checkpoint, bn_cloud.port, split_point=BOTTLENECK_SPLIT, z_confidence_threshold=1.0)
    try:
        assert runtime.codec.name == "learned+ans"  # what the cloud announced ...
        assert runtime.codec_names()[BOTTLENECK_SPLIT] == "int8+zstd"  # ... but this model cannot make a code
        result = runtime.classify_tensor(torch.randn(3, SIZE, SIZE))
    finally:
        runtime.close()
    # sent as int8+zstd and refused only for the version skew (another model), not for its codec
    assert result.degraded and "INVALID_ARGUMENT" not in result.reason


def test_the_package_carries_the_encoder_in_the_head_and_the_decoder_in_the_rest(sharp_bottleneck_checkpoint):
    ckpt = load_checkpoint(sharp_bottleneck_checkpoint)
    model = ckpt.model
    metadata = checkpoint_metadata(model, ckpt.class_names, ckpt.preprocess)
    parts = {}
    for split in (BOTTLENECK_SPLIT, BOTTLENECK_SPLIT - 1):
        package = build_package(model.state_dict(), metadata, "m", "v", split, model.exit_points)
        parts[split] = {t.name: t.part for t in package.manifest.tensors}
        manifest = manifest_from_message(manifest_message(seal(package.manifest)))  # as a device reads it
        decoder = Decoder(manifest)
        for i, payload in enumerate(package.payloads[:manifest.usable_chunk + 1]):  # the head, usable
            decoder.apply(i, payload)
        counts = decoder.tensors(["bottleneck.code_counts"]).get("bottleneck.code_counts")
        if split == BOTTLENECK_SPLIT:  # what the device needs to send its code arrived with the head
            assert counts is not None and counts.dtype == torch.int32
            assert torch.equal(counts, model.bottleneck.code_counts)
        for i, payload in list(enumerate(package.payloads))[manifest.usable_chunk + 1:]:
            decoder.apply(i, payload)
        assert torch.equal(decoder.tensors(["bottleneck.code_counts"])["bottleneck.code_counts"],
                           model.bottleneck.code_counts)
    here = parts[BOTTLENECK_SPLIT]
    assert here["bottleneck.code_counts"] == "head" and here["bottleneck.encoder.1.weight"] == "head"
    assert {p for n, p in here.items() if n.startswith("bottleneck.decoder.")} == {"rest"}
    before = parts[BOTTLENECK_SPLIT - 1]  # a head that ends before the bottleneck cannot send its code
    assert {p for n, p in before.items() if n.startswith("bottleneck.")} == {"rest"}


def test_the_profile_measures_the_learned_path_and_the_scheduler_plans_with_it(sharp_bottleneck_checkpoint):
    """At the bottleneck's split the profile has the learned codes' sizes and rows whose uploads are answered
    through the decoder (the model's own forward); the other codecs' rows answer them without it; a learned
    codec is planned with the learned rows."""
    from torch.utils.data import DataLoader, TensorDataset

    from device.scheduler import Conditions, predict
    from models.offline_profile import build_profile

    model = load_checkpoint(sharp_bottleneck_checkpoint).model
    torch.manual_seed(4)
    x, y = torch.randn(40, 3, SIZE, SIZE), torch.randint(0, 10, (40,))
    with torch.no_grad():  # every label one of the two paths' answers, so that they score differently
        through = model(x)[-1].argmax(1)
        plain = tail(model, BOTTLENECK_SPLIT)(head(model, BOTTLENECK_SPLIT)(x).activation)[-1].argmax(1)
    y = torch.where(torch.arange(40) % 2 == 0, through, plain)
    prof = build_profile(model, DataLoader(TensorDataset(x, y), batch_size=16), SIZE, "top1", [0.0, 1.0],
                         "m.pt", (0.5,) * 3, (0.25,) * 3, bytes_images=8)
    entry = prof.split(BOTTLENECK_SPLIT)
    assert {"learned+ans", "learned+zstd"} <= set(entry.bytes)
    assert entry.bytes["learned+ans"].mean < entry.bytes["int8+zstd"].mean
    assert all(not s.learned_rows for s in prof.splits if s.split_point != BOTTLENECK_SPLIT)
    last, learned = entry.rows[-1], entry.learned_rows[-1]  # threshold 1.0: every image uploaded
    assert learned.accuracy == pytest.approx(float((through == y).float().mean()))
    assert last.accuracy == pytest.approx(float((plain == y).float().mean()))
    assert learned.changed == int(((through == y) != (plain == y)).sum())  # against the model's own final
    assert learned.accuracy != last.accuracy
    cond = Conditions.from_link(1e6, 40.0)
    for codec, row in (("learned+ans", learned), ("int8+zstd", last)):
        pair = next(c for c in predict(prof, cond, {BOTTLENECK_SPLIT: codec}, [BOTTLENECK_SPLIT])
                    if c.threshold == 1.0)
        assert pair.accuracy == pytest.approx(row.accuracy)
