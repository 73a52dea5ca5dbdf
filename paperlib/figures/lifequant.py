"""Figures of the LifeQuant notebook: accuracy-matrix heatmaps, per-task accuracy across tasks, A_T/F_T bars.

Pure functions of the run's metrics (``paperlib.lifequant.pipeline.run_lifequant``); seed means and Student-t
95 % intervals (no bootstrap, so a redraw gives the same bytes).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ..stats import mean_ci
from . import register_figure

NOTEBOOK = "lifequant"


def _experiments(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    return list(metrics["experiments"])


def _label(metrics: dict[str, Any], method: str) -> str:
    return metrics.get("method_labels", {}).get(method, method)


def _runs(metrics: dict[str, Any], experiment: str, method: str) -> list[dict[str, Any]]:
    return [r for r in metrics["runs"] if r["experiment"] == experiment and r["method"] == method]


def _mean_matrix(runs: list[dict[str, Any]]) -> np.ndarray:
    mats = np.array([[[np.nan if v is None else v for v in row] for row in r["acc"]] for r in runs], dtype=float)
    with np.errstate(invalid="ignore"):
        return np.nanmean(mats, axis=0) if np.isfinite(mats).any() else mats[0]


@register_figure(NOTEBOOK, "lifequant_accuracy_matrix")
def accuracy_matrix(metrics: dict[str, Any]) -> Figure:
    """``a[t, k]`` (top-1 on ``test_k`` after task ``t``, seed mean over the seeds that finished the entry) per
    experiment (rows) and method (columns)."""
    exps = _experiments(metrics)
    ncols = max(len(e["methods"]) for e in exps)
    fig = Figure(figsize=(2.3 * ncols, 2.5 * len(exps)))
    axes = fig.subplots(len(exps), ncols, squeeze=False)
    image = None
    for i, exp in enumerate(exps):
        for j in range(ncols):
            ax = axes[i, j]
            if j >= len(exp["methods"]):
                ax.set_axis_off()
                continue
            method = exp["methods"][j]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                a = _mean_matrix(_runs(metrics, exp["name"], method))
            T = a.shape[0]
            image = ax.imshow(np.ma.masked_invalid(a), vmin=0, vmax=1, cmap="viridis")
            for t in range(T):
                for k in range(t + 1):
                    if np.isfinite(a[t, k]):
                        ax.text(k, t, f"{100 * a[t, k]:.0f}", ha="center", va="center", fontsize=7,
                                color="white" if a[t, k] < 0.6 else "black")
            ax.set_xticks(range(T))
            ax.set_yticks(range(T))
            ax.tick_params(labelsize=7)
            ax.set_title(_label(metrics, method), fontsize=8)
            if j == 0:
                ax.set_ylabel(f"{exp['name']}\nafter task t", fontsize=8)
            if i == len(exps) - 1:
                ax.set_xlabel("test task k", fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="top-1")
    fig.suptitle(f"Accuracy matrix a[t, k] ({metrics.get('dataset', '')}, {len(metrics['seeds'])} seed(s))",
                 fontsize=10)
    return fig


@register_figure(NOTEBOOK, "lifequant_task_curves")
def task_curves(metrics: dict[str, Any]) -> Figure:
    """Top-1 on every seen task's test set after every epoch, across the tasks (seed mean of the runs that
    finished; dashed lines mark task switches)."""
    exps = _experiments(metrics)
    ncols = max(len(e["methods"]) for e in exps)
    fig = Figure(figsize=(2.6 * ncols, 2.3 * len(exps)))
    axes = fig.subplots(len(exps), ncols, squeeze=False, sharey=True)
    for i, exp in enumerate(exps):
        T = exp["num_tasks"]
        colors = [f"C{k % 10}" for k in range(T)]
        for j in range(ncols):
            ax = axes[i, j]
            if j >= len(exp["methods"]):
                ax.set_axis_off()
                continue
            method = exp["methods"][j]
            done = [r for r in _runs(metrics, exp["name"], method) if r.get("diverged") is None]
            ax.set_title(_label(metrics, method), fontsize=8)
            ax.set_ylim(-0.03, 1.03)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel(f"{exp['name']}\ntop-1", fontsize=8)
            if not done:
                ax.text(0.5, 0.5, "diverged in every seed", ha="center", va="center", fontsize=7,
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
                            ys.append(float(np.mean(vals)))
                ax.plot(xs, ys, color=colors[k], lw=1.2, marker=".", ms=3, label=f"test {k}")
            if i == len(exps) - 1:
                ax.set_xlabel("epoch (all tasks)", fontsize=8)
        axes[i, 0].legend(fontsize=6, loc="lower left")
    fig.suptitle("Accuracy on each seen task after every epoch", fontsize=10)
    fig.tight_layout()
    return fig


@register_figure(NOTEBOOK, "lifequant_forgetting")
def forgetting_bars(metrics: dict[str, Any]) -> Figure:
    """A_T and F_T per method (bars: seed mean, whiskers: 95 % Student-t CI, dots: seeds), one row per
    experiment; methods whose runs diverged are marked."""
    exps = _experiments(metrics)
    rows = {(r["experiment"], r["method"]): [] for r in metrics["per_seed"]}
    for r in metrics["per_seed"]:
        rows[(r["experiment"], r["method"])].append(r)
    nmax = max(len(e["methods"]) for e in exps)
    fig = Figure(figsize=(9, 0.45 * nmax * len(exps) + 1.2))
    axes = fig.subplots(len(exps), 2, squeeze=False)
    for i, exp in enumerate(exps):
        methods = exp["methods"]
        for j, (col, title) in enumerate((("A_T", "average accuracy A_T"), ("F_T", "forgetting F_T"))):
            ax = axes[i, j]
            for y, method in enumerate(methods):
                vals = [r[col] for r in rows.get((exp["name"], method), [])]
                finite = [v for v in vals if v is not None and math.isfinite(v)]
                if len(finite) < len(vals) or not finite:
                    ax.text(0.01, y, "diverged", va="center", fontsize=7, color="C3")
                    continue
                m, h = mean_ci(finite)
                ax.barh(y, 100 * m, color=f"C{y % 10}", alpha=0.7, height=0.7)
                if math.isfinite(h):
                    ax.errorbar(100 * m, y, xerr=100 * h, color="black", capsize=3, lw=1)
                ax.plot([100 * v for v in finite], [y] * len(finite), "o", color="black", ms=2.5)
            ax.set_yticks(range(len(methods)))
            ax.set_yticklabels([_label(metrics, m) for m in methods] if j == 0 else [], fontsize=7)
            ax.invert_yaxis()
            ax.axvline(0, color="black", lw=0.6)
            ax.grid(axis="x", alpha=0.3)
            ax.tick_params(labelsize=7)
            ax.set_title(f"{exp['name']}: {title}", fontsize=8)
            ax.set_xlabel("%", fontsize=8)
    fig.tight_layout()
    return fig
