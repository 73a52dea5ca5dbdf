"""Figures of the ClimbQ notebook: pure functions of its ``metrics.json``.

Every imbalance ratio is labelled with the real ratio of the run's training data (max count / min count), which
the original's recursive generator makes larger than the nominal gamma (docs/climbq.md, 'Long-tailed data').
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from . import register_figure

NOTEBOOK = "climbq"
METHOD_STYLE = {  # colour, line style, marker
    "FP32+CE": ("0.35", "--", "o"),
    "uniform+CE": ("tab:blue", "-", "s"),
    "ClimbQ+CE": ("tab:orange", "-", "^"),
    "ClimbQ+HomoVar": ("tab:green", "-", "D"),
}
#: Bounds below one image are drawn at 1: a class size of less than one image means nothing.
MIN_CLASS_SIZE = 1.0


def _gkey(g: float) -> str:
    return str(int(g)) if float(g).is_integer() else str(g)


def counts_of(metrics: dict[str, Any], gamma: float) -> list[int] | None:
    """The training counts of ``gamma`` in a climbq (``splits``) or Levene (``class_counts``) metrics dict."""
    g = _gkey(gamma)
    if g in (metrics.get("splits") or {}):
        return metrics["splits"][g]["counts"]
    return (metrics.get("class_counts") or {}).get(g)


def gamma_text(metrics: dict[str, Any], gamma: float, sep: str = " ") -> str:
    """``"γ = 10 (real 11.4)"``: gamma with the real ratio max/min of the run's training counts."""
    counts = counts_of(metrics, gamma)
    if not counts or min(counts) == 0:
        return f"γ = {_gkey(gamma)}"
    return f"γ = {_gkey(gamma)}{sep}(real {max(counts) / min(counts):.3g})"


def _class_ticks(ax: Any, metrics: dict[str, Any], gamma: float) -> None:
    names = metrics["splits"][_gkey(gamma)]["classes"]
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([f"{i}\n({n})" for i, n in enumerate(names)], fontsize=7)


def _n_seeds(metrics: dict[str, Any]) -> int:
    return len(metrics.get("seeds", []))


