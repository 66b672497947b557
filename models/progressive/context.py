"""Context-modelled coding of a bit plane (``plane_coder: context``): every bit entropy-coded with constriction's
ANS coder under a probability chosen by what the decoder already holds.

A plane of a weight tensor ``(rows, K)`` (rows = output channels) has three sections (models/progressive/planes.py):
the significance bits of the weights still zero, the signs of those that became significant, and the refinement
bits of the others. Each bit gets a *context* computed only from the planes before it, so the device computes the
same contexts before it decodes:

- significance: how many of its two neighbours in the row (``k - 1``, ``k + 1``) are significant (0-2), the share
  of its row that is significant (5 bins) and the share of its column, the same input position across output
  channels (4 bins): 60 contexts. Wide rows and columns (an input channel every output uses) become
  significant early together; a kernel position (depthwise) carries more weight in every channel.
- sign: the sign of its left neighbour if that is significant, else none: 3 contexts.
- refinement: how many magnitude bits the weight already has (1, 2, 3 or more: the first bits after the leading
  one are skewed towards 0 under a peaked distribution, later ones are near fair) times its row's bin: 15.

Per section the encoder counts each context's ones and sends the probability of a one as a 16-bit integer for every
context that occurs (the decoder knows which: it computed the contexts), then the ANS words. Semi-static, not
adaptive bit by bit: the whole section is coded in one vectorised call, which a Python loop over millions of
bits could not be. Section layout: ``uint32`` byte length, the ``uint16`` table, the ``uint32`` words.
"""

from __future__ import annotations

import io
import struct

import numpy as np

from models.ans import AnsStreamError, decode_exactly
from models.progressive.format import ProgressiveError

P_ONE = 1 << 16  # probabilities of a one travel as k / P_ONE, 1 <= k < P_ONE
_LENGTH = struct.Struct("<I")
_ROW_BINS = np.array([0.0, 1 / 64, 1 / 16, 1 / 4])  # share significant: 0, <= 1/64, <= 1/16, <= 1/4, more
_COL_BINS = np.array([0.0, 1 / 16, 1 / 4])
SIGNIFICANCE_CONTEXTS = 3 * 5 * 4
SIGN_CONTEXTS = 3
REFINEMENT_CONTEXTS = 3 * 5


def _bin(share: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """0 for exactly 0, then 1.. for each edge exceeded (``share`` > edges[i])."""
    return np.where(share > 0, np.searchsorted(edges, share, side="left"), 0)


def plane_contexts(known: np.ndarray, negative: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray,
                                                                                np.ndarray, np.ndarray]:
    """Contexts of every weight for the next plane, from the magnitude bits known so far.

    ``known`` int (numel,): the known top bits of each magnitude (0: not significant yet); ``negative`` bool
    (numel,); ``rows`` output channels. Returns ``(significant bool, significance ctx, sign ctx, refinement ctx)``,
    each (numel,); a weight's significance and sign contexts are used while it is zero, its refinement context
    after."""
    sig = (known > 0).reshape(rows, -1)
    k = sig.shape[1]
    left = np.zeros_like(sig)
    left[:, 1:] = sig[:, :-1]
    right = np.zeros_like(sig)
    right[:, :-1] = sig[:, 1:]
    neighbours = left.astype(np.int64) + right
    row_bin = np.broadcast_to(_bin(sig.mean(axis=1), _ROW_BINS)[:, None], sig.shape)
    col_bin = np.broadcast_to(_bin(sig.mean(axis=0), _COL_BINS)[None, :], sig.shape)
    significance = neighbours + 3 * (row_bin + 5 * col_bin)
    neg = negative.reshape(rows, k)
    left_sign = np.zeros(sig.shape, np.int64)
    left_sign[:, 1:] = np.where(sig[:, :-1], 1 + neg[:, :-1], 0)
    length = np.minimum(_bit_length(known.reshape(rows, k)), 3)  # 1..3 for significant weights
    refinement = np.maximum(length - 1, 0) + 3 * row_bin
    return sig.reshape(-1), significance.reshape(-1), left_sign.reshape(-1), refinement.reshape(-1)


def _bit_length(values: np.ndarray) -> np.ndarray:
    """Bits of each non-negative integer (0 for 0)."""
    out = np.zeros(values.shape, np.int64)
    v = values.astype(np.int64)
    while np.any(v):
        out += v > 0
        v >>= 1
    return out


def encode_section(bits: np.ndarray, contexts: np.ndarray, count: int) -> bytes:
    """``bits`` bool (n,) coded under ``contexts`` int (n,) in ``0..count-1``: length, table, ANS words."""
    import constriction

    if bits.size == 0:
        return _LENGTH.pack(0)
    ones = np.bincount(contexts, weights=bits, minlength=count)
    total = np.bincount(contexts, minlength=count)
    present = total > 0
    table = np.clip(np.rint((ones[present] + 0.5) / (total[present] + 1.0) * P_ONE), 1, P_ONE - 1).astype("<u2")
    p = np.zeros(count)
    p[present] = table / P_ONE
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(bits.astype(np.int32), constriction.stream.model.Bernoulli(perfect=False), p[contexts])
    body = table.tobytes() + coder.get_compressed().astype("<u4").tobytes()
    return _LENGTH.pack(len(body)) + body


def decode_section(buf: io.BytesIO, contexts: np.ndarray, count: int, what: str) -> np.ndarray:
    """The bits (bool (n,), n = ``contexts.size``) of a section ``encode_section`` wrote; ProgressiveError for a
    section that is not one (truncated, a table of another length, words that do not decode to exactly n bits)."""
    import constriction

    head = buf.read(_LENGTH.size)
    if len(head) != _LENGTH.size:
        raise ProgressiveError(f"{what}: truncated section header")
    (length,) = _LENGTH.unpack(head)
    n = contexts.size
    if n == 0:
        if length:
            raise ProgressiveError(f"{what}: a section of {length} bytes where no bits are due")
        return np.zeros(0, bool)
    present = np.bincount(contexts, minlength=count) > 0
    table_bytes = 2 * int(present.sum())
    # at most 16 bits a symbol (the rarest probability is 2**-16) and two words of state
    if length > table_bytes + 4 * (n // 2 + 3) or (length - table_bytes) % 4 or length < table_bytes:
        raise ProgressiveError(f"{what}: a section of {length} bytes cannot hold {n} bits")
    body = buf.read(length)
    if len(body) != length:
        raise ProgressiveError(f"{what}: truncated section")
    table = np.frombuffer(body[:table_bytes], "<u2")
    if (table == 0).any():
        raise ProgressiveError(f"{what}: a probability of 0 in the context table")
    p = np.zeros(count)
    p[present] = table / P_ONE
    words = np.frombuffer(body[table_bytes:], "<u4").astype(np.uint32)
    try:
        bits = decode_exactly(words, constriction.stream.model.Bernoulli(perfect=False), p[contexts])
    except AnsStreamError as err:
        raise ProgressiveError(f"{what}: {err}") from None
    return bits.astype(bool)
