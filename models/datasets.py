"""Datasets and preprocessing: StanfordCars (torchvision layout), any ImageFolder tree, the quickstart set."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset
from torchvision import datasets, transforms

from models.config import ConfigError
from models import quickstart

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Preprocess:
    """How an image file becomes a model input: resize short side to ``resize_size`` px, centre-crop
    ``input_size`` px, scale to [0, 1], normalise with ``mean``/``std``. Stored in every checkpoint."""

    input_size: int
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        # Checked here because a checkpoint or a manifest from elsewhere may carry anything.
        if self.input_size < 1 or self.resize_size < 1:
            raise ValueError(f"preprocess: input_size and resize_size must be >= 1, got {self.input_size}, "
                             f"{self.resize_size}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"preprocess: mean and std need 3 values each, got {self.mean}, {self.std}")
        if not all(s > 0 for s in self.std) or not all(abs(m) < float("inf") for m in self.mean):
            raise ValueError(f"preprocess: std must be > 0 and mean finite, got {self.mean}, {self.std}")

    def eval_transform(self) -> transforms.Compose:
        """PIL image -> ``(3, input_size, input_size)`` float tensor."""
        return transforms.Compose([
            transforms.Resize(self.resize_size),
            transforms.CenterCrop(self.input_size),
            transforms.ToTensor(),
            transforms.Normalize(self.mean, self.std),
        ])

    def train_transform(self, crop_scale_min: float) -> transforms.Compose:
        """Random-resized-crop + flip augmentation, then the same normalisation."""
        return transforms.Compose([
            transforms.RandomResizedCrop(self.input_size, scale=(crop_scale_min, 1.0)),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(self.mean, self.std),
        ])


@dataclass
class DataBundle:
    """``calibration``: a slice of the training images held out from ``train`` (eval transform), on which the
    exits' temperatures are fitted; None when no slice is held out."""

    train: Dataset
    val: Dataset
    class_names: list[str]
    preprocess: Preprocess
    calibration: Dataset | None = None


def hold_out(train: Dataset, train_eval: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """Split a training set into (training part, held-out part) with a seeded permutation.

    ``train`` and ``train_eval`` are the same images with the augmenting and the eval transform; the held-out
    part (``round(fraction * len)`` images, at least 1) comes from ``train_eval``, so calibration sees images as
    the device will. ``fraction == 0`` returns ``(train, None)``.
    """
    if fraction <= 0:
        return train, None
    n = len(train)
    k = min(n - 1, max(1, round(fraction * n)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(train, sorted(order[k:])), Subset(train_eval, sorted(order[:k]))


def build_datasets(
    dataset: str,
    data_root: str,
    image_size: int,
    resize_size: int | None,
    crop_scale_min: float,
    quickstart_train_samples: int,
    quickstart_val_samples: int,
    seed: int,
    with_train: bool = True,
    calibration_fraction: float = 0.0,
    augment: bool = True,
) -> DataBundle:
    """Build train and validation sets (and the held-out calibration slice of the training set).

    ``dataset``: ``stanford_cars`` (torchvision's StanfordCars under ``data_root``, i.e.
    ``data_root/stanford_cars/{devkit,cars_train,cars_test,cars_test_annos_withlabels.mat}``; never downloaded,
    the dataset must be fetched by hand), ``imagefolder`` (``data_root/train/<class>/*`` and
    ``data_root/val/<class>/*``) or ``quickstart`` (generated in memory).
    ``with_train=False`` builds only the validation set (evaluation: the training files need not exist;
    ``train`` is then an empty list). ``calibration_fraction`` of the training images is held out (see
    ``hold_out``). ``augment=False`` gives the training images the eval transform (fixed inputs, e.g. to cache
    a frozen network's activations). Raises ConfigError naming ``data_root`` when the files are not where they
    should be.
    """
    if dataset == "quickstart":
        pre = Preprocess(image_size, resize_size or image_size, quickstart.MEAN, quickstart.STD)
        val = quickstart.QuickstartShapes("val", quickstart_val_samples, image_size, seed)
        bundle = DataBundle([], val, list(quickstart.CLASS_NAMES), pre)
        if with_train:
            train = quickstart.QuickstartShapes("train", quickstart_train_samples, image_size, seed, flip=augment)
            train_eval = copy.copy(train)  # shares the rendered images
            train_eval.flip = False
            bundle.train, bundle.calibration = hold_out(train, train_eval, calibration_fraction, seed)
        return bundle
    if dataset not in ("stanford_cars", "imagefolder"):
        raise ConfigError(f"config key 'dataset': unknown dataset {dataset!r}")
    pre = Preprocess(image_size, resize_size or image_size, IMAGENET_MEAN, IMAGENET_STD)
    load = _stanford_cars if dataset == "stanford_cars" else _image_folder
    val = load(Path(data_root), "test" if dataset == "stanford_cars" else "val", pre.eval_transform())
    bundle = DataBundle([], val, list(val.classes), pre)
    if with_train:
        train = load(Path(data_root), "train",
                     pre.train_transform(crop_scale_min) if augment else pre.eval_transform())
        if list(train.classes) != bundle.class_names:
            raise ConfigError(f"config key 'data_root': train and validation classes differ under {data_root!r}")
        train_eval = load(Path(data_root), "train", pre.eval_transform())
        bundle.train, bundle.calibration = hold_out(train, train_eval, calibration_fraction, seed)
    return bundle


def _stanford_cars(root: Path, split: str, transform: transforms.Compose) -> datasets.StanfordCars:
    """One split of torchvision's StanfordCars under ``root`` (never downloaded)."""
    try:
        return datasets.StanfordCars(str(root), split=split, transform=transform, download=False)
    except RuntimeError as err:
        raise ConfigError(
            f"config key 'data_root': no StanfordCars {split} split in torchvision's layout under {str(root)!r} "
            f"({err}); it cannot be downloaded automatically, see the README"
        ) from None


def _image_folder(root: Path, split: str, transform: transforms.Compose) -> datasets.ImageFolder:
    """``root/split/<class>/*`` as an ImageFolder."""
    if not (root / split).is_dir():
        raise ConfigError(f"config key 'data_root': {str(root / split)!r} is not a directory")
    return datasets.ImageFolder(str(root / split), transform=transform)
