import zlib

import pytest
import torch

from proto import spinn_v1_pb2 as pb
from proto.codec import CodecError, CodecSpec, decode, encode
from proto.generate import PROTO_DIR, generate


def test_generated_modules_are_current(tmp_path):
    for fresh in generate(tmp_path):
        checked_in = PROTO_DIR / fresh.name
        assert checked_in.is_file(), f"{fresh.name} missing: run python -m proto.generate"
        assert fresh.read_text() == checked_in.read_text(), f"{fresh.name} is stale: run python -m proto.generate"


@pytest.mark.parametrize("quant, tol", [("float32", 0.0), ("float16", 2e-3), ("int8", 0.5 / 255), ("int4", 0.5 / 15)])
@pytest.mark.parametrize("compression", ["none", "zlib", "zstd"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_round_trip_error_is_within_half_a_step(quant, tol, compression, per_channel):
    torch.manual_seed(0)
    x = torch.rand(2, 5, 3, 3) * 4 - 1  # range 4: quantisation step is 4/levels
    msg = encode(x, CodecSpec(quant, compression, per_channel))
    wire = pb.Tensor.FromString(msg.SerializeToString())
    y = decode(wire)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert (y - x).abs().max().item() <= tol * 4 * 1.01 + 1e-6


def test_int4_with_odd_element_count_and_constant_tensor():
    x = torch.full((1, 1, 1, 3), 0.7)
    torch.testing.assert_close(decode(encode(x, CodecSpec("int4", "none"))), x, atol=1e-6, rtol=0)


def test_codecs_shrink_the_payload():
    x = torch.relu(torch.randn(1, 32, 14, 14))  # post-ReLU6-like: many zeros
    sizes = {q: len(encode(x, CodecSpec(q, "zstd")).data) for q in ("float32", "float16", "int8", "int4")}
    assert sizes["int4"] < sizes["int8"] < sizes["float16"] < sizes["float32"]


def good():
    return encode(torch.rand(1, 2, 4, 4), CodecSpec("int8", "zlib"))


def test_truncated_zstd_is_refused():
    msg = encode(torch.rand(1, 2, 4, 4), CodecSpec("int8", "zstd"))
    msg.data = msg.data[:-3]
    with pytest.raises(CodecError, match=r"features\.data"):
        decode(msg)


@pytest.mark.parametrize("mutate, field", [
    (lambda m: setattr(m, "dtype", "int64"), "features.dtype"),
    (lambda m: m.shape.__setitem__(1, 3), "features.data"),
    (lambda m: m.shape.__setitem__(0, 0), "features.shape"),
    (lambda m: m.shape.extend([10**9]), "features.shape"),
    (lambda m: setattr(m.codec, "quantization", 99), "features.codec.quantization"),
    (lambda m: setattr(m.codec, "compression", 42), "features.codec.compression"),
    (lambda m: setattr(m, "data", b"\x00garbage"), "features.data"),
    (lambda m: setattr(m, "data", m.data[:-4]), "features.data"),
    (lambda m: m.codec.scale.append(1.0), "features.codec.scale"),
    (lambda m: m.codec.scale.__setitem__(0, float("nan")), "features.codec.scale"),
])
def test_bad_messages_name_the_field(mutate, field):
    msg = good()
    mutate(msg)
    with pytest.raises(CodecError, match=field.replace(".", r"\.")):
        decode(msg)


def test_nan_and_bombs_are_refused():
    x = torch.zeros(1, 1, 2, 2)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(CodecError, match="NaN"):
        decode(encode(x, CodecSpec("float32", "none")))
    bomb = pb.Tensor(shape=[1, 1, 2, 2], dtype="float32",
                     codec=pb.Codec(quantization=pb.Codec.FLOAT32, compression=pb.Codec.ZLIB),
                     data=zlib.compress(b"\x00" * 10_000_000))
    with pytest.raises(CodecError, match="features.data"):
        decode(bomb)
    with pytest.raises(ValueError, match="quantization"):
        CodecSpec("int3")
