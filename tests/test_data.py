"""Datasets on the real files in ../shared/data: MedMNIST checks, folder splits, k-fold, bad input."""
from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch

from medmamba.config import DataConfig
from medmamba.data import DataError, build_datasets
from medmamba.errors import ConfigError


def test_breastmnist_official_splits(medmnist_root):
    d = build_datasets(DataConfig(name="breastmnist", root=str(medmnist_root), size=28))
    assert (len(d.train), len(d.val), len(d.test)) == (546, 78, 156)
    assert d.class_names == ["malignant", "normal, benign"] and d.checksum == "750601b1f35ba3300ea97c75c52ff8f6"
    image, label = d.train[0]
    assert image.shape == (3, 28, 28) and image.dtype == torch.float32 and label in (0, 1)
    assert -1.0 <= image.min() and image.max() <= 1.0
    assert torch.equal(image[0], image[1])  # grayscale repeated to 3 channels


def test_resize_and_autoaugment(medmnist_root):
    d = build_datasets(DataConfig(name="pneumoniamnist", root=str(medmnist_root), size=28, augment="autoaugment"))
    assert d.train.transform is not d.test.transform
    assert "AutoAugment" in repr(d.train.transform) and "AutoAugment" not in repr(d.test.transform)


def test_md5_mismatch_and_override(medmnist_root, tmp_path):
    data = dict(np.load(medmnist_root / "breastmnist.npz"))
    data["train_labels"] = data["train_labels"].copy()
    np.savez(tmp_path / "breastmnist.npz", **data)  # same content, different bytes
    with pytest.raises(DataError, match=r"breastmnist.npz has MD5 [0-9a-f]{32}, expected 750601b1f35ba3300ea97c75c52ff8f6"):
        build_datasets(DataConfig(name="breastmnist", root=str(tmp_path)))
    d = build_datasets(DataConfig(name="breastmnist", root=str(tmp_path), allow_md5_mismatch=True))
    assert len(d.train) == 546


def test_missing_file_offline_names_file_md5_and_url(tmp_path):
    with pytest.raises(DataError, match=r"breastmnist_64.npz not found.*zenodo.*MD5 [0-9a-f]{32}"):
        build_datasets(DataConfig(name="breastmnist", root=str(tmp_path), size=64, download=False))


def test_failed_download_says_where_to_put_the_file(tmp_path):
    # The MedMNIST host is unreachable from these machines: the attempt must fail clearly.
    with pytest.raises(DataError, match=r"could not download breastmnist.npz from .*put it at .*breastmnist.npz"):
        build_datasets(DataConfig(name="breastmnist", root=str(tmp_path), download=True))


@pytest.mark.parametrize("name,message", [
    ("imagenet", "unknown dataset 'imagenet'"),
    ("chestmnist", "multi-label"),
    ("organmnist3d", "unknown dataset"),
])
def test_unknown_and_unsupported_names(name, message, tmp_path):
    with pytest.raises(DataError, match=message):
        build_datasets(DataConfig(name=name, root=str(tmp_path)))


def test_folder_stratified_split_is_deterministic(mednist_root):
    cfg = DataConfig(name="folder", root=str(mednist_root), size=32, seed=3)
    a, b = build_datasets(cfg), build_datasets(cfg)
    assert a.class_names == ["AbdomenCT", "BreastMRI", "CXR", "ChestCT", "Hand", "HeadCT"]
    # 60/10/30 of the 477 distinct images (four HeadCT files are one image: they stay in one split)
    assert (len(a.train), len(a.val), len(a.test)) == (288, 48, 144)
    assert a.train.samples == b.train.samples and a.checksum == b.checksum
    for split in (a.train, a.val, a.test):  # stratified: every class in every split, near 1/6 each
        counts = np.bincount([label for _, label in split.samples], minlength=6)
        assert counts.min() >= len(split) // 6 - 1
    copies = {"000044.jpeg", "000046.jpeg", "000050.jpeg", "000054.jpeg"}
    assert len({(mednist_root / "HeadCT" / name).read_bytes() for name in copies}) == 1
    assert [sum(p.parent.name == "HeadCT" and p.name in copies for p, _ in s.samples) for s in (a.train, a.val, a.test)
            ].count(4) == 1  # byte-identical copies never straddle two splits
    paths = [set(p for p, _ in s.samples) for s in (a.train, a.val, a.test)]
    assert not (paths[0] & paths[1] or paths[0] & paths[2] or paths[1] & paths[2])
    assert a.test[0][0].shape == (3, 32, 32)


