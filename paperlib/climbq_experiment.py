"""The ClimbQ and Levene notebooks' experiments: long-tailed data, four methods, seeds, stored models, claims.

The method and every departure from the original code are described in docs/climbq.md.

ClimbQ notebook, per imbalance ratio gamma and seed: an FP32 ResNet-20 (ClimbQ's topology: option-B
shortcut, activation quantizer before the ReLU) is trained with cross entropy on the long-tailed data
(:func:`paperlib.pretrain.pretrained_fp32`, cached), then fine-tuned at W{b}A{b} three ways:

- ``uniform+CE``: DoReFa weights and a uniform activation quantizer in the same slots (the ablation: see
  :class:`SymmetricUniformActivation`), cross entropy;
- ``ClimbQ+CE``: ClimbQ's Gaussian-CDF weight/activation quantizers with the class distribution scaling
  (``set_sigma(model, batch_sigma(y, K))`` before every training forward, :class:`SigmaScaling`), cross entropy;
- ``ClimbQ+HomoVar``: the same quantizers, loss :class:`paperlib.climbq.HomoVarLoss` with the dataset counts
  (it *replaces* cross entropy, as in the original's ``main.py``), diagnostics logged per epoch
  (:class:`HomoVarCriterion`).

The first conv is quantized and the last layer (``fc``) stays FP32, as in the original. The fine-tuned model is
the epoch with the best top-1 on a held-out validation split (half of the balanced test split by default;
``selection="best_test"`` is the original's max over epochs of test top-1, ``"last"`` the last epoch). The
W4A4 models (and the FP32 starting points) are stored as state dicts in the run directory so the Levene notebook
can analyse them (:func:`climbq_models`). The Levene notebook's driver is :func:`run_levene`.

Both drivers store their claims (``metrics["claims"]``, :mod:`paperlib.claims` records: methods compared
pairwise by seed, Levene's W on the log scale) and :func:`climbq_findings` / :func:`levene_findings` write the
notebooks' "What we found" paragraphs from the metrics. Imbalance ratios the data cannot realise are refused
before any work (:func:`validate_climbq`, registered with the presets); every table shows the real ratio
(max count / min count) beside gamma.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from . import claims as cl
from .callback import Callback
from .climbq import ClimbQActivation, ClimbQWeight, batch_sigma
from .climbq_hooks import HomoVarCriterion, SigmaScaling
from .data.errors import DataError
from .data.long_tail import CIFAR10_LT_ORDER, SYNDIGITS_LT_ORDER, long_tail_counts, long_tail_subset
from .data.tensors import InMemoryData, TensorLoader
from .levene import capture_features, dispersion, f_critical, homogeneity_bounds, levene_features
from .models import create_model
from .presets import register_presets
from .pretrain import pretrained_fp32
from .quant import ClippedActivation, DoReFaWeight, quantize_model
from .quant.core import first_last_layers
from .quant.uniform import uniform_quantize
from .runs import completed_runs, read_json, runs_root_of, write_json
from .stats import format_mean_ci, summarize
from .train import TrainConfig, evaluate, fit, resolve_device

NOTEBOOK = "climbq"
LEVENE_NOTEBOOK = "levene"
FP32 = "FP32+CE"
UNIFORM = "uniform+CE"
CLIMBQ_CE = "ClimbQ+CE"
CLIMBQ_HV = "ClimbQ+HomoVar"
METHODS = (FP32, UNIFORM, CLIMBQ_CE, CLIMBQ_HV)
QUANT_METHODS = METHODS[1:]
SELECTIONS = ("val", "best_test", "last")
MODELS_DIR = "models"
PAPER_NUMBERS_NOTE = ("The ClimbQ paper's tables could not be found anywhere (docs/climbq.md, 'Sources'): no number "
                      "from the paper is shown or compared here.")

__all__ = [
    "CLIMBQ_CE", "CLIMBQ_HV", "DATASET_DEFAULTS", "FP32", "METHODS", "UNIFORM", "ClimbQModels", "HomoVarCriterion",
    "LongTailSplits", "SelectBest", "SigmaScaling", "SymmetricUniformActivation", "climbq_models", "find_climbq_run",
    "homovar_batch_bounds",
    "load_base_data", "load_model", "make_long_tail_splits", "quantize_for_method", "run_climbq", "run_levene",
    "runs_root_of", "summary_table", "levene_table", "check_expectations", "checks_summary", "sigma_deviation",
    "SPEC_SANITY_RUN", "with_dataset_defaults", "KNOWN_TRAIN_COUNTS", "realised_imbalance", "imbalance_problems",
    "validate_climbq", "validate_levene", "climbq_claims", "levene_claims", "climbq_findings", "levene_findings",
    "gamma_label", "real_ratio", "levene_bounds_table", "warn_if_unrealised",
]

_COMMON = {"weight_decay": 1e-4, "momentum": 0.9, "sigma_mode": "batch_freq",
           "eval_sigma": 2.0, "act_range": 2.0, "uniform_act": "symmetric", "act_clip": 2.0, "alpha": 0.05,
           "beta": 0.999, "homovar_base": "bce", "homovar_counts": "dataset", "lt_mode": "recursive",
           "lt_min_count": 1, "selection": "val", "val_fraction": 0.5, "split_seed": 0, "tail_classes": 3,
           "save_bits": 4, "sigma_check_batch": 128, "sigma_check_epochs": 10}
CLIMBQ_PRESETS: dict[str, dict[str, Any]] = {
    # digits-LT has 457-683 training images: batch 32 gives 11-17 steps per epoch (batch 128 gave 3-5, too few
    # for the BN running statistics to follow the quantizers in a short fine-tune).
    # gamma 5, 10, 20: real ratios 5.5, 11.4, 27.4 with 25, 12, 5 tail images (docs/climbq.md, 'Long-tailed data');
    # gamma 50 and 100 cannot be told apart on digits (both real 137, one tail image) and are refused.
    # default: gamma 5 and 20 (a 5x spread of real ratios) with 5 seeds and both bit-widths fit the time budget
    # (<= 170 s on 2 cores); a third gamma would not.
    "smoke": {**_COMMON, "dataset": "digits", "model": "resnet20", "image_size": 8, "gammas": [10.0, 20.0],
              "bits": [4, 2], "seeds": [0], "batch_size": 32, "fp_epochs": 4, "fp_lr": 0.1, "fp_scheduler": "cosine",
              "qat_epochs": 1, "qat_lr": 0.02, "qat_scheduler": "none", "milestones": [], "augment": False,
              "threads": 1},
    # 5 seeds: every claim compares methods paired by seed (n = 5 per gamma). Gammas are floats so that any real
    # ratio passes the type check and reaches validate_climbq, which says what the data can realise.
    "default": {**_COMMON, "dataset": "digits", "model": "resnet20", "image_size": 8, "gammas": [5.0, 20.0],
                "bits": [4, 2], "seeds": [0, 1, 2, 3, 4], "batch_size": 32, "fp_epochs": 10, "fp_lr": 0.1,
                "fp_scheduler": "cosine", "qat_epochs": 3, "qat_lr": 0.02, "qat_scheduler": "none",
                "milestones": [], "augment": False, "threads": 1},
    # The original's protocol (utils/options.py, main.py): SGD 0.04, momentum 0.9, wd 1e-4 on all params,
    # MultiStepLR [80, 150] x0.1, 200 epochs, batch 128, crop + flip; FP32 pretraining on the same long-tailed data
    # with the same optimizer (the original ships no pretraining script). CIFAR-10-LT gammas from the shipped CSVs
    # (real ratios 10.0, 50.5, 208); override dataset/model for
    # CIFAR-100-LT (resnet56) or SynDigits (data_dir with train/<digit>/, test/<digit>/).
    # image_size/augment None: the original's for the dataset (DATASET_DEFAULTS: CIFAR 32 px with crop + flip,
    # SynDigits 28 px without augmentation), so that overriding only ``dataset`` gives the original's input.
    "paper": {**_COMMON, "dataset": "cifar10", "model": "resnet20", "image_size": None, "gammas": [10.0, 50.0, 200.0],
              "bits": [4, 2], "seeds": [0, 1, 2], "batch_size": 128, "fp_epochs": 200, "fp_lr": 0.04,
              "fp_scheduler": "multistep",
              "qat_epochs": 200, "qat_lr": 0.04, "qat_scheduler": "multistep", "milestones": [80, 150],
              "augment": None, "threads": 0},
}
# registered with its range check (validate_climbq) once that is defined, below check_config

#: The original's input size and training augmentation per dataset (original code: main.py's transforms): CIFAR
#: RandomCrop(32,
#: pad 4) + flip; SynDigits Resize(28, 28), no augmentation (a flipped digit is another glyph); the embedded
#: digits at their 8x8. A config's ``image_size``/``augment`` left at None takes these (:func:`with_dataset_defaults`).
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"image_size": 8, "augment": False},
    "cifar10": {"image_size": 32, "augment": True},
    "cifar100": {"image_size": 32, "augment": True},
    "syndigits": {"image_size": 28, "augment": False},
}


def with_dataset_defaults(cfg: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``cfg`` whose ``image_size``/``augment`` left at None (or absent) take the dataset's
    :data:`DATASET_DEFAULTS`; set values are kept."""
    name = cfg.get("dataset")
    if name not in DATASET_DEFAULTS:
        raise DataError(f"dataset={name!r}: use one of {', '.join(DATASET_DEFAULTS)}")
    out = dict(cfg)
    for key, value in DATASET_DEFAULTS[name].items():
        if out.get(key) is None:
            out[key] = value
    return out


# --------------------------------------------------------------------------------------------- imbalance ratios

#: Per-class training images of the datasets whose size is known before any data is read, so that
#: :func:`validate_climbq` can refuse an imbalance ratio the data cannot realise up front: ``digits`` is this
#: project's training split of scikit-learn's digits (``paperlib.data.load``, pinned by a test), CIFAR-10/100 have
#: 5000/500 training images per class, SynDigits 1000.
KNOWN_TRAIN_COUNTS: dict[str, tuple[int, ...]] = {
    "digits": (133, 136, 133, 137, 136, 136, 136, 134, 131, 135),
    "cifar10": (5000,) * 10,
    "cifar100": (500,) * 100,
    "syndigits": (1000,) * 10,
}
#: A gamma whose real ratio (max count / min count) exceeds ``MAX_RATIO_STRETCH * gamma`` is not realised by the
#: data: the recursive floor of the original's generator ran away (digits: gamma = 50 gives 137, one tail image).
MAX_RATIO_STRETCH = 2.0


def real_ratio(counts: Sequence[int]) -> float:
    """The imbalance ratio the data really has: ``max(counts) / min(counts)`` (inf for an empty class)."""
    lo = min(counts)
    return math.inf if lo == 0 else max(counts) / lo


def realised_imbalance(available: Sequence[int], gammas: Sequence[float], mode: str = "recursive",
                       min_count: int = 0) -> list[dict[str, Any]]:
    """What the long-tail generator makes of each gamma on classes with ``available`` training images.

    Per gamma (docs/climbq.md, 'Long-tailed data'): ``counts`` (head first, after ``min_count``), ``real_ratio``
    (max/min of them), ``empty`` (how many classes the generator itself leaves with 0 images, before
    ``min_count`` fills them) and ``tail`` (the smallest class)."""
    avail = sorted((int(a) for a in available), reverse=True)
    out = []
    for gamma in gammas:
        raw = long_tail_counts(avail, gamma, mode, 0, allow_empty=True)
        counts = long_tail_counts(avail, gamma, mode, min_count, allow_empty=True)
        out.append({"gamma": gamma, "counts": counts, "real_ratio": real_ratio(counts),
                    "empty": sum(c == 0 for c in raw), "tail": min(counts)})
    return out


def imbalance_problems(available: Sequence[int], gammas: Sequence[float], mode: str = "recursive",
                       min_count: int = 0, what: str = "the data") -> list[str]:
    """Why ``gammas`` cannot be realised on classes with ``available`` images (empty list: they can).

    A gamma is refused when the generator leaves a class empty (``min_count`` would fill it with a ratio that has
    nothing to do with gamma), when its real ratio exceeds :data:`MAX_RATIO_STRETCH` times gamma, and when two
    gammas give the same counts (they would be labelled as different experiments)."""
    problems, seen = [], {}
    for r in realised_imbalance(available, gammas, mode, min_count):
        g, ratio = r["gamma"], r["real_ratio"]
        shown = ", ".join(str(c) for c in r["counts"][:3]) + ", ..., " + str(r["counts"][-1])
        if r["empty"]:
            problems.append(f"gamma={g:g} leaves {r['empty']} class(es) of {what} with 0 images (real counts "
                            f"[{shown}], real ratio {ratio:.3g} once filled with lt_min_count)")
        elif ratio > MAX_RATIO_STRETCH * g:
            problems.append(f"gamma={g:g} gives the real ratio {ratio:.3g} on {what} (counts [{shown}]): "
                            f"more than {MAX_RATIO_STRETCH:g}x gamma")
        key = tuple(r["counts"])
        if key in seen:
            problems.append(f"gamma={seen[key]:g} and gamma={g:g} give the same counts on {what} (real ratio "
                            f"{ratio:.3g}): use distinct ratios")
        seen.setdefault(key, g)
    return problems


