"""Write a SPINN checkpoint from a torchvision MobileNetV2 state dict (no exits, ImageNet's 1000 classes).

    python -m models.import_torchvision /path/to/mobilenet_v2.pth runs/imagenet.pt

The class names come from torchvision's weight metadata (``MobileNet_V2_Weights.IMAGENET1K_V1``), the
preprocessing is torchvision's (resize 256, centre crop 224, ImageNet mean/std). The checkpoint serves,
streams and evaluates like a trained one (e.g. ``bench/progressive.py`` with ``dataset: imagefolder``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torchvision

from models.checkpoint import save_checkpoint
from models.config import ConfigError
from models.datasets import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from models.early_exit import EarlyExitMobileNetV2, ModelConfig, load_pretrained

log = logging.getLogger("models.import_torchvision")


def import_mobilenet_v2(weights: str, out: str, width_mult: float = 1.0) -> EarlyExitMobileNetV2:
    """Build the exit-less model, load ``weights`` (ConfigError naming ``pretrained`` if they do not fit) and
    save it as a checkpoint at ``out``."""
    model = EarlyExitMobileNetV2(ModelConfig(width_mult=width_mult, num_classes=1000, exits=[]), exit_points=[])
    load_pretrained(model, weights)
    names = list(torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"])
    save_checkpoint(out, model.eval(), names, Preprocess(224, 256, IMAGENET_MEAN, IMAGENET_STD))
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.import_torchvision", description=__doc__.split("\n\n")[0])
    parser.add_argument("weights", help="torchvision-format MobileNetV2 state dict (.pth)")
    parser.add_argument("out", help="checkpoint to write (.pt)")
    parser.add_argument("--width-mult", type=float, default=1.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        import_mobilenet_v2(args.weights, args.out, args.width_mult)
    except ConfigError as err:
        log.error("%s", err)
        return 2
    log.info("wrote %s", Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
