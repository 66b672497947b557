"""The feature codec: float32 activations <-> ``spinn.v1.Tensor`` messages. One implementation for both sides.

Encoding is quantisation (float32 / float16 / affine int8 / affine int4, per tensor or per channel) followed
by lossless compression (none / zlib / zstd). Decoding validates everything a client could get wrong and
raises ``CodecError`` naming the offending field, so a server can answer INVALID_ARGUMENT with that text.

A learned bottleneck's code (``learned+ans`` / ``learned+zstd``) is not an activation: the device's encoder made
it and only the model's decoder restores the activation. ``encode_code_message`` / ``decode_code_message`` carry
it (the payload coder is ``models.bottleneck_codec``); ``decode`` refuses it.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import zstandard
from PIL import Image

from models.bottleneck_codec import CodeError, decode_code, encode_code
from proto import spinn_v1_pb2 as pb

Q = pb.Codec.Quantization
C = pb.Codec.Compression

#: Refuse to decompress more than this many bytes (a "zip bomb" cannot exhaust memory).
MAX_DECODED_BYTES = 256 * 1024 * 1024

_LEVELS = {Q.INT8: 255, Q.INT4: 15}
LEARNED_CODERS = ("ans", "zstd")


class CodecError(ValueError):
    """A tensor message cannot be decoded; the message names the field (e.g. ``features.data``)."""


@dataclass(frozen=True)
class CodecSpec:
    """A codec choice: ``quantization`` in float32/float16/int8/int4, ``compression`` in none/zlib/zstd; or
    ``learned`` (a bottleneck's code) with ``ans`` or ``zstd``."""

    quantization: str = "int8"
    compression: str = "zstd"
    per_channel: bool = False

    def __post_init__(self) -> None:
        if self.quantization == "learned":
            if self.compression not in LEARNED_CODERS or self.per_channel:
                raise ValueError(f"codec learned takes compression ans/zstd (no -pc), got {self.name!r}")
            return
        if self.quantization not in ("float32", "float16", "int8", "int4"):
            raise ValueError(f"codec quantization must be float32/float16/int8/int4/learned, got "
                             f"{self.quantization!r}")
        if self.compression not in ("none", "zlib", "zstd"):
            raise ValueError(f"codec compression must be none/zlib/zstd, got {self.compression!r}")

    @property
    def learned(self) -> bool:
        """A bottleneck's code: needs the head's encoder to make it and the tail's decoder to read it."""
        return self.quantization == "learned"

    @property
    def name(self) -> str:
        """``int8+zstd``, ``int4-pc+zlib`` (``-pc``: per-channel scales), ..."""
        return f"{self.quantization}{'-pc' if self.per_channel else ''}+{self.compression}"

    @classmethod
    def from_name(cls, name: str) -> "CodecSpec":
        """Inverse of ``name``; raises ValueError for a malformed name."""
        quant, sep, compression = name.partition("+")
        if not sep:
            raise ValueError(f"codec name {name!r} is not QUANT[-pc]+COMPRESSION (e.g. int8+zstd)")
        per_channel = quant.endswith("-pc")
        return cls(quant[:-3] if per_channel else quant, compression, per_channel)

    @classmethod
    def from_message(cls, msg: pb.Codec, per_channel: bool = False) -> "CodecSpec":
        """The spec a ``Codec`` message announces (e.g. ModelInfo's default codec); raises ValueError."""
        try:
            quant, compression = Q.Name(msg.quantization), C.Name(msg.compression)
        except ValueError:
            raise ValueError(f"codec {msg.quantization}/{msg.compression} is not a known codec") from None
        return cls(quant.lower(), compression.lower(), per_channel)

    def message(self) -> pb.Codec:
        """The codec as announced in ModelInfo (no scale/zero point: those are per tensor)."""
        return pb.Codec(quantization=getattr(Q, self.quantization.upper()),
                        compression=getattr(C, self.compression.upper()))


def _compress(raw: bytes, compression: str) -> bytes:
    if compression == "zlib":
        return zlib.compress(raw, 6)
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(raw)
    return raw


def _decompress(data: bytes, compression: int, expected: int, field: str) -> bytes:
    if expected > MAX_DECODED_BYTES:
        raise CodecError(f"{field}.shape: decoded size {expected} bytes exceeds the limit {MAX_DECODED_BYTES}")
    try:
        if compression == C.NONE:
            raw = data
        elif compression == C.ZLIB:
            d = zlib.decompressobj()
            raw = d.decompress(data, expected + 1)
            if not d.eof and len(raw) <= expected:
                raise CodecError(f"{field}.data: truncated zlib stream")
        elif compression == C.ZSTD:
            # A bounded read: a frame that claims or expands to more than the shape needs is refused unread.
            with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)) as reader:
                raw = reader.read(expected + 1)
        else:
            raise CodecError(f"{field}.codec.compression: unknown compression {compression}")
    except (zlib.error, zstandard.ZstdError) as err:
        raise CodecError(f"{field}.data: corrupt compressed data ({err})") from None
    if len(raw) != expected:
        raise CodecError(f"{field}.data: decodes to {len(raw)} bytes, shape and codec need {expected}")
    return raw


