"""The harness under faults: a full or read-only runs/ or figures/, Ctrl-C, killed processes, corrupt files, and
values checked before the first notebook starts. Papermill is replaced by an in-process stand-in that runs a
Python function per notebook (no kernel), except where a real kernel is the point (tests/test_reproduce_kill.py).
Root ignores chmod, so full and read-only folders are simulated by failing the writer's ``mkstemp``/``os.replace``."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from pathlib import Path

import nbformat
import papermill
import pytest
from helpers import write_notebook
from matplotlib.figure import Figure

from paperlib import presets
from paperlib.__main__ import main
from paperlib.atomic import WriteError
from paperlib.reproduce import ParameterError, RunInterrupted, reproduce
from paperlib.runs import (
    OWNER_FILE,
    FigurePublication,
    RunRecord,
    build_manifest,
    git_state,
    gpu_info,
    read_json,
    sweep_stale_runs,
    write_json,
)

PARAMS = 'preset = "smoke"\nvalue = 1\noutput_dir = ""'
REAL_MKSTEMP = __import__("tempfile").mkstemp
REAL_REPLACE = os.replace


def _notebook(path: Path, body: str = "pass", params: str = PARAMS) -> Path:
    return write_notebook(path, body, params)


class Disk:
    """Makes writes under ``root`` fail with ``code`` while ``full`` (the atomic writer's mkstemp, and the
    stand-in papermill's own notebook write), optionally only for temp names starting with ``prefix``."""

    def __init__(self, monkeypatch, root: Path, code: int = errno.ENOSPC, prefix: str = "") -> None:
        self.root, self.code, self.prefix, self.full = root, code, prefix, False
        monkeypatch.setattr("tempfile.mkstemp", self.mkstemp)

    def blocks(self, folder: Path, name: str = "") -> bool:
        return self.full and Path(folder).resolve().is_relative_to(self.root.resolve()) and name.startswith(self.prefix)

    def error(self) -> OSError:
        return OSError(self.code, os.strerror(self.code))

    def mkstemp(self, suffix=None, prefix=None, dir=None, text=False):  # noqa: A002 (tempfile's signature)
        if dir is not None and self.blocks(Path(dir), prefix or ""):
            raise self.error()
        return REAL_MKSTEMP(suffix, prefix, dir, text)


class FakePapermill:
    """``papermill.execute_notebook`` in this process: writes the notebook, runs ``bodies[name](output_dir,
    parameters)``; an exception in the body becomes a PapermillExecutionError, as from a cell; a full ``disk``
    makes papermill's own write of the output notebook fail (an OSError in the harness, as the real one)."""

    def __init__(self, monkeypatch, bodies: dict, disk: Disk | None = None) -> None:
        self.bodies, self.disk, self.calls = bodies, disk, []
        monkeypatch.setattr(papermill, "execute_notebook", self)

    def _write(self, src: str, dst: str) -> None:
        if self.disk is not None and self.disk.blocks(Path(dst).parent):
            raise self.disk.error()
        nbformat.write(nbformat.read(src, as_version=4), dst)

    def __call__(self, input_path, output_path, parameters=None, **kwargs):
        name = Path(input_path).stem
        self.calls.append(name)
        self._write(input_path, output_path)
        try:
            self.bodies[name](Path(parameters["output_dir"]), parameters)
        except papermill.PapermillExecutionError:
            raise
        except Exception as e:
            self._write(input_path, output_path)  # papermill saves the notebook after the failed cell
            raise papermill.PapermillExecutionError(1, 2, "", type(e).__name__, str(e), []) from None
        self._write(input_path, output_path)


def good(name: str, finished: dict | None = None):
    """A notebook that draws one figure, records its context and metrics, and finishes its RunRecord."""

    def body(out: Path, params: dict) -> None:
        record = RunRecord(name, out, parameters={"preset": params["preset"]})
        fig = Figure()
        fig.add_subplot().plot([0, params.get("value", 1)])
        record.save_figure(fig, f"{name}_fig")
        record.set_context(device="cpu", data_fingerprint="abc")
        record.save_metrics({"key_metric": {"name": "value", "value": float(params.get("value", 1))}})
        if finished is not None:
            finished[name] = record.finish()

    return body


def _project(tmp_path: Path, monkeypatch, *names: str) -> tuple[Path, Path, Path]:
    """A PAPERLIB_ROOT with notebooks ``names`` (so the CLI works on it): (notebooks, runs, figures)."""
    root = tmp_path / "proj"
    for n in names:
        _notebook(root / "notebooks" / f"{n}.ipynb")
    (root / "runs").mkdir(parents=True)
    (root / "figures").mkdir()
    monkeypatch.setenv("PAPERLIB_ROOT", str(root))
    return root / "notebooks", root / "runs", root / "figures"


def _leftovers(*roots: Path) -> list[str]:
    """Hidden temp things a run must not leave: temp run dirs, atomic-writer temps, staged/backup figures."""
    return sorted(str(p) for r in roots for p in r.rglob(".*")
                  if p.name.startswith((".tmp-", ".write-check")) or ".tmp" in p.name
                  or any(f".{k}-" in p.name for k in ("stage", "old", "new")))


# ------------------------------------------------------------------------------------------- full runs/
def test_runs_folder_filling_up_fails_that_run_and_the_batch_goes_on_to_the_summary(tmp_path, monkeypatch, capsys):
    nb_dir, runs, figs = _project(tmp_path, monkeypatch, "a", "b")
    disk = Disk(monkeypatch, runs)

    def fills_the_disk(out: Path, params: dict) -> None:
        record = RunRecord("a", out)
        fig = Figure()
        fig.add_subplot().plot([0, 1])
        record.save_figure(fig, "a_fig")
        disk.full = True  # from here on nothing can be written under runs/
        record.save_metrics({"key_metric": {"name": "v", "value": 1.0}})

    fake = FakePapermill(monkeypatch, {"a": fills_the_disk, "b": good("b")}, disk)
    assert main(["reproduce", "--preset", "smoke"]) == 1
    out, err = capsys.readouterr()
    assert fake.calls == ["a"]  # b's run folder could not even be created: b never started
    assert "Traceback" not in out + err and "Summary" in out
    table = out.split("Summary")[1].strip().splitlines()[1:]
    assert {row.split()[0]: row.split()[1] for row in table} == {"a": "failed", "b": "failed"}
    (failed,) = (runs / "a").iterdir()
    assert failed.name.endswith("-failed")
    assert not (failed / "manifest.json").exists()  # it could not be written; no stale "ok" one either
    assert "no space left" in out and "could not be written" in out
    assert not (runs / "b").exists() or not any((runs / "b").iterdir())
    assert _leftovers(runs, figs) == []
    assert not any(figs.iterdir())


def test_unwritable_runs_or_figures_is_refused_before_the_first_notebook(tmp_path, monkeypatch, capsys):
    nb_dir, runs, figs = _project(tmp_path, monkeypatch, "a")
    fake = FakePapermill(monkeypatch, {"a": good("a")})
    disk = Disk(monkeypatch, figs, errno.EACCES)
    disk.full = True
    with pytest.raises(WriteError, match=r"figures folder .*figures cannot be written: not writable"):
        reproduce("smoke", notebooks_dir=nb_dir, runs_root=runs, figures_root=figs)
    disk.root = runs
    disk.code = errno.ENOSPC
    assert main(["reproduce", "--preset", "smoke"]) == 2
    assert "error: runs folder" in capsys.readouterr().err
    assert fake.calls == [] and not any(runs.iterdir())


# ------------------------------------------------------------------------------------------- figures/ all or none
@pytest.mark.parametrize("fault", ["stage", "rename"])
def test_a_run_publishes_all_its_figures_or_none_and_is_ok_only_then(tmp_path, monkeypatch, fault):
    nb_dir, runs, figs = _project(tmp_path, monkeypatch, "a", "b")
    for ext in ("pdf", "png"):
        (figs / f"a_fig.{ext}").write_bytes(b"old " + ext.encode())
    if fault == "stage":  # figures/ full: the PNG cannot be staged (the PDF could)
        Disk(monkeypatch, figs, errno.ENOSPC, prefix="..a_fig.png.stage").full = True  # the writer's temp
    else:  # the PDF is already in place when the PNG's rename fails

        def replace(src, dst):
            if Path(dst) == figs / "a_fig.png":
                raise PermissionError(errno.EACCES, "Permission denied")
            return REAL_REPLACE(src, dst)

        monkeypatch.setattr("os.replace", replace)
    FakePapermill(monkeypatch, {"a": good("a"), "b": good("b")})
    a, b = reproduce("smoke", notebooks_dir=nb_dir, runs_root=runs, figures_root=figs)
    assert (a.status, b.status) == ("failed", "ok")
    assert a.run_dir.name.endswith("-failed") and a.key_value is None
    man = read_json(a.run_dir / "manifest.json")
    assert man["status"] == "failed" and str(figs / "a_fig.png") in man["error"]
    assert ("no space left" if fault == "stage" else "not writable") in man["error"]
    # none of a's figures were published: the old ones are intact; b's were
    assert {p.name: p.read_bytes() for p in figs.iterdir()} == {
        "a_fig.pdf": b"old pdf", "a_fig.png": b"old png",
        "b_fig.pdf": (b.run_dir / "figures" / "b_fig.pdf").read_bytes(),
        "b_fig.png": (b.run_dir / "figures" / "b_fig.png").read_bytes()}
    assert _leftovers(runs, figs) == []


def test_figure_publication_rolls_back_new_files_and_keeps_old_ones(tmp_path, monkeypatch):
    (tmp_path / "x.png").write_bytes(b"old")
    pub = FigurePublication(tmp_path, "t1")
    pub.stage("x.png", lambda f: f.write(b"new x"))
    pub.stage("y.png", lambda f: f.write(b"new y"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".x.png.stage-t1", ".y.png.stage-t1", "x.png"]
    pub.commit()
    pub.rollback()  # e.g. the run dir could not be renamed after the figures were placed
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == {"x.png": b"old"}
    pub = FigurePublication(tmp_path, "t2")
    pub.stage("x.png", lambda f: f.write(b"new x"))
    assert pub.commit() == [tmp_path / "x.png"]
    pub.discard()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == {"x.png": b"new x"}


# ------------------------------------------------------------------------------------------- interrupts
@pytest.mark.parametrize("where", ["harness", "kernel"])
def test_ctrl_c_records_the_run_as_interrupted_in_one_line_exit_130(tmp_path, monkeypatch, capsys, where):
    nb_dir, runs, figs = _project(tmp_path, monkeypatch, "a", "b")

    def interrupted(out: Path, params: dict) -> None:
        RunRecord("a", out).save_metrics({"key_metric": {"name": "v", "value": 1.0}})
        if where == "harness":
            raise KeyboardInterrupt  # SIGINT to the harness
        raise papermill.PapermillExecutionError(1, 2, "", "KeyboardInterrupt", "", [])  # Ctrl-C reached the kernel

    fake = FakePapermill(monkeypatch, {"a": interrupted, "b": good("b")})
    assert main(["reproduce", "--preset", "smoke"]) == 130
    out, err = capsys.readouterr()
    assert fake.calls == ["a"]
    (run,) = (runs / "a").iterdir()
    assert run.name.endswith("-interrupted")
    man = read_json(run / "manifest.json")
    assert man["status"] == "interrupted" and "KeyboardInterrupt" in man["error"]
    assert err.strip().splitlines() == [f"interrupted: a recorded as {run}; 0 earlier notebook(s) recorded"]
    assert "Traceback" not in out + err and "Summary" not in out
    assert _leftovers(runs, figs) == [] and not any(figs.iterdir())
    with pytest.raises(RunInterrupted) as e:
        reproduce("smoke", notebooks_dir=nb_dir, runs_root=runs, figures_root=figs)
    assert [r.status for r in e.value.results] == ["interrupted"]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_temp_runs_of_dead_processes_are_swept_and_their_figures_put_back(tmp_path, monkeypatch, capsys):
    nb_dir, runs, figs = _project(tmp_path, monkeypatch, "a")
    dead = _dead_pid()
    killed = runs / "a" / ".tmp-20250101-000000-smoke-dead01"
    (killed / "figures").mkdir(parents=True)
    write_json(killed / OWNER_FILE, {"pid": dead, "host": None, "started": None})
    live = runs / "a" / ".tmp-20250101-000000-smoke-live01"
    live.mkdir()
    write_json(live / OWNER_FILE, {"pid": os.getpid(), "host": None, "started": None})
    # the killed run was half way through publishing: x.png replaced (old kept), y.png new, z.png still staged
    (figs / "x.png").write_bytes(b"killed run's x")
    (figs / ".x.png.old-20250101-000000-smoke-dead01").write_bytes(b"old x")
    (figs / "y.png").write_bytes(b"killed run's y")
    (figs / ".y.png.new-20250101-000000-smoke-dead01").touch()
    (figs / ".z.png.stage-20250101-000000-smoke-dead01").write_bytes(b"staged z")
    (figs / ".w.png.stage-20250101-000000-smoke-live01").write_bytes(b"live run's")
    lines = sweep_stale_runs(runs, figs)
    assert lines == [f"restored 2 figure(s) in {figs} that the stopped run 20250101-000000-smoke-dead01 had half "
                     "published",
                     f"removed {killed}: its process {dead} is gone (the run was killed or its kernel died)"]
    assert not killed.exists() and live.is_dir()
    assert {p.name: p.read_bytes() for p in figs.iterdir()} == {
        "x.png": b"old x", ".w.png.stage-20250101-000000-smoke-live01": b"live run's"}
    # the CLI `figures` sweeps too, and says so
    write_json(killed / OWNER_FILE, {"pid": dead, "host": None, "started": None})
    main(["figures"])
    assert f"removed {killed}" in capsys.readouterr().out and not killed.exists()
    # and so does the next reproduce, before its first notebook
    write_json(killed / OWNER_FILE, {"pid": dead, "host": None, "started": None})
    FakePapermill(monkeypatch, {"a": good("a")})
    (res,) = reproduce("smoke", notebooks_dir=nb_dir, runs_root=runs, figures_root=figs)
    out = capsys.readouterr().out
    assert out.index(f"[reproduce] removed {killed}") < out.index("[reproduce] a (preset=smoke)")
    assert res.status == "ok" and not killed.exists() and live.is_dir()


def test_finish_returns_the_final_run_dir_and_outputs_are_0644(tmp_path, monkeypatch):
    nb_dir, runs, figs = _project(tmp_path, monkeypatch, "a")
    monkeypatch.setenv("PAPERLIB_COMPILE", "0")
    finished: dict[str, Path] = {}
    FakePapermill(monkeypatch, {"a": good("a", finished)})
    old = os.umask(0o022)
    try:
        (res,) = reproduce("smoke", notebooks_dir=nb_dir, runs_root=runs, figures_root=figs)
    finally:
        os.umask(old)
    assert res.status == "ok" and finished["a"] == res.run_dir and not res.run_dir.name.startswith(".")
    assert sorted(p.name for p in res.run_dir.iterdir()) == ["a.ipynb", "context.json", "figures", "manifest.json",
                                                             "metrics.json"]
    files = [p for p in [*res.run_dir.rglob("*"), *figs.iterdir()] if p.is_file() and p.suffix != ".ipynb"]
    assert len(files) == 3 + 2 + 2
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {p.name: "0o644" for p in files}
    man = read_json(res.run_dir / "manifest.json")
    assert man["environment"]["PAPERLIB_COMPILE"] == "0" and man["gpu"] == gpu_info()


# ------------------------------------------------------------------------------------------- manifests
def test_manifest_records_gpu_cuda_cudnn_and_paperlib_variables(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"NVIDIA H100 #{i}")
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91002)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setenv("PAPERLIB_NATIVE", "0")
    man = build_manifest("a", {"preset": "smoke"}, "ok", 1.0)
    assert man["gpu"] == {"names": ["NVIDIA H100 #0", "NVIDIA H100 #1"], "cuda": "12.8", "cudnn": 91002}
    assert man["environment"]["PAPERLIB_NATIVE"] == "0"
    assert all(k.startswith("PAPERLIB_") for k in man["environment"])


def test_git_dirty_counts_untracked_files(tmp_path):
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-qm", "a")
    assert git_state(tmp_path)["dirty"] is False
    (tmp_path / "new_module.py").write_text("y = 2\n")  # not yet added, but imported by a notebook
    assert git_state(tmp_path)["dirty"] is True


# ------------------------------------------------------------------------------------------- corrupt metrics
def test_figures_skips_a_corrupt_metrics_or_manifest_names_it_and_redraws_the_rest(tmp_path, monkeypatch, capsys):
    from paperlib import figures

    nb_dir, runs, figs = _project(tmp_path, monkeypatch)
    figures._load_all()
    for nb in ("_a", "_b", "_c"):
        monkeypatch.setitem(figures.FIGURES, nb, {f"{nb}_fig": lambda m: Figure()})
        run = runs / nb / "r1"
        write_json(run / "manifest.json", {"status": "ok", "finished_at": "2025-01-01T00:00:00"})
        write_json(run / "metrics.json", {"key_metric": {"name": "v", "value": 1.0}})
    (runs / "_a" / "r1" / "metrics.json").write_text('{"key_metric": {"na')  # truncated by a full disk
    (runs / "_c" / "r1" / "manifest.json").write_text("")
    assert main(["figures"]) == 1
    out, err = capsys.readouterr()
    assert "_b: _b_fig" in out and "_a:" not in out and "_c:" not in out
    assert f"{runs / '_a' / 'r1' / 'metrics.json'} could not be read or drawn (JSONDecodeError" in err
    assert f"{runs / '_c' / 'r1' / 'manifest.json'} is unreadable (JSONDecodeError" in err
    assert sorted(p.name for p in figs.iterdir()) == ["_b_fig.pdf", "_b_fig.png"]


# ------------------------------------------------------------------------------------------- values up front
SETTINGS_NB = """
from paperlib import presets
cfg = presets.resolve("_toy_nb", preset, seeds=seeds, gammas=gammas)
"""
TOY_PARAMS = 'preset = "smoke"\nseeds = []\ngammas = []\ndevice = "auto"\ndata_dir = ""\nthreads = 1\noutput_dir = ""'


@pytest.fixture
def toy_presets(monkeypatch):
    def validate(cfg):
        if any(g < 1 for g in cfg["gammas"]):
            raise ValueError(f"gammas={cfg['gammas']}: every imbalance ratio must be >= 1")

    monkeypatch.setitem(presets.PRESETS, "_toy_nb", {p: {"seeds": [0], "gammas": [10.0]} for p in presets.PRESET_NAMES})
    monkeypatch.setitem(presets.VALIDATORS, "_toy_nb", validate)


@pytest.mark.parametrize("params, match", [
    ({"gammas": [0.5]}, r"b: gammas=\[0.5\]: every imbalance ratio must be >= 1"),
    ({"seeds": "abc"}, r"b: seeds='abc' must be a list like the preset's \[0\]"),
    ({"gammas": 5}, r"b: gammas=5 must be a list like the preset's \[10.0\]"),
    ({"seeds": ["x"]}, r"b: seeds\[...\]='x' must be an integer"),
    ({"device": "gpu"}, r"b: device='gpu': use auto, cpu, cuda or cuda:N"),
    ({"data_dir": 3}, r"b: data_dir=3 must be a string"),
    ({"threads": "2"}, r"b: threads='2' must be an integer, like its default 1"),
    ({"preset": "fast"}, r"b: preset='fast': use one of smoke, default, paper"),
])
def test_every_value_is_checked_before_the_first_notebook_starts(tmp_path, monkeypatch, toy_presets, params, match):
    nb_dir, runs, figs = _project(tmp_path, monkeypatch)
    _notebook(nb_dir / "a.ipynb")
    _notebook(nb_dir / "b.ipynb", SETTINGS_NB, TOY_PARAMS)
    fake = FakePapermill(monkeypatch, {"a": good("a")})
    with pytest.raises(ParameterError, match=match) as e:
        reproduce("smoke", notebooks_dir=nb_dir, runs_root=runs, figures_root=figs, extra_parameters={"b": params})
    assert "invalid literal" not in str(e.value) and "not iterable" not in str(e.value)
    assert fake.calls == [] and not any(runs.iterdir())


def test_real_notebooks_values_are_checked_up_front(tmp_path, monkeypatch, capsys):
    """The quickstart would run to its end before climbq failed on gammas=[0.5]."""
    fake = FakePapermill(monkeypatch, {})
    assert main(["reproduce", "--preset", "smoke", "--only", "00_quickstart,climbq", "--set",
                 "climbq:gammas=[0.5]"]) == 2
    assert "error: climbq: gammas" in capsys.readouterr().err
    assert main(["reproduce", "--preset", "smoke", "--only", "dgms", "--set", 'overrides={"num_components": 8}']) == 2
    assert "dgms: num_components=8 must be a list like the preset's" in capsys.readouterr().err
    assert main(["reproduce", "--preset", "smoke", "--only", "levene", "--set", "seeds=abc"]) == 2
    assert "levene: seeds='abc' must be a list" in capsys.readouterr().err
    assert fake.calls == []


@pytest.mark.parametrize("argv, match", [
    (["--only", ""], "--only '' names no notebook"),
    (["--only", ","], "names no notebook"),
    (["--timeout", "0"], "--timeout 0: give a per-cell limit in seconds >= 1"),
    (["--timeout", "-5"], "--timeout -5"),
    (["--data-dir", "cbq=/data"], "'cbq' names no notebook \\(notebooks: 00_quickstart"),
    (["--only", "climbq", "--data-dir", "cbp=/data"], "notebook 'cbp' is not among the notebooks run"),
    (["--set", "output_dir=/tmp/x"], "output_dir is reserved"),
    (["--set", "climbq:output_dir=/tmp/x"], "output_dir is reserved"),
])
def test_cli_refuses_empty_only_bad_timeout_unknown_data_dir_notebook_and_output_dir(argv, match, capsys,
                                                                                      monkeypatch):
    fake = FakePapermill(monkeypatch, {})
    assert main(["reproduce", "--preset", "smoke", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert __import__("re").search(match, err), err
    assert fake.calls == []


def test_api_refuses_reserved_parameter_empty_only_and_bad_timeout(tmp_path, monkeypatch):
    nb_dir, runs, figs = _project(tmp_path, monkeypatch, "a")
    with pytest.raises(ParameterError, match="a: output_dir is reserved"):
        reproduce("smoke", notebooks_dir=nb_dir, runs_root=runs, extra_parameters={"a": {"output_dir": "x"}})
    with pytest.raises(ParameterError, match="only names no notebook"):
        reproduce("smoke", only=[], notebooks_dir=nb_dir, runs_root=runs)
    with pytest.raises(ParameterError, match="timeout=0"):
        reproduce("smoke", notebooks_dir=nb_dir, runs_root=runs, execution_timeout=0)


# ------------------------------------------------------------------------------------------- the FP32 cache
@pytest.fixture(scope="module")
def small_digits():
    from paperlib.data.digits import load_digits

    train, test = load_digits(size=8, channels=1, seed=0)
    return train.subset(slice(0, 128)), test.subset(slice(0, 64))


def _tiny(num_classes=10, in_channels=1):
    from torch import nn

    return nn.Sequential(nn.Flatten(), nn.Linear(64 * in_channels, 16), nn.BatchNorm1d(16), nn.ReLU(),
                         nn.Linear(16, num_classes))


def _pretrain(data, cache_dir, monkeypatch):
    import paperlib.pretrain as pretrain
    from paperlib.models import MODELS
    from paperlib.train import TrainConfig

    monkeypatch.setitem(MODELS, "_tiny", _tiny)  # the cache logic, not the network, is under test
    fits = []
    real = pretrain.fit
    monkeypatch.setattr(pretrain, "fit", lambda *a, **k: (fits.append(1), real(*a, **k))[1])
    model, _ = pretrain.pretrained_fp32("_tiny", {"num_classes": 10, "in_channels": 1}, *data,
                                        TrainConfig(epochs=1, lr=0.05), device="cpu", cache_dir=cache_dir)
    monkeypatch.setattr(pretrain, "fit", real)
    return model, len(fits)


def _same(a, b) -> bool:
    import torch

    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_a_bad_fp32_cache_entry_is_named_and_rebuilt(tmp_path, monkeypatch, capsys, small_digits):
    first, fits = _pretrain(small_digits, tmp_path, monkeypatch)
    (entry,) = tmp_path.glob("fp32-*.pt")
    assert fits == 1 and stat.S_IMODE(entry.stat().st_mode) == 0o644
    weight = first.state_dict()["1.weight"].detach().numpy().tobytes()
    for damage in ("truncated", "empty", "flipped byte"):
        data = bytearray(entry.read_bytes())
        if damage == "truncated":
            data = data[: len(data) // 2]  # what a full disk used to leave
        elif damage == "empty":
            data = bytearray()
        else:  # a flipped bit inside a weight: torch loads it without complaint, the checksum does not match
            at = bytes(data).find(weight[:16])
            assert at > 0
            data[at + 4] ^= 0xFF
        entry.write_bytes(bytes(data))
        again, fits = _pretrain(small_digits, tmp_path, monkeypatch)
        err = capsys.readouterr().err.strip().splitlines()
        assert fits == 1 and len(err) == 1, (damage, err)
        assert err[0].startswith(f"FP32 cache entry {entry} is ") and err[0].endswith(": retraining it")
        assert ("checksum does not match" in err[0]) == (damage == "flipped byte")
        assert _same(first, again)  # the same network (same seed), rebuilt
        _, fits = _pretrain(small_digits, tmp_path, monkeypatch)
        assert fits == 0 and capsys.readouterr().err == ""  # and used from now on


def test_an_fp32_cache_entry_without_checksum_still_loads_and_a_failed_cache_write_is_not_fatal(
        tmp_path, monkeypatch, capsys, small_digits):
    import torch

    from paperlib.pretrain import DIGEST_KEY

    first, _ = _pretrain(small_digits, tmp_path, monkeypatch)
    (entry,) = tmp_path.glob("fp32-*.pt")
    state = torch.load(entry, weights_only=True)
    state.pop(DIGEST_KEY)
    torch.save(state, entry)  # an entry written before checksums
    assert _pretrain(small_digits, tmp_path, monkeypatch)[1] == 0
    entry.unlink()
    Disk(monkeypatch, tmp_path).full = True
    model, fits = _pretrain(small_digits, tmp_path, monkeypatch)
    assert fits == 1 and list(tmp_path.iterdir()) == []  # no entry, no stray temp file
    assert capsys.readouterr().err.startswith("the FP32 network is not cached: cannot write")
    assert _same(first, model)
