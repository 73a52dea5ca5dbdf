"""Figures of the CBP notebook (paper Figure 1 and the per-period logs); each is a pure function of
``metrics.json``.

The curves show the first seed's run of each set and variant on the first architecture; the accuracy and
per-class figures show every seed. Sized for a slide: axis labels with units, legends outside the axes, text
at 8 pt or more.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ..claims import mean_interval
from . import register_figure

NOTEBOOK = "cbp"
SET_LABELS = {"bin": "binary", "ter": "ternary", "1bit": "1-bit shift", "2bit": "2-bit shift"}
VARIANT_LABELS = {"cbp": "CBP", "no_window": "CBP without window", "ste": "plain STE (λ ≡ 0)"}
COLORS = {"cbp": "#1f77b4", "no_window": "#d62728", "ste": "#7f7f7f"}
FACTORS = {"bin": (-1.0, 1.0), "ter": (-1.0, 0.0, 1.0), "1bit": (-1.0, -0.5, 0.0, 0.5, 1.0),
           "2bit": (-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0)}
FONT = 9


def _first_run(metrics: dict[str, Any], mode: str, variant: str) -> list[dict[str, Any]] | None:
    arch, seed = metrics["archs"][0], metrics["seeds"][0]
    return metrics["history"].get(f"{arch}/{mode}/{variant}/seed{seed}")


def _variants(metrics: dict[str, Any], mode: str, names: tuple[str, ...]) -> list[str]:
    return [v for v in names if _first_run(metrics, mode, v) is not None]


def _events(h: list[dict[str, Any]]) -> list[int]:
    return [e["epoch"] + 1 for e in h if e["cbp_event"]]


def _title(metrics: dict[str, Any]) -> str:
    n = len(metrics["seeds"])
    return f"{metrics['archs'][0]} on {metrics['dataset']}, seed {metrics['seeds'][0]} of {n}"


def _period_label(metrics: dict[str, Any]) -> str:
    steps = metrics["config"].get("period_steps", 0)
    return f"period ({steps} mini-batches each)" if steps else "period (one pass over the training data)"


def _missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


@register_figure(NOTEBOOK, "cbp_lambda_cfs")
def lambda_cfs(metrics: dict[str, Any]) -> Figure:
    """Per set: λ mean (solid) and max (dashed) over periods, and the scale-free CFS = mean dist(w, Q)/s
    (log scale); triangles mark the periods that ended with an event (CBP run), thin verticals too."""
    sets = metrics["sets"]
    fig = Figure(figsize=(3.3 * len(sets) + 0.6, 6.2), layout="constrained")
    axes = fig.subplots(2, len(sets), squeeze=False, sharex="col")
    handles: dict[str, Any] = {}
    for j, mode in enumerate(sets):
        ax_l, ax_c = axes[0][j], axes[1][j]
        for v in _variants(metrics, mode, ("cbp", "no_window", "ste")):
            h = _first_run(metrics, mode, v)
            x = [e["epoch"] + 1 for e in h]
            if v != "ste":
                handles[f"λ mean, {VARIANT_LABELS[v]}"], = ax_l.plot(x, [e["cbp_lambda_mean"] for e in h],
                                                                     color=COLORS[v])
                handles[f"λ max, {VARIANT_LABELS[v]}"], = ax_l.plot(x, [e["cbp_lambda_max"] for e in h],
                                                                    color=COLORS[v], ls="--", lw=1)
            c0 = metrics["projected"][metrics["archs"][0]][mode]["cfs_scale_free"]
            handles[f"CFS, {VARIANT_LABELS[v]}"], = ax_c.plot(
                [0, *x], [c0, *[e["cbp_cfs_scale_free"] for e in h]], color=COLORS[v], lw=1.5)
        h = _first_run(metrics, mode, "cbp")
        if h is not None:
            ev = _events(h)
            lam = {e["epoch"] + 1: e["cbp_lambda_mean"] for e in h}
            handles["event (CBP run)"], = ax_l.plot(ev, [lam[p] for p in ev], "v", color=COLORS["cbp"], ms=5)
            for p in ev:
                ax_c.axvline(p, color=COLORS["cbp"], alpha=0.15, lw=0.8)
        ax_l.set_title(SET_LABELS[mode], fontsize=FONT + 1)
        ax_c.set_yscale("log")
        ax_c.set_xlabel(_period_label(metrics), fontsize=FONT)
        for ax in (ax_l, ax_c):
            ax.grid(alpha=0.3)
            ax.tick_params(which="both", labelsize=FONT - 1)
    axes[0][0].set_ylabel("multiplier λ (per weight)", fontsize=FONT)
    axes[1][0].set_ylabel("CFS / (2s): mean distance to\nnearest level, units of s (log)", fontsize=FONT)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=min(4, len(handles)),
               fontsize=FONT - 1, frameon=False)
    fig.suptitle(f"Multipliers and constraint failure per period ({_title(metrics)})", fontsize=FONT + 1)
    return fig


@register_figure(NOTEBOOK, "cbp_g_schedule")
def g_schedule(metrics: dict[str, Any]) -> Figure:
    """g after each period for the CBP run of every set (step plot, events marked) and the weight lr."""
    fig = Figure(figsize=(7.0, 4.0), layout="constrained")
    ax = fig.add_subplot()
    ax2 = ax.twinx()
    lr_drawn = False
    handles = []
    n_sets = len(metrics["sets"])
    for k, mode in enumerate(metrics["sets"]):
        h = _first_run(metrics, mode, "cbp")
        if h is None:
            continue
        x = [0] + [e["epoch"] + 1 for e in h]
        g = [1] + [e["cbp_g"] for e in h]
        color = f"C{k}"
        # wider lines first, so that sets with the same schedule stay visible on top of each other
        line, = ax.step(x, g, where="post", color=color, lw=1.2 + 1.4 * (n_sets - 1 - k),
                        label=f"g, {SET_LABELS[mode]}")
        handles.append(line)
        ev = _events(h)
        gmap = dict(zip(x, g, strict=True))
        ax.plot(ev, [gmap[p] for p in ev], "o", color=color, ms=3.5)
        if not lr_drawn:
            lr_line, = ax2.step([e["epoch"] for e in h] + [h[-1]["epoch"] + 1], [e["lr"] for e in h] + [h[-1]["lr"]],
                                where="post", color="black", ls=":", lw=1.2, label="weight lr (right axis)")
            handles.append(lr_line)
            lr_drawn = True
    ax.set_yscale("log")
    ax.set_yticks([1, 2, 5, 10, 20, 50, 100])
    ax.set_yticklabels(["1", "2", "5", "10", "20", "50", "100"])
    ax.set_xlabel(_period_label(metrics), fontsize=FONT)
    ax.set_ylabel("window parameter g (log; dots: events)", fontsize=FONT)
    ax2.set_yscale("log")
    ax2.set_ylabel("SGD learning rate of the weights (log)", fontsize=FONT)
    ax.grid(alpha=0.3)
    ax.tick_params(which="both", labelsize=FONT - 1)
    ax2.tick_params(which="both", labelsize=FONT - 1)
    fig.legend(handles=handles, loc="outside lower center", ncol=min(5, len(handles)), fontsize=FONT - 1,
               frameon=False)
    fig.suptitle(f"g schedule 1…10, 20, 30, … and the single lr drop at g = 20\n({_title(metrics)})",
                 fontsize=FONT + 1)
    return fig


@register_figure(NOTEBOOK, "cbp_weight_histograms")
def weight_histograms(metrics: dict[str, Any]) -> Figure:
    """Per set, histograms of all constrained latent weights in units of their layer's s: the pretrained net
    (filled grey, before) and after post-training per variant (lines); dotted lines are the levels."""
    arch = metrics["archs"][0]
    hist = metrics["histograms"]
    edges = np.linspace(-hist["range"], hist["range"], hist["bins"] + 1)
    sets = metrics["sets"]
    fig = Figure(figsize=(3.4 * len(sets) + 0.6, 3.9), layout="constrained")
    axes = fig.subplots(1, len(sets), squeeze=False, sharey=True)[0]
    handles: dict[str, Any] = {}
    for ax, mode in zip(axes, sets, strict=True):
        c = np.asarray(hist["before"][arch][mode], dtype=float)
        handles["pretrained (before post-training)"] = ax.stairs(np.maximum(c / c.sum(), 1e-6), edges,
                                                                 baseline=1e-6, fill=True, color="#cccccc")
        for v in ("ste", "cbp", "no_window"):
            counts = hist["after"][arch].get(mode, {}).get(v)
            if counts is not None:
                c = np.asarray(counts, dtype=float)
                handles[f"after {VARIANT_LABELS[v]}"] = ax.stairs(np.maximum(c / c.sum(), 1e-6), edges,
                                                                  baseline=None, color=COLORS[v], lw=1.2)
        for f in FACTORS[mode]:
            handles["levels Q / s"] = ax.axvline(f, color="black", ls=":", lw=0.8)
        ax.set_yscale("log")
        ax.set_ylim(1e-5, 1)
        ax.set_title(SET_LABELS[mode], fontsize=FONT + 1)
        ax.set_xlabel("latent weight w / s (s = layer scale)", fontsize=FONT)
        ax.tick_params(labelsize=FONT - 1)
    axes[0].set_ylabel("fraction of weights per bin (log)", fontsize=FONT)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=min(5, len(handles)),
               fontsize=FONT - 1, frameon=False)
    fig.suptitle(f"Latent weights before/after post-training ({_title(metrics)}); the end bins hold "
                 f"|w/s| ≥ {hist['range']:g}", fontsize=FONT + 1)
    return fig


@register_figure(NOTEBOOK, "cbp_constraint_function")
def constraint_function(metrics: dict[str, Any]) -> Figure:
    """Paper Figure 1: cs(w; Q, g) for binary and ternary sets (s = 1) at g = 2 and 10, windows shaded."""
    data = metrics["figure1"]
    modes = list(data)
    gs = list(data[modes[0]]["g"])
    fig = Figure(figsize=(3.4 * len(gs) + 0.4, 2.7 * len(modes) + 0.6), layout="constrained")
    axes = fig.subplots(len(modes), len(gs), squeeze=False)
    handles: dict[str, Any] = {}
    for i, mode in enumerate(modes):
        for j, g in enumerate(gs):
            ax = axes[i][j]
            d = data[mode]["g"][g]
            for a, b in d["windows"]:
                if b > a:
                    handles["unconstrained window U_i(g)"] = ax.axvspan(a, b, color="#2ca02c", alpha=0.2, lw=0)
            handles["cs(w; Q, g)"], = ax.plot(data[mode]["w"], d["cs"], color="black", lw=1.3)
            for q in data[mode]["levels"]:
                handles["levels Q"] = ax.axvline(q, color="gray", ls=":", lw=0.8)
            ax.set_title(f"{SET_LABELS.get(mode, mode)}, g = {g}", fontsize=FONT + 1)
            ax.set_xlabel("weight w (units of s)", fontsize=FONT)
            ax.set_ylabel("cs(w) (units of s)", fontsize=FONT)
            ax.tick_params(labelsize=FONT - 1)
            ax.grid(alpha=0.3)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=3, fontsize=FONT - 1,
               frameon=False)
    fig.suptitle("Constraint function cs(w; Q, g) (paper Figure 1, s = 1)", fontsize=FONT + 1)
    return fig


@register_figure(NOTEBOOK, "cbp_accuracy")
def accuracy(metrics: dict[str, Any]) -> Figure:
    """Test top-1 per set and variant: one dot per seed, mean ± 95 % CI; the projected pretrained net with
    re-estimated BN statistics (diamond) and the FP network (dashed)."""
    arch = metrics["archs"][0]
    sets = metrics["sets"]
    variants = [v for v in ("ste", "cbp", "no_window") if v in metrics["variants"]]
    fig = Figure(figsize=(1.6 + 1.8 * len(sets), 4.2), layout="constrained")
    ax = fig.add_subplot()
    step = 0.8 / (len(variants) + 1)
    handles: dict[str, Any] = {}
    lows = []
    for i, mode in enumerate(sets):
        p = metrics["projected"][arch][mode].get("top1_bn")
        if not _missing(p):
            handles["projected + BN re-estimated (no training)"], = ax.plot(
                [i - 0.4 + step * 0.5], [100 * p], "D", color="#2ca02c", ms=5)
            lows.append(100 * p)
        for k, v in enumerate(variants):
            x = i - 0.4 + step * (k + 1.5)
            vals = [100 * r["top1"] for r in metrics["per_seed"]
                    if r["arch"] == arch and r["mode"] == mode and r["variant"] == v]
            if not vals:
                continue
            lows.extend(vals)
            handles[VARIANT_LABELS[v]], = ax.plot([x] * len(vals), vals, "o", color=COLORS[v], ms=4, alpha=0.6)
            m, lo, hi, n = mean_interval(vals)
            err = [[m - lo], [hi - m]] if n >= 2 else [[0.0], [0.0]]
            handles["mean, 95 % CI over seeds"] = ax.errorbar([x], [m], yerr=err, fmt="_", color="black", ms=12,
                                                              capsize=3, lw=1)
    handles["full precision"] = ax.axhline(100 * metrics["fp"][arch]["top1"], color="black", ls="--", lw=1)
    ax.set_xticks(range(len(sets)))
    ax.set_xticklabels([SET_LABELS[m] for m in sets], fontsize=FONT)
    ax.set_xlabel("weight set", fontsize=FONT)
    ax.set_ylabel("test top-1 (%)", fontsize=FONT)
    ax.tick_params(labelsize=FONT - 1)
    ax.set_ylim(max(0.0, min(lows, default=90) - 3), 100.5)
    ax.grid(axis="y", alpha=0.3)
    fig.legend(list(handles.values()), list(handles), loc="outside right center", fontsize=FONT - 1, frameon=False)
    n = len(metrics["seeds"])
    naive = {f"{100 * metrics['projected'][arch][m]['top1']:.1f} %" for m in sets}
    ax.set_title(f"Post-training accuracy per set ({arch}, {metrics['dataset']}, {n} seed{'s' if n != 1 else ''});"
                 f"\nprojected without BN re-estimation: {', '.join(sorted(naive))} (off the axis)", fontsize=FONT)
    return fig


ROW_COLORS = {"full precision": "black", "projected": "#ff7f0e", "projected + BN": "#2ca02c",
              **{label: COLORS[v] for v, label in VARIANT_LABELS.items()}}
#: Up to this many classes the per-class figure is an annotated heatmap; beyond (ImageNet), sorted curves.
HEATMAP_MAX_CLASSES = 20


def _column_means(runs: list[list[Any]]) -> list[float]:
    """Mean over runs of each class's accuracy, ignoring missing values (NaN where a class has none)."""
    arr = np.array([[np.nan if _missing(a) else float(a) for a in r] for r in runs], dtype=float)
    count = np.sum(~np.isnan(arr), axis=0)
    total = np.nansum(arr, axis=0)
    return [float(t / c) if c else math.nan for t, c in zip(total, count, strict=True)]