def encode(x: torch.Tensor, spec: CodecSpec) -> pb.Tensor:
    """Encode a float activation ``x`` of shape ``(B, C, H, W)`` (any float dtype/device) into a message."""
    if spec.learned:
        raise ValueError("codec learned encodes a bottleneck's code: use encode_code_message")
    a = x.detach().to("cpu", torch.float32).contiguous().numpy()
    if a.ndim != 4 and spec.per_channel:
        raise ValueError(f"per-channel quantisation needs a (B, C, H, W) tensor, got shape {a.shape}")
    codec = spec.message()
    if spec.quantization == "float32":
        codec.quantization = Q.FLOAT32
        raw = a.astype("<f4").tobytes()
    elif spec.quantization == "float16":
        codec.quantization = Q.FLOAT16
        raw = a.astype("<f2").tobytes()
    else:
        q_type = Q.INT8 if spec.quantization == "int8" else Q.INT4
        levels = _LEVELS[q_type]
        axes = (0, 2, 3) if spec.per_channel else None
        lo = a.min(axis=axes, keepdims=True) if a.size else np.zeros(1, np.float32)
        hi = a.max(axis=axes, keepdims=True) if a.size else np.zeros(1, np.float32)
        scale = np.maximum((hi - lo) / levels, np.float32(1e-12)).astype(np.float32)
        zero_point = np.round(-lo / scale).astype(np.float32)
        q = np.clip(np.round(a / scale + zero_point), 0, levels).astype(np.uint8)
        if q_type == Q.INT4:
            flat = q.reshape(-1)
            if flat.size % 2:
                flat = np.concatenate([flat, np.zeros(1, np.uint8)])
            q = flat[0::2] | (flat[1::2] << 4)
        codec.quantization = q_type
        codec.scale.extend(scale.reshape(-1).tolist())
        codec.zero_point.extend(zero_point.reshape(-1).tolist())
        raw = q.tobytes()
    return pb.Tensor(shape=list(a.shape), dtype="float32", codec=codec, data=_compress(raw, spec.compression))


def decode(msg: pb.Tensor, field: str = "features", max_bytes: int = MAX_DECODED_BYTES) -> torch.Tensor:
    """Decode a message into a float32 tensor of ``msg.shape``; raises CodecError naming the bad field.

    Checks: dtype, shape (positive dims), codec enums, affine parameter counts and finiteness, byte count,
    corrupt compression, and NaN/Inf in the decoded values.
    """
    if msg.dtype != "float32":
        raise CodecError(f"{field}.dtype: only 'float32' is supported, got {msg.dtype!r}")
    shape = tuple(int(d) for d in msg.shape)
    if not shape or any(d <= 0 for d in shape):
        raise CodecError(f"{field}.shape: every dimension must be positive, got {list(shape)}")
    n = int(np.prod(shape, dtype=np.int64))
    codec = msg.codec
    bytes_per = {Q.FLOAT32: 4.0, Q.FLOAT16: 2.0, Q.INT8: 1.0, Q.INT4: 0.5}.get(codec.quantization)
    if codec.quantization == Q.JPEG:
        raise CodecError(f"{field}.codec.quantization: JPEG is for the input at split point 0 only")
    if codec.quantization == Q.LEARNED:
        raise CodecError(f"{field}.codec.quantization: LEARNED is a bottleneck's code, not an activation")
    if bytes_per is None:
        raise CodecError(f"{field}.codec.quantization: unknown quantization {codec.quantization}")
    expected = int(np.ceil(n * bytes_per))
    if expected > max_bytes:
        raise CodecError(f"{field}.shape: {list(shape)} decodes to {expected} bytes, over the limit {max_bytes}")
    raw = _decompress(msg.data, codec.compression, expected, field)
    if codec.quantization == Q.FLOAT32:
        a = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    elif codec.quantization == Q.FLOAT16:
        a = np.frombuffer(raw, dtype="<f2").astype(np.float32)
    else:
        q = np.frombuffer(raw, dtype=np.uint8)
        if codec.quantization == Q.INT4:
            q = np.stack([q & 0x0F, q >> 4], axis=1).reshape(-1)[:n]
        channels = shape[1] if len(shape) >= 2 else 1
        count = len(codec.scale)
        if count not in (1, channels) or len(codec.zero_point) != count:
            raise CodecError(f"{field}.codec.scale: need 1 or {channels} scale and zero_point values, "
                             f"got {count} and {len(codec.zero_point)}")
        scale = np.asarray(codec.scale, np.float32)
        zero = np.asarray(codec.zero_point, np.float32)
        if not (np.isfinite(scale).all() and np.isfinite(zero).all()) or (scale <= 0).any():
            raise CodecError(f"{field}.codec.scale: scale must be finite and > 0, zero_point finite")
        view = (1, count) + (1,) * (len(shape) - 2) if count > 1 else (1,)
        a = ((q.reshape(shape).astype(np.float32) - zero.reshape(view)) * scale.reshape(view)).reshape(-1)
    if not np.isfinite(a).all():
        raise CodecError(f"{field}.data: contains NaN or Inf")
    return torch.from_numpy(a.reshape(shape).copy())


