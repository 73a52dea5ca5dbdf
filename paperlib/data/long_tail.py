"""Long-tailed subsets as ClimbQ's generator builds them (original code: ``src/longTailDataGeneator.py``;
docs/climbq.md, 'Long-tailed data').

``src/longTailDataGeneator.py`` of the original sorts the classes by available count (head first), gives
class ``i`` of that order ``n_i = min(floor(n_{i-1} r), avail_i)`` samples with ``r = 1 / gamma^(1/(K-1))``
(a *recursive* floor, :func:`long_tail_counts`), samples each class with ``np.random.seed(i)`` then
``np.random.choice(len, n_i, replace=False)`` (so subsets are nested across gamma) and relabels every class
by its rank (label 0 = head). This module reproduces that for in-memory data (:func:`long_tail_subset`) and
for image folders (:func:`write_long_tail_manifests`: the ``<stem>_train{gamma}.csv`` / ``<stem>_test.csv``
manifests and the ``num_cls_data/result{gamma}.json`` counts that feed HomoVar).

Departures, all deterministic where the original depended on the filesystem (docs/climbq.md, 'Departures'): ties
in the class order go to the higher class id (``np.argsort(counts, kind="stable")[::-1]``) instead of reversed
``os.listdir`` order; items of a class are taken in a stable order (ascending dataset index, or sorted file name)
instead of ``glob`` order; an explicit ``class_order`` (e.g. :data:`CIFAR10_LT_ORDER`) replays the shipped CSVs.
"""

from __future__ import annotations

import csv
import io
import json
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from ..atomic import atomic_write_text
from .errors import DataError, DataTypeError

CountsMode = Literal["recursive", "closed_form"]

#: Label order (label 0 = head) of the shipped CIFAR-10-LT CSVs of the original code.
CIFAR10_LT_ORDER: tuple[str, ...] = (
    "cat", "frog", "airplane", "horse", "dog", "deer", "automobile", "ship", "truck", "bird",
)
#: Label order of the shipped SynDigits-LT CSVs: folder (digit) names for labels 0..9.
SYNDIGITS_LT_ORDER: tuple[str, ...] = ("9", "1", "7", "0", "5", "8", "6", "2", "3", "4")

__all__ = [
    "CIFAR10_LT_ORDER", "SYNDIGITS_LT_ORDER", "LongTailManifests", "LongTailSubset", "check_class_counts",
    "gamma_tag", "long_tail_counts", "long_tail_order", "long_tail_subset", "read_class_counts",
    "scan_image_folder", "write_long_tail_manifests", "zero_count_error",
]



# --------------------------------------------------------------------------------------------- counts


def long_tail_order(class_counts: Sequence[int] | np.ndarray) -> list[int]:
    """Class ids head first: sorted by available count, descending; ties go to the higher class id.

    This is ``np.argsort(counts, kind="stable")[::-1]`` (the original used the default sort over
    ``os.listdir`` order, so its ties depended on the filesystem).
    """
    counts = _as_int_array(class_counts, "class_counts")
    if counts.size == 0:
        raise DataError("class_counts is empty: pass one available count per class")
    return [int(i) for i in np.argsort(counts, kind="stable")[::-1]]


