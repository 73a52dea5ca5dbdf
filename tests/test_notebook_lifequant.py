"""The LifeQuant notebook executed with papermill at the smoke preset; assertions on the metrics it records."""

import json
import math

import pytest

from paperlib.figures import regenerate
from paperlib.reproduce import reproduce
from paperlib.runs import read_json

pytestmark = pytest.mark.notebooks

FIGURES = ["lifequant_accuracy_matrix", "lifequant_forgetting", "lifequant_per_class", "lifequant_task_curves",
           "lifequant_task_curves_baselines"]


def test_lifequant_smoke(run_dirs, tmp_path):
    runs, figs = run_dirs
    (res,) = reproduce("smoke", only=["lifequant"], runs_root=runs, figures_root=figs,
                       extra_parameters={"lifequant": {"cache_dir": str(tmp_path / "fp32-cache")}})
    assert res.status == "ok", res.error
    m = read_json(res.run_dir / "metrics.json")
    assert m["seeds"] == [0] and m["device"] == "cpu" and m["dataset"] == "digits"
    methods = ["original", "replay_ce", "replay_ball", "ewc", "lifequant_paper", "lifequant_code"]
    assert m["methods"] == methods and len(m["runs"]) == len(methods)
    for run in m["runs"]:  # a full lower-triangular a[t, k] for every method, no divergence
        assert run["diverged"] is None
        for t, row in enumerate(run["acc"]):
            assert all(v is not None and 0 <= v <= 1 for v in row[: t + 1]), (run["method"], row)
            assert row[t + 1:] == [None] * (len(row) - t - 1)
    s = {row["method"]: row for row in m["summary"]}
    # measured at the smoke preset (1 seed, 2 epochs per task): FP32 98.7 %, original F_T 59 % with 0 % on the
    # dropped classes, replay + CE F_T 2.5 %, paper mode F_T 11 % and A_T 87 %
    assert m["pretrain"][0]["fp32_top1"] >= 0.9 and m["pretrain"][0]["identity_at_32_bits"] is True
    assert s["original"]["F_T_mean"] >= 0.4 and s["original"]["acc_dropped_classes_mean"] <= 0.2
    assert s["replay_ce"]["F_T_mean"] <= s["original"]["F_T_mean"] - 0.3
    assert s["lifequant_paper"]["A_T_mean"] >= 0.75 and s["lifequant_paper"]["F_T_mean"] <= 0.25
    assert s["lifequant_paper"]["A_T_mean"] >= s["original"]["A_T_mean"] + 0.2
    assert res.key_value == pytest.approx(s["lifequant_paper"]["A_T_mean"])
    for row in m["summary"]:
        assert math.isclose(row["A_T_mean"], [r for r in m["runs"] if r["method"] == row["method"]][0]
                            ["metrics"]["A_T"])
    # claims: records of paperlib.claims; one seed, so every interval claim is undecidable with n = 1
    recs = {c["id"]: c for c in m["claims"]}
    assert [k for k in recs if k.startswith("A")] == [f"A{i}" for i in range(1, 12)] and "Q1" in recs
    assert all(c["verdict"] == "undecidable" and c["n"] == 1 for k, c in recs.items() if k != "Q1")
    assert recs["Q1"]["verdict"] == "held" and recs["Q1"]["n"] == 1
    assert all(c["source"].startswith(("LifeQuant paper", "original code")) for c in recs.values())
    nb = (res.run_dir / "lifequant.ipynb").read_text()
    assert "docs/lifequant.md" in nb and "What we found" in nb and "Of 12 claims" in nb
    cell = next(c for c in json.loads(nb)["cells"] if "show_claims(" in "".join(c["source"]))
    table = "".join("".join(o.get("data", {}).get("text/html", "")) for o in cell["outputs"])
    assert "…" not in table and "..." not in table and recs["A2"]["claim"] in table  # every cell in full
    published = {p.name: p.read_bytes() for p in figs.iterdir()}
    assert set(published) == {f"{f}.{ext}" for f in FIGURES for ext in ("png", "pdf")}
    again = tmp_path / "again"
    assert regenerate(runs, again, notebooks=["lifequant"]) == {"lifequant": FIGURES}
    assert {p.name: p.read_bytes() for p in again.iterdir()} == published
