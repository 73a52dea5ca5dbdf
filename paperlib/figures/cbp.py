"""Figures of the CBP notebook (spec §4 logs, paper Figure 1); each is a pure function of ``metrics.json``.

The curves show the first seed's run of each set and variant on the first architecture; the accuracy figure
shows every seed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

from . import register_figure

NOTEBOOK = "cbp"
SET_LABELS = {"bin": "binary", "ter": "ternary", "1bit": "1-bit shift", "2bit": "2-bit shift"}
VARIANT_LABELS = {"cbp": "CBP", "no_window": "CBP without window", "ste": "plain STE (λ ≡ 0)"}
COLORS = {"cbp": "#1f77b4", "no_window": "#d62728", "ste": "#7f7f7f"}
FACTORS = {"bin": (-1.0, 1.0), "ter": (-1.0, 0.0, 1.0), "1bit": (-1.0, -0.5, 0.0, 0.5, 1.0),
           "2bit": (-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0)}


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


@register_figure(NOTEBOOK, "cbp_lambda_cfs")
def lambda_cfs(metrics: dict[str, Any]) -> Figure:
    """Per set: λ mean (solid) and max (dashed) over periods, and the scale-free CFS = mean dist(w, Q)/s
    (log scale); triangles mark the periods that ended with an event (CBP run)."""
    sets = metrics["sets"]
    fig = Figure(figsize=(3.1 * len(sets), 5.4))
    axes = fig.subplots(2, len(sets), squeeze=False, sharex="col")
    for j, mode in enumerate(sets):
        ax_l, ax_c = axes[0][j], axes[1][j]
        for v in _variants(metrics, mode, ("cbp", "no_window", "ste")):
            h = _first_run(metrics, mode, v)
            x = [e["epoch"] + 1 for e in h]
            if v != "ste":
                ax_l.plot(x, [e["cbp_lambda_mean"] for e in h], color=COLORS[v], label=f"{VARIANT_LABELS[v]} mean")
                ax_l.plot(x, [e["cbp_lambda_max"] for e in h], color=COLORS[v], ls="--", lw=1,
                          label=f"{VARIANT_LABELS[v]} max")
            c0 = metrics["projected"][metrics["archs"][0]][mode]["cfs_scale_free"]
            ax_c.plot([0, *x], [c0, *[e["cbp_cfs_scale_free"] for e in h]], color=COLORS[v], label=VARIANT_LABELS[v])
        h = _first_run(metrics, mode, "cbp")
        if h is not None:
            ev = _events(h)
            lam = {e["epoch"] + 1: e["cbp_lambda_mean"] for e in h}
            ax_l.plot(ev, [lam[p] for p in ev], "v", color=COLORS["cbp"], ms=4, label="event (CBP)")
            for p in ev:
                ax_c.axvline(p, color=COLORS["cbp"], alpha=0.15, lw=0.8)
        ax_l.set_title(SET_LABELS[mode])
        ax_c.set_yscale("log")
        ax_c.set_xlabel("period")
        for ax in (ax_l, ax_c):
            ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("λ")
    axes[1][0].set_ylabel("CFS / (2s)  (log)")
    axes[0][-1].legend(fontsize=6, loc="upper left")
    axes[1][-1].legend(fontsize=6, loc="lower left")
    fig.suptitle(f"Multipliers and constraint failure per period ({_title(metrics)}); shaded: events", fontsize=9)
    fig.tight_layout()
    return fig


@register_figure(NOTEBOOK, "cbp_g_schedule")
def g_schedule(metrics: dict[str, Any]) -> Figure:
    """g after each period for the CBP run of every set (step plot, events marked) and the weight lr."""
    fig = Figure(figsize=(6.2, 3.4))
    ax = fig.add_subplot()
    ax2 = ax.twinx()
    lr_drawn = False
    for k, mode in enumerate(metrics["sets"]):
        h = _first_run(metrics, mode, "cbp")
        if h is None:
            continue
        x = [0] + [e["epoch"] + 1 for e in h]
        g = [1] + [e["cbp_g"] for e in h]
        color = f"C{k}"
        ax.step(x, g, where="post", color=color, label=SET_LABELS[mode])
        ev = _events(h)
        gmap = dict(zip(x, g, strict=True))
        ax.plot(ev, [gmap[p] for p in ev], "o", color=color, ms=3)
        if not lr_drawn:
            ax2.step([e["epoch"] for e in h] + [h[-1]["epoch"] + 1], [e["lr"] for e in h] + [h[-1]["lr"]],
                     where="post", color="black", ls=":", lw=1)
            lr_drawn = True
    ax.set_yscale("log")
    ax.set_yticks([1, 2, 5, 10, 20, 50, 100])
    ax.set_yticklabels(["1", "2", "5", "10", "20", "50", "100"])
    ax.set_xlabel("period")
    ax.set_ylabel("window parameter g (log)")
    ax2.set_yscale("log")
    ax2.set_ylabel("weight lr (dotted)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(f"g schedule 1…10, 20, 30, … and the single lr drop at g = 20 ({_title(metrics)})", fontsize=8)
    fig.tight_layout()
    return fig


@register_figure(NOTEBOOK, "cbp_weight_histograms")
def weight_histograms(metrics: dict[str, Any]) -> Figure:
    """Per set, histograms of all constrained latent weights in units of their layer's s: the pretrained net
    (filled grey, before) and after post-training per variant (lines); dotted lines are the levels."""
    arch = metrics["archs"][0]
    hist = metrics["histograms"]
    edges = np.linspace(-hist["range"], hist["range"], hist["bins"] + 1)
    sets = metrics["sets"]
    fig = Figure(figsize=(3.2 * len(sets), 3.0))
    axes = fig.subplots(1, len(sets), squeeze=False, sharey=True)[0]
    for ax, mode in zip(axes, sets, strict=True):
        c = np.asarray(hist["before"][arch][mode], dtype=float)
        ax.stairs(np.maximum(c / c.sum(), 1e-6), edges, baseline=1e-6, fill=True, color="#cccccc",
                  label="pretrained (before)")
        for v in ("ste", "cbp", "no_window"):
            counts = hist["after"][arch].get(mode, {}).get(v)
            if counts is not None:
                c = np.asarray(counts, dtype=float)
                ax.stairs(np.maximum(c / c.sum(), 1e-6), edges, baseline=None, color=COLORS[v], lw=1,
                          label=f"after {VARIANT_LABELS[v]}")
        for f in FACTORS[mode]:
            ax.axvline(f, color="black", ls=":", lw=0.7)
        ax.set_yscale("log")
        ax.set_ylim(1e-5, 1)
        ax.set_title(SET_LABELS[mode], fontsize=9)
        ax.set_xlabel("w / s")
    axes[0].set_ylabel("fraction of weights (log)")
    axes[-1].legend(fontsize=6, loc="lower center")
    fig.suptitle(f"Latent weights before/after post-training ({_title(metrics)}); end bins hold |w/s| ≥ "
                 f"{hist['range']:g}", fontsize=9)
    fig.tight_layout()
    return fig


@register_figure(NOTEBOOK, "cbp_constraint_function")
def constraint_function(metrics: dict[str, Any]) -> Figure:
    """Paper Figure 1: cs(w; Q, g) for binary and ternary sets (s = 1) at g = 2 and 10, windows shaded."""
    data = metrics["figure1"]
    modes = list(data)
    gs = list(data[modes[0]]["g"])
    fig = Figure(figsize=(3.0 * len(gs), 2.4 * len(modes)))
    axes = fig.subplots(len(modes), len(gs), squeeze=False)
    for i, mode in enumerate(modes):
        for j, g in enumerate(gs):
            ax = axes[i][j]
            d = data[mode]["g"][g]
            for a, b in d["windows"]:
                if b > a:
                    ax.axvspan(a, b, color="#2ca02c", alpha=0.2, lw=0)
            ax.plot(data[mode]["w"], d["cs"], color="black", lw=1.2)
            for q in data[mode]["levels"]:
                ax.axvline(q, color="gray", ls=":", lw=0.7)
            ax.set_title(f"{SET_LABELS.get(mode, mode)}, g = {g}", fontsize=9)
            ax.set_xlabel("w / s")
            ax.set_ylabel("cs(w)")
            ax.grid(alpha=0.3)
    fig.suptitle("Constraint function cs(w; Q, g); shaded: unconstrained windows U_i(g) (paper Fig. 1)", fontsize=9)
    fig.tight_layout()
    return fig


@register_figure(NOTEBOOK, "cbp_accuracy")
def accuracy(metrics: dict[str, Any]) -> Figure:
    """Test top-1 per set and variant: one dot per seed, mean ± 95 % CI; dashed: the FP network."""
    arch = metrics["archs"][0]
    sets = metrics["sets"]
    variants = [v for v in ("ste", "cbp", "no_window") if v in metrics["variants"]]
    summary = {(s["mode"], s["variant"]): s for s in metrics["summary"] if s["arch"] == arch}
    fig = Figure(figsize=(1.2 + 1.5 * len(sets), 3.4))
    ax = fig.add_subplot()
    step = 0.8 / max(len(variants), 1)
    for k, v in enumerate(variants):
        for i, mode in enumerate(sets):
            x = i - 0.4 + step * (k + 0.5)
            vals = [100 * r["top1"] for r in metrics["per_seed"]
                    if r["arch"] == arch and r["mode"] == mode and r["variant"] == v]
            if not vals:
                continue
            ax.plot([x] * len(vals), vals, "o", color=COLORS[v], ms=3.5, alpha=0.6,
                    label=VARIANT_LABELS[v] if i == 0 else None)
            s = summary[(mode, v)]
            ci = s["top1_ci"]
            ax.errorbar([x], [100 * s["top1_mean"]], yerr=[[0.0 if ci is None or np.isnan(ci) else 100 * ci]],
                        fmt="_", color="black", ms=10, capsize=3, lw=1)
    ax.axhline(100 * metrics["fp"][arch]["top1"], color="black", ls="--", lw=1, label="full precision")
    ax.set_xticks(range(len(sets)))
    ax.set_xticklabels([SET_LABELS[m] for m in sets])
    ax.set_ylabel("test top-1 (%)")
    lows = [100 * r["top1"] for r in metrics["per_seed"] if r["arch"] == arch]
    ax.set_ylim(max(0.0, min(lows) - 5), 100.5)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=6, loc="lower left")
    ax.set_title(f"Post-training accuracy per set ({metrics['archs'][0]}, {metrics['dataset']}, "
                 f"{len(metrics['seeds'])} seed{'s' if len(metrics['seeds']) != 1 else ''})", fontsize=9)
    fig.tight_layout()
    return fig
