"""Decoding a whole constriction ANS stream with a bound on its work: one helper for both ANS users (the learned
bottleneck's code, models/bottleneck_codec.py, and the context-modelled weight planes, models/progressive/context.py).
"""

from __future__ import annotations

import numpy as np


class AnsStreamError(ValueError):
    """The words are not an ANS stream of exactly the symbols asked for; the message says why."""


def decode_exactly(words: np.ndarray, model, params: np.ndarray) -> np.ndarray:
    """Decode ``len(params)`` symbols (one per row of the model parameters ``params``) from ``words`` (uint32)
    with the constriction model family ``model``; AnsStreamError when constriction refuses the input (a Rust
    panic included) or words are left over."""
    import constriction

    try:
        decoder = constriction.stream.stack.AnsCoder(words)
        symbols = decoder.decode(model, params)
    except Exception as err:  # constriction's complaints about its input (ValueError, ...)
        raise AnsStreamError(f"not an ANS stream of {len(params)} symbols ({err})") from None
    except BaseException as err:  # a Rust panic surfaces as pyo3's PanicException, a BaseException
        if type(err).__name__ != "PanicException":
            raise
        raise AnsStreamError(f"not an ANS stream of {len(params)} symbols ({err})") from None
    if not decoder.is_empty():
        raise AnsStreamError(f"data left after {len(params)} symbols")
    return np.asarray(symbols)
