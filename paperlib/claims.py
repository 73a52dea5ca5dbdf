"""Claims and verdicts: one record, one rule, three verdicts, used by every notebook.

A notebook checks a paper's statements ("ClimbQ + HomoVar raises tail accuracy over ClimbQ alone") against
its own numbers. Each check is a :class:`Claim`; its ``verdict`` follows one rule (:func:`verdict`):

- ``held``: the 95 % confidence interval of the effect lies entirely on the claimed side of the threshold
  (beyond the margin where the claim states one);
- ``not held``: it lies entirely on the other side (or entirely outside an equivalence margin);
- ``undecidable``: otherwise, and also when there are fewer than two seeds or paired runs, or when the
  comparison is vacuous (both sides at 0 % or both at 100 %: there is nothing to compare).

Directions (``Claim.direction``), with ``t`` the threshold (``null``: 0 for a difference, 1 for a ratio)
and ``m >= 0`` the margin:

=============== ===================================== =====================================
direction       held when                             not held when
=============== ===================================== =====================================
``increase``    ``ci_low > t - m``                    ``ci_high < t - m``
``decrease``    ``ci_high < t + m``                   ``ci_low > t + m``
``equivalent``  ``t - m < ci_low`` and ``ci_high < t + m``  ``ci_low > t + m`` or ``ci_high < t - m``
``descriptive`` a deterministic property holds in every run  it fails in some run
=============== ===================================== =====================================

With ``m > 0`` an ``increase`` claim is a "no harm" (non-inferiority) claim: "A is at most ``m`` worse than
B". Intervals are Student-t intervals of the mean (paired over seeds where runs pair, :func:`paired`),
or of the mean log for a positive statistic (:func:`log_ratio`), never "mean only".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import stats

Direction = Literal["increase", "decrease", "equivalent", "descriptive"]
Verdict = Literal["held", "not held", "undecidable"]
DIRECTIONS: tuple[str, ...] = ("increase", "decrease", "equivalent", "descriptive")
VERDICTS: tuple[str, ...] = ("held", "not held", "undecidable")
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Claim:
    """One paper claim checked against this project's numbers (the schema of ``metrics.json["claims"]``).

    ``effect``, ``ci_low`` and ``ci_high`` are in ``unit`` (e.g. "points" of accuracy, or "x" for a ratio);
    ``n`` counts the seeds or paired runs behind the interval; ``note`` says why a verdict is
    ``undecidable`` (too few seeds, vacuous comparison) or anything a reader must know to read the row.
    """

    id: str
    claim: str
    source: str
    direction: Direction
    expected: str
    measured: str
    effect: float | None
    ci_low: float | None
    ci_high: float | None
    n: int
    margin: float | None
    verdict: Verdict
    unit: str = ""
    note: str = ""

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"claim {self.id}: direction={self.direction!r}; use one of {DIRECTIONS}")
        if self.verdict not in VERDICTS:
            raise ValueError(f"claim {self.id}: verdict={self.verdict!r}; use one of {VERDICTS}")
        if self.n < 0:
            raise ValueError(f"claim {self.id}: n={self.n} must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: NaN becomes ``None``."""
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Claim:
        """The inverse of :meth:`to_dict`; a missing or unknown key is an error naming it."""
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING}
        missing, unknown = sorted(required - set(d)), sorted(set(d) - names)
        if missing or unknown:
            raise ValueError(f"not a claim record: missing {missing}, unknown {unknown}")
        return cls(**d)


