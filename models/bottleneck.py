"""A learned bottleneck codec at the split: supervised compression of the split activation.

The device runs blocks ``[0, s)`` and then a small ENCODER that maps the activation ``(B, C, H, W)`` to a
few channels ``(B, c, H, W)``, rounded to integers in ``[-code_max, code_max]`` (the *code*). The code is
entropy-coded (``models.bottleneck_codec``) with a learned per-channel factorized prior (Ballé et al.,
"Variational image compression with a scale hyperprior", ICLR 2018, appendix 6.1: a monotone per-channel CDF
built from a tiny MLP) and sent. The cloud's DECODER maps the code back to ``(B, C, H, W)`` for the rest of the
frozen network. Everything else stays frozen: the encoder, decoder and prior learn by distillation from the
model's own activation at the split (MSE) and its outputs (KL), plus the rate the prior assigns to the code
(Matsubara et al.'s Entropic Student, BottleFit).

Quantisation in training follows Minnen & Singh (2020): the rate is measured on ``y + u``, ``u ~ U(-0.5, 0.5)``
(a differentiable proxy of the rounded code's entropy), while the decoder sees the rounded code with a
straight-through gradient (so it learns on exactly what it will receive).

One implementation for both sides: the device needs ``BottleneckEncoder.code``, the cloud
``BottleneckDecoder``; both read the frequency table ``Bottleneck.code_counts`` (integers, stored in the
checkpoint, so the two sides' entropy coders agree bit for bit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops.misc import Conv2dNormActivation

from models.config import ConfigError

#: Total of every channel's integer frequency table (16-bit fixed point, see ``quantize_pmf``).
COUNTS_TOTAL = 1 << 16


@dataclass
class BottleneckConfig:
    """The bottleneck's shape; stored inside ``ModelConfig.bottleneck``.

    ``split_point``: block boundary where it sits (1..N-1). ``channels``: code channels ``c``. ``hidden``: the
    encoder's hidden width (the decoder uses twice it). ``code_max``: codes are clamped to
    ``[-code_max, code_max]`` (at most 127, so a code fits an int8).
    """

    split_point: int
    channels: int = 12
    hidden: int = 64
    code_max: int = 63

    def validate(self) -> None:
        if self.split_point < 1:
            raise ConfigError(f"config key 'bottleneck.split_point': must be >= 1, got {self.split_point}")
        if self.channels < 1:
            raise ConfigError(f"config key 'bottleneck.channels': must be >= 1, got {self.channels}")
        if self.hidden < 1:
            raise ConfigError(f"config key 'bottleneck.hidden': must be >= 1, got {self.hidden}")
        if not 1 <= self.code_max <= 127:
            raise ConfigError(f"config key 'bottleneck.code_max': must be in 1..127, got {self.code_max}")

    @property
    def num_symbols(self) -> int:
        """Size of the code alphabet, ``2 * code_max + 1``."""
        return 2 * self.code_max + 1


class BottleneckEncoder(nn.Sequential):
    """Device side: ``(B, C, H, W)`` activation -> ``(B, c, H, W)`` latent (float, before rounding).

    1x1 conv (+BN+ReLU6) to ``hidden`` channels, then a 3x3 conv to ``c``: the 3x3 lets neighbouring positions
    share what they code. At split 8 of the 128 px model (64x8x8) with c=12 and hidden=64 it costs 1.4 MFLOPs,
    1.6 % of the head.
    """

    def __init__(self, in_channels: int, hidden: int, channels: int, code_max: int) -> None:
        super().__init__(
            Conv2dNormActivation(in_channels, hidden, kernel_size=1, activation_layer=nn.ReLU6),
            nn.Conv2d(hidden, channels, kernel_size=3, padding=1),
        )
        self.code_max = code_max

    def code(self, activation: Tensor) -> Tensor:
        """The integer code ``(B, c, H, W)`` int32 in ``[-code_max, code_max]`` of an activation."""
        return round_code(self(activation), self.code_max).to(torch.int32)


class BottleneckDecoder(nn.Sequential):
    """Cloud side: ``(B, c, H, W)`` code (any dtype; integers) -> ``(B, C, H, W)`` float activation.

    3x3 conv (+BN+ReLU6) to ``hidden``, a depthwise 3x3 and a 1x1 (+BN+ReLU6; MobileNet's cheap spatial mixing),
    and a linear 1x1 to ``C``: MobileNetV2's block outputs are linear bottlenecks, so no activation at the end.
    """

    def __init__(self, channels: int, hidden: int, out_channels: int) -> None:
        super().__init__(
            Conv2dNormActivation(channels, hidden, kernel_size=3, activation_layer=nn.ReLU6),
            Conv2dNormActivation(hidden, hidden, kernel_size=3, groups=hidden, activation_layer=nn.ReLU6),
            Conv2dNormActivation(hidden, hidden, kernel_size=1, activation_layer=nn.ReLU6),
            nn.Conv2d(hidden, out_channels, kernel_size=1),
        )

    def forward(self, code: Tensor) -> Tensor:
        first = self[0][0].weight
        return super().forward(code.to(first.dtype))


def round_code(y: Tensor, code_max: int) -> Tensor:
    """Clamp to ``[-code_max, code_max]`` and round, with a straight-through gradient (identity inside the
    range): the decoder trains on the code it will receive."""
    y = y.clamp(-code_max, code_max)
    return y + (torch.round(y) - y).detach()


class FactorizedPrior(nn.Module):
    """Per-channel learned density of the code (Ballé et al. 2018's non-parametric factorized prior).

    Each channel has a monotone function ``f``: a chain of ``1 -> 3 -> 3 -> 3 -> 1`` affine maps with
    non-negative (softplus) matrices and ``x + tanh(a) * tanh(x)`` gates; ``sigmoid(f(x))`` is a CDF. The
    probability of integer ``k`` is ``cdf(k + 0.5) - cdf(k - 0.5)``. ~60 parameters per channel.
    """

    def __init__(self, channels: int, filters: tuple[int, ...] = (3, 3, 3), init_scale: float = 10.0) -> None:
        super().__init__()
        dims = (1, *filters, 1)
        scale = init_scale ** (1.0 / (len(filters) + 1))
        self.matrices = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.factors = nn.ParameterList()
        for i in range(len(filters) + 1):
            # Initialised so the CDF is a wide logistic-like ramp over about +-init_scale.
            init = math.log(math.expm1(1.0 / scale / dims[i + 1]))
            self.matrices.append(nn.Parameter(torch.full((channels, dims[i + 1], dims[i]), init)))
            self.biases.append(nn.Parameter(torch.empty(channels, dims[i + 1], 1).uniform_(-0.5, 0.5)))
            if i < len(filters):
                self.factors.append(nn.Parameter(torch.zeros(channels, dims[i + 1], 1)))

    def _logits_cdf(self, x: Tensor) -> Tensor:
        """``f(x)`` for ``x`` of shape ``(c, 1, n)``; returns ``(c, 1, n)``."""
        for i, (matrix, bias) in enumerate(zip(self.matrices, self.biases)):
            x = torch.matmul(F.softplus(matrix.to(x.dtype)), x) + bias.to(x.dtype)
            if i < len(self.factors):
                x = x + torch.tanh(self.factors[i].to(x.dtype)) * torch.tanh(x)
        return x

    def _mass(self, values: Tensor) -> Tensor:
        """Probability of the unit interval around each of ``values`` ``(c, 1, n)``."""
        lower = self._logits_cdf(values - 0.5)
        upper = self._logits_cdf(values + 0.5)
        # Subtract in whichever tail is more precise (Ballé's sign trick: both sigmoids near 0, not near 1).
        sign = -torch.sign(lower + upper).detach()
        return torch.abs(torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower))

    def likelihood(self, y: Tensor) -> Tensor:
        """Probability ``(B, c, H, W)`` of each value of ``y`` ``(B, c, H, W)`` (noisy or rounded), floored at
        1e-9 so that the rate stays finite."""
        b, c, h, w = y.shape
        values = y.transpose(0, 1).reshape(c, 1, -1)
        mass = self._mass(values).clamp_min(1e-9)
        return mass.reshape(c, b, h, w).transpose(0, 1)

    @torch.no_grad()
    def pmf(self, code_max: int) -> Tensor:
        """Probability of every integer ``-code_max..code_max`` per channel: ``(c, 2 * code_max + 1)`` float64
        (the tails beyond the range are not folded in: the encoder clamps, so they never occur)."""
        c = self.matrices[0].shape[0]
        grid = torch.arange(-code_max, code_max + 1, dtype=torch.float64, device=self.matrices[0].device)
        return self._mass(grid.expand(c, 1, -1).contiguous()).reshape(c, -1)


def quantize_pmf(pmf: Tensor, total: int = COUNTS_TOTAL) -> Tensor:
    """Integer frequencies ``(c, K)`` int32 summing to ``total`` per row, every symbol at least 1.

    Integers, not floats, go to the entropy coders: both sides then build bit-identical models whatever their
    float arithmetic. Rows of ``pmf`` need not be normalised.
    """
    c, k = pmf.shape
    if k >= total:
        raise ValueError(f"{k} symbols do not fit a frequency total of {total}")
    p = pmf.double().clamp_min(0)
    p = p / p.sum(dim=1, keepdim=True).clamp_min(1e-300)
    counts = torch.floor(p * (total - k)).long() + 1
    # Hand the remainder of the rounding to each row's most likely symbol.
    counts[torch.arange(c), counts.argmax(dim=1)] += total - counts.sum(dim=1)
    return counts.to(torch.int32)


@dataclass
class BottleneckOutput:
    """``reconstruction``: ``(B, C, H, W)`` decoded activation. ``likelihoods``: ``(B, c, H, W)`` probability
    the prior gives each code value (training: of the noisy latent). ``bits`` is their ``-log2`` sum per image."""

    reconstruction: Tensor
    likelihoods: Tensor

    @property
    def bits_per_image(self) -> Tensor:
        return -torch.log2(self.likelihoods).sum() / self.likelihoods.shape[0]


class Bottleneck(nn.Module):
    """Encoder + prior + decoder at ``config.split_point``; ``C`` = channels of the activation there.

    ``code_counts`` ``(c, 2 * code_max + 1)`` int32 is the entropy coders' frequency table, refreshed from the
    prior by ``update_tables`` (train.py calls it before saving) and stored in the checkpoint.
    """

    def __init__(self, config: BottleneckConfig, activation_channels: int) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.encoder = BottleneckEncoder(activation_channels, config.hidden, config.channels, config.code_max)
        self.decoder = BottleneckDecoder(config.channels, 2 * config.hidden, activation_channels)
        self.prior = FactorizedPrior(config.channels)
        self.register_buffer("code_counts", torch.ones(config.channels, config.num_symbols, dtype=torch.int32))
        self.update_tables()

    def forward(self, activation: Tensor) -> BottleneckOutput:
        """Training: rate on the noisy latent, decoder on the straight-through rounded code. Eval: both on the
        rounded code (what the wire carries)."""
        y = self.encoder(activation)
        code = round_code(y, self.config.code_max)
        if self.training:
            noisy = y.clamp(-self.config.code_max, self.config.code_max) + torch.empty_like(y).uniform_(-0.5, 0.5)
            likelihoods = self.prior.likelihood(noisy)
        else:
            likelihoods = self.prior.likelihood(code)
        return BottleneckOutput(self.decoder(code), likelihoods)

    def encode(self, activation: Tensor) -> Tensor:
        """Device: the integer code ``(B, c, H, W)`` int32 of an activation ``(B, C, H, W)``."""
        return self.encoder.code(activation)

    def decode(self, code: Tensor) -> Tensor:
        """Cloud: the activation ``(B, C, H, W)`` float restored from a code ``(B, c, H, W)``."""
        return self.decoder(code)

    @torch.no_grad()
    def update_tables(self) -> None:
        """Recompute ``code_counts`` from the prior (after training changed it)."""
        self.code_counts.copy_(quantize_pmf(self.prior.pmf(self.config.code_max)).to(self.code_counts.device))

    def flops(self, activation_shape: tuple[int, int, int]) -> tuple[int, int]:
        """FLOPs (2 x MACs of conv layers, ``count_flops``) of the encoder and of the decoder for one image whose
        split activation is ``(C, H, W)``."""
        from models.early_exit import count_flops

        modes = self.training
        self.eval()
        first = self.encoder[0][0].weight
        x = torch.zeros(1, *activation_shape, device=first.device, dtype=first.dtype)
        with torch.no_grad():
            enc, y = count_flops(self.encoder, x)
            dec, _ = count_flops(self.decoder, torch.round(y))
        self.train(modes)
        return enc, dec


@dataclass
class LossWeights:
    """Weights of the bottleneck's training loss (see ``bottleneck_loss``)."""

    rate: float
    mse: float = 1.0
    kl: float = 1.0
    exit_kl: float = 0.1


def kl_to_teacher(student: Tensor, teacher: Tensor) -> Tensor:
    """``KL(softmax(teacher) || softmax(student))``, mean over the batch (nats); both ``(B, classes)`` logits."""
    return F.kl_div(F.log_softmax(student.float(), dim=-1), F.log_softmax(teacher.float(), dim=-1),
                    log_target=True, reduction="batchmean")


def bottleneck_loss(out: BottleneckOutput, activation: Tensor, student: list[Tensor], teacher: list[Tensor],
                    weights: LossWeights) -> tuple[Tensor, dict[str, float]]:
    """``mse * NMSE(recon, activation) + kl * KL(final) + exit_kl * sum KL(later exits) + rate * bits``.

    ``activation``: the frozen model's own activation at the split ``(B, C, H, W)``; ``student`` / ``teacher``:
    the tail's outputs (later exits, then final; ``(B, classes)`` each) with and without the bottleneck.
    ``NMSE``: mean squared error over the activation's mean square. ``KL``: nats per image. ``bits``: bits per
    image the prior charges for the code. Returns the loss and its parts (floats).
    """
    # Relative to the activation's mean square, so that one weight fits every split (their scales differ).
    target = activation.float()
    mse = F.mse_loss(out.reconstruction.float(), target) / target.square().mean().clamp_min(1e-12)
    kl_final = kl_to_teacher(student[-1], teacher[-1])
    kl_exits = sum((kl_to_teacher(s, t) for s, t in zip(student[:-1], teacher[:-1])), kl_final.new_zeros(()))
    bits = out.bits_per_image
    loss = weights.mse * mse + weights.kl * kl_final + weights.exit_kl * kl_exits + weights.rate * bits
    return loss, {"loss": float(loss.detach()), "mse": float(mse.detach()), "kl": float(kl_final.detach()),
                  "bits": float(bits.detach())}


def encode_payload(bottleneck: Bottleneck, activation: Tensor, coder: str = "ans") -> bytes:
    """Device: activation at the split ``(B, C, H, W)`` -> the payload bytes of its code (``coder``: ``ans``,
    the learned prior with constriction's ANS coder, or ``zstd``, int8 values + zstd)."""
    from models.bottleneck_codec import encode_code

    with torch.no_grad():
        return encode_code(bottleneck.encode(activation), coder, bottleneck.code_counts)  # type: ignore[arg-type]


def decode_payload(bottleneck: Bottleneck, payload: bytes, code_shape: tuple[int, int, int, int],
                   coder: str = "ans") -> Tensor:
    """Cloud: payload bytes of a code of ``code_shape`` ``(B, c, H, W)`` (``H, W``: the split activation's) ->
    the restored activation ``(B, C, H, W)`` float, ready for ``tail(model, split)``. Raises
    ``models.bottleneck_codec.CodeError`` (a ValueError) naming ``payload``, ``shape`` or ``coder``."""
    from models.bottleneck_codec import decode_code

    code = decode_code(payload, code_shape, coder, bottleneck.code_counts)  # type: ignore[arg-type]
    first = bottleneck.decoder[0][0].weight
    with torch.no_grad():
        return bottleneck.decode(code.to(first.device))


def flops_shares(model: nn.Module, input_size: int) -> dict[str, float]:
    """The bottleneck's cost next to the parts it joins, for one ``input_size`` px image: encoder and decoder
    FLOPs, the head's (blocks before the split and the exits there, as ``partition.profile`` counts them) and
    the tail's, and ``encoder_share`` = encoder / head, ``decoder_share`` = decoder / tail."""
    from models.partition import profile

    bottleneck = model.bottleneck
    if bottleneck is None:
        raise ValueError("the model has no bottleneck")
    split = profile(model, input_size)[bottleneck.config.split_point]
    enc, dec = bottleneck.flops(split.activation_shape)
    return {"encoder_flops": enc, "decoder_flops": dec, "head_flops": split.device_flops,
            "tail_flops": split.cloud_flops, "encoder_share": enc / split.device_flops,
            "decoder_share": dec / split.cloud_flops}
