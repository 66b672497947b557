"""Early-exit MobileNetV2: torchvision's backbone with light classifier exits along it.

Coordinates used everywhere in the project: the backbone is one ``nn.Sequential`` of ``N`` blocks
(``features``; N = 19 for MobileNetV2). A *boundary* ``k`` (0..N) is the point after the first ``k`` blocks;
the activation there is ``features[:k](x)``. Split points and exits are both boundaries: an exit at ``k``
reads the activation at ``k`` (valid ``k`` are 1..N-1), and a split at ``s`` puts blocks ``[0, s)`` on the
device and ``[s, N)`` in the cloud.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
import torchvision
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.ops.misc import Conv2dNormActivation

from models.bottleneck import Bottleneck, BottleneckConfig
from models.config import ConfigError

log = logging.getLogger(__name__)

#: SPINN places six exits at about these fractions of the backbone's FLOPs.
SPINN_EXIT_FRACTIONS = [0.15, 0.30, 0.45, 0.60, 0.75, 0.90]

#: Input side (px) at which FLOPs fractions and the exit budget are measured, as in the SPINN paper.
REFERENCE_INPUT_SIZE = 224


@dataclass
class ModelConfig:
    """Everything needed to rebuild the network (stored in every checkpoint).

    ``exits``: ints are boundaries (1..N-1, see module docstring); floats in (0, 1) are fractions of the
    backbone FLOPs at 224 px, resolved to the nearest boundary. ``exit_channels``: hidden width of every exit
    head, or one width per exit. ``temperatures``: one per output (the exits in boundary order, then the final
    classifier), fitted by ``models.calibration`` after training; every output's logits are divided by its
    temperature, so confidences are calibrated wherever the model runs. None: uncalibrated (all 1).
    """

    width_mult: float = 1.0
    num_classes: int = 1000
    exits: list[Union[int, float]] = field(default_factory=lambda: list(SPINN_EXIT_FRACTIONS))
    exit_channels: Union[int, list[int]] = 128
    dropout: float = 0.2
    temperatures: Optional[list[float]] = None
    bottleneck: Optional[BottleneckConfig] = None

    def exit_widths(self) -> list[int]:
        """Hidden width of each exit head, in ``exits`` order."""
        if isinstance(self.exit_channels, list):
            return list(self.exit_channels)
        return [self.exit_channels] * len(self.exits)

    def validate(self) -> None:
        if self.width_mult <= 0:
            raise ConfigError(f"config key 'width_mult': must be > 0, got {self.width_mult}")
        if self.num_classes < 2:
            raise ConfigError(f"config key 'num_classes': must be >= 2, got {self.num_classes}")
        widths = self.exit_widths()
        if len(widths) != len(self.exits):
            raise ConfigError(f"config key 'exit_channels': {len(widths)} widths for {len(self.exits)} exits")
        if any(w < 1 for w in widths):
            raise ConfigError(f"config key 'exit_channels': every width must be >= 1, got {self.exit_channels}")
        if self.temperatures is not None:
            if len(self.temperatures) != len(self.exits) + 1:
                raise ConfigError(f"config key 'temperatures': {len(self.temperatures)} values for "
                                  f"{len(self.exits)} exits + the final classifier")
            if not all(0 < t < float("inf") for t in self.temperatures):
                raise ConfigError(f"config key 'temperatures': every value must be > 0, got {self.temperatures}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"config key 'dropout': must be in [0, 1), got {self.dropout}")
        for i, e in enumerate(self.exits):
            if isinstance(e, float) and not 0.0 < e < 1.0:
                raise ConfigError(f"config key 'exits[{i}]': a FLOPs fraction must be in (0, 1), got {e}")
            if isinstance(e, int) and e < 1:
                raise ConfigError(f"config key 'exits[{i}]': a block boundary must be >= 1, got {e}")
        if self.bottleneck is not None:
            self.bottleneck.validate()


class ExitHead(nn.Sequential):
    """A cheap classifier on an intermediate activation.

    1x1 conv to ``hidden`` channels (+BN+ReLU6) at the activation's resolution, global average pool, linear.
    The 1x1 conv is what makes an early exit useful (it re-mixes low-level channels into class evidence);
    doing it before pooling costs ``H*W*C*hidden`` MACs, which stays a few percent of the backbone.

    Input ``(B, in_channels, H, W)`` float; output ``(B, num_classes)`` logits divided by ``temperature``
    (calibration; a plain attribute, not a weight).
    """

    def __init__(self, in_channels: int, hidden: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__(
            Conv2dNormActivation(in_channels, hidden, kernel_size=1, activation_layer=nn.ReLU6),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(1),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes),
        )
        self.temperature = 1.0

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) / self.temperature


class FinalClassifier(nn.Module):
    """torchvision's MobileNetV2 head: global average pool, dropout, linear. ``(B, C, H, W) -> (B, classes)``
    logits divided by ``temperature`` (as ``ExitHead``)."""

    def __init__(self, classifier: nn.Sequential) -> None:
        super().__init__()
        self.classifier = classifier
        self.temperature = 1.0

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        return self.classifier(torch.flatten(x, 1)) / self.temperature


def block_out_channels(block: nn.Module) -> int:
    """Output channels of one MobileNetV2 block (its last conv)."""
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


def count_flops(module: nn.Module, x: Tensor) -> tuple[int, Tensor]:
    """FLOPs of ``module(x)`` (2 x multiply-accumulates of conv/linear layers) and its output."""
    with FlopCounterMode(display=False) as counter:
        y = module(x)
    return int(counter.get_total_flops()), y


@dataclass
class FlopsTable:
    """Per-image FLOPs (2 x MACs of conv/linear layers) along the network, and activation shapes.

    ``blocks[i]``: block i; ``exits[k]``: the exit at boundary k; ``activation_shapes[k]``: ``(C, H, W)`` at
    boundary k (0..N).
    """

    blocks: list[int]
    exits: dict[int, int]
    final: int
    activation_shapes: list[tuple[int, ...]]

    @property
    def backbone(self) -> int:
        """All blocks plus the final classifier."""
        return sum(self.blocks) + self.final

    @property
    def exits_fraction(self) -> float:
        """All exit heads together, as a fraction of the backbone."""
        return sum(self.exits.values()) / self.backbone


@torch.no_grad()
def measure_flops(
    features: nn.Sequential,
    exits: dict[int, nn.Module],
    final: nn.Module | None,
    input_size: int = REFERENCE_INPUT_SIZE,
) -> FlopsTable:
    """Walk one ``3 x input_size x input_size`` image through the network, counting FLOPs per part.

    The image is made on the device and in the dtype of the network's first weight, so a model on CUDA, in
    float64 or on the meta device (no memory, no compute) is measured where it is.
    """
    modules = [features, *exits.values()] + ([final] if final is not None else [])
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    first = next(features.parameters())
    x = torch.zeros(1, 3, input_size, input_size, device=first.device, dtype=first.dtype)
    blocks, exit_flops, shapes = [], {}, [tuple(x.shape[1:])]
    for k, block in enumerate(features):
        f, x = count_flops(block, x)
        blocks.append(f)
        shapes.append(tuple(x.shape[1:]))
        if k + 1 in exits:
            exit_flops[k + 1] = count_flops(exits[k + 1], x)[0]
    final_flops = count_flops(final, x)[0] if final is not None else 0
    for m, mode in zip(modules, modes):
        m.train(mode)
    return FlopsTable(blocks, exit_flops, final_flops, shapes)


def resolve_exit_points(spec: list[Union[int, float]], block_flops: list[int]) -> list[int]:
    """Turn the ``exits`` config (boundaries or FLOPs fractions) into sorted, distinct boundaries.

    A fraction ``t`` maps to the boundary ``k`` in 1..N-1 whose cumulative backbone FLOPs fraction is nearest.
    Raises ConfigError (key ``exits``) when a boundary is out of range or two exits land on one boundary.
    """
    n = len(block_flops)
    total = float(sum(block_flops))
    cumulative = [sum(block_flops[:k]) / total for k in range(n + 1)]
    points = []
    for i, e in enumerate(spec):
        if isinstance(e, float):
            k = min(range(1, n), key=lambda b: abs(cumulative[b] - e))
        else:
            k = e
            if not 1 <= k <= n - 1:
                raise ConfigError(f"config key 'exits[{i}]': boundary {k} is outside 1..{n - 1}")
        points.append(k)
    if len(set(points)) != len(points):
        raise ConfigError(f"config key 'exits': two exits resolve to the same block boundary: {points}")
    return sorted(points)


def run_segment(
    features: nn.Sequential, exits: dict[int, nn.Module], x: Tensor, start: int, stop: int,
    detach_exits: bool = False,
) -> tuple[Tensor, list[Tensor]]:
    """Run blocks ``[start, stop)`` on the activation at boundary ``start``.

    Exits at boundaries ``start < k <= stop`` are evaluated on the way; the full model, the device head and the
    cloud tail all go through this one function, so their float ops are identical. ``detach_exits`` feeds the
    exits a detached activation (training: exit losses then do not reach the backbone).

    Returns the activation at ``stop`` and the exit logits ``(B, classes)`` in boundary order.
    """
    logits = []
    for k in range(start, stop):
        x = features[k](x)
        if k + 1 in exits:
            logits.append(exits[k + 1](x.detach() if detach_exits else x))
    return x, logits


class EarlyExitMobileNetV2(nn.Module):
    """MobileNetV2 with exits. ``forward(x)`` with ``x: (B, 3, H, W)`` returns a list of ``(B, classes)``
    logits: one per exit in boundary order, then the final classifier's.
    """

    def __init__(self, config: ModelConfig, exit_points: list[int] | None = None) -> None:
        super().__init__()
        config.validate()
        backbone = torchvision.models.mobilenet_v2(
            width_mult=config.width_mult, num_classes=config.num_classes, dropout=config.dropout
        )
        self.features: nn.Sequential = backbone.features
        self.final = FinalClassifier(backbone.classifier)
        if exit_points is None:
            exit_points = resolve_exit_points(config.exits, measure_flops(self.features, {}, None).blocks)
        self.exit_points: list[int] = list(exit_points)
        # Store the resolved boundaries so that a checkpoint rebuilds exactly this network even if the FLOPs
        # table (and hence fraction -> boundary) changed between releases.
        self.config = dataclasses.replace(config, exits=list(self.exit_points))
        self.exits = nn.ModuleList(
            ExitHead(block_out_channels(self.features[k - 1]), width, config.num_classes)
            for k, width in zip(self.exit_points, config.exit_widths())
        )
        if config.temperatures is not None:
            self.set_temperatures(config.temperatures)
        self.register_module("bottleneck", None)
        if config.bottleneck is not None:
            self.attach_bottleneck(config.bottleneck)

    def outputs(self) -> list[nn.Module]:
        """The heads that produce logits, in ``forward``'s order: the exits, then the final classifier."""
        return [*self.exits, self.final]

    def set_temperatures(self, temperatures: list[float]) -> None:
        """Divide each output's logits by its temperature from now on (one per ``outputs()``); recorded in
        ``config`` so checkpoints and manifests carry it."""
        if len(temperatures) != len(self.exits) + 1:
            raise ValueError(f"{len(temperatures)} temperatures for {len(self.exits) + 1} outputs")
        for head, t in zip(self.outputs(), temperatures):
            head.temperature = float(t)
        self.config = dataclasses.replace(self.config, temperatures=[float(t) for t in temperatures])

    def attach_bottleneck(self, config: BottleneckConfig) -> Bottleneck:
        """Put a new (untrained) bottleneck at ``config.split_point``, replacing any other; recorded in
        ``config`` so checkpoints rebuild it. Raises ConfigError when the split point is not inside the network."""
        if not 1 <= config.split_point <= self.num_blocks - 1:
            raise ConfigError(f"config key 'bottleneck.split_point': {config.split_point} is outside "
                              f"1..{self.num_blocks - 1}")
        first = next(self.features.parameters())
        bottleneck = Bottleneck(config, block_out_channels(self.features[config.split_point - 1]))
        self.bottleneck = bottleneck.to(device=first.device, dtype=first.dtype)
        self.config = dataclasses.replace(self.config, bottleneck=config)
        return self.bottleneck

    @property
    def num_blocks(self) -> int:
        return len(self.features)

    def exit_map(self) -> dict[int, nn.Module]:
        """Boundary -> exit head."""
        return dict(zip(self.exit_points, self.exits))

    def forward(self, x: Tensor, detach_exits: bool = False) -> list[Tensor]:
        if self.bottleneck is None:
            x, logits = run_segment(self.features, self.exit_map(), x, 0, self.num_blocks, detach_exits)
        else:
            # The path a split deployment takes: exits up to the split see the device's own activation, the
            # rest of the network the decoded code (always rounded: what the wire carries).
            s = self.bottleneck.config.split_point
            x, logits = run_segment(self.features, self.exit_map(), x, 0, s, detach_exits)
            x = self.bottleneck.decode(self.bottleneck.encode(x))
            x, later = run_segment(self.features, self.exit_map(), x, s, self.num_blocks, detach_exits)
            logits += later
        logits.append(self.final(x))
        return logits

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.features.parameters()) + list(self.final.parameters())

    def exit_parameters(self) -> list[nn.Parameter]:
        return list(self.exits.parameters())

    def flops(self, input_size: int = REFERENCE_INPUT_SIZE) -> FlopsTable:
        """FLOPs of every block, exit and the final classifier for one image of ``input_size`` px."""
        return measure_flops(self.features, self.exit_map(), self.final, input_size)


