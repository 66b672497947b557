"""Coarser final precision (``snr_db``, cloud key ``delivery_snr_db``): each layer keeps only the planes its output
channels need for a signal-to-noise floor; the rest are all zero, and every side (package, delta, the weights a
device names) agrees on the weights that gives."""

import grpc
import numpy as np
import pytest
import torch

from cloud.server import CloudConfig
from models.config import ConfigError
from models.progressive import Decoder, ProgressiveError, build_package
from models.progressive.delta import build_delta_package, final_weights, weights_digest
from models.progressive.planes import dequantize, quantize
from proto import spinn_v1_pb2 as pb
from proto.manifest import manifest_from_message, manifest_message, package_digest_of, seal
from proto import spinn_v1_pb2_grpc as pb_grpc
from models.checkpoint import checkpoint_metadata
from tests.conftest import NAMES, PREPROCESS
from tests.test_delta import fine_tuned
from tests.test_delta_wire import memory_cloud

META = {"model_config": {}, "class_names": NAMES, "preprocess": {}}


def channel_snr_db(weight: torch.Tensor, approx: np.ndarray) -> np.ndarray:
    w = weight.detach().double().reshape(weight.shape[0], -1).numpy()
    noise = ((w - approx.reshape(w.shape)) ** 2).sum(axis=1)
    return 10 * np.log10((w ** 2).sum(axis=1) / np.maximum(noise, 1e-300))


@pytest.mark.parametrize("snr_db", [30.0, 50.0])
def test_every_channel_keeps_the_floor_and_the_planes_below_it_are_zero(small_model, snr_db):
    coarsened = 0
    for name, t in small_model.state_dict().items():
        if t.dim() < 2:
            continue
        mag, neg, scales = quantize(t, 16, snr_db)
        exact, _, _ = quantize(t, 16)
        if t.dim() == 4 and t.shape[1] == 1:
            assert np.array_equal(mag, exact), name  # depthwise kernels stay exact
            continue
        assert channel_snr_db(t, dequantize(mag, neg, scales, 0)).min() >= snr_db, name
        low = int(np.bitwise_or.reduce(mag, axis=None) & -np.bitwise_or.reduce(mag, axis=None)).bit_length() - 1
        coarsened += low > 0  # the lowest plane any weight uses
    assert coarsened > 10  # most layers lost planes (a floor that changed nothing would pass the rest)


def test_a_package_with_a_floor_is_smaller_and_ends_on_its_weights(small_model):
    state = small_model.state_dict()
    exact = build_package(state, META, "spinn", "1", 5, small_model.exit_points, "split")
    coarse = build_package(state, META, "spinn", "1", 5, small_model.exit_points, "split", snr_db=40.0)
    assert coarse.manifest.total_bytes < 0.8 * exact.manifest.total_bytes
    decoder = Decoder(coarse.manifest)
    for i, payload in enumerate(coarse.payloads):
        decoder.apply(i, payload)
    assert decoder.digest() == coarse.manifest.final_sha256 == weights_digest(state, 16, 40.0)
    assert coarse.manifest.final_sha256 != exact.manifest.final_sha256
    want = final_weights(state, 16, 40.0)
    assert all(torch.equal(decoder.state_dict()[n], want[n]) for n in want)


def test_a_delta_with_a_floor_ends_on_the_full_package_weights(small_model):
    v1, v2 = small_model.state_dict(), fine_tuned(small_model).state_dict()
    delta = build_delta_package(v2, final_weights(v1, 16, 40.0), META, "spinn", "2", 5, small_model.exit_points,
                                snr_db=40.0)
    assert delta.manifest.base_sha256 == weights_digest(v1, 16, 40.0)
    assert delta.manifest.final_sha256 == weights_digest(v2, 16, 40.0)


@pytest.mark.parametrize("value", [-1.0, 201.0, float("nan")])
def test_a_bad_floor_names_the_key(value):
    with pytest.raises(ConfigError, match="delivery_snr_db"):
        CloudConfig(checkpoint="x.pt", delivery_snr_db=value).validate()


def test_the_cloud_builds_with_its_floor(small_model, tmp_path):
    cloud = memory_cloud(small_model, tmp_path, delivery_snr_db=40.0)
    channel = grpc.insecure_channel(f"127.0.0.1:{cloud.port}")
    try:
        manifest = pb_grpc.ModelDeliveryStub(channel).GetManifest(pb.ManifestRequest(split_point=5), timeout=60)
        assert manifest.final_sha256 == weights_digest(small_model.state_dict(), 16, 40.0)
    finally:
        channel.close()
        cloud.stop()


def floored_delta(model):
    """A sealed delta at a 40 dB floor from ``model`` to a fine-tune of it, with the metadata a device checks."""
    v2 = fine_tuned(model)
    meta = checkpoint_metadata(v2, NAMES, PREPROCESS)
    package = build_delta_package(v2.state_dict(), final_weights(model.state_dict(), 16, 40.0), meta, "spinn", "2",
                                  5, model.exit_points, snr_db=40.0)
    seal(package.manifest)
    return package, v2


def test_a_floored_delta_decodes_bit_exact_after_the_wire_and_needs_its_zero_planes(small_model):
    package, v2 = floored_delta(small_model)
    base = final_weights(small_model.state_dict(), 16, 40.0)
    message = manifest_message(package.manifest)
    assert any(t.zero_planes for t in message.tensors)
    digests = []
    for keep in (True, False):
        if not keep:
            for t in message.tensors:
                t.zero_planes = 0
            message.package_digest = package_digest_of(message)
        decoder = Decoder(manifest_from_message(message), base)
        for i, payload in enumerate(package.payloads):
            decoder.apply(i, payload)
        digests.append(decoder.digest())
    assert digests[0] == weights_digest(v2.state_dict(), 16, 40.0) != digests[1]


@pytest.mark.parametrize("where, value", [("planes", -1), ("planes", 15), ("raw", 1)])
def test_zero_planes_out_of_range_are_refused_naming_the_field(small_model, where, value):
    message = manifest_message(floored_delta(small_model)[0].manifest)  # a delta: at most 14 on 16-bit weights
    entry = next(t for t in message.tensors if t.planes == (where == "planes"))
    entry.zero_planes = value
    message.package_digest = package_digest_of(message)  # re-sealed, as a hostile cloud would
    with pytest.raises(ProgressiveError, match="zero_planes"):
        manifest_from_message(message)
