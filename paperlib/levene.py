"""Levene variance-homogeneity analysis of class-wise features (docs/climbq.md, 'Levene analysis' and
'Size bounds').

Levene's test is a one-way ANOVA on absolute deviations from the group centre:
``W = (N-K) sum_k n_k (zbar_k - zbar)^2 / ((K-1) sum_k sum_{i in k} (z_i - zbar_k)^2)``, homogeneous when
``W <= F_{1-alpha}(K-1, N-K)``. For [N, D] features ClimbQ reduces each sample to one scalar,
``z_i = sum_d |f_id - m_{y_i d}| 1[f_id != 0]`` (:func:`dispersion`), and turns the test into per-class
bounds on the class size (:func:`homogeneity_bounds`, the one implementation that
:class:`paperlib.climbq.HomoVarLoss` also calls). :func:`levene` is scipy's test for scalar groups;
:func:`levene_features` runs the whole analysis on features; :func:`capture_features` collects a model's
penultimate (or any named layer's) features.

All statistics are computed in float64 (docs/climbq.md, 'Departures') on the inputs' device (CPU for Apple
``mps``, which has no float64); the F distribution is always scipy's.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import scipy.stats
import torch
from torch import Tensor, nn

from .data.long_tail import check_class_counts

Center = Literal["mean", "median", "trimmed"]
Reduce = Literal["l1", "l2"]
GrandMean = Literal["unweighted", "weighted"]

__all__ = [
    "HomogeneityBounds", "LeveneFeatures", "capture_features", "dispersion", "homogeneity_bounds", "levene",
    "levene_features",
]


# --------------------------------------------------------------------------------------------- scalar groups


def levene(groups: Sequence[Sequence[float] | np.ndarray | Tensor], center: Center = "mean",
           proportiontocut: float = 0.05) -> tuple[float, float]:
    """Levene's test for scalar groups: ``scipy.stats.levene(*groups, center=center)`` (docs/climbq.md,
    'Levene analysis').

    ``center="mean"`` is ClimbQ's (and Levene's original) choice; ``"median"`` (scipy's default) is
    Brown-Forsythe; ``"trimmed"`` uses the ``proportiontocut`` trimmed mean. Returns scipy's
    ``LeveneResult``, a named tuple ``(statistic, pvalue)``.
    """
    _check_center(center)
    if isinstance(groups, np.ndarray | Tensor) or len(groups) < 2:
        raise ValueError("groups must be a sequence of at least 2 groups (one 1-D array of values per group)")
    arrays = []
    for i, g in enumerate(groups):
        a = np.asarray(g.detach().cpu() if isinstance(g, Tensor) else g)
        if not np.issubdtype(a.dtype, np.number) or a.dtype == bool:
            raise TypeError(f"group {i} must hold numbers, got dtype {a.dtype}")
        a = a.astype(np.float64)
        if a.ndim != 1 or a.size < 2:
            raise ValueError(f"group {i} must be 1-D with at least 2 values, got shape {a.shape}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"group {i} contains NaN or inf; drop or impute those values first")
        arrays.append(a)
    return scipy.stats.levene(*arrays, center=center, proportiontocut=proportiontocut)


# --------------------------------------------------------------------------------------------- dispersion


def dispersion(
    features: Tensor | np.ndarray,
    labels: Tensor | np.ndarray | Sequence[int],
    center: Center = "mean",
    reduce: Reduce = "l1",
    mask_zeros: bool = True,
    *,
    counts: Tensor | np.ndarray | Sequence[float] | None = None,
    proportiontocut: float = 0.05,
    check_labels: bool = True,
) -> Tensor:
    """Per-sample dispersion ``z_i`` of [N, D] features around their class centre (HomoVar steps 1-2,
    docs/climbq.md).

    ``z_i = sum_d |f_id - m_{y_i d}| * 1[f_id != 0]`` for ``reduce="l1"`` and ``mask_zeros=True`` (ClimbQ:
    exactly-zero entries, ReLU zeros, are skipped); ``reduce="l2"`` takes the Euclidean norm instead. The
    centre ``m_k`` is the per-dimension class mean, median or ``proportiontocut``-trimmed mean (scipy's
    ``trimboth``). With ``counts`` (per-class dataset counts, ``center="mean"`` only) the centre is ClimbQ's
    ``m_k = (sum_{i in k} f_i) / counts[k]``: a batch sum divided by a dataset count. 1-D features are D = 1.
    Returns float64 [N] on the features' device; NaN features give NaN dispersions (not checked here:
    :func:`levene_features` rejects them). ``check_labels=False`` skips the range check of the labels (one
    host read of the device; for labels the caller has checked).
    """
    _check_center(center)
    if reduce not in ("l1", "l2"):
        raise ValueError(f"reduce={reduce!r}: use 'l1' (ClimbQ) or 'l2'")
    f = _as_float64(features, "features")
    if f.ndim == 1:
        f = f[:, None]
    if f.ndim != 2:
        raise ValueError(f"features must be [N, D] (or [N]), got shape {tuple(f.shape)}; flatten them first")
    if f.shape[0] == 0:
        raise ValueError("features has no rows: pass at least one sample")
    num_classes = None if counts is None else len(counts)
    y = _as_labels(labels, f.shape[0], f.device, num_classes, check_labels)
    if counts is not None and center != "mean":
        raise ValueError(f"counts= gives ClimbQ's batch-sum/dataset-count mean; it needs center='mean', "
                         f"not {center!r}")
    if center == "mean":
        # Class sums over the classes present only ([<=N, D], never [K, D] or [N, K, D]): m_{y_i} per row.
        uniq, inv = torch.unique(y, return_inverse=True)
        sums = torch.zeros(uniq.numel(), f.shape[1], dtype=f.dtype, device=f.device).index_add_(0, inv, f)
        if counts is not None:
            n_rows = torch.as_tensor(check_class_counts(counts), dtype=torch.float64, device=f.device)[y]
        else:
            n_rows = torch.bincount(inv)[inv].to(f.dtype)
        m_rows = sums[inv] / n_rows[:, None]
    else:
        m_rows = _class_centre(f, y, center, proportiontocut)[y]
    dev = f - m_rows
    if mask_zeros:
        dev = dev * (f != 0)
    return dev.abs().sum(1) if reduce == "l1" else dev.square().sum(1).sqrt()


def _class_centre(f: Tensor, y: Tensor, center: Center, proportiontocut: float) -> Tensor:
    """[K, D] per-class, per-dimension median or trimmed mean; vectorised by sorting on (label, value)."""
    k = int(y.max()) + 1
    n = torch.bincount(y, minlength=k)
    v, idx = torch.sort(f, dim=0)
    lab, idx2 = torch.sort(y[idx], dim=0, stable=True)
    v = v.gather(0, idx2)  # each column: class 0's values ascending, then class 1's, ...
    start = torch.cumsum(n, 0) - n
    present = n > 0
    if center == "median":
        lo = (start + (n - 1).clamp_min(0) // 2).clamp_max(f.shape[0] - 1)
        hi = (start + n // 2).clamp_max(f.shape[0] - 1)
        centre = (v[lo] + v[hi]) / 2
    else:
        if not 0 <= proportiontocut < 0.5:
            raise ValueError(f"proportiontocut={proportiontocut} must be in [0, 0.5)")
        cut = torch.as_tensor(np.floor(proportiontocut * n.cpu().numpy()).astype(np.int64), device=f.device)
        lab0 = lab[:, 0]
        pos = torch.arange(f.shape[0], device=f.device) - start[lab0]
        keep = (pos >= cut[lab0]) & (pos < (n - cut)[lab0])
        sums = torch.zeros(k, f.shape[1], dtype=f.dtype, device=f.device)
        sums.index_add_(0, lab0, v * keep[:, None])
        centre = sums / (n - 2 * cut)[:, None]
    return torch.where(present[:, None], centre, torch.nan)


# --------------------------------------------------------------------------------------------- bounds


@dataclass(frozen=True)
class HomogeneityBounds:
    """Levene statistics and ClimbQ's per-class size bounds (HomoVar steps 3-6, docs/climbq.md);
    float64 tensors.

    ``counts`` n_k, ``S`` = sum_{i in k} z_i, ``zbar_k`` = S/n, ``zbar`` the grand mean, ``ssw``/``ssb``
    the within/between mean squares, ``sb`` the per-class between terms, ``W = ssb/ssw``, ``F_star`` the
    critical value, ``C`` the per-class budget, ``(a, b, c)`` the quadratic, ``n_lb``/``n_ub`` its abs roots
    (NaN for a negative discriminant). ``below``/``above`` compare n_k with the bounds (NaN compares False).
    """

    counts: Tensor
    S: Tensor
    zbar_k: Tensor
    zbar: Tensor
    ssw: Tensor
    sb: Tensor
    ssb: Tensor
    W: Tensor
    F_star: float
    C: Tensor
    a: Tensor
    b: Tensor
    c: Tensor
    n_lb: Tensor
    n_ub: Tensor
    alpha: float
    df: tuple[float, float] = field(default=(0.0, 0.0))

    @property
    def below(self) -> Tensor:
        return self.counts < self.n_lb

    @property
    def above(self) -> Tensor:
        return self.counts > self.n_ub

    @property
    def out_of_bounds(self) -> Tensor:
        """Classes with n_k outside [n_lb, n_ub] (a NaN bound counts as in bounds, as in the original)."""
        return self.below | self.above

    @property
    def fraction_out(self) -> float:
        return float(self.out_of_bounds.double().mean())

    @property
    def homogeneous(self) -> bool:
        """``W <= F*``: Levene's homogeneity is accepted at level alpha."""
        return bool(self.W <= self.F_star)

    @property
    def p_value(self) -> float:
        return float(scipy.stats.f.sf(float(self.W), *self.df))

    def frame(self) -> pd.DataFrame:
        """Per class: n, S, zbar_k, sb, C, n_lb, n_ub and whether n_k is out of bounds."""
        cols = {"n": self.counts, "S": self.S, "zbar_k": self.zbar_k, "sb": self.sb, "C": self.C,
                "n_lb": self.n_lb, "n_ub": self.n_ub}
        df = pd.DataFrame({k: v.detach().cpu().numpy() for k, v in cols.items()})
        df["out_of_bounds"] = self.out_of_bounds.cpu().numpy()
        df.index.name = "class"
        return df


