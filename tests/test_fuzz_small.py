"""The fuzz harness (bench/fuzz.py) at a small size against real daemons built in this process: every answer is
OK or a documented status, and both daemons still answer afterwards. The full-size run is the benchmark."""

import copy

import pytest

from bench.fuzz import fuzz_cloud, fuzz_device, hostile_image, IMAGE_KINDS, MUTATIONS, serving
from cloud.inference import ServedModel
from cloud.server import CloudConfig, build_server
from device.config import DeviceConfig
from device.runtime import DeviceRuntime
from device.server import build_server as build_device_server
from models.checkpoint import save_checkpoint
from models.config import ConfigError, from_dict
from tests.conftest import BOTTLENECK_SPLIT, NAMES, PREPROCESS, with_bottleneck
from tests.test_device import start_cloud


@pytest.fixture
def bottleneck_checkpoint(small_model, tmp_path):
    """small_model with a bottleneck at BOTTLENECK_SPLIT: learned codes cross the wire too."""
    path = tmp_path / "bottleneck.pt"
    save_checkpoint(path, with_bottleneck(copy.deepcopy(small_model)), NAMES, PREPROCESS)
    return path


def test_fuzzing_both_daemons_gets_only_documented_answers(bottleneck_checkpoint):
    checkpoint = bottleneck_checkpoint
    cfg = CloudConfig(checkpoint=str(checkpoint), address="127.0.0.1:0", log_level="WARNING")
    cloud = build_server(cfg, ServedModel.from_file(str(checkpoint), cfg.model_id, cfg.model_version))
    dcfg = from_dict(DeviceConfig, {"checkpoint": str(checkpoint), "cloud": f"127.0.0.1:{cloud.port}",
                                    "listen": "127.0.0.1:0", "split_point": BOTTLENECK_SPLIT,
                                    "max_image_bytes": 1 << 20, "log_level": "WARNING"})
    device = build_device_server(dcfg, DeviceRuntime.start(dcfg))
    try:
        requests = fuzz_cloud(f"127.0.0.1:{cloud.port}", 4 * (len(MUTATIONS) + 1), seed=1)
        images = fuzz_device(f"127.0.0.1:{device.port}", 3 * len(IMAGE_KINDS), seed=1)
        assert serving(f"127.0.0.1:{cloud.port}") and serving(f"127.0.0.1:{device.port}")
    finally:
        device.stop()
        cloud.stop()
    assert requests["unexpected"] == [] and images["unexpected"] == []
    assert set(requests["by_mutation"]) == {*MUTATIONS, "raw_bytes"}
    assert requests["by_mutation"]["dtype"] == {"INVALID_ARGUMENT": 4}
    assert set(requests["by_mutation"]["learned"]) <= {"INVALID_ARGUMENT", "FAILED_PRECONDITION"}
    # an empty id or label is harmless (the digest names the model); another one is refused
    assert set(requests["by_mutation"]["model"]) <= {"FAILED_PRECONDITION", "OK"}
    assert set(requests["by_mutation"]["digest"]) <= {"FAILED_PRECONDITION", "INVALID_ARGUMENT"}
    assert images["by_kind"]["valid"] == {"OK": 3} and images["by_kind"]["thin"] == {"INVALID_ARGUMENT": 3}
    # Over max_image_bytes: gRPC refuses the message itself (its receive limit follows max_image_bytes).
    assert images["by_kind"]["bytes"] == {"RESOURCE_EXHAUSTED": 3}
    assert images["by_kind"]["empty"] == {"INVALID_ARGUMENT": 3}


def test_the_hostile_images_are_what_they_claim():
    import random

    from device.images import ImageError, decode_image

    rng = random.Random(0)
    for kind, words in (("thin", "max_image_aspect"), ("pixels", "max_image_pixels"), ("bytes", "max_image_bytes")):
        data = hostile_image(kind, rng)
        try:
            decode_image(data, 1 << 20, 40_000_000)
        except ImageError as err:
            assert words in str(err)
        else:
            raise AssertionError(f"{kind} image decoded")
    assert len(hostile_image("thin", rng)) < 100_000


def test_load_and_overload_harness_at_a_small_size(checkpoint):
    from bench.load import overload, steady

    cfg = CloudConfig(checkpoint=str(checkpoint), address="127.0.0.1:0", log_level="WARNING", max_in_flight=4,
                      max_infer_streams=1, max_delivery_calls=1, rpc_threads=10, max_queue_delay_ms=20.0)
    cloud = build_server(cfg, ServedModel.from_file(str(checkpoint), cfg.model_id, cfg.model_version))
    address = f"127.0.0.1:{cloud.port}"
    try:
        calm = steady(address, 4, 10)
        flood = overload(address, 8 * calm["throughput_rps"], 1.5)
        assert serving(address)
    finally:
        cloud.stop()
    assert calm["codes"] == {"OK": 40}
    # Every call answered or refused by the server: a CANCELLED one (dropped before the server saw it) fails this.
    assert flood["answered"] + flood["refused"] == flood["issued"], flood["codes"]
    assert flood["refused"] > 0 and flood["health_checks"] > 5


def test_the_pending_call_bound_reaches_grpc_core(checkpoint):
    """With ``max_pending_calls`` set, core drops the flood's excess from its queue (CANCELLED): the keys are
    spelt as core reads them (an unknown key is ignored silently, which the underscore spelling once was)."""
    from bench.load import overload, steady

    cfg = CloudConfig(checkpoint=str(checkpoint), address="127.0.0.1:0", log_level="WARNING", max_in_flight=4,
                      max_infer_streams=1, max_delivery_calls=1, rpc_threads=10, max_queue_delay_ms=20.0, max_pending_calls=1)
    cloud = build_server(cfg, ServedModel.from_file(str(checkpoint), cfg.model_id, cfg.model_version))
    address = f"127.0.0.1:{cloud.port}"
    try:
        calm = steady(address, 4, 10)
        flood = overload(address, 8 * calm["throughput_rps"], 1.5)
    finally:
        cloud.stop()
    assert flood["ended"] == flood["issued"] and flood["cancelled"] > 0, flood["codes"]


def test_max_pending_calls_must_be_positive(checkpoint):
    with pytest.raises(ConfigError, match="max_pending_calls"):
        CloudConfig(checkpoint=str(checkpoint), max_pending_calls=0).validate()


def test_delivery_fuzz_at_a_small_size(checkpoint):
    """bench/fuzz.py --delivery at a small size: a device streaming through a proxy that mutates manifests and
    weight messages answers every image, stays SERVING and writes nothing outside its cache."""
    import random

    from bench.fuzz import hostile_image
    from bench.fuzz_delivery import fuzz_delivery

    cloud = start_cloud(checkpoint, built_in_thread=True, delivery_chunk_bytes=4096)
    try:
        result = fuzz_delivery(f"127.0.0.1:{cloud.port}", hostile_image("valid", random.Random(0)), 14, seed=1)
    finally:
        cloud.stop()
    assert not result["unexpected"] and result["device_serving_after"], result
    assert result["device_log"]["tracebacks"] == 0 and result["device_log"]["manifest_refusals_logged"] > 0
