"""Run records: every run's metrics, manifest, figures and executed notebook under ``runs/<notebook>/<id>/``.

A run directory is built under a hidden temp name (``.tmp-<run-id>``, holding ``.owner.json``: the pid of the
process that writes it) and renamed into place only when complete, so ``runs/`` never shows a half-written
run. A run is ``ok`` only once its figures are published to ``figures/``, all of them or none
(:class:`FigurePublication`). A run that failed or was interrupted is kept as ``<run-id>-failed`` /
``<run-id>-interrupted`` with its status and error in ``manifest.json``. A temp dir whose owner process is
gone (killed) is removed by the next ``reproduce`` or ``figures`` (:func:`sweep_stale_runs`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import IO, Any

from . import paths
from .atomic import WriteError, atomic_write, atomic_write_text, describe_os_error

PACKAGES = ("paperlib", "torch", "torchvision", "numpy", "scipy", "pandas", "scikit-learn", "matplotlib",
            "seaborn", "papermill")
FIGURE_FORMATS = ("png", "pdf")
TMP_PREFIX = ".tmp-"
OWNER_FILE = ".owner.json"
ENV_PREFIX = "PAPERLIB_"


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
    """Atomically write JSON (NaN/inf become null, so the file is strict JSON), mode 0644."""
    check_json_native(value, Path(path).name)
    return atomic_write_text(path, json.dumps(_clean_nan(value), indent=2, allow_nan=False) + "\n")


def write_csv(path: str | Path, frame: Any) -> Path:
    """Atomically write a pandas frame as CSV."""
    return atomic_write_text(path, frame.to_csv(index=False))


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def one_line(exc: BaseException) -> str:
    """``"<Type>: <first line of the message>"`` (a :class:`WriteError` is its own one-line message)."""
    if isinstance(exc, WriteError):
        return str(exc)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def git_state(root: Path | None = None) -> dict[str, Any]:
    """``{"sha": ..., "dirty": bool}`` of the repository, or nulls outside git.

    ``dirty`` counts modified, staged and untracked (not ignored) files: any of them may change what runs."""
    root = root or paths.project_root()
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=normal"], cwd=root,
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


def gpu_info() -> dict[str, Any] | None:
    """``{"names": [...], "cuda": "12.8", "cudnn": 91002}`` for the CUDA GPUs torch sees; None without one."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        return {"names": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                "cuda": torch.version.cuda, "cudnn": cudnn}
    except Exception:  # noqa: BLE001 (a broken driver must not cost the run record)
        return None


def paperlib_environment() -> dict[str, str]:
    """Every ``PAPERLIB_*`` environment variable: they select code paths (compiled, native, ...)."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIX)}


def new_run_id(preset: str = "") -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{preset + '-' if preset else ''}{secrets.token_hex(3)}"


def build_manifest(notebook: str, parameters: dict[str, Any], status: str, wall_time_s: float,
                   context: dict[str, Any] | None = None, error: str | None = None) -> dict[str, Any]:
    """The manifest of a run: status (ok | failed | interrupted), parameters, seeds, git SHA + dirty flag,
    versions, device, GPU with CUDA/cuDNN versions, ``PAPERLIB_*`` variables, data fingerprint, wall time."""
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
        "gpu": gpu_info(),
        "environment": paperlib_environment(),
        "wall_time_s": round(wall_time_s, 3),
        "finished_at": _dt.datetime.now().isoformat(timespec="seconds"),
    }


# ------------------------------------------------------------------------------------------- temp run dirs
def _process_started(pid: int) -> str | None:
    """The start time of process ``pid`` (Linux ``/proc``; None elsewhere), to tell a reused pid apart."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else fields[19]  # field 3 is the state, field 22 the start time


def owner_record() -> dict[str, Any]:
    """Who writes a temp dir: this process's pid, host and start time."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": _process_started(os.getpid())}


def owner_alive(owner: dict[str, Any]) -> bool:
    """Whether the process recorded in ``owner`` still runs (a run on another host counts as running)."""
    if owner.get("host") not in (None, socket.gethostname()):
        return True
    pid = owner.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        return True
    if Path("/proc").is_dir():
        now = _process_started(pid)
        if now is None or (owner.get("started") is not None and now != owner["started"]):
            return False  # a zombie, or the pid was reused by another process
    return True


def make_temp_run(final: Path) -> Path:
    """Create ``<parent>/.tmp-<name>`` for the run that will be ``final``, owned by this process.

    Raises a one-line :class:`WriteError` (and leaves nothing) when it cannot be written."""
    tmp = final.parent / f"{TMP_PREFIX}{final.name}"
    try:
        tmp.mkdir(parents=True)
        write_json(tmp / OWNER_FILE, owner_record())
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, WriteError):
            raise
        raise WriteError(f"cannot create the run folder {tmp}: {describe_os_error(exc)}") from exc
    return tmp


def final_run_dir(tmp: Path, status: str = "ok") -> Path:
    """Where the temp run dir ``tmp`` goes: ``<run-id>`` when ok, else ``<run-id>-<status>``."""
    run_id = tmp.name[len(TMP_PREFIX):] if tmp.name.startswith(TMP_PREFIX) else tmp.name
    return tmp.parent / (run_id if status == "ok" else f"{run_id}-{status}")


def _read_owner(tmp: Path) -> dict[str, Any] | None:
    try:
        owner = read_json(tmp / OWNER_FILE)
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


_SIDE_FILE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>stage|old|new)-(?P<tag>[^/]+)$")


def sweep_stale_runs(runs_root: Path | None = None, figures_root: Path | None = None) -> list[str]:
    """Remove the temp run dirs (``runs/<notebook>/.tmp-*``) whose owner process is gone, and undo the figure
    publication such a run left half done in ``figures_root``; one line per thing done, for the user.

    A temp dir without an owner file (a run still starting, or made by an older version) is kept; after
    10 minutes it is named so the user can delete it."""
    runs_root = runs_root or paths.runs_dir()
    out: list[str] = []
    live, stale = set(), {}
    tmps = sorted(runs_root.glob(f"*/{TMP_PREFIX}*")) if runs_root.is_dir() else []
    now = _dt.datetime.now().timestamp()
    for tmp in tmps:
        if not tmp.is_dir():
            continue
        run_id = tmp.name[len(TMP_PREFIX):]
        owner = _read_owner(tmp)
        if owner is None:
            with contextlib.suppress(OSError):
                if now - tmp.stat().st_mtime > 600:
                    out.append(f"kept {tmp}: no owner recorded (made by an older version?); delete it by hand "
                               "if no run is writing it")
            live.add(run_id)
        elif owner_alive(owner):
            live.add(run_id)
        else:
            stale[run_id] = (tmp, owner.get("pid"))
    if figures_root is not None and figures_root.is_dir():
        out += _sweep_figures(figures_root, live, set(stale))
    for tmp, pid in stale.values():
        shutil.rmtree(tmp, ignore_errors=True)
        out.append(f"removed {tmp}: its process {pid} is gone (the run was killed or its kernel died)")
    return out


def _sweep_figures(figures_root: Path, live: set[str], stale: set[str]) -> list[str]:
    """Side files of :class:`FigurePublication` left by a dead process: staged copies are removed; where its run
    never completed (its temp dir is stale) or it was a redraw, the old figures are put back."""
    restored: dict[str, int] = {}
    for f in sorted(figures_root.iterdir()):
        m = _SIDE_FILE.match(f.name)
        if m is None or m["tag"] in live:
            continue
        tag, target = m["tag"], figures_root / m["name"]
        redraw = re.match(r"^redraw-(\d+)-", tag)
        if redraw and owner_alive({"pid": int(redraw[1])}):
            continue
        undo = tag in stale or redraw is not None
        with contextlib.suppress(OSError):
            if m["kind"] == "old" and undo:
                os.replace(f, target)
            elif m["kind"] == "new" and undo:
                target.unlink(missing_ok=True)
                f.unlink()
            else:
                f.unlink()
            if undo and m["kind"] != "stage":
                restored[tag] = restored.get(tag, 0) + 1
    return [f"restored {n} figure(s) in {figures_root} that the stopped run {tag} had half published"
            for tag, n in restored.items()]


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) until the block is done (then raise ``KeyboardInterrupt``), so recording a run
    is not cut in half. Outside the main thread it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    old = signal.signal(signal.SIGINT, lambda sig, frame: caught.append(sig))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if caught:
        raise KeyboardInterrupt


# ------------------------------------------------------------------------------------------- figures/
class FigurePublication:
    """Publish a set of figures into ``figures_dir`` all or none.

    :meth:`stage` writes each file complete under a hidden name (``.<name>.stage-<tag>``, via the atomic
    writer); :meth:`commit` then renames each onto its target, keeping the old file as ``.<name>.old-<tag>``
    (or a ``.<name>.new-<tag>`` marker where there was none). On any failure everything placed is put back and
    a one-line :class:`WriteError` is raised; :meth:`discard` drops the backups once the run is recorded.
    ``tag`` is the run id, so :func:`sweep_stale_runs` can undo the work of a killed process."""

    def __init__(self, figures_dir: str | Path, tag: str) -> None:
        self.dir = Path(figures_dir)
        self.tag = tag
        self.staged: list[tuple[Path, Path]] = []  # (staged copy, target)
        self.placed: list[tuple[Path, Path]] = []  # (target, .old backup or .new marker)

    def _side(self, name: str, kind: str) -> Path:
        return self.dir / f".{name}.{kind}-{self.tag}"

    def stage(self, name: str, write: Callable[[IO[bytes]], Any]) -> None:
        """Write figure file ``name`` (e.g. ``acc.png``) by ``write(f)`` beside its target, not yet visible."""
        stage = self._side(name, "stage")
        try:
            atomic_write(stage, write)
        except BaseException as exc:
            self.rollback()
            if isinstance(exc, WriteError) and isinstance(exc.__cause__, OSError):
                raise WriteError(f"cannot publish {self.dir / name}: {describe_os_error(exc.__cause__)}") from exc
            raise
        self.staged.append((stage, self.dir / name))

    def stage_file(self, src: Path) -> None:
        """Stage a copy of the file ``src`` under its own name."""
        def copy(f: IO[bytes]) -> None:
            with open(src, "rb") as s:
                shutil.copyfileobj(s, f)

        self.stage(src.name, copy)

    def commit(self) -> list[Path]:
        """Rename every staged file onto its target; on failure restore them all and raise :class:`WriteError`."""
        target = self.dir
        try:
            for stage, target in self.staged:
                moved = False
                if os.path.lexists(target):
                    backup = self._side(target.name, "old")
                    try:
                        os.link(target, backup)  # the old file stays visible until the new one replaces it
                    except OSError:
                        os.replace(target, backup)
                        moved = True
                else:
                    backup = self._side(target.name, "new")
                    backup.touch()
                try:
                    os.replace(stage, target)
                except OSError:  # this target is unchanged (or its old file is put back): drop its backup
                    with contextlib.suppress(OSError):
                        if moved:
                            os.replace(backup, target)
                        else:
                            backup.unlink()
                    raise
                self.placed.append((target, backup))
        except OSError as exc:
            self.rollback()
            raise WriteError(f"cannot publish {target}: {describe_os_error(exc)}") from exc
        return [t for _, t in self.staged]

    def rollback(self) -> None:
        """Put back what :meth:`commit` replaced and remove the staged copies (best effort, never raises)."""
        for target, backup in reversed(self.placed):
            with contextlib.suppress(OSError):
                if backup.name.startswith(f".{target.name}.old-"):
                    os.replace(backup, target)
                else:
                    target.unlink(missing_ok=True)
                    backup.unlink(missing_ok=True)
        for stage, _ in self.staged:
            with contextlib.suppress(OSError):
                stage.unlink(missing_ok=True)
        self.placed, self.staged = [], []

    def discard(self) -> None:
        """After success: drop the backups and markers."""
        for _, backup in self.placed:
            with contextlib.suppress(OSError):
                backup.unlink(missing_ok=True)
        self.placed, self.staged = [], []


def _run_figures(run_dir: Path) -> list[Path]:
    src = run_dir / "figures"
    return [f for f in sorted(src.iterdir()) if f.is_file() and not f.name.startswith(".")] if src.is_dir() else []


def publish_figures(run_dir: Path, figures_dir: Path | None = None, *, tag: str | None = None) -> list[Path]:
    """Copy a successful run's figures into ``figures/``, all or none (:class:`FigurePublication`)."""
    pub = FigurePublication(figures_dir or paths.figures_dir(), tag or f"{run_dir.name}-{os.getpid()}")
    for f in _run_figures(run_dir):
        pub.stage_file(f)
    out = pub.commit()
    pub.discard()
    return out


