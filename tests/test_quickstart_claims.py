"""The quickstart's claims on constructed metrics: verdicts follow the CI rule, runs pair by seed."""

import pytest

from paperlib import presets
from paperlib.quickstart import check_claims, check_expectations, findings


def _metrics(fp, w4, w2, seeds=(0, 1, 2, 3, 4)):
    rows = []
    for method, vals in (("FP32", fp), ("uniform W4A4", w4), ("uniform W2A2", w2)):
        rows += [{"seed": s, "method": method, "top1": v} for s, v in zip(seeds, vals, strict=True)]
    summary = [{"method": m, "top1_mean": sum(v) / len(v)} for m, v in
               (("FP32", fp), ("uniform W4A4", w4), ("uniform W2A2", w2))]
    return {"per_seed": rows, "summary": summary, "seeds": list(seeds), "num_classes": 10, "dataset": "digits"}


def test_verdicts_follow_the_paired_interval():
    m = _metrics(fp=[.98, .97, .98, .99, .97], w4=[.975, .97, .975, .985, .965], w2=[.90, .85, .88, .86, .91])
    c = check_claims(m)
    assert [x.verdict for x in c] == ["held", "held", "held"]
    assert c[0].margin == 2.0 and c[0].n == 5
    assert c[2].measured.startswith("top-1 of uniform W2A2 = 88.00 %")


def test_w4a4_far_below_fp32_is_not_held_and_a_noisy_gap_is_undecidable():
    m = _metrics(fp=[.98] * 5, w4=[.90, .91, .92, .90, .91], w2=[.80] * 5)
    assert check_claims(m)[0].verdict == "not held"
    # mean gap -1.9 points but one seed at -9: the CI crosses the margin
    m = _metrics(fp=[.98] * 5, w4=[.98, .98, .98, .98, .885], w2=[.80] * 5)
    assert check_claims(m)[0].verdict == "undecidable"


def test_seeds_pair_by_seed_not_by_position():
    m = _metrics(fp=[.98, .90, .98, .90, .98], w4=[.975, .895, .975, .895, .975], w2=[.5] * 5)
    m["per_seed"] = m["per_seed"][::-1]  # stored order must not matter
    c = check_claims(m)[0]
    assert c.effect == pytest.approx(-0.5) and c.ci_low == pytest.approx(-0.5)


def test_findings_and_table():
    m = _metrics(fp=[.98] * 5, w4=[.90, .91, .92, .90, .91], w2=[.80] * 5)
    from paperlib import claims

    m["claims"] = claims.as_records(check_claims(m))
    text = findings(m)
    assert "did not hold (1)" in text and "Not held: 1." in text
    assert list(check_expectations(m)["verdict"]) == ["not held", "held", "held"]


def test_validate_refuses_bad_values_up_front():
    import paperlib.quickstart  # noqa: F401  registers the presets

    with pytest.raises(ValueError, match="seeds"):
        presets.check_settings("00_quickstart", "default", seeds=[1, 1])
    with pytest.raises(ValueError, match="bits"):
        presets.check_settings("00_quickstart", "default", bits=[0])
    with pytest.raises(ValueError, match="qat_lr"):
        presets.check_settings("00_quickstart", "default", qat_lr=float("nan"))
    assert presets.check_settings("00_quickstart", "default", seeds=[7])["seeds"] == [7]
