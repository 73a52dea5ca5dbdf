"""Figures of the Levene notebook: pure functions of its ``metrics.json``.

Levene's W is drawn as the geometric mean over seeds with its 95 % interval on the log scale (a positive, skewed
statistic: docs/climbq.md, 'Levene analysis'); every gamma is labelled with its real ratio (max/min count).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from . import register_figure
from .climbq import METHOD_STYLE, MIN_CLASS_SIZE, gamma_text

NOTEBOOK = "levene"
PENULTIMATE = "penultimate"


def _gkey(g: float) -> str:
    return str(int(g)) if float(g).is_integer() else str(g)


def _label(method: str, bits: int) -> str:
    return method if method.startswith("FP32") else f"{method} W{bits}A{bits}"


def _plain_log_axis(ax: Any) -> None:
    """Log-scale y ticks labelled as plain numbers (1, 2, 5, 10, 20, ...), no "6x10^1" minor labels."""
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _w_interval(s: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre, lower and upper bound of W per row: the geometric mean and log-scale interval (the arithmetic
    mean without an interval for runs recorded before those were stored); NaN bounds collapse on the centre."""
    if "W_gmean" in s:
        c = s["W_gmean"].astype(float).to_numpy()
        lo, hi = s["W_lo"].astype(float).to_numpy(), s["W_hi"].astype(float).to_numpy()
    else:
        c = s["W_mean"].astype(float).to_numpy()
        lo, hi = c.copy(), c.copy()
    lo, hi = np.where(np.isfinite(lo), lo, c), np.where(np.isfinite(hi), hi, c)
    return c, lo, hi


