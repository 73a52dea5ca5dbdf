"""The LifeQuant notebook's claims and its "What we found" paragraph: pure functions of ``run_lifequant``'s metrics.

Each checked statement is a :class:`paperlib.claims.Claim` (docs/lifequant.md, "Claims and verdicts"). Method
comparisons are paired by seed (the methods of one seed share the FP32/8-bit start and task 0); a seed whose run
of either method diverged is left out of that pair and the note says so. Forgetting comparisons are judged on the
old tasks **both** methods learned (``a[k, k] >= LEARNED_THRESHOLD``, :mod:`.metrics`): a method that never
learns a task cannot forget it, so counting that task would reward not learning. A seed with no such task drops
out of the pair; with fewer than two pairs left the claim is undecidable.

Sources: the paper's text and tables were not found (only its abstract and overview figure), so a claim's
``source`` is "LifeQuant paper, abstract", "LifeQuant paper, overview figure" or the original code's file, and
the expected values are this project's reading of them (docs/lifequant.md, "What reproduces").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .. import claims as C
from .metrics import LEARNED_THRESHOLD, accuracy_matrix, forgetting_minus_bwt, forgetting_on, learned_tasks

#: "almost completely" forgotten: the original's top-1 on the classes absent from the last task is below this (%)
NEAR_TOTAL_FORGETTING_PCT = 20.0
#: "does not hurt": A_T at most this many points below (the non-inferiority margin)
NO_HARM_POINTS = 1.0
#: "forgets no more than": F_T at most this many points above
NO_MORE_FORGETTING_POINTS = 1.0

SRC_ABSTRACT = "LifeQuant paper, abstract"
SRC_FIGURE_BALL = "LifeQuant paper, overview figure (BaLL); original code: lifelong_data_generation/count_classes.py"
SRC_FIGURE_PROX = "LifeQuant paper, overview figure (ProxQ)"
SRC_CODE_MAIN = "original code: src/resnet-20-cifar-100/main.py, utils/lifelong.py (ll_method='ours')"
SRC_CODE_LAMBDA = "original code: src/resnet-20-cifar-100/options.py (ll_lambda: 'ours: 130,200; ewc: 100')"
SRC_CODE_QUANT = "original code: src/resnet-20-cifar-100/model/quantization.py"

Run = Mapping[str, Any]


# ----------------------------------------------------------------------------------------------- run access
def _finished(run: Run) -> bool:
    return run.get("diverged") is None and run["metrics"].get("A_T") is not None


def runs_by_seed(metrics: Mapping[str, Any], experiment: str, method: str) -> dict[int, Run]:
    """``{seed: run}`` of one method in one experiment (every run, diverged ones included)."""
    return {int(r["seed"]): r for r in metrics["runs"] if r["experiment"] == experiment and r["method"] == method}


def _methods(metrics: Mapping[str, Any], experiment: str) -> list[str]:
    for e in metrics["experiments"]:
        if e["name"] == experiment:
            return list(e["methods"])
    return []


def _acc(run: Run) -> np.ndarray:
    return accuracy_matrix(run["acc"])


def _pairs(metrics: Mapping[str, Any], experiment: str, a: str, b: str,
           value: Callable[[Run], float | None]) -> tuple[list[float], list[float], list[str]]:
    """Values of methods ``a`` and ``b`` paired by seed; notes on the seeds left out (diverged / missing)."""
    ra, rb = runs_by_seed(metrics, experiment, a), runs_by_seed(metrics, experiment, b)
    xa, xb, out = [], [], []
    for seed in sorted(set(ra) & set(rb)):
        if not (_finished(ra[seed]) and _finished(rb[seed])):
            out.append(f"seed {seed} left out (a run diverged)")
            continue
        va, vb = value(ra[seed]), value(rb[seed])
        if va is None or vb is None:
            out.append(f"seed {seed} left out (no value)")
            continue
        xa.append(float(va))
        xb.append(float(vb))
    return xa, xb, out


def _paired_forgetting(metrics: Mapping[str, Any], experiment: str, a: str, b: str
                       ) -> tuple[list[float], list[float], str]:
    """Per seed, ``F`` of ``a`` and ``b`` over the old tasks both learned (:data:`LEARNED_THRESHOLD`), and a note
    naming every task left out and every seed dropped because no old task was learned by both."""
    ra, rb = runs_by_seed(metrics, experiment, a), runs_by_seed(metrics, experiment, b)
    fa, fb, left, dropped, diverged = [], [], [], [], []
    for seed in sorted(set(ra) & set(rb)):
        if not (_finished(ra[seed]) and _finished(rb[seed])):
            diverged.append(seed)
            continue
        acc_a, acc_b = _acc(ra[seed]), _acc(rb[seed])
        old = range(acc_a.shape[0] - 1)
        la, lb = learned_tasks(acc_a), learned_tasks(acc_b)
        both = [k for k in old if la[k] and lb[k]]
        for k in old:
            if not la[k] or not lb[k]:
                who = " and ".join(m for m, ok in ((a, la[k]), (b, lb[k])) if not ok)
                left.append(f"task {k} in seed {seed} ({who} never learned it: a[{k},{k}] < "
                            f"{100 * LEARNED_THRESHOLD:.0f} %)")
        if not both:
            dropped.append(seed)
            continue
        fa.append(forgetting_on(acc_a, both))
        fb.append(forgetting_on(acc_b, both))
    notes = [f"judged on the old tasks both methods learned (a[k,k] >= {100 * LEARNED_THRESHOLD:.0f} %)"]
    if left:
        notes.append("left out: " + "; ".join(left))
    if dropped:
        notes.append(f"seed(s) {dropped} dropped (no old task learned by both)")
    if diverged:
        notes.append(f"seed(s) {diverged} left out (a run diverged)")
    return fa, fb, "; ".join(notes)


def _label(metrics: Mapping[str, Any], method: str) -> str:
    return metrics.get("method_labels", {}).get(method, method)


def _code_lambda_methods(metrics: Mapping[str, Any], experiment: str) -> list[tuple[str, float]]:
    """``(method, λ)`` of every code-mode LifeQuant method of ``experiment`` (the λ sweep), by λ."""
    out = {}
    for r in metrics["runs"]:
        m = r.get("settings", {}).get("method", {})
        if r["experiment"] == experiment and m.get("mode") == "code" and m.get("penalty") == "ours" \
                and m.get("replay") is False:
            out[r["method"]] = float(m["lam"])
    return sorted(out.items(), key=lambda kv: kv[1])


# ----------------------------------------------------------------------------------------------- claims
def experiment_claims(metrics: Mapping[str, Any], experiment: str, prefix: str) -> list[C.Claim]:
    """The claims of one experiment (ids ``<prefix>1``, ``<prefix>2``, ...), paired by seed.

    A claim whose methods did not run in this experiment is :func:`paperlib.claims.not_measured`."""
    have = set(_methods(metrics, experiment))
    tag = f"[{experiment}] "
    out: list[C.Claim] = []
    n = 0

    def nid() -> str:
        nonlocal n
        n += 1
        return f"{prefix}{n}"

    def need(*methods: str) -> str:
        missing = [m for m in methods if m not in have]
        return f"method(s) {missing} not run in this experiment" if missing else ""

    def absent(cid: str, text: str, source: str, direction: str, expected: str, why: str) -> C.Claim:
        return C.not_measured(cid, tag + text, source, direction, expected, why)  # type: ignore[arg-type]

    def compare(text: str, source: str, direction: str, expected: str, a: str, b: str, value: Any, label: str,
                margin: float | None = None) -> None:
        """One paired claim of method ``a`` against ``b`` (seed pairs), or "not measured" when either did not
        run. ``value``: ``"F"`` (forgetting, :func:`_paired_forgetting`) or a per-run function (:func:`_pairs`)."""
        cid = nid()
        if (why := need(a, b)):
            out.append(absent(cid, text, source, direction, expected, why))
            return
        if value == "F":
            xa, xb, note = _paired_forgetting(metrics, experiment, a, b)
        else:
            xa, xb, notes = _pairs(metrics, experiment, a, b, value)
            note = "; ".join(notes)
        out.append(C.paired(cid, tag + text, source, direction, expected, xa, xb, scale=100, unit="points",
                            label=label, margin=margin, note=note))

    # 1. QAT fine-tuning forgets the dropped classes
    cid, text = nid(), "4-bit QAT fine-tuning on each new task alone (original) forgets the classes absent from " \
                       "the last task almost completely"
    exp_txt = f"top-1 on those classes < {NEAR_TOTAL_FORGETTING_PCT:g} %"
    if (why := need("original")):
        out.append(absent(cid, text, SRC_ABSTRACT, "decrease", exp_txt, why))
    else:
        runs = [r for r in runs_by_seed(metrics, experiment, "original").values() if _finished(r)]
        vals = [r["acc_dropped_classes"] for r in runs if r["acc_dropped_classes"] is not None]
        out.append(C.one_sample(cid, tag + text, SRC_ABSTRACT, "decrease", exp_txt, vals,
                                null=NEAR_TOTAL_FORGETTING_PCT, scale=100, unit="%",
                                label="top-1 on dropped classes (original)",
                                note=f"judged against {NEAR_TOTAL_FORGETTING_PCT:g} %"))

    # 2. replay reduces forgetting by a lot
    cid, text = nid(), "replay of 20 % of each old task in the training batches reduces forgetting by a lot"
    exp_txt = "F_T(replay + CE) at most half of F_T(original)"
    if (why := need("original", "replay_ce")):
        out.append(absent(cid, text, SRC_FIGURE_BALL, "decrease", exp_txt, why))
    else:
        fr, fo, note = _paired_forgetting(metrics, experiment, "replay_ce", "original")
        out.append(C.one_sample(cid, tag + text, SRC_FIGURE_BALL, "decrease", exp_txt,
                                [r - 0.5 * o for r, o in zip(fr, fo, strict=True)], scale=100, unit="points",
                                label="F_T(replay+CE) - 0.5 F_T(original)", note=note))

    # 3-4. BaLL on top of replay
    compare("BaLL instead of cross-entropy on the replay batches does not lower the average accuracy",
            SRC_FIGURE_BALL, "increase", f"A_T(replay + BaLL) >= A_T(replay + CE) - {NO_HARM_POINTS:g} point",
            "replay_ball", "replay_ce", lambda r: r["metrics"]["A_T"], "A_T(replay+BaLL) - A_T(replay+CE)",
            margin=NO_HARM_POINTS)
    compare("BaLL raises the accuracy of the replay-only classes (absent from the last task)", SRC_FIGURE_BALL,
            "increase", "top-1 on those classes: replay + BaLL > replay + CE", "replay_ball", "replay_ce",
            lambda r: r["acc_dropped_classes"], "dropped-class top-1, BaLL - CE")

    # 5-8. paper-mode LifeQuant
    for other, direction, expected, margin, src, text, metric in (
        ("replay_ball", "decrease", "F_T(LifeQuant, paper mode) < F_T(replay + BaLL)", None, SRC_FIGURE_PROX,
         "ProxQ's proximal term on top of replay + BaLL lowers forgetting (the ProxQ ablation)", "F"),
        ("replay_ce", "decrease",
         f"F_T(LifeQuant, paper mode) <= F_T(replay + CE) + {NO_MORE_FORGETTING_POINTS:g} point",
         NO_MORE_FORGETTING_POINTS, SRC_ABSTRACT, "paper-mode LifeQuant forgets no more than replay + CE", "F"),
        ("replay_ce", "increase", "A_T(LifeQuant, paper mode) > A_T(replay + CE)", None, SRC_ABSTRACT,
         "paper-mode LifeQuant has a higher average accuracy than replay + CE", "A"),
        ("ewc", "increase", "A_T(LifeQuant, paper mode) > A_T(EWC)", None, SRC_ABSTRACT,
         "paper-mode LifeQuant has a higher average accuracy than the EWC baseline", "A"),
    ):
        name = _label(metrics, other)
        if metric == "F":
            compare(text, src, direction, expected, "lifequant_paper", other, "F",
                    f"F_T(paper mode) - F_T({name})", margin)
        else:
            compare(text, src, direction, expected, "lifequant_paper", other, lambda r: r["metrics"]["A_T"],
                    f"A_T(paper mode) - A_T({name})", margin)

    # 9-11. code-mode LifeQuant (the shipped main.py)
    compare("code-mode LifeQuant (shipped main.py: no replay in the batches) forgets less than original",
            SRC_CODE_MAIN, "decrease", "F_T(LifeQuant, code mode) < F_T(original)", "lifequant_code", "original",
            "F", "F_T(code mode) - F_T(original)")
    compare("code-mode LifeQuant pays for it in accuracy on the new (last) task", SRC_CODE_MAIN, "decrease",
            "last-task top-1: code mode < original", "lifequant_code", "original", lambda r: r["acc_last_task"],
            "last-task top-1, code mode - original")
    compare("code-mode LifeQuant forgets more than paper mode (replay in the batches matters)", SRC_CODE_MAIN,
            "increase", "F_T(code mode) > F_T(paper mode)", "lifequant_code", "lifequant_paper", "F",
            "F_T(code mode) - F_T(paper mode)")

    # 12. the λ sweep of code mode
    sweep = _code_lambda_methods(metrics, experiment)
    base = next(((m, lam) for m, lam in sweep if m == "lifequant_code"), None)
    for method, lam in sweep:
        if base is None or method == base[0] or lam <= base[1]:
            continue
        cid = nid()
        text = f"code-mode LifeQuant's effect grows with λ: λ = {lam:g} forgets less than λ = {base[1]:g}"
        a, b, note = _paired_forgetting(metrics, experiment, method, base[0])
        out.append(C.paired(cid, tag + text, SRC_CODE_LAMBDA, "decrease", f"F_T(λ = {lam:g}) < F_T(λ = {base[1]:g})",
                            a, b, scale=100, unit="points", label=f"F_T(λ={lam:g}) - F_T(λ={base[1]:g})",
                            note=note))
    return out


def lifequant_claims(metrics: Mapping[str, Any]) -> list[C.Claim]:
    """Every claim of a ``run_lifequant`` result: per experiment (ids ``A1..``, ``B1..``, ... in experiment
    order) and the quantizer's 32-bit identity (``Q1``)."""
    out: list[C.Claim] = []
    for i, exp in enumerate(metrics["experiments"]):
        out += experiment_claims(metrics, exp["name"], _prefix(i))
    ident = [bool(p["identity_at_32_bits"]) for p in metrics.get("pretrain", [])]
    out.append(C.property_claim(
        "Q1", "at 32 bits the shipped standardize quantizer is the identity (the FP32 net is the 32-bit net)",
        SRC_CODE_QUANT, "W32/A32 output == float output", "checked on every start model", ident))
    return out


