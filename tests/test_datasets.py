import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from models.config import ConfigError
from models.datasets import build_datasets
from models.quickstart import CLASS_NAMES, QuickstartShapes, render_sample


def make_tiny_stanford_cars(root, n_train=6, n_test=4, classes=("Audi A1 2012", "BMW M3 2010", "Fiat 500 2012")):
    """Write a tiny StanfordCars in torchvision's devkit layout (images + .mat annotations)."""
    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    scipy.io.savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array(classes, dtype=object)})
    rng = np.random.default_rng(0)

    def split(folder, n, annos_path):
        (base / folder).mkdir()
        records = []
        for i in range(n):
            name = f"{i + 1:05d}.jpg"
            Image.fromarray(rng.integers(0, 255, (40 + i, 60, 3), dtype=np.uint8)).save(base / folder / name)
            records.append((1, 1, 59, 39 + i, i % len(classes) + 1, name))
        dtype = [("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"), ("class", "O"),
                 ("fname", "O")]
        scipy.io.savemat(annos_path, {"annotations": np.array(records, dtype=dtype)})

    split("cars_train", n_train, base / "devkit" / "cars_train_annos.mat")
    split("cars_test", n_test, base / "cars_test_annos_withlabels.mat")


def test_stanford_cars_layout_loads(tmp_path):
    make_tiny_stanford_cars(tmp_path)
    data = build_datasets("stanford_cars", str(tmp_path), 32, 36, 0.35, 1, 1, 0)
    assert data.class_names == ["Audi A1 2012", "BMW M3 2010", "Fiat 500 2012"]
    assert len(data.train) == 6 and len(data.val) == 4
    image, label = data.val[2]
    assert image.shape == (3, 32, 32) and label == 2
    assert data.preprocess.resize_size == 36


def test_missing_dataset_names_data_root(tmp_path):
    with pytest.raises(ConfigError, match="data_root"):
        build_datasets("stanford_cars", str(tmp_path), 32, None, 0.35, 1, 1, 0)
    with pytest.raises(ConfigError, match="data_root"):
        build_datasets("imagefolder", str(tmp_path), 32, None, 0.35, 1, 1, 0)


def test_imagefolder(tmp_path):
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (50, 40), (10, 200, 30)).save(tmp_path / split / cls / "a.png")
    data = build_datasets("imagefolder", str(tmp_path), 32, None, 0.35, 1, 1, 0)
    assert data.class_names == ["cat", "dog"] and data.val[1][0].shape == (3, 32, 32)


def test_quickstart_is_deterministic_and_varied():
    a, la, da = render_sample(0, "train", 17, 32)
    b, lb, db = render_sample(0, "train", 17, 32)
    assert np.array_equal(a, b) and la == lb and da == db
    other, _, _ = render_sample(1, "train", 17, 32)
    assert not np.array_equal(a, other)
    ds = QuickstartShapes("val", 500, 32, seed=0)
    assert len(CLASS_NAMES) >= 10
    counts = torch.bincount(ds.labels, minlength=len(CLASS_NAMES))
    assert (counts > 20).all()  # every class present
    assert ds.difficulty.min() < 0.1 and ds.difficulty.max() > 0.9
    image, label = ds[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32


def test_shared_stanford_cars_dev_loads(shared_dir):
    root = shared_dir / "data" / "stanford_cars_dev"
    if not root.is_dir():
        pytest.skip("no shared StanfordCars dev set")
    data = build_datasets("stanford_cars", str(root), 112, 128, 0.35, 1, 1, 0)
    assert len(data.class_names) == 196 and len(data.train) == 5333 and len(data.val) == 1243
    assert data.val[0][0].shape == (3, 112, 112)


def test_quickstart_samples_written_as_labelled_pngs(tmp_path):
    from models.quickstart import write_samples

    paths = write_samples(tmp_path / "s", 3)
    for i, path in enumerate(paths):
        pixels, label, _ = render_sample(0, "val", i, 32)
        assert path.name == f"{i:04d}_{CLASS_NAMES[label]}.png"
        image = np.asarray(Image.open(path))
        assert image.shape == (32, 32, 3)
        assert np.abs(image / 255.0 - pixels.transpose(1, 2, 0)).max() <= 0.5 / 255 + 1e-6


def test_a_root_with_only_the_test_split_is_enough_for_evaluation(tmp_path):
    import shutil

    make_tiny_stanford_cars(tmp_path)
    shutil.rmtree(tmp_path / "stanford_cars" / "cars_train")
    (tmp_path / "stanford_cars" / "devkit" / "cars_train_annos.mat").unlink()
    data = build_datasets("stanford_cars", str(tmp_path), 32, None, 0.35, 1, 1, 0, with_train=False)
    assert len(data.val) == 4 and len(data.train) == 0 and len(data.class_names) == 3
    with pytest.raises(ConfigError, match="data_root.*train"):
        build_datasets("stanford_cars", str(tmp_path), 32, None, 0.35, 1, 1, 0)


def test_calibration_slice_is_held_out_of_training(tmp_path):
    make_tiny_stanford_cars(tmp_path, n_train=20)
    data = build_datasets("stanford_cars", str(tmp_path), 32, None, 0.35, 1, 1, 0, calibration_fraction=0.25)
    held, kept = set(data.calibration.indices), set(data.train.indices)
    assert len(held) == 5 and len(kept) == 15 and not held & kept
    # Eval transform on the held-out images: the same file gives the same tensor twice (no random crop).
    torch.testing.assert_close(data.calibration[0][0], data.calibration[0][0])
    assert data.calibration.dataset.transform is not data.train.dataset.transform
    again = build_datasets("stanford_cars", str(tmp_path), 32, None, 0.35, 1, 1, 0, calibration_fraction=0.25)
    assert set(again.calibration.indices) == held  # seeded
    qs = build_datasets("quickstart", "", 32, None, 0.35, 40, 8, 0, calibration_fraction=0.1)
    assert len(qs.train) == 36 and len(qs.calibration) == 4 and not qs.calibration.dataset.flip
    assert build_datasets("quickstart", "", 32, None, 0.35, 40, 8, 0).calibration is None
