"""Datasets: MedMNIST 2D through ``medmnist``, and image folders with splits and k-fold.

``build_datasets(cfg.data)`` returns train/val/test datasets of (image tensor, int label) with
the same transforms for both sources: RGB (grayscale repeated to 3 channels), resize to
``data.size``, normalise to [-1, 1]; AutoAugment on the training split when asked.
"""
from __future__ import annotations

import collections
import functools
import hashlib
import io
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image
import torch
from sklearn.model_selection import StratifiedKFold, train_test_split
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset
from torchvision import transforms

from .config import DataConfig
from .errors import ConfigError, DataError


def _medmnist():
    """The medmnist package, imported when a MedMNIST set is used (it takes a second: every Flower
    ClientApp process and the GPU check would pay it for nothing)."""
    import medmnist

    return medmnist

log = logging.getLogger(__name__)

MEDMNIST_2D = ("pathmnist", "chestmnist", "dermamnist", "octmnist", "pneumoniamnist", "retinamnist",
               "breastmnist", "bloodmnist", "tissuemnist", "organamnist", "organcmnist", "organsmnist")
MEDMNIST_SIZES = (28, 64, 128, 224)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"}
SPLITS = ("train", "val", "test")
# the disease class of each binary MedMNIST set: its precision/sensitivity/specificity/F1 are the headline
MEDMNIST_POSITIVE = {"pneumoniamnist": "pneumonia", "breastmnist": "malignant"}


@dataclass
class Datasets:
    train: Dataset
    val: Dataset
    test: Dataset
    class_names: list[str]
    name: str
    checksum: str  # MD5 of the MedMNIST file, or of the folder's sorted file list
    positive_class: int = 1  # binary tasks: index of the disease class (data.positive_class)
    unmapped: dict[str, int] = field(default_factory=dict)  # images of classes a class map dropped, per class

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def all(self) -> Dataset:
        """Every image of the dataset: train, val and test together (an external test set)."""
        return ConcatDataset([self.train, self.val, self.test])


def parse_class_map(text: str) -> dict[str, str]:
    """``"SRC=DST,SRC2=DST"`` -> {SRC: DST, ...}: an external folder's class names onto a model's.
    A comma splits pairs only before another ``NAME=``, so names may hold commas ("normal, benign")."""
    pairs = [part.strip().partition("=") for part in re.split(r",(?=[^,=]*=)", text.strip().strip(","))]
    bad = [src + sep + dst for src, sep, dst in pairs if not (sep and src.strip() and dst.strip())]
    if bad:
        raise ConfigError(f"class map {text!r}: expected SRC=DST pairs separated by commas "
                          f"(e.g. NORMAL=normal,PNEUMONIA=pneumonia); not a pair: {bad[0]!r}")
    sources = [src.strip() for src, _, _ in pairs]
    twice = [src for i, src in enumerate(sources) if src in sources[:i]]
    if twice:
        raise ConfigError(f"class map {text!r}: {twice[0]!r} is mapped twice; map each source class once")
    return {src.strip(): dst.strip() for src, _, dst in pairs}


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0, num_workers: int = 0,
                sampler=None) -> DataLoader:
    """A DataLoader whose shuffle order comes from its own ``generator`` (seeded with ``seed``);
    batches are pinned when a GPU is present, so the training loop's non_blocking copies overlap."""
    generator = torch.Generator().manual_seed(seed)
    training = shuffle or sampler is not None
    # a final training batch of one example breaks BatchNorm on 1x1 maps (28 px inputs): drop it
    drop_last = training and len(sampler if sampler is not None else dataset) % batch_size == 1
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=num_workers, generator=generator, drop_last=drop_last,
                      persistent_workers=num_workers > 0,
                      pin_memory=torch.cuda.is_available())  # page-locked batches: non_blocking copies to the GPU


def to_rgb(im: Image.Image, window: list[float] | None = None) -> Image.Image:
    """8-bit RGB of an image as PIL opens it. 16- and 32-bit integer grayscale (16-bit PNG and TIFF
    exports) is scaled from the full 16-bit range, which ``convert("RGB")`` would clip at 255;
    floating-point grayscale from its own min-max range; either from ``window`` [low, high]
    (clipped) when given. Alpha is dropped, CMYK and palettes are converted by PIL."""
    if im.mode.startswith("I") or im.mode == "F":
        pixels = np.nan_to_num(np.asarray(im, dtype=np.float64))
        if window is not None:
            low, span = window[0], window[1] - window[0]
        elif im.mode == "F":
            low, span = pixels.min(), np.ptp(pixels) or 1
        else:  # I;16, I;16B, I
            low, span = 0.0, 65535.0
        im = Image.fromarray(np.rint(np.clip((pixels - low) / span, 0, 1) * 255).astype(np.uint8), "L")
    return im.convert("RGB")


def image_transform(size: int, augment: str = "none", window: list[float] | None = None) -> transforms.Compose:
    steps = [transforms.Lambda(functools.partial(to_rgb, window=window)), transforms.Resize((size, size))]
    if augment == "autoaugment":
        steps.append(transforms.AutoAugment())
    steps += [transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)]
    return transforms.Compose(steps)


def build_datasets(cfg: DataConfig, classes: list[str] | None = None, class_map: dict[str, str] | None = None,
                   whole: bool = False) -> Datasets:
    """The configured dataset's train, val and test splits. ``classes`` fixes an image folder's
    class list (and label indices), e.g. the same for every hospital of a federation or a model's
    classes for an external test set; ``class_map`` renames the folder's classes onto those
    (folders of classes it does not name are dropped and counted in ``unmapped``); ``whole`` puts
    every image of a folder in the test split (no train/val split of an external set)."""
    if cfg.root and Path(cfg.root).expanduser().is_file():
        raise DataError(f"data.root {cfg.root} is a file; expected a folder")
    if cfg.name == "folder":
        data = _folder_datasets(cfg, classes, class_map, whole)
    elif class_map:
        raise ConfigError(f"a class map renames an image folder's classes; {cfg.name} is not a folder")
    elif cfg.name in MEDMNIST_2D:
        data = _medmnist_datasets(cfg)
    else:
        known = ", ".join(MEDMNIST_2D)
        raise DataError(f"unknown dataset {cfg.name!r}: expected 'folder' or a MedMNIST 2D flag ({known})")
    data.positive_class = positive_index(data.class_names, cfg.positive_class or MEDMNIST_POSITIVE.get(cfg.name))
    return data


def positive_index(class_names: list[str], name: str | None) -> int:
    """Index of the positive class ``name`` (None: the second class, e.g. of sorted folder names)."""
    if name is None:
        return 1
    if name not in class_names:
        raise DataError(f"data.positive_class is {name!r}; the classes are {class_names}")
    if len(class_names) != 2:
        log.warning("data.positive_class %r is ignored: %d classes, metrics are macro averages", name,
                    len(class_names))
    return class_names.index(name)


# ------------------------------------------------------------------------------------ MedMNIST
def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def medmnist_file(flag: str, size: int, root: Path) -> tuple[Path, str, str]:
    """(local path, expected MD5, download URL) of a MedMNIST file."""
    info = _medmnist().INFO[flag]
    suffix = "" if size == 28 else f"_{size}"
    return root / f"{flag}{suffix}.npz", info[f"MD5{suffix}"], info[f"url{suffix}"]


def medmnist_class_names(flag: str) -> list[str]:
    """A MedMNIST set's class names in label order."""
    labels = _medmnist().INFO[flag]["label"]
    return [labels[str(i)] for i in range(len(labels))]


def _label(target) -> int:
    return int(np.asarray(target).ravel()[0])


def _medmnist_datasets(cfg: DataConfig) -> Datasets:
    flag, info = cfg.name, _medmnist().INFO[cfg.name]
    if cfg.fold is not None:
        raise DataError(f"data.fold selects a k-fold split of an image folder; {flag} has official splits")
    if info["task"] == "multi-label, binary-class":
        raise DataError(f"{flag} is multi-label; single-label classification only (ChestMNIST is not supported)")
    if cfg.size not in MEDMNIST_SIZES:
        raise DataError(f"MedMNIST has sizes {MEDMNIST_SIZES}; data.size is {cfg.size}")
    root = Path(cfg.root).expanduser() if cfg.root else Path.home() / ".medmnist"
    path, md5, url = medmnist_file(flag, cfg.size, root)
    if not path.is_file():
        if not cfg.download:
            raise DataError(f"{path} not found and data.download is false; get it from {url} (MD5 {md5})")
        _download(flag, cfg.size, root, path, md5, url)
    actual = md5sum(path)
    if actual != md5:
        if not cfg.allow_md5_mismatch:
            raise DataError(f"{path} has MD5 {actual}, expected {md5} (medmnist.INFO); replace the file "
                            "or set data.allow_md5_mismatch=true to use it anyway")
        log.warning("%s has MD5 %s, expected %s: using it as data.allow_md5_mismatch is set", path, actual, md5)
    # ordinal RetinaMNIST is treated as multi-class, like the paper
    train_tf = image_transform(cfg.size, cfg.augment)
    eval_tf = image_transform(cfg.size)
    cls = getattr(_medmnist(), info["python_class"])
    try:
        splits = {
            s: cls(split=s, root=str(root), size=cfg.size, as_rgb=True, download=False,
                   transform=train_tf if s == "train" else eval_tf, target_transform=_label)
            for s in SPLITS
        }
    except Exception as exc:  # a truncated or foreign file (BadZipFile, missing arrays, wrong sizes)
        raise DataError(f"{path} is not a readable {flag} file ({type(exc).__name__}: {exc}); replace it "
                        f"(MD5 {md5}, from {url})") from exc
    return Datasets(**splits, class_names=medmnist_class_names(flag), name=flag, checksum=actual)


