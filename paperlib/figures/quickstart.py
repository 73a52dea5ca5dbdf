"""Figures of the quickstart notebook."""

from __future__ import annotations

from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from . import register_figure


@register_figure("00_quickstart", "quickstart_accuracy")
def quickstart_accuracy(metrics: dict[str, Any]) -> Figure:
    """Top-1 per method: one dot per seed, the mean with its 95 % CI."""
    import seaborn as sns

    df = pd.DataFrame(metrics["per_seed"])
    fig = Figure(figsize=(5, 3.2))
    ax = fig.add_subplot()
    order = list(dict.fromkeys(df["method"]))
    df = df.assign(top1_pct=df["top1"] * 100)
    sns.pointplot(data=df, x="method", y="top1_pct", order=order, errorbar=("ci", 95), linestyle="none",
                  color="black", markers="_", capsize=0.2, ax=ax)
    sns.stripplot(data=df, x="method", y="top1_pct", order=order, hue="method", palette="deep", legend=False,
                  size=6, jitter=0.1, ax=ax)
    ax.set_xlabel("")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"ResNet-20 on {metrics.get('dataset', 'digits')}: FP32 vs uniform QAT")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig
