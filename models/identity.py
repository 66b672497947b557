"""A model's content identity: one SHA-256 over everything that defines its function.

Split inference runs one network in two places: a device head and a cloud tail from two different models give
confident garbage. Names (``model_id``, ``model_version``) are free text a user forgets to change, so every
request carries this digest instead, and the cloud answers only from the tail of the model it names.

The digest covers the metadata that rebuilds the network (``models.checkpoint.checkpoint_metadata``: model config
with exits and temperatures, class names, preprocessing) and every tensor of its state dict (weights and buffers)
with its name, dtype and shape. It hashes the tensors' bytes in place, so it costs what hashing the checkpoint
file costs. Tensors are hashed in their in-memory byte order, little-endian on every platform torch ships for.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Mapping

import torch

#: Bumped if what the digest covers ever changes (then old and new digests never collide by accident).
DIGEST_SCHEME = b"spinn-model-digest/1\n"
#: Hex characters of the short form: the default version label when a checkpoint has none.
SHORT_DIGEST = 12
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def model_digest(metadata: Mapping, state_dict: Mapping[str, torch.Tensor]) -> str:
    """Hex SHA-256 of ``metadata`` (JSON with sorted keys) and every tensor of ``state_dict`` in name order.

    ``metadata``: ``{"model_config", "class_names", "preprocess"}`` as ``checkpoint_metadata`` returns it (other
    keys are ignored, so a checkpoint's metrics or training state never change its identity).
    """
    h = hashlib.sha256(DIGEST_SCHEME)
    defining = {k: metadata[k] for k in ("model_config", "class_names", "preprocess")}
    h.update(json.dumps(defining, sort_keys=True, separators=(",", ":")).encode())
    names = sorted(state_dict)
    tensors = [state_dict[n].detach() for n in names]
    # one header with every name, dtype and shape, then the bytes in the same order: a per-tensor update would
    # cost more than the hashing itself for the many small BatchNorm tensors
    h.update("\n".join(f"{n}|{t.dtype}|{list(t.shape)}" for n, t in zip(names, tensors)).encode())
    for tensor in tensors:
        h.update(_bytes_of(tensor))
    return h.hexdigest()


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """The tensor's elements as raw bytes, without a copy when it is already a contiguous CPU tensor."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        tensor = tensor.cpu().contiguous()
    try:
        return memoryview(tensor.numpy()).cast("B")
    except TypeError:  # a dtype numpy has no type for (bfloat16): its bytes as uint8
        return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def short_digest(digest: str) -> str:
    """The first SHORT_DIGEST hex characters: a readable version label (``a3f09c1e22b4``)."""
    return digest[:SHORT_DIGEST]


def check_digest(value: str, field: str) -> str:
    """``value`` if it is a full hex SHA-256 (64 lowercase hex characters); ValueError naming ``field`` otherwise."""
    if not _HEX64.match(value):
        shown = value if len(value) <= 80 else value[:80] + "..."
        raise ValueError(f"{field}: a model digest is 64 lowercase hex characters (SHA-256), got {shown!r} "
                         f"({len(value)} characters)")
    return value
