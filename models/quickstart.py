"""The embedded quickstart dataset: procedurally drawn shapes, no files, no download.

Ten shape classes drawn at a random place, size, rotation and colour on a random background. Every sample
has a difficulty ``d`` in [0, 1] that lowers contrast and size and adds noise and clutter, so easy samples are
answered by the first exits while hard ones need the whole network (the trade-off early exits are about).
Sample ``i`` of split ``s`` depends only on ``(seed, s, i)``: the dataset is identical on every machine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

CLASS_NAMES = [
    "disk", "square", "triangle", "plus", "ring", "horizontal-bar", "vertical-bar", "diamond", "x-cross",
    "two-dots",
]

#: Normalisation the quickstart images are trained with (pixel values are roughly centred at 0.5).
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)

_SPLIT_IDS = {"train": 0, "val": 1}


def _shape_mask(label: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Boolean mask of shape ``label`` in local coordinates where the shape spans about [-1, 1]."""
    r = np.sqrt(x * x + y * y)
    ax, ay = np.abs(x), np.abs(y)
    masks = {
        0: r < 1.0,
        1: np.maximum(ax, ay) < 0.8,
        2: (y < 0.7) & (ax < (0.7 - y) * 0.6) & (y > -0.9),
        3: ((ax < 0.28) & (ay < 1.0)) | ((ay < 0.28) & (ax < 1.0)),
        4: (r > 0.55) & (r < 1.0),
        5: (ay < 0.3) & (ax < 1.0),
        6: (ax < 0.3) & (ay < 1.0),
        7: ax + ay < 1.0,
        8: (np.abs(ax - ay) < 0.3) & (np.maximum(ax, ay) < 0.85),
        9: ((x - 0.55) ** 2 + y * y < 0.16) | ((x + 0.55) ** 2 + y * y < 0.16),
    }
    return masks[label]


def render_sample(seed: int, split: str, index: int, image_size: int) -> tuple[np.ndarray, int, float]:
    """Draw one sample.

    Returns ``(image, label, difficulty)``: image is float32 ``(3, image_size, image_size)`` in [0, 1].
    """
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
    label = int(rng.integers(len(CLASS_NAMES)))
    d = float(rng.uniform())
    grid = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size * 2.0 - 1.0
    v, u = np.meshgrid(grid, grid, indexing="ij")

    gray = rng.uniform(0.3, 0.7)
    bg = np.clip(gray + rng.uniform(-0.12, 0.12, 3), 0, 1)
    contrast = 0.55 * (1.0 - 0.65 * d)
    sign = 1.0 if gray < 0.5 else -1.0
    fg = np.clip(bg + sign * contrast * rng.uniform(0.8, 1.2, 3), 0, 1)
    image = np.broadcast_to(bg[:, None, None], (3, image_size, image_size)).astype(np.float32).copy()

    # Clutter first, so the shape is drawn on top of it.
    for _ in range(int(round(4 * d * rng.uniform(0.5, 1.0)))):
        cx, cy = rng.uniform(-0.9, 0.9, 2)
        rx, ry = rng.uniform(0.05, 0.25, 2)
        blob = ((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2 < 1.0
        colour = np.clip(bg + rng.choice([-1.0, 1.0]) * contrast * rng.uniform(0.5, 1.2, 3), 0, 1)
        image[:, blob] = colour[:, None]

    scale = rng.uniform(0.5, 0.75) * (1.0 - 0.3 * d)
    cx, cy = rng.uniform(-0.8 + scale, 0.8 - scale, 2)
    theta = rng.uniform(-0.3, 0.3)
    c, s = np.cos(theta), np.sin(theta)
    x = ((u - cx) * c + (v - cy) * s) / scale
    y = (-(u - cx) * s + (v - cy) * c) / scale
    mask = _shape_mask(label, x, y)
    image[:, mask] = fg[:, None]

    image += rng.normal(0.0, 0.02 + 0.14 * d, image.shape).astype(np.float32)
    return np.clip(image, 0.0, 1.0), label, d


class QuickstartShapes(Dataset):
    """The quickstart dataset, rendered once into memory (a few MB at 32 px).

    Items are ``(image, label)`` with image ``(3, image_size, image_size)`` float32, normalised with
    ``MEAN``/``STD`` after the optional ``flip`` augmentation (all shapes are left-right symmetric).
    """

    classes = CLASS_NAMES

    def __init__(self, split: str, num_samples: int, image_size: int = 32, seed: int = 0, flip: bool = False):
        if split not in _SPLIT_IDS:
            raise ValueError(f"split must be one of {sorted(_SPLIT_IDS)}, got {split!r}")
        samples = [render_sample(seed, split, i, image_size) for i in range(num_samples)]
        self.images = torch.from_numpy(np.stack([s[0] for s in samples]))
        self.labels = torch.tensor([s[1] for s in samples], dtype=torch.long)
        self.difficulty = torch.tensor([s[2] for s in samples])
        self.flip = flip
        self._mean = torch.tensor(MEAN).view(3, 1, 1)
        self._std = torch.tensor(STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.images[index]
        # Flip decided by torch's RNG so DataLoader worker seeding makes it repeatable.
        if self.flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return (image - self._mean) / self._std, int(self.labels[index])


def write_samples(folder: str | Path, count: int, image_size: int = 32, seed: int = 0) -> list[Path]:
    """Save the first ``count`` validation samples as PNG files named ``<index>_<class>.png``; returns the paths.

    Images to try the device CLI on (``python -m device classify ... samples/*.png``) on a machine with no data.
    """
    from PIL import Image

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        pixels, label, _ = render_sample(seed, "val", i, image_size)
        path = out / f"{i:04d}_{CLASS_NAMES[label]}.png"
        Image.fromarray((pixels.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m models.quickstart",
                                     description="write quickstart validation images as PNG files")
    parser.add_argument("folder")
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    for written in write_samples(args.folder, args.count, args.size):
        print(written)
