"""Figures as build products: each is a pure function of a run's ``metrics.json``.

One submodule per notebook (``paperlib.figures.quickstart``, ...) registers its figures with
:func:`register_figure`; :func:`render_figures` imports them all, so a notebook needs no extra import.

The notebooks and ``python -m paperlib figures`` call the same functions, so a figure regenerated from
``runs/`` without training is the same file the notebook wrote. Figures are ``matplotlib.figure.Figure``
objects (no pyplot state), saved as PNG and PDF with fixed metadata so the bytes are reproducible.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from .. import paths
from ..runs import FIGURE_FORMATS, latest_run, read_json

FigureFn = Callable[[dict[str, Any]], Figure]
FIGURES: dict[str, dict[str, FigureFn]] = {}
_METADATA = {"png": {"Software": None}, "pdf": {"CreationDate": None, "ModDate": None, "Producer": None,
                                                "Creator": None}}


def register_figure(notebook: str, name: str) -> Callable[[FigureFn], FigureFn]:
    """Decorator: ``name`` is one of ``notebook``'s figures, drawn from its metrics."""

    def deco(fn: FigureFn) -> FigureFn:
        FIGURES.setdefault(notebook, {})[name] = fn
        return fn

    return deco


def save_figure(fig: Figure, name: str, out_dir: str | Path) -> list[Path]:
    """Save ``fig`` as ``<name>.png`` and ``<name>.pdf`` atomically with reproducible bytes."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for fmt in FIGURE_FORMATS:
        path = out_dir / f"{name}.{fmt}"
        tmp = out_dir / f".{name}.tmp-{os.getpid()}.{fmt}"
        fig.savefig(tmp, format=fmt, dpi=120, bbox_inches="tight", metadata=_METADATA[fmt])
        os.replace(tmp, path)
        out.append(path)
    return out


def render_figures(notebook: str, metrics: dict[str, Any], out_dir: str | Path | None = None) -> dict[str, Figure]:
    """Draw every registered figure of ``notebook`` from ``metrics``; save them when ``out_dir`` is given."""
    _load_all()
    figs = {name: fn(metrics) for name, fn in FIGURES.get(notebook, {}).items()}
    if out_dir is not None:
        for name, fig in figs.items():
            save_figure(fig, name, out_dir)
    return figs


def show(figures: dict[str, Figure] | Figure, dpi: int = 110) -> None:
    """Display figures in a notebook as PNG images (pyplot-free figures have no inline display of their own)."""
    import io

    from IPython.display import Image, display

    for fig in figures.values() if isinstance(figures, dict) else [figures]:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
        display(Image(data=buf.getvalue(), format="png"))


def regenerate(runs_root: Path | None = None, figures_root: Path | None = None,
               notebooks: list[str] | None = None) -> dict[str, list[str]]:
    """Redraw the figures of the latest successful run of each notebook into ``figures/``; no training."""
    _load_all()
    figures_root = figures_root or paths.figures_dir()
    done: dict[str, list[str]] = {}
    for nb in notebooks or sorted(FIGURES):
        run = latest_run(nb, runs_root)
        if run is None:
            continue
        figs = render_figures(nb, read_json(run / "metrics.json"), figures_root)
        done[nb] = sorted(figs)
    return done


def _load_all() -> None:
    """Import every ``paperlib.figures.<name>`` module: each registers its notebook's figures."""
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")