def encode_jpeg(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], quality: int = 90) -> pb.Tensor:
    """Encode a normalised model input ``(1, 3, H, W)`` as a JPEG file of the image (split point 0 only)."""
    pixels = (x.detach().to("cpu", torch.float32)[0] * torch.tensor(std)[:, None, None]
              + torch.tensor(mean)[:, None, None]).clamp(0, 1).mul(255).round().to(torch.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels.permute(1, 2, 0).numpy(), "RGB").save(buf, format="JPEG", quality=quality)
    return pb.Tensor(shape=list(x.shape), dtype="float32", data=buf.getvalue(),
                     codec=pb.Codec(quantization=Q.JPEG, compression=C.NONE))


def decode_jpeg(msg: pb.Tensor, mean: tuple[float, ...], std: tuple[float, ...], field: str = "features"
                ) -> torch.Tensor:
    """Decode a JPEG-coded input into the normalised ``(1, 3, H, W)`` float32 tensor of ``msg.shape``.

    The image size is read from the header and must equal the shape before any pixel is decoded (a
    decompression bomb cannot pass). Raises CodecError naming the bad field.
    """
    shape = tuple(int(d) for d in msg.shape)
    if len(shape) != 4 or shape[:2] != (1, 3) or min(shape) <= 0:
        raise CodecError(f"{field}.shape: a JPEG input is (1, 3, H, W), got {list(shape)}")
    if msg.codec.compression != C.NONE:
        raise CodecError(f"{field}.codec.compression: a JPEG input takes NONE")
    try:
        image = Image.open(io.BytesIO(msg.data), formats=["JPEG"])
        if image.size != (shape[3], shape[2]):
            raise CodecError(f"{field}.data: JPEG of {image.size[0]}x{image.size[1]} px, shape needs "
                             f"{shape[3]}x{shape[2]}")
        rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise CodecError(f"{field}.data: not a readable JPEG ({err})") from None
    x = (torch.from_numpy(rgb).permute(2, 0, 1) - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None,
                                                                                                         None]
    return x.unsqueeze(0).contiguous()


def encode_code_message(code: torch.Tensor, spec: CodecSpec, counts: torch.Tensor) -> pb.Tensor:
    """A bottleneck's integer code ``(B, c, H, W)`` (``BottleneckEncoder.code``) as a LEARNED message coded with
    ``spec.compression`` (``ans`` under the frequency table ``counts`` ``(c, 2 * code_max + 1)``, or ``zstd``)."""
    if not spec.learned:
        raise ValueError(f"encode_code_message needs a learned codec, got {spec.name!r}")
    payload = encode_code(code, spec.compression, counts)  # type: ignore[arg-type]
    return pb.Tensor(shape=list(code.shape), dtype="int8", data=payload, codec=spec.message())


def decode_code_message(msg: pb.Tensor, counts: torch.Tensor, field: str = "features") -> torch.Tensor:
    """The integer code ``(B, c, H, W)`` int32 of a LEARNED message, under the frequency table ``counts``
    ``(c, 2 * code_max + 1)`` (its ``c`` is the only channel count accepted). The caller checks B, H and W
    against the split. Raises CodecError naming the field; bounded in time and memory by ``shape``."""
    if msg.codec.quantization != Q.LEARNED:
        raise CodecError(f"{field}.codec.quantization: a bottleneck code is LEARNED, got {msg.codec.quantization}")
    coder = {C.ANS: "ans", C.ZSTD: "zstd"}.get(msg.codec.compression)
    if coder is None:
        raise CodecError(f"{field}.codec.compression: LEARNED takes ANS or ZSTD, got {msg.codec.compression}")
    if msg.dtype != "int8":
        raise CodecError(f"{field}.dtype: a LEARNED code is 'int8', got {msg.dtype!r}")
    try:
        return decode_code(msg.data, tuple(int(d) for d in msg.shape), coder, counts)  # type: ignore[arg-type]
    except CodeError as err:  # it names ``shape`` or ``payload``, which travels as ``data``
        text = str(err)
        raise CodecError(f"{field}.{'data' + text[7:] if text.startswith('payload') else text}") from None


def encoded_size(msg: pb.Tensor) -> int:
    """Bytes of the serialised message (what crosses the network for the tensor)."""
    return msg.ByteSize()