def test_kfold_test_sets_partition_the_data(mednist_root):
    tests = [build_datasets(DataConfig(name="folder", root=str(mednist_root), fold=k, num_folds=5)).test
             for k in range(5)]
    seen = [p for t in tests for p, _ in t.samples]
    assert len(seen) == len(set(seen)) == 480 and all(95 <= len(t) <= 99 for t in tests)  # 477 distinct images


def _copy_classes(src, dst, classes, per_class=10):
    for c in classes:
        (dst / c).mkdir(parents=True)
        for f in sorted((src / c).iterdir())[:per_class]:
            shutil.copy(f, dst / c / f.name)


def test_more_folds_than_a_class_has_images_is_a_data_error(mednist_root, tmp_path):
    _copy_classes(mednist_root, tmp_path, ["CXR", "Hand"], per_class=3)  # was scikit-learn's ValueError
    with pytest.raises(DataError, match=r"data.num_folds=5 is more folds than any class has images \(the most: 3, "
                                        r"in 'CXR'\); use fewer folds"):
        build_datasets(DataConfig(name="folder", root=str(tmp_path), fold=0, num_folds=5))
    assert len(build_datasets(DataConfig(name="folder", root=str(tmp_path), fold=0, num_folds=3)).test) == 2


def test_given_split_folders_are_used(mednist_root, tmp_path, caplog):
    for i, split in enumerate(("train", "val", "test")):
        for c in ("CXR", "Hand"):
            (tmp_path / split / c).mkdir(parents=True)
            for f in sorted((mednist_root / c).iterdir())[4 * i:4 * i + 4]:
                shutil.copy(f, tmp_path / split / c / f.name)
    with caplog.at_level("WARNING"):
        d = build_datasets(DataConfig(name="folder", root=str(tmp_path)))
    assert (len(d.train), len(d.val), len(d.test)) == (8, 8, 8) and d.class_names == ["CXR", "Hand"]
    assert "byte-identical" not in caplog.text
    for f in sorted((tmp_path / "train" / "CXR").iterdir())[:3]:  # the same image exported again, renamed
        shutil.copy(f, tmp_path / "test" / "CXR" / f"copy-{f.name}")
    with caplog.at_level("WARNING"):
        build_datasets(DataConfig(name="folder", root=str(tmp_path)))
    assert "3 of the test split's 11 images are byte-identical to training images (e.g. " in caplog.text
    assert "so its metrics will be optimistic" in caplog.text and "val split" not in caplog.text
    with pytest.raises(DataError, match="is split already .* so every fold would be that split"):
        build_datasets(DataConfig(name="folder", root=str(tmp_path), fold=0))  # was 5 identical "folds", std 0


def test_corrupt_images_are_listed_or_skipped(mednist_root, tmp_path):
    _copy_classes(mednist_root, tmp_path, ["CXR", "Hand"], per_class=20)
    (tmp_path / "CXR" / "broken.jpeg").write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp_path / "Hand" / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"(?s)2 unreadable images.*CXR/broken.jpeg.*\n.*Hand/empty.png"):
        build_datasets(DataConfig(name="folder", root=str(tmp_path)))
    d = build_datasets(DataConfig(name="folder", root=str(tmp_path), skip_corrupt=True))
    assert len(d.train) + len(d.val) + len(d.test) == 40


def test_what_notebooks_and_macs_leave_beside_images_is_not_data(mednist_root, tmp_path):
    _copy_classes(mednist_root, tmp_path, ["CXR", "Hand"], per_class=20)
    clean = build_datasets(DataConfig(name="folder", root=str(tmp_path)))
    for c in ("CXR", "Hand"):
        (tmp_path / c / "._000000.jpeg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # a resource fork
        (tmp_path / c / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
        (tmp_path / c / ".ipynb_checkpoints").mkdir()  # a notebook's copy of an image: a duplicate
        shutil.copy(tmp_path / c / "000000.jpeg", tmp_path / c / ".ipynb_checkpoints" / "000000-checkpoint.jpeg")
    _copy_classes(tmp_path, tmp_path / "__MACOSX", ["CXR"], per_class=1)  # a zip's forks, not a class
    d = build_datasets(DataConfig(name="folder", root=str(tmp_path)))
    assert d.class_names == ["CXR", "Hand"]
    for split in ("train", "val", "test"):
        assert getattr(d, split).samples == getattr(clean, split).samples


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="data.root is required"):
        build_datasets(DataConfig(name="folder"))
    with pytest.raises(DataError, match="does not exist"):
        build_datasets(DataConfig(name="folder", root=str(tmp_path / "nope")))
    (tmp_path / "only").mkdir()
    with pytest.raises(DataError, match=r"class folders \['only'\] hold no readable images"):
        build_datasets(DataConfig(name="folder", root=str(tmp_path)))


def test_a_class_folder_without_images_is_named_not_dropped(mednist_root, tmp_path):
    for split in ("train", "val", "test"):
        _copy_classes(mednist_root, tmp_path / split, ["CXR", "Hand"], per_class=4)
    _copy_classes(mednist_root, tmp_path / "train" / ".cache", ["CXR"], per_class=1)  # hidden folders are not classes
    for image in (tmp_path / "val" / "Hand").iterdir():  # a class missing from one split only: a warning
        image.unlink()
    assert build_datasets(DataConfig(name="folder", root=str(tmp_path))).class_names == ["CXR", "Hand"]
    for split in ("train", "val", "test"):
        (tmp_path / split / "BreastMRI").mkdir()
        (tmp_path / split / "BreastMRI" / "scan.dcm").write_bytes(b"DICM")
    with pytest.raises(DataError, match=r"class folders \['BreastMRI'\] hold no readable images \(.bmp, .*\); "
                                        r"they hold 3 .dcm files: add or convert"):
        build_datasets(DataConfig(name="folder", root=str(tmp_path)))


def test_bad_size_and_partial_split_folders(medmnist_root, mednist_root, tmp_path):
    with pytest.raises(DataError, match=r"MedMNIST has sizes \(28, 64, 128, 224\); data.size is 100"):
        build_datasets(DataConfig(name="breastmnist", root=str(medmnist_root), size=100))
    _copy_classes(mednist_root, tmp_path / "train", ["CXR", "Hand"], per_class=2)
    with pytest.raises(DataError, match=r"has split folders \['train'\]; expected all of \['train', 'val', 'test'\]"):
        build_datasets(DataConfig(name="folder", root=str(tmp_path)))


def test_fold_on_medmnist_is_refused(medmnist_root):
    with pytest.raises(DataError, match="data.fold selects a k-fold split of an image folder; breastmnist has official splits"):
        build_datasets(DataConfig(name="breastmnist", root=str(medmnist_root), fold=0))


def test_the_positive_class_of_binary_datasets(medmnist_root, mednist_root, tmp_path):
    breast = build_datasets(DataConfig(name="breastmnist", root=str(medmnist_root)))
    pneumonia = build_datasets(DataConfig(name="pneumoniamnist", root=str(medmnist_root)))
    assert breast.class_names[breast.positive_class] == "malignant" and breast.positive_class == 0
    assert pneumonia.class_names[pneumonia.positive_class] == "pneumonia"
    for name in ("BreastMRI", "CXR"):
        (tmp_path / name).symlink_to(mednist_root / name)
    folder = build_datasets(DataConfig(name="folder", root=str(tmp_path)))
    assert folder.class_names == ["BreastMRI", "CXR"] and folder.positive_class == 1  # the second, sorted
    chosen = build_datasets(DataConfig(name="folder", root=str(tmp_path), positive_class="BreastMRI"))
    assert chosen.positive_class == 0
    with pytest.raises(DataError, match=r"data.positive_class is 'Hand'; the classes are \['BreastMRI', 'CXR'\]"):
        build_datasets(DataConfig(name="folder", root=str(tmp_path), positive_class="Hand"))


def test_high_bit_depth_alpha_and_cmyk_images_become_the_expected_rgb():
    from PIL import Image

    from medmamba.data import to_rgb

    gradient = np.linspace(0, 65535, 256).astype(np.uint16).reshape(16, 16)  # a full-range 16-bit export
    for im in (Image.fromarray(gradient), Image.fromarray(gradient).convert("I")):  # "I;16" and "I"
        rgb = np.asarray(to_rgb(im))
        assert rgb.shape == (16, 16, 3) and (rgb[..., 0] == rgb[..., 2]).all()
        np.testing.assert_array_equal(rgb[..., 0], np.rint(gradient / 257).astype(np.uint8))  # not clipped at 255
        assert (rgb == 255).mean() < 0.01
    rgba = Image.new("RGBA", (2, 2), (10, 20, 30, 0))
    assert np.asarray(to_rgb(rgba))[0, 0].tolist() == [10, 20, 30]
    cmyk = Image.new("CMYK", (2, 2), (255, 0, 0, 0))  # full cyan
    assert np.asarray(to_rgb(cmyk))[0, 0].tolist() == [0, 255, 255]
    assert np.asarray(to_rgb(Image.new("CMYK", (1, 1), (0, 0, 0, 255))))[0, 0].tolist() == [0, 0, 0]
    floats = Image.fromarray(np.array([[0.5, 1.5], [2.5, 4.5]], dtype=np.float32))  # min-max range
    assert np.asarray(to_rgb(floats))[..., 0].tolist() == [[0, 64], [128, 255]]


def test_16_bit_pngs_in_an_image_folder_keep_their_contrast(tmp_path):
    from PIL import Image

    for label, level in (("dark", 8000), ("bright", 50000)):
        (tmp_path / label).mkdir()
        for i in range(6):
            Image.fromarray(np.full((8, 8), level + i, dtype=np.uint16)).save(tmp_path / label / f"{i}.png")
    data = build_datasets(DataConfig(name="folder", root=str(tmp_path), size=8, split_ratios=[0.5, 0.25, 0.25]))
    x, y = data.train[0]
    expected = (round((8000 if data.class_names[y] == "dark" else 50000) / 257) / 255 - 0.5) / 0.5
    assert x.mean().item() == pytest.approx(expected, abs=0.01) and x.max() < 1  # was 1.0 (clipped white)


def test_twelve_bit_images_are_named_and_a_window_keeps_their_contrast(tmp_path, caplog):
    from PIL import Image

    for label, level in (("dark", 1000), ("bright", 3000)):  # 12-bit values, as a CT or X-ray export holds
        (tmp_path / label).mkdir()
        for i in range(6):
            Image.fromarray(np.full((8, 8), level + 100 * i, dtype=np.uint16)).save(tmp_path / label / f"{i}.png")
    cfg = DataConfig(name="folder", root=str(tmp_path), size=8, split_ratios=[0.5, 0.25, 0.25])
    data = build_datasets(cfg)
    assert "reach only 3500, so scaled from 0-65535 they keep 14 grey levels: set data.window=[0, 4095]" in caplog.text
    caplog.clear()
    windowed = build_datasets(dataclasses.replace(cfg, window=[0, 4095]))
    assert "grey levels" not in caplog.text
    for split in ("train", "val", "test"):
        plain, window = getattr(data, split), getattr(windowed, split)
        for (x, _), (w, _), (path, _) in zip(plain, window, plain.samples):
            value = int(np.asarray(Image.open(path)).max())
            assert (x.mean().item() * 0.5 + 0.5) * 255 == pytest.approx(round(value / 257), abs=1e-4)  # near black
            assert (w.mean().item() * 0.5 + 0.5) * 4095 == pytest.approx(value, abs=4095 / 255 / 2 + 1e-3)


def test_a_window_maps_floating_point_images_and_bad_windows_are_refused(tmp_path):
    from PIL import Image

    from medmamba.config import load_config
    from medmamba.data import to_rgb

    hu = Image.fromarray(np.array([[-2000.0, -1000.0], [0.0, 1000.0]], dtype=np.float32))  # CT units, as mode F
    assert np.asarray(to_rgb(hu, [-1000, 1000]))[..., 0].tolist() == [[0, 0], [128, 255]]  # clipped below the window
    assert np.asarray(to_rgb(hu))[..., 0].tolist() == [[0, 85], [170, 255]]  # its own min-max
    with pytest.raises(ConfigError, match=r"data.window: \[low, high\] with low < high, got \[4095.0, 0.0\]"):
        load_config(None, ["data.window=[4095, 0]"])


def test_a_truncated_jpeg_is_found_before_training(mednist_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(mednist_root, root)
    victim = sorted((root / "Hand").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[: len(victim.read_bytes()) // 2])  # passes Image.verify
    with pytest.raises(DataError, match=f"(?s)1 unreadable images .*{victim.name}"):
        build_datasets(DataConfig(name="folder", root=str(root)))
    data = build_datasets(DataConfig(name="folder", root=str(root), skip_corrupt=True))
    assert victim not in {path for split in (data.train, data.val, data.test) for path, _ in split.samples}
    # a file that breaks after the check fails with its name when it is loaded
    loaded = data.train.samples[0][0]
    loaded.write_bytes(b"broken")
    with pytest.raises(DataError, match=f"{loaded} cannot be decoded"):
        data.train[0]