@functools.lru_cache(maxsize=256)
def f_critical(alpha: float, df_between: float, df_within: float) -> float:
    """``F^{-1}_{df_between, df_within}(1 - alpha)`` (``scipy.stats.f.ppf``), cached: HomoVar asks for the same
    value every training step (the dataset counts fix K and N)."""
    return float(scipy.stats.f.ppf(1 - alpha, df_between, df_within))


def homogeneity_bounds(
    z: Tensor | np.ndarray | Sequence[float],
    labels: Tensor | np.ndarray | Sequence[int],
    counts: Tensor | np.ndarray | Sequence[float],
    alpha: float = 0.05,
    *,
    grand_mean: GrandMean = "unweighted",
    mask_zero_z: bool = True,
    check_labels: bool = True,
) -> HomogeneityBounds:
    """Levene statistics and the per-class bounds [n_lb, n_ub] on the class size (docs/climbq.md, 'Size bounds').

    With ``n_k = counts[k]`` (ClimbQ: the *dataset* counts), ``N = sum n_k``, ``K = len(counts)``:
    ``S_k = sum_{i in k} z_i``, ``zbar_k = S_k/n_k``, ``zbar`` = mean_k zbar_k (``grand_mean="unweighted"``,
    the original) or sum S/N (``"weighted"``, textbook); ``F* = F^{-1}_{K-1,N-K}(1-alpha)``;
    ``ssw = sum_i (z_i - zbar_{y_i})^2 1[z_i != 0] / (N-K)`` (the mask is ``mask_zero_z``);
    ``sb_k = n_k (zbar_k - zbar)^2``, ``ssb = sum sb / (K-1)``, ``W = ssb/ssw``;
    ``C_k = F* (K-1) ssw - sum_{j != k} sb_j``; ``a = zbar^2``, ``b_k = -(2 zbar S_k + C_k)``,
    ``c_k = S_k^2``;
    ``n_lb, n_ub = |(-b -+ sqrt(b^2 - 4ac)) / 2a|`` (NaN when the discriminant is negative).
    ``check_labels=False`` skips the labels' range check (see :func:`dispersion`).
    """
    if grand_mean not in ("unweighted", "weighted"):
        raise ValueError(f"grand_mean={grand_mean!r}: use 'unweighted' (ClimbQ) or 'weighted' (textbook)")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha} must be in (0, 1)")
    zt = _as_float64(z, "z")
    if zt.ndim != 1:
        raise ValueError(f"z must be 1-D (one dispersion per sample), got shape {tuple(zt.shape)}")
    n_np = check_class_counts(counts)
    k, big_n = n_np.size, float(n_np.sum())
    if k < 2:
        raise ValueError(f"Levene's test needs at least 2 classes, got {k}")
    if big_n <= k:
        raise ValueError(f"the counts sum to N={big_n:g} <= K={k}: the within-class degrees of freedom N-K "
                         "must be positive (need more than one sample per class)")
    y = _as_labels(labels, zt.shape[0], zt.device, k, check_labels)
    n = torch.as_tensor(n_np, dtype=torch.float64, device=zt.device)

    s = torch.zeros(k, dtype=torch.float64, device=zt.device).index_add_(0, y, zt)
    zbar_k = s / n
    zbar = zbar_k.mean() if grand_mean == "unweighted" else s.sum() / big_n
    f_star = f_critical(alpha, k - 1, big_n - k)
    dev2 = (zt - zbar_k[y]).square()
    if mask_zero_z:
        dev2 = dev2 * (zt != 0)
    ssw = dev2.sum() / (big_n - k)
    sb = n * (zbar_k - zbar).square()
    ssb = sb.sum() / (k - 1)
    c_budget = f_star * ssw * (k - 1) - (ssb * (k - 1) - sb)
    a = zbar.square()
    b = -(2 * zbar * s + c_budget)
    c = s.square()
    root = (b.square() - 4 * a * c).sqrt()  # NaN for a negative discriminant, as in the original
    n_lb = ((-b - root) / (2 * a)).abs()
    n_ub = ((-b + root) / (2 * a)).abs()
    return HomogeneityBounds(counts=n, S=s, zbar_k=zbar_k, zbar=zbar, ssw=ssw, sb=sb, ssb=ssb, W=ssb / ssw,
                             F_star=f_star, C=c_budget, a=a, b=b, c=c, n_lb=n_lb, n_ub=n_ub, alpha=alpha,
                             df=(float(k - 1), big_n - k))


