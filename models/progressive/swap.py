"""Swapping received weights into a serving model without touching the one requests are running on."""

from __future__ import annotations

import torch

def _own_copy(module: torch.nn.Module) -> torch.nn.Module:
    # Shares every submodule and tensor; the dicts below are its own. Not copy.copy: it sets each attribute
    # through Module.__setattr__ (an isinstance check against Parameter each); in a replay of the quickstart
    # stream this made a chunk's swap 0.93 ms instead of 0.69 ms of Python under the GIL.
    new = module.__class__.__new__(module.__class__)
    new.__dict__.update(module.__dict__)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = dict(module._modules)
    return new


def updated_model(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of ``model`` whose state-dict entries ``tensors`` are replaced; everything else is shared.

    ``model`` itself is not modified, so requests still running on it are unaffected: swapping the returned
    model in with one reference store is atomic for readers. Tensors are moved to the model's device.
    """
    # Path copying: only the modules on the way to a changed tensor are copied (a few per chunk), the rest
    # of the tree is shared; a full copy of MobileNetV2's tree costs ~7 ms of Python under the GIL per swap.
    new = _own_copy(model)
    copies: dict[str, torch.nn.Module] = {"": new}

    def owned(path: str) -> torch.nn.Module:
        if path not in copies:
            parent_path, _, name = path.rpartition(".")
            parent = owned(parent_path)
            parent._modules[name] = copies[path] = _own_copy(parent._modules[name])
        return copies[path]

    device = next(model.parameters()).device
    for name, value in tensors.items():
        owner, _, attr = name.rpartition(".")
        module = owned(owner)
        value = value.to(device)
        if attr in module._parameters:
            module._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
        else:
            module._buffers[attr] = value
    return new