def finalize_run(tmp: Path, notebook: str, parameters: dict[str, Any], status: str, wall_time_s: float,
                 context: dict[str, Any] | None = None, error: str | None = None,
                 figures_root: Path | None = None) -> tuple[str, Path | None, str | None]:
    """Record the temp run dir ``tmp``: ``(status, final run dir or None, error)``.

    ``status="ok"``: stage the run's figures, write the manifest, publish the figures, rename ``tmp`` to
    ``<run-id>``; if any step fails, the figures are put back and the run becomes ``failed``. Otherwise (or then)
    the manifest records the status and error and ``tmp`` becomes ``<run-id>-<status>``. Never raises for a
    write failure: it ends up in the returned error (and when not even the rename works, ``tmp`` stays, with
    its owner recorded, for the next run's sweep). A Ctrl-C during this waits until it is done."""
    with sigint_deferred():
        if status == "ok":
            pub = FigurePublication(figures_root or paths.figures_dir(), final_run_dir(tmp).name)
            try:
                for f in _run_figures(tmp):
                    pub.stage_file(f)
                write_json(tmp / "manifest.json", build_manifest(notebook, parameters, "ok", wall_time_s, context))
                pub.commit()
                final = final_run_dir(tmp, "ok")
                os.replace(tmp, final)
            except Exception as exc:  # noqa: BLE001 (whatever it is, the run is recorded as failed)
                pub.rollback()
                status, error = "failed", f"the run could not be recorded: {one_line(exc)}"
            else:
                pub.discard()
                (final / OWNER_FILE).unlink(missing_ok=True)
                return "ok", final, None
        final = final_run_dir(tmp, status)
        try:
            write_json(tmp / "manifest.json", build_manifest(notebook, parameters, status, wall_time_s, context,
                                                             error))
        except Exception as exc:  # noqa: BLE001
            with contextlib.suppress(OSError):
                (tmp / "manifest.json").unlink(missing_ok=True)  # never an "ok" manifest in a failed run
            error = f"{error}; its manifest could not be written: {one_line(exc)}"
        try:
            os.replace(tmp, final)
        except OSError as exc:
            return status, None, f"{error}; {tmp} could not be renamed ({describe_os_error(exc)})"
        with contextlib.suppress(OSError):
            (final / OWNER_FILE).unlink(missing_ok=True)
        return status, final, error