def _load_whole(model: EarlyExitMobileNetV2, state: dict, source: str) -> None:
    """Every tensor of a train.py checkpoint's state dict into ``model``; ConfigError naming the first one that
    does not fit (another width, class count or exit layout)."""
    own = model.state_dict()
    for name in sorted(set(own) | set(state)):
        if name not in own or name not in state or own[name].shape != state[name].shape:
            raise ConfigError(f"config key 'pretrained': {source!r} is another architecture (tensor {name!r}: "
                              f"{tuple(state[name].shape) if name in state else 'missing'} in the file, "
                              f"{tuple(own[name].shape) if name in own else 'none'} in the model)")
    model.load_state_dict(state, strict=True)
    log.info("fine-tuning: every tensor from the checkpoint %s", source)


def load_pretrained(model: EarlyExitMobileNetV2, pretrained: str | None) -> None:
    """Initialise the backbone from ImageNet weights in torchvision's format, or the whole model from a train.py
    checkpoint (fine-tuning: a new version of a trained model).

    ``pretrained``: None/"none" (random init), "imagenet" (torchvision's IMAGENET1K_V1, downloaded when online),
    a path to a local torchvision-format state dict (e.g. ``mobilenet_v2_imagenet_tflite.pth``; the 1000-class
    classifier is kept only when ``num_classes == 1000``; exits start fresh), or a path to a train.py checkpoint
    (every tensor, exits and classifier included; the architecture must be the same).
    Raises ConfigError (key ``pretrained``) for a missing file, a failed download or mismatched shapes.
    """
    if pretrained in (None, "", "none"):
        return
    if pretrained == "imagenet":
        weights = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
        try:
            state = weights.get_state_dict(progress=True)
        except Exception as err:  # urllib raises several types; all mean "could not fetch"
            raise ConfigError(
                f"config key 'pretrained': downloading torchvision's ImageNet weights failed ({err}); "
                f"offline, download {weights.url} elsewhere and set pretrained: /path/to/file.pth"
            ) from None
    else:
        path = Path(pretrained)
        if not path.is_file():
            raise ConfigError(f"config key 'pretrained': weights file {pretrained!r} does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # zip, pickle and EOF errors of several types: all mean "not a weights file"
            raise ConfigError(f"config key 'pretrained': {pretrained!r} cannot be read as a state dict ({err})"
                              ) from None
        if not isinstance(state, dict):
            raise ConfigError(f"config key 'pretrained': {pretrained!r} is not a state dict")
        if isinstance(state.get("state_dict"), dict) and "model_config" in state:  # a train.py checkpoint
            _load_whole(model, state["state_dict"], pretrained)
            return
    own = model.state_dict()
    wanted = {}
    for name, tensor in state.items():
        target = "final." + name if name.startswith("classifier.") else name
        if target.startswith("final.") and model.config.num_classes != 1000:
            continue  # classifier replaced for num_classes
        if target not in own:
            raise ConfigError(f"config key 'pretrained': tensor {name!r} has no place in this model")
        if own[target].shape != tensor.shape:
            raise ConfigError(
                f"config key 'pretrained': tensor {name!r} has shape {tuple(tensor.shape)}, the model "
                f"(width_mult={model.config.width_mult}) wants {tuple(own[target].shape)}"
            )
        wanted[target] = tensor
    missing = [n for n in own if n.startswith("features.") and n not in wanted]
    if missing:
        raise ConfigError(f"config key 'pretrained': backbone tensor {missing[0]!r} is missing from the file")
    model.load_state_dict(wanted, strict=False)
    log.info("loaded %d pretrained tensors from %s", len(wanted), pretrained)