# ------------------------------------------------------------------------------------------------ the rule
def verdict(direction: Direction, ci_low: float | None, ci_high: float | None, n: int, *,
            margin: float | None = None, null: float = 0.0, vacuous: bool = False,
            min_n: int = 2) -> Verdict:
    """The one rule (module docstring): ``held`` | ``not held`` | ``undecidable``.

    ``ci_low``/``ci_high`` is the 95 % interval of the effect, ``null`` the no-effect value, ``margin`` the
    stated margin (``None`` = 0; required > 0 for ``equivalent``). Fewer than ``min_n`` runs, a missing or NaN
    bound, or ``vacuous`` give ``undecidable``. For ``descriptive`` claims use :func:`property_claim`.
    """
    if direction == "descriptive":
        raise ValueError("descriptive claims have no interval rule: use property_claim")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r}; use one of {DIRECTIONS}")
    m = 0.0 if margin is None else float(margin)
    if m < 0 or math.isnan(m):
        raise ValueError(f"margin={margin} must be >= 0")
    if direction == "equivalent" and m <= 0:
        raise ValueError("an 'equivalent' claim needs margin > 0 (the equivalence bound)")
    if vacuous or n < min_n or ci_low is None or ci_high is None or math.isnan(ci_low) or math.isnan(ci_high):
        return "undecidable"
    if ci_low > ci_high:
        raise ValueError(f"ci_low={ci_low} > ci_high={ci_high}")
    if direction == "increase":
        t = null - m
        return "held" if ci_low > t else "not held" if ci_high < t else "undecidable"
    if direction == "decrease":
        t = null + m
        return "held" if ci_high < t else "not held" if ci_low > t else "undecidable"
    lo, hi = null - m, null + m
    if lo < ci_low and ci_high < hi:
        return "held"
    return "not held" if (ci_low > hi or ci_high < lo) else "undecidable"


# -------------------------------------------------------------------------------------------- intervals
def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float, int]:
    """``(mean, low, high, n)``: the two-sided Student-t interval of the mean; NaN bounds for n < 2.

    Non-finite values are an error (a NaN accuracy is a bug upstream, not a data point)."""
    x = np.asarray(values, dtype=float).ravel()
    if x.size == 0:
        return math.nan, math.nan, math.nan, 0
    if not np.isfinite(x).all():
        raise ValueError(f"non-finite values in an interval: {x.tolist()}")
    m = float(x.mean())
    if x.size < 2:
        return m, math.nan, math.nan, int(x.size)
    half = float(stats.t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return m, m - half, m + half, int(x.size)


def paired_interval(a: Sequence[float], b: Sequence[float],
                    confidence: float = CONFIDENCE) -> tuple[float, float, float, int]:
    """The interval of the mean paired difference ``a - b`` (runs paired by seed, in order)."""
    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired runs need equal counts: {a.size} vs {b.size}")
    return mean_interval(a - b, confidence)


def log_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float, int]:
    """``(geometric mean, low, high, n)`` of a positive statistic (e.g. Levene's W or a ratio of two).

    The t-interval of ``log(values)`` mapped back, so it never crosses 0; zero or negative values are
    an error (use :func:`mean_interval` for signed quantities)."""
    x = np.asarray(values, dtype=float).ravel()
    if x.size and not (np.isfinite(x).all() and (x > 0).all()):
        raise ValueError(f"log_interval needs positive finite values, got {x.tolist()}")
    m, lo, hi, n = mean_interval(np.log(x), confidence)
    return math.exp(m) if n else math.nan, math.exp(lo), math.exp(hi), n


def vacuous(*sides: Sequence[float], bounds: tuple[float, float] = (0.0, 1.0)) -> bool:
    """Whether a comparison has nothing to compare: every value of every side at the same bound
    (e.g. tail accuracy 0 vs 0, or 100 % vs 100 %)."""
    vals = np.concatenate([np.asarray(s, dtype=float).ravel() for s in sides]) if sides else np.array([])
    if vals.size == 0:
        return True
    return bool(any(np.all(vals == b) for b in bounds))


# -------------------------------------------------------------------------------------- claim builders
def _fmt(x: float | None, digits: int, signed: bool = True) -> str:
    if x is None or math.isnan(x):
        return "n/a"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _measured(label: str, effect: float, lo: float, hi: float, n: int, unit: str, digits: int,
              signed: bool = True) -> str:
    f = lambda x: _fmt(x, digits, signed)  # noqa: E731
    ci = f"95 % CI [{f(lo)}, {f(hi)}]" if n >= 2 else "no CI (n < 2)"
    u = "" if not unit else unit if unit == "x" else f" {unit}"
    return f"{label} = {f(effect)}{u}, {ci}, n = {n}"


