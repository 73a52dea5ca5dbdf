"""The papermill harness: strict parameters, atomic run dirs, failures and timeouts, manifests."""

from pathlib import Path

import nbformat
import pytest

from paperlib.reproduce import ParameterError, check_parameters, reproduce, summary_frame
from paperlib.runs import read_json

PARAMS = 'preset = "smoke"\nvalue = 1\noutput_dir = ""'


def _notebook(path: Path, body: str, params: str = PARAMS) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    cell = nbformat.v4.new_code_cell(params)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell, nbformat.v4.new_code_cell(body)]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


RECORD = """
from matplotlib.figure import Figure
from paperlib.runs import RunRecord
record = RunRecord("{name}", output_dir, parameters={{"preset": preset}})
fig = Figure(); fig.add_subplot().plot([0, value])
record.save_figure(fig, "{name}_fig")
record.set_context(device="cpu", data_fingerprint="abc")
"""


def test_unknown_and_non_json_parameters_are_rejected(tmp_path):
    nb = _notebook(tmp_path / "nb" / "a.ipynb", "pass")
    with pytest.raises(ParameterError, match=r"unknown parameter\(s\) \['valu'\]; accepted: \['preset', 'value'\]"):
        check_parameters(nb, {"valu": 2})
    with pytest.raises(ParameterError, match="value=.*not JSON-native.*str\\(path\\)"):
        check_parameters(nb, {"value": tmp_path})
    with pytest.raises(ParameterError, match="tuple"):
        check_parameters(nb, {"value": [1, (2, 3)]})
    check_parameters(nb, {"value": [1, {"a": 2.5}], "preset": "default"})
    bare = tmp_path / "nb" / "bare.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")]), bare)
    with pytest.raises(ParameterError, match="no cell tagged 'parameters'"):
        check_parameters(bare, {})
    with pytest.raises(ParameterError, match=r"unknown notebook\(s\) \['nope'\]; available: a, bare"):
        reproduce("smoke", only=["nope"], notebooks_dir=tmp_path / "nb")


def test_success_failure_and_timeout_runs(tmp_path, run_dirs):
    runs, figs = run_dirs
    nb_dir = tmp_path / "nb"
    _notebook(nb_dir / "good.ipynb", RECORD.format(name="good") + "record.save_metrics("
              "{'key_metric': {'name': 'value', 'value': float(value)}})")
    _notebook(nb_dir / "bad.ipynb", RECORD.format(name="bad") + "raise ValueError('boom')")
    _notebook(nb_dir / "slow.ipynb", RECORD.format(name="slow") + "import time; time.sleep(30)")
    results = reproduce("smoke", notebooks_dir=nb_dir, runs_root=runs, figures_root=figs, execution_timeout=8,
                        extra_parameters={"good": {"value": 3}})
    by = {r.notebook: r for r in results}
    assert {n: r.status for n, r in by.items()} == {"bad": "failed", "good": "ok", "slow": "failed"}
    good = by["good"].run_dir
    assert sorted(p.name for p in good.iterdir()) == ["context.json", "figures", "good.ipynb", "manifest.json",
                                                      "metrics.json"]
    man = read_json(good / "manifest.json")
    assert man["status"] == "ok" and man["parameters"] == {"preset": "smoke", "value": 3}
    assert man["device"] == "cpu" and man["data_fingerprint"] == "abc"
    assert set(man["git"]) == {"sha", "dirty"} and man["versions"]["torch"].startswith("2.14.1")
    assert by["good"].key_value == 3.0
    # only the successful run published figures
    assert sorted(p.name for p in figs.iterdir()) == ["good_fig.pdf", "good_fig.png"]
    bad = by["bad"].run_dir
    assert bad.name.endswith("-failed") and "ValueError: boom" in read_json(bad / "manifest.json")["error"]
    executed = nbformat.read(bad / "bad.ipynb", as_version=4)
    assert executed.metadata.papermill.exception is True
    assert "CellTimeoutError" in by["slow"].error
    assert not list(runs.glob("*/.tmp-*"))  # nothing half-written is left behind
    table = summary_frame(results)
    assert list(table["status"]) == ["failed", "ok", "failed"]
