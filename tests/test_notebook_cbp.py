"""notebooks/cbp.ipynb executed with papermill at the smoke preset; assertions on the metrics it records."""

import nbformat
import pytest

from paperlib.figures import regenerate
from paperlib.reproduce import reproduce
from paperlib.runs import read_json

pytestmark = pytest.mark.notebooks

FIGURES = ["cbp_accuracy", "cbp_constraint_function", "cbp_g_schedule", "cbp_lambda_cfs", "cbp_weight_histograms"]


def test_cbp_smoke(run_dirs, tmp_path):
    runs, figs = run_dirs
    (res,) = reproduce("smoke", only=["cbp"], runs_root=runs, figures_root=figs)
    assert res.status == "ok", res.error
    m = read_json(res.run_dir / "metrics.json")
    assert m["sets"] == ["bin", "ter"] and m["seeds"] == [0] and m["archs"] == ["resnet20"]
    rows = {(s["mode"], s["variant"]): s for s in m["summary"]}
    assert set(rows) == {(s, v) for s in ("bin", "ter") for v in ("ste", "cbp", "no_window")}
    assert m["fp"]["resnet20"]["top1"] >= 0.9  # measured 0.978 (6 FP epochs)
    for s in ("bin", "ter"):
        proj = m["projected"]["resnet20"][s]
        assert proj["top1"] <= 0.3  # measured 0.096: BN statistics no longer fit the projected weights
        cbp, ste, nw = rows[(s, "cbp")], rows[(s, "ste")], rows[(s, "no_window")]
        assert cbp["top1_mean"] >= 0.55  # measured 0.86 (bin), 0.64 (ter) after 20 steps
        assert ste["cfs_mean"] == pytest.approx(proj["cfs"], rel=0.02)  # STE leaves the latent weights put
        assert cbp["cfs_mean"] < 0.75 * proj["cfs"]  # measured 0.59x (bin), 0.50x (ter)
        assert nw["cfs_mean"] < 0.85 * cbp["cfs_mean"]  # measured 0.53x (bin), 0.68x (ter)
        assert ste["lambda_max_mean"] == 0.0 and cbp["lambda_mean_mean"] > 0
    for key, h in m["history"].items():
        assert [e["cbp_g"] for e in h if e["cbp_event"]] == [2, 3, 4, 5, 6], key  # p_max = 2, 10 periods
        assert all(e["cbp_lambda_monotone"] for e in h), key
    exp = {e["id"]: e for e in m["expectations"]}
    assert len(exp) == 8 and exp[1]["held"] is True and exp[6]["held"] is True and exp[7]["held"] is None
    assert res.key_value == rows[("bin", "cbp")]["top1_mean"]
    nb = (res.run_dir / "cbp.ipynb").read_text()
    assert "paper, ImageNet" in nb and "ours, digits" in nb and "expectations held" in nb
    executed = nbformat.read(res.run_dir / "cbp.ipynb", as_version=4)
    images = [o for c in executed.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == len(FIGURES), "every figure is displayed as an image"
    published = {p.name: p.read_bytes() for p in figs.iterdir()}
    assert set(published) == {f"{n}.{ext}" for n in FIGURES for ext in ("png", "pdf")}
    again = tmp_path / "again"
    assert regenerate(runs, again, notebooks=["cbp"]) == {"cbp": FIGURES}
    assert {p.name: p.read_bytes() for p in again.iterdir()} == published
