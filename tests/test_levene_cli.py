"""`python -m paperlib levene FILE` on good and bad files."""

import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from paperlib.__main__ import main

GROUPS = [[1, 2, 3, 4], [1, 5, 9, 2.5], [2, 2.2, 2.4, 2.6]]  # reference vector; W checked against scipy below


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


# ------------------------------------------------------------------------- bad values and files: one line, exit 2


def _err_line(capsys, path) -> str:
    """The command's stderr: exactly one line, starting 'error: ', naming ``path``; nothing on stdout."""
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1, (out, err)
    assert str(path) in err and "Traceback" not in err
    return err


def test_constant_features_are_undefined_not_a_verdict(tmp_path, capsys):
    """scipy gives W = nan (0/0) here; the command used to print 'W = nan ... NOT homogeneous' with exit 0."""
    const = [[1.5, 1.5, 1.5], [4.0, 4.0, 4.0, 4.0]]
    with np.errstate(divide="ignore", invalid="ignore"):
        assert np.isnan(stats.levene(*const, center="mean").statistic)
    path = _csv(tmp_path / "const.csv", const)
    for extra in ([], ["--keep-zeros"], ["--center", "median"]):
        assert main(["levene", str(path), *extra]) == 2
        err = _err_line(capsys, path)
        assert "Levene's W is undefined (0/0): every class has zero spread" in err
    # every sample at the same distance from its class centre: also 0/0 in scipy, named as such
    equal = [[0.5, 2.5], [5.0, 7.0], [1.0, 3.0]]
    with np.errstate(divide="ignore", invalid="ignore"):
        assert np.isnan(stats.levene(*equal, center="mean").statistic)
    assert main(["levene", str(_csv(tmp_path / "eq.csv", equal))]) == 2
    assert "every sample lies at the same distance (1) from its class centre" in _err_line(capsys, tmp_path / "eq.csv")


def test_infinite_w_is_reported_as_scipy_does(tmp_path, capsys):
    """No spread variation within classes but some between them: W = inf, p = 0 (scipy's answer), exit 0."""
    groups = [[5.0, 5.0, 5.0], [1.0, 3.0, 3.0, 1.0]]
    with np.errstate(divide="ignore", invalid="ignore"):
        ref = stats.levene(*groups, center="mean")
    assert np.isinf(ref.statistic) and ref.pvalue == 0
    assert main(["levene", str(_csv(tmp_path / "f.csv", groups))]) == 0
    assert "W = inf, p = 0," in capsys.readouterr().out


def test_complex_features_are_refused(tmp_path, capsys):
    path = tmp_path / "c.npz"
    np.savez(path, features=np.array([1 + 1j, 2 + 3j, 1, 5j, 2, 2 - 1j]), labels=np.array([0, 0, 0, 1, 1, 1]))
    assert main(["levene", str(path)]) == 2
    assert "'features' are complex (complex128)" in _err_line(capsys, path)
    csv = tmp_path / "c.csv"
    csv.write_text("label,f0\n0,1+2j\n0,2\n1,3\n1,4\n")
    assert main(["levene", str(csv)]) == 2
    err = _err_line(capsys, csv)
    assert "(e.g. row 0: '1+2j')" in err and "complex numbers are not supported" in err


@pytest.mark.parametrize("label, message", [
    ("1e30", r"label\(s\) \[1e\+30, 1e\+30\] at rows \(0-based\) \[2, 3\] are out of range for class ids"),
    ("99999999999999999999", r"label\(s\) \[1e\+20, 1e\+20\] at rows \(0-based\) \[2, 3\] are out of range"),
    ("2.5", r"labels must be integers .* bad rows \(0-based\) \[2, 3\]: \[2.5, 2.5\]"),
    ("inf", r"labels must be integers"),
    ("cat", r"labels must be integers .* bad rows \(0-based\) \[2, 3\]: \['cat', 'cat'\]"),
])
def test_non_integral_or_out_of_range_labels_are_refused(tmp_path, capsys, label, message):
    """1e30 used to become class -9223372036854775808."""
    path = tmp_path / "l.csv"
    path.write_text(f"label,f0\n0,1\n0,2.5\n{label},3\n{label},5\n1,2\n1,8\n")
    assert main(["levene", str(path)]) == 2
    assert re.search(message, _err_line(capsys, path))


def test_uint64_labels_beyond_int64_are_refused(tmp_path, capsys):
    path = tmp_path / "u.npz"
    np.savez(path, features=np.arange(4.0), labels=np.array([0, 0, 2**63 + 5, 2**63 + 5], dtype=np.uint64))
    assert main(["levene", str(path)]) == 2
    assert "label(s) [9223372036854775813, 9223372036854775813] at position(s) [2, 3]" in _err_line(capsys, path)


