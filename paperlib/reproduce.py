"""Run the notebooks headless with papermill, one kernel at a time (or ``jobs`` at a time), and record every run.

Before the first notebook starts, every notebook's parameters are checked: names strictly (papermill itself only
warns about unknown names) and values (each preset setting against its preset and the experiment's range
check, :func:`paperlib.presets.check_settings`; ``device``, ``data_dir``, ``preset`` and the other knobs by
kind); ``runs/`` and ``figures/`` must be writable; temp runs left by killed processes are swept.

For each notebook: execute into a hidden temp run dir ``runs/<notebook>/.tmp-<run-id>/`` (owned by this
process), then publish its figures to ``figures/`` (all or none) and rename it to ``runs/<notebook>/<run-id>/``
with the executed notebook, ``metrics.json`` and ``manifest.json``. A notebook that fails for any reason (an
exception, a timeout, a write error such as a full disk) is kept as ``<run-id>-failed`` with its error in the
manifest (and ``kernel.log``, what the kernel process itself printed) and the batch goes on; Ctrl-C records the
current run as ``<run-id>-interrupted`` and stops.

``jobs=N`` (``--jobs N``) runs up to N notebooks at once, each kernel with one thread (``OMP_NUM_THREADS=1``: on a
machine with as many cores as jobs, threads of one kernel would spin-wait on the other's cores); a notebook that
reads another's runs (``DEPENDS``: levene reads climbq's) starts after it. Ctrl-C records every running notebook
as interrupted (their kernels are interrupted too) and starts no other.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pandas as pd

from . import paths
from .atomic import WriteError, check_writable
from .runs import finalize_run, make_temp_run, new_run_id, one_line, read_json, sigint_deferred, sweep_stale_runs

RESERVED = ("output_dir",)
DEVICE_NAMES = ("auto", "cpu", "cuda")
#: the kernel process's own stderr, kept in a failed or interrupted run
KERNEL_LOG = "kernel.log"
#: notebook parameters that are another notebook's preset settings, which the notebook's own ``presets.resolve``
#: call does not show: levene trains its models with the climbq presets when no climbq run exists
#: (``climbq_models(preset, overrides=dict(seeds=seeds))`` in notebooks/levene.ipynb)
FORWARDED_SETTINGS: dict[str, dict[str, tuple[str, str]]] = {"levene": {"seeds": ("climbq", "seeds")}}
#: notebooks that read another notebook's completed runs: with ``jobs`` > 1 they start after it (when it is run)
DEPENDS: dict[str, tuple[str, ...]] = {"levene": ("climbq",)}
#: how long Ctrl-C waits for the running kernels to stop by themselves (a terminal's Ctrl-C reaches them too)
#: before it interrupts them itself
INTERRUPT_GRACE_S = 5.0


class ParameterError(ValueError):
    """A notebook parameter the notebook does not declare, or a value papermill cannot inject or the notebook
    would refuse."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped the batch; ``results`` holds the runs so far, the last one ``interrupted``."""

    def __init__(self, results: list[NotebookResult]) -> None:
        super().__init__("interrupted")
        self.results = results


@dataclass
class NotebookResult:
    notebook: str
    status: str
    wall_time_s: float
    run_dir: Path | None
    key_metric: str | None = None
    key_value: float | None = None
    error: str | None = None


def list_notebooks(notebooks_dir: Path | None = None) -> dict[str, Path]:
    """Notebook name (file stem) -> path, in run order (sorted by name; ``00_quickstart`` first)."""
    nb_dir = notebooks_dir or paths.notebooks_dir()
    return {p.stem: p for p in sorted(nb_dir.glob("*.ipynb")) if not p.name.startswith(".")}


def declared_parameters(notebook: Path) -> dict[str, Any]:
    """Names and defaults (as source text) of the notebook's ``parameters`` cell (``papermill.inspect_notebook``)."""
    import papermill as pm

    params = pm.inspect_notebook(str(notebook))
    if not params:
        raise ParameterError(f"{notebook.name} has no cell tagged 'parameters'; tag its first code cell")
    return {name: info.get("default") for name, info in params.items()}


def check_parameters(notebook: Path, parameters: dict[str, Any]) -> None:
    """Fail on names the notebook does not declare, on the reserved ``output_dir`` and on values that are not
    JSON-native."""
    declared = declared_parameters(notebook)
    reserved = sorted(set(parameters) & set(RESERVED))
    if reserved:
        raise ParameterError(f"{notebook.stem}: {reserved[0]} is reserved: the harness sets it to the run's temp "
                             "folder (runs/ are under $PAPERLIB_ROOT; run a notebook by hand to choose it)")
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


# ------------------------------------------------------------------------------------------- value checks
@dataclass
class SettingsCall:
    """A ``presets.resolve(<presets>, preset, setting=parameter, ..., **dict_parameter)`` call in a notebook."""

    presets: str
    settings: dict[str, str] = field(default_factory=dict)  # preset setting -> notebook parameter
    expanded: list[str] = field(default_factory=list)  # parameters passed as **dict


def _code_cells(notebook: Path) -> list[ast.Module]:
    nb = json.loads(notebook.read_text())
    out = []
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "code":
            continue
        src = cell.get("source", "")
        src = "".join(src) if isinstance(src, list) else src
        src = "\n".join(line for line in src.splitlines() if not line.lstrip().startswith(("%", "!")))
        try:
            out.append(ast.parse(src))
        except SyntaxError:
            continue
    return out


def settings_plan(notebook: Path) -> tuple[list[str], list[SettingsCall]]:
    """What a notebook's code says about its settings: the ``paperlib`` modules it imports (importing them
    registers the presets and range checks) and its ``presets.resolve``/``check_settings`` calls, mapping
    notebook parameters onto preset settings."""
    params = set(declared_parameters(notebook))
    modules: list[str] = []
    calls: list[SettingsCall] = []
    for tree in _code_cells(notebook):
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules += [a.name for a in node.names if a.name.split(".")[0] == "paperlib"]
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "paperlib":
                modules.append(node.module)
                modules += [f"{node.module}.{a.name}" for a in node.names if _is_module(f"{node.module}.{a.name}")]
            elif isinstance(node, ast.Call) and _call_name(node.func) in ("resolve", "check_settings") \
                    and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                call = SettingsCall(node.args[0].value)
                for kw in node.keywords:
                    if isinstance(kw.value, ast.Name) and kw.value.id in params:
                        if kw.arg is None:
                            call.expanded.append(kw.value.id)
                        else:
                            call.settings[kw.arg] = kw.value.id
                calls.append(call)
    for param, (presets_name, setting) in FORWARDED_SETTINGS.get(notebook.stem, {}).items():
        if param in params:
            calls.append(SettingsCall(presets_name, {setting: param}))
    return list(dict.fromkeys(modules)), calls


def _call_name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Attribute):
        return func.attr
    return func.id if isinstance(func, ast.Name) else None


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _literal(source: Any) -> Any:
    """A declared default's value (papermill reports its source text); ``...`` when it is not a literal."""
    try:
        return ast.literal_eval(source) if isinstance(source, str) else source
    except (ValueError, SyntaxError):
        return ...


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "True or False"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    return {str: "a string", list: "a list", dict: "a dict"}.get(type(value), "")


def _check_device(name: str, value: Any) -> None:
    if not isinstance(value, str) or not (value in DEVICE_NAMES or re.fullmatch(r"cuda:\d+", value)):
        raise ParameterError(f"{name}: device={value!r:.60}: use auto, cpu, cuda or cuda:N")
    if value.startswith("cuda"):
        from .device import resolve_device

        try:
            resolve_device(value)
        except ValueError as e:
            raise ParameterError(f"{name}: {e}") from None


def _check_settings(nb: str, presets_name: str, preset: str, overrides: dict[str, Any], where: str) -> None:
    from . import presets

    try:
        presets.check_settings(presets_name, preset, **overrides)
    except (ValueError, TypeError) as e:
        raise ParameterError(f"{nb}: {str(e).removeprefix(presets_name + ': ')}{where}") from None


def check_values(notebook: Path, parameters: dict[str, Any]) -> None:
    """Check every value the notebook would run with (its defaults overridden by ``parameters``) before it runs.

    Parameters that are preset settings (found by :func:`settings_plan`) go through
    :func:`paperlib.presets.check_settings` (type against the preset's own value, then the experiment's
    registered range check); ``preset`` must be a preset name, ``device`` auto | cpu | cuda | cuda:N (and CUDA
    present), and every other parameter the kind of its default (a string where ``data_dir = ""``, an integer
    where ``threads = 1``, ...). Raises :class:`ParameterError` naming the notebook and the parameter."""
    from . import presets

    nb = notebook.stem
    declared = declared_parameters(notebook)
    defaults = {k: _literal(v) for k, v in declared.items()}
    values = {**defaults, **parameters}
    preset = values.get("preset", "default")
    if "preset" in values and preset not in presets.PRESET_NAMES:
        raise ParameterError(f"{nb}: preset={preset!r:.60}: use one of {', '.join(presets.PRESET_NAMES)}")
    modules, calls = settings_plan(notebook)
    for module in modules:
        importlib.import_module(module)
    covered = {"preset", *RESERVED}
    for call in calls:
        if call.presets not in presets.PRESETS:
            continue  # not a presets call after all (nothing registers that name)
        named = {setting: values[param] for setting, param in call.settings.items() if param in values}
        expanded: dict[str, Any] = {}
        for param in call.expanded:
            extra = values.get(param)
            if presets.is_unset(extra):
                continue
            if not isinstance(extra, dict):
                raise ParameterError(f"{nb}: {param}={extra!r:.60} must be a dict of {call.presets} settings, "
                                     f"e.g. {{\"seeds\": [0, 1]}}")
            twice = sorted(set(extra) & set(call.settings))
            if twice:
                raise ParameterError(f"{nb}: {param} sets {twice}, which have their own parameter(s) "
                                     f"{[call.settings[k] for k in twice]}: set them there")
            expanded.update(extra)
        covered |= set(call.settings.values()) | set(call.expanded)
        renamed = sorted(p for s, p in call.settings.items() if s != p)
        if call.presets != nb:
            where = f" ({nb}'s {', '.join(call.settings.values())} are {call.presets} settings)"
        else:
            where = f" (parameter(s) {', '.join(renamed)})" if renamed else ""
        _check_settings(nb, call.presets, preset, named, where)  # the named parameters first: errors name them
        if expanded:
            _check_settings(nb, call.presets, preset, {**named, **expanded},
                            f" (set in the parameter {', '.join(call.expanded)})")
    for name, value in values.items():
        if name in covered:
            continue
        if name == "device":
            _check_device(nb, value)
            continue
        like = defaults.get(name)
        want = "a string" if name == "data_dir" else _kind(like)
        if value is None or not want or value is ...:
            continue
        got = _kind(value)
        if got != want and not (want == "a number" and got == "an integer"):
            raise ParameterError(f"{nb}: {name}={value!r:.60} must be {want}, like its default {like!r:.60}")


# ------------------------------------------------------------------------------------------- running
def _kernel_env() -> None:
    """Make the ``python3`` kernel papermill starts be this interpreter's environment."""
    share = Path(sys.prefix) / "share" / "jupyter"
    current = os.environ.get("JUPYTER_PATH", "")
    if str(share) not in current.split(os.pathsep):
        os.environ["JUPYTER_PATH"] = os.pathsep.join(p for p in (str(share), current) if p)


#: kernel processes of the notebooks running now (parallel mode interrupts them on Ctrl-C)
_LIVE_KERNELS: set[Any] = set()
_LIVE_LOCK = threading.Lock()


def _kernel_manager_class(log: IO[bytes]) -> type:
    """A kernel manager whose kernel process writes its own stderr (its log lines, and the tracebacks of a kernel
    shut down mid-cell by Ctrl-C) to ``log`` instead of the terminal; the cells' output goes to the notebook."""
    from jupyter_client import AsyncKernelManager

    class LoggedKernelManager(AsyncKernelManager):
        async def _async_launch_kernel(self, kernel_cmd: list[str], **kw: Any) -> None:
            kw.setdefault("stderr", log)
            await super()._async_launch_kernel(kernel_cmd, **kw)
            process = getattr(self.provisioner, "process", None)
            if process is not None:
                with _LIVE_LOCK:
                    _LIVE_KERNELS.difference_update([p for p in _LIVE_KERNELS if p.poll() is not None])
                    _LIVE_KERNELS.add(process)

    return LoggedKernelManager


def _interrupt_kernels() -> int:
    """Send SIGINT to every kernel process still running; returns how many."""
    with _LIVE_LOCK:
        live = [p for p in _LIVE_KERNELS if p.poll() is None]
    for p in live:
        try:
            os.kill(p.pid, signal.SIGINT)
        except OSError:
            pass
    with _LIVE_LOCK:
        _LIVE_KERNELS.intersection_update(live)  # forget the ones that ended
    return len(live)


def _check_timeout(execution_timeout: Any) -> None:
    if execution_timeout is not None and (isinstance(execution_timeout, bool)
                                          or not isinstance(execution_timeout, int) or execution_timeout <= 0):
        raise ParameterError(f"timeout={execution_timeout!r}: give a per-cell limit in whole seconds >= 1 "
                             "(or none: no limit)")


def run_notebook(name: str, parameters: dict[str, Any] | None = None, *, notebooks_dir: Path | None = None,
                 runs_root: Path | None = None, figures_root: Path | None = None,
                 execution_timeout: int | None = None, log_output: bool = False) -> NotebookResult:
    """Execute one notebook with papermill and record the run (see module docstring).

    Raises :class:`ParameterError` before anything runs for a bad parameter, and :class:`RunInterrupted`
    (after recording the run as ``<run-id>-interrupted``) on Ctrl-C; every other failure is a ``failed`` result."""
    notebooks = list_notebooks(notebooks_dir)
    if name not in notebooks:
        raise ParameterError(f"unknown notebook {name!r}; available: {', '.join(notebooks)}")
    params = dict(parameters or {})
    _check_timeout(execution_timeout)
    check_parameters(notebooks[name], params)
    check_values(notebooks[name], params)
    return _run_checked(name, notebooks[name], params, runs_root or paths.runs_dir(), figures_root,
                        execution_timeout, log_output)


def _run_checked(name: str, src: Path, params: dict[str, Any], runs_root: Path, figures_root: Path | None,
                 execution_timeout: int | None, log_output: bool) -> NotebookResult:
    import papermill as pm
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    run_id = new_run_id(str(params.get("preset", "")))
    t0 = time.perf_counter()
    try:
        tmp = make_temp_run(runs_root / name / run_id)
    except WriteError as e:
        return NotebookResult(name, "failed", 0.0, None, error=f"{e} (the run could not be recorded)")
    _kernel_env()
    status, error = "ok", None
    kernel_log = tmp / KERNEL_LOG
    try:
        with open(kernel_log, "ab") as log:
            pm.execute_notebook(str(src), str(tmp / f"{name}.ipynb"), parameters={**params, "output_dir": str(tmp)},
                                kernel_name="python3", progress_bar=False, log_output=log_output,
                                cwd=str(src.parent), execution_timeout=execution_timeout,
                                kernel_manager_class=_kernel_manager_class(log))
    except pm.PapermillExecutionError as e:
        status = "interrupted" if e.ename == "KeyboardInterrupt" else "failed"
        error = f"{e.ename}: {e.evalue} (cell {e.exec_count})"
    except CellTimeoutError as e:
        status, error = "failed", (f"CellTimeoutError: a cell ran longer than {execution_timeout} s "
                                   f"({str(e).splitlines()[0]})")
    except DeadKernelError as e:
        status, error = "failed", f"DeadKernelError: {e} (what the kernel said: {KERNEL_LOG} in the run)"
    except KeyboardInterrupt:
        status, error = "interrupted", "KeyboardInterrupt: stopped by Ctrl-C (SIGINT)"
    except Exception as e:  # noqa: BLE001 (papermill's own writes on a full disk, a kernel that does not start...)
        status, error = "failed", one_line(e)
    wall = time.perf_counter() - t0
    result = NotebookResult(name, status, wall, None, error=error)
    try:
        with sigint_deferred():  # a second Ctrl-C waits until this run is recorded
            if status == "ok":
                kernel_log.unlink(missing_ok=True)  # kept only where it may explain a failure
            context = _read_json_or_empty(tmp / "context.json")
            if status == "ok":
                try:
                    km = read_json(tmp / "metrics.json").get("key_metric", {})
                    result.key_metric, result.key_value = km.get("name"), km.get("value")
                except FileNotFoundError:
                    status, error = "failed", ("the notebook finished without writing metrics.json "
                                               "(RunRecord.save_metrics was not called)")
                except (OSError, ValueError, AttributeError) as e:
                    status, error = "failed", f"metrics.json cannot be read: {one_line(e)}"
            status, result.run_dir, error = finalize_run(tmp, name, params, status, wall, context, error,
                                                         figures_root)
            result.status, result.error = status, error
            if status != "ok":
                result.key_metric = result.key_value = None
    except KeyboardInterrupt:
        raise RunInterrupted([result]) from None
    if status == "interrupted":
        raise RunInterrupted([result])
    return result