def warn_if_unrealised(available: Sequence[int], cfg: dict[str, Any], what: str = "the data") -> list[str]:
    """Warn (``UserWarning``) naming the real ratios when the data read by a driver cannot realise ``cfg``'s
    gammas (:func:`imbalance_problems`); returns the problems. Data of the known sizes never get here:
    :func:`validate_climbq` refuses such gammas before any work."""
    problems = imbalance_problems(available, cfg["gammas"], cfg["lt_mode"], cfg["lt_min_count"], what)
    if problems:
        warnings.warn("imbalance ratios the data do not realise (every table shows the real ratio): "
                      + "; ".join(problems), stacklevel=2)
    return problems


def largest_realisable_gamma(available: Sequence[int], mode: str = "recursive") -> float:
    """The largest integer gamma (up to 10^4) that :func:`imbalance_problems` accepts alone."""
    best = 1.0
    for g in range(2, 10_001):
        if imbalance_problems(available, [g], mode):
            break
        best = float(g)
    return best


# --------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class LongTailSplits:
    """One gamma's data, every split labelled by *rank* (0 = head, K-1 = the smallest class).

    ``train``: the long-tailed training subset (the original's generator, docs/climbq.md 'Long-tailed data');
    ``full_test``: the whole balanced test split; ``val``/``test``: its stratified halves when
    ``selection="val"`` (else ``val`` is None and ``test`` is ``full_test``). ``order[r]`` is the original class
    id of rank r, ``counts[r]`` its training count.
    """

    gamma: float
    train: InMemoryData
    val: InMemoryData | None
    test: InMemoryData
    full_test: InMemoryData
    counts: list[int]
    order: list[int]
    classes: list[str]

    @property
    def selection_set(self) -> InMemoryData:
        return self.val if self.val is not None else self.test


def _with_labels(data: InMemoryData, labels: np.ndarray, classes: list[str]) -> InMemoryData:
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64, device=data.y.device)
    return InMemoryData(data.x, y, classes, data.mean, data.std, data.source_index)


def stratified_split(labels: Sequence[int] | np.ndarray, fraction: float,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(first, rest)`` sorted index arrays: ``round(fraction * n_c)`` seeded picks of every class c go first."""
    if not 0 < fraction < 1:
        raise ValueError(f"val_fraction={fraction} must be in (0, 1): the share of the balanced test split held "
                         "out for model selection")
    y = np.asarray(labels)
    rng = np.random.default_rng(seed)
    first = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n = int(round(fraction * idx.size))
        if n < 1 or n >= idx.size:
            raise ValueError(f"class {int(c)} has {idx.size} test samples: too few to split with "
                             f"val_fraction={fraction}; use selection='best_test' or 'last'")
        first.append(idx[:n])
    first_idx = np.sort(np.concatenate(first))
    rest = np.setdiff1d(np.arange(y.size), first_idx)
    return first_idx, rest


def make_long_tail_splits(train: InMemoryData, test: InMemoryData, gamma: float, *, mode: str = "recursive",
                          min_count: int = 0, selection: str = "val", val_fraction: float = 0.5,
                          split_seed: int = 0, class_order: Sequence[int] | None = None) -> LongTailSplits:
    """Long-tailed training subset (``long_tail_subset``) and the relabelled balanced test split (see class)."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection={selection!r}: use 'val' (held-out validation split), 'best_test' (the "
                         "original: best test top-1 over epochs) or 'last' (last epoch)")
    lt = long_tail_subset(train.y, gamma, mode=mode, min_count=min_count, num_classes=train.num_classes,
                          class_order=class_order)
    classes = [train.classes[c] for c in lt.order]
    lt_train = _with_labels(train.subset(lt.indices), lt.labels, classes)
    full_test = _with_labels(test, lt.relabel(test.y), classes)
    val, rep = None, full_test
    if selection == "val":
        v, t = stratified_split(full_test.y.cpu().numpy(), val_fraction, split_seed)
        val, rep = full_test.subset(v), full_test.subset(t)
    return LongTailSplits(gamma=float(gamma), train=lt_train, val=val, test=rep, full_test=full_test,
                          counts=list(lt.counts), order=list(lt.order), classes=classes)


def _load_image_folder(data_dir: Path, split: str, size: int, device: torch.device,
                       mean: Sequence[float], std: Sequence[float]) -> InMemoryData:
    from .data.long_tail import scan_image_folder
    from .data.manifest import load_manifest_tensors

    items = scan_image_folder(data_dir, split)
    names = sorted(items)
    rows = [(p, i) for i, c in enumerate(names) for p in items[c]]
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / f"{split}.csv"
        pd.DataFrame(rows, columns=["image", "label"]).to_csv(csv, index=False)
        data = load_manifest_tensors(csv, data_dir, size, mean=mean, std=std, device=device,
                                     num_classes=len(names))
    return InMemoryData(data.x, data.y, names, data.mean, data.std, data.source_index)


def load_base_data(cfg: dict[str, Any], device: torch.device, data_dir: str = "") -> tuple[InMemoryData,
                                                                                          InMemoryData,
                                                                                          list[int] | None]:
    """``(train, test, class_order)`` of the preset's dataset; ``class_order`` replays the shipped CSV order.

    ``digits`` (embedded, grey 8x8), ``cifar10``/``cifar100`` (torchvision folders under ``data_dir``) and
    ``syndigits`` (``data_dir/train/<digit>/*.jpg`` and ``data_dir/test/<digit>/*.jpg``, resized to
    ``image_size``, by default 28x28, normalised with 0.5/0.5 as the original); ``image_size`` None: the
    dataset's :data:`DATASET_DEFAULTS`.
    """
    from .data.load import load_dataset

    cfg = with_dataset_defaults(cfg)
    name = cfg["dataset"]
    if name == "syndigits":
        if not data_dir or not (Path(data_dir) / "train").is_dir():
            raise DataError(f"dataset 'syndigits' needs data_dir: the folder that holds train/<digit>/ and "
                            f"test/<digit>/ image folders of the Kaggle Synthetic Digits set (got "
                            f"data_dir={data_dir!r}); it is never downloaded by this project")
        size = cfg["image_size"]
        train = _load_image_folder(Path(data_dir), "train", size, device, (0.5,) * 3, (0.5,) * 3)
        test = _load_image_folder(Path(data_dir), "test", size, device, (0.5,) * 3, (0.5,) * 3)
        if test.classes != train.classes:  # labels are indices into the sorted folder names of each split
            raise DataError(f"syndigits: the class folders of {data_dir}/test ({test.classes}) differ from those "
                            f"of {data_dir}/train ({train.classes}); both splits need the same <digit>/ folders")
        order = [train.classes.index(c) for c in SYNDIGITS_LT_ORDER] if set(train.classes) == set(
            SYNDIGITS_LT_ORDER) else None
        return train, test, order
    channels = 1 if name == "digits" else 3
    train, test = load_dataset(name, data_dir or None, size=cfg["image_size"], channels=channels, device=device)
    order = None
    if name == "cifar10" and set(train.classes) == set(CIFAR10_LT_ORDER):
        order = [train.classes.index(c) for c in CIFAR10_LT_ORDER]
    return train, test, order


# --------------------------------------------------------------------------------------------- models


class SymmetricUniformActivation(nn.Module):
    """The uniform counterpart of ClimbQ's activation quantizer (not from the paper; the baseline's choice).

    ``R (2 U_k((clamp(x, -R, R)/R + 1)/2) - 1)``: exactly ClimbQ's ``2^k`` output codes ``R (2i/n - 1)`` with a
    linear instead of a Gaussian-CDF projection, straight-through inside [-R, R] (zero gradient outside).
    It suits the pre-ReLU slots (the option-B shortcut's negative half survives), which a [0, c] clip would not.
    """

    def __init__(self, bits: int, act_range: float = 2.0) -> None:
        super().__init__()
        if bits != 32 and not 2 <= bits <= 8:
            raise ValueError(f"bits={bits}: use 2..8 or 32")
        if not act_range > 0:
            raise ValueError(f"act_range={act_range} must be > 0")
        self.bits, self.act_range = bits, float(act_range)

    def forward(self, x: Tensor) -> Tensor:
        if self.bits == 32:
            return x
        u = (x.clamp(-self.act_range, self.act_range) / self.act_range + 1) / 2
        return (uniform_quantize(u, self.bits) * 2 - 1) * self.act_range

    def extra_repr(self) -> str:
        return f"bits={self.bits}, act_range={self.act_range}"


def model_kwargs(cfg: dict[str, Any], num_classes: int, in_channels: int) -> dict[str, Any]:
    """ClimbQ's topology for ``cfg["model"]``: option-B (ResNet) / conv (MobileNetV2) shortcut, Q_a pre-ReLU."""
    kw: dict[str, Any] = {"num_classes": num_classes, "in_channels": in_channels, "act_position": "pre_relu"}
    if cfg["model"].startswith("resnet"):
        kw["shortcut"] = "B"
    elif cfg["model"] == "mobilenetv2":
        kw["shortcut"] = "climbq"
    return kw


def quantize_for_method(fp_model: nn.Module, method: str, bits: int, cfg: dict[str, Any]) -> nn.Module:
    """A quantized copy of ``fp_model`` for ``method`` at W{bits}A{bits}; the last layer stays FP32."""
    if method not in QUANT_METHODS:
        raise ValueError(f"method={method!r}: quantized methods are {list(QUANT_METHODS)}")
    q = copy.deepcopy(fp_model)
    last = first_last_layers(q)[-1]
    if method == UNIFORM:
        if cfg["uniform_act"] == "symmetric":
            def act() -> nn.Module:
                return SymmetricUniformActivation(bits, cfg["act_range"])
        elif cfg["uniform_act"] == "clipped":
            def act() -> nn.Module:
                return ClippedActivation(bits, cfg["act_clip"])
        else:
            raise ValueError(f"uniform_act={cfg['uniform_act']!r}: use 'symmetric' (ClimbQ's codes, linear "
                             "projection) or 'clipped' (DoReFa [0, act_clip])")
        return quantize_model(q, weight=lambda _: DoReFaWeight(bits), activation=act, skip=[last])
    return quantize_model(q, weight=lambda _: ClimbQWeight(bits),
                          activation=lambda: ClimbQActivation(bits, cfg["act_range"], cfg["eval_sigma"]),
                          skip=[last])


# --------------------------------------------------------------------------------------------- training hooks


def sigma_deviation(labels: Sequence[int] | np.ndarray | Tensor, num_classes: int, batch_size: int = 128,
                    epochs: int = 10, seed: int = 0, mode: str = "batch_freq",
                    counts: Sequence[int] | None = None) -> dict[str, Any]:
    """The class distribution scaling's largest ``|sigma - 2|`` on ``labels`` at ``batch_size`` (claim
    ``scaling-near-2``, docs/climbq.md 'Class distribution scaling').

    sigma depends on the batch labels only, so the "B = 128" statement can be checked on any label set
    without training: ``epochs`` seeded shuffles of ``labels`` cut into batches of ``batch_size`` (the last one
    partial, as a DataLoader without ``drop_last``), :func:`paperlib.climbq.batch_sigma` per batch. Returns
    ``max_full`` (full batches; None when there are fewer than ``batch_size`` labels), ``max_all`` (the partial
    batch included), ``last_batch`` (its size; 0 when ``batch_size`` divides the count) and the settings.
    """
    y = torch.as_tensor(np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels), dtype=torch.int64)
    if y.ndim != 1 or y.numel() == 0:
        raise ValueError("labels must be a non-empty 1-D sequence of class ids")
    if batch_size < 1 or epochs < 1:
        raise ValueError(f"batch_size={batch_size} and epochs={epochs} must be >= 1")
    rng = np.random.default_rng(seed)
    full, every = [], []
    for _ in range(epochs):
        order = torch.as_tensor(rng.permutation(y.numel()))
        for start in range(0, y.numel(), batch_size):
            yb = y[order[start:start + batch_size]]
            dev = float((batch_sigma(yb, num_classes, mode, counts=counts) - 2).abs().max())
            every.append(dev)
            if yb.numel() == batch_size:
                full.append(dev)
    return {"batch_size": int(batch_size), "epochs": int(epochs), "n": int(y.numel()),
            "max_full": max(full) if full else None, "max_all": max(every),
            "last_batch": int(y.numel() % batch_size)}


