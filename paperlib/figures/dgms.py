"""Figures of the DGMS notebook (docs/dgms.md): pure functions of its ``metrics.json``.

Everything drawn here was recorded by :func:`paperlib.dgms.run_dgms`: per-seed accuracies, weight
histograms with the mixtures before and after training, mu trajectories, the S(w)/P(w) curves, the
per-layer boundary probe and per-class accuracies. Mixture densities are recomputed from the recorded
(mu, sigma, pi~) with numpy.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from scipy import stats

from . import register_figure

NOTEBOOK = "dgms"
FP32 = "FP32"


def _method_order(df: pd.DataFrame) -> list[str]:
    """Methods with a K (shared networks), in run order: FP32 and the FP32 control have none."""
    with_k = set(df.loc[df["K"].notna() & (df["K"] != 0), "method"])
    return [m for m in dict.fromkeys(df["method"]) if m != FP32 and m in with_k]


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
    fig = Figure(figsize=(1.0 + 0.75 * len(order) * len(ks), 4.4 * len(models) + 0.6))
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


#: a row of histogram panels switches to a log density axis when the mixture's highest peak exceeds the
#: histogram's highest bar by more than this factor (a linear axis would flatten the histogram)
LOG_DENSITY_RATIO = 8.0


def _hist_data(edges: list[float], entry: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(bin edges, histogram density, grid, component densities [K, grid]) of one panel. The grid holds the bin
    edges and every component mean, so no drawn peak is cut off between grid points."""
    e = np.asarray(edges, dtype=float)
    counts = np.asarray(entry["counts"], dtype=float)
    dens = counts / max(counts.sum(), 1) / np.diff(e)
    mu, sigma = np.asarray(entry["mu"], dtype=float), np.abs(np.asarray(entry["sigma"], dtype=float))
    extra = np.concatenate([mu, mu - sigma, mu + sigma])
    x = np.unique(np.concatenate([np.linspace(e[0], e[-1], 1200), extra[(extra >= e[0]) & (extra <= e[-1])]]))
    return e, dens, x, _density(x, entry)


def _hist_panel(ax: Any, edges: list[float], entry: dict[str, Any], title: str, log: bool, ylim: tuple) -> None:
    e, dens, x, comp = _hist_data(edges, entry)
    ax.stairs(dens, e, fill=True, color="0.8")
    for j in range(comp.shape[0]):
        ax.plot(x, comp[j], lw=0.8, color="tab:red" if j == 0 else "tab:blue")
    ax.plot(x, comp.sum(0), lw=1.0, color="black", ls=":")
    for j, m in enumerate(entry["mu"]):
        ax.axvline(m, color="tab:red" if j == 0 else "tab:blue", lw=0.7, alpha=0.7, ymax=0.06)
    if log:
        ax.set_yscale("log")
    ax.set_ylim(*ylim)
    ax.set_xlim(e[0], e[-1])
    ax.set_title(title, fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(4))
    ax.tick_params(labelsize=7)


def _hist_legend_handles() -> list[Any]:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    return [Patch(color="0.8", label="latent weights (histogram)"),
            Line2D([], [], color="tab:red", lw=0.9, label="zero component π̃₀·N(w; 0, σ₀²)"),
            Line2D([], [], color="tab:blue", lw=0.9, label="component k ≥ 1: π̃ₖ·N(w; μₖ, σₖ²)"),
            Line2D([], [], color="black", ls=":", lw=1.0, label="mixture Σₖ π̃ₖ·N(w; μₖ, σₖ²)"),
            Line2D([], [], color="0.3", marker="|", ls="none", markersize=9, label="means μₖ (ticks at the bottom)")]


