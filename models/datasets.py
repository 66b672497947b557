"""Datasets and preprocessing: StanfordCars (torchvision layout), any ImageFolder tree, the quickstart set."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset
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
    train: Dataset
    val: Dataset
    class_names: list[str]
    preprocess: Preprocess


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
) -> DataBundle:
    """Build train and validation sets.

    ``dataset``: ``stanford_cars`` (torchvision's StanfordCars under ``data_root``, i.e.
    ``data_root/stanford_cars/{devkit,cars_train,cars_test,cars_test_annos_withlabels.mat}``; never downloaded,
    the dataset must be fetched by hand), ``imagefolder`` (``data_root/train/<class>/*`` and
    ``data_root/val/<class>/*``) or ``quickstart`` (generated in memory).
    ``with_train=False`` skips building the training set (evaluation only; ``train`` is then an empty list).
    Raises ConfigError naming ``data_root`` when the files are not where they should be.
    """
    if dataset == "quickstart":
        pre = Preprocess(image_size, resize_size or image_size, quickstart.MEAN, quickstart.STD)
        return DataBundle(
            train=quickstart.QuickstartShapes("train", quickstart_train_samples, image_size, seed, flip=True)
            if with_train else [],
            val=quickstart.QuickstartShapes("val", quickstart_val_samples, image_size, seed),
            class_names=list(quickstart.CLASS_NAMES),
            preprocess=pre,
        )
    pre = Preprocess(image_size, resize_size or image_size, IMAGENET_MEAN, IMAGENET_STD)
    train_tf, val_tf = pre.train_transform(crop_scale_min), pre.eval_transform()
    root = Path(data_root)
    if dataset == "stanford_cars":
        try:
            train = datasets.StanfordCars(str(root), split="train", transform=train_tf, download=False)
            val = datasets.StanfordCars(str(root), split="test", transform=val_tf, download=False)
        except RuntimeError as err:
            raise ConfigError(
                f"config key 'data_root': no StanfordCars in torchvision's layout under {data_root!r} ({err}); "
                "it cannot be downloaded automatically, see the README"
            ) from None
        return DataBundle(train, val, list(train.classes), pre)
    if dataset == "imagefolder":
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise ConfigError(f"config key 'data_root': {str(root / split)!r} is not a directory")
        train = datasets.ImageFolder(str(root / "train"), transform=train_tf)
        val = datasets.ImageFolder(str(root / "val"), transform=val_tf)
        if train.classes != val.classes:
            raise ConfigError(f"config key 'data_root': train and val class folders differ under {data_root!r}")
        return DataBundle(train, val, list(train.classes), pre)
    raise ConfigError(f"config key 'dataset': unknown dataset {dataset!r}")
