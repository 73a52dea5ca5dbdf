"""notebooks/levene.ipynb executed with papermill at the smoke preset; assertions on its metrics.json."""

import math

import nbformat
import pandas as pd
import pytest

from paperlib.climbq_experiment import CLIMBQ_HV, METHODS, levene_findings
from paperlib.figures import regenerate
from paperlib.reproduce import reproduce
from paperlib.runs import read_json

pytestmark = pytest.mark.notebooks

FIGURES = ["levene_bounds", "levene_dispersion", "levene_w_vs_gamma"]


def test_levene_smoke_trains_its_models_when_no_climbq_run_exists(run_dirs, tmp_path):
    runs, figs = run_dirs
    (res,) = reproduce("smoke", only=["levene"], runs_root=runs, figures_root=figs)
    assert res.status == "ok", res.error
    m = read_json(res.run_dir / "metrics.json")
    assert m["source"]["kind"] == "trained" and m["source"]["preset"] == "smoke"
    assert (res.run_dir / "models" / "index.json").is_file()
    assert m["methods"] == list(METHODS) and m["gammas"] == [10, 20] and m["bits"] == 4
    assert m["real_ratios"]["20"] == pytest.approx(27.4)
    t = pd.DataFrame(m["tests"])
    assert len(t) == 2 * 4 * 3  # gamma x method (1 seed) x layer
    assert set(t["layer"]) == {"blocks.6", "blocks.7", "penultimate"}
    assert all(w > 0 and math.isfinite(w) for w in t["W"]) and t["p"].between(0, 1).all()
    assert (t["n"] == 450).all()  # the whole balanced digits test split
    # measured at the smoke preset: W 12-25 on the penultimate features (F* = 1.90), all heterogeneous
    pen = t[t["layer"] == "penultimate"]
    assert pen["F_star"].iloc[0] == pytest.approx(1.90, abs=0.01)
    assert (pen["W"] > 3).all()
    pc = pd.DataFrame(m["per_class"])
    assert len(pc) == 2 * 4 * 10 and (pc["n_lb"].dropna() >= 0).all()
    assert pc["accuracy"].between(0, 1).all()  # per-class test accuracy of every analysed model
    assert pc["feasible_fraction"].between(0, 1).all() and pc["out_fraction"].between(0, 1).all()
    assert {d["method"] for d in m["dispersion"]} == set(METHODS)
    assert res.key_value == pytest.approx(
        pen[(pen["method"] == CLIMBQ_HV) & (pen["gamma"] == 20)]["W"].iloc[0])  # geometric mean of one seed
    claims = {c["id"]: c for c in m["claims"]}
    assert set(claims) == {f"{f}-g{g}" for f in ("quantization-raises-W", "climbq-lowers-W", "homovar-lowers-W",
                                                 "homovar-homogeneous") for g in (10, 20)}
    assert all(c["verdict"] == "undecidable" and c["n"] == 1 and c["unit"] == "x" for c in claims.values())
    executed = nbformat.read(res.run_dir / "levene.ipynb", 4)
    shown = [o.get("data", {}).get("text/markdown", "") for c in executed.cells if c.cell_type == "code"
             for o in c.get("outputs", [])]
    assert levene_findings(m) in shown
    assert any(t.startswith("**Table 4.** Claims on Levene's W") for t in shown)
    assert sum(t.startswith("**Figure ") for t in shown) == 3 and sum(t.startswith("**Table ") for t in shown) == 4
    published = {p.name: p.read_bytes() for p in figs.iterdir()}
    assert set(published) == {f"{f}.{ext}" for f in FIGURES for ext in ("png", "pdf")}
    again = tmp_path / "again"
    assert regenerate(runs, again) == {"levene": FIGURES}
    assert {p.name: p.read_bytes() for p in again.iterdir()} == published