# --------------------------------------------------------------------------------------------- features


@dataclass(frozen=True)
class LeveneFeatures:
    """Result of :func:`levene_features`: the test and a per-class table (``frame``)."""

    W: float
    p: float
    F_star: float
    alpha: float
    homogeneous: bool
    center: str
    num_classes: int
    num_samples: int
    frame: pd.DataFrame = field(repr=False)
    z: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)
    bounds: HomogeneityBounds = field(repr=False)


def levene_features(
    features: Tensor | np.ndarray,
    labels: Tensor | np.ndarray | Sequence[int],
    alpha: float = 0.05,
    *,
    center: Center = "mean",
    reduce: Reduce = "l1",
    mask_zeros: bool = True,
    proportiontocut: float = 0.05,
) -> LeveneFeatures:
    """Levene's test of variance homogeneity across classes for [N, D] features (docs/climbq.md,
    'Levene analysis').

    ``z = dispersion(features, labels, center, reduce, mask_zeros)`` around each class's own centre, then
    Levene's W is the one-way ANOVA F of z over the classes present (actual group sizes, weighted grand mean,
    no zero mask: :func:`homogeneity_bounds` with ``grand_mean="weighted", mask_zero_z=False``); p-value and
    ``F*`` from scipy's F distribution. For D = 1 with no exact zeros this equals
    ``scipy.stats.levene(*groups, center=center)``. Per class (original label): n, mean dispersion, variance
    of z, mean per-dimension feature variance and the bounds n_lb/n_ub on the class size.
    """
    f = _as_float64(features, "features")
    f = f[:, None] if f.ndim == 1 else f
    if f.ndim != 2:
        raise ValueError(f"features must be [N, D] (or [N]), got shape {tuple(f.shape)}; flatten them first")
    if not bool(torch.isfinite(f).all()):
        raise ValueError("features contain NaN or inf; drop those samples (or fix the model) first")
    y_np = np.asarray(labels.detach().cpu() if isinstance(labels, Tensor) else labels)
    if y_np.ndim != 1 or y_np.shape[0] != f.shape[0]:
        raise ValueError(f"labels must be 1-D with one label per feature row ({f.shape[0]}), "
                         f"got shape {y_np.shape}")
    if not np.issubdtype(y_np.dtype, np.integer):
        raise TypeError(f"labels must be integer class ids, got dtype {y_np.dtype}")
    classes, y_idx, n_np = np.unique(y_np, return_inverse=True, return_counts=True)
    if classes.size < 2:
        raise ValueError(f"Levene's test needs at least 2 classes, got {classes.size}")
    small = classes[n_np < 2]
    if small.size:
        raise ValueError(f"classes {small.tolist()} have fewer than 2 samples; drop them or collect more")
    y = torch.as_tensor(y_idx.reshape(-1), dtype=torch.long, device=f.device)
    z = dispersion(f, y, center, reduce, mask_zeros, proportiontocut=proportiontocut)
    bounds = homogeneity_bounds(z, y, n_np, alpha, grand_mean="weighted", mask_zero_z=False)
    k, n = classes.size, torch.as_tensor(n_np, dtype=torch.float64, device=f.device)
    var_z = torch.zeros(k, dtype=torch.float64, device=f.device).index_add_(
        0, y, (z - bounds.zbar_k[y]).square()) / (n - 1)
    mean_f = torch.zeros(k, f.shape[1], dtype=torch.float64, device=f.device).index_add_(0, y, f) / n[:, None]
    var_f = torch.zeros_like(mean_f).index_add_(0, y, (f - mean_f[y]).square()) / (n - 1)[:, None]
    frame = pd.DataFrame({
        "class": classes, "n": n_np, "mean_dispersion": bounds.zbar_k.cpu().numpy(),
        "var_dispersion": var_z.cpu().numpy(), "feature_var": var_f.mean(1).cpu().numpy(),
        "n_lb": bounds.n_lb.cpu().numpy(), "n_ub": bounds.n_ub.cpu().numpy(),
        "out_of_bounds": bounds.out_of_bounds.cpu().numpy(),
    })
    w = float(bounds.W)
    return LeveneFeatures(
        W=w, p=bounds.p_value, F_star=bounds.F_star, alpha=alpha, homogeneous=bool(w <= bounds.F_star),
        center=center, num_classes=int(k), num_samples=int(f.shape[0]), frame=frame,
        z=z.cpu().numpy(), labels=y_np, bounds=bounds,
    )