@register_figure(NOTEBOOK, "dgms_histograms")
def histograms(metrics: dict[str, Any]) -> Figure:
    """Latent weights of one layer (the middle probe layer) with the mixture pi~_k N(w; mu_k, sigma_k^2) overlaid,
    one row per K: at initialisation (FP32 weights, k-means mixture) and after training with each DGMS variant
    (columns). Red: zero component; blue: the others; dotted: their sum; ticks: the means. Axes: weight value
    (dimensionless, as stored in the conv) and probability density per unit of w; a row whose mixture peaks far
    above the histogram uses a log density axis (said in its label). Nothing is clipped. First model and seed."""
    hist = metrics["histograms"]
    ks = sorted(hist, key=int, reverse=True)
    if not ks:
        return _empty("no histogram data recorded")
    variants = list(hist[ks[0]]["variants"])
    ncols = 1 + len(variants)
    fig = Figure(figsize=(2.9 * ncols, 2.5 * len(ks) + 1.3))
    axes = fig.subplots(len(ks), ncols, squeeze=False)
    layer_names = []
    for r, k in enumerate(ks):
        h = hist[k]
        layer = h["layers"][len(h["layers"]) // 2]
        layer_names.append(layer)
        panels = [(h["init"][layer], "initialisation (k-means)")]
        panels += [(h["variants"].get(v, {}).get(layer), f"after {v}") for v in variants]
        datas = [_hist_data(h["edges"][layer], entry) for entry, _ in panels if entry is not None]
        top_hist = max(float(d[1].max()) for d in datas)
        top = max(top_hist, max(float(d[3].sum(0).max()) for d in datas))
        log = top > LOG_DENSITY_RATIO * top_hist
        ylim = (top_hist * 1e-3, top * 2.0) if log else (0.0, top * 1.06)
        for c, (entry, title) in enumerate(panels):
            ax = axes[r][c]
            if entry is None:
                ax.set_axis_off()
                continue
            tau = f", learned τ = {entry['tau']:.3g}" if c else ""
            _hist_panel(ax, h["edges"][layer], entry, f"K = {k}: {title}{tau}", log, ylim)
            if c == 0:
                ax.set_ylabel("density (per unit of w)" + (", log scale" if log else ""), fontsize=8)
            if r == len(ks) - 1:
                ax.set_xlabel("latent weight w (dimensionless)", fontsize=8)
    fig.legend(handles=_hist_legend_handles(), loc="lower center", ncol=3, fontsize=7, frameon=False)
    shown = ", ".join(dict.fromkeys(layer_names))
    fig.suptitle(f"Latent weights and the mixture before / after training, layer {shown} (first seed)", fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 0.97))
    return fig


