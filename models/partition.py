"""Splitting an early-exit network at a block boundary into a device head and a cloud tail.

``head(model, s)`` and ``tail(model, s)`` are real ``nn.Module``s whose parameters *are* the model's (slices
of the same ``nn.Sequential``, no copies), so ``tail(s)(head(s)(x).activation)`` reproduces ``model(x)``.

A model with a learned bottleneck (``models.bottleneck``) at ``s``: the head also outputs the integer code
(``HeadOutput.code``) and the tail holds the decoder, so ``tail(s)(tail(s).decode(head(s)(x).code))``
reproduces ``model(x)`` (which goes through the bottleneck).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from models.bottleneck import Bottleneck
from models.early_exit import REFERENCE_INPUT_SIZE, EarlyExitMobileNetV2, run_segment


def check_split_point(model: EarlyExitMobileNetV2, split_point: int) -> None:
    """Raise ValueError naming ``split_point`` unless it is a boundary 0..N."""
    if isinstance(split_point, bool) or not isinstance(split_point, int):
        raise ValueError(f"split_point must be an int, got {split_point!r}")
    if not 0 <= split_point <= model.num_blocks:
        raise ValueError(f"split_point {split_point} is outside 0..{model.num_blocks}")


@dataclass
class HeadOutput:
    """What the device computes: the activation at the split (``(B, C, H, W)``) and its exits' logits; with a
    bottleneck at the split also its integer code (``(B, c, H, W)`` int32, what is sent), else None."""

    activation: Tensor
    exit_logits: list[Tensor]
    code: Optional[Tensor] = None


def bottleneck_at(model: EarlyExitMobileNetV2, split_point: int) -> Optional[Bottleneck]:
    """The model's bottleneck if it sits at ``split_point``, else None."""
    b = model.bottleneck
    return b if b is not None and b.config.split_point == split_point else None


class Head(nn.Module):
    """Device side of split ``s``: blocks ``[0, s)`` and the exits at boundaries ``<= s``.

    ``forward(x: (B, 3, H, W)) -> HeadOutput``.
    """

    def __init__(self, model: EarlyExitMobileNetV2, split_point: int) -> None:
        super().__init__()
        check_split_point(model, split_point)
        self.split_point = split_point
        self.blocks = model.features[:split_point]
        self.exit_points = [k for k in model.exit_points if k <= split_point]
        self.exits = nn.ModuleList(model.exit_map()[k] for k in self.exit_points)
        bottleneck = bottleneck_at(model, split_point)
        self.encoder = bottleneck.encoder if bottleneck is not None else None  # only the device's half

    def forward(self, x: Tensor) -> HeadOutput:
        activation, logits = run_segment(
            self.blocks, dict(zip(self.exit_points, self.exits)), x, 0, self.split_point
        )
        code = self.encoder.code(activation) if self.encoder is not None else None
        return HeadOutput(activation, logits, code)

    def steps(self, x: Tensor, clock: Optional[Callable[[str, int], None]] = None
              ) -> Iterator[tuple[int, Tensor, Optional[Tensor]]]:
        """Run the head one block at a time, so a caller can stop at a confident exit.

        Yields ``(boundary, activation (B, C, H, W), exit logits (B, classes) or None)`` for boundaries
        1..split_point; the ops are those of ``forward`` (``run_segment`` per block, then the exit). ``clock``
        is called as ``clock("block", k)`` after block k and ``clock("exit", boundary)`` after an exit head,
        so a caller can time the two apart.
        """
        exits = dict(zip(self.exit_points, self.exits))
        for k in range(self.split_point):
            x, _ = run_segment(self.blocks, {}, x, k, k + 1)
            if clock is not None:
                clock("block", k)
            logits = exits[k + 1](x) if k + 1 in exits else None
            if clock is not None and logits is not None:
                clock("exit", k + 1)
            yield k + 1, x, logits


