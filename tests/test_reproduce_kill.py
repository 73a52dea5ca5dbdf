"""Real processes stopped for real: SIGINT and SIGKILL of ``python -m paperlib reproduce`` while a kernel runs a
cell, and papermill run directly on a notebook that fails after making an interactive RunRecord."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import papermill
import pytest
from helpers import write_notebook

from paperlib.__main__ import main
from paperlib.runs import OWNER_FILE, read_json, sweep_stale_runs

pytestmark = pytest.mark.notebooks

PARAMS = 'preset = "smoke"\noutput_dir = ""'


def _notebook(path: Path, body: str, params: str = PARAMS) -> Path:
    return write_notebook(path, body, params)


def _gone(pid: int, within: float = 20.0) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        time.sleep(0.2)
    return False


def _start(tmp_path: Path) -> tuple[subprocess.Popen, Path, int]:
    """``reproduce`` on a project whose first notebook records its kernel pid and then sleeps."""
    root, marker = tmp_path / "proj", tmp_path / "kernel.pid"
    _notebook(root / "notebooks" / "a_sleeps.ipynb",
              f"import os, pathlib, time\npathlib.Path({str(marker)!r}).write_text(str(os.getpid()))\ntime.sleep(300)")
    _notebook(root / "notebooks" / "b_never.ipynb", "raise SystemExit('must not run')")
    proc = subprocess.Popen([sys.executable, "-m", "paperlib", "reproduce", "--preset", "smoke"],
                            env={**os.environ, "PAPERLIB_ROOT": str(root)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 240
    while not marker.is_file() or not marker.read_text():
        assert proc.poll() is None and time.monotonic() < end, proc.communicate()
        time.sleep(0.2)
    return proc, root, int(marker.read_text())


def test_sigint_records_the_run_as_interrupted_in_one_line_exit_130(tmp_path):
    proc, root, kernel = _start(tmp_path)
    try:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in out + err
    (run,) = (root / "runs" / "a_sleeps").iterdir()
    assert run.name.endswith("-interrupted") and not (root / "runs" / "b_never").exists()
    assert err.strip().splitlines() == [f"interrupted: a_sleeps recorded as {run}; 0 earlier notebook(s) recorded"]
    man = read_json(run / "manifest.json")
    assert man["status"] == "interrupted" and "KeyboardInterrupt" in man["error"]
    assert (run / "a_sleeps.ipynb").is_file() and not (run / OWNER_FILE).exists()
    assert _gone(kernel), "the kernel outlived the harness"


def test_sigkill_leaves_a_temp_run_that_the_next_command_removes(tmp_path, monkeypatch, capsys):
    proc, root, kernel = _start(tmp_path)
    proc.kill()
    proc.communicate(timeout=60)
    with contextlib.suppress(ProcessLookupError):
        os.kill(kernel, signal.SIGKILL)  # an orphaned kernel would keep writing into the temp run
    (tmp,) = (root / "runs" / "a_sleeps").iterdir()
    assert tmp.name.startswith(".tmp-") and read_json(tmp / OWNER_FILE)["pid"] == proc.pid
    monkeypatch.setenv("PAPERLIB_ROOT", str(root))
    main(["figures"])
    assert f"removed {tmp}: its process {proc.pid} is gone" in capsys.readouterr().out
    assert not any((root / "runs" / "a_sleeps").iterdir())


INTERACTIVE = """
from pathlib import Path
from matplotlib.figure import Figure
from paperlib.runs import RunRecord

done = RunRecord("inter", "", parameters={"preset": preset}, runs_root=Path(runs_root), figures_root=Path(figs))
fig = Figure()
fig.add_subplot().plot([0, 1])
done.save_figure(fig, "inter_fig")
done.save_metrics({"key_metric": {"name": "v", "value": 1.0}})
print("run recorded in", done.finish())
left = RunRecord("inter", "", parameters={"preset": preset}, runs_root=Path(runs_root), figures_root=Path(figs))
left.save_metrics({"key_metric": {"name": "v", "value": 2.0}})
raise ValueError("boom")
"""


def test_papermill_on_a_failing_notebook_leaves_a_temp_run_the_next_sweep_removes(tmp_path, run_dirs):
    runs, figs = run_dirs
    nb = _notebook(tmp_path / "inter.ipynb", INTERACTIVE, 'preset = "smoke"\nruns_root = ""\nfigs = ""')
    with pytest.raises(papermill.PapermillExecutionError, match="boom"):
        papermill.execute_notebook(str(nb), str(tmp_path / "out.ipynb"), kernel_name="python3", progress_bar=False,
                                   parameters={"runs_root": str(runs), "figs": str(figs)}, cwd=str(tmp_path))
    done, tmp = sorted((runs / "inter").iterdir(), key=lambda p: p.name.startswith(".tmp-"))
    assert read_json(done / "manifest.json")["status"] == "ok" and sorted(p.name for p in figs.iterdir()) == [
        "inter_fig.pdf", "inter_fig.png"]
    printed = [o["text"] for c in nbformat.read(tmp_path / "out.ipynb", as_version=4).cells
               for o in c.get("outputs", []) if o.get("name") == "stdout"]
    assert printed == [f"run recorded in {done}\n"]  # the final directory, not the temp one
    assert tmp.name.startswith(".tmp-")
    kernel = read_json(tmp / OWNER_FILE)["pid"]
    assert _gone(kernel)
    assert sweep_stale_runs(runs, figs) == [
        f"removed {tmp}: its process {kernel} is gone (the run was killed or its kernel died)"]
    assert [p.name for p in (runs / "inter").iterdir()] == [done.name]