def _per_class_rows(metrics: dict[str, Any], mode: str) -> list[tuple[str, list[float]]]:
    """``(label, per-class accuracy in %)`` for the FP net, the projected net (as is, with BN re-estimated) and
    each variant (mean over seeds) on ``mode``."""
    arch = metrics["archs"][0]
    p = metrics["projected"][arch][mode]
    rows: list[tuple[str, list[Any]]] = [("full precision", metrics["fp"][arch]["per_class_accuracy"]),
                                         ("projected", p["per_class_accuracy"])]
    if p.get("per_class_accuracy_bn"):
        rows.append(("projected + BN", p["per_class_accuracy_bn"]))
    for v in ("ste", "cbp", "no_window"):
        runs = [r["per_class_accuracy"] for r in metrics["per_seed"] if r["arch"] == arch and r["mode"] == mode
                and r["variant"] == v and r.get("per_class_accuracy")]
        if runs:
            rows.append((f"{VARIANT_LABELS[v]} (n = {len(runs)})", _column_means(runs)))
    return [(name, [math.nan if _missing(a) else 100 * float(a) for a in r]) for name, r in rows]


@register_figure(NOTEBOOK, "cbp_per_class")
def per_class(metrics: dict[str, Any]) -> Figure:
    """Per set, the test accuracy of every class (%, mean over seeds; one row per network): the FP net, the
    projected net as is and with BN statistics re-estimated, and each post-training variant. An annotated
    heatmap up to :data:`HEATMAP_MAX_CLASSES` classes; beyond, each network's per-class accuracies sorted."""
    arch = metrics["archs"][0]
    sets = metrics["sets"]
    fp = metrics["fp"][arch]
    if "per_class_accuracy" not in fp:  # a run recorded before per-class numbers were stored
        fig = Figure(figsize=(4, 1))
        fig.text(0.5, 0.5, "no per-class numbers in this run", ha="center", va="center")
        return fig
    k = len(fp["per_class_accuracy"])
    heatmap = k <= HEATMAP_MAX_CLASSES
    cols = 2 if len(sets) > 1 else 1
    nrows = math.ceil(len(sets) / cols)
    width = 0.62 * k * cols + 3.2 if heatmap else 5.0 * cols + 2.5
    fig = Figure(figsize=(width, 3.0 * nrows + 0.9), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False)
    image, handles = None, {}
    for idx, mode in enumerate(sets):
        ax = axes[idx // cols][idx % cols]
        rows = _per_class_rows(metrics, mode)
        ax.set_title(SET_LABELS[mode], fontsize=FONT + 1)
        ax.tick_params(labelsize=FONT - 1)
        if not heatmap:
            for name, acc in rows:
                label = name.split(" (n =")[0]
                vals = np.sort(np.array([a for a in acc if not math.isnan(a)]))[::-1]
                handles[label], = ax.plot(np.arange(1, len(vals) + 1), vals, color=ROW_COLORS[label], lw=1.3)
            ax.set_xlabel("class rank (classes sorted by their accuracy)", fontsize=FONT)
            ax.set_ylabel("test accuracy of the class (%)", fontsize=FONT)
            ax.set_ylim(-2, 102)
            ax.grid(alpha=0.3)
            continue
        grid = np.array([acc for _, acc in rows], dtype=float)
        image = ax.imshow(grid, cmap="viridis", vmin=80, vmax=100, aspect="auto")
        for (i, j), val in np.ndenumerate(grid):
            if not np.isnan(val):
                ax.text(j, i, f"{val:.0f}", ha="center", va="center", fontsize=FONT - 1,
                        color="white" if val < 92 else "black")
        ax.set_yticks(range(len(rows)), [name for name, _ in rows], fontsize=FONT - 1)
        ax.set_xticks(range(k), [str(c) for c in range(k)], fontsize=FONT - 1)
        ax.set_xlabel(f"{metrics['dataset']} class", fontsize=FONT)
    for idx in range(len(sets), nrows * cols):
        axes[idx // cols][idx % cols].set_visible(False)
    if image is not None:
        bar = fig.colorbar(image, ax=axes, shrink=0.8, extend="min")
        bar.set_label("class accuracy (%; ≤ 80 % darkest)", fontsize=FONT)
        bar.ax.tick_params(labelsize=FONT - 1)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=min(6, len(handles)),
                   fontsize=FONT - 1, frameon=False)
    fig.suptitle(f"Per-class test accuracy ({arch}, {metrics['dataset']}; post-trained rows: mean over seeds)",
                 fontsize=FONT + 1)
    return fig
