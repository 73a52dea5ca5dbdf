"""Figures of the Levene notebook: pure functions of its ``metrics.json``."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from . import register_figure
from .climbq import METHOD_STYLE

NOTEBOOK = "levene"
PENULTIMATE = "penultimate"


def _gkey(g: float) -> str:
    return str(int(g)) if float(g).is_integer() else str(g)


def _label(method: str, bits: int) -> str:
    return method if method.startswith("FP32") else f"{method} W{bits}A{bits}"


@register_figure(NOTEBOOK, "levene_dispersion")
def dispersion_by_class(metrics: dict[str, Any]) -> Figure:
    """Per-class dispersion z (L1 deviation from the class mean, penultimate features, balanced test set)."""
    import seaborn as sns

    rows = []
    for d in metrics["dispersion"]:
        rows.append(pd.DataFrame({"gamma": _gkey(d["gamma"]), "method": _label(d["method"], d["bits"]),
                                  "class": d["labels"], "z": d["z"]}))
    df = pd.concat(rows, ignore_index=True)
    gammas = [_gkey(g) for g in metrics["gammas"]]
    order = [_label(m, metrics["bits"]) for m in metrics["methods"]]
    palette = {_label(m, metrics["bits"]): METHOD_STYLE.get(m, ("k",))[0] for m in metrics["methods"]}
    fig = Figure(figsize=(11, 2.7 * len(gammas) + 0.5))
    axes = fig.subplots(len(gammas), 1, squeeze=False, sharex=True)
    for r, g in enumerate(gammas):
        ax = axes[r][0]
        sns.boxplot(data=df[df["gamma"] == g], x="class", y="z", hue="method", hue_order=order, palette=palette,
                    fliersize=1.5, linewidth=0.7, ax=ax)
        ax.set_ylabel(f"γ = {g}\ndispersion z")
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
    """Levene W (mean ± 95 % CI over seeds) vs gamma per method, penultimate features; F* dashed.

    Right: W per layer (the last blocks' outputs) at the largest gamma.
    """
    s = pd.DataFrame(metrics["summary"])
    gammas = metrics["gammas"]
    pos = {g: i for i, g in enumerate(gammas)}
    fig = Figure(figsize=(9.5, 3.6))
    ax, ax2 = fig.subplots(1, 2)
    pen = s[s["layer"] == PENULTIMATE]
    for k, method in enumerate(metrics["methods"]):
        sel = pen[pen["method"] == method]
        color, ls, marker = METHOD_STYLE.get(method, ("k", "-", "."))
        x = np.array([pos[g] for g in sel["gamma"]]) + (k - 1.5) * 0.05
        ci = sel["W_ci"].astype(float).fillna(0.0).to_numpy()
        ax.errorbar(x, sel["W_mean"], yerr=ci, color=color, ls=ls, marker=marker, ms=4, capsize=3,
                    label=_label(method, metrics["bits"]))
    fstar = pen.groupby("gamma", sort=False)["F_star"].first()
    ax.plot([pos[g] for g in fstar.index], fstar.to_numpy(), color="k", ls=":", lw=1, label="F* (α)")
    ax.set_yscale("log")
    ax.set_xticks(range(len(gammas)))
    ax.set_xticklabels([_gkey(g) for g in gammas])
    ax.set_xlabel("imbalance ratio γ")
    ax.set_ylabel("Levene W (log)")
    ax.set_title("penultimate features", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    gmax = max(gammas)
    last = s[s["gamma"] == gmax]
    layers = list(dict.fromkeys(last["layer"]))
    for k, method in enumerate(metrics["methods"]):
        sel = last[last["method"] == method].set_index("layer").reindex(layers)
        color, ls, marker = METHOD_STYLE.get(method, ("k", "-", "."))
        ax2.errorbar(np.arange(len(layers)) + (k - 1.5) * 0.05, sel["W_mean"],
                     yerr=sel["W_ci"].astype(float).fillna(0.0), color=color, ls=ls, marker=marker, ms=4,
                     capsize=3)
    ax2.set_yscale("log")
    ax2.set_xticks(range(len(layers)))
    ax2.set_xticklabels(layers, fontsize=8)
    ax2.set_title(f"per layer, γ = {_gkey(gmax)}", fontsize=9)
    ax2.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


@register_figure(NOTEBOOK, "levene_bounds")
def bounds(metrics: dict[str, Any]) -> Figure:
    """HomoVar's class-size bounds n_lb, n_ub on training mini-batches and the actual n_k, log scale.

    Rows: methods; columns: gamma. Per class the mean over seeds of the median over batches (NaN-aware); the
    band is drawn where n_lb <= n_ub. n_k is red when it is out of bounds in most batches (the original's rule).
    """
    pc = pd.DataFrame(metrics["per_class"])
    gammas, methods = metrics["gammas"], metrics["methods"]
    fig = Figure(figsize=(3.3 * len(gammas), 2.2 * len(methods) + 0.7))
    axes = fig.subplots(len(methods), len(gammas), squeeze=False, sharex=True)
    for r, method in enumerate(methods):
        for c, g in enumerate(gammas):
            ax = axes[r][c]
            sel = pc[(pc["method"] == method) & (pc["gamma"] == g)].copy()
            for col in ("n_lb", "n_ub", "out_fraction"):
                sel[col] = pd.to_numeric(sel[col], errors="coerce")
            agg = sel.groupby("class").agg(n=("n_train", "first"), lb=("n_lb", "mean"), ub=("n_ub", "mean"),
                                           out=("out_fraction", "mean"))
            x = agg.index.to_numpy()
            lb, ub = agg["lb"].to_numpy(), agg["ub"].to_numpy()
            color = METHOD_STYLE.get(method, ("k",))[0]
            ok = np.isfinite(lb) & np.isfinite(ub) & (lb <= ub)
            ax.fill_between(x, np.where(ok, lb, np.nan), np.where(ok, ub, np.nan), color=color, alpha=0.2)
            ax.plot(x, lb, color=color, marker="^", ms=3, lw=1, label="n_lb")
            ax.plot(x, ub, color=color, marker="v", ms=3, lw=1, label="n_ub")
            outside = (agg["out"] > 0.5).to_numpy()
            n = agg["n"].to_numpy()
            ax.plot(x[~outside], n[~outside], "ko", ms=4, lw=0, label="n_k in bounds")
            ax.plot(x[outside], n[outside], "o", color="tab:red", ms=4, lw=0, label="n_k out of bounds")
            ax.set_yscale("log")
            ax.grid(alpha=0.3, which="both")
            ax.set_xticks(x)
            if r == 0:
                ax.set_title(f"γ = {_gkey(g)}", fontsize=9)
            if c == 0:
                ax.set_ylabel(f"{_label(method, metrics['bits'])}\nclass size", fontsize=8)
            if r == len(methods) - 1:
                ax.set_xlabel("class rank", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    b = metrics["climbq_config"]["batch_size"]
    fig.suptitle(f"HomoVar's Levene size bounds on training mini-batches (B = {b}, dataset counts; median over "
                 "batches, mean over seeds) vs the actual class sizes", fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig
