"""Figures of the ClimbQ notebook: pure functions of its ``metrics.json``."""

from __future__ import annotations

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


def _gkey(g: float) -> str:
    return str(int(g)) if float(g).is_integer() else str(g)


def _class_ticks(ax: Any, metrics: dict[str, Any], gamma: float) -> None:
    names = metrics["splits"][_gkey(gamma)]["classes"]
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([f"{i}\n({n})" for i, n in enumerate(names)], fontsize=7)


@register_figure(NOTEBOOK, "climbq_class_counts")
def class_counts(metrics: dict[str, Any]) -> Figure:
    """Training images per class (rank 0 = head) for every gamma, log scale."""
    fig = Figure(figsize=(5.5, 3.4))
    ax = fig.add_subplot()
    for gamma in metrics["gammas"]:
        counts = metrics["splits"][_gkey(gamma)]["counts"]
        ax.plot(range(len(counts)), counts, marker="o", label=f"γ = {_gkey(gamma)} (Σ = {sum(counts)})")
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
    """Per-class test accuracy (mean over seeds) per method: rows W/A bits, columns gamma."""
    df = pd.DataFrame(metrics["per_seed"])
    gammas, bits = metrics["gammas"], metrics["bits"]
    fig = Figure(figsize=(3.4 * len(gammas), 2.6 * len(bits) + 0.6))
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
            ax.set_title(f"W{b}A{b}, γ = {_gkey(g)}", fontsize=9)
            ax.set_ylim(-3, 103)
            ax.grid(alpha=0.3)
            _class_ticks(ax, metrics, g)
            if c == 0:
                ax.set_ylabel("test accuracy (%)")
            if r == len(bits) - 1:
                ax.set_xlabel("class rank (head → tail)", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


@register_figure(NOTEBOOK, "climbq_accuracy_vs_gamma")
def accuracy_vs_gamma(metrics: dict[str, Any]) -> Figure:
    """Balanced and tail accuracy (mean ± 95 % CI over seeds) against gamma, per method and bit-width."""
    s = pd.DataFrame(metrics["summary"])
    tail = metrics["config"]["tail_classes"]
    cols = [("balanced_accuracy", "balanced accuracy (%)"), ("tail_accuracy", f"tail-{tail} accuracy (%)")]
    bits = metrics["bits"]
    fig = Figure(figsize=(3.6 * len(bits), 5.4))
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
            ax.set_xticklabels([_gkey(g) for g in gammas])
            ax.grid(alpha=0.3)
            if r == 0:
                ax.set_title(f"W{b}A{b} (FP32 for reference)", fontsize=9)
            if r == 1:
                ax.set_xlabel("imbalance ratio γ")
            if c == 0:
                ax.set_ylabel(label)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


@register_figure(NOTEBOOK, "climbq_homovar_bounds")
def homovar_bounds(metrics: dict[str, Any]) -> Figure:
    """HomoVar's training-time size bounds [n_lb, n_ub] vs n_k (log) and the class weights, per gamma.

    Per class: the mean over seeds of the last fine-tuning epoch's per-step means (NaN-aware), at the
    stored bit-width. Red weights mark classes whose beta left beta_f (out of bounds).
    """
    hv = pd.DataFrame(metrics["homovar"])
    gammas = metrics["gammas"]
    b = metrics["config"]["save_bits"] if metrics["config"]["save_bits"] in metrics["bits"] else metrics["bits"][0]
    fig = Figure(figsize=(3.6 * len(gammas), 5.0))
    axes = fig.subplots(2, len(gammas), squeeze=False)
    beta_f = metrics["config"]["beta"]
    for c, g in enumerate(gammas):
        ax, axw = axes[0][c], axes[1][c]
        sel = hv[(hv["gamma"] == g) & (hv["bits"] == b)] if not hv.empty else hv
        if sel.empty:
            ax.text(0.5, 0.5, "no HomoVar run", ha="center", transform=ax.transAxes)
            continue
        counts = np.array(sel["counts"].iloc[0], dtype=float)
        x = np.arange(counts.size)
        lb = np.nanmean(np.array(sel["n_lb"].to_list(), dtype=float), axis=0)
        ub = np.nanmean(np.array(sel["n_ub"].to_list(), dtype=float), axis=0)
        beta = np.nanmean(np.array(sel["beta"].to_list(), dtype=float), axis=0)
        w = np.nanmean(np.array(sel["weights"].to_list(), dtype=float), axis=0)
        frac = float(np.nanmean([f[0] for f in sel["fraction_out"]]))
        ax.fill_between(x, lb, ub, color="tab:green", alpha=0.2, label="[n_lb, n_ub]")
        ax.plot(x, lb, color="tab:green", lw=1, marker="v", ms=3)
        ax.plot(x, ub, color="tab:green", lw=1, marker="^", ms=3)
        ax.plot(x, counts, color="k", marker="o", ms=4, lw=0, label="n_k (training)")
        ax.set_yscale("log")
        ax.set_title(f"γ = {_gkey(g)}, W{b}A{b}: {100 * frac:.0f} % of classes out", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        _class_ticks(ax, metrics, g)
        out = ~np.isclose(beta, beta_f, rtol=0, atol=1e-12)
        axw.bar(x, w, color=np.where(out, "tab:red", "tab:green"))
        axw.set_xticks(x)
        axw.grid(alpha=0.3, axis="y")
        axw.set_xlabel("class rank (head → tail)", fontsize=8)
        if c == 0:
            ax.set_ylabel("class size (log)")
            axw.set_ylabel("class weight w_k")
            ax.legend(fontsize=7, loc="lower left")
    fig.suptitle("HomoVar: Levene size bounds and class weights (last epoch, mean over steps and seeds); "
                 "red = β_k ≠ β_f in some step", fontsize=9)
    fig.tight_layout()
    return fig