class Tail(nn.Module):
    """Cloud side of split ``s``: blocks ``[s, N)``, the exits at boundaries ``> s`` and the final classifier.

    ``forward(activation: (B, C, H, W)) -> list[(B, classes)]``: later exits in order, then the final logits.
    """

    def __init__(self, model: EarlyExitMobileNetV2, split_point: int) -> None:
        super().__init__()
        check_split_point(model, split_point)
        self.split_point = split_point
        # Keep the full-model block indices: run_segment indexes blocks by boundary.
        self.blocks = model.features
        self.exit_points = [k for k in model.exit_points if k > split_point]
        self.exits = nn.ModuleList(model.exit_map()[k] for k in self.exit_points)
        self.final = model.final
        bottleneck = bottleneck_at(model, split_point)
        self.decoder = bottleneck.decoder if bottleneck is not None else None  # only the cloud's half

    def decode(self, code: Tensor) -> Tensor:
        """The activation ``(B, C, H, W)`` restored from a bottleneck code ``(B, c, H, W)``; ValueError when the
        model has no bottleneck at this split."""
        if self.decoder is None:
            raise ValueError(f"the model has no bottleneck at split point {self.split_point}")
        return self.decoder(code)

    def forward(self, activation: Tensor) -> list[Tensor]:
        x, logits = run_segment(
            self.blocks, dict(zip(self.exit_points, self.exits)), activation, self.split_point, len(self.blocks)
        )
        logits.append(self.final(x))
        return logits

    def cloud_parameters(self) -> list[nn.Parameter]:
        """Parameters the cloud needs (blocks from the split on, later exits, final classifier)."""
        blocks = list(self.blocks[self.split_point:].parameters())
        decoder = list(self.decoder.parameters()) if self.decoder is not None else []
        return blocks + list(self.exits.parameters()) + list(self.final.parameters()) + decoder


def head(model: EarlyExitMobileNetV2, split_point: int) -> Head:
    """The device part of ``model`` at boundary ``split_point`` (shares the model's weights)."""
    return Head(model, split_point)


def tail(model: EarlyExitMobileNetV2, split_point: int) -> Tail:
    """The cloud part of ``model`` at boundary ``split_point`` (shares the model's weights)."""
    return Tail(model, split_point)


@dataclass
class SplitProfile:
    """Cost of one split point for one image.

    ``activation_shape`` is ``(C, H, W)`` at the split; ``activation_bytes`` its float32 size (bytes);
    FLOPs are 2 x MACs of conv/linear layers; params are counts.
    """

    split_point: int
    activation_shape: tuple[int, int, int]
    activation_bytes: int
    device_flops: int
    cloud_flops: int
    device_params: int
    cloud_params: int
    device_exits: list[int]


def _num_params(params: list[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


def activation_shapes(model: EarlyExitMobileNetV2, input_size: int) -> dict[int, tuple[int, int, int]]:
    """``(C, H, W)`` of the activation at every boundary 0..N for a ``3 x input_size x input_size`` image, by
    the convolution arithmetic of each block's convs (every block is a chain of convs, a residual keeping its
    shape): no forward pass, so a cloud loading a model does not compute (or hold the GIL) for it."""
    c, h, w = 3, input_size, input_size
    shapes = {0: (c, h, w)}
    for k, block in enumerate(model.features):
        for conv in (m for m in block.modules() if isinstance(m, nn.Conv2d)):
            (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
            h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
            w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
            c = conv.out_channels
        shapes[k + 1] = (c, h, w)
    return shapes


@torch.no_grad()
def profile(model: EarlyExitMobileNetV2, input_size: int = REFERENCE_INPUT_SIZE) -> list[SplitProfile]:
    """Profile every split point 0..N for one ``3 x input_size x input_size`` image.

    Device FLOPs count the blocks before the split and every device exit (a worst-case image that reaches
    the split); cloud FLOPs count the remaining blocks, later exits and the final classifier.
    """
    table = model.flops(input_size)
    profiles = []
    for s in range(model.num_blocks + 1):
        h, t = Head(model, s), Tail(model, s)
        shape = table.activation_shapes[s]
        profiles.append(
            SplitProfile(
                split_point=s,
                activation_shape=shape,  # type: ignore[arg-type]
                activation_bytes=4 * int(torch.Size(shape).numel()),
                device_flops=sum(table.blocks[:s]) + sum(f for k, f in table.exits.items() if k <= s),
                cloud_flops=sum(table.blocks[s:]) + sum(f for k, f in table.exits.items() if k > s)
                + table.final,
                device_params=_num_params(list(h.parameters())),
                cloud_params=_num_params(t.cloud_parameters()),
                device_exits=list(h.exit_points),
            )
        )
    return profiles
