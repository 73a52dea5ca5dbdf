"""The one verdict rule and its intervals (scipy as the oracle)."""

import json
import math

import numpy as np
import pytest
from scipy import stats

from paperlib import claims as C


@pytest.mark.parametrize(("direction", "lo", "hi", "margin", "expected"), [
    ("increase", 0.1, 2.0, None, "held"),
    ("increase", -0.1, 2.0, None, "undecidable"),   # CI touches the wrong side
    ("increase", -3.0, -0.5, None, "not held"),
    ("increase", -0.5, 0.4, 1.0, "held"),           # no harm beyond 1 point
    ("increase", -2.0, -1.5, 1.0, "not held"),
    ("increase", -1.5, 0.3, 1.0, "undecidable"),
    ("decrease", -2.0, -0.1, None, "held"),
    ("decrease", 0.1, 2.0, None, "not held"),
    ("decrease", -0.1, 0.1, None, "undecidable"),
    ("equivalent", -0.5, 0.5, 1.0, "held"),
    ("equivalent", -1.5, 0.5, 1.0, "undecidable"),
    ("equivalent", 1.2, 3.0, 1.0, "not held"),
    ("equivalent", -3.0, -1.1, 1.0, "not held"),
])
def test_rule_table(direction, lo, hi, margin, expected):
    assert C.verdict(direction, lo, hi, 5, margin=margin) == expected


def test_too_few_runs_or_vacuous_or_nan_is_undecidable():
    assert C.verdict("increase", 1.0, 2.0, 1) == "undecidable"
    assert C.verdict("increase", 1.0, 2.0, 5, vacuous=True) == "undecidable"
    assert C.verdict("increase", math.nan, 2.0, 5) == "undecidable"
    assert C.verdict("increase", None, None, 5) == "undecidable"


def test_rule_refuses_nonsense():
    with pytest.raises(ValueError, match="margin > 0"):
        C.verdict("equivalent", -1, 1, 5)
    with pytest.raises(ValueError, match="property_claim"):
        C.verdict("descriptive", -1, 1, 5)
    with pytest.raises(ValueError, match="ci_low"):
        C.verdict("increase", 2, 1, 5)
    with pytest.raises(ValueError, match="direction"):
        C.Claim(id="1", claim="", source="", direction="up", expected="", measured="", effect=None,
                ci_low=None, ci_high=None, n=0, margin=None, verdict="held")


def test_paired_interval_equals_scipy_ttest_rel():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.8, 0.05, 7), rng.normal(0.75, 0.05, 7)
    m, lo, hi, n = C.paired_interval(a, b)
    ci = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert n == 7 and m == pytest.approx(np.mean(a - b), abs=1e-15)
    assert (lo, hi) == pytest.approx((ci.low, ci.high), abs=1e-12)


def test_log_interval_is_the_back_transformed_t_interval_and_stays_positive():
    w = np.array([0.5, 3.0, 80.0, 12.0, 1.0])
    g, lo, hi, n = C.log_interval(w)
    ci = stats.ttest_1samp(np.log(w), 0).confidence_interval(0.95)
    assert g == pytest.approx(stats.gmean(w), rel=1e-12)
    assert (lo, hi) == pytest.approx((math.exp(ci.low), math.exp(ci.high)), rel=1e-12)
    assert 0 < lo < g < hi
    m, h = np.mean(w), stats.t.ppf(0.975, 4) * np.std(w, ddof=1) / math.sqrt(5)
    assert m - h < 0  # the plain t-interval of this W would cross 0
    with pytest.raises(ValueError, match="positive"):
        C.log_interval([1.0, 0.0])


def test_paired_claim_scales_and_judges():
    a, b = [0.90, 0.92, 0.91, 0.93, 0.95], [0.80, 0.85, 0.82, 0.84, 0.83]
    c = C.paired("2", "A beats B", "Table 1", "increase", "A > B", a, b, scale=100, unit="points")
    assert c.verdict == "held" and c.n == 5
    assert c.effect == pytest.approx(100 * np.mean(np.subtract(a, b)))
    assert c.ci_low > 0 and "n = 5" in c.measured and "points" in c.measured


def test_paired_claim_with_a_ci_crossing_zero_is_never_held():
    # the DGMS case of the old rule: mean positive, most seeds agree, CI spans 0
    a, b = [0.95, 0.97, 0.75, 0.96, 0.98], [0.90, 0.91, 0.93, 0.90, 0.92]
    c = C.paired("3", "A >= B", "Table 2", "increase", "A > B", a, b, scale=100)
    assert np.mean(np.subtract(a, b)) > 0 and c.ci_low < 0 < c.ci_high
    assert c.verdict == "undecidable"


def test_vacuous_comparison_is_undecidable_with_a_reason():
    c = C.paired("4", "tail up", "Fig. 3", "increase", "A > B", [0, 0, 0], [0, 0, 0], scale=100, unit="%")
    assert c.verdict == "undecidable" and c.note.startswith("vacuous")
    assert C.vacuous([1, 1], [1, 1]) and not C.vacuous([1, 1], [0, 1]) and not C.vacuous([0.5], [0.5])


def test_single_seed_is_undecidable():
    c = C.paired("5", "A beats B", "Table 1", "increase", "A > B", [0.9], [0.1])
    assert c.verdict == "undecidable" and c.n == 1 and "n = 1" in c.note


def test_log_ratio_claim_against_one():
    w_q, w_fp = [2.0, 3.0, 2.5, 4.0], [5.0, 6.0, 7.0, 8.0]
    c = C.log_ratio("6", "quantization raises W", "Sec. 3", "increase", "W_q / W_fp > 1", w_q, w_fp)
    assert c.verdict == "not held" and c.ci_high < 1 and c.unit == "x"


def test_property_claim():
    assert C.property_claim("1", "<= K values", "Sec. 3", "all layers", "max 16", [True] * 3).verdict == "held"
    assert C.property_claim("1", "<= K values", "Sec. 3", "all layers", "max 17", [True, False]).verdict \
        == "not held"
    assert C.property_claim("1", "<= K values", "Sec. 3", "all layers", "-", []).verdict == "undecidable"


def test_records_round_trip_through_json_and_table_is_untruncated():
    cl = [C.paired("1", "x" * 300, "Table 1", "increase", "A > B", [1.0, 2.0, 3.0], [0.0, 0.5, 1.0]),
          C.not_measured("2", "y", "Sec. 4", "decrease", "A < B", "variant not run")]
    recs = json.loads(json.dumps(C.as_records(cl)))
    assert C.from_records(recs) == cl
    t = C.claims_table(recs)
    assert list(t.columns) == C.COLUMNS and len(t.claim[0]) == 300
    assert C.verdict_counts(cl) == {"held": 1, "not held": 0, "undecidable": 1}
    assert C.summary_sentence(cl) == "Of 2 claims, 1 held (1), 0 did not hold and 1 were undecidable (2)."
    with pytest.raises(ValueError, match="missing"):
        C.Claim.from_dict({"id": "1"})