def test_large_but_exact_labels_keep_their_values(tmp_path, capsys):
    """The range is wide (|label| <= 2**53): such ids are kept exactly and W still equals scipy's."""
    groups = [[1, 2, 3, 4], [1, 5, 9, 2.5]]
    rows = [{"label": lab, "f0": v} for lab, g in zip([7, 10**15], groups, strict=True) for v in g]
    pd.DataFrame(rows).to_csv(tmp_path / "big.csv", index=False)
    out = tmp_path / "t.csv"
    assert main(["levene", str(tmp_path / "big.csv"), "--out", str(out)]) == 0
    assert f"W = {stats.levene(*groups, center='mean').statistic:.6g}" in capsys.readouterr().out
    assert pd.read_csv(out)["class"].tolist() == [7, 10**15]


def _good_npz(path):
    rng = np.random.default_rng(0)
    np.savez(path, features=rng.normal(size=(200, 3)), labels=np.repeat([0, 1], 100))
    return path


def test_files_that_are_not_what_their_name_says(tmp_path, capsys):
    npy = tmp_path / "a.npz"
    with open(npy, "wb") as f:
        np.save(f, np.zeros((4, 2)))
    assert main(["levene", str(npy)]) == 2
    assert "is a single .npy array (np.save), not an .npz archive" in _err_line(capsys, npy)

    text = tmp_path / "t.npz"
    text.write_text("label,f0\n0,1\n0,2\n1,3\n1,5\n")
    assert main(["levene", str(text)]) == 2
    err = _err_line(capsys, text)
    assert "not an .npz archive, it holds text: if it is a CSV, rename it to .csv" in err
    assert "allow_pickle" not in err and "pickled" not in err  # numpy's advice to unpickle it was misleading

    data = _good_npz(tmp_path / "good.npz").read_bytes()
    (tmp_path / "half.npz").write_bytes(data[: len(data) // 2])
    crc = bytearray(data)
    crc[300:340] = b"\0" * 40  # inside the first member's bytes: the archive's directory is intact
    (tmp_path / "crc.npz").write_bytes(bytes(crc))
    for name, cause in (("half.npz", "File is not a zip file"), ("crc.npz", "Bad CRC-32 for file 'features.npy'")):
        assert main(["levene", str(tmp_path / name)]) == 2
        err = _err_line(capsys, tmp_path / name)
        assert f"truncated or corrupt .npz archive ({cause}); copy it again or re-save it with np.savez" in err

    obj = tmp_path / "o.npz"
    np.savez(obj, features=np.array([1, "a", 2, 3], dtype=object), labels=np.array([0, 0, 1, 1]))
    assert main(["levene", str(obj)]) == 2
    assert "'features' is an object array (pickled Python objects)" in _err_line(capsys, obj)

    assert main(["levene", str(tmp_path)]) == 2
    assert "is a folder; pass a CSV or an .npz file" in _err_line(capsys, tmp_path)


def test_out_that_is_a_folder_or_not_writable(tmp_path, capsys, monkeypatch):
    import errno

    import paperlib.atomic as atomic

    src = _good_npz(tmp_path / "f.npz")
    folder = tmp_path / "dir"
    folder.mkdir()
    assert main(["levene", str(src), "--out", str(folder)]) == 2
    assert f"--out {folder} is a folder; give a file path, e.g. --out {folder / 'levene.csv'}" in _err_line(
        capsys, folder)
    assert main(["levene", str(src), "--out", str(src / "t.csv")]) == 2  # its "folder" is a file
    assert f"folder of --out {src} is a file, not a folder" in _err_line(capsys, src)

    # read-only folder (we run as root, so chmod would not stop us: make creating a file fail instead)
    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    with monkeypatch.context() as m:
        m.setattr(atomic.tempfile, "mkstemp", read_only)
        assert main(["levene", str(src), "--out", str(tmp_path / "t.csv")]) == 2
    assert "folder of --out " in (err := _err_line(capsys, tmp_path)) and "not writable (check its permissions" in err

    # the folder turns read-only after the check (the final rename fails): one line, no file, no temp left
    with monkeypatch.context() as m:
        m.setattr(atomic.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only")))
        assert main(["levene", str(src), "--out", str(tmp_path / "late.csv")]) == 2
    out, err = capsys.readouterr()
    assert out.startswith("Levene's test") and err.count("\n") == 1
    assert err == f"error: cannot write {tmp_path / 'late.csv'}: on a read-only file system (choose another folder)\n"
    assert not (tmp_path / "late.csv").exists() and not list(tmp_path.glob(".late.csv.*"))


@pytest.mark.parametrize("alpha", ["0", "1", "1.5", "nan"])
def test_bad_alpha(tmp_path, capsys, alpha):
    assert main(["levene", str(_csv(tmp_path / "f.csv")), "--alpha", alpha]) == 2
    _, err = capsys.readouterr()
    assert err == f"error: --alpha {float(alpha)}: must be a number in (0, 1), e.g. --alpha 0.05\n"


def test_module_entry_point_on_a_truncated_npz(tmp_path):
    data = _good_npz(tmp_path / "g.npz").read_bytes()
    (tmp_path / "g.npz").write_bytes(data[:100])
    res = subprocess.run([sys.executable, "-m", "paperlib", "levene", str(tmp_path / "g.npz")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stdout == "" and "Traceback" not in res.stderr
    assert res.stderr.startswith(f"error: {tmp_path / 'g.npz'}: truncated or corrupt .npz archive")
