"""Every notebook executed with papermill at the smoke preset; assertions on the metrics it records."""

import nbformat
import pytest

from paperlib.figures import regenerate
from paperlib.reproduce import list_notebooks, reproduce
from paperlib.runs import read_json

pytestmark = pytest.mark.notebooks


def test_every_notebook_declares_the_harness_parameters():
    import papermill as pm

    for name, path in list_notebooks().items():
        params = pm.inspect_notebook(str(path))
        assert {"preset", "device", "output_dir"} <= set(params), name
        nb = path.read_text()
        assert '"outputs": []' in nb or '"outputs"' not in nb, f"{name} is committed with outputs"


def test_quickstart_smoke(run_dirs, tmp_path):
    runs, figs = run_dirs
    (res,) = reproduce("smoke", only=["00_quickstart"], runs_root=runs, figures_root=figs)
    assert res.status == "ok", res.error
    m = read_json(res.run_dir / "metrics.json")
    s = {row["method"]: row for row in m["summary"]}
    assert set(s) == {"FP32", "uniform W4A4", "uniform W2A2"}
    assert s["FP32"]["top1_mean"] >= 0.90  # measured 0.96-0.98 at the smoke preset
    assert s["uniform W4A4"]["top1_mean"] >= 0.80
    assert res.key_value == s["FP32"]["top1_mean"]
    # one seed at smoke: every claim is measured but undecidable (no interval), never "held"
    assert [c["verdict"] for c in m["claims"]] == ["undecidable"] * 3, m["claims"]
    assert [c["n"] for c in m["claims"]] == [1, 1, 1]
    assert m["claims"][1]["effect"] < 0  # W2A2 below W4A4 (smoke measured -12 to -15 points)
    assert len(m["per_seed"][0]["per_class_accuracy"]) == m["num_classes"] == 10
    executed = nbformat.read(res.run_dir / "00_quickstart.ipynb", as_version=4)
    outputs = [o for c in executed.cells for o in c.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the figure is not displayed as an image"
    # the last line names the run directory as it is now, not the temp dir it was executed in
    assert outputs[-1]["text"].splitlines()[-1] == f"run recorded in {res.run_dir}"
    published = {p.name: p.read_bytes() for p in figs.iterdir()}
    assert set(published) == {f"quickstart_{f}.{x}" for f in ("accuracy", "per_class") for x in ("png", "pdf")}
    # figures regenerate from runs/ alone, byte for byte
    again = tmp_path / "again"
    assert regenerate(runs, again) == {"00_quickstart": ["quickstart_accuracy", "quickstart_per_class"]}
    assert {p.name: p.read_bytes() for p in again.iterdir()} == published


def test_paper_preset_without_data_dir_names_the_missing_data():
    from paperlib.data.errors import DataError
    from paperlib.presets import resolve
    from paperlib.quickstart import run_quickstart

    with pytest.raises(DataError, match="needs data_dir.*cifar-10-batches-py.*download=True"):
        run_quickstart(resolve("00_quickstart", "paper"), device="cpu", data_dir="")
