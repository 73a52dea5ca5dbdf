"""The ClimbQ/Levene notebooks' "what held, what did not" table (spec climbq.md §6 (b)-(e)) on hand-made metrics,
and the new σ / out-of-bounds diagnostics it reads."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from paperlib import climbq_experiment as cq
from paperlib.climbq import batch_sigma
from paperlib.models import create_model
from paperlib.presets import resolve

SEEDS = [0, 1, 2]


def _climbq_metrics(hv_gain: float, tail_gain: float, all_in: float, sigma_full: float = 0.016) -> dict:
    """Two gammas, W4A4 only, three seeds; HomoVar's balanced/tail accuracy = ClimbQ+CE's + the gains (seed 1
    gets a small opposite move, so the rule needs the mean *and* the majority)."""
    per_seed, history = [], {}
    for gamma in (10, 50):
        for seed in SEEDS:
            base = {"gamma": gamma, "bits": 4, "seed": seed}
            ce_bal, ce_tail = 0.80 - 0.001 * gamma + 0.01 * seed, 0.50 + 0.02 * seed
            bump = -0.2 if seed == 1 else 1.0
            per_seed += [
                {**base, "method": cq.CLIMBQ_CE, "balanced_accuracy": ce_bal, "tail_accuracy": ce_tail},
                {**base, "method": cq.CLIMBQ_HV, "balanced_accuracy": ce_bal + bump * hv_gain,
                 "tail_accuracy": ce_tail + bump * tail_gain},
                {**base, "method": cq.UNIFORM, "balanced_accuracy": ce_bal, "tail_accuracy": ce_tail},
            ]
            for method in cq.QUANT_METHODS:
                hist = [{"epoch": e, "train_loss": 0.1} for e in range(2)]
                if method == cq.CLIMBQ_HV:
                    for e in hist:
                        e.update(homovar_fraction_out=0.01 if gamma == 10 else 0.2,
                                 homovar_steps_all_in=all_in if gamma == 10 else 0.1)
                history[f"{gamma}/W4A4/{method}/{seed}"] = hist
    return {
        "gammas": [10, 50], "bits": [4], "seeds": SEEDS,
        "config": {"batch_size": 32, "tail_classes": 3, "sigma_mode": "batch_freq"},
        "per_seed": per_seed, "history": history,
        "sigma_max_deviation": 0.25, "sigma_max_deviation_full": 0.07,
        "sigma_check": {g: {"batch_size": 128, "epochs": 10, "n": 500, "max_full": sigma_full, "max_all": 0.02,
                            "last_batch": 116} for g in ("10", "50")},
    }


def _levene_metrics(hv_delta: float) -> dict:
    tests, per_class = [], []
    for gamma in (10, 50):
        for seed in SEEDS:
            for method, w in ((cq.FP32, 20.0), (cq.UNIFORM, 14.0), (cq.CLIMBQ_CE, 13.0),
                              (cq.CLIMBQ_HV, 13.0 + hv_delta * (-0.1 if seed == 2 else 1.0))):
                for layer, scale in (("blocks.7", 2.0), (cq.PENULTIMATE, 1.0)):
                    tests.append({"gamma": gamma, "method": method, "seed": seed, "bits": 4, "layer": layer,
                                  "W": w * scale})
                per_class += [{"gamma": gamma, "method": method, "seed": seed, "class": k,
                               "out_fraction": 0.1 if k == 9 else 0.0} for k in range(10)]
    return {"gammas": [10, 50], "bits": 4, "tests": tests, "per_class": per_class}


def _by_claim(checks: pd.DataFrame) -> dict[str, list]:
    out: dict[str, list] = {}
    for claim, held in zip(checks["claim"], checks["held"], strict=True):
        out.setdefault(claim.split(" ", 1)[0], []).append(held)
    return out


def test_every_claim_holds_on_metrics_built_to_hold():
    checks = cq.check_expectations(_climbq_metrics(0.03, 0.08, all_in=0.9), _levene_metrics(-3.0))
    assert list(checks.columns) == ["claim", "expected", "measured", "held", "reference"]
    by = _by_claim(checks)
    assert by == {"(b)": [True], "(c)": [True] * 4, "(d)": [True] * 4, "(e)": [True]}  # (e): gamma 10 only
    row = checks.iloc[1]
    assert "γ=10" in row["claim"] and "balanced accuracy" in row["claim"]
    # paired differences: +3, -0.6, +3 points -> mean +1.8, higher in 2 of 3 seeds
    assert "Δ = +1.8 points" in row["measured"] and "higher in 2 of 3 seeds" in row["measured"]
    assert "84.2 vs 81.1" in row["reference"] and "not the paper" in row["reference"]
    d = checks[checks["claim"].str.startswith("(d)")]
    assert d["claim"].str.contains("vs ClimbQ\\+CE").sum() == 2 and d["claim"].str.contains("vs uniform").sum() == 2
    assert "lower in 2 of 3 seeds" in d.iloc[0]["measured"]
    e = checks.iloc[-1]["measured"]
    assert "no class out in 90 % of the steps" in e and "γ=50: 20.0 %" in e and "1.0 % of classes out" in e
    assert "0.016" in checks.iloc[0]["measured"] and "B=32" in checks.iloc[0]["measured"]
    assert cq.checks_summary(checks) == "10 of 10 checks held, 0 did not."
    json.dumps(checks.to_dict("records"))  # JSON-native rows (held is a Python bool)


def test_claims_fail_on_metrics_built_to_fail():
    checks = cq.check_expectations(_climbq_metrics(-0.02, 0.0, all_in=0.3, sigma_full=0.06),
                                   _levene_metrics(+2.0))
    by = _by_claim(checks)
    assert by == {"(b)": [False], "(c)": [False] * 4, "(d)": [False] * 4, "(e)": [False]}
    tail = checks[checks["claim"].str.contains("tail-3")].iloc[0]
    assert "Δ = +0.0 points" in tail["measured"] and "higher in 0 of 3 seeds" in tail["measured"]  # no rise
    assert cq.checks_summary(checks).startswith("0 of 10 checks held, 10 did not (claims (b), (c), (d), (e))")


def test_the_paired_rule_needs_the_mean_and_the_majority():
    # mean positive but only 1 of 3 seeds higher: not a rise
    m = _climbq_metrics(0.0, 0.0, all_in=0.9)
    for r in m["per_seed"]:
        if r["method"] == cq.CLIMBQ_HV and r["seed"] == 0:
            r["balanced_accuracy"] += 0.2
        if r["method"] == cq.CLIMBQ_HV and r["seed"] == 1:
            r["balanced_accuracy"] -= 0.01
    rows = cq.check_expectations(m)
    bal = rows[rows["claim"].str.contains("balanced accuracy")]
    assert list(bal["held"]) == [False, False] and "higher in 1 of 3 seeds" in bal.iloc[0]["measured"]


def test_without_levene_or_new_fields_the_rows_say_what_is_missing():
    m = _climbq_metrics(0.03, 0.08, all_in=0.9)
    del m["sigma_check"]
    for hist in m["history"].values():
        for e in hist:
            e.pop("homovar_steps_all_in", None)
    checks = cq.check_expectations(m)
    by = _by_claim(checks)
    assert by["(b)"] == [None] and by["(d)"] == [None] and by["(e)"] == [None]
    assert "levene.ipynb" in checks[checks["claim"].str.startswith("(d)")].iloc[0]["measured"]
    assert "not recorded" in checks.iloc[-1]["measured"]
    assert "2 could not be checked" not in cq.checks_summary(checks)  # three rows are unchecked
    assert cq.checks_summary(checks).endswith("3 could not be checked from these metrics.")
    # an older run trained at B = 128 is judged on its training-time full batches
    m["config"]["batch_size"] = 128
    assert cq.check_expectations(m).iloc[0]["held"] is False  # 0.07 >= 0.05
    # W2A2 requested but not run: (c) rows are "not run"
    c2 = cq.check_expectations(m, bits=2)
    assert all(h is None for h in c2[c2["claim"].str.startswith("(c)")]["held"])
    # no mild gamma in the run
    assert cq.check_expectations(m, mild_gamma=5).iloc[-1]["held"] is None


def test_check_options_are_validated():
    m = _climbq_metrics(0.03, 0.08, all_in=0.9)
    with pytest.raises(ValueError, match="usually"):
        cq.check_expectations(m, usually=0)
    with pytest.raises(ValueError, match="sigma_bound"):
        cq.check_expectations(m, sigma_bound=-1)


# --------------------------------------------------------------------------------------------- diagnostics


def _sigma_deviation_reference(labels, k, b, epochs, seed):
    """Straightforward re-implementation: p~_i = b_{y_i} / sum_c b_c^2, sigma = 2 - p~, per batch."""
    rng = np.random.default_rng(seed)
    full, every = [], []
    y = np.asarray(labels)
    for _ in range(epochs):
        order = rng.permutation(y.size)
        for s in range(0, y.size, b):
            yb = y[order[s:s + b]]
            cnt = np.bincount(yb, minlength=k).astype(float)
            dev = float(np.max(cnt[yb] / np.sum(cnt ** 2)))
            every.append(dev)
            if yb.size == b:
                full.append(dev)
    return (max(full) if full else None), max(every)


def test_sigma_deviation_matches_a_reference_and_the_spec_bound_at_b128():
    counts = [183, 141, 109, 84, 65, 50, 38, 29, 22, 17]  # spec §6: digits-LT gamma=10 (sum 738)
    labels = np.repeat(np.arange(10), counts)
    out = cq.sigma_deviation(labels, 10, 128, epochs=5, seed=3)
    ref_full, ref_all = _sigma_deviation_reference(labels, 10, 128, 5, 3)
    # sigma is float32 (batch_sigma): |sigma - 2| carries float32's resolution near 2 (2.4e-7)
    assert out["max_full"] == pytest.approx(ref_full, abs=5e-7) and out["max_all"] == pytest.approx(ref_all, abs=5e-7)
    assert out["last_batch"] == 738 % 128 and out["n"] == 738 and out["batch_size"] == 128
    assert 0 < out["max_full"] < 0.05  # the spec's claim (b) at B = 128
    small = cq.sigma_deviation(torch.tensor([0, 1, 2]), 10, 128, epochs=2)
    assert small["max_full"] is None and small["max_all"] == pytest.approx(1 / 3, abs=5e-7)
    one_class = cq.sigma_deviation([4] * 64, 10, 32, epochs=1)
    assert one_class["max_full"] == pytest.approx(1 / 32, abs=5e-7)  # a single-class batch: p~ = 1/B
    with pytest.raises(ValueError, match="non-empty"):
        cq.sigma_deviation([], 10)
    with pytest.raises(ValueError, match="batch_size"):
        cq.sigma_deviation([0, 1], 10, 0)


def _quantized_net(seed: int = 0):
    torch.manual_seed(seed)
    cfg = resolve("climbq", "smoke")
    return cq.quantize_for_method(create_model("resnet20", **cq.model_kwargs(cfg, 10, 1)), cq.CLIMBQ_CE, 4, cfg)


def test_sigma_scaling_tracks_full_batches_separately():
    net = _quantized_net()
    cb = cq.SigmaScaling(10, batch_size=8)
    y8 = torch.tensor([0, 0, 0, 1, 2, 2, 9, 9])
    cb.before_batch(net, torch.zeros(8, 1, 8, 8), y8)
    full = float((batch_sigma(y8, 10) - 2).abs().max())
    cb.before_batch(net, torch.zeros(2, 1, 8, 8), torch.tensor([3, 4]))  # partial batch: |sigma - 2| = 1/2
    assert cb.max_deviation_full == pytest.approx(full) and cb.max_deviation == pytest.approx(0.5)
    assert math.isnan(cq.SigmaScaling(10).max_deviation_full)


def test_homovar_criterion_logs_the_share_of_steps_with_every_class_in_bounds():
    net = _quantized_net().train()
    counts = [137, 106, 82, 63, 48, 37, 28, 21, 16, 12]
    crit = cq.HomoVarCriterion(counts)
    torch.manual_seed(2)
    fractions = []
    for n in (4, 16, 32, 6):  # small batches push classes out of bounds, larger ones less so
        crit(net, torch.randn(n, 1, 8, 8), torch.randint(0, 10, (n,)))
        fractions.append(float(crit.loss.last.fraction_out))
    stats = {}
    crit.on_epoch_end(0, stats)
    assert stats["homovar_steps_all_in"] == pytest.approx(np.mean([f == 0 for f in fractions]))
    assert stats["homovar_fraction_out"] == pytest.approx(np.mean(fractions))
    assert 0 <= stats["homovar_steps_all_in"] <= 1
