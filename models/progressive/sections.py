"""Byte-level pieces of a chunk: zstd-or-raw sections, packed bits, raw tensors (byte-shuffled, float32 halves)."""

from __future__ import annotations

import io
import struct
from typing import Optional

import numpy as np
import torch
import zstandard

from models.progressive.format import ProgressiveError

SECTION = struct.Struct("<BI")  # flag (0 raw, 1 zstd), payload length
RAW, ZSTD = 0, 1
DTYPES = {"float32": (torch.float32, np.float32), "int64": (torch.int64, np.int64),
           "int32": (torch.int32, np.int32)}
INT_CODES = {"int64": "<i8", "int32": "<i4"}  # raw integer tensors (counters, a bottleneck's frequency table)
HALF_MIDDLE = np.uint16(0x8000)  # the middle of the interval the missing low half of a float32 spans


def section(data: bytes) -> bytes:
    packed = zstandard.ZstdCompressor(level=19).compress(data) if len(data) > 16 else data
    if len(packed) < len(data):
        return SECTION.pack(ZSTD, len(packed)) + packed
    return SECTION.pack(RAW, len(data)) + data


def read_section(buf: io.BytesIO, max_bytes: int, what: str) -> bytes:
    head = buf.read(SECTION.size)
    if len(head) != SECTION.size:
        raise ProgressiveError(f"{what}: truncated section header")
    flag, length = SECTION.unpack(head)
    payload = buf.read(length)
    if len(payload) != length or flag not in (RAW, ZSTD):
        raise ProgressiveError(f"{what}: malformed section")
    if flag == RAW:
        return payload
    try:
        out = zstandard.ZstdDecompressor().decompress(payload, max_output_size=max_bytes)
    except zstandard.ZstdError as err:
        raise ProgressiveError(f"{what}: {err}") from None
    if len(out) > max_bytes:
        raise ProgressiveError(f"{what}: section decodes to more bytes than the tensor allows")
    return out


def unpack_bits(data: bytes, count: int, what: str) -> np.ndarray:
    if len(data) != (count + 7) // 8:
        raise ProgressiveError(f"{what}: {len(data)} bytes for {count} bits")
    return np.unpackbits(np.frombuffer(data, np.uint8), count=count).astype(bool)


def raw_bytes(tensor: torch.Tensor) -> bytes:
    array = tensor.detach().cpu().contiguous().numpy()
    return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def raw_size(shape: tuple[int, ...], dtype: str) -> int:
    """Bytes of ``raw_bytes`` of a tensor of ``shape`` and ``dtype`` (a ``DTYPES`` key)."""
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[dtype][1]).itemsize


def from_raw_bytes(data: bytes, offset: int, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
    """The tensor ``raw_bytes`` wrote at ``offset`` of ``data`` (``raw_size(shape, dtype)`` bytes), a copy."""
    kind = np.dtype(DTYPES[dtype][1])
    array = np.frombuffer(data, kind.newbyteorder("<"), raw_size(shape, dtype) // kind.itemsize, offset)
    return torch.from_numpy(array.astype(kind).reshape(shape))


def shuffle(data: bytes, itemsize: int) -> bytes:
    # Byte i of every value, then byte i+1, ...: exponents and high bytes line up and zstd finds them (a
    # lossless trick from blosc; measured 7-8 % smaller BatchNorm sections than zstd alone).
    return np.frombuffer(data, np.uint8).reshape(-1, itemsize).T.tobytes()


def unshuffle(data: bytes, itemsize: int) -> bytes:
    return np.frombuffer(data, np.uint8).reshape(itemsize, -1).T.tobytes()


def halves(tensor: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(high, low) 16-bit halves (uint16 arrays) of a float32 tensor's bit patterns."""
    bits = tensor.detach().cpu().contiguous().numpy().astype("<f4", copy=False).view("<u4").reshape(-1)
    return (bits >> 16).astype(np.uint16), (bits & 0xFFFF).astype(np.uint16)


def join_halves(high: np.ndarray, low: Optional[np.ndarray]) -> np.ndarray:
    """float32 values from their high halves and the low ones (None: missing, filled at the middle of their
    interval, except for +-0 which stays exact)."""
    if low is None:
        low = np.where(high & 0x7FFF, HALF_MIDDLE, np.uint16(0))
    return ((high.astype(np.uint32) << 16) | low.astype(np.uint32)).view(np.float32)
