"""Figures of the LifeQuant notebook: accuracy matrices, per-task accuracy across tasks, A_T/F_T bars and the final
model's per-class accuracy.

Pure functions of the run's metrics (``paperlib.lifequant.pipeline.run_lifequant``); seed means and Student-t
95 % intervals (no bootstrap, so a redraw gives the same bytes). Accuracies are drawn in % everywhere. Panels wrap
at :data:`MAX_COLUMNS` per row and carry 9-10 pt text; long method labels are wrapped, not shrunk.
"""

from __future__ import annotations

import math
import textwrap
import warnings
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ..stats import mean_ci
from . import register_figure

NOTEBOOK = "lifequant"
MAX_COLUMNS = 4
FONT = 9
#: methods drawn in the "LifeQuant" task-curve figure (the others go to the "baselines" one)
LIFEQUANT_METHODS = ("lifequant_paper", "lifequant_code")


def _experiments(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    return list(metrics["experiments"])


def _label(metrics: dict[str, Any], method: str, width: int = 22) -> str:
    return textwrap.fill(metrics.get("method_labels", {}).get(method, method), width, break_on_hyphens=False)


def _runs(metrics: dict[str, Any], experiment: str, method: str) -> list[dict[str, Any]]:
    return [r for r in metrics["runs"] if r["experiment"] == experiment and r["method"] == method]


def _mean_matrix(runs: list[dict[str, Any]]) -> np.ndarray:
    mats = np.array([[[np.nan if v is None else v for v in row] for row in r["acc"]] for r in runs], dtype=float)
    with np.errstate(invalid="ignore"):
        return np.nanmean(mats, axis=0) if np.isfinite(mats).any() else mats[0]


def _grid(n_panels_per_row: list[int]) -> tuple[list[int], int]:
    """Rows of panels per experiment (wrapped at MAX_COLUMNS) and the number of columns."""
    rows = [max(1, math.ceil(n / MAX_COLUMNS)) for n in n_panels_per_row]
    cols = min(MAX_COLUMNS, max(n_panels_per_row + [1]))
    return rows, cols


def _is_lifequant(metrics: dict[str, Any], method: str) -> bool:
    if method in LIFEQUANT_METHODS:
        return True
    for r in metrics["runs"]:
        if r["method"] == method:
            m = r.get("settings", {}).get("method", {})
            return m.get("penalty") == "ours"
    return False


@register_figure(NOTEBOOK, "lifequant_accuracy_matrix")
def accuracy_matrix(metrics: dict[str, Any]) -> Figure:
    """``a[t, k]`` in % (top-1 on ``test_k`` after task ``t``, seed mean over the seeds that finished the entry), one
    block of panels per experiment (at most :data:`MAX_COLUMNS` methods per row), one colour bar 0-100 %."""
    exps = _experiments(metrics)
    rows, cols = _grid([len(e["methods"]) for e in exps])
    fig = Figure(figsize=(3.1 * cols + 0.8, 3.3 * sum(rows) + 0.6), layout="constrained")
    fig.get_layout_engine().set(h_pad=0.12, hspace=0.06)  # room between a block's x labels and the next titles
    axes = fig.subplots(sum(rows), cols, squeeze=False)
    image = None
    r0 = 0
    for exp, nrows in zip(exps, rows, strict=True):
        for j in range(nrows * cols):
            ax = axes[r0 + j // cols, j % cols]
            if j >= len(exp["methods"]):
                ax.set_axis_off()
                continue
            method = exp["methods"][j]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                a = 100 * _mean_matrix(_runs(metrics, exp["name"], method))
            T = a.shape[0]
            image = ax.imshow(np.ma.masked_invalid(a), vmin=0, vmax=100, cmap="viridis")
            if T <= 8:
                for t in range(T):
                    for k in range(t + 1):
                        if np.isfinite(a[t, k]):
                            ax.text(k, t, f"{a[t, k]:.0f}", ha="center", va="center", fontsize=FONT,
                                    color="white" if a[t, k] < 60 else "black")
            ax.set_xticks(range(T))
            ax.set_yticks(range(T))
            ax.tick_params(labelsize=FONT - 1)
            ax.set_title(_label(metrics, method), fontsize=FONT)
            if j + cols >= len(exp["methods"]):  # no panel of this experiment below
                ax.set_xlabel("test task k", fontsize=FONT)
            if j % cols == 0:
                ax.set_ylabel(f"{textwrap.fill(exp['name'], 24)}\nafter task t", fontsize=FONT)
        r0 += nrows
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.5, label="top-1 (%)")
    fig.suptitle(f"Accuracy matrix a[t, k] (%), {metrics.get('dataset', '')}, mean of {len(metrics['seeds'])} "
                 "seed(s)", fontsize=FONT + 2)
    return fig


def _curves(metrics: dict[str, Any], lifequant: bool) -> Figure:
    exps = _experiments(metrics)
    chosen = [[m for m in e["methods"] if _is_lifequant(metrics, m) == lifequant] for e in exps]
    rows, cols = _grid([len(c) for c in chosen])
    fig = Figure(figsize=(3.6 * cols + 1.4, 2.9 * sum(rows) + 0.6), layout="constrained")
    axes = fig.subplots(sum(rows), cols, squeeze=False, sharey=True)
    r0 = 0
    for exp, methods, nrows in zip(exps, chosen, rows, strict=True):
        T = exp["num_tasks"]
        colors = [f"C{k % 10}" for k in range(T)]
        if not methods:
            ax = axes[r0, 0]
            ax.text(0.5, 0.5, f"{exp['name']}:\nno {'LifeQuant' if lifequant else 'baseline'} method in this run",
                    ha="center", va="center", fontsize=FONT, transform=ax.transAxes)
        for j in range(nrows * cols):
            ax = axes[r0 + j // cols, j % cols]
            if j >= len(methods):
                ax.set_axis_off()
                continue
            method = methods[j]
            done = [r for r in _runs(metrics, exp["name"], method) if r.get("diverged") is None]
            ax.set_title(f"{textwrap.fill(exp['name'], 30)}\n{_label(metrics, method, 30)}", fontsize=FONT)
            ax.set_ylim(-3, 103)
            ax.tick_params(labelsize=FONT - 1)
            ax.grid(alpha=0.3)
            if j % cols == 0:
                ax.set_ylabel("top-1 (%)", fontsize=FONT)
            ax.set_xlabel("epoch (all tasks)", fontsize=FONT)
            if not done:
                ax.text(0.5, 0.5, "diverged in every seed", ha="center", va="center", fontsize=FONT,
                        transform=ax.transAxes)
                continue
            epochs = [len(h) for h in done[0]["history"]]
            starts = np.concatenate([[0], np.cumsum(epochs)])
            for t in range(1, T):
                ax.axvline(starts[t] + 0.5, color="grey", lw=0.6, ls="--")
            for k in range(T):
                xs, ys = [], []
                for t in range(k, T):
                    for e in range(epochs[t]):
                        vals = [r["history"][t][e]["acc_tasks"][k] for r in done]
                        vals = [v for v in vals if v is not None]
                        if vals:
                            xs.append(starts[t] + e + 1)
                            ys.append(100 * float(np.mean(vals)))
                ax.plot(xs, ys, color=colors[k], lw=1.4, marker=".", ms=3, label=f"test task {k}")
            if j == min(len(methods), cols) - 1:
                ax.legend(fontsize=FONT - 1, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
        r0 += nrows
    which = "LifeQuant (paper and code mode)" if lifequant else "baselines"
    fig.suptitle(f"Top-1 on each seen task after every epoch, {which}; dashed: task switches; mean of "
                 f"{len(metrics['seeds'])} seed(s)", fontsize=FONT + 1)
    return fig


@register_figure(NOTEBOOK, "lifequant_task_curves")
def task_curves(metrics: dict[str, Any]) -> Figure:
    """Top-1 (%) on every seen task's test set after every epoch for the LifeQuant methods (penalty ``ours``: paper
    and code mode, every λ), one row per experiment (seed mean of the runs that finished; dashed lines mark task
    switches). The other methods are in :func:`task_curves_baselines`."""
    return _curves(metrics, lifequant=True)


@register_figure(NOTEBOOK, "lifequant_task_curves_baselines")
def task_curves_baselines(metrics: dict[str, Any]) -> Figure:
    """As :func:`task_curves` for the baselines (original, replay + CE/BaLL, EWC, ...)."""
    return _curves(metrics, lifequant=False)


@register_figure(NOTEBOOK, "lifequant_forgetting")
def forgetting_bars(metrics: dict[str, Any]) -> Figure:
    """A_T and F_T per method (bars: seed mean, whiskers: 95 % Student-t CI, dots: seeds), one row per
    experiment; methods whose runs diverged are marked."""
    exps = _experiments(metrics)
    rows = {(r["experiment"], r["method"]): [] for r in metrics["per_seed"]}
    for r in metrics["per_seed"]:
        rows[(r["experiment"], r["method"])].append(r)
    nmax = max(len(e["methods"]) for e in exps)
    fig = Figure(figsize=(10, 0.5 * nmax * len(exps) + 1.4), layout="constrained")
    axes = fig.subplots(len(exps), 2, squeeze=False)
    for i, exp in enumerate(exps):
        methods = exp["methods"]
        for j, (col, title) in enumerate((("A_T", "average accuracy A_T (%)"), ("F_T", "forgetting F_T (%)"))):
            ax = axes[i, j]
            for y, method in enumerate(methods):
                vals = [r[col] for r in rows.get((exp["name"], method), [])]
                finite = [v for v in vals if v is not None and math.isfinite(v)]
                if len(finite) < len(vals) or not finite:
                    ax.text(0.01, y, "diverged", va="center", fontsize=FONT - 1, color="C3")
                    continue
                m, h = mean_ci(finite)
                ax.barh(y, 100 * m, color=f"C{y % 10}", alpha=0.7, height=0.7)
                if math.isfinite(h):
                    ax.errorbar(100 * m, y, xerr=100 * h, color="black", capsize=3, lw=1)
                ax.plot([100 * v for v in finite], [y] * len(finite), "o", color="black", ms=2.5)
            ax.set_yticks(range(len(methods)))
            ax.set_yticklabels([_label(metrics, m, 30).replace("\n", " ") for m in methods] if j == 0 else [],
                               fontsize=FONT - 1)
            ax.invert_yaxis()
            ax.axvline(0, color="black", lw=0.6)
            ax.grid(axis="x", alpha=0.3)
            ax.tick_params(labelsize=FONT - 1)
            ax.set_title(f"{exp['name']}: {title}", fontsize=FONT)
    return fig


@register_figure(NOTEBOOK, "lifequant_per_class")
def per_class_accuracy(metrics: dict[str, Any]) -> Figure:
    """The final model's top-1 per class (%, seed mean) on the union of all tasks' test sets: one heatmap per
    experiment, methods as rows, classes as columns; classes absent from the last task (seen only through replay
    in the paper's reading) are marked with ``*``."""
    exps = _experiments(metrics)
    fig = Figure(figsize=(max(6.0, 0.55 * max(len(e["class_names"]) for e in exps) + 3.5),
                          sum(0.45 * len(e["methods"]) + 1.4 for e in exps) + 0.6), layout="constrained")
    axes = fig.subplots(len(exps), 1, squeeze=False)[:, 0]
    image = None
    for ax, exp in zip(axes, exps, strict=True):
        names = exp["class_names"]
        last = {int(c) for c in exp["classes"][-1]}
        seen = sorted({int(c) for cl in exp["classes"] for c in cl})
        mat = np.full((len(exp["methods"]), len(seen)), np.nan)
        for i, method in enumerate(exp["methods"]):
            runs = [r for r in _runs(metrics, exp["name"], method) if r.get("diverged") is None]
            for j, c in enumerate(seen):
                vals = [r["final_per_class"][c] for r in runs if r["final_per_class"][c] is not None]
                if vals:
                    mat[i, j] = 100 * float(np.mean(vals))
        image = ax.imshow(np.ma.masked_invalid(mat), vmin=0, vmax=100, cmap="viridis", aspect="auto")
        if len(seen) <= 20:
            for i in range(mat.shape[0]):
                for j in range(mat.shape[1]):
                    if np.isfinite(mat[i, j]):
                        ax.text(j, i, f"{mat[i, j]:.0f}", ha="center", va="center", fontsize=FONT - 1,
                                color="white" if mat[i, j] < 60 else "black")
            ax.set_xticks(range(len(seen)))
            ax.set_xticklabels([f"{names[c] if c < len(names) else c}{'' if c in last else '*'}" for c in seen],
                               fontsize=FONT - 1, rotation=90 if len(seen) > 12 else 0)
        ax.set_yticks(range(len(exp["methods"])))
        ax.set_yticklabels([_label(metrics, m, 40).replace("\n", " ") for m in exp["methods"]], fontsize=FONT - 1)
        ax.set_title(f"{exp['name']}: final top-1 per class (%); * = absent from the last task", fontsize=FONT)
        ax.set_xlabel("class", fontsize=FONT)
    if image is not None:
        fig.colorbar(image, ax=list(axes), shrink=0.6, label="top-1 (%)")
    return fig