def _prefix(i: int) -> str:
    letters = "ABCDEFGHIJKLMNOPRSTUVWXYZ"  # Q is the quantizer's
    return letters[i] if i < len(letters) else f"E{i + 1}."


# ----------------------------------------------------------------------------------------------- findings
def _pct(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f} %"


def _mean(vals: Sequence[float | None]) -> float | None:
    xs = [v for v in vals if v is not None]
    return float(np.mean(xs)) if xs else None


def never_learned(metrics: Mapping[str, Any]) -> list[tuple[str, str, int, list[int]]]:
    """``(experiment, method, task, seeds)`` for every task some finished run never learned
    (``a[k, k] < LEARNED_THRESHOLD``)."""
    found: dict[tuple[str, str, int], list[int]] = {}
    for r in metrics["runs"]:
        if not _finished(r):
            continue
        for k, ok in enumerate(learned_tasks(_acc(r))):
            if not ok:
                found.setdefault((r["experiment"], r["method"], k), []).append(int(r["seed"]))
    return [(e, m, k, sorted(s)) for (e, m, k), s in found.items()]


def recovery_after_drop(metrics: Mapping[str, Any], experiment: str, method: str) -> tuple[float, int] | None:
    """``(mean over seeds and old tasks k <= T-3 of a[T-1, k] - a[k+1, k], n seeds)``: how much an old task regains
    between the task right after it and the end (replay re-teaching it); None with fewer than 3 tasks or no run."""
    vals = []
    for r in runs_by_seed(metrics, experiment, method).values():
        if not _finished(r):
            continue
        a = _acc(r)
        T = a.shape[0]
        if T < 3:
            return None
        vals.append(float(np.mean([a[T - 1, k] - a[k + 1, k] for k in range(T - 2)])))
    return (float(np.mean(vals)), len(vals)) if vals else None