# --------------------------------------------------------------------------------------------- capture


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass once the layer's output is stored."""


@torch.no_grad()
def capture_features(
    model: nn.Module,
    batches: Iterable[Sequence[Tensor]],
    layer: str | None = None,
    *,
    pool: Literal["avg", "flatten"] = "avg",
    max_batches: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Run ``model`` in eval mode over ``(x, y, ...)`` batches and collect features and labels (on CPU).

    ``layer=None`` uses ``model.forward_features(x)`` (the penultimate pooled features of this package's
    models); otherwise a forward hook on the submodule named ``layer`` takes its output and stops the
    forward pass there. Outputs with spatial dimensions are global-average-pooled (``pool="avg"``) or
    flattened (``pool="flatten"``). Batches go to the model's device; its train/eval mode is restored.
    """
    if pool not in ("avg", "flatten"):
        raise ValueError(f"pool={pool!r}: use 'avg' (global average over spatial dims) or 'flatten'")
    if layer is None and not callable(getattr(model, "forward_features", None)):
        names = [n for n, _ in model.named_modules() if n]
        raise ValueError(f"{type(model).__name__} has no forward_features(x); pass layer=, e.g. one of "
                         f"{names[-8:]}")
    target = None
    if layer is not None:
        try:
            target = model.get_submodule(layer)
        except AttributeError:
            names = [n for n, _ in model.named_modules() if n]
            raise ValueError(f"model has no submodule {layer!r}; valid names include {names[-8:]}") from None
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    store: list[Tensor] = []

    def hook(_module: nn.Module, _inputs: object, output: object) -> None:
        out = output[0] if isinstance(output, tuple | list) else output
        store.append(out)
        raise _Captured

    feats, labels = [], []
    was_training = model.training
    model.eval()
    handle = target.register_forward_hook(hook) if target is not None else None
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            x, y = batch[0].to(device), batch[1]
            if target is None:
                out = model.forward_features(x)
            else:
                store.clear()
                try:
                    model(x)
                except _Captured:
                    pass
                if not store:
                    raise ValueError(f"layer {layer!r} was not called in model's forward pass")
                out = store[0]
            if out.ndim > 2:
                out = out.mean(dim=tuple(range(2, out.ndim))) if pool == "avg" else out.flatten(1)
            feats.append(out.detach().float().cpu())
            labels.append(torch.as_tensor(y).reshape(-1).cpu().long())
    finally:
        if handle is not None:
            handle.remove()
        model.train(was_training)
    if not feats:
        raise ValueError("batches was empty: pass an iterable of (x, y) batches")
    return torch.cat(feats), torch.cat(labels)


# --------------------------------------------------------------------------------------------- helpers


def _check_center(center: str) -> None:
    if center not in ("mean", "median", "trimmed"):
        raise ValueError(f"center={center!r}: use 'mean' (Levene, ClimbQ), 'median' (Brown-Forsythe) or "
                         "'trimmed'")


def _stat_device(device: torch.device) -> torch.device:
    return torch.device("cpu") if device.type == "mps" else device  # mps has no float64


def _as_float64(x: object, what: str) -> Tensor:
    if isinstance(x, Tensor):
        if x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{what} must be real numbers, got dtype {x.dtype}")
        return x.detach().to(device=_stat_device(x.device), dtype=torch.float64)
    a = np.asarray(x)
    if not np.issubdtype(a.dtype, np.number) or a.dtype == bool or np.issubdtype(a.dtype, np.complexfloating):
        raise TypeError(f"{what} must be real numbers, got dtype {a.dtype}")
    return torch.as_tensor(a, dtype=torch.float64)


def _as_labels(labels: object, n: int, device: torch.device, num_classes: int | None, check: bool = True) -> Tensor:
    y = labels if isinstance(labels, Tensor) else torch.as_tensor(np.asarray(labels))
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex():
        raise TypeError(f"labels must be integer class ids, got dtype {y.dtype}")
    y = y.reshape(-1) if y.ndim == 0 else y
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"labels must be 1-D with one label per sample ({n}), got shape {tuple(y.shape)}")
    y = y.to(device=device, dtype=torch.long)
    if n and check:
        lo, hi = torch.stack(torch.aminmax(y)).tolist()  # one host sync for both bounds
        if lo < 0 or (num_classes is not None and hi >= num_classes):
            k = f"{num_classes}" if num_classes is not None else "K"
            raise ValueError(f"labels must be class ids in [0, {k}), got [{lo}, {hi}]")
    return y

