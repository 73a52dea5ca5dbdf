"""The ClimbQ/Levene notebooks' claims (docs/climbq.md, 'Claims checked') and "What we found" paragraphs on
hand-made metrics, the up-front range checks (imbalance ratios the data can realise), the size-bound table of the
Levene notebook on a constructed case, and the sigma / out-of-bounds diagnostics the claims read."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch

from paperlib import claims as cl
from paperlib import climbq_experiment as cq
from paperlib import presets
from paperlib.climbq import HomoVarLoss, batch_sigma
from paperlib.data.load import load_dataset
from paperlib.models import create_model
from paperlib.presets import resolve

SEEDS = [0, 1, 2, 3, 4]
COUNTS = {"5": [137, 114, 95, 79, 66, 55, 45, 37, 30, 25], "20": [137, 98, 70, 50, 35, 25, 17, 12, 8, 5]}


def _climbq_metrics(hv_gain: float, tail_gain: float, all_in: float, sigma_full: float = 0.016,
                    seeds=SEEDS, tail_zero: bool = False) -> dict:
    """Two gammas, W4A4 only; HomoVar's balanced/tail accuracy = ClimbQ+CE's + gain (seed 1 gets half the gain, so
    the interval has a width); ClimbQ+CE = uniform + 1 point; FP32 rows at bits 32."""
    per_seed, history = [], {}
    for gamma in (5.0, 20.0):
        for seed in seeds:
            base = {"gamma": gamma, "bits": 4, "seed": seed}
            ce_bal, ce_tail = 0.80 - 0.002 * gamma + 0.01 * seed, 0.0 if tail_zero else 0.50 + 0.02 * seed
            bump = 0.5 if seed == 1 else 1.0
            hv_tail = 0.0 if tail_zero else ce_tail + bump * tail_gain
            per_seed += [
                {**base, "method": cq.CLIMBQ_CE, "balanced_accuracy": ce_bal, "tail_accuracy": ce_tail},
                {**base, "method": cq.CLIMBQ_HV, "balanced_accuracy": ce_bal + bump * hv_gain * (gamma / 5),
                 "tail_accuracy": hv_tail},
                {**base, "method": cq.UNIFORM, "balanced_accuracy": ce_bal - 0.01, "tail_accuracy": ce_tail},
                {**base, "bits": 32, "method": cq.FP32, "balanced_accuracy": ce_bal + 0.02, "tail_accuracy": ce_tail},
            ]
            hist = [{"epoch": e, "train_loss": 0.1, "homovar_fraction_out": 0.01 if gamma == 5 else 0.2,
                     "homovar_steps_all_in": all_in if gamma == 5 else 0.1} for e in range(2)]
            history[f"{gamma:g}/W4A4/{cq.CLIMBQ_HV}/{seed}"] = hist
    summary = (pd.DataFrame(per_seed).groupby(["gamma", "bits", "method"], sort=False)
               [["balanced_accuracy", "tail_accuracy"]].mean().add_suffix("_mean").reset_index())
    return {
        "dataset": "digits", "gammas": [5.0, 20.0], "bits": [4], "seeds": list(seeds),
        "config": {"batch_size": 32, "tail_classes": 3, "sigma_mode": "batch_freq", "save_bits": 4},
        "splits": {g: {"counts": c} for g, c in COUNTS.items()},
        "per_seed": per_seed, "history": history, "summary": summary.to_dict("records"),
        "sigma_max_deviation": 0.25, "sigma_max_deviation_full": 0.07,
        "sigma_check": {g: {"batch_size": 128, "epochs": 10, "n": 500, "max_full": sigma_full, "max_all": 0.02,
                            "last_batch": 116} for g in COUNTS},
    }


def _by_id(claims: list[cl.Claim]) -> dict[str, cl.Claim]:
    return {c.id: c for c in claims}


def test_accuracy_claims_pair_by_seed_and_match_a_t_interval():
    m = _climbq_metrics(0.03, 0.08, all_in=0.9)
    got = _by_id(cq.climbq_claims(m))
    assert set(got) == {"scaling-near-2", "homovar-balanced-g5", "homovar-balanced-g20", "homovar-tail-g5",
                        "homovar-tail-g20", "climbq-quantizer-g5", "climbq-quantizer-g20", "climbq-vs-uniform-g5",
                        "climbq-vs-uniform-g20", "gain-grows-with-imbalance", "bounds-rarely-bind-g5"}
    c = got["homovar-balanced-g5"]
    d = np.array([3.0, 1.5, 3.0, 3.0, 3.0])  # points: the gain, half of it for seed 1
    half = scipy.stats.t.ppf(0.975, 4) * d.std(ddof=1) / math.sqrt(5)  # scipy as the oracle of the interval
    assert c.effect == pytest.approx(d.mean()) and c.ci_low == pytest.approx(d.mean() - half)
    assert c.n == 5 and c.verdict == "held" and c.unit == "points" and "γ=5 (real 5.48)" in c.claim
    assert got["climbq-quantizer-g20"].effect == pytest.approx(1.0) and got["climbq-quantizer-g20"].verdict == "held"
    assert got["scaling-near-2"].verdict == "held" and got["scaling-near-2"].n == 2  # both gammas' labels
    assert got["bounds-rarely-bind-g5"].verdict == "held"
    # HomoVar's gain is 4x larger at gamma 20 (0.03 * 20 / 5): ClimbQ's gain over uniform grows
    grow = got["gain-grows-with-imbalance"]
    assert grow.verdict == "held" and grow.effect == pytest.approx(np.mean([9, 4.5, 9, 9, 9]))
    json.dumps(cl.as_records(got.values()))  # JSON-native records


def test_claims_fail_on_metrics_built_to_fail_and_tail_0_vs_0_is_vacuous():
    got = _by_id(cq.climbq_claims(_climbq_metrics(-0.02, 0.0, all_in=0.3, sigma_full=0.06, tail_zero=True)))
    assert got["homovar-balanced-g5"].verdict == "not held" and got["homovar-balanced-g20"].verdict == "not held"
    tail = got["homovar-tail-g5"]  # tail accuracy 0 % for both methods in every seed: nothing to compare
    assert tail.verdict == "undecidable" and tail.note.startswith("vacuous")
    assert got["scaling-near-2"].verdict == "not held" and got["bounds-rarely-bind-g5"].verdict == "not held"
    assert got["gain-grows-with-imbalance"].verdict == "not held"


def test_one_seed_is_undecidable_and_missing_pieces_are_not_measured():
    got = _by_id(cq.climbq_claims(_climbq_metrics(0.03, 0.08, all_in=0.9, seeds=[0])))
    assert all(c.verdict == "undecidable" for k, c in got.items() if k != "scaling-near-2"
               and not k.startswith("bounds")), {k: c.verdict for k, c in got.items()}
    assert got["homovar-balanced-g5"].n == 1 and "at least 2 seeds" in got["homovar-balanced-g5"].note
    m = _climbq_metrics(0.03, 0.08, all_in=0.9)
    del m["sigma_check"]
    m["history"] = {}
    m["per_seed"] = [r for r in m["per_seed"] if r["method"] != cq.UNIFORM]
    got = _by_id(cq.climbq_claims(m))
    assert got["scaling-near-2"].measured == "not measured" and got["scaling-near-2"].verdict == "undecidable"
    assert "not recorded" in got["bounds-rarely-bind-g5"].note
    assert got["climbq-quantizer-g5"].n == 0 and "uniform+CE" in got["climbq-quantizer-g5"].note


def test_check_expectations_and_checks_summary_keep_working_with_the_new_records():
    m = _climbq_metrics(0.03, 0.08, all_in=0.9)
    checks = cq.check_expectations(m)
    assert list(checks.columns) == cq.CHECK_COLUMNS == list(cl.COLUMNS)
    assert set(checks["verdict"]) <= set(cl.VERDICTS) and len(checks) == 11
    assert cq.checks_summary(checks) == cl.summary_sentence(cq.climbq_claims(m))
    assert cq.checks_summary(checks).startswith("Of 11 claims, 11 held")
    with pytest.raises(ValueError, match="usually"):
        cq.check_expectations(m, usually=0)
    with pytest.raises(ValueError, match="sigma_bound"):
        cq.check_expectations(m, sigma_bound=-1)


def _levene_metrics(w_fp: list[float], w_uni: list[float], w_ce: list[float], w_hv: list[float]) -> dict:
    tests = []
    for gamma in (5.0, 20.0):
        for seed in SEEDS:
            for method, ws in ((cq.FP32, w_fp), (cq.UNIFORM, w_uni), (cq.CLIMBQ_CE, w_ce), (cq.CLIMBQ_HV, w_hv)):
                tests.append({"gamma": gamma, "method": method, "seed": seed, "bits": 4, "layer": cq.PENULTIMATE,
                              "W": ws[seed], "p": 1e-6, "F_star": 1.9, "homogeneous": ws[seed] <= 1.9})
    df = pd.DataFrame(tests)
    summary = cq._log_summary(df, ["gamma", "method", "layer"])
    per_class = [{"gamma": g, "method": m, "seed": s, "class": k, "mean_dispersion": (20.0 if k == 0 else 5.0)
                  if m == cq.FP32 else (12.0 if k == 0 else 9.0), "out_fraction": 0.1, "feasible_fraction": 0.9,
                  "nan_fraction": 0.0, "out_of_bounds": False, "full_feasible": False, "full_out": True,
                  "full_W": 30.0} for g in (5.0, 20.0) for m in cq.METHODS for s in SEEDS for k in range(10)]
    return {"dataset": "digits", "gammas": [5.0, 20.0], "seeds": SEEDS, "bits": 4, "methods": list(cq.METHODS),
            "config": {"alpha": 0.05}, "class_counts": COUNTS, "tests": tests, "summary": summary.to_dict("records"),
            "per_class": per_class}


def test_levene_claims_are_paired_log_ratios_and_quantization_lowering_w_is_not_held():
    w_fp = [40.0, 20.0, 30.0, 50.0, 25.0]
    w_uni = [15.0, 12.0, 14.0, 20.0, 11.0]  # lower than FP32 in every seed: the premise fails
    lev = _levene_metrics(w_fp, w_uni, [12.0, 11.0, 13.0, 15.0, 10.0], [1.0, 1.2, 0.8, 1.1, 0.9])
    got = _by_id(cq.levene_claims(lev))
    q = got["quantization-raises-W-g5"]
    logs = np.log(np.array(w_uni) / np.array(w_fp))
    half = scipy.stats.t.ppf(0.975, 4) * logs.std(ddof=1) / math.sqrt(5)
    assert q.effect == pytest.approx(math.exp(logs.mean())) and q.ci_high == pytest.approx(math.exp(logs.mean() + half))
    assert q.direction == "increase" and q.verdict == "not held" and q.unit == "x" and q.n == 5
    assert got["climbq-lowers-W-g20"].verdict == "held"
    assert got["homovar-lowers-W-g5"].verdict == "held"
    hom = got["homovar-homogeneous-g5"]  # W / F* = [0.53, 0.63, 0.42, 0.58, 0.47]: below 1 in every seed
    assert hom.verdict == "held" and hom.ci_high < 1 and "F* = 1.90" in hom.note
    text = cq.levene_findings({**lev, "claims": cl.as_records(got.values())})
    assert "opposite of the abstract's premise" in text and "n = 5" in text
    assert f"×{math.exp(logs.mean()):.2f}" in text
    assert "4.0× as much" in text and "1.3×" in text  # head vs tail dispersion: FP32 20/5, uniform 12/9


def test_levene_summary_uses_the_log_scale_interval():
    lev = _levene_metrics([28.25, 5.0, 80.0, 9.0, 30.0], [1.0] * 5, [1.0] * 5, [1.0] * 5)
    s = pd.DataFrame(lev["summary"]).set_index(["gamma", "method"]).loc[(5.0, cq.FP32)]
    g, lo, hi, n = cl.log_interval([28.25, 5.0, 80.0, 9.0, 30.0])
    assert (s["W_gmean"], s["W_lo"], s["W_hi"], s["n"]) == (pytest.approx(g), pytest.approx(lo), pytest.approx(hi), 5)
    assert s["W_mean"] - s["W_ci"] < 0 < s["W_lo"]  # the arithmetic t-interval crosses 0, the log one cannot
    table = cq.levene_table(lev)
    assert table.iloc[0]["γ (real ratio)"] == "5 (real 5.48)" and table.iloc[0]["n (seeds)"] == 5
    assert table.iloc[0]["Levene W (geo. mean [95 % CI])"] == f"{g:.2f} [{lo:.2f}, {hi:.2f}]"


def test_climbq_findings_state_the_verdicts_with_numbers_and_n():
    m = _climbq_metrics(-0.02, 0.0, all_in=0.9)
    m["claims"] = cl.as_records(cq.climbq_claims(m))
    text = cq.climbq_findings(m)
    assert text.startswith("**What we found** (digits-LT, γ=5 (real 5.48), γ=20 (real 27.4); 5 seed(s)")
    assert "did not hold" in text and "-1.8 points [-2.4, -1.2], n = 5: not held" in text  # gains -2, -1, -2, -2, -2
    assert "HomoVar raising balanced accuracy held at 0 of 2 γ, the opposite was shown at 2" in text
    assert "practically inert" in text and "could not be found" in text
    assert cq.climbq_findings(m) == text  # a pure function of the metrics


# --------------------------------------------------------------------------------------------- up-front checks


def test_known_digits_counts_are_the_loaders():
    train, _ = load_dataset("digits", size=8, channels=1)
    assert tuple(train.class_counts()) == cq.KNOWN_TRAIN_COUNTS["digits"]


def test_realised_imbalance_on_digits_and_the_grid_of_the_presets():
    digits = cq.KNOWN_TRAIN_COUNTS["digits"]
    r = {x["gamma"]: x for x in cq.realised_imbalance(digits, [5, 10, 20, 50, 100], min_count=1)}
    assert r[10]["counts"] == [137, 106, 82, 63, 48, 37, 28, 21, 16, 12]
    assert r[10]["real_ratio"] == pytest.approx(137 / 12)
    assert r[50]["real_ratio"] == r[100]["real_ratio"] == 137 and r[100]["empty"] == 1 and r[50]["empty"] == 0
    assert (r[5]["tail"], r[20]["tail"]) == (25, 5)
    for name in ("smoke", "default", "paper"):
        cfg = presets.check_settings("climbq", name)  # every preset's grid is realisable
        assert cq.imbalance_problems(cq.KNOWN_TRAIN_COUNTS[cfg["dataset"]], cfg["gammas"]) == []
    assert len(resolve("climbq", "default")["seeds"]) >= 5


@pytest.mark.parametrize(("overrides", "match"), [
    ({"gammas": [1e12]}, r"gamma=1e\+12 leaves 8 class\(es\) of digits with 0 images \(real counts \[137, 6, 1,"),
    ({"gammas": [50]}, r"gamma=50 gives the real ratio 137 .*more than 2x gamma.*\[1, 38\]"),
    ({"gammas": [10, 10]}, "gamma=10 and gamma=10 give the same counts"),
    ({"gammas": [0.5]}, "must be >= 1"),
    ({"seeds": [0.5]}, "seeds"),
    ({"seeds": [1, 1]}, "distinct ints"),
    ({"qat_epochs": -1}, "qat_epochs=-1: epochs must be an int >= 0"),
    ({"bits": [1]}, r"bits=\[1\].*2..8"),
])
def test_check_settings_refuses_bad_values_up_front(overrides, match):
    with pytest.raises(ValueError, match=match):
        presets.check_settings("climbq", "default", **overrides)


def test_paper_cifar100_gammas_the_original_left_empty_are_refused():
    with pytest.raises(ValueError, match=r"gamma=50 leaves 10 class\(es\) of cifar100 with 0 images"):
        presets.check_settings("climbq", "paper", dataset="cifar100")
    presets.check_settings("climbq", "paper", dataset="cifar100", gammas=[10])


def test_levene_validate():
    presets.check_settings("levene", "default")
    for key, bad in (("last_blocks", 0), ("split", "train"), ("alpha", 1.5), ("center", "mode"),
                     ("dispersion_seeds", -1)):
        with pytest.raises(ValueError, match=key):
            cq.validate_levene({**resolve("levene", "default"), key: bad})


def test_the_driver_warns_with_the_real_ratio_on_data_of_another_size():
    cfg = resolve("climbq", "paper", gammas=[200.0])
    with pytest.warns(UserWarning, match=r"gamma=200 leaves 6 class\(es\) of fake data with 0 images.*ratio 12"):
        problems = cq.warn_if_unrealised([12] * 10, cfg, "fake data")  # 12 images per class: [12, 6, 3, 1, ...]
    assert len(problems) == 1
    assert cq.warn_if_unrealised([5000] * 10, cfg) == []  # the real CIFAR-10 realises it (real ratio 208)


# --------------------------------------------------------------------------------------------- size bounds


def test_bounds_table_on_a_constructed_case_pins_out_feasible_and_nan_shares():
    """Three scalar classes {1,2,3,4}, {1,5,9,2.5}, {2,2.2,2.4,2.6} in one batch with their own sizes as counts:
    the budgets are C = [-2.30, 4.69, 2.02] (the Levene reference vector), so class 0 is infeasible yet in
    bounds (NaN bounds: the original's rule), classes 1 and 2 are feasible and out of bounds (beta != 0.999)."""
    f = torch.tensor([1, 2, 3, 4, 1, 5, 9, 2.5, 2, 2.2, 2.4, 2.6], dtype=torch.float64)[:, None]
    y = torch.arange(3).repeat_interleave(4)
    b = cq.homovar_batch_bounds(f, y, [4, 4, 4], batch_size=12)
    np.testing.assert_allclose(b["per_batch"]["C"][0], [-2.297551, 4.689950, 2.022449], rtol=1e-6)
    assert b["out_fraction"].tolist() == [0.0, 1.0, 1.0]
    assert b["feasible_fraction"].tolist() == [0.0, 1.0, 1.0] and b["nan_fraction"].tolist() == [1.0, 0.0, 0.0]
    rows = [{"gamma": 10.0, "method": cq.CLIMBQ_HV, "seed": 0, "class": k, "out_fraction": b["out_fraction"][k],
             "feasible_fraction": b["feasible_fraction"][k], "nan_fraction": b["nan_fraction"][k],
             "out_of_bounds": bool(b["out_fraction"][k] > 0.5), "full_feasible": False, "full_out": True,
             "full_W": 5.0} for k in range(3)]
    row = cq.levene_bounds_table({"per_class": rows, "class_counts": {"10": [4, 4, 4]}}).iloc[0]
    assert row["out of bounds (%)"] == pytest.approx(200 / 3) and row["feasible (%)"] == pytest.approx(200 / 3)
    assert row["NaN bounds (%)"] == pytest.approx(100 / 3) and row["n (seeds)"] == 1
    # out-of-bounds events spread over classes: each class out in 30 % of the batches is 30 % of (class, batch)
    # pairs, while "out in most batches" (the earlier table's only statistic) reads 0 %
    spread = [{**r, "out_fraction": 0.3, "out_of_bounds": False} for r in rows]
    row = cq.levene_bounds_table({"per_class": spread}).iloc[0]
    assert row["out of bounds (%)"] == pytest.approx(30.0) and row["classes out in most batches (%)"] == 0.0


def test_bounds_table_out_share_is_homovars_per_step_fraction_on_the_same_batches():
    """The Levene table's "out of bounds (%)" is the statistic the climbq notebook's HomoVar figure shows: the mean
    over steps of the share of classes out of bounds, here recomputed with HomoVarLoss on the same batches."""
    gen = torch.Generator().manual_seed(0)
    counts = [60, 40, 28, 20, 14, 10, 7, 5, 4, 3]
    y = torch.repeat_interleave(torch.arange(10), torch.tensor(counts))
    f = torch.relu(torch.randn(y.numel(), 8, generator=gen, dtype=torch.float64) * (1 + y[:, None] / 3))
    got = cq.homovar_batch_bounds(f, y, counts, batch_size=24, seed=3)
    order = torch.as_tensor(np.random.default_rng(3).permutation(y.numel()))
    steps = []
    for start in range(0, y.numel(), 24):
        idx = order[start:start + 24]
        loss = HomoVarLoss(counts)
        loss(torch.zeros(idx.numel(), 10, dtype=torch.float64), y[idx], f[idx])
        steps.append(float(loss.last.fraction_out))
    assert float(got["out_fraction"].mean()) == pytest.approx(np.mean(steps), abs=1e-12)
    assert 0 < np.mean(steps) < 1  # a case where some, not all, classes leave their bounds


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


def test_sigma_deviation_matches_a_reference_and_stays_below_0_05_at_b128():
    counts = [183, 141, 109, 84, 65, 50, 38, 29, 22, 17]  # sklearn's full digits, gamma=10 (sum 738)
    labels = np.repeat(np.arange(10), counts)
    out = cq.sigma_deviation(labels, 10, 128, epochs=5, seed=3)
    ref_full, ref_all = _sigma_deviation_reference(labels, 10, 128, 5, 3)
    # sigma is float32 (batch_sigma): |sigma - 2| carries float32's resolution near 2 (2.4e-7)
    assert out["max_full"] == pytest.approx(ref_full, abs=5e-7) and out["max_all"] == pytest.approx(ref_all, abs=5e-7)
    assert out["last_batch"] == 738 % 128 and out["n"] == 738 and out["batch_size"] == 128
    assert 0 < out["max_full"] < 0.05  # claim scaling-near-2 at B = 128
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