@register_figure(NOTEBOOK, "climbq_class_counts")
def class_counts(metrics: dict[str, Any]) -> Figure:
    """Training images per class (rank 0 = head) for every gamma (with its real ratio), log scale."""
    fig = Figure(figsize=(5.5, 3.4))
    ax = fig.add_subplot()
    for gamma in metrics["gammas"]:
        counts = metrics["splits"][_gkey(gamma)]["counts"]
        ax.plot(range(len(counts)), counts, marker="o", label=f"{gamma_text(metrics, gamma)}, Σ = {sum(counts)}")
    ax.set_yscale("log")
    ax.set_xlabel("class rank (original class in parentheses)")
    ax.set_ylabel("training images")
    _class_ticks(ax, metrics, metrics["gammas"][0])
    cfg = metrics["config"]
    floor = f", min {cfg['lt_min_count']}" if cfg["lt_min_count"] else ""
    ax.set_title(f"{metrics['dataset']}-LT: training images per class ({cfg['lt_mode']} rule{floor})", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


@register_figure(NOTEBOOK, "climbq_per_class_accuracy")
def per_class_accuracy(metrics: dict[str, Any]) -> Figure:
    """Per-class test accuracy (mean over seeds) per method: rows W/A bits, columns gamma (with real ratio)."""
    df = pd.DataFrame(metrics["per_seed"])
    gammas, bits = metrics["gammas"], metrics["bits"]
    fig = Figure(figsize=(3.4 * len(gammas), 2.6 * len(bits) + 0.9))
    axes = fig.subplots(len(bits), len(gammas), squeeze=False, sharey=True)
    for r, b in enumerate(bits):
        for c, g in enumerate(gammas):
            ax = axes[r][c]
            for method in metrics["methods"]:
                sel = df[(df["gamma"] == g) & (df["method"] == method) & (df["bits"] == (32 if method == "FP32+CE"
                                                                                          else b))]
                if sel.empty:
                    continue
                acc = np.nanmean(np.array(sel["per_class_accuracy"].to_list(), dtype=float), axis=0) * 100
                color, ls, marker = METHOD_STYLE.get(method, ("k", "-", "."))
                ax.plot(range(acc.size), acc, color=color, ls=ls, marker=marker, ms=3.5, lw=1.2, label=method)
            ax.set_title(f"W{b}A{b}, {gamma_text(metrics, g)}", fontsize=9)
            ax.set_ylim(-3, 103)
            ax.grid(alpha=0.3)
            _class_ticks(ax, metrics, g)
            if c == 0:
                ax.set_ylabel("test accuracy (%)")
            if r == len(bits) - 1:
                ax.set_xlabel("class rank (head → tail)", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(f"Per-class test accuracy, mean over n = {_n_seeds(metrics)} seed(s) (FP32 in every row)",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


@register_figure(NOTEBOOK, "climbq_accuracy_vs_gamma")
def accuracy_vs_gamma(metrics: dict[str, Any]) -> Figure:
    """Balanced and tail accuracy (mean ± 95 % CI over seeds) against gamma (with its real ratio), per method
    and bit-width."""
    s = pd.DataFrame(metrics["summary"])
    tail = metrics["config"]["tail_classes"]
    cols = [("balanced_accuracy", "balanced accuracy (%)"), ("tail_accuracy", f"tail-{tail} accuracy (%)")]
    bits = metrics["bits"]
    fig = Figure(figsize=(3.8 * len(bits), 5.8))
    axes = fig.subplots(2, len(bits), squeeze=False, sharex=True)
    gammas = metrics["gammas"]
    pos = {g: i for i, g in enumerate(gammas)}
    for c, b in enumerate(bits):
        for r, (col, label) in enumerate(cols):
            ax = axes[r][c]
            for k, method in enumerate(metrics["methods"]):
                sel = s[(s["method"] == method) & (s["bits"] == (32 if method == "FP32+CE" else b))]
                if sel.empty:
                    continue
                x = np.array([pos[g] for g in sel["gamma"]]) + (k - 1.5) * 0.06
                ci = sel[f"{col}_ci"].astype(float).fillna(0.0).to_numpy() * 100
                color, ls, marker = METHOD_STYLE.get(method, ("k", "-", "."))
                ax.errorbar(x, sel[f"{col}_mean"].to_numpy() * 100, yerr=ci, color=color, ls=ls, marker=marker,
                            ms=4, lw=1.2, capsize=3, label=method)
            ax.set_xticks(range(len(gammas)))
            ax.set_xticklabels([gamma_text(metrics, g, "\n") for g in gammas], fontsize=8)
            ax.grid(alpha=0.3)
            if r == 0:
                ax.set_title(f"W{b}A{b} (FP32 for reference)", fontsize=9)
            if r == 1:
                ax.set_xlabel("imbalance ratio γ (real max/min count)")
            if c == 0:
                ax.set_ylabel(label)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(f"Mean ± 95 % CI (Student t) over n = {_n_seeds(metrics)} seed(s)", fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


@register_figure(NOTEBOOK, "climbq_homovar_bounds")
def homovar_bounds(metrics: dict[str, Any]) -> Figure:
    """HomoVar's training-time size bounds [n_lb, n_ub] vs n_k (log) and the class weights, per gamma.

    Per class: the mean over seeds of the last fine-tuning epoch's per-step means (NaN-aware), at the
    stored bit-width; bounds below one image are drawn at 1. The size axes are shared. Red weights mark classes
    whose beta left beta_f (out of bounds).
    """
    hv = pd.DataFrame(metrics["homovar"])
    gammas = metrics["gammas"]
    b = metrics["config"]["save_bits"] if metrics["config"]["save_bits"] in metrics["bits"] else metrics["bits"][0]
    fig = Figure(figsize=(3.6 * len(gammas), 5.2))
    axes = fig.subplots(2, len(gammas), squeeze=False)
    for ax in axes[0][1:]:
        ax.sharey(axes[0][0])
    for ax in axes[1][1:]:
        ax.sharey(axes[1][0])
    beta_f = metrics["config"]["beta"]
    for c, g in enumerate(gammas):
        ax, axw = axes[0][c], axes[1][c]
        sel = hv[(hv["gamma"] == g) & (hv["bits"] == b)] if not hv.empty else hv
        if sel.empty:
            ax.text(0.5, 0.5, "no HomoVar run", ha="center", transform=ax.transAxes)
            continue
        counts = np.array(sel["counts"].iloc[0], dtype=float)
        x = np.arange(counts.size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a class whose bounds were NaN in every step
            lb = np.nanmean(np.array(sel["n_lb"].to_list(), dtype=float), axis=0)
            ub = np.nanmean(np.array(sel["n_ub"].to_list(), dtype=float), axis=0)
            beta = np.nanmean(np.array(sel["beta"].to_list(), dtype=float), axis=0)
            w = np.nanmean(np.array(sel["weights"].to_list(), dtype=float), axis=0)
            frac = float(np.nanmean([f[0] for f in sel["fraction_out"]]))
        lb, ub = np.maximum(lb, MIN_CLASS_SIZE), np.maximum(ub, MIN_CLASS_SIZE)
        ax.fill_between(x, lb, ub, color="tab:green", alpha=0.2, label="[n_lb, n_ub]")
        ax.plot(x, lb, color="tab:green", lw=1, marker="v", ms=3)
        ax.plot(x, ub, color="tab:green", lw=1, marker="^", ms=3)
        ax.plot(x, counts, color="k", marker="o", ms=4, lw=0, label="n_k (training)")
        ax.set_yscale("log")
        ax.set_title(f"{gamma_text(metrics, g)}, W{b}A{b}:\n{100 * frac:.0f} % of classes out per step",
                     fontsize=9)
        ax.grid(alpha=0.3, which="both")
        _class_ticks(ax, metrics, g)
        out = ~np.isclose(beta, beta_f, rtol=0, atol=1e-12)
        axw.bar(x, w, color=np.where(out, "tab:red", "tab:green"))
        axw.set_xticks(x)
        axw.grid(alpha=0.3, axis="y")
        axw.set_xlabel("class rank (head → tail)", fontsize=8)
        if c == 0:
            ax.set_ylabel("class size (log, ≥ 1)")
            axw.set_ylabel("class weight w_k")
            ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(f"HomoVar: Levene size bounds and class weights (last epoch, mean over steps and n = "
                 f"{_n_seeds(metrics)} seed(s)); red = β_k ≠ β_f in some step", fontsize=9)
    fig.tight_layout()
    return fig
