"""``reproduce --jobs N``: notebooks run at once, one thread each, a notebook that reads another's runs waits for
it, the results come back in the notebooks' order, and Ctrl-C records every running notebook as interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import write_notebook
from test_reproduce_kill import _gone

from paperlib.reproduce import ParameterError, reproduce
from paperlib.runs import OWNER_FILE, read_json

pytestmark = pytest.mark.notebooks

PARAMS = 'preset = "smoke"\noutput_dir = ""'
STAMP = """import json, os, pathlib, time
from paperlib.runs import RunRecord
t0 = time.time()
time.sleep({sleep})
pathlib.Path({out!r}).write_text(json.dumps({{"start": t0, "end": time.time(),
                                             "threads": os.environ.get("OMP_NUM_THREADS")}}))
record = RunRecord({name!r}, output_dir, parameters={{"preset": preset}})
record.set_context(device="cpu", data_fingerprint="abc")
record.save_metrics({{"key_metric": {{"name": "slept", "value": {sleep}}}}})
print("run recorded in", record.finish())
"""


def _stamping(root: Path, name: str, out: Path, sleep: float) -> None:
    write_notebook(root / "notebooks" / f"{name}.ipynb", STAMP.format(sleep=sleep, out=str(out), name=name), PARAMS)


def test_two_jobs_overlap_keep_the_order_and_levene_waits_for_climbq(tmp_path, monkeypatch):
    root = tmp_path / "proj"
    stamps = {n: tmp_path / f"{n}.json" for n in ("a_first", "climbq", "levene")}
    _stamping(root, "a_first", stamps["a_first"], 4)
    _stamping(root, "climbq", stamps["climbq"], 4)
    _stamping(root, "levene", stamps["levene"], 0)
    monkeypatch.setenv("PAPERLIB_ROOT", str(root))
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # restored after the batch
    results = reproduce("smoke", notebooks_dir=root / "notebooks", runs_root=root / "runs",
                        figures_root=root / "figures", jobs=2)
    assert [r.notebook for r in results] == ["a_first", "climbq", "levene"]
    assert [r.status for r in results] == ["ok"] * 3, [r.error for r in results]
    s = {n: json.loads(p.read_text()) for n, p in stamps.items()}
    assert s["a_first"]["start"] < s["climbq"]["end"] and s["climbq"]["start"] < s["a_first"]["end"]  # at once
    assert s["levene"]["start"] >= s["climbq"]["end"]  # levene reads climbq's runs: it waited
    assert {v["threads"] for v in s.values()} == {"1"}  # one thread per kernel
    assert os.environ["OMP_NUM_THREADS"] == "7"
    with pytest.raises(ParameterError, match="jobs=0"):
        reproduce("smoke", notebooks_dir=root / "notebooks", runs_root=root / "runs", jobs=0)


def test_sigint_with_two_jobs_records_both_running_notebooks_as_interrupted(tmp_path):
    root = tmp_path / "proj"
    markers = [tmp_path / "a.pid", tmp_path / "b.pid"]
    for name, marker in zip(("a_sleeps", "b_sleeps"), markers, strict=True):
        write_notebook(root / "notebooks" / f"{name}.ipynb", "import os, pathlib, time\n"
                       f"pathlib.Path({str(marker)!r}).write_text(str(os.getpid()))\ntime.sleep(300)", PARAMS)
    write_notebook(root / "notebooks" / "c_never.ipynb", "raise SystemExit('must not run')", PARAMS)
    proc = subprocess.Popen([sys.executable, "-m", "paperlib", "reproduce", "--preset", "smoke", "--jobs", "2"],
                            env={**os.environ, "PAPERLIB_ROOT": str(root)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 240
        while not all(m.is_file() and m.read_text() for m in markers):
            assert proc.poll() is None and time.monotonic() < end, proc.communicate()
            time.sleep(0.2)
        kernels = [int(m.read_text()) for m in markers]
        proc.send_signal(signal.SIGINT)  # to the harness only: it interrupts the kernels itself
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in out + err
    runs = {n: list((root / "runs" / n).iterdir()) for n in ("a_sleeps", "b_sleeps")}
    assert all(len(v) == 1 and v[0].name.endswith("-interrupted") for v in runs.values()), runs
    assert not (root / "runs" / "c_never").exists()
    (line,) = err.strip().splitlines()
    assert line == (f"interrupted: a_sleeps recorded as {runs['a_sleeps'][0]}; b_sleeps recorded as "
                    f"{runs['b_sleeps'][0]}; 0 earlier notebook(s) recorded")
    for v in runs.values():
        man = read_json(v[0] / "manifest.json")
        assert man["status"] == "interrupted" and not (v[0] / OWNER_FILE).exists()
    assert all(_gone(k) for k in kernels), "a kernel outlived the harness"
