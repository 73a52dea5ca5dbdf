"""Figures of the DGMS notebook (spec papers/dgms.md): pure functions of its ``metrics.json``.

Everything drawn here was recorded by :func:`paperlib.dgms.run_dgms`: per-seed accuracies, weight
histograms with the mixtures before and after training, mu trajectories, the S(w)/P(w) curves and the
per-layer boundary probe. Mixture densities are recomputed from the recorded (mu, sigma, pi~) with numpy.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from . import register_figure

NOTEBOOK = "dgms"
FP32 = "FP32"


def _method_order(df: pd.DataFrame) -> list[str]:
    return [m for m in dict.fromkeys(df["method"]) if m != FP32]


def _short(name: str) -> str:
    return name.replace(" (no training)", "\n(no training)").replace(" (DoReFa)", "\n(DoReFa)")


@register_figure(NOTEBOOK, "dgms_accuracy")
def accuracy(metrics: dict[str, Any]) -> Figure:
    """Hard-assignment top-1 per method and K (one dot per seed, mean with 95 % CI), FP32 as a band;
    the soft network's top-1 of each DGMS run as a hollow marker."""
    df = pd.DataFrame(metrics["per_seed"])
    s = pd.DataFrame(metrics["summary"])
    models = list(dict.fromkeys(df["model"]))
    ks = sorted({int(k) for k in df["K"].dropna() if k}, reverse=True)
    order = _method_order(df)
    fig = Figure(figsize=(1.0 + 0.75 * len(order) * len(ks), 3.0 * len(models) + 0.6))
    axes = fig.subplots(len(models), len(ks), squeeze=False, sharey=True)
    for r, model in enumerate(models):
        for c, k in enumerate(ks):
            ax = axes[r][c]
            fp = s[(s.model == model) & (s.method == FP32)]
            if len(fp):
                m, h = fp.top1_mean.iloc[0] * 100, fp.top1_ci.iloc[0]
                h = 0.0 if h is None or (isinstance(h, float) and math.isnan(h)) else h * 100
                ax.axhspan(m - h, m + h, color="0.85", zorder=0)
                ax.axhline(m, color="0.4", lw=1, ls="--", label="FP32")
            soft_labelled = False
            for i, meth in enumerate(order):
                d = df[(df.model == model) & (df.K == k) & (df.method == meth)]
                if d.empty:
                    continue
                jitter = np.linspace(-0.12, 0.12, len(d)) if len(d) > 1 else np.zeros(1)
                colour = f"C{i}"
                ax.scatter(i + jitter, d.top1 * 100, s=18, color=colour, zorder=3)
                row = s[(s.model == model) & (s.K == k) & (s.method == meth)].iloc[0]
                ci = row.get("top1_ci")
                ci = 0.0 if ci is None or (isinstance(ci, float) and math.isnan(ci)) else ci * 100
                ax.errorbar(i + 0.25, row.top1_mean * 100, yerr=ci, fmt="_", color="black", capsize=3, zorder=4)
                if "soft_top1" in d and d.soft_top1.notna().any():
                    ax.scatter(i + jitter, d.soft_top1 * 100, s=22, facecolors="none", edgecolors=colour, zorder=3,
                               label=None if soft_labelled else "soft network")
                    soft_labelled = True
            ax.set_xticks(range(len(order)))
            ax.set_xticklabels([_short(o) for o in order], rotation=60, ha="right", fontsize=7)
            ax.set_title(f"{model}, K = {k} ({int(math.log2(k))} bit)", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
            if c == 0:
                ax.set_ylabel("test top-1 (%)")
            if r == 0 and c == len(ks) - 1:
                ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(f"DGMS on {metrics['dataset']}: hard-assignment accuracy (filled), soft (hollow)", fontsize=10)
    fig.tight_layout()
    return fig


def _density(x: np.ndarray, mix: dict[str, Any]) -> np.ndarray:
    mu, sigma, pi = (np.asarray(mix[k], dtype=float) for k in ("mu", "sigma", "pi"))
    z = (x[None, :] - mu[:, None]) / sigma[:, None]
    return pi[:, None] * np.exp(-0.5 * z * z) / (sigma[:, None] * math.sqrt(2 * math.pi))


def _hist_panel(ax: Any, edges: list[float], entry: dict[str, Any], title: str) -> None:
    e = np.asarray(edges)
    counts = np.asarray(entry["counts"], dtype=float)
    width = np.diff(e)
    dens = counts / max(counts.sum(), 1) / width
    ax.stairs(dens, e, fill=True, color="0.82")
    x = np.linspace(e[0], e[-1], 400)
    comp = _density(x, entry)
    for j in range(comp.shape[0]):
        ax.plot(x, comp[j], lw=0.8, color="tab:red" if j == 0 else "tab:blue")
    ax.plot(x, comp.sum(0), lw=1.0, color="black", ls=":")
    top = max(float(dens.max()), 1e-12)
    ax.set_ylim(0, 1.15 * min(max(top, float(comp.sum(0).max())), 2.5 * top))
    for j, m in enumerate(entry["mu"]):
        ax.axvline(m, color="tab:red" if j == 0 else "tab:blue", lw=0.6, alpha=0.6, ymax=0.08)
    ax.set_title(title, fontsize=7)
    ax.set_yticks([])
    ax.xaxis.set_major_locator(MaxNLocator(3))
    ax.tick_params(labelsize=6)


@register_figure(NOTEBOOK, "dgms_histograms")
def histograms(metrics: dict[str, Any]) -> Figure:
    """Latent weights of three layers (rows, per K) with the mixture pi~_k N(w; mu_k, sigma_k^2) overlaid:
    at initialisation (FP32 weights, k-means mixture) and after training, per DGMS variant (columns).
    Red: zero component; blue: the others; dotted: their sum. First model, first seed."""
    hist = metrics["histograms"]
    ks = sorted(hist, key=int, reverse=True)
    if not ks:
        return _empty("no histogram data recorded")
    variants = list(hist[ks[0]]["variants"])
    nrows = sum(len(hist[k]["layers"]) for k in ks)
    ncols = 1 + len(variants)
    fig = Figure(figsize=(2.6 * ncols, 1.9 * nrows + 0.6))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    r = 0
    for k in ks:
        h = hist[k]
        for layer in h["layers"]:
            _hist_panel(axes[r][0], h["edges"][layer], h["init"][layer], f"K={k} {layer}: init")
            for c, v in enumerate(variants, start=1):
                entry = h["variants"].get(v, {}).get(layer)
                if entry is None:
                    axes[r][c].set_axis_off()
                    continue
                _hist_panel(axes[r][c], h["edges"][layer], entry, f"after {v}; learned τ={entry['tau']:.3g}")
            axes[r][0].set_ylabel("density", fontsize=6)
            r += 1
    fig.suptitle("Latent weights and the learned mixture, before / after (first seed)", fontsize=10)
    fig.tight_layout()
    return fig


@register_figure(NOTEBOOK, "dgms_mu_trajectories")
def mu_trajectories(metrics: dict[str, Any]) -> Figure:
    """mu_k of the middle probe layer over training (epochs), per K (rows) and variant (columns); each line
    is shown relative to its initial value (mu_k(t) - mu_k(0)), so movements of all K means are comparable."""
    traj = metrics["trajectories"]
    ks = sorted(traj, key=int, reverse=True)
    if not ks:
        return _empty("no trajectory data recorded")
    variants = list(traj[ks[0]])
    fig = Figure(figsize=(3.0 * len(variants), 2.4 * len(ks) + 0.6))
    axes = fig.subplots(len(ks), len(variants), squeeze=False)
    for r, k in enumerate(ks):
        for c, v in enumerate(variants):
            ax = axes[r][c]
            rec = traj[k].get(v)
            if not rec or not rec["mu"]:
                ax.set_axis_off()
                continue
            layers = list(rec["mu"])
            layer = layers[len(layers) // 2]
            mu = np.asarray(rec["mu"][layer], dtype=float)
            t = np.asarray(rec["epoch"], dtype=float)
            for j in range(1, mu.shape[1]):
                ax.plot(t, mu[:, j] - mu[0, j], lw=0.9, color=f"C{(j - 1) % 10}")
            ax.axhline(0, color="0.5", lw=0.6)
            ax.set_title(f"K={k}, {v}\n{layer}", fontsize=8)
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
            ax.tick_params(labelsize=7)
            if r == len(ks) - 1:
                ax.set_xlabel("epoch", fontsize=8)
            if c == 0:
                ax.set_ylabel("μ_k(t) − μ_k(0)", fontsize=8)
    fig.suptitle("Component means over training (first seed; μ_0 = 0 is fixed)", fontsize=10)
    fig.tight_layout()
    return fig


@register_figure(NOTEBOOK, "dgms_soft_vs_hard")
def soft_vs_hard(metrics: dict[str, Any]) -> Figure:
    """S(w) (code: softmax of responsibilities; dashed: of log-responsibilities) and P(w) for tau in
    {0.01, 0.1, 1} on one layer's initial mixture, over that layer's weight histogram."""
    cv = metrics["curves"]
    if not cv:
        return _empty("no S/P curve data recorded")
    taus = list(cv["taus"])
    w = np.asarray(cv["w"], dtype=float)
    fig = Figure(figsize=(3.6 * len(taus), 3.4))
    axes = fig.subplots(1, len(taus), squeeze=False, sharey=True)[0]
    e = np.asarray(cv["edges"], dtype=float)
    counts = np.asarray(cv["counts"], dtype=float)
    for ax, tau in zip(axes, taus, strict=True):
        t = cv["taus"][tau]
        span = float(np.max(np.abs(w)))
        ax2 = ax.twinx()
        ax2.stairs(counts, e, fill=True, color="0.9")
        ax2.set_yticks([])
        ax.set_zorder(ax2.get_zorder() + 1)
        ax.patch.set_visible(False)
        ax.plot(w, w, color="0.7", lw=0.7, ls=":", label="identity")
        ax.step(w, t["P"], where="mid", color="black", lw=1.2, label="P(w), hard")
        ax.plot(w, t["responsibility"], color="tab:orange", lw=1.4,
                label=f"S(w), code ({100 * t['responsibility_soft_frac']:.1f} % soft)")
        ax.plot(w, t["log_responsibility"], color="tab:blue", lw=1.2, ls="--",
                label=f"S(w), log-resp. ({100 * t['log_responsibility_soft_frac']:.1f} % soft)")
        ax.set_xlim(w[0], w[-1])
        ax.set_ylim(-1.05 * span, 1.05 * span)
        ax.set_title(f"τ = {tau}: mean |S − P| = {t['responsibility_mean_abs_gap']:.1e} (code)", fontsize=8)
        ax.set_xlabel("latent weight w", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="upper left")
    axes[0].set_ylabel("shared weight", fontsize=8)
    fig.suptitle(f"Soft vs hard assignment, K = {cv['K']}, layer {cv['layer']} (initial mixture; grey: its weights)",
                 fontsize=10)
    fig.tight_layout()
    return fig


@register_figure(NOTEBOOK, "dgms_boundary")
def boundary(metrics: dict[str, Any]) -> Figure:
    """Per layer (mean over seeds): % of weights whose assignment is not one-hot (max a < 1 - 1e-6) and % that
    get a gradient > 1e-10, for DGMS at initialisation (k-means sigma, tau = 0.01) and after fine-tuning at
    tau = 0.01 (the code); % pruned as orphans by the code's argmax for the empirical (sigma = 0.01) init."""
    p = pd.DataFrame(metrics["probe"])
    if p.empty:
        return _empty("no probe data recorded")
    rows = pd.DataFrame(metrics["per_seed"])
    inits = rows[rows.kind == "dgms_init"].drop_duplicates("method").set_index("init")["method"].to_dict() \
        if "init" in rows else {}
    faithful = [v["name"] for v in metrics["config"]["variants"]
                if v.get("logits", "responsibility") == "responsibility" and float(v.get("tau", 0.01)) == 0.01]
    series = []  # (method, column, label, colour, alpha)
    if "kmeans" in inits:
        series += [(inits["kmeans"], "soft_frac", "soft, init (k-means σ)", "tab:orange", 0.45),
                   (inits["kmeans"], "grad_frac", "|∂L/∂w| > 1e-10, init", "tab:blue", 0.45)]
    if faithful:
        series += [(faithful[0], "soft_frac", f"soft, after {faithful[0]}", "tab:orange", 1.0),
                   (faithful[0], "grad_frac", f"|∂L/∂w| > 1e-10, after {faithful[0]}", "tab:blue", 1.0)]
    if "empirical" in inits:
        series.append((inits["empirical"], "orphan_frac", "orphans pruned, init σ=0.01", "tab:red", 1.0))
    ks = sorted({int(k) for k in p.K}, reverse=True)
    model = p.model.iloc[0]
    fig = Figure(figsize=(10, 2.6 * len(ks) + 0.6))
    axes = fig.subplots(len(ks), 1, squeeze=False)[:, 0]
    width = 0.8 / max(len(series), 1)
    for ax, k in zip(axes, ks, strict=True):
        d = p[(p.model == model) & (p.K == k)]
        layers = list(dict.fromkeys(d.layer))
        x = np.arange(len(layers))
        for j, (method, col, label, colour, alpha) in enumerate(series):
            g = d[d.method == method].groupby("layer")[col].mean()
            vals = [100 * g.get(ly, np.nan) for ly in layers]
            ax.bar(x - 0.4 + (j + 0.5) * width, vals, width=width, color=colour, alpha=alpha, label=label)
        ax.set_xticks(x)
        ax.set_xticklabels(layers, rotation=45, ha="right", fontsize=6)
        ax.set_ylabel("% of layer's weights", fontsize=8)
        ax.set_title(f"{model}, K = {k}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=6, ncol=3)
    fig.suptitle("τ = 0.01 is not hard everywhere: weights near decision boundaries stay soft and get gradients",
                 fontsize=10)
    fig.tight_layout()
    return fig


def _empty(text: str) -> Figure:
    fig = Figure(figsize=(4, 1.5))
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center")
    return fig
