"""The papers' on-disk format: image folders plus a CSV manifest with header ``image,label``.

ClimbQ and LifeQuant read every dataset (CIFAR exported as JPG/PNG, SynDigits, Office, ImageCLEF, ImageNet)
from such CSVs: ``image`` is a path relative to a data dir (e.g. ``train/cat/3344.jpg``), ``label`` an integer
class index, no index column (original code: ClimbQ's ``longTailDataGeneator.py`` and LifeQuant's
``lifeLongDataGeneator.py`` write them). Small folders are decoded once into an :class:`InMemoryData`
(:func:`load_manifest_tensors`); large ones go through a ``DataLoader`` with torchvision transforms
(:func:`manifest_loader`).

The class list of a split is ``0 .. K-1``: ``K = num_classes`` when the caller declares it (e.g. the test
split gets the train split's count), else ``K = max(label) + 1``. :func:`read_manifest` checks the labels
against it before anything is sized by ``K``: labels are integers in ``[0, K)``, ``K >= 2`` and at least two
classes occur; an inferred class list must have every class present (a gap means a wrong label, such as
99999 among 0..9); a declared one that the split does not cover gets a :class:`DataWarning`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from .errors import DataError, DataTypeError, DataWarning
from .tensors import DeviceLike, InMemoryData, check_stats, normalize_uint8, resolve_device

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LARGE_IMAGE_SIZE = 64  # from this size on, train transforms use RandomResizedCrop (ImageNet style)
_MAX_LISTED = 5
_MAX_LABEL_DIGITS = 18  # a label with more digits is >= 10**18: beyond int64 and any class count


def _as_path(value: object, what: str) -> Path:
    if not isinstance(value, str | os.PathLike):
        raise DataTypeError(f"{what} must be a str or path, got {type(value).__name__} {value!r}")
    return Path(value).expanduser()


def _check_num_classes(num_classes: object) -> int | None:
    if num_classes is None:
        return None
    if not isinstance(num_classes, int) or isinstance(num_classes, bool):
        raise DataTypeError(f"num_classes must be an int or None, got {type(num_classes).__name__}")
    if num_classes < 2:
        raise DataError(f"num_classes must be >= 2 (a classifier needs at least two classes), got {num_classes}")
    return num_classes


def _rows(frame: pd.DataFrame, mask: np.ndarray, column: str) -> str:
    """'row 2: 'x', row 5: ...' for the first few rows where ``mask`` holds (CSV line = row + 2)."""
    pos = np.flatnonzero(mask)
    shown = ", ".join(f"line {p + 2}: {frame[column].iloc[p]!r}" for p in pos[:_MAX_LISTED])
    more = f" and {len(pos) - _MAX_LISTED} more" if len(pos) > _MAX_LISTED else ""
    return f"{shown}{more}"


def _missing_classes(present: np.ndarray, num_classes: int) -> tuple[int, str]:
    """``(count, "0, 1, 2 and 7 more")`` of the class indices in ``[0, num_classes)`` absent from ``present``
    (sorted, unique, all in range); never builds ``range(num_classes)``, which may be huge."""
    count = num_classes - present.size
    first = np.setdiff1d(np.arange(min(num_classes, present.size + _MAX_LISTED)), present)[:_MAX_LISTED]
    more = f" and {count - first.size} more" if count > first.size else ""
    return count, ", ".join(str(int(c)) for c in first) + more


def _check_label_range(frame: pd.DataFrame, values: np.ndarray, csv: Path, num_classes: int | None) -> None:
    """Labels against the class list ``0 .. K-1`` (module docstring): raises :class:`DataError` or warns."""
    negative = values < 0
    if negative.any():
        raise DataError(
            f"manifest {csv}: {int(negative.sum())} negative label(s) ({_rows(frame, negative, 'label')}); "
            f"labels must be class indices >= 0"
        )
    top = int(values.max())
    if num_classes is not None:
        too_big = values >= num_classes
        if too_big.any():
            raise DataError(
                f"manifest {csv}: {int(too_big.sum())} label(s) >= num_classes={num_classes} "
                f"({_rows(frame, too_big, 'label')}); fix the labels (class indices 0..{num_classes - 1}) or, "
                f"if the dataset really has more classes, pass num_classes >= {top + 1}"
            )
    present = np.unique(values)
    if present.size < 2:
        raise DataError(
            f"manifest {csv}: every row has label {top}, one class only; a classification split needs labels "
            f"of at least 2 classes (0, 1, ...): check the label column, or merge the per-class CSVs into one"
        )
    if num_classes is None:
        count, listed = _missing_classes(present, top + 1)
        if count:
            at_top = values == top
            raise DataError(
                f"manifest {csv}: labels run up to {top} ({_rows(frame, at_top, 'label')}) but "
                f"{count} class index(es) below it never occur ({listed}); the class list is 0..max(label), "
                f"so a gap means a wrong label: renumber the labels 0..{present.size - 1}, or pass "
                f"num_classes=K to declare classes this split lacks"
            )
    elif present.size < num_classes:
        count, listed = _missing_classes(present, num_classes)
        warnings.warn(
            f"manifest {csv}: {count} of the num_classes={num_classes} declared classes have no row ({listed}); "
            f"their accuracy cannot be measured on this split (add rows for them, or check num_classes)",
            DataWarning, stacklevel=3,
        )


def read_manifest(
    csv_path: str | os.PathLike,
    data_dir: str | os.PathLike,
    num_classes: int | None = None,
    check_files: bool = True,
) -> pd.DataFrame:
    """Read and validate an ``image,label`` manifest; returns its rows (``image`` str, ``label`` int64).

    Checks, each failing with a :class:`DataError` that says how to fix it: the CSV and ``data_dir`` exist;
    the CSV parses, has rows and ``image`` and ``label`` columns (other columns are kept); every label is an
    integer >= 0 (and < ``num_classes`` when given, which must be >= 2); at least two classes occur; with
    ``num_classes=None`` (class list inferred as ``0..max(label)``) every class up to the largest label
    occurs; no image path is empty; and, when ``check_files``, every ``data_dir / image`` is a file (the first
    few missing ones and the count are reported). A declared ``num_classes`` that this split does not cover
    (e.g. a test split without any row of class 7) gives a :class:`DataWarning` naming the missing classes.
    """
    csv = _as_path(csv_path, "csv_path")
    root = _as_path(data_dir, "data_dir")
    num_classes = _check_num_classes(num_classes)
    if not csv.is_file():
        raise DataError(
            f"manifest not found: {csv}; pass the path of an existing CSV with header 'image,label' "
            f"(e.g. one written by export_cifar_to_folder)"
        )
    if not root.is_dir():
        raise DataError(
            f"data_dir {root} is not a directory; pass the folder the CSV's image paths are relative to"
        )
    try:
        frame = pd.read_csv(csv, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(
            f"cannot parse manifest {csv} ({exc}); it must be a CSV with header 'image,label'"
        ) from exc
    frame.columns = [str(c).strip() for c in frame.columns]
    missing_cols = [c for c in ("image", "label") if c not in frame.columns]
    if missing_cols:
        raise DataError(
            f"manifest {csv} has no column(s) {missing_cols} (header: {list(frame.columns)}); "
            f"the first line must be 'image,label'"
        )
    if len(frame) == 0:
        raise DataError(f"manifest {csv} has a header but no rows; add one 'path,label' line per image")

    labels = frame["label"].str.strip()
    not_int = ~labels.str.fullmatch(r"[+-]?\d+").to_numpy(dtype=bool)
    if not_int.any():
        raise DataError(
            f"manifest {csv}: {int(not_int.sum())} label(s) are not integers "
            f"({_rows(frame, not_int, 'label')}); "
            f"labels must be class indices 0, 1, 2, ..."
        )
    huge = (labels.str.lstrip("+-").str.lstrip("0").str.len() > _MAX_LABEL_DIGITS).to_numpy(dtype=bool)
    if huge.any():
        raise DataError(
            f"manifest {csv}: {int(huge.sum())} label(s) are far too large to be class indices "
            f"({_rows(frame, huge, 'label')}); labels must be class indices 0, 1, 2, ... (fix the label column)"
        )
    values = labels.astype(np.int64).to_numpy()
    _check_label_range(frame, values, csv, num_classes)
    frame["label"] = values
    frame["image"] = frame["image"].str.strip()
    empty = (frame["image"] == "").to_numpy()
    if empty.any():
        raise DataError(
            f"manifest {csv}: {int(empty.sum())} row(s) have an empty image path "
            f"({_rows(frame, empty, 'image')}); give every row a path relative to data_dir"
        )
    if check_files:
        exists = np.fromiter((os.path.isfile(root / p) for p in frame["image"]), dtype=bool, count=len(frame))
        if not exists.all():
            raise DataError(
                f"manifest {csv}: {int((~exists).sum())} of {len(frame)} image file(s) missing under {root} "
                f"({_rows(frame, ~exists, 'image')}); pass the data_dir the paths are relative to, or "
                f"regenerate the folder (e.g. export_cifar_to_folder)"
            )
    return frame


def manifest_classes(labels: np.ndarray | Sequence[int], num_classes: int | None) -> list[str]:
    """Class names ``["0", "1", ...]``: ``num_classes`` of them, or ``max(label) + 1`` when None."""
    n = num_classes if num_classes is not None else int(np.max(labels)) + 1
    return [str(i) for i in range(n)]


def _open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(
            f"cannot decode image {path} ({exc}); replace or remove it from the manifest"
        ) from exc


class ManifestDataset(Dataset):
    """``(image, label)`` pairs from an ``image,label`` manifest; images opened with PIL as RGB.

    ``transform`` maps the PIL image (e.g. a torchvision transform ending in ``ToTensor``); without one the
    PIL image itself is returned. ``targets`` (list of int) and ``classes`` are as in torchvision datasets.
    """

    def __init__(
        self,
        csv_path: str | os.PathLike,
        data_dir: str | os.PathLike,
        transform: Callable[[Image.Image], object] | None = None,
        num_classes: int | None = None,
    ) -> None:
        frame = read_manifest(csv_path, data_dir, num_classes)
        if transform is not None and not callable(transform):
            raise DataTypeError(f"transform must be callable or None, got {transform!r}")
        self.data_dir = _as_path(data_dir, "data_dir")
        self.paths = [self.data_dir / p for p in frame["image"]]
        self.targets: list[int] = frame["label"].astype(int).tolist()
        self.classes = manifest_classes(self.targets, num_classes)
        self.transform = transform

    @property
    def num_classes(self) -> int:
        """``len(classes)``."""
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[object, int]:
        img = _open_rgb(self.paths[index])
        return (self.transform(img) if self.transform is not None else img), self.targets[index]

    def class_counts(self) -> list[int]:
        """Number of samples per class, length ``num_classes``."""
        return np.bincount(np.asarray(self.targets, dtype=np.int64), minlength=self.num_classes).tolist()


def manifest_transform(
    train: bool, size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> transforms.Compose:
    """The papers' torchvision transforms for ``size x size`` input (original code: ClimbQ's and LifeQuant's
    ``main.py``).

    Train, ``size >= 64``: ``RandomResizedCrop(size)`` + ``RandomHorizontalFlip()``; smaller:
    ``Resize((size, size))`` + ``RandomCrop(size, padding=4)`` + flip. Eval, ``size >= 64``:
    ``Resize(round(size * 256 / 224))`` + ``CenterCrop(size)`` (256 -> 224); smaller:
    ``Resize((size, size))``.
    Then ``ToTensor()`` and ``Normalize(mean, std)``. ColorJitter (ClimbQ's ImageNet) is left to callers.
    """
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise DataError(f"size must be an int >= 1, got {size!r}")
    mean, std = check_stats(mean, std, 3)
    if train and size >= LARGE_IMAGE_SIZE:
        steps = [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()]
    elif train:
        steps = [transforms.Resize((size, size)), transforms.RandomCrop(size, padding=4),
                 transforms.RandomHorizontalFlip()]
    elif size >= LARGE_IMAGE_SIZE:
        steps = [transforms.Resize(round(size * 256 / 224)), transforms.CenterCrop(size)]
    else:
        steps = [transforms.Resize((size, size))]
    return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(mean, std)])


def manifest_loader(
    csv_path: str | os.PathLike,
    data_dir: str | os.PathLike,
    batch_size: int,
    train: bool,
    size: int,
    num_workers: int = 0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    num_classes: int | None = None,
    seed: int = 0,
    transform: Callable[[Image.Image], object] | None = None,
    drop_last: bool | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """A ``DataLoader`` over a (large) image folder for training (``train=True``: shuffled) or evaluation.

    Uses :func:`manifest_transform` unless ``transform`` is given. Shuffling uses a CPU generator seeded with
    ``seed``; worker seeds derive from it. ``drop_last`` defaults to ``train``. The default normalisation is
    ImageNet's; pass :data:`paperlib.data.cifar.CIFAR_STATS` entries for exported CIFAR.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise DataError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0:
        raise DataError(f"num_workers must be an int >= 0, got {num_workers!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise DataTypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    tf = transform if transform is not None else manifest_transform(bool(train), size, mean, std)
    dataset = ManifestDataset(csv_path, data_dir, tf, num_classes)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=bool(train), num_workers=num_workers,
        drop_last=bool(train) if drop_last is None else drop_last, generator=generator,
        pin_memory=pin_memory, persistent_workers=num_workers > 0,
    )


def load_manifest_tensors(
    csv_path: str | os.PathLike,
    data_dir: str | os.PathLike,
    size: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    device: DeviceLike = None,
    num_classes: int | None = None,
) -> InMemoryData:
    """Decode every image of a (small) manifest once into an :class:`InMemoryData` [N, 3, size, size].

    Images are read as RGB; one not already ``size x size`` is resized with PIL bilinear (what
    ``transforms.Resize((size, size))`` does to a PIL image). Pixels go through
    :func:`~paperlib.data.tensors.normalize_uint8`, so a PNG export of CIFAR loaded with ``CIFAR_STATS``
    equals ``load_cifar`` bit for bit. ``mean``/``std`` None: the per-channel statistics of these very
    images (pixels in [0, 1], population std); for a test split pass the train split's ``mean``/``std``.
    Rows keep the manifest order; ``source_index`` is the row number.
    """
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise DataError(f"size must be an int >= 1, got {size!r}")
    if (mean is None) != (std is None):
        raise DataError("give both mean and std, or neither (then they are computed from the images)")
    frame = read_manifest(csv_path, data_dir, num_classes)
    root = _as_path(data_dir, "data_dir")
    dev = resolve_device(device)
    images = np.empty((len(frame), size, size, 3), dtype=np.uint8)
    for i, rel in enumerate(frame["image"]):  # decoding is per file; everything after it is batched
        img = _open_rgb(root / rel)
        if img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        images[i] = np.asarray(img, dtype=np.uint8)
    u8 = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    if mean is None:
        pixels = u8.double().div(255.0)
        mean = tuple(pixels.mean(dim=(0, 2, 3)).tolist())
        std = tuple(pixels.std(dim=(0, 2, 3), correction=0).clamp_min(1e-12).tolist())
    x = normalize_uint8(u8, mean, std)
    y = torch.tensor(frame["label"].to_numpy(dtype=np.int64), dtype=torch.int64)
    classes = manifest_classes(y.numpy(), num_classes)
    return InMemoryData(x.to(dev), y.to(dev), classes, mean, std, source_index=torch.arange(len(y)))
