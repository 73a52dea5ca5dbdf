"""notebooks/climbq.ipynb executed with papermill at the smoke preset; assertions on its metrics.json."""

import nbformat
import pandas as pd
import pytest

from paperlib import claims as cl
from paperlib.climbq_experiment import CLIMBQ_CE, CLIMBQ_HV, FP32, METHODS, UNIFORM, climbq_findings
from paperlib.figures import regenerate
from paperlib.reproduce import reproduce
from paperlib.runs import read_json

pytestmark = pytest.mark.notebooks

FIGURES = ["climbq_accuracy_vs_gamma", "climbq_class_counts", "climbq_homovar_bounds", "climbq_per_class_accuracy"]


def test_climbq_smoke(run_dirs, tmp_path):
    runs, figs = run_dirs
    (res,) = reproduce("smoke", only=["climbq"], runs_root=runs, figures_root=figs)
    assert res.status == "ok", res.error
    m = read_json(res.run_dir / "metrics.json")
    assert m["gammas"] == [10, 20] and m["bits"] == [4, 2] and m["seeds"] == [0]
    # the recursive rule on digits: real ratios 11.4 and 27.4, tails of 12 and 5 images
    assert m["splits"]["10"]["counts"] == [137, 106, 82, 63, 48, 37, 28, 21, 16, 12]
    assert m["splits"]["20"]["counts"] == [137, 98, 70, 50, 35, 25, 17, 12, 8, 5]
    assert m["splits"]["20"]["real_ratio"] == pytest.approx(27.4) and m["splits"]["20"]["tail_images"] == 5
    s = pd.DataFrame(m["summary"]).set_index(["gamma", "bits", "method"])
    assert len(s) == 2 * (1 + 2 * 3)
    # measured at the smoke preset (2-core CPU): FP32 86.5 %, W4A4 84.9-85.9 %, W2A2 53.6-72.9 % at gamma=10
    assert s.loc[(10, 32, FP32), "balanced_accuracy_mean"] >= 0.70
    for method in (UNIFORM, CLIMBQ_CE, CLIMBQ_HV):
        assert s.loc[(10, 4, method), "balanced_accuracy_mean"] >= 0.65
        assert s.loc[(10, 2, method), "balanced_accuracy_mean"] >= 0.30
        assert s.loc[(20, 4, method), "balanced_accuracy_mean"] >= 0.35
    # the long tail hurts: gamma=20 is worse than gamma=10 for FP32, most of all on its 5-12 image tail classes
    assert s.loc[(20, 32, FP32), "balanced_accuracy_mean"] < s.loc[(10, 32, FP32), "balanced_accuracy_mean"]
    assert s.loc[(20, 32, FP32), "tail_accuracy_mean"] < s.loc[(10, 32, FP32), "tail_accuracy_mean"]
    assert 0 < m["sigma_max_deviation"] < 0.5  # sigma = 2 - p~ stays near 2
    # claim scaling-near-2 at B = 128 on the long-tailed labels: measured 0.015 (gamma 10)
    assert set(m["sigma_check"]) == {"10", "20"}
    assert all(0 < v["max_full"] < 0.03 and v["batch_size"] == 128 for v in m["sigma_check"].values())
    assert 0 < m["sigma_max_deviation_full"] <= m["sigma_max_deviation"]
    assert all(0 <= e["homovar_steps_all_in"] <= 1 for e in m["history"]["10/W4A4/ClimbQ+HomoVar/0"])
    # the claims: records of paperlib.claims; with one seed every comparison is undecidable (n = 1)
    claims = {c["id"]: c for c in m["claims"]}
    assert [c.id for c in cl.from_records(m["claims"])] == list(claims)
    assert set(claims) == {"scaling-near-2", "gain-grows-with-imbalance", "bounds-rarely-bind-g10"} | {
        f"{f}-g{g}" for f in ("homovar-balanced", "homovar-tail", "climbq-quantizer", "climbq-vs-uniform")
        for g in (10, 20)}
    assert claims["scaling-near-2"]["verdict"] == "held"
    assert all(c["verdict"] == "undecidable" and c["n"] == 1 for c in claims.values()
               if c["direction"] != "descriptive")
    executed = nbformat.read(res.run_dir / "climbq.ipynb", 4)
    shown = [o.get("data", {}).get("text/markdown", "") for c in executed.cells if c.cell_type == "code"
             for o in c.get("outputs", [])]
    assert climbq_findings(m) in shown  # the "What we found" paragraph, from the metrics alone
    assert any(t.startswith("**Table 2.** Claims on digits-LT, n = 1 seed(s)") for t in shown)
    assert sum(t.startswith("**Figure ") for t in shown) == 4  # every figure has a computed caption
    assert any("10 (real 11.4)" in str(o.get("data", {}).get("text/html", "")) for c in executed.cells
               if c.cell_type == "code" for o in c.get("outputs", []))  # the table shows the real ratio
    assert "run recorded in" in str(executed.cells[-1].outputs)
    hv = pd.DataFrame(m["homovar"])
    assert len(hv) == 4 and all(len(b) == 10 for b in hv["beta"])
    assert res.key_value == pytest.approx(s.loc[(20, 4, CLIMBQ_HV), "balanced_accuracy_mean"])
    assert m["paper_numbers"] is None
    # W4A4 models and FP32 starting points stored for the Levene notebook, small
    entries = m["models"]["entries"]
    assert sorted({e["method"] for e in entries}) == sorted(METHODS) and len(entries) == 8
    assert all((res.run_dir / "models" / e["file"]).is_file() for e in entries)
    assert (res.run_dir / "models" / "index.json").is_file()
    assert m["models"]["total_bytes"] < 12 * 2**20
    # figures published, and regenerated from runs/ alone byte for byte
    published = {p.name: p.read_bytes() for p in figs.iterdir()}
    assert set(published) == {f"{f}.{ext}" for f in FIGURES for ext in ("png", "pdf")}
    again = tmp_path / "again"
    assert regenerate(runs, again) == {"climbq": FIGURES}
    assert {p.name: p.read_bytes() for p in again.iterdir()} == published
