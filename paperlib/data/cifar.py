"""CIFAR-10/100 from a user-given root through ``torchvision.datasets`` (never downloading), and an exporter
to the papers' on-disk format.

``load_cifar`` returns the split as one normalised :class:`InMemoryData` with the standard constants: CIFAR-10
``(.4914, .4822, .4465), (.2023, .1994, .2010)`` (original code: ClimbQ ``data/cifar10_lt.py``, LifeQuant
``data/cifar100_ll.py``) and CIFAR-100 ``(.5071, .4865, .4409), (.2673, .2564, .2762)``. ``export_cifar_to_folder``
writes ``<out>/<split>/<class>/<index:04d>.<ext>`` plus ``image,label`` CSVs, the layout ClimbQ/LifeQuant read (the
original repositories ship no converter).
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torchvision.datasets import CIFAR10, CIFAR100

from .errors import DataError, DataTypeError
from .tensors import DeviceLike, InMemoryData, normalize_uint8, resolve_device

CIFAR_STATS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_DATASETS: dict[str, type[CIFAR10]] = {"cifar10": CIFAR10, "cifar100": CIFAR100}
IMAGE_EXTS = ("png", "jpg", "jpeg", "bmp")


def _check_name(name: object) -> str:
    if not isinstance(name, str) or name.lower() not in _DATASETS:
        raise DataError(f"unknown CIFAR dataset {name!r}; use one of {sorted(_DATASETS)}")
    return name.lower()


def _check_root(root: object, what: str = "root") -> Path:
    if not isinstance(root, str | os.PathLike):
        raise DataTypeError(f"{what} must be a str or path, got {type(root).__name__} {root!r}")
    return Path(root).expanduser()


def _how_to_get(name: str, root: Path) -> str:
    cls = _DATASETS[name].__name__
    files = [f for f, _ in _DATASETS[name].train_list + _DATASETS[name].test_list]
    files.append(_DATASETS[name].meta["filename"])
    folder = root / _DATASETS[name].base_folder
    return (
        f"the files must be at {folder}/{{{','.join(files)}}} (the extracted python version of {name}); "
        f"to get them, run `torchvision.datasets.{cls}({str(root)!r}, download=True)` once on a machine "
        f"with internet and copy the folder {_DATASETS[name].base_folder}/ into {root}"
    )


def open_cifar(root: str | os.PathLike, name: str = "cifar10", train: bool = True) -> CIFAR10:
    """The torchvision dataset object (``download=False``), with missing/corrupt files as :class:`DataError`.

    Checks first that every file torchvision needs exists (it md5-checks all train and test files and the
    meta file even for one split), naming the missing ones; an md5 mismatch or an unreadable pickle is
    reported as corrupt, with the same instructions.
    """
    name = _check_name(name)
    root = _check_root(root)
    if not isinstance(train, bool):
        raise DataTypeError(f"train must be a bool, got {type(train).__name__} {train!r}")
    ds_cls = _DATASETS[name]
    folder = root / ds_cls.base_folder
    needed = [f for f, _ in ds_cls.train_list + ds_cls.test_list] + [ds_cls.meta["filename"]]
    missing = [f for f in needed if not (folder / f).is_file()]
    if missing:
        where = f"root {root} does not exist" if not root.exists() else f"missing {missing} in {folder}"
        raise DataError(f"{name} not found: {where}; {_how_to_get(name, root)}")
    try:
        return ds_cls(str(root), train=train, download=False)
    except RuntimeError as exc:  # md5 mismatch, raised by torchvision's integrity checks
        raise DataError(f"{name} under {folder} is corrupted ({exc}); {_how_to_get(name, root)}") from exc
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, AttributeError) as exc:
        raise DataError(
            f"{name} under {folder} is unreadable ({type(exc).__name__}: {exc}); {_how_to_get(name, root)}"
        ) from exc


def load_cifar(
    root: str | os.PathLike,
    name: str = "cifar10",
    train: bool = True,
    device: DeviceLike = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> InMemoryData:
    """One CIFAR split as normalised tensors [N, 3, 32, 32] with torchvision's labels and class names.

    ``x = (pixels / 255 - mean) / std`` with :data:`CIFAR_STATS` unless ``mean``/``std`` are given;
    ``source_index`` is the position in the torchvision dataset. ``device=None`` keeps it on the CPU.
    """
    name = _check_name(name)
    ds = open_cifar(root, name, train)
    dev = resolve_device(device)
    data = np.asarray(ds.data)
    if data.dtype != np.uint8 or data.ndim != 4 or data.shape[1:] != (32, 32, 3):
        raise DataError(
            f"{name} pixel array has shape {data.shape} ({data.dtype}); expected N x 32 x 32 x 3 uint8"
        )
    m0, s0 = CIFAR_STATS[name]
    images = torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()
    x = normalize_uint8(images, m0 if mean is None else mean, s0 if std is None else std)
    y = torch.as_tensor(ds.targets, dtype=torch.int64)
    return InMemoryData(
        x.to(dev), y.to(dev), [str(c) for c in ds.classes], m0 if mean is None else mean,
        s0 if std is None else std, source_index=torch.arange(len(y)),
    )


def index_within_class(labels: np.ndarray) -> np.ndarray:
    """For each position, how many earlier entries have the same label (0, 1, 2, ... per class)."""
    labels = np.asarray(labels, dtype=np.int64)
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.empty_like(labels)
    rank[order] = np.arange(len(labels)) - starts
    return rank


def write_csv_atomic(frame: pd.DataFrame, path: Path) -> None:
    """Write ``frame`` to ``path`` without index, via a temp file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            frame.to_csv(f, index=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_cifar_to_folder(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    name: str = "cifar10",
    ext: str = "png",
    jpeg_quality: int = 75,
) -> dict[str, Path]:
    """Write CIFAR as image folders plus ``image,label`` manifests; returns ``{"train": csv, "test": csv}``.

    Files: ``out_dir/<split>/<class_name>/<i:04d>.<ext>``, ``i`` = index within the class in dataset order
    (CIFAR-10: 0000..4999 per class for train, as in ClimbQ's CSVs), and ``out_dir/<split>.csv`` with
    rows in dataset order: ``image`` relative to ``out_dir`` (``/`` separators), ``label`` = torchvision's
    class index. PNG is lossless; JPEG (ClimbQ's CIFAR-10 export) uses ``jpeg_quality`` (75 is PIL's
    default, what a plain ``img.save(path)`` writes). The CSVs are written last and atomically, so an
    existing CSV means its images are all there.
    """
    name = _check_name(name)
    root = _check_root(root)
    out = _check_root(out_dir, "out_dir")
    if not isinstance(ext, str) or ext.lower().lstrip(".") not in IMAGE_EXTS:
        raise DataError(f"ext must be one of {IMAGE_EXTS}, got {ext!r}; png is lossless")
    ext = ext.lower().lstrip(".")
    if not isinstance(jpeg_quality, int) or not 1 <= jpeg_quality <= 100:
        raise DataError(f"jpeg_quality must be an int in [1, 100], got {jpeg_quality!r}")
    datasets = {split: open_cifar(root, name, split == "train") for split in ("train", "test")}
    save_kw = {"quality": jpeg_quality} if ext in ("jpg", "jpeg") else {}
    manifests: dict[str, Path] = {}
    for split, ds in datasets.items():
        labels = np.asarray(ds.targets, dtype=np.int64)
        rank = index_within_class(labels)
        classes = [str(c) for c in ds.classes]
        rel = [f"{split}/{classes[lab]}/{r:04d}.{ext}" for lab, r in zip(labels, rank, strict=True)]
        for c in sorted(set(labels.tolist())):
            (out / split / classes[c]).mkdir(parents=True, exist_ok=True)
        for img, path in zip(ds.data, rel, strict=True):  # file I/O: one encode per image is unavoidable
            Image.fromarray(img).save(out / path, **save_kw)
        csv = out / f"{split}.csv"
        write_csv_atomic(pd.DataFrame({"image": rel, "label": labels}), csv)
        manifests[split] = csv
    return manifests
