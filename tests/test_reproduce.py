"""The papermill harness: strict parameters, atomic run dirs, failures and timeouts, manifests."""

from pathlib import Path

import nbformat
import pytest
from helpers import write_notebook

from paperlib.reproduce import ParameterError, check_parameters, reproduce, summary_frame
from paperlib.runs import read_json

PARAMS = 'preset = "smoke"\nvalue = 1\noutput_dir = ""'


def _notebook(path: Path, body: str, params: str = PARAMS) -> Path:
    return write_notebook(path, body, params)


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


def test_cli_parameters_data_dir_and_set():
    from paperlib.__main__ import cli_parameters

    names = ["climbq", "cbp", "lifequant"]
    got = cli_parameters(names, ["/data/cifar", "cbp=/data/imagenet"],
                         ["seeds=[0, 1]", "cbp:archs=[\"resnet18\"]", "climbq:dataset=cifar10", "lifequant:lam=3"])
    assert got == {"climbq": {"data_dir": "/data/cifar", "seeds": [0, 1], "dataset": "cifar10"},
                   "cbp": {"data_dir": "/data/imagenet", "seeds": [0, 1], "archs": ["resnet18"]},
                   "lifequant": {"data_dir": "/data/cifar", "seeds": [0, 1], "lam": 3}}
    # a folder whose name has "=" in it but no notebook prefix is one folder for all
    assert cli_parameters(["cbp"], ["/d/a=b"], None) == {"cbp": {"data_dir": "/d/a=b"}}
    with pytest.raises(ParameterError, match="notebook 'dgms' is not among the notebooks run"):
        cli_parameters(names, None, ["dgms:seeds=[0]"])
    with pytest.raises(ParameterError, match="write NAME=VALUE"):
        cli_parameters(names, None, ["seeds"])


def test_reproduce_checks_every_notebook_before_running_any(tmp_path, run_dirs, capsys):
    """A typo in the last notebook's parameters must not cost the first notebook's run."""
    from paperlib.__main__ import main

    runs, figs = run_dirs
    nb_dir = tmp_path / "nb"
    _notebook(nb_dir / "a.ipynb", "raise SystemExit('must not run')")
    _notebook(nb_dir / "b.ipynb", "pass")
    with pytest.raises(ParameterError, match=r"b: unknown parameter\(s\) \['valu'\]"):
        reproduce("smoke", notebooks_dir=nb_dir, runs_root=runs, extra_parameters={"b": {"valu": 1}})
    with pytest.raises(ParameterError, match="not run"):
        reproduce("smoke", only=["a"], notebooks_dir=nb_dir, runs_root=runs, extra_parameters={"b": {"value": 1}})
    assert not runs.exists() or not any(runs.iterdir())
    # the CLI: an unknown parameter is exit status 2 with the message, before any notebook runs
    assert main(["reproduce", "--preset", "smoke", "--only", "levene", "--set", "levene:no_such_knob=1"]) == 2
    assert "levene: unknown parameter(s) ['no_such_knob']" in capsys.readouterr().err
