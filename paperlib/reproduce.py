"""Run the notebooks headless with papermill, one kernel at a time, and record every run.

For each notebook: check the parameters strictly (papermill itself only warns about unknown names),
execute into a hidden temp run dir, then rename it to ``runs/<notebook>/<run-id>/`` with the executed
notebook, ``metrics.json`` and ``manifest.json``. Only a successful run publishes its figures to
``figures/``. A failed or timed-out notebook is kept as ``<run-id>-failed`` with ``status: failed``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from . import paths
from .runs import build_manifest, new_run_id, publish_figures, read_json, write_json

RESERVED = ("output_dir",)


class ParameterError(ValueError):
    """A notebook parameter the notebook does not declare, or a value papermill cannot inject."""


@dataclass
class NotebookResult:
    notebook: str
    status: str
    wall_time_s: float
    run_dir: Path
    key_metric: str | None = None
    key_value: float | None = None
    error: str | None = None


def list_notebooks(notebooks_dir: Path | None = None) -> dict[str, Path]:
    """Notebook name (file stem) -> path, in run order (sorted by name; ``00_quickstart`` first)."""
    nb_dir = notebooks_dir or paths.notebooks_dir()
    return {p.stem: p for p in sorted(nb_dir.glob("*.ipynb")) if not p.name.startswith(".")}


def declared_parameters(notebook: Path) -> dict[str, Any]:
    """Names and defaults of the notebook's ``parameters`` cell (via ``papermill.inspect_notebook``)."""
    import papermill as pm

    params = pm.inspect_notebook(str(notebook))
    if not params:
        raise ParameterError(f"{notebook.name} has no cell tagged 'parameters'; tag its first code cell")
    return {name: info.get("default") for name, info in params.items()}


def check_parameters(notebook: Path, parameters: dict[str, Any]) -> None:
    """Fail on names the notebook does not declare and on values that are not JSON-native."""
    declared = declared_parameters(notebook)
    unknown = sorted(set(parameters) - set(declared))
    if unknown:
        raise ParameterError(
            f"{notebook.stem}: unknown parameter(s) {unknown}; accepted: {sorted(set(declared) - set(RESERVED))}"
        )
    for name, value in parameters.items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ParameterError(
                f"{notebook.stem}: parameter {name}={value!r:.60} is not JSON-native ({e}); "
                "pass str/int/float/bool/None or lists/dicts of them (e.g. str(path))"
            ) from None
        if _has_tuple(value):
            raise ParameterError(f"{notebook.stem}: parameter {name} holds a tuple, which papermill injects "
                                 "as a string; pass a list")


def _has_tuple(value: Any) -> bool:
    if isinstance(value, tuple):
        return True
    if isinstance(value, list):
        return any(_has_tuple(v) for v in value)
    if isinstance(value, dict):
        return any(_has_tuple(v) for v in value.values())
    return False


def _kernel_env() -> None:
    """Make the ``python3`` kernel papermill starts be this interpreter's environment."""
    share = Path(sys.prefix) / "share" / "jupyter"
    current = os.environ.get("JUPYTER_PATH", "")
    if str(share) not in current.split(os.pathsep):
        os.environ["JUPYTER_PATH"] = os.pathsep.join(p for p in (str(share), current) if p)