def _nan_none(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def interval_claim(id: str, claim: str, source: str, direction: Direction, expected: str, *,
                   effect: float, ci_low: float, ci_high: float, n: int, label: str = "effect",
                   unit: str = "", margin: float | None = None, null: float = 0.0,
                   vacuous_reason: str = "", digits: int = 2, note: str = "") -> Claim:
    """A :class:`Claim` from an interval computed elsewhere, judged by :func:`verdict`."""
    v = verdict(direction, ci_low, ci_high, n, margin=margin, null=null, vacuous=bool(vacuous_reason))
    notes = [vacuous_reason and f"vacuous: {vacuous_reason}",
             n < 2 and f"n = {n}: at least 2 seeds are needed for an interval", note]
    return Claim(id=id, claim=claim, source=source, direction=direction, expected=expected,
                 measured=_measured(label, effect, ci_low, ci_high, n, unit, digits, signed=null == 0),
                 effect=_nan_none(effect), ci_low=_nan_none(ci_low), ci_high=_nan_none(ci_high), n=int(n),
                 margin=None if margin is None else float(margin), verdict=v, unit=unit,
                 note="; ".join(s for s in notes if s))


def paired(id: str, claim: str, source: str, direction: Direction, expected: str,
           a: Sequence[float], b: Sequence[float], *, scale: float = 1.0, unit: str = "",
           label: str = "A - B", margin: float | None = None, bounds: tuple[float, float] | None = (0.0, 1.0),
           digits: int = 2, note: str = "") -> Claim:
    """Claim on the paired difference ``a - b`` (one value per seed on each side, paired in order).

    ``scale`` converts the raw values to ``unit`` (100 for accuracy fractions in points); ``margin`` is in
    ``unit``. The comparison is vacuous when every value of both sides sits at the same one of ``bounds``
    (raw units; ``None`` to switch the check off)."""
    m, lo, hi, n = paired_interval(a, b)
    why = ""
    if bounds is not None and n and vacuous(a, b, bounds=bounds):
        why = f"every run of both sides at {np.asarray(a, dtype=float).ravel()[0] * scale:g} {unit}".rstrip()
    return interval_claim(id, claim, source, direction, expected, effect=m * scale, ci_low=lo * scale,
                          ci_high=hi * scale, n=n, label=label, unit=unit, margin=margin,
                          vacuous_reason=why, digits=digits, note=note)


def log_ratio(id: str, claim: str, source: str, direction: Direction, expected: str,
              a: Sequence[float], b: Sequence[float], *, label: str = "A / B", margin: float | None = None,
              digits: int = 3, note: str = "") -> Claim:
    """Claim on the paired ratio ``a / b`` of a positive statistic (geometric mean, interval on the log
    scale), judged against 1: ``increase`` means ``a > b``."""
    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired runs need equal counts: {a.size} vs {b.size}")
    g, lo, hi, n = log_interval(a / b) if a.size else (math.nan, math.nan, math.nan, 0)
    return interval_claim(id, claim, source, direction, expected, effect=g, ci_low=lo, ci_high=hi, n=n,
                          label=label, unit="x", margin=margin, null=1.0, digits=digits, note=note)


def one_sample(id: str, claim: str, source: str, direction: Direction, expected: str,
               values: Sequence[float], *, null: float = 0.0, scale: float = 1.0, unit: str = "",
               label: str = "effect", margin: float | None = None, digits: int = 2, note: str = "") -> Claim:
    """Claim on the mean of per-seed values against ``null`` (e.g. a per-seed difference computed elsewhere)."""
    m, lo, hi, n = mean_interval(values)
    return interval_claim(id, claim, source, direction, expected, effect=m * scale, ci_low=lo * scale,
                          ci_high=hi * scale, n=n, label=label, unit=unit, margin=margin, null=null,
                          digits=digits, note=note)


def property_claim(id: str, claim: str, source: str, expected: str, measured: str,
                   holds_per_run: Sequence[bool], *, note: str = "") -> Claim:
    """A ``descriptive`` claim: a deterministic property (e.g. "at most K distinct values per layer")
    checked in each of ``n`` runs: ``held`` when it holds in every run, ``not held`` when it fails in any,
    ``undecidable`` when no run measured it."""
    flags = [bool(h) for h in holds_per_run]
    n = len(flags)
    v: Verdict = "undecidable" if n == 0 else "held" if all(flags) else "not held"
    bad = n - sum(flags)
    return Claim(id=id, claim=claim, source=source, direction="descriptive", expected=expected,
                 measured=measured + (f" (fails in {bad} of {n} runs)" if bad else f" (in all {n} runs)"),
                 effect=None, ci_low=None, ci_high=None, n=n, margin=None, verdict=v,
                 note=note if n else "; ".join(s for s in ("not measured", note) if s))


def not_measured(id: str, claim: str, source: str, direction: Direction, expected: str, why: str) -> Claim:
    """A claim this run could not check (a variant not run, a preset without the needed data)."""
    return Claim(id=id, claim=claim, source=source, direction=direction, expected=expected,
                 measured="not measured", effect=None, ci_low=None, ci_high=None, n=0, margin=None,
                 verdict="undecidable", note=why)


# --------------------------------------------------------------------------------------- tables, text
COLUMNS = ["id", "claim", "source", "expected", "measured", "n", "verdict", "note"]


def as_records(claims: Iterable[Claim]) -> list[dict[str, Any]]:
    """``metrics.json["claims"]``: a list of :meth:`Claim.to_dict` records."""
    return [c.to_dict() for c in claims]


def from_records(records: Iterable[dict[str, Any]]) -> list[Claim]:
    """Claims back from ``metrics.json["claims"]`` (validated)."""
    return [Claim.from_dict(dict(r)) for r in records]


def claims_table(claims: Iterable[Claim | dict[str, Any]]) -> pd.DataFrame:
    """One row per claim, the columns a reader needs (:data:`COLUMNS`)."""
    recs = [c.to_dict() if isinstance(c, Claim) else Claim.from_dict(dict(c)).to_dict() for c in claims]
    return pd.DataFrame(recs, columns=list(asdict(_EMPTY))).reindex(columns=COLUMNS)


def show_claims(claims: Iterable[Claim | dict[str, Any]]) -> pd.DataFrame:
    """Display :func:`claims_table` untruncated (every cell in full) in a notebook; returns the table."""
    df = claims_table(claims)
    with pd.option_context("display.max_colwidth", None, "display.max_rows", None,
                           "display.max_columns", None, "display.width", None):
        try:
            from IPython.display import display
        except ImportError:  # pragma: no cover - IPython ships with jupyter
            print(df.to_string(index=False))
        else:
            display(df.style.hide(axis="index").set_properties(**{"text-align": "left",
                                                                  "white-space": "pre-wrap"}))
    return df


def verdict_counts(claims: Iterable[Claim | dict[str, Any]]) -> dict[str, int]:
    """``{"held": a, "not held": b, "undecidable": c}``."""
    vs = [c.verdict if isinstance(c, Claim) else c["verdict"] for c in claims]
    return {v: vs.count(v) for v in VERDICTS}


def summary_sentence(claims: Sequence[Claim | dict[str, Any]]) -> str:
    """"Of 7 claims, 3 held, 2 did not hold (2, 5) and 2 were undecidable (4, 6)." """
    recs = [c if isinstance(c, Claim) else Claim.from_dict(dict(c)) for c in claims]
    ids = {v: [c.id for c in recs if c.verdict == v] for v in VERDICTS}
    part = lambda v, words: f"{len(ids[v])} {words}" + (f" ({', '.join(ids[v])})" if ids[v] else "")  # noqa: E731
    return (f"Of {len(recs)} claims, {part('held', 'held')}, {part('not held', 'did not hold')} and "
            f"{part('undecidable', 'were undecidable')}.")


_EMPTY = Claim(id="", claim="", source="", direction="increase", expected="", measured="", effect=None,
               ci_low=None, ci_high=None, n=0, margin=None, verdict="undecidable")