def _read_json_or_empty(path: Path) -> dict[str, Any]:
    try:
        value = read_json(path)
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def reproduce(preset: str = "default", only: Sequence[str] | None = None, device: str | None = None,
              *, notebooks_dir: Path | None = None, runs_root: Path | None = None,
              figures_root: Path | None = None, execution_timeout: int | None = None,
              extra_parameters: dict[str, dict[str, Any]] | None = None, jobs: int = 1) -> list[NotebookResult]:
    """Run ``only`` (default: every notebook) at ``preset``, ``jobs`` at a time (1: one after the other); one
    result per notebook, in the notebooks' order.

    Everything is checked before the first notebook starts (parameters, values, writable ``runs/`` and
    ``figures/``); a failed notebook does not stop the batch; Ctrl-C raises :class:`RunInterrupted` with the
    results so far, the running run(s) recorded as interrupted."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ParameterError(f"jobs={jobs!r}: how many notebooks run at once, an int >= 1")
    notebooks = list_notebooks(notebooks_dir)
    if only is not None and not list(only):
        raise ParameterError(f"only names no notebook; pass None for all of them ({', '.join(notebooks)})")
    names = list(only) if only else list(notebooks)
    unknown = [n for n in names if n not in notebooks]
    if unknown:
        raise ParameterError(f"unknown notebook(s) {unknown}; available: {', '.join(notebooks)}")
    _check_timeout(execution_timeout)
    stray = sorted(set(extra_parameters or {}) - set(names))
    if stray:
        raise ParameterError(f"extra_parameters for notebook(s) {stray} that are not run; run: {', '.join(names)}")
    runs = []
    for name in names:  # every notebook's parameters and values are checked before the first one runs
        params: dict[str, Any] = {"preset": preset}
        if device:
            params["device"] = device
        params.update((extra_parameters or {}).get(name, {}))
        check_parameters(notebooks[name], params)
        check_values(notebooks[name], params)
        runs.append((name, params))
    runs_root = runs_root or paths.runs_dir()
    figures_root = figures_root or paths.figures_dir()
    check_writable(runs_root, "runs folder")
    check_writable(figures_root, "figures folder")
    for line in sweep_stale_runs(runs_root, figures_root):
        print(f"[reproduce] {line}", flush=True)
    if jobs > 1 and len(runs) > 1:
        return _reproduce_parallel(runs, notebooks, runs_root, figures_root, execution_timeout, jobs)
    results: list[NotebookResult] = []
    for name, params in runs:
        print(f"[reproduce] {name} (preset={params.get('preset')}) ...", flush=True)
        try:
            res = _run_checked(name, notebooks[name], params, runs_root, figures_root, execution_timeout, False)
        except RunInterrupted as e:
            raise RunInterrupted(results + e.results) from None
        except KeyboardInterrupt:  # between two notebooks
            if not results:
                raise
            raise RunInterrupted(results) from None
        print(_finished_line(res), flush=True)
        results.append(res)
    return results


def _finished_line(res: NotebookResult) -> str:
    return (f"[reproduce] {res.notebook}: {res.status} in {res.wall_time_s:.1f} s -> "
            f"{res.run_dir or '(not recorded)'}" + (f"\n    {res.error}" if res.error else ""))


def _reproduce_parallel(runs: list[tuple[str, dict[str, Any]]], notebooks: dict[str, Path], runs_root: Path,
                        figures_root: Path, execution_timeout: int | None, jobs: int) -> list[NotebookResult]:
    """:func:`reproduce` with up to ``jobs`` notebooks at once (module docstring)."""
    names = [n for n, _ in runs]
    pending = list(runs)
    done: dict[str, NotebookResult] = {}
    running: dict[Future, str] = {}

    def one(name: str, params: dict[str, Any]) -> NotebookResult:
        try:
            return _run_checked(name, notebooks[name], params, runs_root, figures_root, execution_timeout, False)
        except RunInterrupted as e:  # the kernel was interrupted: the run is recorded as such
            return e.results[-1]

    def ordered() -> list[NotebookResult]:
        return [done[n] for n in names if n in done]

    _kernel_env()
    old_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # the kernels inherit it
    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="reproduce")
    try:
        try:
            while pending or running:
                for item in list(pending):
                    name, params = item
                    if len(running) >= jobs:
                        break
                    if any(d in names and d not in done for d in DEPENDS.get(name, ())):
                        continue  # waits for the notebook whose runs it reads
                    pending.remove(item)
                    print(f"[reproduce] {name} (preset={params.get('preset')}) ...", flush=True)
                    running[pool.submit(one, name, params)] = name
                finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for f in finished:
                    res = f.result()
                    done[running.pop(f)] = res
                    print(_finished_line(res), flush=True)
        except KeyboardInterrupt:
            try:
                with sigint_deferred():  # a second Ctrl-C waits until the running notebooks are recorded
                    _, still = wait(list(running), timeout=INTERRUPT_GRACE_S)
                    if still:
                        _interrupt_kernels()
                    for f, name in running.items():
                        done[name] = f.result()
            except KeyboardInterrupt:
                pass
            raise RunInterrupted(ordered()) from None
    finally:
        pool.shutdown(wait=True)
        if old_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old_threads
    return ordered()


def summary_frame(results: Sequence[NotebookResult]) -> pd.DataFrame:
    return pd.DataFrame([{
        "notebook": r.notebook, "status": r.status, "wall time (s)": round(r.wall_time_s, 1),
        "key metric": r.key_metric or "", "value": "" if r.key_value is None else f"{r.key_value:.4f}",
        "run": "" if r.run_dir is None else str(r.run_dir),
    } for r in results])