class SelectBest(Callback):
    """Model selection: evaluate on ``data`` after every epoch, keep the state with the best top-1 (first wins).

    ``data=None`` keeps the last epoch. After :func:`fit`, :meth:`restore` loads the kept state.
    """

    def __init__(self, data: InMemoryData | None, batch_size: int = 512) -> None:
        self.data, self.batch_size = data, batch_size
        self.best_top1, self.best_epoch = -math.inf, -1
        self._model: nn.Module | None = None
        self._state: dict[str, Tensor] | None = None

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self._model = model

    def on_epoch_end(self, epoch: int, stats: dict[str, Any]) -> None:
        if self.data is None:
            self.best_epoch = epoch
            return
        top1 = evaluate(self._model, self.data, batch_size=self.batch_size)["top1"]
        stats["select_top1"] = top1
        if top1 > self.best_top1:
            self.best_top1, self.best_epoch = top1, epoch
            self._state = {k: v.detach().clone() for k, v in self._model.state_dict().items()}

    def restore(self, model: nn.Module) -> int:
        if self._state is not None:
            model.load_state_dict(self._state)
        return self.best_epoch


def _tail_accuracy(per_class: Sequence[float], tail: int) -> float:
    vals = [a for a in list(per_class)[-tail:] if not math.isnan(a)]
    return sum(vals) / len(vals) if vals else float("nan")


def _report_row(report: dict[str, Any], tail: int) -> dict[str, Any]:
    return {"top1": report["top1"], "balanced_accuracy": report["balanced_accuracy"],
            "tail_accuracy": _tail_accuracy(report["per_class_accuracy"], tail),
            "per_class_accuracy": [float(a) for a in report["per_class_accuracy"]]}


def finetune(fp_model: nn.Module, method: str, bits: int, splits: LongTailSplits, cfg: dict[str, Any], seed: int,
             device: torch.device, progress: bool | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Quantize ``fp_model`` for ``method``, fine-tune it, select the epoch; ``(model, result)``.

    ``cfg["qat_epochs"] = 0``: no fine-tuning (:func:`post_training_eval`)."""
    q = quantize_for_method(fp_model, method, bits, cfg)
    if cfg["qat_epochs"] == 0:
        return q, post_training_eval(q, method, splits, cfg, seed, device)
    k = splits.train.num_classes
    tcfg = TrainConfig(epochs=cfg["qat_epochs"], lr=cfg["qat_lr"], momentum=cfg["momentum"],
                       weight_decay=cfg["weight_decay"], batch_size=cfg["batch_size"], scheduler=cfg["qat_scheduler"],
                       milestones=list(cfg["milestones"]), seed=seed, augment=cfg["augment"])
    select = SelectBest(None if cfg["selection"] == "last" else splits.selection_set)
    callbacks: list[Callback] = []
    sigma = None
    criterion = None
    if method in (CLIMBQ_CE, CLIMBQ_HV):
        sigma = SigmaScaling(k, cfg["sigma_mode"], counts=splits.counts, batch_size=cfg["batch_size"])
        callbacks.append(sigma)
    hv = None
    if method == CLIMBQ_HV:
        counts = "batch" if cfg["homovar_counts"] == "batch" else splits.counts
        hv = HomoVarCriterion(counts, cfg["alpha"], cfg["beta"], cfg["homovar_base"])
        callbacks.append(hv)
        criterion = hv
    callbacks.append(select)
    kwargs = {"criterion": criterion} if criterion is not None else {}
    res = fit(q, splits.train, None, tcfg, callbacks=callbacks, device=device, progress=progress, **kwargs)
    best_epoch = select.restore(q)
    report = evaluate(q, splits.test, device=device)
    out = {**_report_row(report, cfg["tail_classes"]), "best_epoch": best_epoch, "history": res.history,
           "sigma_max_dev": None if sigma is None else sigma.max_deviation,
           "sigma_max_dev_full": None if sigma is None else sigma.max_deviation_full,
           "homovar": None if hv is None else hv.last_epoch}
    return q, out


def post_training_eval(q: nn.Module, method: str, splits: LongTailSplits, cfg: dict[str, Any], seed: int,
                       device: torch.device) -> dict[str, Any]:
    """``finetune``'s result for ``qat_epochs = 0``: the quantized model ``q`` evaluated as is (post-training
    quantization; eval mode, so ClimbQ's activations use ``eval_sigma``). ``best_epoch`` is -1 and the history
    empty. With ``ClimbQ+HomoVar`` (which then equals ``ClimbQ+CE``: the loss only acts through training) HomoVar's
    per-class diagnostics are *measured* on one pass over the shuffled training batches (seed ``seed``,
    ``batch_size``) in eval mode without any update, in place of the last fine-tuning epoch's."""
    q.to(device).eval()
    hv = None
    if method == CLIMBQ_HV:
        counts = "batch" if cfg["homovar_counts"] == "batch" else splits.counts
        hv = HomoVarCriterion(counts, cfg["alpha"], cfg["beta"], cfg["homovar_base"])
        with torch.no_grad():
            for x, y in TensorLoader(splits.train.to(device), cfg["batch_size"], shuffle=True, seed=seed):
                hv(q, x, y)
        hv.on_epoch_end(0, {})
    report = evaluate(q, splits.test, device=device)
    return {**_report_row(report, cfg["tail_classes"]), "best_epoch": -1, "history": [], "sigma_max_dev": None,
            "sigma_max_dev_full": None, "homovar": None if hv is None else hv.last_epoch}


# --------------------------------------------------------------------------------------------- the driver


def _model_file(method: str, gamma: float, seed: int, bits: int) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", method.lower()).strip("-")
    g = int(gamma) if float(gamma).is_integer() else gamma
    return f"{slug}_g{g}_s{seed}_w{bits}a{bits}.pt" if bits != 32 else f"{slug}_g{g}_s{seed}.pt"


def _save_state(model: nn.Module, path: Path) -> int:
    from .train import save_checkpoint

    save_checkpoint(path, {k: v.detach().cpu() for k, v in model.state_dict().items()})
    return path.stat().st_size


@contextlib.contextmanager
def _threads(cfg: dict[str, Any], device: torch.device) -> Iterator[None]:
    """``torch.set_num_threads(cfg["threads"])`` on CPU for the block (0: torch's default), then restore it.

    One thread: the 8x8 digits ResNet is bound by per-op overhead, and two threads on a shared 2-core machine
    ran 5-10x slower than one (measured)."""
    before = torch.get_num_threads()
    if device.type == "cpu" and cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _is_int(v: Any) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)


def check_config(cfg: dict[str, Any]) -> None:
    """Clear errors for settings the driver cannot use (each names the setting and its valid range)."""
    if not isinstance(cfg["bits"], list | tuple) or not cfg["bits"]:
        raise ValueError(f"bits={cfg['bits']!r}: give a non-empty list of bit-widths in 2..8, e.g. [4, 2]")
    bad = [b for b in cfg["bits"] if not _is_int(b) or not 2 <= b <= 8]
    if bad:
        raise ValueError(f"bits={cfg['bits']}: every bit-width must be an int in 2..8 (ClimbQ's 1-bit quantizer is "
                         "degenerate: every weight +1, every activation +2; docs/climbq.md 'Quantizers')")
    for key in ("seeds", "gammas"):
        if not isinstance(cfg[key], list | tuple) or not cfg[key]:
            raise ValueError(f"{key}={cfg[key]!r}: seeds and gammas must be non-empty lists")
    if not all(_is_int(s) for s in cfg["seeds"]) or len(set(cfg["seeds"])) != len(cfg["seeds"]):
        raise ValueError(f"seeds={cfg['seeds']!r}: seeds must be distinct ints, e.g. [0, 1, 2, 3, 4]")
    if not all(_is_number(g) and math.isfinite(g) for g in cfg["gammas"]):
        raise ValueError(f"gammas={cfg['gammas']!r}: imbalance ratios must be finite numbers >= 1")
    if any(not g >= 1 for g in cfg["gammas"]):
        raise ValueError(f"gammas={cfg['gammas']}: the imbalance ratio must be >= 1 (1 keeps the data balanced)")
    if cfg["selection"] not in SELECTIONS:
        raise ValueError(f"selection={cfg['selection']!r}: use one of {SELECTIONS}")
    if cfg["homovar_counts"] not in ("dataset", "batch"):
        raise ValueError(f"homovar_counts={cfg['homovar_counts']!r}: use 'dataset' (the original) or 'batch'")
    for key in ("fp_epochs", "qat_epochs"):
        v = cfg[key]
        if not _is_int(v) or v < 0:
            raise ValueError(f"{key}={v!r}: epochs must be an int >= 0 (fp_epochs=0: fine-tune from the random "
                             "initialisation; qat_epochs=0: quantize without fine-tuning; None in the notebook: the "
                             "preset's)")
    if cfg["fp_epochs"] == 0 and cfg["qat_epochs"] == 0:
        raise ValueError("fp_epochs=0 and qat_epochs=0: every model would stay at its random initialisation; "
                         "train at least one stage (fp_epochs >= 1 or qat_epochs >= 1)")


def validate_climbq(cfg: dict[str, Any]) -> None:
    """The climbq notebook's range check, run by :func:`paperlib.presets.check_settings` before any work.

    Everything :func:`check_config` checks, the settings' other ranges, and that the data can realise every
    gamma (:func:`imbalance_problems` on :data:`KNOWN_TRAIN_COUNTS`: no class left empty, a real ratio at most
    :data:`MAX_RATIO_STRETCH` times gamma, distinct counts per gamma). Raises ``ValueError`` naming the setting."""
    check_config(cfg)
    if cfg["dataset"] not in DATASET_DEFAULTS:
        raise ValueError(f"dataset={cfg['dataset']!r}: use one of {', '.join(DATASET_DEFAULTS)}")
    if cfg["model"] not in ("resnet20", "resnet56", "mobilenetv2"):
        raise ValueError(f"model={cfg['model']!r}: use resnet20, resnet56 or mobilenetv2 (ClimbQ's networks)")
    if cfg["lt_mode"] not in ("recursive", "closed_form"):
        raise ValueError(f"lt_mode={cfg['lt_mode']!r}: use 'recursive' (the original) or 'closed_form'")
    if not _is_int(cfg["lt_min_count"]) or cfg["lt_min_count"] < 0:
        raise ValueError(f"lt_min_count={cfg['lt_min_count']!r} must be an int >= 0")
    for key in ("batch_size", "tail_classes", "sigma_check_batch", "sigma_check_epochs"):
        if not _is_int(cfg[key]) or cfg[key] < 1:
            raise ValueError(f"{key}={cfg[key]!r} must be an int >= 1")
    if not 0 < cfg["val_fraction"] < 1:
        raise ValueError(f"val_fraction={cfg['val_fraction']!r} must be in (0, 1)")
    for key in ("alpha", "beta"):
        if not 0 < cfg[key] < 1:
            raise ValueError(f"{key}={cfg[key]!r} must be in (0, 1)")
    if cfg["homovar_base"] not in ("bce", "ce"):
        raise ValueError(f"homovar_base={cfg['homovar_base']!r}: use 'bce' (the original) or 'ce'")
    if cfg["sigma_mode"] not in ("batch_freq", "none", "prior"):
        raise ValueError(f"sigma_mode={cfg['sigma_mode']!r}: use 'batch_freq' (the original), 'none' or 'prior'")
    known = KNOWN_TRAIN_COUNTS.get(cfg["dataset"])
    if known is not None:
        problems = imbalance_problems(known, cfg["gammas"], cfg["lt_mode"], cfg["lt_min_count"], cfg["dataset"])
        if problems:
            top = largest_realisable_gamma(known, cfg["lt_mode"])
            raise ValueError(f"gammas={list(cfg['gammas'])}: the data cannot realise these imbalance ratios: "
                             + "; ".join(problems) + f". Use distinct gammas in [1, {top:g}] for {cfg['dataset']} "
                             f"with lt_mode={cfg['lt_mode']!r} (docs/climbq.md, 'Imbalance ratios the data can "
                             "realise')")


register_presets(NOTEBOOK, CLIMBQ_PRESETS, validate=validate_climbq)