@register_figure(NOTEBOOK, "levene_dispersion")
def dispersion_by_class(metrics: dict[str, Any]) -> Figure:
    """Per-class dispersion z (L1 deviation from the class mean, penultimate features, balanced test set)."""
    import seaborn as sns

    rows = []
    for d in metrics["dispersion"]:
        rows.append(pd.DataFrame({"gamma": _gkey(d["gamma"]), "method": _label(d["method"], d["bits"]),
                                  "class": d["labels"], "z": d["z"]}))
    df = pd.concat(rows, ignore_index=True)
    gammas = metrics["gammas"]
    order = [_label(m, metrics["bits"]) for m in metrics["methods"]]
    palette = {_label(m, metrics["bits"]): METHOD_STYLE.get(m, ("k",))[0] for m in metrics["methods"]}
    fig = Figure(figsize=(11, 2.7 * len(gammas) + 0.5))
    axes = fig.subplots(len(gammas), 1, squeeze=False, sharex=True, sharey=True)
    for r, g in enumerate(gammas):
        ax = axes[r][0]
        sns.boxplot(data=df[df["gamma"] == _gkey(g)], x="class", y="z", hue="method", hue_order=order,
                    palette=palette, fliersize=1.5, linewidth=0.7, ax=ax)
        ax.set_ylabel(f"{gamma_text(metrics, g, chr(10))}\ndispersion z", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
        if r == 0:
            ax.legend(fontsize=7, ncol=len(order), loc="upper left")
        elif ax.get_legend() is not None:
            ax.get_legend().remove()
    axes[-1][0].set_xlabel("class rank (0 = head of the training data)")
    seeds = sorted({d["seed"] for d in metrics["dispersion"]})
    fig.suptitle(f"Per-class dispersion of the penultimate features (balanced test set, seed {seeds})", fontsize=9)
    fig.tight_layout()
    return fig


@register_figure(NOTEBOOK, "levene_w_vs_gamma")
def w_vs_gamma(metrics: dict[str, Any]) -> Figure:
    """Levene W (geometric mean, 95 % log-scale interval over seeds) vs gamma per method, penultimate features;
    F* dotted. Right: W per layer (the last blocks' outputs) at the largest gamma. Both panels share the y axis
    (log, plain tick labels), whose limits hold every interval; the legend sits below the panels."""
    s = pd.DataFrame(metrics["summary"])
    gammas = metrics["gammas"]
    pos = {g: i for i, g in enumerate(gammas)}
    fig = Figure(figsize=(10, 4.2))
    ax, ax2 = fig.subplots(1, 2, sharey=True)
    pen = s[s["layer"] == PENULTIMATE]
    nm = len(metrics["methods"])
    lows, highs = [], []
    for k, method in enumerate(metrics["methods"]):
        sel = pen[pen["method"] == method]
        color, ls, marker = METHOD_STYLE.get(method, ("k", "-", "."))
        x = np.array([pos[g] for g in sel["gamma"]]) + (k - (nm - 1) / 2) * 0.07
        c, lo, hi = _w_interval(sel)
        lows.append(lo)
        highs.append(hi)
        ax.errorbar(x, c, yerr=[c - lo, hi - c], color=color, ls=ls, marker=marker, ms=4, capsize=3,
                    label=_label(method, metrics["bits"]))
    fstar = pen.groupby("gamma", sort=False)["F_star"].first()
    ax.plot([pos[g] for g in fstar.index], fstar.to_numpy(), color="k", ls=":", lw=1.2, label="F* (α)")
    ax.set_yscale("log")
    ax.set_xticks(range(len(gammas)))
    ax.set_xticklabels([gamma_text(metrics, g, "\n") for g in gammas], fontsize=8)
    ax.set_xlabel("imbalance ratio γ (real max/min count)")
    ax.set_ylabel("Levene W (log)")
    ax.set_title("penultimate features", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    gmax = max(gammas)
    last = s[s["gamma"] == gmax]
    layers = list(dict.fromkeys(last["layer"]))
    for k, method in enumerate(metrics["methods"]):
        sel = last[last["method"] == method].set_index("layer").reindex(layers)
        color, ls, marker = METHOD_STYLE.get(method, ("k", "-", "."))
        c, lo, hi = _w_interval(sel)
        lows.append(lo)
        highs.append(hi)
        ax2.errorbar(np.arange(len(layers)) + (k - (nm - 1) / 2) * 0.07, c, yerr=[c - lo, hi - c], color=color,
                     ls=ls, marker=marker, ms=4, capsize=3)
    ax2.axhline(float(last["F_star"].iloc[0]), color="k", ls=":", lw=1.2)
    ax2.set_xticks(range(len(layers)))
    ax2.set_xticklabels(layers, fontsize=8)
    ax2.set_xlabel("layer")
    ax2.set_title(f"per layer, {gamma_text(metrics, gmax)}", fontsize=9)
    ax2.grid(alpha=0.3, which="both")
    lo_all = np.concatenate([*lows, fstar.to_numpy()])
    hi_all = np.concatenate([*highs, fstar.to_numpy()])
    lo_all, hi_all = lo_all[np.isfinite(lo_all) & (lo_all > 0)], hi_all[np.isfinite(hi_all)]
    if lo_all.size and hi_all.size:
        ax.set_ylim(float(lo_all.min()) / 1.4, float(hi_all.max()) * 1.4)
    _plain_log_axis(ax)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    n = len(metrics.get("seeds", []))
    fig.suptitle(f"Levene's W: geometric mean and 95 % interval (log scale) over n = {n} seed(s)", fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


@register_figure(NOTEBOOK, "levene_bounds")
def bounds(metrics: dict[str, Any]) -> Figure:
    """HomoVar's class-size bounds n_lb, n_ub on training mini-batches and the actual n_k, log scale.

    Rows: methods; columns: gamma (with its real ratio); all panels share both axes. Per class the mean over
    seeds of the median over batches (NaN-aware), clipped at one image (a bound below one image means nothing);
    the band is drawn where n_lb <= n_ub. n_k is red when it is out of bounds in most batches (the original's
    rule)."""
    pc = pd.DataFrame(metrics["per_class"])
    gammas, methods = metrics["gammas"], metrics["methods"]
    fig = Figure(figsize=(3.3 * len(gammas), 2.2 * len(methods) + 0.9))
    axes = fig.subplots(len(methods), len(gammas), squeeze=False, sharex=True, sharey=True)
    top = MIN_CLASS_SIZE
    for r, method in enumerate(methods):
        for c, g in enumerate(gammas):
            ax = axes[r][c]
            sel = pc[(pc["method"] == method) & (pc["gamma"] == g)].copy()
            for col in ("n_lb", "n_ub", "out_fraction"):
                sel[col] = pd.to_numeric(sel[col], errors="coerce")
            agg = sel.groupby("class").agg(n=("n_train", "first"), lb=("n_lb", "mean"), ub=("n_ub", "mean"),
                                           out=("out_fraction", "mean"))
            x = agg.index.to_numpy()
            lb = np.maximum(agg["lb"].to_numpy(), MIN_CLASS_SIZE)  # NaN stays NaN
            ub = np.maximum(agg["ub"].to_numpy(), MIN_CLASS_SIZE)
            color = METHOD_STYLE.get(method, ("k",))[0]
            ok = np.isfinite(lb) & np.isfinite(ub) & (lb <= ub)
            ax.fill_between(x, np.where(ok, lb, np.nan), np.where(ok, ub, np.nan), color=color, alpha=0.2)
            ax.plot(x, lb, color=color, marker="^", ms=3, lw=1)
            ax.plot(x, ub, color=color, marker="v", ms=3, lw=1)
            outside = (agg["out"] > 0.5).to_numpy()
            n = agg["n"].to_numpy()
            ax.plot(x[~outside], n[~outside], "ko", ms=4, lw=0)
            if outside.any():
                ax.plot(x[outside], n[outside], "o", color="tab:red", ms=4, lw=0)
            finite = np.concatenate([lb[np.isfinite(lb)], ub[np.isfinite(ub)], n.astype(float)])
            top = max(top, float(finite.max()) if finite.size else top)
            ax.set_yscale("log")
            ax.grid(alpha=0.3, which="both")
            ax.set_xticks(x)
            if r == 0:
                ax.set_title(gamma_text(metrics, g), fontsize=9)
            if c == 0:
                ax.set_ylabel(f"{_label(method, metrics['bits'])}\nclass size", fontsize=8)
            if r == len(methods) - 1:
                ax.set_xlabel("class rank", fontsize=8)
    axes[0][0].set_ylim(MIN_CLASS_SIZE / 1.3, top * 1.5 if math.isfinite(top) else None)
    for row in axes:
        for ax in row:
            _plain_log_axis(ax)
    handles = [Line2D([], [], color="0.3", marker="^", ms=4, lw=1, label="n_lb (median over batches)"),
               Line2D([], [], color="0.3", marker="v", ms=4, lw=1, label="n_ub (median over batches)"),
               Patch(color="0.3", alpha=0.2, label="[n_lb, n_ub]"),
               Line2D([], [], color="k", marker="o", ms=4, lw=0, label="n_k, in bounds"),
               Line2D([], [], color="tab:red", marker="o", ms=4, lw=0, label="n_k, out in most batches")]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    b = metrics["climbq_config"]["batch_size"]
    n_seeds = len(metrics.get("seeds", []))
    fig.suptitle(f"HomoVar's Levene size bounds on training mini-batches (B = {b}, dataset counts)\nmedian over "
                 f"batches, mean over n = {n_seeds} seed(s), clipped at 1 image; dots: the actual class sizes",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig
