"""The ClimbQ and Levene notebooks' experiments: long-tailed data, four methods, seeds, stored models.

ClimbQ notebook (issue 4), per imbalance ratio gamma and seed: an FP32 ResNet-20 (ClimbQ's topology: option-B
shortcut, activation quantizer before the ReLU) is trained with cross entropy on the long-tailed data
(:func:`paperlib.pretrain.pretrained_fp32`, cached), then fine-tuned at W{b}A{b} three ways:

- ``uniform+CE``: DoReFa weights and a uniform activation quantizer in the same slots (the ablation: see
  :class:`SymmetricUniformActivation`), cross entropy;
- ``ClimbQ+CE``: ClimbQ's Gaussian-CDF weight/activation quantizers with the class distribution scaling
  (``set_sigma(model, batch_sigma(y, K))`` before every training forward, :class:`SigmaScaling`), cross entropy;
- ``ClimbQ+HomoVar``: the same quantizers, loss :class:`paperlib.climbq.HomoVarLoss` with the dataset counts
  (it *replaces* cross entropy, spec §5.6), diagnostics logged per epoch (:class:`HomoVarCriterion`).

The first conv is quantized and the last layer (``fc``) stays FP32, as in the original. The fine-tuned model is
the epoch with the best top-1 on a held-out validation split (half of the balanced test split by default;
``selection="best_test"`` is the original's max over epochs of test top-1, ``"last"`` the last epoch). The
W4A4 models (and the FP32 starting points) are stored as state dicts in the run directory so the Levene notebook
can analyse them (:func:`climbq_models`). The Levene notebook's driver is :func:`run_levene`.
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

from .climbq import ClimbQActivation, ClimbQWeight, HomoVarLoss, batch_sigma, set_sigma
from .data.errors import DataError
from .data.long_tail import CIFAR10_LT_ORDER, SYNDIGITS_LT_ORDER, long_tail_subset
from .data.tensors import InMemoryData, TensorLoader
from .levene import capture_features, dispersion, homogeneity_bounds, levene_features
from .models import create_model
from .presets import register_presets
from .pretrain import pretrained_fp32
from .quant import ClippedActivation, DoReFaWeight, quantize_model
from .quant.core import first_last_layers
from .quant.uniform import uniform_quantize
from .runs import completed_runs, read_json, runs_root_of, write_json
from .stats import format_mean_ci, summarize
from .train import Callback, TrainConfig, evaluate, fit, resolve_device

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
PAPER_NUMBERS_NOTE = ("The paper's tables could not be found (spec climbq.md §0, §4): no number from the paper is "
                      "shown or compared here.")

__all__ = [
    "CLIMBQ_CE", "CLIMBQ_HV", "DATASET_DEFAULTS", "FP32", "METHODS", "UNIFORM", "ClimbQModels", "HomoVarCriterion",
    "LongTailSplits", "SelectBest", "SigmaScaling", "SymmetricUniformActivation", "climbq_models", "find_climbq_run",
    "homovar_batch_bounds",
    "load_base_data", "load_model", "make_long_tail_splits", "quantize_for_method", "run_climbq", "run_levene",
    "runs_root_of", "summary_table", "levene_table", "check_expectations", "checks_summary", "sigma_deviation",
    "SPEC_SANITY_RUN", "with_dataset_defaults",
]

_COMMON = {"weight_decay": 1e-4, "momentum": 0.9, "sigma_mode": "batch_freq",
           "eval_sigma": 2.0, "act_range": 2.0, "uniform_act": "symmetric", "act_clip": 2.0, "alpha": 0.05,
           "beta": 0.999, "homovar_base": "bce", "homovar_counts": "dataset", "lt_mode": "recursive",
           "lt_min_count": 1, "selection": "val", "val_fraction": 0.5, "split_seed": 0, "tail_classes": 3,
           "save_bits": 4, "sigma_check_batch": 128, "sigma_check_epochs": 10}
register_presets(NOTEBOOK, {
    # digits-LT has 336-550 training images: batch 32 gives 11-17 steps per epoch (batch 128 gave 3-5, too few
    # for the BN running statistics to follow the quantizers in a short fine-tune).
    "smoke": {**_COMMON, "dataset": "digits", "model": "resnet20", "image_size": 8, "gammas": [10, 100],
              "bits": [4, 2], "seeds": [0], "batch_size": 32, "fp_epochs": 4, "fp_lr": 0.1, "fp_scheduler": "cosine",
              "qat_epochs": 1, "qat_lr": 0.02, "qat_scheduler": "none", "milestones": [], "augment": False,
              "threads": 1},
    "default": {**_COMMON, "dataset": "digits", "model": "resnet20", "image_size": 8, "gammas": [10, 50, 100],
                "bits": [4, 2], "seeds": [0, 1, 2], "batch_size": 32, "fp_epochs": 10, "fp_lr": 0.1,
                "fp_scheduler": "cosine", "qat_epochs": 3, "qat_lr": 0.02, "qat_scheduler": "none",
                "milestones": [], "augment": False, "threads": 1},
    # spec §1.5: SGD 0.04, momentum 0.9, wd 1e-4 on all params, MultiStepLR [80, 150] x0.1, 200 epochs, batch 128,
    # crop + flip; FP32 pretraining on the same long-tailed data with the same optimizer (its schedule is not in
    # the original: open question 6). CIFAR-10-LT gammas from the shipped CSVs; override dataset/model for
    # CIFAR-100-LT (resnet56) or SynDigits (data_dir with train/<digit>/, test/<digit>/).
    # image_size/augment None: the original's for the dataset (DATASET_DEFAULTS: CIFAR 32 px with crop + flip,
    # SynDigits 28 px without augmentation), so that overriding only ``dataset`` gives the original's input.
    "paper": {**_COMMON, "dataset": "cifar10", "model": "resnet20", "image_size": None, "gammas": [10, 50, 200],
              "bits": [4, 2], "seeds": [0, 1, 2], "batch_size": 128, "fp_epochs": 200, "fp_lr": 0.04,
              "fp_scheduler": "multistep",
              "qat_epochs": 200, "qat_lr": 0.04, "qat_scheduler": "multistep", "milestones": [80, 150],
              "augment": None, "threads": 0},
})

#: The original's input size and training augmentation per dataset (spec §1.5 "aug" row): CIFAR RandomCrop(32,
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


# --------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class LongTailSplits:
    """One gamma's data, every split labelled by *rank* (0 = head, K-1 = the smallest class).

    ``train``: the long-tailed training subset (spec §3 generator); ``full_test``: the whole balanced test split;
    ``val``/``test``: its stratified halves when ``selection="val"`` (else ``val`` is None and ``test`` is
    ``full_test``). ``order[r]`` is the original class id of rank r, ``counts[r]`` its training count.
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


class SigmaScaling(Callback):
    """ClimbQ's class distribution scaling (§1.2): per-sample sigma from the batch labels before each forward.

    Records the largest ``|sigma - 2|`` seen (spec §6 (b): below 0.05 for B = 128), and with ``batch_size``
    also the largest over full batches only (``max_deviation_full``; an epoch's last, partial batch excluded).
    """

    def __init__(self, num_classes: int, mode: str = "batch_freq", counts: Sequence[int] | None = None,
                 batch_size: int | None = None) -> None:
        self.num_classes, self.mode, self.counts, self.batch_size = num_classes, mode, counts, batch_size
        self._max_dev: Tensor | None = None
        self._max_dev_full: Tensor | None = None

    def before_batch(self, model: nn.Module, x: Tensor, y: Tensor) -> None:
        s = batch_sigma(y, self.num_classes, self.mode, counts=self.counts)
        set_sigma(model, s)
        dev = (s - 2).abs().max()
        self._max_dev = dev if self._max_dev is None else torch.maximum(self._max_dev, dev)
        if self.batch_size is not None and y.numel() == self.batch_size:
            self._max_dev_full = dev if self._max_dev_full is None else torch.maximum(self._max_dev_full, dev)

    @property
    def max_deviation(self) -> float:
        return float("nan") if self._max_dev is None else float(self._max_dev)

    @property
    def max_deviation_full(self) -> float:
        """The largest ``|sigma - 2|`` over batches of exactly ``batch_size`` samples (NaN: none seen)."""
        return float("nan") if self._max_dev_full is None else float(self._max_dev_full)


def sigma_deviation(labels: Sequence[int] | np.ndarray | Tensor, num_classes: int, batch_size: int = 128,
                    epochs: int = 10, seed: int = 0, mode: str = "batch_freq",
                    counts: Sequence[int] | None = None) -> dict[str, Any]:
    """The class distribution scaling's largest ``|sigma - 2|`` on ``labels`` at ``batch_size`` (spec §6 (b)).

    sigma depends on the batch labels only, so the spec's "B = 128" statement can be checked on any label set
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


class HomoVarCriterion(Callback):
    """Criterion and callback: ``HomoVarLoss(counts)(fc(f), y, f)`` with ``f = forward_features(x)`` computed once.

    Per epoch it adds ``homovar_fraction_out`` (mean over steps of the fraction of classes out of bounds),
    ``homovar_steps_all_in`` (the share of steps with no class out of bounds) and ``homovar_W`` to the history;
    ``last_epoch`` holds the per-class means (NaN-aware) over the last epoch's
    steps of n_lb, n_ub, beta and the class weights. Sums stay on the device until the epoch ends.
    """

    def __init__(self, counts: Sequence[int] | str, alpha: float = 0.05, beta: float = 0.999,
                 base: str = "bce") -> None:
        self.loss = HomoVarLoss(counts, alpha, beta, base=base)
        self.last_epoch: dict[str, list[float]] = {}
        self._reset()

    def _reset(self) -> None:
        self._steps = 0
        self._sums: dict[str, Tensor] = {}
        self._counts: dict[str, Tensor] = {}

    def _add(self, key: str, v: Tensor) -> None:
        v = v.detach().double()
        ok = ~torch.isnan(v)
        s, n = torch.where(ok, v, torch.zeros_like(v)), ok.double()
        if key in self._sums:
            self._sums[key] += s
            self._counts[key] += n
        else:
            self._sums[key], self._counts[key] = s, n

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        feats = model.forward_features(x)
        loss = self.loss(model.fc(feats), y, feats)
        step = self.loss.last
        for key, v in (("fraction_out", step.fraction_out), ("all_in", (step.fraction_out == 0).double()),
                       ("W", step.W), ("n_lb", step.n_lb), ("n_ub", step.n_ub), ("beta", step.beta),
                       ("weights", step.weights)):
            self._add(key, v)
        self._steps += 1
        return loss

    def on_epoch_end(self, epoch: int, stats: dict[str, Any]) -> None:
        mean = {k: (self._sums[k] / self._counts[k]).cpu() for k in self._sums}  # 0/0 -> NaN: never defined
        stats["homovar_fraction_out"] = float(mean["fraction_out"])
        stats["homovar_steps_all_in"] = float(mean["all_in"])
        stats["homovar_W"] = float(mean["W"])
        self.last_epoch = {k: [float(v) for v in mean[k].reshape(-1)] for k in ("n_lb", "n_ub", "beta", "weights")}
        self.last_epoch["fraction_out"] = [float(mean["fraction_out"])]
        self._reset()


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


def check_config(cfg: dict[str, Any]) -> None:
    """Clear errors for settings the driver cannot use."""
    bad = [b for b in cfg["bits"] if not isinstance(b, int) or not 2 <= b <= 8]
    if bad:
        raise ValueError(f"bits={cfg['bits']}: every bit-width must be an int in 2..8 (ClimbQ rejects 1, §5.5)")
    if not cfg["seeds"] or not cfg["gammas"]:
        raise ValueError("seeds and gammas must be non-empty lists")
    if any(not g >= 1 for g in cfg["gammas"]):
        raise ValueError(f"gammas={cfg['gammas']}: the imbalance ratio must be >= 1")
    if cfg["selection"] not in SELECTIONS:
        raise ValueError(f"selection={cfg['selection']!r}: use one of {SELECTIONS}")
    if cfg["homovar_counts"] not in ("dataset", "batch"):
        raise ValueError(f"homovar_counts={cfg['homovar_counts']!r}: use 'dataset' (the original) or 'batch'")
    for key in ("fp_epochs", "qat_epochs"):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{key}={v!r}: epochs must be an int >= 0 (fp_epochs=0: fine-tune from the random "
                             "initialisation; qat_epochs=0: quantize without fine-tuning; None in the notebook: the "
                             "preset's)")
    if cfg["fp_epochs"] == 0 and cfg["qat_epochs"] == 0:
        raise ValueError("fp_epochs=0 and qat_epochs=0: every model would stay at its random initialisation; "
                         "train at least one stage (fp_epochs >= 1 or qat_epochs >= 1)")


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
        split_info[g] = {"counts": splits.counts, "order": splits.order, "classes": splits.classes,
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
    """The notebook's table: gamma, W/A bits, method; overall, balanced and tail accuracy (%) mean ± 95 % CI."""
    s = pd.DataFrame(metrics["summary"])
    tail = metrics["config"]["tail_classes"]

    def fmt(col: str) -> list[str]:
        return [format_mean_ci(m, c) for m, c in zip(s[f"{col}_mean"], s[f"{col}_ci"], strict=True)]

    return pd.DataFrame({
        "gamma": s["gamma"].map(_gkey),
        "W/A": ["FP32" if b == 32 else f"W{b}A{b}" for b in s["bits"]],
        "method": s["method"],
        "top-1 (%)": fmt("top1"),
        "balanced acc. (%)": fmt("balanced_accuracy"),
        f"tail-{tail} acc. (%)": fmt("tail_accuracy"),
        "seeds": s["n"],
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


# --------------------------------------------------------------------------------------------- spec §6 checks

# Spec climbq.md §6: the spec author's own sanity run (10-class synthetic Gaussian data, 3-layer BN-MLP, W4A4,
# gamma = 50, 8 seeds). NOT from the paper, whose tables could not be found (§0): shown only as a reference.
SPEC_SANITY_RUN = {
    "setting": "spec §6 sanity run (synthetic Gaussian data, BN-MLP, W4A4, γ=50, 8 seeds; not the paper)",
    "accuracy": {FP32: 82.2, UNIFORM: 81.6, CLIMBQ_CE: 81.1, CLIMBQ_HV: 84.2},
    "tail_accuracy": {FP32: 63.4, UNIFORM: 61.1, CLIMBQ_CE: 59.7, CLIMBQ_HV: 69.2},
    "levene_W": {FP32: 21.0, UNIFORM: 14.3, CLIMBQ_CE: 13.5, CLIMBQ_HV: 11.3},
    "out_of_bounds": {50: 0.08, 200: 0.46},
}
CHECK_COLUMNS = ["claim", "expected", "measured", "held", "reference"]


def _paired(df: pd.DataFrame, a: str, b: str, col: str) -> np.ndarray:
    """``a - b`` in ``col`` per seed (rows of ``df`` are one method and seed each), seeds present in both."""
    pa = df[df["method"] == a].set_index("seed")[col]
    pb = df[df["method"] == b].set_index("seed")[col]
    return (pa - pb).dropna().to_numpy(dtype=float)


def _paired_text(d: np.ndarray, scale: float, unit: str, direction: str, digits: int = 1) -> str:
    from .stats import mean_ci

    mean, half = mean_ci(d)
    wins = int((d > 0).sum()) if direction == "higher" else int((d < 0).sum())
    ci = "" if math.isnan(half) else (f" (95 % CI {scale * (mean - half):+.{digits}f} to "
                                      f"{scale * (mean + half):+.{digits}f})")
    return f"Δ = {scale * mean:+.{digits}f}{unit}{ci}, {direction} in {wins} of {d.size} seeds"


def _moves(d: np.ndarray, direction: str) -> bool | None:
    """The paired rule: the mean difference has the expected sign and more than half of the seeds agree."""
    if d.size == 0:
        return None
    sign = 1 if direction == "higher" else -1
    return bool(sign * d.mean() > 0 and int((sign * d > 0).sum()) > d.size / 2)


def _row(claim: str, expected: str, measured: str, held: bool | None, reference: str = "") -> dict[str, Any]:
    return {"claim": claim, "expected": expected, "measured": measured, "held": held, "reference": reference}


def _check_sigma(metrics: dict[str, Any], bound: float) -> dict[str, Any]:
    claim = "(b) σ = 2 − p̃ stays near 2 in every training batch"
    ref = "spec §1.2: ≈1.987 (head) to ≈1.999 (tail) on CIFAR-10-LT γ=10, B=128; §6: assert max|σ−2| < 0.05"
    cfg = metrics.get("config", {})
    mode = cfg.get("sigma_mode", "batch_freq")
    train_b = cfg.get("batch_size")
    train_txt = ""
    if metrics.get("sigma_max_deviation") is not None:
        full = metrics.get("sigma_max_deviation_full")
        full_txt = "" if full is None else f"{full:.3f} over full batches, "
        train_txt = (f"; in training (B={train_b}): {full_txt}{metrics['sigma_max_deviation']:.3f} with each "
                     "epoch's last, partial batch")
    mode_txt = "" if mode == "batch_freq" else f" (sigma_mode={mode!r}, not the original's)"
    sc = metrics.get("sigma_check") or {}
    fulls = {g: v["max_full"] for g, v in sc.items() if v.get("max_full") is not None}
    if fulls:
        b = next(iter(sc.values()))["batch_size"]
        worst = max(fulls.values())
        per_g = ", ".join(f"γ={g}: {v:.3f}" for g, v in fulls.items())
        measured = (f"max|σ−2| over full batches of B={b} of this run's long-tailed training labels "
                    f"({next(iter(sc.values()))['epochs']} shuffled epochs): {per_g}{train_txt}{mode_txt}")
        spec_b = "" if b == 128 else " (the spec's: B=128)"
        return _row(claim, f"max|σ−2| < {bound} for B={b}{spec_b}", measured, bool(worst < bound), ref)
    if train_b == 128 and metrics.get("sigma_max_deviation") is not None:  # an older run without sigma_check
        v = metrics.get("sigma_max_deviation_full") or metrics["sigma_max_deviation"]
        return _row(claim, f"max|σ−2| < {bound} for B=128", f"{v:.3f}{train_txt}{mode_txt}", bool(v < bound), ref)
    return _row(claim, f"max|σ−2| < {bound} for B=128", "not recorded at B=128 in this run" + train_txt, None, ref)


def _check_homovar_accuracy(metrics: dict[str, Any], bits: int) -> list[dict[str, Any]]:
    tail = metrics.get("config", {}).get("tail_classes", 3)
    per = pd.DataFrame(metrics.get("per_seed", []))
    rows = []
    for col, what, key in (("balanced_accuracy", "balanced accuracy", "accuracy"),
                           ("tail_accuracy", f"tail-{tail} accuracy", "tail_accuracy")):
        sane = SPEC_SANITY_RUN[key]
        ref = (f"{SPEC_SANITY_RUN['setting']}: {sane[CLIMBQ_HV]} vs {sane[CLIMBQ_CE]} %"
               + (" (overall accuracy)" if key == "accuracy" else ""))
        expected = "higher with HomoVar: mean paired Δ > 0 and higher in most seeds"
        for gamma in metrics.get("gammas", []):
            claim = f"(c) HomoVar raises {what} vs ClimbQ+CE at W{bits}A{bits}, γ={_gkey(gamma)}"
            sel = per[(per["gamma"] == gamma) & (per["bits"] == bits)] if len(per) else per
            d = _paired(sel, CLIMBQ_HV, CLIMBQ_CE, col) if len(sel) else np.array([])
            if d.size == 0:
                rows.append(_row(claim, expected, f"not run (needs {CLIMBQ_HV} and {CLIMBQ_CE} at W{bits}A{bits})",
                                 None, ref))
                continue
            means = sel.groupby("method")[col].mean()
            measured = (_paired_text(d, 100, " points", "higher")
                        + f"; means {100 * means[CLIMBQ_HV]:.1f} vs {100 * means[CLIMBQ_CE]:.1f} %")
            rows.append(_row(claim, expected, measured, _moves(d, "higher"), ref))
    return rows


def _check_levene_w(levene: dict[str, Any] | None, baselines: Sequence[str]) -> list[dict[str, Any]]:
    sane = SPEC_SANITY_RUN["levene_W"]
    expected = "lower W with ClimbQ+HomoVar: mean paired Δ < 0 and lower in most seeds"
    if levene is None:
        return [_row("(d) Levene W of the quantized penultimate features falls with ClimbQ+HomoVar", expected,
                     "checked in levene.ipynb (it needs the stored models' features)", None,
                     f"{SPEC_SANITY_RUN['setting']}: W {sane[CLIMBQ_HV]} vs {sane[CLIMBQ_CE]} (ClimbQ+CE), "
                     f"{sane[UNIFORM]} (uniform+CE)")]
    t = pd.DataFrame(levene["tests"])
    pen = t[t["layer"] == PENULTIMATE]
    bits = levene.get("bits", 4)
    rows = []
    for base in baselines:
        ref = f"{SPEC_SANITY_RUN['setting']}: W {sane[CLIMBQ_HV]} vs {sane[base]}"
        for gamma in levene["gammas"]:
            claim = (f"(d) Levene W (W{bits}A{bits} penultimate features) falls with ClimbQ+HomoVar vs {base}, "
                     f"γ={_gkey(gamma)}")
            sel = pen[pen["gamma"] == gamma]
            d = _paired(sel, CLIMBQ_HV, base, "W")
            if d.size == 0:
                rows.append(_row(claim, expected, f"not run (needs {CLIMBQ_HV} and {base})", None, ref))
                continue
            means = sel.groupby("method")["W"].mean()
            measured = (_paired_text(d, 1, "", "lower", digits=2)
                        + f"; means {means[CLIMBQ_HV]:.2f} vs {means[base]:.2f}")
            rows.append(_row(claim, expected, measured, _moves(d, "lower"), ref))
    return rows


def _check_out_of_bounds(metrics: dict[str, Any], levene: dict[str, Any] | None, bits: int,
                         mild_gamma: float, usually: float) -> list[dict[str, Any]]:
    sane = SPEC_SANITY_RUN["out_of_bounds"]
    ref = (f"{SPEC_SANITY_RUN['setting']}: {100 * sane[50]:.0f} % of classes out at γ=50, "
           f"{100 * sane[200]:.0f} % at γ=200")
    expected = f"no class out of bounds in ≥ {100 * usually:.0f} % of the training steps"
    per_gamma: dict[str, dict[str, float]] = {}
    for key, hist in metrics.get("history", {}).items():
        g, wa, method, _seed = key.split("/")
        if method != CLIMBQ_HV or wa != f"W{bits}A{bits}":
            continue
        acc = per_gamma.setdefault(g, {"frac": [], "all_in": []})
        acc["frac"] += [e["homovar_fraction_out"] for e in hist if "homovar_fraction_out" in e]
        acc["all_in"] += [e["homovar_steps_all_in"] for e in hist if "homovar_steps_all_in" in e]
    trend = ", ".join(f"γ={g}: {100 * float(np.mean(v['frac'])):.1f} %" for g, v in per_gamma.items() if v["frac"])
    post_hoc: dict[str, float] = {}
    if levene is not None:
        pc = pd.DataFrame(levene.get("per_class", []))
        if len(pc):
            sel = pc[pc["method"] == CLIMBQ_HV]
            post_hoc = {_gkey(g): float(v) for g, v in sel.groupby("gamma", sort=False)["out_fraction"].mean().items()}
    rows = []
    mild = [g for g in metrics.get("gammas", []) if g <= mild_gamma]
    if not mild:
        return [_row(f"(e) at mild γ (≤ {_gkey(mild_gamma)}) the fraction of classes out of HomoVar's bounds is "
                     "usually 0", expected, f"no γ ≤ {_gkey(mild_gamma)} in this run", None, ref)]
    for gamma in mild:
        g = _gkey(gamma)
        claim = f"(e) at mild γ the fraction of classes out of HomoVar's bounds per step is usually 0, γ={g}"
        acc = per_gamma.get(g)
        if not acc or not acc["all_in"]:
            what = "not recorded in this run" if acc else f"not run (needs {CLIMBQ_HV} at W{bits}A{bits})"
            rows.append(_row(claim, expected, what, None, ref))
            continue
        share = float(np.mean(acc["all_in"]))
        measured = (f"no class out in {100 * share:.0f} % of the steps (W{bits}A{bits} {CLIMBQ_HV}, all epochs and "
                    f"seeds); mean fraction out per step {trend}")
        if g in post_hoc:
            measured += (f"; on the final models' training batches (levene.ipynb) {100 * post_hoc[g]:.1f} % of "
                         "classes out per batch")
        rows.append(_row(claim, expected, measured, bool(share >= usually), ref))
    return rows


def check_expectations(metrics: dict[str, Any], levene: dict[str, Any] | None = None, *, bits: int = 4,
                       sigma_bound: float = 0.05, mild_gamma: float = 10, usually: float = 0.5,
                       levene_baselines: Sequence[str] = (CLIMBQ_CE, UNIFORM)) -> pd.DataFrame:
    """What held, what did not: spec climbq.md §6 (b)-(e), computed from the metrics (a pure function).

    ``metrics`` is the ClimbQ notebook's metrics dict, ``levene`` the Levene notebook's (claim (d) needs it;
    without it (d) is one row marked "checked in levene.ipynb"). One row per claim and gamma; columns
    ``claim``, ``expected`` (the rule), ``measured``, ``held`` (True / False / None = not checkable from these
    metrics) and ``reference`` (the spec's numbers: its §1.2 statement and the spec author's synthetic sanity
    run, :data:`SPEC_SANITY_RUN`; the paper's numbers could not be found). The rules:

    - (b) the largest ``|sigma - 2|`` over full batches of ``sigma_check_batch`` (128, the spec's B) of the run's
      long-tailed training labels is below ``sigma_bound``; the training-time values at the preset's batch size
      are reported beside it;
    - (c) HomoVar vs cross entropy, both with ClimbQ's quantizers, at W{bits}A{bits}: balanced and tail accuracy
      "rise" when the mean paired-seed difference is > 0 **and** more than half of the seeds are higher;
    - (d) Levene's W of the W{bits}A{bits} penultimate features "falls" with ClimbQ+HomoVar vs each of
      ``levene_baselines``, by the same paired rule with the sign reversed;
    - (e) at every gamma <= ``mild_gamma``, no class is out of HomoVar's bounds in at least ``usually`` of the
      training steps (W{bits}A{bits} HomoVar runs, all epochs and seeds).
    """
    if not 0 < usually <= 1:
        raise ValueError(f"usually={usually} must be in (0, 1]: the share of steps with no class out of bounds")
    if not sigma_bound > 0:
        raise ValueError(f"sigma_bound={sigma_bound} must be > 0")
    rows = [_check_sigma(metrics, sigma_bound), *_check_homovar_accuracy(metrics, bits),
            *_check_levene_w(levene, levene_baselines),
            *_check_out_of_bounds(metrics, levene, bits, mild_gamma, usually)]
    return pd.DataFrame(rows, columns=CHECK_COLUMNS)


def checks_summary(checks: pd.DataFrame) -> str:
    """One sentence from a :func:`check_expectations` table: how many held, did not hold, were not checked."""
    held = checks["held"].map(lambda v: "held" if v is True else "failed" if v is False else "unchecked")
    n = held.value_counts()
    failed = [c.split(" ", 1)[0] for c, h in zip(checks["claim"], held, strict=True) if h == "failed"]
    text = (f"{n.get('held', 0)} of {len(checks)} checks held, {n.get('failed', 0)} did not"
            + (f" (claims {', '.join(dict.fromkeys(failed))})" if failed else "")
            + (f", {n['unchecked']} could not be checked from these metrics" if n.get("unchecked") else ""))
    return text + "."


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


register_presets(LEVENE_NOTEBOOK, {
    "smoke": {"last_blocks": 3, "split": "full_test", "alpha": 0.05, "center": "mean", "mask_zeros": True,
              "dispersion_seeds": 1},
    "default": {"last_blocks": 3, "split": "full_test", "alpha": 0.05, "center": "mean", "mask_zeros": True,
                "dispersion_seeds": 1},
    "paper": {"last_blocks": 3, "split": "full_test", "alpha": 0.05, "center": "mean", "mask_zeros": True,
              "dispersion_seeds": 1},
})
PENULTIMATE = "penultimate"


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


def homovar_batch_bounds(features: Tensor, labels: Tensor, counts: Sequence[int], batch_size: int,
                         alpha: float = 0.05, mask_zeros: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
    """ClimbQ's size bounds as HomoVar computes them during training, on mini-batches of ``features``.

    The rows are shuffled with ``seed`` and cut into batches of ``batch_size`` (the last one may be smaller, as
    in training); per batch, exactly HomoVar's statistics (:func:`dispersion` with the batch-sum/dataset-count
    mean, :func:`homogeneity_bounds` with the dataset ``counts``). Returns per class the NaN-aware median over
    batches of ``n_lb``/``n_ub`` and ``out_fraction``, the share of batches in which n_k is out of bounds (the
    original's rule: a NaN bound counts as in bounds); ``per_batch`` holds the [batches, K] arrays.
    """
    order = torch.as_tensor(np.random.default_rng(seed).permutation(features.shape[0]), device=features.device)
    lbs, ubs, outs = [], [], []
    for start in range(0, features.shape[0], batch_size):  # a loop over batches, as training does
        idx = order[start:start + batch_size]
        z = dispersion(features[idx], labels[idx], "mean", "l1", mask_zeros, counts=counts)
        hb = homogeneity_bounds(z, labels[idx], counts, alpha)
        lbs.append(hb.n_lb.cpu().numpy())
        ubs.append(hb.n_ub.cpu().numpy())
        outs.append(hb.out_of_bounds.cpu().numpy())
    lb, ub, out = np.stack(lbs), np.stack(ubs), np.stack(outs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column gives a NaN median
        med_lb, med_ub = np.nanmedian(lb, axis=0), np.nanmedian(ub, axis=0)
    return {"n_lb": med_lb, "n_ub": med_ub, "out_fraction": out.mean(axis=0),
            "per_batch": {"n_lb": lb, "n_ub": ub, "out_of_bounds": out}}


def run_levene(cfg: dict[str, Any], source: ClimbQModels, device: str = "auto", data_dir: str = "") -> dict[str, Any]:
    """Levene's test on the stored models' features (issue 5); returns the JSON-native metrics dict.

    Per (gamma, method, seed) and layer (the last blocks' outputs, global-average-pooled; ``penultimate`` is the
    FC's input): Levene's W, p and F* on the balanced test split (``split="full_test"``, or ``"test"``: the
    half not used for model selection) with ``levene_features(center, mask_zeros)``. Per class on the
    penultimate features: test-set mean/variance of the dispersion z; ClimbQ's size bounds n_lb/n_ub as HomoVar
    computes them on training mini-batches (:func:`homovar_batch_bounds`: median over batches, share of batches
    out of bounds); and, on the whole training set, the budget ``full_C`` (``C_k < 0``: no class size meets
    the criterion, the original then returns NaN or the abs of two negative roots). The dispersions of
    ``dispersion_seeds`` seeds are kept for the per-class dispersion figure.
    """
    if cfg["split"] not in ("full_test", "test"):
        raise ValueError(f"split={cfg['split']!r}: use 'full_test' (the whole balanced test split) or 'test' "
                         "(the half not used for model selection)")
    dev = resolve_device(device)
    with _threads(source.metrics["config"], dev):
        return _run_levene(cfg, source, dev, data_dir)


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
        for layer in block_layers(model, cfg["last_blocks"]):
            f, y = _features(model, data, layer)
            res = levene_features(f, y, cfg["alpha"], center=cfg["center"], mask_zeros=cfg["mask_zeros"])
            tests.append({**base, "layer": layer, "W": res.W, "p": res.p, "F_star": res.F_star,
                          "homogeneous": res.homogeneous, "n": res.num_samples, "dims": int(f.shape[1])})
            if layer != PENULTIMATE:
                continue
            ftr, ytr = _features(model, sp.train, PENULTIMATE)
            batch = homovar_batch_bounds(ftr, ytr, sp.counts, ccfg["batch_size"], cfg["alpha"], cfg["mask_zeros"])
            z_tr = dispersion(ftr, ytr, "mean", "l1", cfg["mask_zeros"], counts=sp.counts)
            full = homogeneity_bounds(z_tr, ytr, sp.counts, cfg["alpha"])
            fr = res.frame.set_index("class")
            for k in range(len(sp.counts)):
                per_class.append({**base, "class": k, "n_train": sp.counts[k],
                                  "mean_dispersion": float(fr.loc[k, "mean_dispersion"]),
                                  "var_dispersion": float(fr.loc[k, "var_dispersion"]),
                                  "n_lb": float(batch["n_lb"][k]), "n_ub": float(batch["n_ub"][k]),
                                  "out_fraction": float(batch["out_fraction"][k]),
                                  "out_of_bounds": bool(batch["out_fraction"][k] > 0.5),
                                  "full_C": float(full.C[k]), "full_feasible": bool(full.C[k] >= 0)})
            if entry["seed"] in disp_seeds:
                disp.append({**base, "labels": [int(v) for v in res.labels],
                             "z": [float(f"{v:.5g}") for v in res.z]})
    df = pd.DataFrame(tests)
    summary = summarize(df, ["gamma", "method", "layer"], ["W", "p"])
    summary = summary.merge(df.groupby(["gamma", "method", "layer"], sort=False)["homogeneous"].mean()
                            .rename("homogeneous_fraction").reset_index(), on=["gamma", "method", "layer"])
    summary = summary.merge(df.groupby(["gamma", "method", "layer"], sort=False)
                            .agg(F_star=("F_star", "first"), p_max=("p", "max")).reset_index(),
                            on=["gamma", "method", "layer"])
    gmax = max(source.metrics["gammas"])
    sel = summary[(summary["gamma"] == gmax) & (summary["method"] == CLIMBQ_HV) & (summary["layer"] == PENULTIMATE)]
    return {
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
        "tests": df.to_dict("records"),
        "summary": summary.to_dict("records"),
        "per_class": per_class,
        "dispersion": disp,
        "key_metric": {"name": f"Levene W, {CLIMBQ_HV} W{ccfg['save_bits']}A{ccfg['save_bits']} penultimate "
                               f"(gamma={_gkey(gmax)})",
                       "value": float(sel["W_mean"].iloc[0]) if len(sel) else None},
    }


def levene_table(metrics: dict[str, Any], layer: str = PENULTIMATE) -> pd.DataFrame:
    """Levene W (mean ± 95 % CI over seeds), the largest p, F* and the share of seeds that pass, per gamma and
    method at ``layer``."""
    s = pd.DataFrame(metrics["summary"])
    s = s[s["layer"] == layer]
    return pd.DataFrame({
        "gamma": s["gamma"].map(_gkey),
        "method": s["method"],
        "Levene W": [format_mean_ci(m, c, scale=1, digits=2) for m, c in zip(s["W_mean"], s["W_ci"], strict=True)],
        "p (largest over seeds)": s["p_max"].map(lambda v: f"{v:.2g}"),
        "F* (alpha)": s["F_star"].map(lambda v: f"{v:.2f}"),
        "homogeneous (share of seeds)": s["homogeneous_fraction"].map(lambda v: f"{v:.0%}"),
        "seeds": s["n"],
    }).reset_index(drop=True)


def levene_layer_table(metrics: dict[str, Any]) -> pd.DataFrame:
    """Mean Levene W over seeds per layer (rows) and (gamma, method) (columns)."""
    s = pd.DataFrame(metrics["summary"])
    s["gamma"] = s["gamma"].map(_gkey)
    return s.pivot_table(index="layer", columns=["gamma", "method"], values="W_mean", sort=False).round(2)


def write_model_index(models_dir: Path, metrics: dict[str, Any]) -> Path:
    """``models/index.json``: the stored models and the config to rebuild them (also in metrics.json)."""
    return write_json(Path(models_dir) / "index.json", {"config": metrics["config"],
                                                          "entries": metrics["models"]["entries"]})