def run_notebook(name: str, parameters: dict[str, Any] | None = None, *, notebooks_dir: Path | None = None,
                 runs_root: Path | None = None, figures_root: Path | None = None,
                 execution_timeout: int | None = None, log_output: bool = False) -> NotebookResult:
    """Execute one notebook with papermill and record the run (see module docstring)."""
    import papermill as pm
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    notebooks = list_notebooks(notebooks_dir)
    if name not in notebooks:
        raise ParameterError(f"unknown notebook {name!r}; available: {', '.join(notebooks)}")
    src = notebooks[name]
    params = dict(parameters or {})
    check_parameters(src, params)
    runs_root = runs_root or paths.runs_dir()
    run_id = new_run_id(str(params.get("preset", "")))
    tmp = runs_root / name / f".tmp-{run_id}"
    tmp.mkdir(parents=True)
    params["output_dir"] = str(tmp)
    _kernel_env()
    t0 = time.perf_counter()
    error = None
    try:
        pm.execute_notebook(str(src), str(tmp / f"{name}.ipynb"), parameters=params, kernel_name="python3",
                            progress_bar=False, log_output=log_output, cwd=str(src.parent),
                            execution_timeout=execution_timeout)
    except pm.PapermillExecutionError as e:
        error = f"{e.ename}: {e.evalue} (cell {e.exec_count})"
    except CellTimeoutError as e:
        error = f"CellTimeoutError: a cell ran longer than {execution_timeout} s ({str(e).splitlines()[0]})"
    except DeadKernelError as e:
        error = f"DeadKernelError: {e}"
    wall = time.perf_counter() - t0
    if error is None and not (tmp / "metrics.json").is_file():
        error = "the notebook finished without writing metrics.json (RunRecord.save_metrics was not called)"
    params.pop("output_dir")
    context = read_json(tmp / "context.json") if (tmp / "context.json").is_file() else {}
    status = "ok" if error is None else "failed"
    write_json(tmp / "manifest.json", build_manifest(name, params, status, wall, context, error))
    final = runs_root / name / (run_id if status == "ok" else f"{run_id}-failed")
    os.replace(tmp, final)
    result = NotebookResult(name, status, wall, final, error=error)
    if status == "ok":
        publish_figures(final, figures_root)
        km = read_json(final / "metrics.json").get("key_metric", {})
        result.key_metric, result.key_value = km.get("name"), km.get("value")
    return result


def reproduce(preset: str = "default", only: Sequence[str] | None = None, device: str | None = None,
              *, notebooks_dir: Path | None = None, runs_root: Path | None = None,
              figures_root: Path | None = None, execution_timeout: int | None = None,
              extra_parameters: dict[str, dict[str, Any]] | None = None) -> list[NotebookResult]:
    """Run ``only`` (default: every notebook) sequentially at ``preset``; one result per notebook."""
    notebooks = list_notebooks(notebooks_dir)
    names = list(only) if only else list(notebooks)
    unknown = [n for n in names if n not in notebooks]
    if unknown:
        raise ParameterError(f"unknown notebook(s) {unknown}; available: {', '.join(notebooks)}")
    stray = sorted(set(extra_parameters or {}) - set(names))
    if stray:
        raise ParameterError(f"extra_parameters for notebook(s) {stray} that are not run; run: {', '.join(names)}")
    runs = []
    for name in names:  # every notebook's parameters are checked before the first one runs
        params: dict[str, Any] = {"preset": preset}
        if device:
            params["device"] = device
        params.update((extra_parameters or {}).get(name, {}))
        check_parameters(notebooks[name], params)
        runs.append((name, params))
    results = []
    for name, params in runs:
        print(f"[reproduce] {name} (preset={preset}) ...", flush=True)
        res = run_notebook(name, params, notebooks_dir=notebooks_dir, runs_root=runs_root,
                           figures_root=figures_root, execution_timeout=execution_timeout)
        print(f"[reproduce] {name}: {res.status} in {res.wall_time_s:.1f} s -> {res.run_dir}"
              + (f"\n    {res.error}" if res.error else ""), flush=True)
        results.append(res)
    return results


def summary_frame(results: Sequence[NotebookResult]) -> pd.DataFrame:
    return pd.DataFrame([{
        "notebook": r.notebook, "status": r.status, "wall time (s)": round(r.wall_time_s, 1),
        "key metric": r.key_metric or "", "value": "" if r.key_value is None else f"{r.key_value:.4f}",
        "run": str(r.run_dir),
    } for r in results])