def _download(flag: str, size: int, root: Path, path: Path, md5: str, url: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    try:
        getattr(_medmnist(), _medmnist().INFO[flag]["python_class"])(split="train", root=str(root), size=size, download=True)
    except Exception as exc:  # unreachable host, proxy, partial file
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise DataError(f"could not download {path.name} from {url} ({type(exc).__name__}: {reason}); "
                        f"download it by hand and put it at {path} (MD5 {md5})") from exc
    if not path.is_file():
        raise DataError(f"download of {url} left no file at {path}; put it there by hand (MD5 {md5})")


# ------------------------------------------------------------------------------------ folders
class ImageFolderSplit(Dataset):
    """Images from (path, label) pairs as (transformed image, label)."""

    def __init__(self, samples: list[tuple[Path, int]], transform):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                return self.transform(im), label
        except (OSError, SyntaxError, ValueError) as exc:  # PIL's decode errors
            raise DataError(f"{path} cannot be decoded ({type(exc).__name__}: {exc}); it decoded when the dataset "
                            "was built, so it changed since: restore it or remove it") from exc


def is_hidden(name: str) -> bool:
    """Files and folders that tools leave beside images: hidden ones (.ipynb_checkpoints' copies of
    images, macOS's ._image.png resource forks, .DS_Store) and the __MACOSX folder of a zip made on a Mac."""
    return name.startswith(".") or name == "__MACOSX"


def subfolders(root: Path) -> list[Path]:
    """``root``'s sub-folders, hidden ones aside: an image folder's classes, or a federation's sites."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not is_hidden(p.name))


def _scan_classes(root: Path) -> list[tuple[Path, str]]:
    """Every image under each class folder, at any depth, none in or under a hidden name."""
    files = []
    for class_dir in subfolders(root):
        files += [(f, class_dir.name) for f in sorted(class_dir.rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES
                  and not any(is_hidden(part) for part in f.relative_to(class_dir).parts)]
    return files


def _check_no_empty_classes(roots: list[Path], per_split: dict[str, list[tuple[Path, str]]]) -> None:
    """DataError naming the class folders (hidden ones aside) with no readable image in any split,
    and what they hold instead (DICOM files, say), rather than training without those classes."""
    folders = {d.name for r in roots for d in subfolders(r)}
    empty = sorted(folders - {label for files in per_split.values() for _, label in files})
    if empty:
        other = collections.Counter(f.suffix.lower() or f.name for name in empty for r in roots if (r / name).is_dir()
                        for f in (r / name).rglob("*") if f.is_file() and f.suffix.lower() not in IMAGE_SUFFIXES)
        held = f"; they hold {', '.join(f'{n} {k}' for k, n in other.most_common(5))} files" if other else ""
        raise DataError(f"class folders {empty} hold no readable images ({', '.join(sorted(IMAGE_SUFFIXES))}){held}: "
                        "add or convert their images, or remove the folders")


class _Checked(NamedTuple):
    files: list[tuple[Path, str]]  # the readable images, with their class
    peak: int  # the brightest pixel of the integer images of more than 8 bits (0 if none)
    digests: dict[Path, str]  # each readable file's MD5


def _check_images(files: list[tuple[Path, str]], skip: bool) -> _Checked:
    """Drop (skip=True, logged) or report (DataError listing them) images PIL cannot decode
    (decoded in full: a truncated file passes ``Image.verify``)."""
    good, bad, peak, digests = [], [], 0, {}
    for path, label in files:
        try:
            data = path.read_bytes()
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                if im.mode.startswith("I"):
                    peak = max(peak, int(np.asarray(im).max()))
            good.append((path, label))
            digests[path] = hashlib.md5(data).hexdigest()
        except Exception as exc:
            bad.append(f"{path} ({type(exc).__name__})")
    if bad and not skip:
        listed = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise DataError(f"{len(bad)} unreadable images (set data.skip_corrupt=true to skip them):\n  {listed}")
    for item in bad:
        log.warning("skipping unreadable image %s", item)
    return _Checked(good, peak, digests)


def _warn_of_copies(per_split: dict[str, list[tuple[Path, str]]], digests: dict[Path, str]) -> None:
    """A warning for each given evaluation split holding byte-identical copies of training images (the
    same image exported twice, or under two names): its metrics would be optimistic."""
    seen = {digests[p]: p for p, _ in per_split["train"]}
    for split in ("val", "test"):
        copies = [(p, seen[digests[p]]) for p, _ in per_split[split] if digests[p] in seen]
        if copies:
            log.warning("%d of the %s split's %d images are byte-identical to training images (e.g. %s = %s), so "
                        "its metrics will be optimistic: remove the copies", len(copies), split,
                        len(per_split[split]), copies[0][0], copies[0][1])


def _warn_of_unused_bits(root: Path, peak: int) -> None:
    """A warning when 16-bit images use 12 bits or fewer (a CT or X-ray export, say): scaled from the
    full 16-bit range they keep at most 16 grey levels, unless ``data.window`` says their range."""
    if 255 < peak < 4096:
        log.warning("the 16-bit images in %s reach only %d, so scaled from 0-65535 they keep %d grey levels: "
                    "set data.window=[0, %d] (or a window of your own) to keep their contrast",
                    root, peak, peak // 257 + 1, 2 ** peak.bit_length() - 1)


def labels_of(dataset: Dataset) -> np.ndarray:
    """Every example's class index, without loading images (MedMNIST, image folders, Subset, ConcatDataset)."""
    if isinstance(dataset, Subset):
        return labels_of(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    if isinstance(dataset, ConcatDataset):
        return np.concatenate([labels_of(d) for d in dataset.datasets])
    if isinstance(dataset, ImageFolderSplit):
        return np.array([label for _, label in dataset.samples], dtype=np.int64)
    return np.asarray(dataset.labels).reshape(len(dataset), -1)[:, 0].astype(np.int64)  # medmnist


def _map_classes(per_split: dict[str, list[tuple[Path, str]]], class_map: dict[str, str], classes: list[str],
                 root: Path) -> tuple[dict[str, list[tuple[Path, str]]], dict[str, int]]:
    """Rename each image's class by ``class_map``; drop (and count) classes it does not name."""
    found = {label for files in per_split.values() for _, label in files}
    unknown_src = sorted(set(class_map) - found)
    if unknown_src:
        raise DataError(f"the class map names {unknown_src}, which {root} has no images of; its classes: {sorted(found)}")
    unknown_dst = sorted(set(class_map.values()) - set(classes))
    if unknown_dst:
        raise DataError(f"the class map maps onto {unknown_dst}, which the model does not have; its classes: {classes}")
    unmapped = collections.Counter(label for files in per_split.values() for _, label in files if label not in class_map)
    for label, count in sorted(unmapped.items()):
        log.warning("%s: %d images of class %r are dropped: the class map does not name it", root, count, label)
    mapped = {s: [(p, class_map[label]) for p, label in files if label in class_map] for s, files in per_split.items()}
    return mapped, dict(unmapped)


def _folder_datasets(cfg: DataConfig, classes: list[str] | None = None, class_map: dict[str, str] | None = None,
                     whole: bool = False) -> Datasets:
    if not cfg.root:
        raise DataError("data.root is required for data.name=folder")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    if class_map and classes is None:
        raise ConfigError("a class map needs the model's classes to map onto")
    given = [s for s in SPLITS if (root / s).is_dir()]
    if given and given != list(SPLITS):
        raise DataError(f"{root} has split folders {given}; expected all of {list(SPLITS)} or none")
    if given and cfg.fold is not None:  # every fold would be the given split
        raise DataError(f"data.fold: {root} is split already (train/val/test folders), so every fold would be "
                        "that split; k-fold needs the images in one folder per class")
    checked = {s: _check_images(_scan_classes(root / s if given else root), cfg.skip_corrupt)
               for s in (SPLITS if given else ["all"])}
    per_split = {s: c.files for s, c in checked.items()}
    if cfg.window is None:
        _warn_of_unused_bits(root, max(c.peak for c in checked.values()))
    _check_no_empty_classes([root / s for s in SPLITS] if given else [root], per_split)
    unmapped = {}
    if class_map:
        per_split, unmapped = _map_classes(per_split, class_map, classes, root)
    found = {label for files in per_split.values() for _, label in files}
    if classes is not None:
        unknown = found - set(classes)
        if unknown:
            raise DataError(f"{root} has class folders {sorted(unknown)} that are not among {classes} "
                            "(map them onto the model's classes with --class-map SRC=DST,...)")
        missing = sorted(set(classes) - found)
        if missing:
            log.warning("%s has no images of %s", root, missing)
    classes = classes if classes is not None else sorted(found)
    if len(found) < 2 and not whole:
        raise DataError(f"{root}: found {len(found)} class folders with images; need at least 2 (root/<class>/*)")
    if whole:
        per_split = {"train": [], "val": [], "test": [f for files in per_split.values() for f in files]}
    else:
        digests = {p: d for c in checked.values() for p, d in c.digests.items()}
        if given:  # the user's split: copies may straddle it
            _warn_of_copies(per_split, digests)
        else:  # copies stay together: none straddles two splits
            per_split = _split_files(per_split["all"], cfg, digests)
    for split, files in per_split.items():
        if not files and not (whole and split != "test"):
            raise DataError(f"{root}: the {split} split is empty")
        missing = set(classes) - {label for _, label in files}
        if missing and files:
            log.warning("%s split of %s has no images of %s", split, root, sorted(missing))
    index = {c: i for i, c in enumerate(classes)}
    listing = "\n".join(f"{p.relative_to(root)}\t{label}" for files in per_split.values() for p, label in files)
    train_tf, eval_tf = image_transform(cfg.size, cfg.augment, cfg.window), image_transform(cfg.size, window=cfg.window)
    splits = {
        s: ImageFolderSplit([(p, index[label]) for p, label in files], train_tf if s == "train" else eval_tf)
        for s, files in per_split.items()
    }
    return Datasets(**splits, class_names=classes, name=f"folder:{root.name}",
                    checksum=hashlib.md5(listing.encode()).hexdigest(), unmapped=unmapped)


def stratified_split(idx: np.ndarray, size: float, labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """train_test_split stratified by label; a class too small to stratify (e.g. one image)
    makes it a plain random split, with a warning."""
    try:
        return train_test_split(idx, test_size=size, stratify=labels, random_state=seed)
    except ValueError as exc:
        log.warning("split not stratified: %s", exc)
        return train_test_split(idx, test_size=size, random_state=seed)


def _split_files(files: list[tuple[Path, str]], cfg: DataConfig,
                 digests: dict[Path, str]) -> dict[str, list[tuple[Path, str]]]:
    """Deterministic stratified train/val/test split (ratios), or fold ``cfg.fold`` of k as test.
    Byte-identical files (``digests``) are one image: they go to the same split together."""
    copies: dict[str, list[int]] = {}
    for i, (path, _) in enumerate(files):
        copies.setdefault(digests[path], []).append(i)
    groups = list(copies.values())  # each distinct image's files: one, unless it was copied
    for group in groups:
        if len({files[i][1] for i in group}) > 1:
            log.warning("one image is in several classes: %s", ", ".join(f"{files[i][0]} ({files[i][1]})" for i in group))
    idx = np.arange(len(groups))
    labels = np.array([files[group[0]][1] for group in groups])
    train_r, val_r, test_r = cfg.split_ratios
    if cfg.fold is not None:
        counts = collections.Counter(labels.tolist())
        if cfg.num_folds > max(counts.values()):
            raise DataError(f"data.num_folds={cfg.num_folds} is more folds than any class has images (the most: "
                            f"{max(counts.values())}, in {max(counts, key=counts.get)!r}); use fewer folds")
        folds = StratifiedKFold(n_splits=cfg.num_folds, shuffle=True, random_state=cfg.seed)
        rest, test = list(folds.split(idx, labels))[cfg.fold]
        rest, test = idx[rest], idx[test]
    else:
        rest, test = stratified_split(idx, test_r, labels, cfg.seed)
    train, val = stratified_split(rest, val_r / (train_r + val_r), labels[rest], cfg.seed)
    return {name: [files[i] for i in sorted(i for g in part for i in groups[g])]
            for name, part in (("train", train), ("val", val), ("test", test))}
