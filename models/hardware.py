"""Where torch runs: one rule for every command (CUDA when present and allowed, else CPU)."""

from __future__ import annotations

import torch


from models.config import ConfigError


def resolve_device(name: str, key: str = "device") -> torch.device:
    """``auto`` -> cuda if torch sees a GPU else cpu; ``cpu``; ``cuda`` (ConfigError naming ``key`` if absent)."""
    if name not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"config key '{key}': must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config key '{key}': cuda requested but torch sees no CUDA device")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def follow(x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    """``x`` moved to the device and floating dtype of ``module``'s first parameter (a model on CUDA, in
    float64 or float16 gets inputs it can take; a no-op when they already match)."""
    first = next(module.parameters())
    return x.to(device=first.device, dtype=first.dtype if x.is_floating_point() else x.dtype)
