"""The app config shared by train.py and test.py (one flat YAML, as in the seed's ``apps/*.yml``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

from models.config import ConfigError, check_at_least, check_files
from models.early_exit import SPINN_EXIT_FRACTIONS, ModelConfig

DEFAULT_THRESHOLDS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0]


@dataclass
class AppConfig:
    """Every key an app YAML may hold; the README's config reference documents each one."""

    # model
    width_mult: float = 1.0
    num_classes: Optional[int] = None  # None: taken from the dataset
    exits: list[Union[int, float]] = field(default_factory=lambda: list(SPINN_EXIT_FRACTIONS))
    exit_channels: Union[int, list[int]] = 128  # one width for every exit head, or one per exit
    dropout: float = 0.2
    pretrained: Optional[str] = None  # None | "imagenet" | path to a torchvision state dict
    # data
    dataset: Literal["quickstart", "stanford_cars", "imagefolder"] = "quickstart"
    data_root: str = "data"
    image_size: int = 32
    resize_size: Optional[int] = None  # eval resize of the short side; None: image_size
    crop_scale_min: float = 0.35
    quickstart_train_samples: int = 6000
    quickstart_val_samples: int = 1000
    batch_size: int = 64
    data_loader_workers: int = 2
    # training
    num_epochs: int = 10
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 4e-5
    lr_scheduler: Literal["cosine", "step"] = "cosine"
    lr_step_epochs: int = 30
    lr_gamma: float = 0.1
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.1
    exit_loss_weights: Union[float, list[float]] = 1.0
    train_mode: Literal["joint", "detached_exits", "exits_only", "bottleneck"] = "joint"
    distill_weight: float = 0.0  # share of each exit's loss that is distillation from the final classifier
    distill_temperature: float = 3.0
    calibration_fraction: float = 0.0  # training images held out to fit each output's temperature (0: none)
    # learned bottleneck (train_mode: bottleneck): a codec at one split of a trained, frozen model
    base_checkpoint: Optional[str] = None  # the frozen model the bottleneck is trained for
    bottleneck_split: Optional[int] = None  # block boundary of the bottleneck
    bottleneck_channels: int = 12  # code channels
    bottleneck_hidden: int = 64  # encoder width (decoder: twice it)
    bottleneck_rate_weight: float = 1.0e-4  # lambda: loss per bit of code per image
    bottleneck_mse_weight: float = 1.0  # MSE to the frozen model's activation at the split
    bottleneck_kl_weight: float = 1.0  # KL(frozen model's final output || with the bottleneck)
    bottleneck_exit_kl_weight: float = 0.1  # the same for every exit after the split
    bottleneck_cache: bool = True  # cache the frozen head's activations once (no augmentation) or run it per step
    bottleneck_cache_views: int = 1  # cached views per training image: the eval transform, mirrored, random crops
    bottleneck_cache_dir: Optional[str] = None  # keep that cache in files here, reused by runs on the same inputs
    amp: bool = True  # used on CUDA only
    channels_last: bool = True  # NHWC activations: depthwise convs are faster in this layout (oneDNN, cuDNN)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    log_dir: str = "runs/quickstart"
    resume: bool = False
    # evaluation (test.py)
    checkpoint: Optional[str] = None  # None: <log_dir>/best_model.pt
    # None: the boundary of the deepest exit; "all": write the scheduler's offline profile (every split point)
    split_point: Optional[Union[int, Literal["all"]]] = None
    profile_bytes_images: int = 256  # "all": images whose encoded offload sizes are measured per split and codec
    z_confidence_threshold: Optional[float] = None  # None: sweep `thresholds`
    thresholds: list[float] = field(default_factory=lambda: list(DEFAULT_THRESHOLDS))
    confidence: Literal["top1", "entropy"] = "top1"

    def validate(self) -> None:
        positive = ["image_size", "batch_size", "num_epochs", "quickstart_train_samples",
                    "quickstart_val_samples", "lr_step_epochs", "profile_bytes_images"]
        check_at_least(self, positive, 1)
        if self.resize_size is not None and self.resize_size < 1:
            raise ConfigError(f"config key 'resize_size': must be >= 1, got {self.resize_size}")
        if self.lr <= 0:
            raise ConfigError(f"config key 'lr': must be > 0, got {self.lr}")
        if not 0 < self.crop_scale_min <= 1:
            raise ConfigError(f"config key 'crop_scale_min': must be in (0, 1], got {self.crop_scale_min}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"config key 'label_smoothing': must be in [0, 1), got {self.label_smoothing}")
        if self.data_loader_workers < 0:
            raise ConfigError(f"config key 'data_loader_workers': must be >= 0, got {self.data_loader_workers}")
        if self.warmup_epochs < 0 or self.warmup_epochs > self.num_epochs:
            raise ConfigError(f"config key 'warmup_epochs': must be in [0, num_epochs], got {self.warmup_epochs}")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ConfigError(f"config key 'distill_weight': must be in [0, 1], got {self.distill_weight}")
        if self.distill_temperature <= 0:
            raise ConfigError(f"config key 'distill_temperature': must be > 0, got {self.distill_temperature}")
        if not 0.0 <= self.calibration_fraction < 0.5:
            raise ConfigError(
                f"config key 'calibration_fraction': must be in [0, 0.5), got {self.calibration_fraction}")
        weights = self.exit_loss_weights
        if isinstance(weights, list):
            if len(weights) != len(self.exits):
                raise ConfigError(
                    f"config key 'exit_loss_weights': {len(weights)} weights for {len(self.exits)} exits"
                )
            if any(w < 0 for w in weights):
                raise ConfigError("config key 'exit_loss_weights': weights must be >= 0")
        elif weights < 0:
            raise ConfigError("config key 'exit_loss_weights': must be >= 0")
        for i, t in enumerate(self.thresholds):
            if not 0.0 <= t <= 1.0:
                raise ConfigError(f"config key 'thresholds[{i}]': must be in [0, 1], got {t}")
        if self.z_confidence_threshold is not None and not 0.0 <= self.z_confidence_threshold <= 1.0:
            raise ConfigError(
                f"config key 'z_confidence_threshold': must be in [0, 1], got {self.z_confidence_threshold}"
            )
        self.model_config(self.num_classes or 2).validate()
        self._validate_bottleneck()

    def _validate_bottleneck(self) -> None:
        check_at_least(self, ["bottleneck_channels", "bottleneck_hidden", "bottleneck_cache_views"], 1)
        check_at_least(self, ["bottleneck_rate_weight", "bottleneck_mse_weight", "bottleneck_kl_weight",
                              "bottleneck_exit_kl_weight"], 0)
        if self.bottleneck_split is not None and self.bottleneck_split < 1:
            raise ConfigError(f"config key 'bottleneck_split': must be >= 1, got {self.bottleneck_split}")
        if self.train_mode != "bottleneck":
            return
        for key in ("base_checkpoint", "bottleneck_split"):
            if getattr(self, key) is None:
                raise ConfigError(f"config key '{key}': required when train_mode is bottleneck")
        check_files(self, ["base_checkpoint"])
        if self.resume:
            raise ConfigError("config key 'resume': not supported with train_mode bottleneck (a run takes minutes)")

    def model_config(self, num_classes: int) -> ModelConfig:
        return ModelConfig(
            width_mult=self.width_mult, num_classes=num_classes, exits=list(self.exits),
            exit_channels=self.exit_channels, dropout=self.dropout,
        )

    def exit_weights(self) -> list[float]:
        w = self.exit_loss_weights
        return list(w) if isinstance(w, list) else [float(w)] * len(self.exits)

    def checkpoint_path(self) -> Path:
        return Path(self.checkpoint) if self.checkpoint else Path(self.log_dir) / "best_model.pt"
