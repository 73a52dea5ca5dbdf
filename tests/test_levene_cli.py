"""`python -m paperlib levene FILE` on good and bad files."""

import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from paperlib.__main__ import main

GROUPS = [[1, 2, 3, 4], [1, 5, 9, 2.5], [2, 2.2, 2.4, 2.6]]  # spec TV-L


def _csv(path, groups=GROUPS):
    rows = [{"label": k, "f0": v} for k, g in enumerate(groups) for v in g]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_csv_matches_scipy_and_writes_table(tmp_path, capsys):
    out = tmp_path / "table.csv"
    assert main(["levene", str(_csv(tmp_path / "f.csv")), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    w = stats.levene(*GROUPS, center="mean").statistic
    assert f"W = {w:.6g}" in text and "W = 5.40753" in text
    table = pd.read_csv(out)
    assert list(table["n"]) == [4, 4, 4] and table["W"].iloc[0] == pytest.approx(5.4075255, rel=1e-6)
    assert table["p"].iloc[0] == pytest.approx(0.028682, rel=1e-4)


def test_median_center_and_npz(tmp_path, capsys):
    rng = np.random.default_rng(0)
    groups = [rng.normal(0, s, n) for s, n in [(1, 30), (2, 25), (1.5, 40)]]
    np.savez(tmp_path / "f.npz", features=np.concatenate(groups)[:, None],
             labels=np.repeat([0, 1, 2], [30, 25, 40]))
    assert main(["levene", str(tmp_path / "f.npz"), "--center", "median"]) == 0
    w = stats.levene(*groups, center="median").statistic
    assert f"W = {w:.6g}" in capsys.readouterr().out


@pytest.mark.parametrize("content, message", [
    ("cls,f0\n0,1\n0,2\n1,3\n1,4\n", "no 'label' column"),
    ("label,f0\n0,1\n0,2\n1,3\n", r"class\(es\) \[1\] have fewer than 2 samples"),
    ("label,f0\n0,1\n0,x\n1,3\n1,4\n", r"non-numeric values in column\(s\) \['f0'\]"),
    ("label,f0\n0,1\n0,nan\n1,3\n1,4\n", "NaN or inf"),
    ("label,f0\n0,1\n0,2\n1.5,3\n1,4\n", "labels must be integers"),
    ("label\n0\n1\n", "no feature columns"),
])
def test_bad_csv_exits_2_with_a_clear_message(tmp_path, capsys, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    assert main(["levene", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err)


def test_bad_npz_and_missing_file(tmp_path, capsys):
    np.savez(tmp_path / "f.npz", feats=np.zeros((4, 2)), labels=np.array([0, 0, 1, 1]))
    assert main(["levene", str(tmp_path / "f.npz")]) == 2
    assert "missing array(s) ['features']" in capsys.readouterr().err
    assert main(["levene", str(tmp_path / "none.csv")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_module_entry_point(tmp_path):
    res = subprocess.run([sys.executable, "-m", "paperlib", "levene", str(_csv(tmp_path / "f.csv"))],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "W = 5.40753" in res.stdout
    res = subprocess.run([sys.executable, "-m", "paperlib", "levene", str(tmp_path / "missing.csv")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
