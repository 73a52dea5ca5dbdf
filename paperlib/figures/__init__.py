"""Figures as build products: each is a pure function of a run's ``metrics.json``.

One submodule per notebook (``paperlib.figures.quickstart``, ...) registers its figures with
:func:`register_figure`; :func:`render_figures` imports them all, so a notebook needs no extra import.

The notebooks and ``python -m paperlib figures`` call the same functions, so a figure regenerated from
``runs/`` without training is the same file the notebook wrote. Figures are ``matplotlib.figure.Figure``
objects (no pyplot state), saved as PNG and PDF with fixed metadata so the bytes are reproducible, each file
through the atomic writer; ``figures/`` gets a notebook's figures all or none
(:class:`paperlib.runs.FigurePublication`).
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from matplotlib.figure import Figure

from .. import paths
from ..atomic import atomic_write
from ..runs import FIGURE_FORMATS, FigurePublication, latest_run, one_line, read_json

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


def figure_writer(fig: Figure, fmt: str) -> Callable[[IO[bytes]], Any]:
    """``write(f)`` that saves ``fig`` as ``fmt`` (png | pdf) with reproducible bytes, for the atomic writer."""
    return lambda f: fig.savefig(f, format=fmt, dpi=120, bbox_inches="tight", metadata=_METADATA[fmt])


def save_figure(fig: Figure, name: str, out_dir: str | Path) -> list[Path]:
    """Save ``fig`` as ``<name>.png`` and ``<name>.pdf`` atomically (mode 0644) with reproducible bytes."""
    out_dir = Path(out_dir)
    return [atomic_write(out_dir / f"{name}.{fmt}", figure_writer(fig, fmt)) for fmt in FIGURE_FORMATS]


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
               notebooks: list[str] | None = None, skipped: list[str] | None = None) -> dict[str, list[str]]:
    """Redraw the figures of the latest successful run of each notebook into ``figures/``; no training.

    Each notebook's figures are published all or none. A run whose ``manifest.json`` or ``metrics.json``
    cannot be read or drawn is skipped (its notebook's figures in ``figures/`` stay as they are) and named
    in one line: appended to ``skipped`` when given, else printed to stderr. The rest are redrawn."""
    _load_all()
    figures_root = figures_root or paths.figures_dir()
    problems: list[str] = []
    done: dict[str, list[str]] = {}
    for nb in notebooks or sorted(FIGURES):
        run = latest_run(nb, runs_root, problems)
        if run is None:
            continue
        metrics_file = run / "metrics.json"
        pub = FigurePublication(figures_root, f"redraw-{os.getpid()}-{secrets.token_hex(3)}")
        try:
            figs = render_figures(nb, read_json(metrics_file))
            for name, fig in figs.items():
                for fmt in FIGURE_FORMATS:
                    pub.stage(f"{name}.{fmt}", figure_writer(fig, fmt))
            pub.commit()
        except Exception as exc:  # noqa: BLE001 (one bad run must not stop the other notebooks' figures)
            pub.rollback()
            problems.append(f"{nb}: skipped, {metrics_file} could not be read or drawn ({one_line(exc)}); "
                            f"its figures in {figures_root} are unchanged")
            continue
        pub.discard()
        done[nb] = sorted(figs)
    for line in problems:
        if skipped is not None:
            skipped.append(line)
        else:
            print(line, file=sys.stderr)
    return done


def _load_all() -> None:
    """Import every ``paperlib.figures.<name>`` module: each registers its notebook's figures."""
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")