def run_climbq(cfg: dict[str, Any], device: str = "auto", data_dir: str = "", *, runs_root: str | Path | None = None,
               models_dir: str | Path | None = None, methods: Sequence[str] = METHODS,
               progress: bool | None = None) -> dict[str, Any]:
    """Run the ClimbQ experiment (see module docstring); return the JSON-native metrics dict.

    ``runs_root`` locates the FP32 cache (``<runs_root>/_cache``; default ``runs/_cache``). With ``models_dir``
    the FP32 starting points and the W{save_bits}A{save_bits} models are saved there as state dicts, listed in
    ``metrics["models"]`` and in ``models_dir/index.json``. ``fp_epochs = 0`` fine-tunes from the seeded random
    initialisation (the FP32 row is that untrained network); ``qat_epochs = 0`` evaluates each quantized model
    without fine-tuning (:func:`post_training_eval`); both 0 is refused.
    """
    cfg = with_dataset_defaults(cfg)
    check_config(cfg)
    dev = resolve_device(device)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    with _threads(cfg, dev):
        return _run_climbq(cfg, dev, data_dir, runs_root, models_dir, methods, progress)


def _run_climbq(cfg: dict[str, Any], dev: torch.device, data_dir: str, runs_root: str | Path | None,
                models_dir: str | Path | None, methods: Sequence[str], progress: bool | None) -> dict[str, Any]:
    train, test, order = load_base_data(cfg, dev, data_dir)
    warn_if_unrealised(train.class_counts(), cfg, f"the {cfg['dataset']} data read here")
    cache_dir = Path(runs_root) / "_cache" if runs_root else None
    mdir = Path(models_dir) if models_dir else None
    rows: list[dict[str, Any]] = []
    history: dict[str, list] = {}
    homovar: list[dict[str, Any]] = []
    models: list[dict[str, Any]] = []
    split_info: dict[str, Any] = {}
    sigma_dev: list[float] = []
    sigma_dev_full: list[float] = []
    sigma_check: dict[str, Any] = {}
    for gamma in cfg["gammas"]:
        splits = make_long_tail_splits(train, test, gamma, mode=cfg["lt_mode"], min_count=cfg["lt_min_count"],
                                       selection=cfg["selection"], val_fraction=cfg["val_fraction"],
                                       split_seed=cfg["split_seed"], class_order=order)
        g = _gkey(gamma)
        split_info[g] = {"counts": splits.counts, "real_ratio": real_ratio(splits.counts),
                         "tail_images": min(splits.counts), "order": splits.order, "classes": splits.classes,
                         "n_train": len(splits.train), "n_val": 0 if splits.val is None else len(splits.val),
                         "n_test": len(splits.test), "test_counts": splits.test.class_counts()}
        sigma_check[g] = sigma_deviation(splits.train.y, splits.train.num_classes, cfg["sigma_check_batch"],
                                         cfg["sigma_check_epochs"], mode=cfg["sigma_mode"], counts=splits.counts)
        kw = model_kwargs(cfg, splits.train.num_classes, splits.train.x.shape[1])
        for seed in cfg["seeds"]:
            torch.manual_seed(seed)  # pretrained_fp32 builds (initialises) the model before fit seeds the RNG
            if cfg["fp_epochs"] == 0:  # no pretraining: the seeded initialisation (quantized training from scratch)
                fp_model = create_model(cfg["model"], **kw).to(dev)
            else:
                fp_cfg = TrainConfig(epochs=cfg["fp_epochs"], lr=cfg["fp_lr"], momentum=cfg["momentum"],
                                     weight_decay=cfg["weight_decay"], batch_size=cfg["batch_size"],
                                     scheduler=cfg["fp_scheduler"], milestones=list(cfg["milestones"]), seed=seed,
                                     augment=cfg["augment"])
                fp_model, _ = pretrained_fp32(cfg["model"], kw, splits.train, splits.test, fp_cfg, device=dev,
                                              cache_dir=cache_dir, progress=progress)
            base = {"gamma": gamma, "seed": seed}
            if FP32 in methods:
                rep = evaluate(fp_model, splits.test, device=dev)
                rows.append({**base, "bits": 32, "method": FP32, **_report_row(rep, cfg["tail_classes"]),
                             "best_epoch": cfg["fp_epochs"] - 1})
                if mdir is not None:
                    models.append(_entry(FP32, gamma, seed, 32, cfg, kw, _save_state(
                        fp_model, mdir / _model_file(FP32, gamma, seed, 32))))
            for bits in cfg["bits"]:
                for method in QUANT_METHODS:
                    if method not in methods:
                        continue
                    q, out = finetune(fp_model, method, bits, splits, cfg, seed, dev, progress)
                    history[f"{g}/W{bits}A{bits}/{method}/{seed}"] = out.pop("history")
                    hv = out.pop("homovar")
                    sd, sdf = out.pop("sigma_max_dev"), out.pop("sigma_max_dev_full")
                    if sd is not None:
                        sigma_dev.append(sd)
                    if sdf is not None and not math.isnan(sdf):
                        sigma_dev_full.append(sdf)
                    if hv:
                        homovar.append({**base, "bits": bits, "counts": splits.counts, **hv})
                    rows.append({**base, "bits": bits, "method": method, **out})
                    if mdir is not None and bits == cfg["save_bits"]:
                        models.append(_entry(method, gamma, seed, bits, cfg, kw, _save_state(
                            q, mdir / _model_file(method, gamma, seed, bits))))
    per_seed = pd.DataFrame(rows)
    summary = summarize(per_seed, ["gamma", "bits", "method"], ["top1", "balanced_accuracy", "tail_accuracy"])
    key = _key_metric(summary, cfg)
    metrics = {
        "dataset": cfg["dataset"],
        "model": cfg["model"],
        "device": str(dev),
        "data_fingerprint": train.fingerprint(),
        "seeds": list(cfg["seeds"]),
        "gammas": list(cfg["gammas"]),
        "bits": list(cfg["bits"]),
        "methods": [m for m in METHODS if m in methods],
        "config": cfg,
        "splits": split_info,
        "per_seed": per_seed.to_dict("records"),
        "summary": summary.to_dict("records"),
        "homovar": homovar,
        "history": history,
        "sigma_max_deviation": max(sigma_dev) if sigma_dev else None,
        "sigma_max_deviation_full": max(sigma_dev_full) if sigma_dev_full else None,
        "sigma_check": sigma_check,
        "models": {"dir": MODELS_DIR, "entries": models, "total_bytes": sum(m["bytes"] for m in models)},
        "paper_numbers": None,
        "paper_numbers_note": PAPER_NUMBERS_NOTE,
        "key_metric": key,
    }
    metrics["claims"] = cl.as_records(climbq_claims(metrics))
    if mdir is not None:
        write_model_index(mdir, metrics)
    return metrics


def _gkey(gamma: float) -> str:
    return str(int(gamma)) if float(gamma).is_integer() else str(gamma)


def _entry(method: str, gamma: float, seed: int, bits: int, cfg: dict[str, Any], kw: dict[str, Any],
           size: int) -> dict[str, Any]:
    return {"method": method, "gamma": gamma, "seed": seed, "bits": bits,
            "file": _model_file(method, gamma, seed, bits), "model": cfg["model"], "model_kwargs": kw, "bytes": size}


def _key_metric(summary: pd.DataFrame, cfg: dict[str, Any]) -> dict[str, Any]:
    g, b = max(cfg["gammas"]), cfg["save_bits"] if cfg["save_bits"] in cfg["bits"] else cfg["bits"][0]
    sel = summary[(summary["gamma"] == g) & (summary["bits"] == b) & (summary["method"] == CLIMBQ_HV)]
    value = float(sel["balanced_accuracy_mean"].iloc[0]) if len(sel) else None
    return {"name": f"{CLIMBQ_HV} W{b}A{b} balanced acc. (gamma={_gkey(g)})", "value": value}


def summary_table(metrics: dict[str, Any]) -> pd.DataFrame:
    """The notebook's table: gamma with its real ratio (max/min training count), W/A bits, method; overall,
    balanced and tail accuracy (%) mean ± 95 % CI (Student t over seeds); n (seeds)."""
    s = pd.DataFrame(metrics["summary"])
    tail = metrics["config"]["tail_classes"]

    def fmt(col: str) -> list[str]:
        return [format_mean_ci(m, c) for m, c in zip(s[f"{col}_mean"], s[f"{col}_ci"], strict=True)]

    return pd.DataFrame({
        "γ (real ratio)": [gamma_label(metrics, g).removeprefix("γ=") for g in s["gamma"]],
        "W/A": ["FP32" if b == 32 else f"W{b}A{b}" for b in s["bits"]],
        "method": s["method"],
        "top-1 (%)": fmt("top1"),
        "balanced acc. (%)": fmt("balanced_accuracy"),
        f"tail-{tail} acc. (%)": fmt("tail_accuracy"),
        "n (seeds)": s["n"],
    })


def paired_differences(metrics: dict[str, Any], a: str, b: str, col: str = "balanced_accuracy") -> pd.DataFrame:
    """Per (gamma, bits): mean over seeds of ``a - b`` in ``col`` and how many seeds have ``a > b``."""
    df = pd.DataFrame(metrics["per_seed"])
    pa = df[df["method"] == a].set_index(["gamma", "bits", "seed"])[col]
    pb = df[df["method"] == b].set_index(["gamma", "bits", "seed"])[col]
    d = (pa - pb).dropna().rename("diff").reset_index()
    out = d.groupby(["gamma", "bits"], sort=False)["diff"].agg(["mean", "count", lambda x: int((x > 0).sum())])
    out.columns = ["mean_diff", "seeds", "wins"]
    return out.reset_index()


# --------------------------------------------------------------------------------------------- claims

#: A synthetic sanity run made while this project was designed (10-class Gaussian data, 3-layer BN-MLP, W4A4,
#: gamma = 50, 8 seeds). NOT from the paper, whose tables could not be found (docs/climbq.md, 'Sources'); kept
#: for reference only: no claim is judged against it.
SPEC_SANITY_RUN = {
    "setting": "synthetic sanity run (Gaussian data, BN-MLP, W4A4, γ=50, 8 seeds; not the paper)",
    "accuracy": {FP32: 82.2, UNIFORM: 81.6, CLIMBQ_CE: 81.1, CLIMBQ_HV: 84.2},
    "tail_accuracy": {FP32: 63.4, UNIFORM: 61.1, CLIMBQ_CE: 59.7, CLIMBQ_HV: 69.2},
    "levene_W": {FP32: 21.0, UNIFORM: 14.3, CLIMBQ_CE: 13.5, CLIMBQ_HV: 11.3},
    "out_of_bounds": {50: 0.08, 200: 0.46},
}
#: The columns of :func:`check_expectations` (the claims table of :func:`paperlib.claims.claims_table`).
CHECK_COLUMNS = list(cl.COLUMNS)
ABSTRACT = "ClimbQ paper, abstract"
SUPPLEMENT = "ClimbQ paper, supplement A.2"
HIGHER = "higher: the 95 % CI of the paired difference lies above 0"


def _counts_of(metrics: dict[str, Any], gamma: float) -> list[int] | None:
    g = _gkey(gamma)
    if g in (metrics.get("splits") or {}):
        return metrics["splits"][g]["counts"]
    return (metrics.get("class_counts") or {}).get(g)


def gamma_label(metrics: dict[str, Any], gamma: float) -> str:
    """``"γ=10 (real 11.4)"``: gamma with the real ratio (max/min training count) of this run's data."""
    counts = _counts_of(metrics, gamma)
    return f"γ={_gkey(gamma)}" if not counts else f"γ={_gkey(gamma)} (real {real_ratio(counts):.3g})"


def _bits_of(metrics: dict[str, Any], bits: int | None) -> int:
    if bits is not None:
        return bits
    save = metrics.get("config", {}).get("save_bits", 4)
    return save if save in metrics.get("bits", [save]) else metrics["bits"][0]


def _seed_values(per: pd.DataFrame, gamma: float, bits: int, method: str, col: str) -> pd.Series:
    """``col`` per seed (index) of ``method`` at ``gamma`` (FP32 rows have bits 32)."""
    if per.empty:
        return pd.Series(dtype=float)
    b = 32 if method == FP32 else bits
    sel = per[(per["gamma"] == gamma) & (per["bits"] == b) & (per["method"] == method)]
    return sel.set_index("seed")[col].astype(float)


def _pair(a: pd.Series, b: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Both sides on the seeds they share, in seed order (the pairing of every comparison)."""
    common = sorted(set(a.index) & set(b.index))
    return a.loc[common].to_numpy(float), b.loc[common].to_numpy(float)


def _claim_scaling(metrics: dict[str, Any], bound: float) -> cl.Claim:
    cid, source = "scaling-near-2", "original code: main.py, model/quantization.py"
    claim = ("The class distribution scaling σ = 2 − p̃ stays near 2 in every batch of 128 (it changes σ by less "
             "than 1 %)")
    expected = f"max |σ − 2| < {bound} over full batches of 128 at every γ"
    sc = metrics.get("sigma_check") or {}
    fulls = {g: v["max_full"] for g, v in sc.items() if v.get("max_full") is not None}
    if not fulls:
        return cl.not_measured(cid, claim, source, "descriptive", expected,
                               "no full batch of 128 long-tailed labels in this run (too few training images)")
    first = next(iter(sc.values()))
    cfg = metrics.get("config", {})
    train = ""
    if metrics.get("sigma_max_deviation") is not None:
        train = (f"; during training at batch {cfg.get('batch_size')}: {metrics['sigma_max_deviation']:.3f} "
                 "(each epoch's last, partial batch included)")
    measured = (f"max |σ − 2| over full batches of {first['batch_size']} ({first['epochs']} shuffled epochs of the "
                "long-tailed labels): " + ", ".join(f"{gamma_label(metrics, float(g))}: {v:.3f}"
                                                    for g, v in fulls.items()) + train)
    note = "" if cfg.get("sigma_mode", "batch_freq") == "batch_freq" else \
        f"sigma_mode={cfg['sigma_mode']!r}: not the original's scaling"
    return cl.property_claim(cid, claim, source, expected, measured, [v < bound for v in fulls.values()], note=note)


def _accuracy_claims(metrics: dict[str, Any], bits: int) -> list[cl.Claim]:
    per = pd.DataFrame(metrics.get("per_seed", []))
    tail = metrics.get("config", {}).get("tail_classes", 3)
    wa = f"W{bits}A{bits}"
    specs = (
        ("homovar-balanced", CLIMBQ_HV, CLIMBQ_CE, "balanced_accuracy", f"{ABSTRACT} (HomoVar loss)",
         "HomoVar raises balanced accuracy over cross entropy (both with ClimbQ's quantizer)"),
        ("homovar-tail", CLIMBQ_HV, CLIMBQ_CE, "tail_accuracy", f"{ABSTRACT} (HomoVar loss)",
         f"HomoVar raises the accuracy of the {tail} smallest classes over cross entropy (both with ClimbQ's "
         "quantizer)"),
        ("climbq-quantizer", CLIMBQ_CE, UNIFORM, "balanced_accuracy", f"{ABSTRACT} (class distribution scaling)",
         "ClimbQ's quantizer (Gaussian-CDF projection with the class distribution scaling) raises balanced "
         "accuracy over the uniform quantizer, both with cross entropy"),
        ("climbq-vs-uniform", CLIMBQ_HV, UNIFORM, "balanced_accuracy", ABSTRACT,
         "ClimbQ (its quantizer + HomoVar) outperforms the uniform quantizer with cross entropy in balanced "
         "accuracy"),
    )
    out = []
    for cid, a, b, col, source, text in specs:
        for gamma in metrics["gammas"]:
            claim = f"{text}; {wa}, {gamma_label(metrics, gamma)}"
            xa, xb = _pair(_seed_values(per, gamma, bits, a, col), _seed_values(per, gamma, bits, b, col))
            if xa.size == 0:
                out.append(cl.not_measured(f"{cid}-g{_gkey(gamma)}", claim, source, "increase", HIGHER,
                                           f"needs {a} and {b} at {wa} in the same seeds"))
                continue
            out.append(cl.paired(f"{cid}-g{_gkey(gamma)}", claim, source, "increase", HIGHER, xa, xb, scale=100,
                                 unit="points", label=f"{a} − {b}"))
    return out


def _claim_gain_grows(metrics: dict[str, Any], bits: int) -> cl.Claim:
    cid, source = "gain-grows-with-imbalance", f"{ABSTRACT} ('especially on highly imbalanced data')"
    gammas = sorted(metrics["gammas"])
    claim = (f"ClimbQ's gain over the uniform quantizer (balanced accuracy, W{bits}A{bits}) is larger at the "
             f"largest imbalance ({gamma_label(metrics, gammas[-1])}) than at the smallest "
             f"({gamma_label(metrics, gammas[0])})")
    if len(gammas) < 2:
        return cl.not_measured(cid, claim, source, "increase", HIGHER, "needs at least two imbalance ratios")
    per = pd.DataFrame(metrics.get("per_seed", []))

    def gain(g: float) -> pd.Series:
        a = _seed_values(per, g, bits, CLIMBQ_HV, "balanced_accuracy")
        b = _seed_values(per, g, bits, UNIFORM, "balanced_accuracy")
        return (a - b).dropna()

    hi, lo = _pair(gain(gammas[-1]), gain(gammas[0]))
    if hi.size == 0:
        return cl.not_measured(cid, claim, source, "increase", HIGHER,
                               f"needs {CLIMBQ_HV} and {UNIFORM} at both imbalance ratios")
    return cl.paired(cid, claim, source, "increase", HIGHER, hi, lo, scale=100, unit="points", bounds=None,
                     label="gain at the largest γ − gain at the smallest γ")


def _steps_all_in(metrics: dict[str, Any], gamma: float, bits: int) -> dict[int, tuple[float, float]]:
    """Per seed: the share of HomoVar training steps with no class out of bounds, and the mean share of classes
    out per step (all fine-tuning epochs of ClimbQ+HomoVar at ``bits``)."""
    out = {}
    for key, hist in (metrics.get("history") or {}).items():
        g, wa, method, seed = key.split("/")
        if method != CLIMBQ_HV or wa != f"W{bits}A{bits}" or g != _gkey(gamma):
            continue
        all_in = [e["homovar_steps_all_in"] for e in hist if "homovar_steps_all_in" in e]
        frac = [e["homovar_fraction_out"] for e in hist if "homovar_fraction_out" in e]
        if all_in:
            out[int(seed)] = (float(np.mean(all_in)), float(np.mean(frac)))
    return out


def _claims_bounds(metrics: dict[str, Any], bits: int, mild_gamma: float, usually: float) -> list[cl.Claim]:
    source = "original code: utils/lt_loss.py"
    expected = f"no class out of bounds in at least {100 * usually:.0f} % of the training steps, in every seed"
    mild = [g for g in metrics["gammas"] if g <= mild_gamma] or [min(metrics["gammas"])]
    out = []
    for gamma in mild:
        cid = f"bounds-rarely-bind-g{_gkey(gamma)}"
        claim = (f"At mild imbalance HomoVar's size bounds rarely bind (it then acts as the class-balanced loss "
                 f"with β = 0.999); W{bits}A{bits}, {gamma_label(metrics, gamma)}")
        per_seed = _steps_all_in(metrics, gamma, bits)
        if not per_seed:
            out.append(cl.not_measured(cid, claim, source, "descriptive", expected,
                                       f"not recorded: no {CLIMBQ_HV} fine-tuning at W{bits}A{bits} in this run"))
            continue
        shares = [v[0] for v in per_seed.values()]
        fracs = [v[1] for v in per_seed.values()]
        measured = (f"no class out of bounds in {100 * min(shares):.0f}–{100 * max(shares):.0f} % of the steps "
                    f"(per seed); mean share of classes out per step {100 * float(np.mean(fracs)):.1f} %")
        out.append(cl.property_claim(cid, claim, source, expected, measured, [s >= usually for s in shares]))
    return out


def climbq_claims(metrics: dict[str, Any], *, bits: int | None = None, sigma_bound: float = 0.05,
                  mild_gamma: float = 10, usually: float = 0.5) -> list[cl.Claim]:
    """The climbq notebook's claims (docs/climbq.md, 'Claims checked'), a pure function of its metrics.

    At W{bits}A{bits} (default: the stored models' ``save_bits``), per gamma, methods paired by seed
    (:func:`paperlib.claims.paired`, accuracy in points): HomoVar vs cross entropy (balanced and tail accuracy),
    ClimbQ's quantizer vs the uniform one, ClimbQ + HomoVar vs the uniform one; whether that last gain grows from
    the smallest to the largest gamma; the class distribution scaling's ``|sigma - 2|`` below ``sigma_bound`` at
    batch 128 (a property of every gamma's labels); and at every gamma <= ``mild_gamma`` (at least the smallest)
    whether HomoVar's bounds leave every class in bounds in at least ``usually`` of the training steps."""
    if not 0 < usually <= 1:
        raise ValueError(f"usually={usually} must be in (0, 1]: the share of steps with no class out of bounds")
    if not sigma_bound > 0:
        raise ValueError(f"sigma_bound={sigma_bound} must be > 0")
    b = _bits_of(metrics, bits)
    return [_claim_scaling(metrics, sigma_bound), *_accuracy_claims(metrics, b), _claim_gain_grows(metrics, b),
            *_claims_bounds(metrics, b, mild_gamma, usually)]


def _w_by_seed(pen: pd.DataFrame, gamma: float, method: str, col: str = "W") -> pd.Series:
    sel = pen[(pen["gamma"] == gamma) & (pen["method"] == method)]
    return sel.set_index("seed")[col].astype(float)


def levene_claims(levene: dict[str, Any], layer: str | None = None) -> list[cl.Claim]:
    """The Levene notebook's claims on Levene's W of the ``layer`` features (default: the penultimate ones, the
    FC's input), per gamma, each a paired ratio per seed on the log scale (:func:`paperlib.claims.log_ratio`):
    quantization (uniform W{b}A{b}) raises W over FP32 (the abstract's premise); ClimbQ's quantizer lowers it
    against the uniform one; HomoVar lowers it against cross entropy; the ClimbQ + HomoVar features pass
    Levene's test (W / F* below 1)."""
    layer = layer or PENULTIMATE
    t = pd.DataFrame(levene.get("tests", []))
    pen = t[t["layer"] == layer] if len(t) else t
    b = levene.get("bits", 4)
    wa = f"W{b}A{b}"
    lower = "lower: the 95 % CI of the paired ratio lies below 1"
    specs = (
        ("quantization-raises-W", UNIFORM, FP32, "increase", f"{ABSTRACT} (quantizing imbalanced data increases the "
         "differences between the class distributions)", f"Quantization (uniform {wa}) raises the heterogeneity of "
         "the class variances (Levene's W) over FP32", "higher: the 95 % CI of the paired ratio lies above 1"),
        ("climbq-lowers-W", CLIMBQ_CE, UNIFORM, "decrease", f"{ABSTRACT} (diminishing the inter-class "
         "heterogeneity)", f"ClimbQ's quantizer lowers Levene's W against the uniform quantizer ({wa}, both with "
         "cross entropy)", lower),
        ("homovar-lowers-W", CLIMBQ_HV, CLIMBQ_CE, "decrease", f"{ABSTRACT}; {SUPPLEMENT}", "HomoVar lowers "
         f"Levene's W against cross entropy (both with ClimbQ's {wa} quantizer)", lower),
    )
    out = []
    for gamma in levene.get("gammas", []):
        gl = gamma_label(levene, gamma)
        for cid, a, bm, direction, source, text, expected in specs:
            claim = f"{text}; {layer} features, {gl}"
            xa, xb = _pair(_w_by_seed(pen, gamma, a), _w_by_seed(pen, gamma, bm)) if len(pen) else (
                np.array([]), np.array([]))
            if xa.size == 0 or not (np.all(xa > 0) and np.all(xb > 0)):
                why = "W is 0 for some model" if xa.size else f"needs {a} and {bm} in the same seeds"
                out.append(cl.not_measured(f"{cid}-g{_gkey(gamma)}", claim, source, direction, expected, why))
                continue
            out.append(cl.log_ratio(f"{cid}-g{_gkey(gamma)}", claim, source, direction, expected, xa, xb,
                                    label=f"W({a}) / W({bm})"))
        cid = f"homovar-homogeneous-g{_gkey(gamma)}"
        claim = (f"The ClimbQ + HomoVar features pass Levene's homogeneity test (W ≤ F* at α = "
                 f"{levene.get('config', {}).get('alpha', 0.05)}); {layer} features, {gl}")
        w = _w_by_seed(pen, gamma, CLIMBQ_HV) if len(pen) else pd.Series(dtype=float)
        if w.empty or not np.all(w.to_numpy() > 0):
            out.append(cl.not_measured(cid, claim, SUPPLEMENT, "decrease", lower, f"needs {CLIMBQ_HV} models"))
            continue
        fstar = _w_by_seed(pen, gamma, CLIMBQ_HV, "F_star").loc[w.index]
        out.append(cl.log_ratio(cid, claim, SUPPLEMENT, "decrease", "below F*: the 95 % CI of W / F* lies below 1",
                                w.to_numpy(), fstar.to_numpy(), label="W / F*",
                                note=f"F* = {float(fstar.iloc[0]):.2f}"))
    return out


def check_expectations(metrics: dict[str, Any], levene: dict[str, Any] | None = None, *, bits: int = 4,
                       sigma_bound: float = 0.05, mild_gamma: float = 10, usually: float = 0.5,
                       levene_baselines: Sequence[str] = (CLIMBQ_CE, UNIFORM)) -> pd.DataFrame:
    """The claims table (:data:`CHECK_COLUMNS`) of :func:`climbq_claims` and, with ``levene``,
    :func:`levene_claims`: one row per claim with its verdict (held / not held / undecidable).

    Kept for callers of the earlier checks table; ``levene_baselines`` is accepted and ignored (the Levene claims
    compare each method with the one it changes: HomoVar with cross entropy, ClimbQ's quantizer with the
    uniform one)."""
    del levene_baselines
    claims = climbq_claims(metrics, bits=bits if bits in metrics.get("bits", []) else None,
                           sigma_bound=sigma_bound, mild_gamma=mild_gamma, usually=usually)
    if levene is not None:
        claims += levene_claims(levene)
    return cl.claims_table(claims)


def checks_summary(checks: pd.DataFrame | Sequence[dict[str, Any]]) -> str:
    """One sentence from a claims table or claim records: how many held, did not hold, were undecidable."""
    recs = checks.to_dict("records") if isinstance(checks, pd.DataFrame) else list(checks)
    ids = {v: [r["id"] for r in recs if r["verdict"] == v] for v in cl.VERDICTS}

    def part(v: str, words: str) -> str:
        return f"{len(ids[v])} {words}" + (f" ({', '.join(ids[v])})" if ids[v] else "")

    return (f"Of {len(recs)} claims, {part('held', 'held')}, {part('not held', 'did not hold')} and "
            f"{part('undecidable', 'were undecidable')}.")


# --------------------------------------------------------------------------------------------- what we found


def _verdict_of(records: Sequence[dict[str, Any]], cid: str) -> dict[str, Any] | None:
    return next((r for r in records if r["id"] == cid), None)


def _effect_text(r: dict[str, Any] | None, digits: int = 1) -> str:
    """``"+2.1 points [−0.5, +4.7], n = 5: undecidable"`` (or ``"×0.62 [0.51, 0.75], ..."`` for ratios)."""
    if r is None:
        return "not measured"
    if r["effect"] is None:
        return f"{r['verdict']} ({r['note'] or r['measured']})"
    if r["unit"] == "x":
        ci = "" if r["ci_low"] is None else f" [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
        return f"×{r['effect']:.2f}{ci}, n = {r['n']}: {r['verdict']}"
    ci = "" if r["ci_low"] is None else f" [{r['ci_low']:+.{digits}f}, {r['ci_high']:+.{digits}f}]"
    vac = " (vacuous: both at the same bound)" if r["note"].startswith("vacuous") else ""
    return f"{r['effect']:+.{digits}f} points{ci}, n = {r['n']}: {r['verdict']}{vac}"


def _homovar_w(metrics: dict[str, Any], bits: int) -> dict[float, float]:
    """Per gamma: HomoVar's per-batch Levene W (``homovar_W`` of the history), mean over epochs and seeds."""
    out: dict[float, list[float]] = {}
    for key, hist in (metrics.get("history") or {}).items():
        g, wa, method, _seed = key.split("/")
        if method == CLIMBQ_HV and wa == f"W{bits}A{bits}":
            vals = [e["homovar_W"] for e in hist if e.get("homovar_W") is not None and math.isfinite(e["homovar_W"])]
            out.setdefault(float(g), []).extend(vals)
    return {g: float(np.mean(v)) for g, v in out.items() if v}


def _family_tally(records: Sequence[dict[str, Any]], prefix: str, what: str) -> str:
    """``"HomoVar raising balanced accuracy held at 0 of 2 γ, the opposite was shown at 2"``."""
    rs = [r for r in records if r["id"].startswith(prefix + "-g")]
    held = sum(r["verdict"] == "held" for r in rs)
    opposite = sum(r["verdict"] == "not held" for r in rs)
    return (f"{what} held at {held} of {len(rs)} γ" + (f", the opposite was shown at {opposite}" if opposite else "")
            + (f", undecidable at {len(rs) - held - opposite}" if len(rs) - held - opposite else ""))


def climbq_findings(metrics: dict[str, Any]) -> str:
    """The climbq notebook's "What we found" paragraph (markdown), a pure function of its metrics: the verdicts,
    and the negative and surprising results stated plainly with their numbers and n."""
    recs = metrics.get("claims") or cl.as_records(climbq_claims(metrics))
    gammas = metrics["gammas"]
    n_seeds = len(metrics["seeds"])
    b = _bits_of(metrics, None)
    s = pd.DataFrame(metrics["summary"])
    labels = ", ".join(gamma_label(metrics, g) for g in gammas)
    parts = [f"**What we found** ({metrics['dataset']}-LT, {labels}; {n_seeds} seed(s) per method and γ, methods "
             f"paired by seed). {checks_summary(recs)}"]
    if n_seeds < 2:
        parts.append("With one seed no comparison can be decided: every paired claim is undecidable here.")

    def acc(g: float, m: str, col: str = "balanced_accuracy") -> float:
        bb = 32 if m == FP32 else b
        sel = s[(s["gamma"] == g) & (s["bits"] == bb) & (s["method"] == m)]
        return float(sel[f"{col}_mean"].iloc[0]) * 100 if len(sel) else math.nan

    parts.append("Balanced accuracy (mean over seeds) at " + "; ".join(
        f"{gamma_label(metrics, g)}: FP32 {acc(g, FP32):.1f} %, " + ", ".join(
            f"{m} {acc(g, m):.1f} %" for m in QUANT_METHODS) for g in gammas) + f" (W{b}A{b}).")
    hv = [(g, _verdict_of(recs, f"homovar-balanced-g{_gkey(g)}")) for g in gammas]
    parts.append("HomoVar against cross entropy (balanced accuracy, HomoVar − CE): " + "; ".join(
        f"{gamma_label(metrics, g)} {_effect_text(r)}" for g, r in hv) + ".")
    tails = [(g, _verdict_of(recs, f"homovar-tail-g{_gkey(g)}")) for g in gammas]
    parts.append(f"On the {metrics['config'].get('tail_classes', 3)} smallest classes: " + "; ".join(
        f"{gamma_label(metrics, g)} {_effect_text(r)}" for g, r in tails) + ".")
    q = [(g, _verdict_of(recs, f"climbq-quantizer-g{_gkey(g)}")) for g in gammas]
    parts.append("ClimbQ's quantizer against the uniform one, both with cross entropy: " + "; ".join(
        f"{gamma_label(metrics, g)} {_effect_text(r)}" for g, r in q) + ".")
    parts.append("In short: " + "; ".join(_family_tally(recs, prefix, what) for prefix, what in (
        ("homovar-balanced", "HomoVar raising balanced accuracy"), ("homovar-tail", "HomoVar raising tail accuracy"),
        ("climbq-quantizer", "ClimbQ's quantizer beating the uniform one"),
        ("climbq-vs-uniform", "ClimbQ + HomoVar beating the uniform quantizer"))) + ".")
    sc = _verdict_of(recs, "scaling-near-2")
    if sc is not None and sc["verdict"] == "held":
        parts.append("The class distribution scaling is practically inert: σ = 2 − p̃ stayed within 0.05 of 2 at "
                     "batch 128 (" + sc["measured"].split(": ", 1)[-1].split(";")[0] + "), so ClimbQ's quantizer "
                     "differs from the uniform one mainly by its Gaussian-CDF projection, not by a per-class scale.")
    grow = _verdict_of(recs, "gain-grows-with-imbalance")
    if grow is not None and grow["effect"] is not None:
        parts.append(f"Whether ClimbQ's gain over the uniform quantizer grows with the imbalance (the abstract's "
                     f"'especially on highly imbalanced data'): {_effect_text(grow)}.")
    bounds = [r for r in recs if r["id"].startswith("bounds-rarely-bind") and r["effect"] is None
              and r["n"] > 0]
    if bounds:
        parts.append("HomoVar's size bounds: " + "; ".join(f"{r['claim'].rsplit('; ', 1)[-1]}: {r['measured']} "
                                                          f"({r['verdict']})" for r in bounds) + ".")
    hw = _homovar_w(metrics, b)
    if hw:
        alpha = metrics.get("config", {}).get("alpha", 0.05)

        def fstar(g: float) -> str:
            c = _counts_of(metrics, g)
            return f"{f_critical(alpha, len(c) - 1, sum(c) - len(c)):.2f}" if c else "n/a"

        parts.append("HomoVar's own Levene W per training batch (mean over steps and seeds) was " + "; ".join(
            f"{gamma_label(metrics, g)}: {w:.2f} (F* = {fstar(g)})" for g, w in hw.items()) + ": its batch sums "
            "divided by dataset counts shrink the between-class term by about (B/N)², so the homogeneity criterion "
            "can look met in training while Levene's test of the same models' features rejects homogeneity "
            "(levene.ipynb; docs/climbq.md, 'Size bounds').")
    if 2 in metrics["bits"] and b != 2:
        best = {g: max(QUANT_METHODS, key=lambda m: _w2_balanced(s, g, m)) for g in gammas}
        parts.append("At W2A2 the best balanced accuracy (mean over seeds) was " + "; ".join(
            f"{gamma_label(metrics, g)}: {m} {_w2_balanced(s, g, m):.1f} %" for g, m in best.items()) + " (no claim is "
            "judged at W2A2).")
    parts.append(PAPER_NUMBERS_NOTE)
    return " ".join(parts)


def _w2_balanced(s: pd.DataFrame, gamma: float, method: str) -> float:
    """Mean balanced accuracy (%) of ``method`` at W2A2 and ``gamma`` in a summary frame (NaN: not run)."""
    sel = s[(s["gamma"] == gamma) & (s["bits"] == 2) & (s["method"] == method)]
    return float(sel["balanced_accuracy_mean"].iloc[0]) * 100 if len(sel) else -math.inf


def levene_findings(metrics: dict[str, Any]) -> str:
    """The Levene notebook's "What we found" paragraph (markdown), a pure function of its metrics."""
    recs = metrics.get("claims") or cl.as_records(levene_claims(metrics))
    n_seeds = len(metrics["seeds"])
    b = metrics.get("bits", 4)
    parts = [f"**What we found** ({metrics['dataset']}-LT, "
             + ", ".join(gamma_label(metrics, g) for g in metrics["gammas"])
             + f"; {n_seeds} seed(s) per model, W{b}A{b}, penultimate features of the balanced test set). "
             + checks_summary(recs)]
    s = pd.DataFrame(metrics["summary"])
    pen = s[s["layer"] == PENULTIMATE]
    fstar = float(pen["F_star"].iloc[0]) if len(pen) else math.nan
    parts.append(f"Levene's W (geometric mean over seeds; F* = {fstar:.2f}): " + "; ".join(
        f"{gamma_label(metrics, g)}: " + ", ".join(
            f"{m} {float(r['W_gmean']):.1f}" for m in metrics["methods"]
            for _, r in pen[(pen["gamma"] == g) & (pen["method"] == m)].iterrows())
        for g in metrics["gammas"]) + ". Every model's features are far from homogeneous (W ≫ F*)"
        * bool(len(pen) and float(pen["W_gmean"].min()) > 2 * fstar) + ".")
    q = [r for r in recs if r["id"].startswith("quantization-raises-W")]
    if q and any(r["effect"] is not None for r in q):
        lower = all(r["effect"] is not None and r["effect"] < 1 for r in q)
        parts.append("Quantization against FP32 (W(uniform) / W(FP32), paired by seed): " + "; ".join(
            f"{r['claim'].rsplit(', ', 1)[-1]} {_effect_text(r)}" for r in q) + "."
            + (" This is the opposite of the abstract's premise that quantizing imbalanced data makes the class "
               "distributions more heterogeneous: here 4-bit quantization made the classes' spreads *more* alike. "
               + _why_quantization_lowers_w(metrics) if lower else ""))
    for prefix, what in (("climbq-lowers-W", "ClimbQ's quantizer against the uniform one"),
                         ("homovar-lowers-W", "HomoVar against cross entropy"),
                         ("homovar-homogeneous", "ClimbQ + HomoVar's W against F*")):
        rs = [r for r in recs if r["id"].startswith(prefix)]
        if rs:
            parts.append(f"{what}: " + "; ".join(f"{r['claim'].rsplit(', ', 1)[-1]} {_effect_text(r)}"
                                                  for r in rs) + ".")
    bt = levene_bounds_table(metrics)
    if len(bt):
        hv = bt[bt["method"] == CLIMBQ_HV]
        parts.append("HomoVar's size bounds on training mini-batches, as HomoVar computes them (ClimbQ + HomoVar "
                     "models): " + "; ".join(
                         f"{row['γ (real ratio)']}: {row['out of bounds (%)']:.0f} % of (class, batch) pairs out of "
                         f"bounds, {row['feasible (%)']:.0f} % with a feasible budget C_k ≥ 0" for _, row in
                         hv.iterrows()) + ". With the statistics of the whole training set at once (W "
                     + ", ".join(f"{row['W (whole set)']:.1f}" for _, row in hv.iterrows())
                     + ") a class size meeting Levene's criterion exists for "
                     + ", ".join(f"{row['feasible, whole set (%)']:.0f} %" for _, row in hv.iterrows())
                     + " of the classes: HomoVar's batch sums divided by dataset counts shrink the between-class "
                     "term, so its bounds are far looser than Levene's test of the same features (docs/climbq.md, "
                     "'Size bounds'). \"Out of bounds\" is not \"infeasible\": an infeasible class whose bounds are "
                     "NaN counts as in bounds by the original's rule.")
    parts.append(PAPER_NUMBERS_NOTE)
    return " ".join(parts)


def _why_quantization_lowers_w(metrics: dict[str, Any]) -> str:
    """The per-class dispersion behind a lower W under quantization: head vs tail-3 mean dispersion (mean over
    seeds and gammas) of the FP32 and the uniform models."""
    pc = pd.DataFrame(metrics.get("per_class", []))
    if pc.empty or "mean_dispersion" not in pc:
        return ""
    k = int(pc["class"].max()) + 1
    tail = list(range(max(1, k - 3), k))

    def head_tail(method: str) -> tuple[float, float]:
        sel = pc[pc["method"] == method].groupby(["gamma", "class"])["mean_dispersion"].mean().unstack("class")
        return float(sel[0].mean()), float(sel[tail].mean(axis=1).mean())

    (fh, ft), (uh, ut) = head_tail(FP32), head_tail(UNIFORM)
    return (f"The per-class dispersion shows why: in FP32 the head class's features spread {fh / ft:.1f}× as much "
            f"as the 3 tail classes' (mean L1 dispersion {fh:.1f} vs {ft:.1f}, mean over seeds and γ); after uniform "
            f"quantization {uh / ut:.1f}× ({uh:.1f} vs {ut:.1f}). The 4-bit activation codes take at most 16 values "
            "in a fixed range, so the widest (most frequent) classes are compressed most and the narrow tail "
            "classes are pushed onto the same codes: the spreads Levene's W compares become more alike.")


# --------------------------------------------------------------------------------------------- stored models


def find_climbq_run(runs_root: str | Path | None = None, preset: str | None = None) -> Path | None:
    """The latest completed ClimbQ run (with stored models) under ``runs_root``; ``preset`` must match if given."""
    runs = completed_runs(NOTEBOOK, Path(runs_root) if runs_root else None)
    for run in reversed(runs):
        if not (run / MODELS_DIR).is_dir():
            continue
        params = read_json(run / "manifest.json").get("parameters", {})
        if preset is None or params.get("preset") == preset:
            return run
    return None


def load_model(entry: dict[str, Any], cfg: dict[str, Any], models_dir: str | Path,
               device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model of a stored ``entry`` (architecture, quantizers of its method) and load its state dict."""
    model = create_model(entry["model"], **entry["model_kwargs"])
    if entry["method"] != FP32:
        model = quantize_for_method(model, entry["method"], entry["bits"], cfg)
    path = Path(models_dir) / entry["file"]
    if not path.is_file():
        raise FileNotFoundError(f"stored model {path} is missing; rerun the climbq notebook")
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.to(resolve_device(device)).eval()


@dataclass
class ClimbQModels:
    """Stored ClimbQ models: ``metrics`` of the run that trained them, their ``entries`` and ``models_dir``.

    ``source`` is ``"run"`` (read from a completed climbq run, ``run_dir``) or ``"trained"`` (trained here).
    """

    metrics: dict[str, Any]
    models_dir: Path
    source: str
    run_dir: Path | None = None

    @property
    def entries(self) -> list[dict[str, Any]]:
        return self.metrics["models"]["entries"]

    def load(self, entry: dict[str, Any], device: str | torch.device = "cpu") -> nn.Module:
        return load_model(entry, self.metrics["config"], self.models_dir, device)


def climbq_models(preset: str, *, runs_root: str | Path | None = None, device: str = "auto", data_dir: str = "",
                  work_dir: str | Path | None = None, source_run: str = "", overrides: dict[str, Any] | None = None,
                  progress: bool | None = None) -> ClimbQModels:
    """The W4A4 and FP32 ClimbQ models: from ``source_run`` (a run dir), else the latest completed climbq run at
    ``preset`` under ``runs_root``, else trained now with the ClimbQ driver at ``preset`` (W{save_bits} only),
    saving them under ``work_dir/models``."""
    from .presets import resolve

    if source_run:
        run = Path(source_run)
        if not (run / "metrics.json").is_file() or not (run / MODELS_DIR).is_dir():
            raise FileNotFoundError(f"source_run={source_run!r} is not a completed climbq run with {MODELS_DIR}/")
    else:
        run = find_climbq_run(runs_root, preset)
    if run is not None:
        return ClimbQModels(read_json(run / "metrics.json"), run / MODELS_DIR, "run", run)
    if work_dir is None:
        raise ValueError(f"no completed climbq run at preset {preset!r} under {runs_root or 'runs/'} and no "
                         "work_dir to train the models into; run the climbq notebook first or pass work_dir")
    cfg = resolve(NOTEBOOK, preset, **(overrides or {}))
    cfg["bits"] = [cfg["save_bits"]]
    mdir = Path(work_dir) / MODELS_DIR
    metrics = run_climbq(cfg, device, data_dir, runs_root=runs_root, models_dir=mdir, progress=progress)
    return ClimbQModels(metrics, mdir, "trained", None)


# --------------------------------------------------------------------------------------------- Levene notebook


LEVENE_PRESETS: dict[str, dict[str, Any]] = {
    name: {"last_blocks": 3, "split": "full_test", "alpha": 0.05, "center": "mean", "mask_zeros": True,
           "dispersion_seeds": 1} for name in ("smoke", "default", "paper")
}
PENULTIMATE = "penultimate"
LEVENE_SPLITS = ("full_test", "test")


def validate_levene(cfg: dict[str, Any]) -> None:
    """The Levene notebook's range check, run by :func:`paperlib.presets.check_settings` before any work (the
    models' own settings are the climbq notebook's, checked by :func:`validate_climbq`)."""
    if not _is_int(cfg["last_blocks"]) or cfg["last_blocks"] < 1:
        raise ValueError(f"last_blocks={cfg['last_blocks']!r} must be an int >= 1 (1: the penultimate features only)")
    if cfg["split"] not in LEVENE_SPLITS:
        raise ValueError(f"split={cfg['split']!r}: use 'full_test' (the whole balanced test split) or 'test' "
                         "(the half not used for model selection)")
    if not _is_number(cfg["alpha"]) or not 0 < cfg["alpha"] < 1:
        raise ValueError(f"alpha={cfg['alpha']!r} must be in (0, 1)")
    if cfg["center"] not in ("mean", "median", "trimmed"):
        raise ValueError(f"center={cfg['center']!r}: use 'mean' (Levene, ClimbQ), 'median' or 'trimmed'")
    if not isinstance(cfg["mask_zeros"], bool):
        raise ValueError(f"mask_zeros={cfg['mask_zeros']!r} must be True (ClimbQ) or False")
    if not _is_int(cfg["dispersion_seeds"]) or cfg["dispersion_seeds"] < 0:
        raise ValueError(f"dispersion_seeds={cfg['dispersion_seeds']!r} must be an int >= 0")


register_presets(LEVENE_NOTEBOOK, LEVENE_PRESETS, validate=validate_levene)


def block_layers(model: nn.Module, last_blocks: int) -> list[str]:
    """Names of the last ``last_blocks`` residual blocks' outputs (the last one is the penultimate feature map)."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or last_blocks < 1:
        return [PENULTIMATE]
    n = len(blocks)
    names = [f"blocks.{i}" for i in range(max(0, n - last_blocks), n - 1)]
    return names + [PENULTIMATE]


def _features(model: nn.Module, data: InMemoryData, layer: str) -> tuple[Tensor, Tensor]:
    batches = TensorLoader(data, 512)
    return capture_features(model, batches, None if layer == PENULTIMATE else layer)


@torch.no_grad()
def _layer_features(model: nn.Module, data: InMemoryData, layers: Sequence[str]) -> dict[str, tuple[Tensor, Tensor]]:
    """:func:`_features` of every layer in ``layers`` from one forward pass per batch (hooks on the block
    outputs, global-average-pooled as :func:`paperlib.levene.capture_features` pools them; the same values)."""
    store: dict[str, list[Tensor]] = {name: [] for name in layers if name != PENULTIMATE}

    def hook(name: str):  # noqa: ANN202
        def keep(_module: nn.Module, _inputs: object, output: Tensor) -> None:
            out = output[0] if isinstance(output, tuple | list) else output
            store[name].append((out.mean(dim=tuple(range(2, out.ndim))) if out.ndim > 2 else out).float().cpu())
        return keep

    handles = [model.get_submodule(name).register_forward_hook(hook(name)) for name in store]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pen, labels = [], []
    try:
        for x, y in TensorLoader(data, 512):
            pen.append(model.forward_features(x.to(device)).float().cpu())
            labels.append(y.reshape(-1).cpu().long())
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    y_all = torch.cat(labels)
    out = {name: (torch.cat(v), y_all) for name, v in store.items()}
    out[PENULTIMATE] = (torch.cat(pen), y_all)
    return out


def homovar_batch_bounds(features: Tensor, labels: Tensor, counts: Sequence[int], batch_size: int,
                         alpha: float = 0.05, mask_zeros: bool = True, seed: int = 0) -> dict[str, Any]:
    """ClimbQ's size bounds as HomoVar computes them during training, on mini-batches of ``features``.

    The rows are shuffled with ``seed`` and cut into batches of ``batch_size`` (the last one may be smaller, as
    in training); per batch, exactly HomoVar's statistics (:func:`dispersion` with the batch-sum/dataset-count
    mean, :func:`homogeneity_bounds` with the dataset ``counts``; docs/climbq.md 'Size bounds'). Returns per
    class: the NaN-aware median over batches of ``n_lb``/``n_ub``; ``out_fraction``, the share of batches in
    which n_k is out of bounds by the original's rule (a NaN bound counts as in bounds, an inverted interval
    ``n_lb > n_ub`` as out); ``feasible_fraction``, the share of batches with a budget ``C_k >= 0`` (some class
    size meets Levene's criterion); ``nan_fraction``, the share with NaN bounds (infeasible, yet in bounds by
    the original's rule). ``per_batch`` holds the [batches, K] arrays. The mean of ``out_fraction`` over classes
    is the mean share of classes out per step, the statistic HomoVar's training log reports.
    """
    order = torch.as_tensor(np.random.default_rng(seed).permutation(features.shape[0]), device=features.device)
    lbs, ubs, outs, cs = [], [], [], []
    for start in range(0, features.shape[0], batch_size):  # a loop over batches, as training does
        idx = order[start:start + batch_size]
        z = dispersion(features[idx], labels[idx], "mean", "l1", mask_zeros, counts=counts)
        hb = homogeneity_bounds(z, labels[idx], counts, alpha)
        lbs.append(hb.n_lb.cpu().numpy())
        ubs.append(hb.n_ub.cpu().numpy())
        outs.append(hb.out_of_bounds.cpu().numpy())
        cs.append(hb.C.cpu().numpy())
    lb, ub, out, c = np.stack(lbs), np.stack(ubs), np.stack(outs), np.stack(cs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column gives a NaN median
        med_lb, med_ub = np.nanmedian(lb, axis=0), np.nanmedian(ub, axis=0)
    return {"n_lb": med_lb, "n_ub": med_ub, "out_fraction": out.mean(axis=0),
            "feasible_fraction": (c >= 0).mean(axis=0), "nan_fraction": np.isnan(lb).mean(axis=0),
            "per_batch": {"n_lb": lb, "n_ub": ub, "out_of_bounds": out, "C": c}}


def run_levene(cfg: dict[str, Any], source: ClimbQModels, device: str = "auto", data_dir: str = "") -> dict[str, Any]:
    """Levene's test on the stored models' features; returns the JSON-native metrics dict.

    Per (gamma, method, seed) and layer (the last blocks' outputs, global-average-pooled; ``penultimate`` is the
    FC's input): Levene's W, p and F* on the balanced test split (``split="full_test"``, or ``"test"``: the
    half not used for model selection) with ``levene_features(center, mask_zeros)``. Per class on the
    penultimate features: the model's test accuracy; test-set mean/variance of the dispersion z; ClimbQ's size
    bounds as HomoVar computes them on training mini-batches (:func:`homovar_batch_bounds`: median bounds, the
    share of batches out of bounds, feasible, with NaN bounds); and, on the whole training set at once (not what
    HomoVar computes), the budget ``full_C`` and whether the original's rule calls the class out of bounds
    there. The summary gives W's geometric mean and log-scale 95 % interval over seeds
    (:func:`paperlib.claims.log_interval`); ``claims`` holds :func:`levene_claims`. The dispersions of
    ``dispersion_seeds`` seeds are kept for the per-class dispersion figure.
    """
    validate_levene(cfg)
    dev = resolve_device(device)
    with _threads(source.metrics["config"], dev):
        return _run_levene(cfg, source, dev, data_dir)


@torch.no_grad()
def _per_class_accuracy(model: nn.Module, feats: Tensor, labels: Tensor, num_classes: int) -> list[float]:
    """Per-class top-1 of ``model`` from its penultimate ``feats`` (``fc(forward_features(x))`` is the model's
    forward, so this is its test accuracy without a second pass); NaN for a class with no sample."""
    param = next(model.fc.parameters())
    pred = model.fc(feats.to(device=param.device, dtype=param.dtype)).argmax(1).cpu()
    hit = torch.zeros(num_classes).index_add_(0, labels, (pred == labels).float())
    n = torch.bincount(labels, minlength=num_classes).float()
    return [float(v) for v in hit / n]


def _log_summary(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per group: W's mean/CI half-width (kept for older readers), geometric mean and log-scale 95 % interval."""
    rows = []
    for key, grp in df.groupby(keys, sort=False):
        w = grp["W"].to_numpy(float)
        mean, lo, hi, n = cl.mean_interval(w)
        ok = bool(np.all(w > 0))
        g, glo, ghi, _ = cl.log_interval(w) if ok else (math.nan, math.nan, math.nan, n)
        p_mean = float(grp["p"].mean())
        rows.append({**dict(zip(keys, key, strict=True)), "W_mean": mean,
                     "W_ci": (hi - mean) if n >= 2 else math.nan, "W_gmean": g, "W_lo": glo, "W_hi": ghi,
                     "p_mean": p_mean, "n": n, "homogeneous_fraction": float(grp["homogeneous"].mean()),
                     "F_star": float(grp["F_star"].iloc[0]), "p_max": float(grp["p"].max())})
    return pd.DataFrame(rows)


def _run_levene(cfg: dict[str, Any], source: ClimbQModels, dev: torch.device, data_dir: str) -> dict[str, Any]:
    ccfg = source.metrics["config"]
    train, test, order = load_base_data(ccfg, dev, data_dir)
    if train.fingerprint() != source.metrics["data_fingerprint"]:
        raise DataError("the data differ from those the ClimbQ models were trained on (fingerprint mismatch); "
                        "pass the same data_dir or retrain the climbq notebook")
    splits = {}
    for gamma in source.metrics["gammas"]:
        splits[_gkey(gamma)] = make_long_tail_splits(
            train, test, gamma, mode=ccfg["lt_mode"], min_count=ccfg["lt_min_count"], selection=ccfg["selection"],
            val_fraction=ccfg["val_fraction"], split_seed=ccfg["split_seed"], class_order=order)
    tests, per_class, disp = [], [], []
    disp_seeds = list(source.metrics["seeds"])[: cfg["dispersion_seeds"]]
    for entry in source.entries:
        sp = splits[_gkey(entry["gamma"])]
        data = sp.full_test if cfg["split"] == "full_test" else sp.test
        model = source.load(entry, dev)
        base = {"gamma": entry["gamma"], "method": entry["method"], "seed": entry["seed"], "bits": entry["bits"]}
        layers = block_layers(model, cfg["last_blocks"])
        by_layer = _layer_features(model, data, layers)
        for layer in layers:
            f, y = by_layer[layer]
            res = levene_features(f, y, cfg["alpha"], center=cfg["center"], mask_zeros=cfg["mask_zeros"])
            tests.append({**base, "layer": layer, "W": res.W, "p": res.p, "F_star": res.F_star,
                          "homogeneous": res.homogeneous, "n": res.num_samples, "dims": int(f.shape[1])})
            if layer != PENULTIMATE:
                continue
            acc = _per_class_accuracy(model, f, y, len(sp.counts))
            ftr, ytr = _features(model, sp.train, PENULTIMATE)
            batch = homovar_batch_bounds(ftr, ytr, sp.counts, ccfg["batch_size"], cfg["alpha"], cfg["mask_zeros"])
            z_tr = dispersion(ftr, ytr, "mean", "l1", cfg["mask_zeros"], counts=sp.counts)
            full = homogeneity_bounds(z_tr, ytr, sp.counts, cfg["alpha"])
            fr = res.frame.set_index("class")
            for k in range(len(sp.counts)):
                per_class.append({**base, "class": k, "n_train": sp.counts[k], "accuracy": float(acc[k]),
                                  "mean_dispersion": float(fr.loc[k, "mean_dispersion"]),
                                  "var_dispersion": float(fr.loc[k, "var_dispersion"]),
                                  "n_lb": float(batch["n_lb"][k]), "n_ub": float(batch["n_ub"][k]),
                                  "out_fraction": float(batch["out_fraction"][k]),
                                  "feasible_fraction": float(batch["feasible_fraction"][k]),
                                  "nan_fraction": float(batch["nan_fraction"][k]),
                                  "out_of_bounds": bool(batch["out_fraction"][k] > 0.5),
                                  "full_C": float(full.C[k]), "full_feasible": bool(full.C[k] >= 0),
                                  "full_out": bool(full.out_of_bounds[k]), "full_W": float(full.W)})
            if entry["seed"] in disp_seeds:
                disp.append({**base, "labels": [int(v) for v in res.labels],
                             "z": [float(f"{v:.5g}") for v in res.z]})
    df = pd.DataFrame(tests)
    summary = _log_summary(df, ["gamma", "method", "layer"])
    gmax = max(source.metrics["gammas"])
    sel = summary[(summary["gamma"] == gmax) & (summary["method"] == CLIMBQ_HV) & (summary["layer"] == PENULTIMATE)]
    metrics = {
        "dataset": ccfg["dataset"],
        "device": str(dev),
        "data_fingerprint": train.fingerprint(),
        "seeds": list(source.metrics["seeds"]),
        "gammas": list(source.metrics["gammas"]),
        "methods": [m for m in METHODS if any(e["method"] == m for e in source.entries)],
        "bits": ccfg["save_bits"],
        "config": cfg,
        "climbq_config": ccfg,
        "source": {"kind": source.source, "run": None if source.run_dir is None else source.run_dir.name,
                   "preset": ccfg.get("preset")},
        "class_counts": {g: sp.counts for g, sp in splits.items()},
        "real_ratios": {g: real_ratio(sp.counts) for g, sp in splits.items()},
        "tests": df.to_dict("records"),
        "summary": summary.to_dict("records"),
        "per_class": per_class,
        "dispersion": disp,
        "paper_numbers": None,
        "key_metric": {"name": f"Levene W (geometric mean over seeds), {CLIMBQ_HV} W{ccfg['save_bits']}"
                               f"A{ccfg['save_bits']} penultimate",
                       "value": float(sel["W_gmean"].iloc[0]) if len(sel) else None},
    }
    metrics["key_metric"]["name"] += f" ({gamma_label(metrics, gmax)})"
    metrics["claims"] = cl.as_records(levene_claims(metrics))
    return metrics


def levene_table(metrics: dict[str, Any], layer: str = PENULTIMATE) -> pd.DataFrame:
    """Levene W per gamma (with its real ratio) and method at ``layer``: geometric mean over seeds with its
    log-scale 95 % interval (W is positive and skewed: an arithmetic t-interval can cross 0), the largest p, F*,
    the share of seeds that pass (W <= F*) and n."""
    s = pd.DataFrame(metrics["summary"])
    s = s[s["layer"] == layer]

    def w_text(r: pd.Series) -> str:
        if "W_gmean" not in r or r["W_gmean"] is None or (isinstance(r["W_gmean"], float) and math.isnan(r["W_gmean"])):
            return f"{r['W_mean']:.2f}"
        if r["n"] < 2 or r["W_lo"] is None or math.isnan(float(r["W_lo"])):
            return f"{r['W_gmean']:.2f}"
        return f"{r['W_gmean']:.2f} [{r['W_lo']:.2f}, {r['W_hi']:.2f}]"

    return pd.DataFrame({
        "γ (real ratio)": [gamma_label(metrics, g).removeprefix("γ=") for g in s["gamma"]],
        "method": s["method"].to_numpy(),
        "Levene W (geo. mean [95 % CI])": [w_text(r) for _, r in s.iterrows()],
        "p (largest over seeds)": s["p_max"].map(lambda v: f"{v:.2g}").to_numpy(),
        "F* (alpha)": s["F_star"].map(lambda v: f"{v:.2f}").to_numpy(),
        "homogeneous (share of seeds)": s["homogeneous_fraction"].map(lambda v: f"{v:.0%}").to_numpy(),
        "n (seeds)": s["n"].to_numpy(),
    }).reset_index(drop=True)


def levene_bounds_table(metrics: dict[str, Any]) -> pd.DataFrame:
    """Per (gamma, method): HomoVar's size bounds on training mini-batches and on the whole training set.

    ``out of bounds (%)``: the share of (class, batch) pairs with n_k out of [n_lb, n_ub] by the original's rule,
    i.e. the mean share of classes out per step, the statistic of the climbq notebook's HomoVar figure (there
    on training-mode features during fine-tuning, here on the final model's features);
    ``feasible (%)``: the share of (class, batch) pairs whose budget C_k >= 0 (some class size meets Levene's
    criterion); ``NaN bounds (%)``: infeasible pairs the original's rule counts as in bounds; ``classes out in
    most batches (%)``; and, with the statistics of the whole training set at once (HomoVar never computes
    these): ``W (whole set)``, ``feasible, whole set (%)`` and ``out, whole set (%)``. Mean over classes and
    seeds; ``n (seeds)``."""
    pc = pd.DataFrame(metrics.get("per_class", []))
    if pc.empty:
        return pd.DataFrame()
    for col in ("feasible_fraction", "nan_fraction", "full_out", "full_W"):
        if col not in pc:
            pc[col] = math.nan
    rows = []
    for (g, m), grp in pc.groupby(["gamma", "method"], sort=False):
        rows.append({"γ (real ratio)": gamma_label(metrics, g).removeprefix("γ="), "method": m,
                     "out of bounds (%)": 100 * float(grp["out_fraction"].mean()),
                     "feasible (%)": 100 * float(grp["feasible_fraction"].mean()),
                     "NaN bounds (%)": 100 * float(grp["nan_fraction"].mean()),
                     "classes out in most batches (%)": 100 * float(grp["out_of_bounds"].mean()),
                     "W (whole set)": float(grp.groupby("seed")["full_W"].first().mean()),
                     "feasible, whole set (%)": 100 * float(grp["full_feasible"].mean()),
                     "out, whole set (%)": 100 * float(grp["full_out"].astype(float).mean()),
                     "n (seeds)": int(grp["seed"].nunique())})
    return pd.DataFrame(rows)


def levene_layer_table(metrics: dict[str, Any]) -> pd.DataFrame:
    """Levene W per layer (rows) and (gamma with its real ratio, method) (columns): the geometric mean over seeds
    (the arithmetic mean for runs recorded without it)."""
    s = pd.DataFrame(metrics["summary"])
    s["gamma"] = [gamma_label(metrics, g).removeprefix("γ=") for g in s["gamma"]]
    col = "W_gmean" if "W_gmean" in s else "W_mean"
    return s.pivot_table(index="layer", columns=["gamma", "method"], values=col, sort=False).round(2)


def write_model_index(models_dir: Path, metrics: dict[str, Any]) -> Path:
    """``models/index.json``: the stored models and the config to rebuild them (also in metrics.json)."""
    return write_json(Path(models_dir) / "index.json", {"config": metrics["config"],
                                                          "entries": metrics["models"]["entries"]})
