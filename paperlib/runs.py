"""Run records: every run's metrics, manifest, figures and executed notebook under ``runs/<notebook>/<id>/``.

A run directory is built under a hidden temp name and renamed into place only when complete, so
``runs/`` never shows a half-written run. Figures are written into the run first and published to
``figures/`` only when the run succeeded.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import secrets
import shutil
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from . import paths
from .atomic import atomic_write_text

PACKAGES = ("paperlib", "torch", "torchvision", "numpy", "scipy", "pandas", "scikit-learn", "matplotlib",
            "seaborn", "papermill")
FIGURE_FORMATS = ("png", "pdf")


class RunError(RuntimeError):
    """A run could not be recorded (bad metrics, unknown notebook, ...)."""


def check_json_native(value: Any, where: str = "value") -> None:
    """Raise ``TypeError`` naming the offending key unless ``value`` is JSON-native (dict/list/str/num/bool/None)."""
    if value is None or isinstance(value, bool | int | str):
        return
    if isinstance(value, float):
        return
    if isinstance(value, list):
        for i, v in enumerate(value):
            check_json_native(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: key {k!r} is not a string; JSON keys must be strings")
            check_json_native(v, f"{where}[{k!r}]")
        return
    raise TypeError(
        f"{where} is a {type(value).__name__} ({value!r:.60}), not JSON-native: pass str/int/float/bool/None, "
        "lists and dicts (e.g. str(path), list(tuple), float(tensor))"
    )


def _clean_nan(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_clean_nan(v) for v in value]
    if isinstance(value, dict):
        return {k: _clean_nan(v) for k, v in value.items()}
    return value


def write_json(path: str | Path, value: Any) -> Path:
    """Atomically write JSON (NaN/inf become null, so the file is strict JSON)."""
    check_json_native(value, Path(path).name)
    return atomic_write_text(path, json.dumps(_clean_nan(value), indent=2, allow_nan=False) + "\n")


def write_csv(path: str | Path, frame: Any) -> Path:
    """Atomically write a pandas frame as CSV."""
    return atomic_write_text(path, frame.to_csv(index=False))


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def git_state(root: Path | None = None) -> dict[str, Any]:
    """``{"sha": ..., "dirty": bool}`` of the repository, or nulls outside git."""
    root = root or paths.project_root()
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip() != ""
        return {"sha": sha, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def new_run_id(preset: str = "") -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{preset + '-' if preset else ''}{secrets.token_hex(3)}"


def build_manifest(notebook: str, parameters: dict[str, Any], status: str, wall_time_s: float,
                   context: dict[str, Any] | None = None, error: str | None = None) -> dict[str, Any]:
    """The manifest of a run: parameters, seeds, git SHA + dirty flag, versions, device, data fingerprint."""
    context = context or {}
    return {
        "notebook": notebook,
        "status": status,
        "error": error,
        "parameters": parameters,
        "seeds": context.get("seeds", parameters.get("seeds")),
        "device": context.get("device"),
        "data_fingerprint": context.get("data_fingerprint"),
        "git": git_state(),
        "versions": package_versions(),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count()},
        "wall_time_s": round(wall_time_s, 3),
        "finished_at": _dt.datetime.now().isoformat(timespec="seconds"),
    }


def publish_figures(run_dir: Path, figures_dir: Path | None = None) -> list[Path]:
    """Copy a successful run's figures into ``figures/`` (each file atomically)."""
    figures_dir = figures_dir or paths.figures_dir()
    src = run_dir / "figures"
    out = []
    if not src.is_dir():
        return out
    figures_dir.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        tmp = figures_dir / f".{f.name}.tmp-{os.getpid()}"
        shutil.copyfile(f, tmp)
        os.replace(tmp, figures_dir / f.name)
        out.append(figures_dir / f.name)
    return out


class RunRecord:
    """What a notebook writes: ``metrics.json``, ``context.json`` and ``figures/`` in its run directory.

    Under ``paperlib reproduce`` the harness passes ``output_dir`` (a temp run dir it finalises). Run
    interactively (``output_dir`` empty), the record makes its own temp run dir under ``runs/<notebook>/``
    and :meth:`finish` writes the manifest, publishes the figures and renames the run into place.
    """

    def __init__(self, notebook: str, output_dir: str | Path | None = None,
                 parameters: dict[str, Any] | None = None, runs_root: Path | None = None,
                 figures_root: Path | None = None) -> None:
        self.notebook = notebook
        self.parameters = dict(parameters or {})
        self.context: dict[str, Any] = {}
        self.figures_root = figures_root
        self.interactive = not output_dir
        self._t0 = _dt.datetime.now()
        if self.interactive:
            root = (runs_root or paths.runs_dir()) / notebook
            self.run_id = new_run_id(str(self.parameters.get("preset", "")))
            self.final_path = root / self.run_id
            self.path = root / f".tmp-{self.run_id}"
        else:
            self.path = Path(output_dir)
            self.final_path = self.path
            self.run_id = self.path.name
        (self.path / "figures").mkdir(parents=True, exist_ok=True)

    def set_context(self, **context: Any) -> None:
        """Record facts only the notebook knows (device, data fingerprint, seeds); merged into the manifest."""
        check_json_native(context, "context")
        self.context.update(context)
        write_json(self.path / "context.json", self.context)

    def save_metrics(self, metrics: dict[str, Any]) -> Path:
        """Write ``metrics.json``; it must hold ``key_metric: {"name", "value"}`` for the summary table."""
        if "key_metric" not in metrics:
            raise RunError("metrics need a 'key_metric': {'name': ..., 'value': ...} entry for the summary")
        return write_json(self.path / "metrics.json", metrics)

    def save_figure(self, fig: Any, name: str) -> list[Path]:
        from .figures import save_figure

        return save_figure(fig, name, self.path / "figures")

    def finish(self) -> Path:
        """Interactive runs: write the manifest, publish figures, rename the run into place."""
        if not self.interactive:
            return self.path
        wall = (_dt.datetime.now() - self._t0).total_seconds()
        write_json(self.path / "manifest.json",
                   build_manifest(self.notebook, self.parameters, "ok", wall, self.context))
        os.replace(self.path, self.final_path)
        publish_figures(self.final_path, self.figures_root)
        self.path = self.final_path
        return self.final_path


def runs_root_of(output_dir: str | Path | None) -> Path | None:
    """The runs root the harness writes to: ``<runs_root>/<notebook>/<run-id>`` -> ``<runs_root>``."""
    return Path(output_dir).resolve().parent.parent if output_dir else None


def completed_runs(notebook: str, runs_root: Path | None = None) -> list[Path]:
    """Successful runs of ``notebook``, oldest first (hidden temp dirs and failed runs excluded)."""
    root = (runs_root or paths.runs_dir()) / notebook
    if not root.is_dir():
        return []
    out = []
    for d in sorted(root.iterdir()):
        m = d / "manifest.json"
        if d.name.startswith(".") or not m.is_file():
            continue
        if read_json(m).get("status") == "ok" and (d / "metrics.json").is_file():
            out.append(d)
    return sorted(out, key=lambda d: (read_json(d / "manifest.json").get("finished_at", ""), d.name))


def latest_run(notebook: str, runs_root: Path | None = None) -> Path | None:
    runs = completed_runs(notebook, runs_root)
    return runs[-1] if runs else None