def zero_count_error(
    counts: Sequence[int] | np.ndarray,
    cls: int,
    *,
    gamma: float | None = None,
    mode: str | None = None,
    name: object | None = None,
    available: int | None = None,
) -> DataError:
    """The one error for a class with 0 samples, shared by the generator and HomoVar.

    An empty class makes HomoVar's class mean 0/0 and ``1 - beta^0 = 0``, so the loss is NaN from step 1.
    """
    counts = [int(c) for c in np.asarray(counts).reshape(-1)]
    what = f"class {name!r}" if name is not None else f"class {cls}"
    avail = f", {available} available" if available is not None else ""
    k = len(counts)
    where = f"rank {cls} of {k}, head first" if gamma is not None else f"label {cls} of {k}"
    src = f"gamma={gamma:g} (mode={mode!r}) leaves " if gamma is not None else "the per-class counts leave "
    closed = "" if mode == "closed_form" else "long_tail_counts(..., mode='closed_form'), "
    fixes = f"a smaller gamma, {closed}or min_count=1"
    return DataError(
        f"{src}{what} ({where}{avail}) with 0 training samples; counts={counts}. An empty class "
        f"makes ClimbQ's HomoVar statistics 0/0 and its loss NaN (docs/climbq.md, 'Departures'). Fix: use {fixes}"
        + (" (or allow_empty=True to reproduce the original's empty classes)." if gamma is not None else
           " when generating the long-tailed data.")
    )


