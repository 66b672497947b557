"""Everything the library creates follows the model's device and dtype.

A GPU is not at hand in CI, so the same mistake a CUDA model would expose (an input or a probe tensor made on
the CPU in float32 regardless of the model) is caught here with a float64 model (a float32 tensor fed to it
raises) and a model on the ``meta`` device (a CPU tensor mixed with it raises; nothing is computed).
"""

import torch
from torch.utils.data import DataLoader, TensorDataset

import test as evaluation
from cloud.inference import ServedModel, run_tail
from device.config import DeviceConfig
from device.runtime import DeviceRuntime
from models.calibration import calibrate
from models.checkpoint import Checkpoint
from models.config import from_dict
from models.datasets import Preprocess
from models.early_exit import EarlyExitMobileNetV2, ModelConfig
from models.partition import head, profile, tail
from proto.codec import CodecSpec, decode, encode
from tests.conftest import NAMES, SIZE

PRE = Preprocess(SIZE, SIZE, (0.5,) * 3, (0.25,) * 3)


def float32_images(n: int = 8) -> DataLoader:
    torch.manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 3, SIZE, SIZE), torch.randint(0, 10, (n,))), batch_size=4)


def test_flops_and_profiles_on_the_meta_device():
    config = ModelConfig(width_mult=0.35, num_classes=10, exits=[0.15, 0.45])
    reference = EarlyExitMobileNetV2(config)
    with torch.device("meta"):
        model = EarlyExitMobileNetV2(config)  # resolving FLOPs fractions already walks the network here
    assert next(model.parameters()).is_meta and model.exit_points == reference.exit_points
    assert model.flops(SIZE) == reference.flops(SIZE)
    assert [p.activation_shape for p in profile(model, SIZE)] == [p.activation_shape for p in profile(reference, SIZE)]


def test_evaluation_calibration_and_split_on_a_float64_model(small_model):
    model = small_model.double()
    assert profile(model, SIZE)[9].activation_shape == tuple(model.flops(SIZE).activation_shapes[9])
    loader = float32_images()
    cache, stats = evaluation.cache_outputs(model, loader, 9, "top1", torch.device("cpu"))
    assert cache.device_confidence.shape == (len(cache.exit_points), 8) and stats.correct.shape[1] == 8
    calibrate(model, loader, torch.device("cpu"))
    x = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64)
    with torch.no_grad():
        part = head(model, 9)(x)
        whole = model(x)
        for a, b in zip(tail(model, 9)(part.activation), whole[len(part.exit_logits):]):
            assert a.dtype == torch.float64
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        # The codec's round trip hands float32 to the cloud, which must feed the model in its own dtype.
        wire = decode(encode(part.activation, CodecSpec("float32", "none")), "features")
    served = ServedModel.from_checkpoint(Checkpoint(model, NAMES, PRE), "m", "1")
    torch.testing.assert_close(run_tail(served, 9, wire)[-1], whole[-1].float(), rtol=1e-5, atol=1e-5)


def test_device_runtime_feeds_a_float64_model(small_model, checkpoint):
    model = small_model.double()  # in place of the float32 one the file would give
    cfg = from_dict(DeviceConfig, {"checkpoint": str(checkpoint), "split_point": 19, "z_confidence_threshold": 0.0})
    runtime = DeviceRuntime(cfg, Checkpoint(model, NAMES, PRE), None, CodecSpec("float32", "none"))
    try:
        result = runtime.classify_tensor(torch.randn(3, SIZE, SIZE))  # float32, as decoded images are
    finally:
        runtime.close()
    assert result.answered_by == f"device:exit-{model.exit_points[0]}" and 0.0 < result.confidence <= 1.0