@register_figure(NOTEBOOK, "dgms_mu_trajectories")
def mu_trajectories(metrics: dict[str, Any]) -> Figure:
    """mu_k of the middle probe layer over training (epochs), per K (rows) and variant (columns); each line
    is shown relative to its initial value (mu_k(t) - mu_k(0)), so movements of all K means are comparable.
    The power of ten of each panel goes into its y label (no offset text over the titles)."""
    traj = metrics["trajectories"]
    ks = sorted(traj, key=int, reverse=True)
    if not ks:
        return _empty("no trajectory data recorded")
    variants = list(traj[ks[0]])
    fig = Figure(figsize=(3.3 * len(variants), 2.5 * len(ks) + 0.8))
    axes = fig.subplots(len(ks), len(variants), squeeze=False)
    shown: list[str] = []
    for r, k in enumerate(ks):
        for c, v in enumerate(variants):
            ax = axes[r][c]
            rec = traj[k].get(v)
            if not rec or not rec["mu"]:
                ax.set_axis_off()
                continue
            layers = list(rec["mu"])
            layer = layers[len(layers) // 2]
            shown.append(layer)
            mu = np.asarray(rec["mu"][layer], dtype=float)
            t = np.asarray(rec["epoch"], dtype=float)
            delta = mu[:, 1:] - mu[0, 1:]
            span = float(np.abs(delta).max()) if delta.size else 0.0
            exp = int(math.floor(math.log10(span))) if span > 0 else 0
            for j in range(delta.shape[1]):
                ax.plot(t, delta[:, j] / 10.0**exp, lw=0.9, color=f"C{j % 10}")
            ax.axhline(0, color="0.5", lw=0.6)
            ax.yaxis.get_major_formatter().set_useOffset(False)
            ax.set_title(f"K = {k}, {v}", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.set_ylabel("μₖ(t) − μₖ(0)" + (f" (× 1e{exp})" if exp else ""), fontsize=8)
            if r == len(ks) - 1:
                ax.set_xlabel("epoch", fontsize=8)
    fig.suptitle("Component means over training, layer " + ", ".join(dict.fromkeys(shown))
                 + " (first seed; μ₀ = 0 is fixed; one line per component k ≥ 1)", fontsize=10)
    fig.tight_layout()
    return fig


PER_CLASS_METHODS = ("FP32", "k-means + BN recal. (no training)", "uniform STE (DoReFa)")


@register_figure(NOTEBOOK, "dgms_per_class")
def per_class(metrics: dict[str, Any]) -> Figure:
    """Per-class test accuracy (%) of FP32, k-means + BN re-estimation, uniform STE and DGMS at tau = 0.01, one
    row per K: mean over seeds with the 95 % t-interval (n = seeds); up to 20 classes as dots per class (the
    tick labels give each class's test count), more as lines over the classes sorted by FP32 accuracy."""
    pc = pd.DataFrame(metrics.get("per_class") or [])
    if pc.empty:
        return _empty("no per-class accuracy recorded")
    faithful = [v["name"] for v in metrics["config"]["variants"]
                if v.get("logits", "responsibility") == "responsibility" and float(v.get("tau", 0.01)) == 0.01]
    methods = [m for m in (*PER_CLASS_METHODS, *faithful[:1]) if m in set(pc.method)]
    ks = sorted({int(k) for k in pc.K.dropna()}, reverse=True) or [0]
    model = pc.model.iloc[0]
    pc = pc[pc.model == model]
    n_cls = len(pc.per_class_accuracy.iloc[0])
    counts = pc.class_counts.iloc[0]
    fig = Figure(figsize=(max(7.0, 0.55 * n_cls + 2) if n_cls <= 20 else 9.0, 2.8 * len(ks) + 0.9))
    axes = fig.subplots(len(ks), 1, squeeze=False)[:, 0]
    fp = pc[pc.method == FP32]
    order = (np.argsort(np.nanmean(np.asarray(fp.per_class_accuracy.to_list(), dtype=float), 0)) if len(fp)
             else np.arange(n_cls))
    for ax, k in zip(axes, ks, strict=True):
        width = 0.8 / max(len(methods), 1)
        for j, meth in enumerate(methods):
            d = pc[(pc.method == meth) & ((pc.K == k) | (pc.method == FP32))]
            if d.empty:
                continue
            acc = 100 * np.asarray(d.per_class_accuracy.to_list(), dtype=float)  # [seeds, classes]; NaN: no image
            n = acc.shape[0]
            mean = np.nanmean(acc, 0)
            half = (stats.t.ppf(0.975, n - 1) * np.nanstd(acc, 0, ddof=1) / math.sqrt(n)) if n > 1 else np.zeros(n_cls)
            label = f"{meth} (n = {n})"
            if n_cls <= 20:
                x = np.arange(n_cls) - 0.4 + (j + 0.5) * width
                ax.errorbar(x, mean, yerr=half, fmt="o", ms=3.5, capsize=2, lw=0.8, color=f"C{j}", label=label)
            else:
                ax.plot(np.arange(n_cls), mean[order], lw=0.8, color=f"C{j}", label=label)
        if n_cls <= 20:
            ax.set_xticks(range(n_cls))
            ax.set_xticklabels([f"{c}\n({counts[c]})" for c in range(n_cls)], fontsize=7)
            ax.set_xlabel("class (test images)", fontsize=8)
        else:
            ax.set_xlabel("class, sorted by FP32 accuracy", fontsize=8)
        ax.set_ylabel("per-class top-1 (%)", fontsize=8)
        ax.set_title(f"{model}, K = {k} ({int(math.log2(k))} bit); FP32 has no K" if k else model, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(labelsize=7)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=7, frameon=False)
    fig.suptitle(f"Per-class accuracy on {metrics['dataset']}: mean over seeds with 95 % t-interval", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
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