def check_class_counts(counts: Sequence[float] | np.ndarray | Mapping[str, int], *,
                       what: str = "counts") -> np.ndarray:
    """Validate per-class dataset counts (1-D, finite, >= 0, no zero class); returns them as float64.

    A mapping ``{"0": n_0, "1": n_1, ...}`` (the ``num_cls_data/result{gamma}.json`` format) is ordered by
    its integer keys, which must be 0..K-1.
    """
    if isinstance(counts, Mapping):
        keys = sorted(counts, key=int)
        if [int(k) for k in keys] != list(range(len(keys))):
            raise DataError(f"{what} keys must be the labels 0..K-1, got {list(counts)}")
        counts = [counts[k] for k in keys]
    arr = np.asarray(counts.detach().cpu() if hasattr(counts, "detach") else counts)
    if arr.ndim != 1 or arr.size == 0:
        raise DataError(f"{what} must be a non-empty 1-D sequence of per-class counts, got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise DataTypeError(f"{what} must be numeric per-class counts, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise DataError(f"{what} must be finite and >= 0, got {arr.tolist()}")
    zero = np.flatnonzero(arr == 0)
    if zero.size:
        raise zero_count_error(arr, int(zero[0]))
    return arr


def long_tail_counts(
    available: Sequence[int] | np.ndarray,
    gamma: float,
    mode: CountsMode = "recursive",
    min_count: int = 0,
    *,
    allow_empty: bool = False,
    names: Sequence[object] | None = None,
) -> list[int]:
    """Per-class long-tail counts for ``available`` given head first (docs/climbq.md, 'Long-tailed data').

    ``mode="recursive"`` (the original, ``longTailDataGeneator.py`` L41-52 and ``main.py`` L157-163):
    ``n_0 = available[0]``, ``n_i = min(floor(n_{i-1} / gamma^(1/(K-1))), available[i])``; the compounding
    floor makes the real head/tail ratio exceed gamma. ``mode="closed_form"``:
    ``n_i = min(floor(n_0 gamma^(-i/(K-1))), available[i])``. ``min_count`` raises every count to at least
    that many (capped by nothing: it must not exceed the class's availability). A class left with 0 samples
    raises :func:`zero_count_error` unless ``allow_empty=True`` (which reproduces the shipped CIFAR-100
    gamma >= 50 CSVs, whose empty classes make HomoVar NaN). ``names`` only labels the classes in errors.
    """
    avail = _as_int_array(available, "available")
    k = avail.size
    if k < 2:
        raise DataError(f"a long tail needs at least 2 classes, got {k} available count(s)")
    if np.any(np.diff(avail) > 0):
        raise DataError(
            f"available={avail.tolist()} is not head first (non-increasing); reorder the classes with "
            "long_tail_order(available_counts) or pass an explicit class_order whose counts do not increase"
        )
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not math.isfinite(gamma):
        raise DataTypeError(f"gamma must be a finite real number >= 1 (the head/tail ratio), got {gamma!r}")
    if gamma < 1:
        raise DataError(f"gamma={gamma} < 1: gamma is the head/tail ratio n_max/n_min; use gamma >= 1 "
                         "(gamma=1 keeps the data balanced)")
    if mode not in ("recursive", "closed_form"):
        raise DataError(f"mode={mode!r}: use 'recursive' (the original's compounding floor) "
                         "or 'closed_form'")
    if isinstance(min_count, bool) or not isinstance(min_count, numbers.Integral) or min_count < 0:
        raise DataError(f"min_count must be an int >= 0, got {min_count!r}")
    if names is not None and len(names) != k:
        raise DataError(f"names has {len(names)} entries for {k} classes")

    n_max = int(avail[0])
    counts = [n_max]
    if mode == "recursive":
        ratio = 1 / gamma ** (1 / (k - 1))  # exactly the original's EXP_RATIO
        for i in range(1, k):  # a recurrence over K classes, not a loop over samples
            counts.append(min(int(counts[-1] * ratio), int(avail[i])))
    else:
        # +1e-9 keeps exact integers (e.g. 5000 / 50) from flooring one below through float rounding.
        counts += [min(math.floor(n_max / gamma ** (i / (k - 1)) + 1e-9), int(avail[i])) for i in range(1, k)]

    if min_count:
        short = [i for i in range(k) if avail[i] < min_count]
        if short:
            i = short[0]
            raise DataError(f"min_count={min_count} exceeds the {int(avail[i])} available samples of class "
                             f"{names[i] if names is not None else i}; lower min_count")
        counts = [max(c, int(min_count)) for c in counts]
    if not allow_empty:
        for i, c in enumerate(counts):
            if c == 0:
                raise zero_count_error(counts, i, gamma=gamma, mode=mode,
                                       name=None if names is None else names[i], available=int(avail[i]))
    return counts


def read_class_counts(path: str | os.PathLike) -> list[int]:
    """Per-class counts from a ``num_cls_data/result{gamma}.json`` file (``{"0": n_0, ...}``), label order."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise DataError(f"{path} must hold a JSON object {{\"0\": n_0, \"1\": n_1, ...}}, "
                        f"got {type(data).__name__}")
    return [int(c) for c in check_class_counts(data, what=str(path))]


def gamma_tag(gamma: float) -> str:
    """How gamma appears in file names: ``10`` for 10 or 10.0, ``2.5`` for 2.5 (``<stem>_train{tag}.csv``)."""
    g = float(gamma)
    return str(int(g)) if g.is_integer() else repr(g)


# --------------------------------------------------------------------------------------------- in memory


@dataclass(frozen=True)
class LongTailSubset:
    """A long-tailed subset of in-memory data and its explicit relabelling.

    ``indices`` index the original arrays (class by class, head first, each class in the original's sampled
    order). ``labels`` are the *rank* labels of those items (0 = head): ``labels == to_rank[y[indices]]``.
    ``order[r]`` is the original class id of rank ``r``; ``to_rank[c]`` its inverse. ``counts[r]`` is the
    number of items of rank ``r``. :meth:`relabel` maps another split (the balanced test set) the same way.
    """

    indices: np.ndarray
    labels: np.ndarray
    order: list[int]
    counts: list[int]
    gamma: float
    mode: str
    to_rank: np.ndarray = field(repr=False)

    def relabel(self, original_labels: Sequence[int] | np.ndarray) -> np.ndarray:
        """Rank labels (0 = head) for original class ids, e.g. of the full balanced test set."""
        y = _as_int_array(original_labels, "original_labels")
        if y.size and (y.min() < 0 or y.max() >= self.to_rank.size):
            raise DataError(f"labels must be class ids in [0, {self.to_rank.size}), "
                             f"got [{y.min()}, {y.max()}]")
        return self.to_rank[y]


def _seeded_choice(n_items: int, n: int, rank: int) -> np.ndarray:
    """The original's ``np.random.seed(rank); np.random.choice(n_items, n, replace=False)`` without touching
    NumPy's global state: ``RandomState(rank)`` draws the same legacy stream, ``permutation(n_items)[:n]``."""
    return np.random.RandomState(rank).choice(n_items, n, replace=False)


def long_tail_subset(
    labels: Sequence[int] | np.ndarray,
    gamma: float,
    *,
    mode: CountsMode = "recursive",
    min_count: int = 0,
    allow_empty: bool = False,
    num_classes: int | None = None,
    class_order: Sequence[int] | None = None,
) -> LongTailSubset:
    """Sample a long-tailed subset of labelled in-memory data as the original generator does.

    Classes are ranked by :func:`long_tail_order` of their available counts (or ``class_order``, original
    class ids head first), counts come from :func:`long_tail_counts`, and the items of the class of rank
    ``r`` (taken in ascending index order) are sampled with ``np.random.seed(r)`` /
    ``np.random.choice(len, n_r, replace=False)``, so subsets are nested across gamma. Accepts a NumPy array,
    a list or a CPU/GPU tensor of integer labels.
    """
    y = _as_int_array(labels, "labels")
    if y.ndim != 1 or y.size == 0:
        raise DataError(f"labels must be a non-empty 1-D sequence of class ids, got shape {y.shape}")
    if y.min() < 0:
        raise DataError(f"labels must be class ids >= 0, got {int(y.min())}")
    k = int(y.max()) + 1 if num_classes is None else int(num_classes)
    if y.max() >= k:
        raise DataError(f"labels contain class {int(y.max())} but num_classes={k}")
    available = np.bincount(y, minlength=k)
    order = long_tail_order(available) if class_order is None else _check_order(class_order, k)
    counts = long_tail_counts(available[order], gamma, mode, min_count, allow_empty=allow_empty,
                              names=order)

    by_class = np.argsort(y, kind="stable")  # indices grouped by class, ascending within a class
    starts = np.concatenate([[0], np.cumsum(available)])
    picked = [by_class[starts[c]:starts[c + 1]][_seeded_choice(int(available[c]), n, rank)]
              for rank, (c, n) in enumerate(zip(order, counts, strict=True))]  # K seeded draws
    indices = np.concatenate(picked).astype(np.int64)
    to_rank = np.empty(k, dtype=np.int64)
    to_rank[order] = np.arange(k)
    return LongTailSubset(indices=indices, labels=to_rank[y[indices]], order=list(order), counts=counts,
                          gamma=float(gamma), mode=mode, to_rank=to_rank)


def _check_order(class_order: Sequence[int], k: int) -> list[int]:
    order = [int(c) for c in class_order]
    if sorted(order) != list(range(k)):
        raise DataError(f"class_order={order} must be a permutation of the class ids 0..{k - 1}")
    return order


# --------------------------------------------------------------------------------------------- image folders


@dataclass(frozen=True)
class LongTailManifests:
    """What :func:`write_long_tail_manifests` wrote: paths, the class order (label -> folder) and counts."""

    train_csv: Path
    test_csv: Path | None
    counts_json: Path
    test_written: bool
    classes: list[str]
    counts: list[int]


def scan_image_folder(root: str | os.PathLike, split: str = "train") -> dict[str, list[str]]:
    """``{class folder: sorted ["split/class/file.ext", ...]}`` for ``root/split/<class>/*.*``.

    Paths are relative to ``root`` with ``/`` separators, as in the original CSVs; files are sorted by name
    (zero-padded names such as CIFAR's ``0000.jpg`` or SynDigits' ``4_01000.jpg`` sort by index).
    """
    base = Path(root) / split
    if not base.is_dir():
        raise FileNotFoundError(f"no folder {base}: expected {root}/{split}/<class>/<image files>")
    items = {d.name: sorted(f"{split}/{d.name}/{f.name}" for f in d.iterdir()
                            if f.is_file() and "." in f.name and not f.name.startswith("."))
             for d in sorted(base.iterdir()) if d.is_dir()}
    if not items:
        raise DataError(f"{base} has no class folders: expected {base}/<class>/<image files>")
    return items


def write_long_tail_manifests(
    data_dir: str | os.PathLike,
    gamma: float,
    stem: str,
    out_dir: str | os.PathLike | None = None,
    *,
    class_order: Sequence[str] | None = None,
    mode: CountsMode = "recursive",
    min_count: int = 0,
    allow_empty: bool = False,
    train_split: str = "train",
    test_split: str | None = "test",
    counts_dir: str | os.PathLike | None = None,
) -> LongTailManifests:
    """Write the original's manifests for an image folder ``data_dir/{train,test}/<class>/<files>``.

    - ``<out_dir>/<stem>_train{gamma}.csv``: header ``image,label``, rows class by class (label 0 = head) in
      the original's sampled order (seed = class rank, nested across gamma);
    - ``<out_dir>/<stem>_test.csv``, written only if missing: the full balanced test split, labelled with the
      same class order (class by class, files sorted);
    - ``<counts_dir>/result{gamma}.json`` (default ``<out_dir>/num_cls_data``): ``{"0": n_0, ...}``, the
      counts HomoVar reads.

    The class order is ``class_order`` (folder names, head first; :data:`CIFAR10_LT_ORDER` replays the
    shipped CSVs) or :func:`long_tail_order` over the folders sorted by name. Every write is atomic.
    """
    out = Path(out_dir) if out_dir is not None else Path(data_dir)
    train_items = scan_image_folder(data_dir, train_split)
    names = sorted(train_items)
    if class_order is None:
        order = [names[i] for i in long_tail_order([len(train_items[c]) for c in names])]
    else:
        order = [str(c) for c in class_order]
        if sorted(order) != names:
            raise DataError(f"class_order {order} must name exactly the class folders {names} "
                             f"of {Path(data_dir) / train_split}")
    available = [len(train_items[c]) for c in order]
    counts = long_tail_counts(available, gamma, mode, min_count, allow_empty=allow_empty, names=order)

    rows = [(train_items[c][j], label)
            for label, (c, n) in enumerate(zip(order, counts, strict=True))
            for j in _seeded_choice(len(train_items[c]), n, label)]
    tag = gamma_tag(gamma)
    train_csv = out / f"{stem}_train{tag}.csv"
    atomic_write_text(train_csv, _csv_text(rows))

    test_csv, test_written = None, False
    if test_split is not None:
        test_csv = out / f"{stem}_test.csv"
        if not test_csv.exists():
            test_items = scan_image_folder(data_dir, test_split)
            unknown = sorted(set(test_items) - set(order))
            if unknown:
                raise DataError(f"test classes {unknown} have no training folder in {train_split}/")
            rank = {c: i for i, c in enumerate(order)}
            test_rows = [(p, rank[c]) for c in order for p in test_items.get(c, [])]
            atomic_write_text(test_csv, _csv_text(test_rows))
            test_written = True

    counts_json = (Path(counts_dir) if counts_dir is not None else out / "num_cls_data") / f"result{tag}.json"
    atomic_write_text(counts_json, json.dumps({str(i): n for i, n in enumerate(counts)}, indent=4))
    return LongTailManifests(train_csv=train_csv, test_csv=test_csv, counts_json=counts_json,
                             test_written=test_written, classes=order, counts=counts)


def _csv_text(rows: Sequence[tuple[str, int]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image", "label"])
    writer.writerows(rows)
    return buf.getvalue()


def _as_int_array(values: object, what: str) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor, on any device
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        whole = np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr))
        if whole and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise DataTypeError(f"{what} must hold integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.ndim != 1:
        raise DataError(f"{what} must be 1-D, got shape {arr.shape}")
    if arr.size and arr.min() < 0 and what != "labels":
        raise DataError(f"{what} must be >= 0, got {arr.tolist()}")
    return arr
