"""The bottleneck's code payload: integer code tensor <-> bytes, two ways. Pure functions, both sides use them.

- ``ans``: every value entropy-coded with ``constriction``'s ANS coder under its channel's learned frequency
  table (``Bottleneck.code_counts``, integers stored in the checkpoint, so device and cloud build bit-identical
  models). The payload is the coder's 32-bit words, little-endian.
- ``zstd``: the values as int8 bytes (``(B, c, H, W)`` C order), zstd-compressed: no learned prior needed.

Decoding takes the shape the caller expects (the cloud knows it from the model: ``(B, c, H, W)``) and checks
everything a hostile or broken sender could get wrong; a bad payload raises ``CodeError`` (a ValueError) naming
the field (``payload`` or ``shape``), never hangs, crashes or allocates more than the shape needs. Integrity is
the transport's job: an ANS stream that was altered yet still decodes to exactly ``prod(shape)`` symbols and ends
in the coder's initial state is accepted (its values are still within ``[-code_max, code_max]``).
"""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
import torch
import zstandard
from torch import Tensor

from models.ans import AnsStreamError, decode_exactly

Coder = Literal["ans", "zstd"]
CODERS: tuple[str, ...] = ("ans", "zstd")

#: The largest code a payload may describe (values): 16 Mi, i.e. 16 MiB as int8.
MAX_CODE_VALUES = 1 << 24


class CodeError(ValueError):
    """A code payload or its shape is invalid; the message names the field."""


def _check_counts(counts: Tensor) -> np.ndarray:
    """The frequency table ``(c, K)`` as float64 probabilities (exact: counts over a power-of-two total)."""
    if counts.ndim != 2 or counts.shape[1] % 2 != 1 or counts.shape[1] > 255:
        raise CodeError(f"code_counts: need (channels, 2 * code_max + 1 <= 255), got {tuple(counts.shape)}")
    table = counts.detach().cpu().to(torch.float64).numpy()
    if not (table > 0).all():
        raise CodeError("code_counts: every frequency must be > 0")
    return table / table.sum(axis=1, keepdims=True)


def _check_shape(shape: tuple[int, ...], channels: int | None) -> int:
    """Validate a code shape ``(B, c, H, W)``; returns its number of values."""
    if len(shape) != 4 or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in shape):
        raise CodeError(f"shape: need 4 ints (B, c, H, W), got {shape!r}")
    if any(d < 1 for d in shape):
        raise CodeError(f"shape: every dimension must be >= 1, got {tuple(shape)}")
    n = int(np.prod(shape, dtype=np.int64))
    if n > MAX_CODE_VALUES:
        raise CodeError(f"shape: {tuple(shape)} holds {n} values, more than the limit {MAX_CODE_VALUES}")
    if channels is not None and shape[1] != channels:
        raise CodeError(f"shape: {shape[1]} channels, the bottleneck's code has {channels}")
    return n


def _symbols_and_models(shape: tuple[int, ...], probs: np.ndarray) -> np.ndarray:
    """Per value (C order of ``(B, c, H, W)``), the probability row of its channel: ``(n, K)`` float64."""
    b, c, h, w = shape
    channel = np.broadcast_to(np.arange(c).reshape(1, c, 1), (b, c, h * w)).reshape(-1)
    return np.ascontiguousarray(probs[channel])


def encode_code(code: Tensor, coder: Coder, counts: Tensor) -> bytes:
    """Encode an integer code ``(B, c, H, W)`` (values in ``[-code_max, code_max]``, ``counts`` of shape
    ``(c, 2 * code_max + 1)``) to payload bytes. Raises CodeError for a code out of range or of the wrong shape."""
    import constriction

    if coder not in CODERS:
        raise CodeError(f"coder: must be one of {CODERS}, got {coder!r}")
    probs = _check_counts(counts)
    code_max = probs.shape[1] // 2
    _check_shape(tuple(code.shape), probs.shape[0])
    values = code.detach().cpu().to(torch.int64).numpy()
    if values.size and (values.min() < -code_max or values.max() > code_max):
        raise CodeError(f"code: values must be in [-{code_max}, {code_max}], got [{values.min()}, {values.max()}]")
    if coder == "zstd":
        return zstandard.ZstdCompressor(level=19).compress(values.astype(np.int8).tobytes())
    model = constriction.stream.model.Categorical(perfect=False)
    encoder = constriction.stream.stack.AnsCoder()
    symbols = (values.reshape(-1) + code_max).astype(np.int32)
    encoder.encode_reverse(symbols, model, _symbols_and_models(code.shape, probs))
    return encoder.get_compressed().astype("<u4").tobytes()


def decode_code(payload: bytes, shape: tuple[int, int, int, int], coder: Coder, counts: Tensor) -> Tensor:
    """Decode payload bytes to the integer code of ``shape`` ``(B, c, H, W)``: int32 tensor in
    ``[-code_max, code_max]``. Raises CodeError naming ``payload``, ``shape`` or ``coder``."""
    import constriction

    if coder not in CODERS:
        raise CodeError(f"coder: must be one of {CODERS}, got {coder!r}")
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise CodeError(f"payload: must be bytes, got {type(payload).__name__}")
    payload = bytes(payload)
    probs = _check_counts(counts)
    code_max = probs.shape[1] // 2
    n = _check_shape(tuple(shape), probs.shape[0])
    if coder == "zstd":
        raw = _zstd_bounded(payload, n)
        values = np.frombuffer(raw, dtype=np.int8).astype(np.int32)
        if values.min() < -code_max or values.max() > code_max:
            raise CodeError(f"payload: values outside [-{code_max}, {code_max}]")
        return torch.from_numpy(values.reshape(shape).copy())
    if not payload:
        raise CodeError("payload: empty (an ANS stream holds at least its final 32-bit state)")
    # Each symbol costs at most 24 bits under constriction's 24-bit fixed point; anything longer is not a code.
    if len(payload) % 4 or len(payload) > 4 * (n + 2):
        raise CodeError(f"payload: {len(payload)} bytes is not a whole number of 32-bit words of at most "
                        f"{4 * (n + 2)} bytes for {n} values")
    words = np.frombuffer(payload, dtype="<u4").astype(np.uint32)
    try:
        symbols = decode_exactly(words, constriction.stream.model.Categorical(perfect=False),
                                 _symbols_and_models(tuple(shape), probs))
    except AnsStreamError as err:
        raise CodeError(f"payload: corrupt ANS stream of this code ({err})") from None
    values = symbols.astype(np.int32) - code_max
    return torch.from_numpy(values.reshape(shape).copy())


def _zstd_bounded(payload: bytes, expected: int) -> bytes:
    """Decompress at most ``expected + 1`` bytes of a zstd frame; CodeError unless exactly ``expected`` come out."""
    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(payload)) as reader:
            raw = reader.read(expected + 1)
    except zstandard.ZstdError as err:
        raise CodeError(f"payload: corrupt zstd data ({err})") from None
    if len(raw) != expected:
        raise CodeError(f"payload: decodes to {len(raw)} bytes, the shape needs {expected}")
    return raw