class RunRecord:
    """What a notebook writes: ``metrics.json``, ``context.json`` and ``figures/`` in its run directory.

    Under ``paperlib reproduce`` the harness passes ``output_dir`` (a temp run dir it finalises). Run
    interactively (``output_dir`` empty), the record makes its own temp run dir under ``runs/<notebook>/``,
    owned by this kernel's process (a kernel that stops before :meth:`finish` leaves it for the next
    ``reproduce``/``figures`` to sweep), and :meth:`finish` publishes the figures, writes the manifest and
    renames the run into place.
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
            self.path = make_temp_run(root / self.run_id)
        else:
            self.path = Path(output_dir)
            self.run_id = final_run_dir(self.path).name
        self.final_path = final_run_dir(self.path)
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
        """The run's final directory, ``runs/<notebook>/<run-id>``.

        Under the harness it returns the directory the harness renames the run to when the notebook succeeds.
        Interactive runs: publish the figures, write the manifest and rename the run into place now; raises
        :class:`RunError` (the run kept as ``<run-id>-failed``) when that cannot be done."""
        if not self.interactive or self.path == self.final_path:
            return self.final_path
        wall = (_dt.datetime.now() - self._t0).total_seconds()
        status, final, error = finalize_run(self.path, self.notebook, self.parameters, "ok", wall, self.context,
                                            figures_root=self.figures_root)
        if status != "ok":
            raise RunError(f"{error} (kept as {final or self.path})")
        assert final is not None
        self.path = final
        return final


def runs_root_of(output_dir: str | Path | None) -> Path | None:
    """The runs root the harness writes to: ``<runs_root>/<notebook>/<run-id>`` -> ``<runs_root>``."""
    return Path(output_dir).resolve().parent.parent if output_dir else None


def completed_runs(notebook: str, runs_root: Path | None = None, problems: list[str] | None = None) -> list[Path]:
    """Successful runs of ``notebook``, oldest first (hidden temp dirs and failed runs excluded).

    A run whose ``manifest.json`` cannot be read is skipped; ``problems``, when given, gets one line naming it."""
    root = (runs_root or paths.runs_dir()) / notebook
    if not root.is_dir():
        return []
    out = []
    for d in sorted(root.iterdir()):
        m = d / "manifest.json"
        if d.name.startswith(".") or not m.is_file():
            continue
        try:
            manifest = read_json(m)
        except (OSError, ValueError) as exc:
            if problems is not None:
                problems.append(f"{m} is unreadable ({one_line(exc)}); that run is skipped")
            continue
        if isinstance(manifest, dict) and manifest.get("status") == "ok" and (d / "metrics.json").is_file():
            out.append((str(manifest.get("finished_at") or ""), d.name, d))
    return [d for *_, d in sorted(out)]


def latest_run(notebook: str, runs_root: Path | None = None, problems: list[str] | None = None) -> Path | None:
    runs = completed_runs(notebook, runs_root, problems)
    return runs[-1] if runs else None