def ft_bwt_agreement(metrics: Mapping[str, Any]) -> tuple[int, int, list[tuple[str, str, float]]]:
    """``(rows where F_T = -BWT in every seed, rows, [(experiment, method, mean F_T + BWT) where not])``: one row
    per experiment and method (:func:`.metrics.forgetting_minus_bwt`)."""
    gaps: dict[tuple[str, str], list[float]] = {}
    for r in metrics["runs"]:
        if _finished(r) and len(r["acc"]) > 1:
            gaps.setdefault((r["experiment"], r["method"]), []).append(forgetting_minus_bwt(_acc(r)))
    differ = [(e, m, float(np.mean(g))) for (e, m), g in gaps.items() if max(g) > 1e-12]
    return len(gaps) - len(differ), len(gaps), differ


def findings(metrics: Mapping[str, Any]) -> str:
    """The notebook's "What we found" paragraph (markdown), a pure function of the metrics: the verdict counts,
    every claim that did not hold and why the undecidable ones are, then the negative and surprising numbers
    with their n."""
    recs = C.from_records(metrics["claims"]) if "claims" in metrics else lifequant_claims(metrics)
    n_seeds = len(metrics.get("seeds", []))
    parts = [f"**What we found** ({n_seeds} seed(s) per method; every comparison is paired by seed). "
             + C.summary_sentence(recs)]
    for c in recs:
        if c.verdict == "not held":
            parts.append(f"**Did not hold ({c.id}):** {c.claim}: {c.measured}.")
    undecided = [c for c in recs if c.verdict == "undecidable"]
    if undecided:
        parts.append("**Undecidable:** " + "; ".join(
            f"{c.id} ({c.note})" if c.n < 2 or c.measured == "not measured" or "vacuous" in c.note
            else f"{c.id} (the 95 % CI straddles the threshold: {c.measured})" for c in undecided) + ".")
    # the pretraining chain: W8A8 vs FP32 on test_0
    for exp in metrics["experiments"]:
        pre = [p for p in metrics.get("pretrain", []) if p["experiment"] == exp["name"]]
        if not pre:
            continue
        fp = _mean([p["fp32_top1"] for p in pre])
        inter = {b: _mean([p["intermediate_top1"].get(b) for p in pre]) for b in pre[0]["intermediate_top1"]}
        if inter:
            parts.append(f"[{exp['name']}] test_0 top-1: FP32 {_pct(fp)}, "
                         + ", ".join(f"W{b}A{b} {_pct(v)}" for b, v in inter.items())
                         + f" (n = {len(pre)}) after {exp['schedule']['q8_epochs']} epoch(s) at 8 bits; the "
                         "standardize quantizer rescales every conv by 0.5/std(w) and the activations are clamped "
                         "to [0, 1], so the FP32 BN statistics are stale until those epochs re-estimate them "
                         "(docs/lifequant.md, 'The 32 -> 8 -> 4-bit chain').")
    # tasks never learned
    missed = never_learned(metrics)
    if missed:
        parts.append("**Tasks never learned** (a[k,k] < "
                     f"{100 * LEARNED_THRESHOLD:.0f} %; their forgetting is left out of the comparisons): "
                     + "; ".join(f"[{e}] {_label(metrics, m)}: task {k} in seed(s) {s}" for e, m, k, s in missed)
                     + ".")
    else:
        parts.append(f"Every method learned every task in every seed (a[k,k] >= {100 * LEARNED_THRESHOLD:.0f} %).")
    # BaLL's direction and ProxQ's importance
    for exp in metrics["experiments"]:
        name = exp["name"]
        rce, rb = runs_by_seed(metrics, name, "replay_ce"), runs_by_seed(metrics, name, "replay_ball")
        if rce and rb:
            d_ce = _mean([r["acc_dropped_classes"] for r in rce.values() if _finished(r)])
            d_b = _mean([r["acc_dropped_classes"] for r in rb.values() if _finished(r)])
            if d_ce is not None and d_b is not None and d_b < d_ce:
                parts.append(
                    f"[{name}] BaLL *lowered* the replay-only classes' top-1 ({_pct(d_b)} vs {_pct(d_ce)} with CE, "
                    f"n = {min(len(rce), len(rb))}): the figure's form CE(φ + log s, y) with s_c = 1/(1 + C n_c/N) "
                    "adds the larger log s to the rare classes during training, so the trained logits of rare "
                    "classes end up lower at test time, the opposite of a balanced softmax "
                    "(docs/lifequant.md, 'BaLL').")
        code = runs_by_seed(metrics, name, "lifequant_code")
        sums = [r.get("importance_sum") or [] for r in code.values() if _finished(r)]
        if sums and all(len(s) > 2 and s[1] is not None and s[2] is not None for s in sums):
            t1, t2 = _mean([s[1] for s in sums]), _mean([s[2] for s in sums])
            parts.append(f"[{name}] code-mode ProxQ's importance Σ F: {t1:.2g} at the start of task 1 vs {t2:.2g} "
                         f"at task 2 (n = {len(sums)}): F is a squared loss gradient on the replay data, and after "
                         "task 0 the model fits task 0's replay almost perfectly, so F (and the penalty) nearly "
                         "vanish exactly when task 0 is most at risk (docs/lifequant.md, 'ProxQ').")
    for exp in metrics["experiments"]:
        name = exp["name"]
        rb = recovery_after_drop(metrics, name, "replay_ball")
        lp = recovery_after_drop(metrics, name, "lifequant_paper")
        if rb is not None and lp is not None:
            text = (f"[{name}] change of an old task's top-1 from just after the next task (a[k+1,k]) to the end: "
                    f"{100 * rb[0]:+.1f} points with replay + BaLL, {100 * lp[0]:+.1f} with ProxQ added (paper mode; "
                    f"n = {min(rb[1], lp[1])})")
            if lp[0] < rb[0] - 0.05:
                text += ("; replay re-teaches a dropped task, ProxQ's term holds it down: it anchors the parameters "
                         "to the model after the previous task, which already carries the drop (docs/lifequant.md, "
                         "'ProxQ')")
            parts.append(text + ".")
        for method, lam in _code_lambda_methods(metrics, name):
            runs = [r for r in runs_by_seed(metrics, name, method).values() if r.get("importance_max")]
            maxes = [v for r in runs for v in r["importance_max"] if v is not None]
            if maxes and lam > 0:
                sched = exp.get("schedule", {})
                lr, mom = float(sched.get("task_lr", math.nan)), float(sched.get("momentum", 0.9))
                parts.append(f"[{name}] {_label(metrics, method)}: lr·2λ·max F up to {lr * 2 * lam * max(maxes):.2f} "
                             f"(SGD with momentum diverges above {2 * (1 + mom):.1f}; n = {len(runs)}).")
    same, rows, differ = ft_bwt_agreement(metrics)
    if rows:
        parts.append(f"F_T = -BWT in {same} of {rows} method rows; they differ only where an old task's accuracy "
                     "rose after it was learned (F_T measures from the best accuracy, BWT from the just-learned one)"
                     + (": " + "; ".join(f"[{e}] {_label(metrics, m)} (F_T + BWT = {100 * g:.1f} points)"
                                         for e, m, g in differ) if differ else "") + ".")
    return "\n\n".join(parts)
