"""Lifelong task and replay splits (docs/lifequant.md, "Splits and replay"; original code:
``lifelong_data_generation/``), for any number of tasks.

Class-incremental (CIFAR, digits; ``lifeLongDataGeneator.py``): shuffle the class ids with ``seed``,
``m = int(K / (1 + d (T - 1)))`` classes per task, ``step = int(m d)``; task ``i`` takes
``order[i·step : i·step + m]`` and the last task ``order[(T-1)·step:]``. Every sample of a chosen class is in
the task, so an overlapping class appears with all its samples in several tasks. Rows are grouped by class in
task-class order. Domain-incremental (Office-31, ImageCLEF; ``*_office.py``, ``*_image_CLEF.py``): one task
per domain, all classes in every task.

Replay (``replayDataGeneator.py``): ``replay_t = train_t.sample(frac=r, random_state=seed)``, a sample of
task ``t`` itself, used by the tasks after ``t``. BaLL's ``reweight_{t}`` counts
``train_t ∪ replay_0 … replay_{t-1}``.

Two front ends share that logic: in-memory label arrays (:func:`class_incremental_split`,
:func:`domain_incremental_split` return per-task index arrays in a :class:`LifelongSplit`) and image folders
(:func:`write_class_incremental`, :func:`write_domain_incremental` write ``train{t}.csv``, ``test{t}.csv``,
``replay{t}.csv``, ``reweight_{t}.json`` and ``split.json``, each atomically).

Choices where the original is not reproducible or not general: files within a class folder are sorted by name
(the original used unsorted ``glob`` order); a class is matched by its folder name, not by the substring
``'/cls/'``; hidden entries and files without an extension are skipped (``glob('*/*.*')``); class folders of a
later domain that the first domain lacks raise instead of being dropped silently.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from torch import Tensor

from ..atomic import atomic_write_text
from .ball import _labels_array, ball_scale, class_counts

DEFAULT_SEED = 123
CIFAR_REPLAY_RATE = 0.2
DOMAIN_REPLAY_RATE = 0.5
#: ``write_domain_incremental(data_dir, out, **OFFICE31)``; layout ``{domain}/images/{train|test}/{class}/f``
OFFICE31: dict[str, object] = {
    "domains": ("webcam", "dslr", "amazon"), "subdir": "images", "class_names": "sorted",
}
#: ImageCLEF: layout ``{domain}/{train|test}/{0..11}/file``, labels = the numeric folder names
IMAGECLEF: dict[str, object] = {"domains": ("b", "c", "i", "p"), "subdir": "", "class_names": "numeric"}


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name}={value} must be >= {low}")
    return int(value)


def _check_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name}={value} must be finite")
    return float(value)


def _check_seed(seed: object) -> int:
    seed = _check_int("seed", seed, 0)
    if seed >= 2**32:
        raise ValueError(f"seed={seed} must be < 2**32 (numpy RandomState)")
    return seed


def class_order(num_classes: int, seed: int = DEFAULT_SEED) -> list[int]:
    """``np.random.seed(seed); np.random.shuffle(arange(K))`` without the global RNG (reference vector 3)."""
    order = np.arange(_check_int("num_classes", num_classes, 1))
    np.random.RandomState(_check_seed(seed)).shuffle(order)
    return order.tolist()


def _raw_split(
    num_classes: int, num_tasks: int, drop_rate: float, order: list[int]
) -> tuple[list[list[int]], int, int]:
    m = int(num_classes / (1 + drop_rate * (num_tasks - 1)))
    step = int(m * drop_rate)
    tasks = [order[i * step: i * step + m] for i in range(num_tasks - 1)]
    tasks.append(order[(num_tasks - 1) * step:])
    return tasks, m, step


def class_split(
    num_classes: int,
    num_tasks: int,
    drop_rate: float,
    seed: int = DEFAULT_SEED,
    *,
    allow_degenerate: bool = False,
) -> list[list[int]]:
    """The classes of each task (``lifeLongDataGeneator.py``; reference vector 3): ``m = int(K / (1 + d (T - 1)))``,
    ``step = int(m d)``, task
    ``i`` = ``order[i·step : i·step + m]``, the last task ``order[(T-1)·step:]``.

    ``drop_rate`` ``d`` is the fraction of a task's classes replaced at each switch, in [0, 1] (``d = 1``:
    disjoint tasks; ``d = 0``: identical tasks). A split with an empty or one-class task raises ``ValueError``
    naming the cause (the original README's ``--diminish_rate 25`` gives tasks of 1, 1 and 50 classes).
    ``allow_degenerate=True`` returns the original's output anyway, for any ``d >= 0``.
    """
    num_classes = _check_int("num_classes", num_classes, 1)
    num_tasks = _check_int("num_tasks", num_tasks, 1)
    d = _check_real("drop_rate", drop_rate)
    if d < 0:
        raise ValueError(
            f"drop_rate={drop_rate} is negative; it is the fraction of classes dropped per task, in [0, 1]"
        )
    tasks, m, step = _raw_split(num_classes, num_tasks, d, class_order(num_classes, seed))
    sizes = [len(t) for t in tasks]
    if allow_degenerate:
        return tasks
    if d > 1:
        raise ValueError(
            f"drop_rate={drop_rate} is outside [0, 1]: it is the fraction of a task's classes replaced at "
            f"each task switch (the original README's --diminish_rate 25 meant 0.25). With {drop_rate} the "
            f"split would be m=int({num_classes}/(1+{drop_rate}*{num_tasks - 1}))={m} classes per task, step "
            f"{step}, task sizes {sizes}. Pass a rate in [0, 1] (allow_degenerate=True reproduces the "
            "original's output)"
        )
    bad = [i for i, s in enumerate(sizes) if s < 2]
    if bad:
        raise ValueError(
            f"{num_classes} classes, {num_tasks} tasks, drop_rate={drop_rate} give task sizes {sizes}: "
            f"task(s) {bad} would be empty or have one class (m=int(K/(1+d(T-1)))={m}, "
            f"step=int(m*d)={step}). Use fewer tasks, a smaller drop_rate or more classes"
        )
    return tasks


def _check_rate(rate: object) -> float:
    r = _check_real("replay rate", rate)
    if not 0 < r <= 1:
        raise ValueError(
            f"replay rate {rate} must be in (0, 1]: the fraction of a task's training rows kept for replay"
        )
    return r


def replay_positions(n: int, rate: float, seed: int = DEFAULT_SEED) -> list[int]:
    """The rows ``DataFrame.sample(frac=rate, replace=False, random_state=seed)`` picks from ``n`` rows, in
    its order: ``RandomState(seed).permutation(n)[:round(rate n)]`` (``replayDataGeneator.py``; reference vector 4)."""
    n = _check_int("n", n, 0)
    r = _check_rate(rate)
    return np.random.RandomState(_check_seed(seed)).permutation(n)[: round(r * n)].tolist()


def task_indices(
    labels: Sequence[int] | np.ndarray | Tensor, classes_per_task: Sequence[Sequence[int]]
) -> list[np.ndarray]:
    """For each task, the positions of the samples whose label is one of its classes, grouped by class in the
    task's class order, original order within a class (``lifeLongDataGeneator.py``). Returns int64 arrays."""
    lab = _labels_array(labels)
    out = []
    for t, classes in enumerate(classes_per_task):
        cls = np.asarray(classes, dtype=np.int64).reshape(-1)
        if cls.size and cls.min() < 0:
            raise ValueError(f"task {t} has a negative class id {cls.min()}")
        size = int(max(lab.max(initial=-1), cls.max(initial=-1))) + 1
        rank = np.full(size, -1, dtype=np.int64)
        rank[cls[::-1]] = np.arange(cls.size)[::-1]  # first occurrence wins for duplicated ids
        r = rank[lab]
        idx = np.flatnonzero(r >= 0)
        out.append(idx[np.argsort(r[idx], kind="stable")])
    return out


def domain_task_indices(
    labels: Sequence[int] | np.ndarray | Tensor,
    domains: Sequence[object] | np.ndarray,
    order: Sequence[object],
) -> list[np.ndarray]:
    """One task per domain in ``order``: the positions of its samples grouped by class id (ascending),
    original order within a class (the ``*_office.py``/``*_image_CLEF.py`` generators)."""
    lab = _labels_array(labels)
    dom = np.asarray(domains.detach().cpu().numpy() if isinstance(domains, Tensor) else domains)
    if dom.shape != lab.shape:
        raise ValueError(f"domains has shape {dom.shape} but labels {lab.shape}: one domain per sample")
    out = []
    for d in order:
        idx = np.flatnonzero(dom == d)
        if idx.size == 0:
            raise ValueError(f"domain {d!r} has no sample; domains present: {sorted(set(dom.tolist()))[:10]}")
        out.append(idx[np.argsort(lab[idx], kind="stable")])
    return out


@dataclass(frozen=True)
class LifelongSplit:
    """Per-task index arrays into the train / test data, the replay samples and BaLL's scale per task.

    ``replay[t]`` is a subset of ``train[t]`` (indices into the *train* data), used by tasks after ``t``;
    ``counts[t]``/``scale[t]`` are over ``train[t] ∪ replay[0] … replay[t-1]`` (duplicates counted, as
    ``count_classes.py``).
    """

    classes: list[list[int]]
    train: list[np.ndarray]
    test: list[np.ndarray]
    replay: list[np.ndarray]
    counts: list[dict[int, int]]
    scale: list[dict[int, float]]
    replay_rate: float
    seed: int
    meta: dict[str, object] = field(default_factory=dict)

    @property
    def num_tasks(self) -> int:
        return len(self.train)

    def _check_task(self, task: int) -> int:
        task = _check_int("task", task, 0)
        if task >= self.num_tasks:
            raise ValueError(f"task={task} but the split has {self.num_tasks} tasks numbered from 0")
        return task

    def replay_before(self, task: int) -> np.ndarray:
        """``replay_0 … replay_{task-1}`` concatenated (empty at task 0): the old-task data of ``F``."""
        task = self._check_task(task)
        return np.concatenate([np.zeros(0, np.int64), *self.replay[:task]])

    def training_indices(self, task: int, replay: bool = True) -> np.ndarray:
        """``train_t ∪ replay_{<t}`` (paper mode; duplicates kept, as in the counts) or ``train_t`` alone
        (``replay=False``, code mode)."""
        task = self._check_task(task)
        return np.concatenate([self.train[task], self.replay_before(task)]) if replay else self.train[task]


def _assemble(
    train_labels: np.ndarray, classes: list[list[int]], train: list[np.ndarray], test: list[np.ndarray],
    replay_rate: float, seed: int, meta: dict[str, object],
) -> LifelongSplit:
    rate = _check_rate(replay_rate)
    seed = _check_seed(seed)
    for what, parts in (("training", train), ("test", test)):
        empty = [t for t, idx in enumerate(parts) if idx.size == 0]
        if empty:
            raise ValueError(
                f"task(s) {empty} have no {what} sample: the data lack their classes/domains {classes}"
            )
    replay = [idx[np.asarray(replay_positions(idx.size, rate, seed), dtype=np.int64)] for idx in train]
    counts = [
        class_counts(train_labels[train[t]], *(train_labels[r] for r in replay[:t]))
        for t in range(len(train))
    ]
    scale = [ball_scale(c) for c in counts]
    return LifelongSplit(classes, train, test, replay, counts, scale, rate, seed, meta)


def class_incremental_split(
    train_labels: Sequence[int] | np.ndarray | Tensor,
    test_labels: Sequence[int] | np.ndarray | Tensor,
    num_tasks: int,
    drop_rate: float,
    replay_rate: float = CIFAR_REPLAY_RATE,
    seed: int = DEFAULT_SEED,
    *,
    num_classes: int | None = None,
    allow_degenerate: bool = False,
) -> LifelongSplit:
    """Class-incremental lifelong split of in-memory data (docs/lifequant.md, "Splits and replay"):
    :func:`class_split` over
    ``num_classes`` (default: largest label + 1), the samples of each task's classes, replay and BaLL
    scales."""
    tr, te = _labels_array(train_labels, "train_labels"), _labels_array(test_labels, "test_labels")
    if num_classes is None:
        num_classes = int(max(tr.max(initial=-1), te.max(initial=-1))) + 1
    classes = class_split(num_classes, num_tasks, drop_rate, seed, allow_degenerate=allow_degenerate)
    meta = {"kind": "class_incremental", "num_classes": num_classes, "drop_rate": float(drop_rate)}
    train, test = task_indices(tr, classes), task_indices(te, classes)
    return _assemble(tr, classes, train, test, replay_rate, seed, meta)


def domain_incremental_split(
    train_labels: Sequence[int] | np.ndarray | Tensor,
    train_domains: Sequence[object] | np.ndarray,
    test_labels: Sequence[int] | np.ndarray | Tensor,
    test_domains: Sequence[object] | np.ndarray,
    order: Sequence[object],
    replay_rate: float = DOMAIN_REPLAY_RATE,
    seed: int = DEFAULT_SEED,
) -> LifelongSplit:
    """Domain-incremental lifelong split of in-memory data (docs/lifequant.md, "Splits and replay"): one
    task per domain in ``order``."""
    if isinstance(order, str) or len(order) == 0 or len(set(order)) != len(order):
        raise ValueError(f"order={order!r} must be a non-empty sequence of distinct domains")
    tr, te = _labels_array(train_labels, "train_labels"), _labels_array(test_labels, "test_labels")
    train = domain_task_indices(tr, train_domains, order)
    test = domain_task_indices(te, test_domains, order)
    classes = [np.unique(tr[idx]).tolist() for idx in train]
    meta = {"kind": "domain_incremental", "domains": list(order)}
    return _assemble(tr, classes, train, test, replay_rate, seed, meta)


# -------------------------------------------------------------------------------------------------------
# Image folders -> CSV files


def _list_dirs(path: Path, what: str) -> list[str]:
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory; expected {what}")
    return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _list_images(path: Path) -> list[str]:
    if not path.is_dir():
        return []
    return sorted(
        p.name for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and "." in p.name
    )


def _scan(root: Path, prefix: str, class_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    paths: list[str] = []
    labels: list[int] = []
    for label, cls in enumerate(class_names):
        files = _list_images(root / cls)
        paths.extend(f"{prefix}/{cls}/{f}" for f in files)
        labels.extend([label] * len(files))
    return np.asarray(paths, dtype=object), np.asarray(labels, dtype=np.int64)


@dataclass(frozen=True)
class LifelongFiles:
    """What a generator wrote: the split (indices into the scanned file lists), class names and file paths."""

    output_dir: Path
    split: LifelongSplit
    class_names: list[str]
    train: list[Path]
    test: list[Path]
    replay: list[Path]
    reweight: list[Path]
    manifest: Path


def _csv(paths: np.ndarray, labels: np.ndarray, idx: np.ndarray) -> str:
    return pd.DataFrame({"image": paths[idx], "label": labels[idx]}).to_csv(index=False, lineterminator="\n")


def _write(
    output_dir: str | os.PathLike, split: LifelongSplit, class_names: list[str],
    train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
) -> LifelongFiles:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    names: dict[str, list[Path]] = {"train": [], "test": [], "replay": [], "reweight": []}
    for t in range(split.num_tasks):
        files = {
            "train": (f"train{t}.csv", _csv(*train, split.train[t])),
            "test": (f"test{t}.csv", _csv(*test, split.test[t])),
            "replay": (f"replay{t}.csv", _csv(*train, split.replay[t])),
            "reweight": (f"reweight_{t}.json", json.dumps({str(k): v for k, v in split.scale[t].items()})),
        }
        for key, (name, text) in files.items():
            atomic_write_text(out / name, text)
            names[key].append(out / name)
    manifest = {
        **split.meta, "num_tasks": split.num_tasks, "replay_rate": split.replay_rate, "seed": split.seed,
        "classes": split.classes, "class_names": class_names,
        "rows": {"train": [int(i.size) for i in split.train], "test": [int(i.size) for i in split.test],
                 "replay": [int(i.size) for i in split.replay]},
    }
    atomic_write_text(out / "split.json", json.dumps(manifest, indent=1))
    return LifelongFiles(out, split, class_names, names["train"], names["test"], names["replay"],
                         names["reweight"], out / "split.json")


def write_class_incremental(
    data_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    num_tasks: int,
    drop_rate: float,
    replay_rate: float = CIFAR_REPLAY_RATE,
    seed: int = DEFAULT_SEED,
    *,
    train_dir: str = "train",
    test_dir: str = "test",
    allow_degenerate: bool = False,
) -> LifelongFiles:
    """Class-incremental CSVs from ``data_dir/{train,test}/{class}/{file}`` (``lifeLongDataGeneator.py``, CIFAR as
    images).

    Labels are the indices of the sorted class folder names; the ``image`` column is
    ``{train_dir}/{class}/{file}`` (relative to ``data_dir``). Writes ``train{t}.csv``, ``test{t}.csv``,
    ``replay{t}.csv``, ``reweight_{t}.json`` for ``t < num_tasks`` and ``split.json`` (the classes per task
    and the settings) into ``output_dir``.
    """
    root = Path(data_dir)
    class_names = _list_dirs(root / train_dir, f"{root}/{train_dir}/<class>/<image files>")
    test_names = _list_dirs(root / test_dir, f"{root}/{test_dir}/<class>/<image files>")
    if test_names != class_names:
        diff = sorted(set(class_names) ^ set(test_names))[:5]
        raise ValueError(
            f"{train_dir}/ and {test_dir}/ must hold the same class folders; they differ in {diff}"
        )
    train = _scan(root / train_dir, train_dir, class_names)
    test = _scan(root / test_dir, test_dir, class_names)
    empty = sorted(set(class_names) - {class_names[i] for i in np.unique(train[1])})
    if empty:
        raise ValueError(
            f"class folder(s) {empty[:5]} under {root / train_dir} hold no image file (name.ext)"
        )
    classes = class_split(len(class_names), num_tasks, drop_rate, seed, allow_degenerate=allow_degenerate)
    meta = {"kind": "class_incremental", "num_classes": len(class_names), "drop_rate": float(drop_rate)}
    split = _assemble(train[1], classes, task_indices(train[1], classes), task_indices(test[1], classes),
                      replay_rate, seed, meta)
    return _write(output_dir, split, class_names, train, test)


def write_domain_incremental(
    data_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    domains: Sequence[str],
    replay_rate: float = DOMAIN_REPLAY_RATE,
    seed: int = DEFAULT_SEED,
    *,
    subdir: str = "",
    class_names: Literal["sorted", "numeric"] = "sorted",
    train_dir: str = "train",
    test_dir: str = "test",
) -> LifelongFiles:
    """Domain-incremental CSVs (``lifeLongDataGeneator_office.py`` / ``_image_CLEF.py``, Office-31 /
    ImageCLEF): one task per domain, in the given order, from
    ``data_dir/{domain}/{subdir}/{train,test}/{class}/{file}``; the ``image`` column is that path relative to
    ``data_dir``. Classes come from the first domain's train folder: ``"sorted"`` names (Office) or
    ``"numeric"`` folders ``0..n-1`` with label = the number (ImageCLEF). Presets: ``**OFFICE31``,
    ``**IMAGECLEF``.
    Writes the same files as :func:`write_class_incremental`.
    """
    if isinstance(domains, str) or len(domains) == 0 or len(set(domains)) != len(domains):
        raise ValueError(f"domains={domains!r} must be a non-empty sequence of distinct domain folder names")
    if class_names not in ("sorted", "numeric"):
        raise ValueError(f"class_names={class_names!r}: use 'sorted' (Office) or 'numeric' (ImageCLEF)")
    root = Path(data_dir)

    def folder(dom: str, source: str) -> tuple[Path, str]:
        parts = [p for p in (dom, subdir, source) if p]
        return root.joinpath(*parts), "/".join(parts)

    first, _ = folder(domains[0], train_dir)
    names = _list_dirs(first, f"{first}/<class>/<image files>")
    if class_names == "numeric":
        expected = {str(i) for i in range(len(names))}
        if set(names) != expected:
            raise ValueError(
                f"class_names='numeric' needs class folders named 0..{len(names) - 1}, found {names[:12]}"
            )
        names = [str(i) for i in range(len(names))]
    scanned: dict[str, tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]] = {}
    for source in (train_dir, test_dir):
        paths, labels, doms = [], [], []
        for dom in domains:
            path, prefix = folder(dom, source)
            extra = sorted(set(_list_dirs(path, f"{path}/<class>/<image files>")) - set(names))
            if extra:
                raise ValueError(
                    f"{path} has class folders {extra[:5]} that the first domain {domains[0]!r} lacks"
                )
            p, lab = _scan(path, prefix, names)
            paths.append(p)
            labels.append(lab)
            doms.append(np.full(lab.size, dom, dtype=object))
        scanned[source] = (paths, labels, doms)
    (trp, trl, trd), (tep, tel, ted) = scanned[train_dir], scanned[test_dir]
    train = (np.concatenate(trp), np.concatenate(trl))
    test = (np.concatenate(tep), np.concatenate(tel))
    split = domain_incremental_split(
        train[1], np.concatenate(trd), test[1], np.concatenate(ted), list(domains), replay_rate, seed
    )
    return _write(output_dir, split, names, train, test)
