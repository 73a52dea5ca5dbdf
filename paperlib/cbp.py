"""CBP: constrained backpropagation with a pseudo-Lagrange multiplier method (Kim & Jeong, NeurIPS 2021).

The method in this project's words, with the original code's departures from the paper and this project's own
(each with the option that selects the original), is ``docs/cbp.md``. Read top to bottom:

1. the quantization sets ``Q = s * F`` (:func:`levels`, CBP paper, Sec. 4; docs/cbp.md, 'Quantization sets'),
2. the forward quantizer, nearest-level projection with a straight-through backward (:func:`project`,
   :class:`CBPWeight`; original code: module.py),
3. the windowed sawtooth constraint ``cs(w; Q, g)`` of paper Eqs. 8-10 with the original code's subgradient
   as its autograd gradient (:func:`constraint`, :func:`windows`), and the constraint-failure score
   (:func:`cfs`, paper Eq. 11),
   each with a readable bucketize/gather definition and a fast arithmetic twin that gives the same bits,
4. the training controller :class:`CBP` (paper Algorithm 1): per-weight multipliers λ, the event rule, the window
   schedule ``g``, the single lr drop, gradient clipping, weight clamping, checkpointable state,
5. the paper's ImageNet hyper-parameters (:func:`paper_hparams`),
6. the experiment of ``notebooks/cbp.ipynb``: presets, :func:`post_train` (one run through
   :func:`paperlib.train.fit`, resumable), :func:`run_cbp_experiment` (FP net, projection, the Table 4
   variants over sets and seeds, projection + BN re-estimation, where the accuracy comes from, JSON-native
   metrics), the tables, the claims (:func:`cbp_claims`, judged by :mod:`paperlib.claims`) and the
   "What we found" paragraph (:func:`findings`).

The controller drives any loop. A hand-written loop::

    cbp = CBP(model, "ter", lr_lambda=5e-4, p_max=5)      # quantizes all but the first/last layer
    opt = torch.optim.SGD(cbp.param_groups(weight_decay=1e-4), lr=5e-3, momentum=0.9)
    cbp.start()                                          # s = mean|w| frozen, initial λ step at g = 1
    for epoch in range(epochs):
        for x, y in batches:
            loss = cbp.criterion(model, x, y)            # CE(model(x; W_q), y) + Σ λ·cs(W; g), L_sum += loss
            opt.zero_grad(); loss.backward()
            cbp.after_backward()                         # element-wise grad clip at 1 (all parameters)
            opt.step()
            cbp.after_step()                             # clamp constrained latent weights to [-1, 1]
        info = cbp.end_of_epoch(optimizer=opt)           # event? g, lr factor (applied to ``opt``)

It also has the hooks of ``paperlib.train.Callback`` (``on_train_start``, ``before_batch``,
``after_backward``, ``after_step``, ``on_epoch_end``, ``state_dict``, ``load_state_dict``), so
``fit(model, ..., criterion=cbp.criterion, callbacks=[cbp])`` runs it; the loop's scheduler must then leave
the learning rate alone (CBP changes it once, at ``g = 20``).

Where the original code and the paper differ, an option picks either (:class:`CBPConfig`; docs/cbp.md,
'Original code versus paper'):

============================  ================================================================================
option                        default / alternatives
============================  ================================================================================
``lambda_optimizer``          ``"adam"`` (code, paper Sec. 4) / ``"sgd"`` (paper Algorithm 1, plain ascent)
``grad_clip``, ``clamp``      both on (grad clip 1: code only; clip(W) to [-1, 1]: paper and code)
colour jitter                 the preset's ``color_jitter`` (code: off, the default; paper: on)
``recompute_scale``           ``False`` (code: frozen) / ``True`` (ablation: s at every event)
window                        ``variant="cbp"`` (paper Eq. 10 = code); ``"no_window"`` (paper Table 4)
initial λ step at ``g = 1``   done in :meth:`CBP.start` (code: main.py)
lr × 0.1 at ``g = 20``        all param groups, once (paper and code)
============================  ================================================================================

Weight decay, batch size and lr per architecture (paper Sec. 4.1-4.2, the original README) are training-loop
data: :func:`paper_hparams` returns the paper/code values.

Speed. A train step costs little more than the FP32 step: the projection and the constraint are
computed with a few element-wise float ops (no bucketize, gathers or bool tensors, which cost 10-50 times an
add on CPU), and :meth:`CBP.criterion` runs one fused pass over all constrained weights (:class:`_FusedStep`:
every layer's projection and the penalty, scratch in reused buffers) instead of one small pass per layer. No
host sync in the step (``L_sum`` accumulates on the device). Values and gradients are bit-identical to the
readable definitions (``tests/test_fused_cbp.py``); ``CBP(..., fused=False)`` quantizes layer by layer and
``CBPWeight.fast = False`` uses the bucketize projection.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import claims
from .device import cpu_threads
from .distributed import SyncedCBP
from .presets import register_presets
from .quant.config import Hooks, QuantConfig
from .quant.core import QuantConv2d, QuantLinear, quantize_model
from .train import Callback

# ---------------------------------------------------------------------------------------------------------
# 1. Quantization sets (CBP paper, Sec. 4; original code: module.py)
# ---------------------------------------------------------------------------------------------------------

#: Factor sets ``F`` per mode (original code: ``module.py:L24-44``; docs/cbp.md, 'Quantization sets'); levels
#: are ``Q = s * F``.
MODES: dict[str, tuple[float, ...]] = {
    "bin": (-1.0, 1.0),
    "ter": (-1.0, 0.0, 1.0),
    "1bit": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "2bit": (-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0),
}

#: ``L_pre`` after an event and at the start (``main.py``: ``lagsum_pre = 1e10``; paper: L_sum^max).
L_PRE_RESET = 1e10


def check_mode(mode: str) -> str:
    """Validate a CBP quantization-set name (docs/cbp.md, 'Quantization sets')."""
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"unknown CBP mode {mode!r}: use one of {list(MODES)}")
    return mode


def levels(
    mode: str,
    scale: float | Tensor = 1.0,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Sorted quantization levels ``Q = scale * F(mode)`` (CBP paper, Sec. 4), a 1-D tensor of ``n`` levels.

    ``scale`` is a positive float or a one-element tensor (then the result follows its device and dtype
    unless ``dtype``/``device`` are given). ``mode`` is ``"bin"``, ``"ter"``, ``"1bit"`` or ``"2bit"``.
    """
    check_mode(mode)
    if isinstance(scale, bool) or not isinstance(scale, int | float | Tensor):
        raise TypeError(f"scale must be a positive float or a one-element tensor, got {type(scale).__name__}")
    if isinstance(scale, Tensor):
        if scale.numel() != 1:
            raise ValueError(f"scale must be one number per layer (CBP paper, Sec. 4), got {tuple(scale.shape)}")
        s = scale.detach().reshape(())
        dtype = dtype or (s.dtype if s.is_floating_point() else torch.get_default_dtype())
        device = device if device is not None else s.device
        value = float(s)
    else:
        value = float(scale)
        s = None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"scale={value}: the scale s = mean|w| must be positive and finite")
    factors = torch.tensor(MODES[mode], dtype=dtype or torch.get_default_dtype(), device=device)
    return factors * (s.to(factors) if s is not None else value)


def _check_levels(q: Tensor) -> Tensor:
    if not isinstance(q, Tensor):
        raise TypeError(f"levels must be a tensor (use cbp.levels(mode, scale)), got {type(q).__name__}")
    if q.dim() != 1 or q.numel() < 2 or not q.is_floating_point():
        raise ValueError(f"levels must be a 1-D float tensor of >= 2 levels, got shape {tuple(q.shape)}, "
                         f"dtype {q.dtype}: build it with cbp.levels(mode, scale)")
    if not bool(torch.isfinite(q).all()) or not bool((q[1:] > q[:-1]).all()):
        raise ValueError(f"levels must be finite and strictly increasing (q_1 < ... < q_n), got {q.tolist()}")
    return q


def _check_weight(w: Tensor) -> None:
    if not isinstance(w, Tensor) or not w.is_floating_point():
        raise TypeError(f"w must be a float tensor, got {type(w).__name__} {getattr(w, 'dtype', '')}")


def _check_g(g: float) -> float:
    """``g >= 1`` (``math.inf`` allowed); returns ``r = 1 - 1/g`` (paper Eq. 10; original code: module.py,
    variable ``ucs``)."""
    if isinstance(g, bool) or not isinstance(g, numbers.Real):
        raise TypeError(f"g must be a number >= 1 (math.inf for no window), got {type(g).__name__}")
    if math.isnan(g) or g < 1:
        raise ValueError(f"g={g}: the window parameter must be >= 1 (1: whole interior free; inf: no window)")
    return 1.0 - 1.0 / float(g)


# ---------------------------------------------------------------------------------------------------------
# 2. Forward quantizer (CBP paper, Sec. 4; original code: module.py)
# ---------------------------------------------------------------------------------------------------------


def _nearest(w: Tensor, q: Tensor) -> Tensor:
    """Nearest level, saturating, with the original code's tie rule (``sign(0) = 0``; no autograd)."""
    m = (q[1:] + q[:-1]) / 2
    c = torch.bucketize(w, m)  # number of medians strictly below w
    cm = c.clamp(max=m.numel() - 1)
    return torch.where(m[cm] == w, m[cm], q[c])


def _factor_constants(mode: str, dtype: torch.dtype,
                      device: torch.device) -> tuple[Tensor, tuple[float, ...], float]:
    """Medians ``M_i = (F_i + F_{i+1}) / 2`` (a ``(n - 1, 1)`` tensor), half steps ``(F_{i+1} - F_i) / 2``
    and the centre ``(F_1 + F_n) / 2`` of the factor set ``F(mode)``: dyadic numbers, exact in every dtype."""
    key = (mode, dtype, device)
    hit = _FACTOR_CACHE.get(key)
    if hit is None:
        f = MODES[mode]
        medians = torch.tensor([(a + b) / 2 for a, b in itertools.pairwise(f)], dtype=dtype, device=device)
        hit = (medians.view(-1, 1), tuple((b - a) / 2 for a, b in itertools.pairwise(f)), (f[0] + f[-1]) / 2)
        _FACTOR_CACHE[key] = hit
    return hit


_FACTOR_CACHE: dict[tuple[str, torch.dtype, torch.device], tuple[Tensor, tuple[float, ...], float]] = {}
#: the fused step caches its per-element medians up to this many numbers (ImageNet 2-bit sets recompute them)
_MEDIANS_CACHE_MAX = 1 << 24


class _Workspace:
    """Reusable scratch tensors of the fused step: fresh multi-megabyte temporaries every step cost page
    faults (the allocator hands large blocks back to the OS) that were slower than the arithmetic itself."""

    def __init__(self) -> None:
        self.buffers: dict[str, Tensor] = {}

    def __call__(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        buf = self.buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != like.dtype or buf.device != like.device:
            buf = self.buffers[name] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return buf


def _scratch(work: _Workspace | None, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor | None:
    return None if work is None else work(name, shape, like)


def _project_factors(w: Tensor, s: Tensor, medians: Tensor, half_steps: tuple[float, ...], centre: float,
                     m: Tensor | None = None, work: _Workspace | None = None) -> Tensor:
    """Nearest level of ``Q = s·F`` by arithmetic alone (no bucketize/gather/bool tensors; a handful of
    element-wise ops whatever the number of layers when ``s`` is per element):
    ``w_q = s · (c + Σ_i h_i · sign(w - s·M_i))`` with ``h_i = (F_{i+1} - F_i) / 2``, ``c = (F_1 + F_n) / 2``.

    Bit-identical to :func:`_nearest` on ``levels = F·s``: ``s·M_i`` is exactly the median
    ``(q_i + q_{i+1}) / 2`` (F is dyadic, so ``F_i·s`` is exact and halving commutes with rounding), the sign
    of ``w - m_i`` is exact, the bracket is a small dyadic sum (exact) equal to ``F_c`` (or ``M_i`` on a tie,
    ``sign(0) = 0``: the original code's tie rule), and ``s·F_c`` is the level ``q_c`` itself. ``w`` is flat or
    any shape; ``s`` a 0-dim scale or one per element of a flat ``w``; ``m``: the medians ``s·M`` if cached.
    """
    flat = w.reshape(1, -1)
    if m is None:
        m = medians * (s.reshape(1, -1) if s.dim() else s)  # (n - 1, 1) or (n - 1, N)
    rows = len(half_steps)
    signs = torch.sub(flat, m, out=_scratch(work, "signs", (rows, flat.shape[1]), w)).sign_()
    h = half_steps[0]
    if rows > 1 and centre == 0 and all(hj == h for hj in half_steps):  # equal steps: h · Σ signs (integers)
        acc = signs[0] + signs[1]
        for j in range(2, rows):
            acc.add_(signs[j])
        acc = acc.mul_(h)
    else:
        acc = signs[0] * h
        for j in range(1, rows):
            acc.add_(signs[j], alpha=half_steps[j])
        if centre != 0:
            acc.add_(centre)
    return acc.mul_(s.reshape(-1) if s.dim() else s).view_as(w)


class _ProjectFactorsSTE(torch.autograd.Function):
    """:func:`_project_factors` forward, identity backward (as :class:`_ProjectSTE`)."""

    @staticmethod
    def forward(ctx, w: Tensor, s: Tensor, medians: Tensor, half_steps: tuple[float, ...],  # noqa: D102
                centre: float) -> Tensor:
        return _project_factors(w, s, medians, half_steps, centre)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None, None]:  # noqa: D102
        return grad, None, None, None, None


class _ProjectSTE(torch.autograd.Function):
    """Forward: exactly the nearest level (``w + (w_q - w).detach()`` would be off by an ulp); backward:
    identity to ``w``, nothing to the levels."""

    @staticmethod
    def forward(ctx, w: Tensor, q: Tensor) -> Tensor:  # noqa: D102
        return _nearest(w, q)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        return grad, None


def project(w: Tensor, levels: Tensor) -> Tensor:
    """Nearest-level projection with a straight-through backward (CBP paper, Sec. 4; original code:
    ``module.py:L9-22``).

    Forward ``w_q = q_1 + Σ_i Δ_i (sign(w - m_i) + 1) / 2``: the nearest level of ``levels``, saturating at
    ``q_1``/``q_n``. Tie rule: ``sign(0) = 0``, so ``w`` exactly on a median ``m_i`` maps to ``m_i`` itself
    (binary ``w = 0`` gives 0). Backward: identity, no ``|w| <= 1`` gating, no gradient to the levels.
    """
    _check_weight(w)
    return _ProjectSTE.apply(w, _check_levels(levels).detach().to(w))


class CBPWeight(nn.Module):
    """CBP weight quantizer for :func:`paperlib.quant.quantize_model`: ``project(w, s * F(mode))``.

    ``scale`` is a frozen buffer (original code: main.py; a per-layer scalar, in no optimizer group, saved in the
    state dict and used at evaluation). :meth:`factory` builds one per layer with ``s = mean|w|``.
    """

    def __init__(self, mode: str, scale: float | Tensor = 1.0) -> None:
        super().__init__()
        self.mode = check_mode(mode)
        levels(mode, scale)  # validates the scale
        s = scale.detach().reshape(()).clone() if isinstance(scale, Tensor) else torch.tensor(float(scale))
        self.register_buffer("scale", s)
        self.register_buffer("factors", torch.tensor(MODES[mode], dtype=s.dtype, device=s.device),
                             persistent=False)
        #: arithmetic projection (:func:`_project_factors`, bit-identical to :func:`project`); ``False``: the
        #: bucketize reference path
        self.fast = True
        self._pre: tuple[Tensor, Tensor] | None = None  # (weight, its projection) during a fused CBP step

    @classmethod
    def factory(cls, mode: str) -> Callable[[nn.Module], CBPWeight]:
        """``layer -> CBPWeight(mode, mean|layer.weight|)`` for ``quantize_model(model, weight=...)``."""
        check_mode(mode)
        return lambda layer: cls(mode, layer.weight.detach().abs().mean())

    def prepare_compile(self, w: Tensor) -> None:
        """Fill the factor constants for ``w``'s dtype and device before ``torch.compile`` traces the forward
        (:mod:`paperlib.compiled`): filling them during the first compiled call would recompile the second."""
        _factor_constants(self.mode, w.dtype, w.device)

    def levels(self) -> Tensor:
        """The layer's levels ``Q = s * F`` (sorted, on the buffer's device)."""
        return self.factors * self.scale

    def set_scale(self, w: Tensor) -> None:
        """``s = mean|w|`` (CBP paper, Sec. 4; done once at the start, or at events for ``recompute_scale``)."""
        s = w.detach().abs().mean()
        if not bool(torch.isfinite(s)) or float(s) <= 0:
            raise ValueError(f"cannot set the CBP scale from weights with mean|w| = {float(s)}: "
                             "the layer's weights are all zero or not finite")
        self.scale.copy_(s)

    def forward(self, w: Tensor) -> Tensor:
        pre = getattr(self, "_pre", None)
        if pre is not None and pre[0] is w:  # installed by CBP.criterion's fused step (one pass, all layers)
            return pre[1]
        if not self.fast:
            return _ProjectSTE.apply(w, self.levels().detach().to(w))
        s = self.scale.detach().to(w)
        medians, half_steps, centre = _factor_constants(self.mode, w.dtype, w.device)
        return _ProjectFactorsSTE.apply(w, s, medians, half_steps, centre)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, scale={float(self.scale):.4g}"


# ---------------------------------------------------------------------------------------------------------
# 3. Constraint function, windows and CFS (paper Eqs. 8-11; original code: module.py, main.py)
# ---------------------------------------------------------------------------------------------------------


def windows(levels: Tensor, g: float) -> Tensor:
    """Unconstrained windows ``U_i(g) = [q_i + rΔ_i/2, q_{i+1} - rΔ_i/2)``, ``r = 1 - 1/g`` (paper Eq. 10).

    Returns an ``(n - 1, 2)`` tensor of ``[start, end)`` per interval: width ``Δ_i / g``, centred on the
    median ``m_i``; empty (start = end = m_i) for ``g = inf``.
    """
    r = _check_g(g)
    q = _check_levels(levels)
    lo, hi = q[:-1], q[1:]
    half = r * (hi - lo) / 2
    return torch.stack([lo + half, hi - half], dim=1)


def _constraint_and_slope_reference(w: Tensor, q: Tensor, r: float) -> tuple[Tensor, Tensor]:
    """``cs(w; Q, g)`` and its slope ``dcs/dw`` (±2 or 0, float), element-wise (paper Eqs. 8-10), by interval look-up
    (bucketize and gathers): the readable definition, used when :func:`_cs_plan` finds no exact fast path."""
    n = q.numel()
    k = torch.bucketize(w, q, right=True)  # number of levels <= w: 0 below q_1, n at or above q_n
    below, above = k == 0, k == n
    j = (k - 1).clamp(0, n - 2)  # interval [q_j, q_{j+1}) holding w
    lo, hi = q[j], q[j + 1]
    half = r * (hi - lo) / 2
    lower_band = w < lo + half  # [q_j, q_j + rΔ/2): slope +2
    window = ~lower_band & (w < hi - half)  # U_j: cs = 0, slope 0
    y_in = 2 * torch.minimum(w - lo, hi - w)  # Y = 2·dist(w, Q) inside [q_1, q_n)
    cs = torch.where(below, 2 * (q[0] - w), torch.where(above, 2 * (w - q[-1]),
                                                         torch.where(window, torch.zeros_like(w), y_in)))
    one = torch.ones((), dtype=torch.int8, device=w.device)
    sign = torch.where(below, -one, torch.where(above, one, torch.where(
        window, torch.zeros_like(one), torch.where(lower_band, one, -one))))
    return cs, (2 * sign).to(w.dtype)


class _CSPlan:
    """Thresholds of the fast constraint for levels ``q`` and ``r`` (see :func:`_cs_fast`)."""

    __slots__ = ("thresholds", "steps", "top")

    def __init__(self, q: Tensor, r: float) -> None:
        lo, hi = q[:-1], q[1:]
        half = r * (hi - lo) / 2  # the same float ops as the reference's per-element ``r * (hi - lo) / 2``
        # rows: window ends b_j = q_{j+1} - rΔ_j/2, then window starts a_j = q_j + rΔ_j/2
        self.thresholds = torch.cat([hi - half, lo + half]).view(-1, 1)
        values = q.tolist()
        self.steps = tuple(b - a for a, b in itertools.pairwise(values))  # Δ_j (exact: checked by _cs_plan)
        self.top = values[-1]


def _sum_is_exact(a: Tensor, b: Tensor) -> Tensor:
    """Per element: is ``a + b`` exact in floating point? (Knuth's TwoSum error term is zero.)"""
    s = a + b
    a2 = s - b
    return ((a - a2) + (b - (s - a2))) == 0


def _cs_plan(q: Tensor, r: float, *, exact: bool | None = None) -> _CSPlan | None:
    """The fast plan, or ``None`` (use the reference) unless every step ``Δ_j = q_{j+1} - q_j`` and every median
    ``q_j + Δ_j/2`` is exact in ``q``'s dtype: then :func:`_cs_fast` is bit-identical to the reference. The
    factor sets (in units of s) and ``s·F`` for bin/ter pass; arbitrary user levels may not. ``exact=True``
    skips the check (a host sync) for the factor sets, which are known to pass."""
    if exact is None:
        lo, hi = q[:-1], q[1:]
        steps = hi - lo
        exact = bool((_sum_is_exact(hi, -lo) & _sum_is_exact(lo, steps / 2) & (steps / 2 * 2 == steps)).all())
    return _CSPlan(q, r) if exact else None


def _cs_fast(u: Tensor, plan: _CSPlan, slope: bool = True,
             work: _Workspace | None = None) -> tuple[Tensor, Tensor | None]:
    """``cs`` and its slope (±2 or 0) with ~15 element-wise float ops and no bool tensors, bucketize or
    gathers (those cost 10-50× an add on CPU), bit-identical to :func:`_constraint_and_slope_reference`.

    ``B_t = -[u < t] = min(sign(u - t), 0)`` for the sorted thresholds ``a_j <= b_j`` (exact: the sign of a
    float difference is exact). The anchor level ``L = q_n + Σ_j Δ_j·B_{b_j}`` (summed from the top, so each
    partial sum is a level: exact) is the level whose distance ``cs`` measures outside the windows: ``q_1``
    below, ``q_j`` on the lower band ``[q_j, a_j)``, ``q_{j+1}`` on the upper band ``[b_j, q_{j+1})``, ``q_n``
    above. ``|u - L|`` equals the reference's ``min(u - q_j, q_{j+1} - u)`` there (rounding is monotone), the
    window indicator is ``Σ_j (B_{a_j} - B_{b_j})``, and the slope is ``+2`` where ``u >= L``, else ``-2``.
    """
    flat = u.reshape(1, -1)
    m, n = len(plan.steps), flat.shape[1]
    b = torch.sub(flat, plan.thresholds, out=_scratch(work, "b", (2 * m, n), u))
    b = b.sign_().clamp_(max=0)  # (2(n-1), N): -[u < t], rows b_0.., a_0..
    anchor = torch.mul(b[m - 1], plan.steps[m - 1], out=_scratch(work, "anchor", (n,), u)).add_(plan.top)
    for j in range(m - 2, -1, -1):
        anchor.add_(b[j], alpha=plan.steps[j])
    keep = b[0] - b[m]  # 1 + Σ_j (B_{b_j} - B_{a_j}): 0 on the windows, 1 elsewhere
    for j in range(1, m):
        keep.add_(b[j]).sub_(b[m + j])
    d = torch.sub(flat[0], anchor, out=anchor)
    keep2 = keep.add_(1).mul_(2)
    cs = torch.abs(d, out=_scratch(work, "cs", (n,), u)).mul_(keep2).view_as(u)
    if not slope:
        return cs, None
    # +2 where u >= L (d = -0 only for u = -0 on the level 0: make it +0 first), -2 below, 0 on the windows
    return cs, torch.copysign(keep2, d.add_(0.0), out=keep2).view_as(u)


def _constraint_and_slope(w: Tensor, q: Tensor, r: float, slope: bool = True,
                          plan: _CSPlan | None = None) -> tuple[Tensor, Tensor | None]:
    """``cs(w; Q, g)`` and its slope ``dcs/dw`` (±2 or 0, in ``w``'s dtype), element-wise (paper Eqs. 8-10).

    The fast arithmetic path (:func:`_cs_fast`) when the levels allow it exactly, else the reference."""
    plan = plan if plan is not None else _cs_plan(q, r)
    if plan is None:
        return _constraint_and_slope_reference(w, q, r)
    return _cs_fast(w, plan, slope)


class _Constraint(torch.autograd.Function):
    """cs forward; backward ``grad * dcs/dw`` out of place (the original's in-place backward,
    module.py, is only correct when the caller multiplies by λ first; docs/cbp.md, 'Departures and options')."""

    @staticmethod
    def forward(ctx, w: Tensor, q: Tensor, r: float, plan: _CSPlan | None = None) -> Tensor:  # noqa: D102
        cs, slope = _constraint_and_slope(w, q, r, plan=plan)
        ctx.save_for_backward(slope)
        return cs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:  # noqa: D102
        (slope,) = ctx.saved_tensors
        return grad * slope, None, None, None


class _FusedStep(torch.autograd.Function):
    """One pass over all constrained weights: their projections ``w_q`` (flat) and the penalty
    ``Σ λ·s·cs(w/s)``.

    Forward: :func:`_project_factors` with per-element scales and ``(lam_s * cs(w / s)).sum()``, scratch in a
    reused :class:`_Workspace`; backward: ``grad_wq + ((grad_pen * lam_s) * slope) / s`` (the very ops, in
    the same order, that autograd runs for the layer-by-layer path: STE identity, then the mul, constraint and
    div backward), split back to the weights. Values and gradients are bit-identical to that path.
    ``plan is None``: no penalty (variant ``"ste"``).
    """

    @staticmethod
    def forward(ctx, consts: tuple, plan: _CSPlan | None, work: _Workspace,  # noqa: D102
                *ws: Tensor) -> tuple[Tensor, Tensor]:
        s, lam_s, medians, half_steps, centre, m = consts
        n = s.numel()
        w = torch.cat([t.reshape(-1) for t in ws], out=work("w", (n,), s)) if len(ws) > 1 else ws[0].reshape(-1)
        wq = _project_factors(w, s, medians, half_steps, centre, m, work)
        ctx.sizes = [t.numel() for t in ws]
        ctx.shapes = [t.shape for t in ws]
        if plan is None:
            ctx.penalty = False
            return wq, w.new_zeros(())
        u = torch.div(w, s, out=work("u", (n,), s))
        cs, slope = _cs_fast(u, plan, work=work)
        ctx.penalty = True
        ctx.save_for_backward(s, lam_s, slope)
        return wq, torch.mul(lam_s, cs, out=cs).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_wq: Tensor, grad_pen: Tensor) -> tuple[Tensor | None, ...]:  # noqa: D102
        if ctx.penalty:
            s, lam_s, slope = ctx.saved_tensors
            grad_wq = torch.mul(grad_pen, lam_s).mul_(slope).div_(s).add_(grad_wq)  # = grad_wq + that, exactly
        grads = [g.view(shape) for g, shape in zip(grad_wq.split(ctx.sizes), ctx.shapes, strict=True)]
        return (None, None, None, *grads)


def constraint(w: Tensor, levels: Tensor, g: float) -> Tensor:
    """Windowed sawtooth ``cs(w; Q, g)``, element-wise (paper Eqs. 8-10, original code: ``module.py:L86-126``).

    ``Y(w) = 2·dist(w, Q)``; ``cs = 0`` on the windows ``U_i(g)`` (:func:`windows`) and ``Y`` elsewhere,
    including everywhere outside ``[q_1, q_n]``. ``g = 1``: only confinement to ``[q_1, q_n]``;
    ``g = math.inf``: ``cs = Y``. The autograd gradient is the original code's subgradient: -2 below ``q_1``, +2 at
    or above ``q_n``, +2 on ``[q_i, q_i + rΔ_i/2)``, -2 on ``[q_{i+1} - rΔ_i/2, q_{i+1})``, 0 on ``U_i``
    (it points away from the nearest level). No gradient flows to ``levels``. Windows are half-open in
    both forward and backward (the original's forward keeps the measure-zero left edge; docs/cbp.md,
    'Departures and options').
    """
    _check_weight(w)
    r = _check_g(g)
    q = _check_levels(levels).detach().to(w)
    return _Constraint.apply(w, q, r)


def _pairs(model_or_tensors: Any, levels: Tensor | None) -> list[tuple[Tensor, Tensor]]:
    if isinstance(model_or_tensors, nn.Module):
        if levels is not None:
            raise ValueError("cfs(model) takes the levels from the model's CBPWeight layers: drop levels=")
        pairs = [(m.weight, m.weight_quantizer.levels()) for m in model_or_tensors.modules()
                 if isinstance(m, QuantConv2d | QuantLinear) and isinstance(m.weight_quantizer, CBPWeight)]
        if not pairs:
            raise ValueError("the model has no CBPWeight-quantized layer: build it with CBP(model, mode) or "
                             "quantize_model(model, weight=CBPWeight.factory(mode))")
        return pairs
    if isinstance(model_or_tensors, Tensor):
        model_or_tensors = [model_or_tensors]
    items = list(model_or_tensors)
    if levels is not None:
        return [(w, levels) for w in items]
    if not items or not all(isinstance(p, tuple | list) and len(p) == 2 for p in items):
        raise TypeError("cfs takes a model, (weight, levels) pairs, or tensors with levels=...")
    return [(w, q) for w, q in items]


@torch.no_grad()
def cfs(model_or_tensors: nn.Module | Tensor | Iterable, levels: Tensor | None = None) -> float:
    """Constraint-failure score (paper Eq. 11, original code: ``main.py:L311-316``).

    ``CFS = (1/n_w) Σ_j Y(w_j)`` over all constrained weights of all layers: 2 × the mean distance to the
    nearest level, in weight units, no window (``g = inf``). Accepts a model with :class:`CBPWeight`
    layers, an iterable of ``(weight, levels)`` pairs, or tensor(s) with ``levels=``.
    """
    total, count = 0.0, 0
    for w, q in _pairs(model_or_tensors, levels):
        _check_weight(w)
        cs, _ = _constraint_and_slope(w.detach(), _check_levels(q).detach().to(w), 1.0, slope=False)
        total += float(cs.double().sum())
        count += w.numel()
    if count == 0:
        raise ValueError("cfs of no weights: pass at least one non-empty tensor")
    return total / count


# ---------------------------------------------------------------------------------------------------------
# 4. Training controller (paper Algorithm 1; original code: main.py)
# ---------------------------------------------------------------------------------------------------------

VARIANTS = ("cbp", "no_window", "ste")
LAMBDA_OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class CBPConfig(QuantConfig):
    """Hyper-parameters of :class:`CBP` (defaults: the original code, main.py; sources in brackets), and the CBP
    config of :func:`paperlib.quantize_` (weights only): ``CBPConfig(mode="ter")`` gives every layer outside
    ``skip`` a :class:`CBPWeight` of that mode with the scale ``mean|w|`` of its weights."""

    mode: str = "bin"  # quantization set, paper Sec. 4 [paper = code]
    # "cbp": windowed cs with the g schedule [paper = code]; "no_window": cs = Y (g = inf) from the start
    # (Table 4 ablation); "ste": λ ≡ 0, plain backprop with the STE forward (Table 4 baseline). Events, g and
    # the lr drop run identically in all three, so the budgets match.
    variant: str = "cbp"
    lr_lambda: float = 1e-4  # step of the λ optimizer [paper Sec. 4 = code]
    lambda_optimizer: str = "adam"  # "adam" [code, paper Sec. 4]; "sgd": λ += lr_lambda·cs [paper Alg. 1]
    p_max: int = 20  # an event at the latest every p_max epochs [code --period]
    lr_drop: float = 0.1  # lr factor applied once ... [paper = code]
    lr_drop_at_g: int = 20  # ... when g reaches this value [paper = code]
    grad_clip: float | None = 1.0  # element-wise value clip of all gradients [code; not in paper]; None: off
    clamp: tuple[float, float] | None = (-1.0, 1.0)  # clip(W) of constrained latent weights [paper = code]
    recompute_scale: bool = False  # s = mean|w| re-estimated at each event [ablation; code: frozen]
    skip: tuple[str, ...] | str = "first_last"  # FP layers when CBP quantizes the model [paper Sec. 4 = code]

    def __post_init__(self) -> None:
        check_mode(self.mode)
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown CBP variant {self.variant!r}: use one of {list(VARIANTS)}")
        if self.lambda_optimizer not in LAMBDA_OPTIMIZERS:
            raise ValueError(f"lambda_optimizer={self.lambda_optimizer!r}: "
                             f"use one of {list(LAMBDA_OPTIMIZERS)}")
        if not (isinstance(self.lr_lambda, int | float) and self.lr_lambda >= 0):
            raise ValueError(f"lr_lambda={self.lr_lambda}: the multiplier step must be >= 0")
        if isinstance(self.p_max, bool) or not isinstance(self.p_max, int) or self.p_max < 1:
            raise ValueError(f"p_max={self.p_max}: the longest gap between events must be an int >= 1")
        if not 0 < self.lr_drop <= 1:
            raise ValueError(f"lr_drop={self.lr_drop}: the lr factor must be in (0, 1]")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip={self.grad_clip}: use a positive value or None")
        if self.clamp is not None and not (len(self.clamp) == 2 and self.clamp[0] < self.clamp[1]):
            raise ValueError(f"clamp={self.clamp}: use (low, high) with low < high, or None")
        self.check_common()

    method: ClassVar[str] = "cbp"

    def weight_quantizer(self, layer: nn.Module) -> nn.Module:
        return CBPWeight.factory(self.mode)(layer)

    def hooks(self, model: nn.Module, train_data: Any) -> Hooks:
        """A :class:`CBP` controller on ``model``: its Lagrangian as the criterion, and the controller (through
        :class:`paperlib.distributed.SyncedCBP`, which under ``torchrun`` averages the epoch's Lagrangian sum
        over ranks and in one process is the controller itself) as the callback."""
        cbp = CBP(model, config=self)
        return Hooks(cbp.criterion, [SyncedCBP(cbp)])


def next_g(g: int) -> int:
    """The window schedule (original code: main.py; docs/cbp.md, 'Multipliers, events and the window'):
    ``g + 1`` below 10, then ``+ 10`` (1, 2, ..., 10, 20, 30, ...)."""
    return g + 1 if g < 10 else g + 10


def _clone_state(obj: Any) -> Any:
    """Deep copy with tensors detached and cloned (a snapshot later training does not mutate)."""
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, Mapping):
        return {k: _clone_state(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_clone_state(v) for v in obj)
    return copy.deepcopy(obj)


class CBP:
    """CBP training controller: multipliers, events, window schedule (paper Algorithm 1, original code: ``main.py``).

    ``CBP(model, mode, **options)`` (options: the fields of :class:`CBPConfig`, or ``config=``) quantizes
    ``model`` in place with :class:`CBPWeight` (first and last layers FP) unless it already has CBPWeight
    layers. State: one multiplier per constrained weight (``lambdas``, init 0), ``g = 1``, ``p = 0``,
    ``L_pre = 1e10``. See the module docstring for the loop.
    """

    def __init__(self, model: nn.Module, mode: str | None = None, *, config: CBPConfig | None = None,
                 fused: bool = True, **options: Any) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"CBP needs an nn.Module, got {type(model).__name__}")
        known = {f.name for f in fields(CBPConfig)}
        unknown = set(options) - known
        if unknown:
            raise TypeError(f"unknown CBP options {sorted(unknown)}; valid: {sorted(known)}")
        cfg = config or CBPConfig()
        if mode is not None:
            options["mode"] = mode
        self.config = replace(cfg, **options) if options else cfg
        self.model = model
        self.layers = self._find_layers(model)
        if not self.layers:
            quantize_model(model, weight=CBPWeight.factory(self.config.mode), skip=self.config.skip)
            self.layers = self._find_layers(model)
            if not self.layers:
                raise ValueError("CBP found no layer to constrain: every Conv2d/Linear is in skip")
        modes = {layer.weight_quantizer.mode for layer in self.layers.values()}
        if modes != {self.config.mode}:
            raise ValueError(f"the model's CBPWeight layers use modes {sorted(modes)} but CBP was given "
                             f"mode={self.config.mode!r}: pass the same mode")
        self.lambdas: list[Tensor] = [torch.zeros_like(w) for w in self._weights()]
        self._lambda_opt = self._make_lambda_optimizer()
        self.g: int = 1
        self.p: int = 0
        self.l_pre: float = L_PRE_RESET
        self.events: int = 0
        self.epochs: int = 0
        self.lr_scale: float = 1.0  # cumulative factor CBP has applied to the weight lr
        self.started: bool = False
        self._l_sum: Tensor | None = None
        self._batches: int = 0
        self._optimizer: torch.optim.Optimizer | None = None
        self._flat: tuple[Tensor, Tensor, Tensor] | None = None
        self._plans: dict[float, _CSPlan] = {}
        self._medians: Tensor | None = None  # per-element medians s·M of the fused step (cached)
        self._work = _Workspace()  # scratch of the fused step
        #: :meth:`criterion` runs the fused step (:class:`_FusedStep`: all layers' projections and the penalty
        #: in one flat pass, bit-identical to the per-layer path); ``False``: quantize layer by layer
        self.fused = bool(fused)

    # --- structure -------------------------------------------------------------------------------------
    @staticmethod
    def _find_layers(model: nn.Module) -> dict[str, QuantConv2d | QuantLinear]:
        return {n: m for n, m in model.named_modules()
                if isinstance(m, QuantConv2d | QuantLinear) and isinstance(m.weight_quantizer, CBPWeight)}

    def _weights(self) -> list[Tensor]:
        return [layer.weight for layer in self.layers.values()]

    def _levels(self) -> list[Tensor]:
        return [layer.weight_quantizer.levels().to(layer.weight) for layer in self.layers.values()]

    def _make_lambda_optimizer(self) -> torch.optim.Optimizer:
        lr = self.config.lr_lambda
        if self.config.lambda_optimizer == "adam":
            return torch.optim.Adam(self.lambdas, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0)
        return torch.optim.SGD(self.lambdas, lr=lr)

    def _sync_device(self) -> None:
        """Follow the model if it moved (``fit`` calls ``model.to(device)`` after CBP was built)."""
        ws = self._weights()
        pairs = zip(self.lambdas, ws, strict=True)
        if all(lam.device == w.device and lam.dtype == w.dtype for lam, w in pairs):
            return
        self._invalidate()
        state = self._lambda_opt.state_dict()
        self.lambdas = [lam.detach().to(w) for lam, w in zip(self.lambdas, ws, strict=True)]
        self._lambda_opt = self._make_lambda_optimizer()
        self._lambda_opt.load_state_dict(state)

    @property
    def layer_names(self) -> list[str]:
        """Names of the constrained layers (first/last excluded by default)."""
        return list(self.layers)

    @property
    def g_effective(self) -> float:
        """The g used in cs: the schedule's g, or ``inf`` for ``variant="no_window"``."""
        return math.inf if self.config.variant == "no_window" else float(self.g)

    def scales(self) -> list[float]:
        """The frozen per-layer scales ``s_l``."""
        return [float(layer.weight_quantizer.scale) for layer in self.layers.values()]

    def param_groups(self, weight_decay: float = 1e-4) -> list[dict[str, Any]]:
        """The three SGD groups of ``main.py:L138``: constrained weights and other conv/FC weights (both
        with ``weight_decay``), everything else (BN, biases) without. Pass to ``torch.optim.SGD``."""
        constrained = {id(w) for w in self._weights()}
        fp_weights = [m.weight for m in self.model.modules()
                      if isinstance(m, nn.Conv2d | nn.Linear) and id(m.weight) not in constrained]
        taken = constrained | {id(w) for w in fp_weights}
        rest = [p for p in self.model.parameters() if id(p) not in taken]
        return [{"params": self._weights(), "weight_decay": weight_decay},
                {"params": fp_weights, "weight_decay": weight_decay},
                {"params": rest, "weight_decay": 0.0}]

    # --- the math of one step ------------------------------------------------------------------------
    @torch.no_grad()
    def set_scales(self) -> None:
        """``s_l = mean|W_l|`` for every constrained layer (CBP paper, Sec. 4)."""
        self._invalidate()
        for layer in self.layers.values():
            layer.weight_quantizer.set_scale(layer.weight)

    @torch.no_grad()
    def update_lambda(self, g: float | None = None) -> None:
        """One ascent step of the multipliers (original code: ``updatelambda``, ``main.py:L293-299``).

        Minimises ``-Σ λ·cs(W.detach(); g)`` with the λ optimizer (Adam by default), i.e. gradient
        ``-cs <= 0``: λ never decreases and never goes negative. ``g`` defaults to the effective g.
        """
        self._sync_device()
        r = _check_g(self.g_effective if g is None else g)
        for lam, w, q in zip(self.lambdas, self._weights(), self._levels(), strict=True):
            cs, _ = _constraint_and_slope(w.detach(), q, r, slope=False)
            lam.grad = -cs
        self._lambda_opt.step()
        self._invalidate()
        for lam in self.lambdas:
            lam.grad = None

    def penalty(self) -> Tensor:
        """``Σ_l Σ_j λ_lj · cs(w_lj; Q_l, g)``, λ detached (paper Eq. 7): add it to the loss.

        Computed in one pass over all constrained weights as ``Σ λ·s·cs(w/s; F, g)`` (``cs`` is
        positively homogeneous: ``cs(w; sF, g) = s·cs(w/s; F, g)``, and the gradient wrt ``w`` is the same
        ±2λ), so the per-step cost does not grow with the number of layers. It equals the per-layer sum up
        to float rounding (and weights within an ulp of a window edge).
        """
        self._sync_device()
        ws = self._weights()
        if self.config.variant == "ste":
            return ws[0].new_zeros(())
        r = _check_g(self.g_effective)
        s, lam_s, factors = self._flat_constants()
        w = torch.cat([w.reshape(-1) for w in ws]) if len(ws) > 1 else ws[0].reshape(-1)
        return (lam_s * _Constraint.apply(w / s, factors, r, self._plan(r))).sum()

    def _plan(self, r: float) -> _CSPlan:
        """The constraint's thresholds in units of s (factor set F, exact), cached per ``r``."""
        plan = self._plans.get(r)
        if plan is None:
            _, _, factors = self._flat_constants()
            plan = self._plans[r] = _cs_plan(factors, r, exact=True)
        return plan

    def _flat_constants(self) -> tuple[Tensor, Tensor, Tensor]:
        """Per-element scale ``s``, ``λ·s`` (flat, detached) and the factor set ``F``; cached until λ, the
        scales, the device or the dtype change (:meth:`_invalidate`)."""
        if self._flat is None:
            ws = self._weights()
            s = torch.cat([layer.weight_quantizer.scale.detach().to(w).expand(w.numel())
                           for layer, w in zip(self.layers.values(), ws, strict=True)])
            lam = torch.cat([lam.detach().reshape(-1) for lam in self.lambdas])
            factors = torch.tensor(MODES[self.config.mode], dtype=ws[0].dtype, device=ws[0].device)
            self._flat = (s, lam * s, factors)
        return self._flat

    def _invalidate(self) -> None:
        self._flat = None
        self._plans = {}
        self._medians = None
        self._work = _Workspace()

    def lagrangian(self, loss: Tensor) -> Tensor:
        """``loss + penalty()``; accumulates the detached value into this epoch's ``L_sum`` (paper Algorithm 1)."""
        if not self.started:
            self.start()
        return self._accumulate(loss + self.penalty())

    def _accumulate(self, lag: Tensor) -> Tensor:
        """``L_sum += lag`` (detached, float64, on the device: no host sync)."""
        d = lag.detach().double()
        self._l_sum = d if self._l_sum is None else self._l_sum + d
        self._batches += 1
        return lag

    def criterion(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """``CE(model(x; W_q), y) + Σ λ·cs`` (paper Eq. 7), for ``fit(..., criterion=cbp.criterion)``.

        With ``fused`` (default) and once started, one flat pass (:class:`_FusedStep`) projects every
        constrained weight and computes the penalty before the forward, and the layers use those
        projections: the same values and gradients as the layer-by-layer path, a handful of ops in all.
        """
        if not (self.fused and self.started and self.model in (model, getattr(model, "module", None),
                                                                 getattr(model, "_orig_mod", None))):
            return self.lagrangian(F.cross_entropy(model(x), y))
        views, pen = self._fused_projections()
        quantizers = [layer.weight_quantizer for layer in self.layers.values()]
        for quantizer, w, v in zip(quantizers, self._weights(), views, strict=True):
            quantizer._pre = (w, v)
        try:
            out = model(x)
        finally:
            for quantizer in quantizers:
                quantizer._pre = None
        return self._accumulate(F.cross_entropy(out, y) + pen)

    def _fused_projections(self) -> tuple[list[Tensor], Tensor]:
        """Every constrained layer's projection (views of one flat tensor) and the penalty, in one pass."""
        self._sync_device()
        ws = self._weights()
        s, lam_s, _ = self._flat_constants()
        medians, half_steps, centre = _factor_constants(self.config.mode, s.dtype, s.device)
        plan = None if self.config.variant == "ste" else self._plan(_check_g(self.g_effective))
        if self._medians is None and medians.shape[0] * s.numel() <= _MEDIANS_CACHE_MAX:
            self._medians = medians * s.reshape(1, -1)
        consts = (s, lam_s, medians, half_steps, centre, self._medians)
        wq, pen = _FusedStep.apply(consts, plan, self._work, *ws)
        views = [v.view_as(w) for v, w in zip(wq.split([w.numel() for w in ws]), ws, strict=True)]
        return views, pen

    # --- the schedule ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Once, after the pretrained weights are loaded: ``s = mean|w|`` frozen (original code: main.py) and the
        initial
        λ step at ``g = 1`` (Alg. 1, ``main.py:L150``). No-op when started or resumed from a state dict."""
        if self.started:
            return
        self._sync_device()
        self.set_scales()
        if self.config.variant != "ste":
            self.update_lambda()
        self.started = True

    def end_of_epoch(self, loss_sum: float | Tensor | None = None,
                     optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
        """Event rule (paper Algorithm 1, original code: main.py); returns ``{"epoch", "event", "g", "lr_factor",
        "events", "p",
        "loss_sum"}``.

        ``loss_sum`` defaults to the ``L_sum`` accumulated by :meth:`lagrangian`/:meth:`criterion` this
        epoch. Event iff ``L_sum >= L_pre`` or ``p == p_max``: ``g`` advances (:func:`next_g`), the lr of
        every group of ``optimizer`` (or the one given to :meth:`on_train_start`) is multiplied by
        ``lr_drop`` when ``g`` reaches ``lr_drop_at_g``, λ takes one step with the new ``g``, and
        ``L_pre``, ``p`` reset; otherwise ``L_pre = L_sum``. ``lr_factor`` is the factor to apply this epoch
        (already applied when an optimizer is known).
        """
        if not self.started:
            raise RuntimeError("CBP.end_of_epoch before CBP.start(): start() sets the scales and takes the "
                               "initial λ step; call it (or use cbp.criterion) before training")
        if loss_sum is None:
            if self._l_sum is None:
                raise ValueError("no loss recorded this epoch: compute the loss with cbp.criterion or "
                                 "cbp.lagrangian, or pass loss_sum (Σ over minibatches of CE + Σλ·cs)")
            loss_sum = self._l_sum
        l_sum = float(loss_sum)
        if not math.isfinite(l_sum):
            raise ValueError(f"L_sum = {l_sum} is not finite: training diverged (lower the lr or lr_lambda)")
        self._l_sum, self._batches = None, 0
        self.p += 1
        self.epochs += 1
        event = l_sum >= self.l_pre or self.p == self.config.p_max
        lr_factor = 1.0
        if event:
            self.g = next_g(self.g)
            if self.g == self.config.lr_drop_at_g:
                lr_factor = self.config.lr_drop
                self.lr_scale *= lr_factor
                opt = optimizer if optimizer is not None else self._optimizer
                if opt is not None:
                    for group in opt.param_groups:
                        group["lr"] *= lr_factor
            if self.config.recompute_scale:
                self.set_scales()
            if self.config.variant != "ste":
                self.update_lambda()
            self.l_pre = L_PRE_RESET
            self.p = 0
            self.events += 1
        else:
            self.l_pre = l_sum
        return {"epoch": self.epochs, "event": event, "g": self.g, "lr_factor": lr_factor,
                "events": self.events, "p": self.p, "loss_sum": l_sum}

    @property
    def lagrangian_sum(self) -> Tensor | None:
        """This epoch's running ``L_sum`` (Σ over minibatches of CE + Σλ·cs, paper Algorithm 1) as accumulated by
        :meth:`criterion`/:meth:`lagrangian`: a 0-d float64 tensor on the device, or ``None`` before the first
        batch of the epoch. :meth:`end_of_epoch` reads it (and resets it to ``None``)."""
        return self._l_sum

    def set_lagrangian_sum(self, value: Tensor | float | None) -> None:
        """Replace this epoch's running ``L_sum`` (e.g. with its mean over the DDP ranks before
        :meth:`end_of_epoch`, :class:`paperlib.distributed.SyncedCBP`); ``None`` clears it. The batch count is
        kept."""
        if value is None:
            self._l_sum = None
            return
        if isinstance(value, bool) or not isinstance(value, Tensor | int | float):
            raise TypeError(f"set_lagrangian_sum needs a scalar tensor, a number or None, got {type(value).__name__}")
        t = torch.as_tensor(value)
        if t.numel() != 1:
            raise ValueError(f"set_lagrangian_sum needs a single value (L_sum is a scalar), got shape {tuple(t.shape)}")
        device = self._l_sum.device if self._l_sum is not None else self.lambdas[0].device
        self._l_sum = t.detach().reshape(()).to(device=device, dtype=torch.float64)

    # --- observation -----------------------------------------------------------------------------------
    @torch.no_grad()
    def metrics(self) -> dict[str, float]:
        """Per-epoch log (docs/cbp.md, 'Constraint-failure score'): CFS, scale-free CFS, λ mean/max, fraction of
        weights within 1 % of s of a
        level and fraction outside ``[q_1, q_n]``.

        ``cfs_scale_free`` = ``CFS / (2 mean s)``, with ``mean s`` the mean of the layers'
        scales ``s_l`` (one value per layer). ``cfs_per_layer_scaled`` = mean over weights of ``Y(w) / (2 s_l)``
        (each weight's distance to its nearest level in units of its own layer's scale). The two are equal when
        every layer has the same scale (e.g. one constrained layer).
        """
        self._sync_device()
        s, _, factors = self._flat_constants()
        u = self.normalized_weights()
        y, _ = _constraint_and_slope(u, factors, 1.0, slope=False, plan=self._plan(1.0))  # Y(w) / s
        y = y.double()
        lam = torch.cat([lam.detach().reshape(-1) for lam in self.lambdas]).double()
        outside = (u < factors[0]) | (u > factors[-1])
        cfs = (y * s.double()).mean()
        mean_s = torch.stack([layer.weight_quantizer.scale.detach().double().to(cfs.device).reshape(())
                              for layer in self.layers.values()]).mean()
        values = torch.stack([cfs, cfs / (2 * mean_s), y.mean() / 2, lam.mean(), lam.max(),
                              (y <= 2 * 0.01).double().mean(), outside.double().mean()]).tolist()  # one sync
        return dict(zip(("cfs", "cfs_scale_free", "cfs_per_layer_scaled", "lambda_mean", "lambda_max",
                         "near_level_frac", "outside_frac"), values, strict=True))

    @torch.no_grad()
    def normalized_weights(self) -> Tensor:
        """All constrained latent weights in units of their layer's scale, ``w / s_l``, as one flat tensor."""
        self._sync_device()
        s, _, _ = self._flat_constants()
        return torch.cat([w.detach().reshape(-1) for w in self._weights()]) / s

    # --- hooks (``paperlib.train.Callback`` protocol) ---------------------------------------------------
    def on_train_start(self, model: nn.Module | None = None,
                       optimizer: torch.optim.Optimizer | None = None) -> None:
        """Remember the weight optimizer (for the lr drop) and :meth:`start` unless resumed."""
        if optimizer is not None:
            self._optimizer = optimizer
        self.start()

    def before_batch(self, model: nn.Module | None = None, x: Tensor | None = None,
                     y: Tensor | None = None) -> None:
        """Nothing to do before a batch."""

    def after_backward(self, model: nn.Module | None = None) -> None:
        """``clip_grad_value_(model.parameters(), 1)`` on all parameters (original code: ``main.py``; not in the
        paper)."""
        if self.config.grad_clip is not None:
            torch.nn.utils.clip_grad_value_(self.model.parameters(), self.config.grad_clip)

    @torch.no_grad()
    def after_step(self, model: nn.Module | None = None) -> None:
        """Clamp every constrained latent weight to ``clamp`` = [-1, 1] (paper Algorithm 1, clip(W))."""
        if self.config.clamp is not None:
            low, high = self.config.clamp
            ws = self._weights()
            torch._foreach_clamp_min_(ws, low)  # = w.clamp_(low, high) per layer, in two calls for all layers
            torch._foreach_clamp_max_(ws, high)

    def on_epoch_end(self, epoch: int, stats: dict[str, Any]) -> None:
        """:meth:`end_of_epoch` with the L_sum accumulated by :meth:`criterion` (the loop's own loss sum is
        weighted by batch size, not Algorithm 1's Σ over minibatches), then log ``cbp_*`` keys (event, g, lr
        factor, events, L_sum and :meth:`metrics`) into ``stats``."""
        info = self.end_of_epoch()
        stats.update({f"cbp_{k}": v for k, v in info.items() if k != "epoch"})
        stats.update({f"cbp_{k}": v for k, v in self.metrics().items()})

    # --- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """λ, the λ optimizer, the scales and the event state (``g``, ``p``, ``L_pre``, ...): a snapshot."""
        return _clone_state({
            "config": asdict(self.config), "layers": self.layer_names, "lambdas": self.lambdas,
            "lambda_optimizer": self._lambda_opt.state_dict(),
            "scales": [layer.weight_quantizer.scale for layer in self.layers.values()],
            "g": self.g, "p": self.p, "l_pre": self.l_pre, "events": self.events, "epochs": self.epochs,
            "lr_scale": self.lr_scale, "started": self.started,
            "l_sum": self._l_sum, "batches": self._batches,
        })

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` so that training continues exactly as it would have."""
        if list(state["layers"]) != self.layer_names:
            raise ValueError(f"CBP state is for layers {list(state['layers'])}, this model constrains "
                             f"{self.layer_names}: build the same model and skip list")
        for key in ("mode", "variant", "lambda_optimizer"):
            if state["config"][key] != getattr(self.config, key):
                raise ValueError(f"CBP state has {key}={state['config'][key]!r} but this CBP has "
                                 f"{key}={getattr(self.config, key)!r}: build CBP with the same options")
        self._sync_device()
        self._invalidate()
        for lam, saved in zip(self.lambdas, state["lambdas"], strict=True):
            if lam.shape != saved.shape:
                raise ValueError(f"λ shape {tuple(saved.shape)} in the state != {tuple(lam.shape)}")
            lam.copy_(saved)
        self._lambda_opt.load_state_dict(_clone_state(state["lambda_optimizer"]))
        for layer, s in zip(self.layers.values(), state["scales"], strict=True):
            layer.weight_quantizer.scale.copy_(s)
        self.g, self.p, self.l_pre = int(state["g"]), int(state["p"]), float(state["l_pre"])
        self.events, self.epochs = int(state["events"]), int(state["epochs"])
        self.lr_scale, self.started = float(state["lr_scale"]), bool(state["started"])
        l_sum = state.get("l_sum")
        self._l_sum = None if l_sum is None else l_sum.detach().clone().to(self.lambdas[0].device)
        self._batches = int(state.get("batches", 0))


# ---------------------------------------------------------------------------------------------------------
# 5. Hyper-parameters of the paper's runs (paper Sec. 4.1-4.2, the original README and main.py)
# ---------------------------------------------------------------------------------------------------------


def paper_hparams(arch: str, mode: str) -> dict[str, Any]:
    """ImageNet hyper-parameters for ``arch`` in ``{"alexnet", "resnet18", "resnet50"}`` (paper Sec. 4).

    SGD momentum 0.9; lr 1e-3, except 1e-4 for 1-bit/2-bit shift on AlexNet and ResNet-50 (README, paper
    Sec. 4.1-4.2); weight decay 1e-4, 5e-4 for AlexNet (paper; code default 1e-4); batch 256, 128 for
    ResNet-50 (paper; code 256); lr_lambda 1e-4, p_max 20 (code).
    """
    check_mode(mode)
    if arch not in ("alexnet", "resnet18", "resnet50"):
        raise ValueError(f"unknown arch {arch!r}: use 'alexnet', 'resnet18' or 'resnet50'")
    shift = mode in ("1bit", "2bit")
    return {
        "lr": 1e-4 if shift and arch in ("alexnet", "resnet50") else 1e-3,
        "momentum": 0.9,
        "weight_decay": 5e-4 if arch == "alexnet" else 1e-4,
        "batch_size": 128 if arch == "resnet50" else 256,
        "lr_lambda": 1e-4,
        "p_max": 20,
    }




# ---------------------------------------------------------------------------------------------------------
# 6. The experiment of ``notebooks/cbp.ipynb`` (paper Tables 1-4; docs/cbp.md, 'Claims checked')
# ---------------------------------------------------------------------------------------------------------
#
# One FP network per architecture (digits: ResNet-20 trained once by ``pretrained_fp32``; ImageNet: the
# user's torchvision/author checkpoint), then post-training per quantization set and variant: "ste" (λ ≡ 0),
# "cbp", "no_window" (Table 4), over seeds that change only the mini-batch order (as the paper's ±, Table 2).
# Every run records per-period logs (CFS, scale-free CFS, g, events, λ mean/max, L_sum) and the claims are
# judged from them (:func:`cbp_claims`).

SETS = tuple(MODES)
VARIANT_LABELS = {"cbp": "CBP", "no_window": "CBP without window", "ste": "plain STE (λ ≡ 0)"}
SET_LABELS = {"bin": "binary", "ter": "ternary", "1bit": "1-bit shift", "2bit": "2-bit shift"}

#: ImageNet top-1 / top-5 (%) of the paper (CBP paper, Tables 1-3): ``{arch: {set or "fp": (top1, top5)}}``.
PAPER_IMAGENET: dict[str, dict[str, tuple[float, float]]] = {
    "alexnet_bn": {"fp": (60.0, 82.4), "bin": (58.0, 80.6), "ter": (58.8, 81.2), "1bit": (60.8, 82.6),
                   "2bit": (60.9, 82.8)},
    "resnet18": {"fp": (69.6, 89.2), "bin": (66.6, 87.1), "ter": (68.9, 88.5), "1bit": (69.4, 88.8),
                 "2bit": (69.4, 88.8)},
    "resnet50": {"fp": (76.0, 93.0), "bin": (74.4, 92.1), "ter": (75.0, 92.5), "1bit": (76.0, 92.9),
                 "2bit": (75.9, 92.9)},
}
#: Table 4 (ResNet-18, binary, ImageNet): ``{variant: (top1, top5, CFS)}``.
PAPER_TABLE4: dict[str, tuple[float, float, float]] = {
    "cbp": (66.6, 87.1, 1.19e-3), "no_window": (60.2, 82.7, 1.05e-5), "ste": (64.6, 85.9, 3.58e-2),
}
#: Pretrained checkpoints the paper starts from (CBP paper, Sec. 4; original code: resnet_mode.py,
#: alexnet_mode.py), looked up under ``data_dir`` (never downloaded).
PAPER_WEIGHTS = {"resnet18": "weights/resnet18-5c106cde.pth", "resnet50": "weights/resnet50-19c8e357.pth",
                 "alexnet_bn": "weights/alexnet_pretrained.pth"}

_DIGITS_COMMON = {
    "dataset": "digits", "image_size": 8, "archs": ["resnet20"], "sets": list(SETS),
    "variants": ["ste", "cbp", "no_window"], "ablation_archs": ["resnet20"], "ablation_sets": list(SETS),
    "fp_lr": 0.1, "fp_batch_size": 128, "fp_seed": 0,
    # post-training, scaled for tiny data (docs/cbp.md, 'Departures and options'): SGD lr 3e-3 (paper 1e-3),
    # lr_lambda 2e-2 (paper 1e-4); a "period" (the paper's epoch: one L_sum, one chance of an event) of
    # ``period_steps`` mini-batches and p_max = 3 (paper: ~5000 steps per epoch, p_max = 20), so that ~13 events
    # (g = 1..10, 20 with the lr drop, 30, 40) fit into ~5 passes over the 1,347 training images.
    "hparams": "preset", "lr": 0.003, "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 64,
    "lr_lambda": 0.02, "p_max": 3, "lambda_optimizer": "adam", "recompute_scale": False,
    "color_jitter": False, "num_workers": 0, "checkpoint": False, "hist_bins": 121, "hist_range": 3.0,
    # the fair no-training baseline and the accuracy breakdown (:func:`recovery_breakdown`): BatchNorm statistics
    # re-estimated on ``bn_batches`` training batches (of 256 on digits; 0: one whole pass), for the runs of
    # ``recovery_variants`` (docs/cbp.md, 'Where the accuracy comes from')
    "bn_batches": 2, "recovery_variants": ["ste", "cbp"],
}

#: ``{preset: settings}`` of the notebook (registered below with :func:`check_cbp_config` as the range check).
PRESET_TABLE: dict[str, dict[str, Any]] = {
    "smoke": {**_DIGITS_COMMON, "sets": ["bin", "ter"], "ablation_sets": ["bin", "ter"], "seeds": [0],
              "fp_epochs": 6, "periods": 10, "period_steps": 2, "p_max": 2, "eval_every": 10, "workers": 1,
              "threads": 1},
    # five seeds for every compared method (claims 3-7 pair runs by seed); the ablation (plain STE, no window)
    # on binary (paper Table 4's set) and ternary, CBP on all four sets (claim 7)
    "default": {**_DIGITS_COMMON, "seeds": [0, 1, 2, 3, 4], "ablation_sets": ["bin", "ter"], "fp_epochs": 15,
                "periods": 36, "period_steps": 3, "eval_every": 36, "workers": 2, "threads": 1},
    # ImageNet from data_dir (train.csv / val.csv image,label manifests), the paper's pretrained weights and
    # hyper-parameters (``hparams="paper"``: :func:`paper_hparams` per arch and set); a period is one epoch.
    # The paper does not state its number of epochs (docs/cbp.md, 'Original code versus paper'): 60 here,
    # >= 12 events at p_max 20 only if the loss rule fires; raise ``periods`` to match a log's g/event count.
    "paper": {**_DIGITS_COMMON, "dataset": "imagenet", "image_size": 224,
              "archs": ["resnet18", "resnet50", "alexnet_bn"], "ablation_archs": ["resnet18"],
              "ablation_sets": ["bin"], "seeds": [0, 1, 2], "fp_epochs": 0, "hparams": "paper",
              "periods": 60, "period_steps": 0, "eval_every": 1, "workers": 1, "threads": 0, "num_workers": 8,
              "checkpoint": True, "bn_batches": 50},
}


class PeriodLoader:
    """Mini-batches of an :class:`~paperlib.data.InMemoryData` in periods of ``steps`` batches.

    Iterating yields the next ``steps`` batches of an endless stream of seeded shuffled passes (a period may
    straddle two passes). CBP's schedule counts periods (one ``L_sum``, one chance of an event per period):
    on tiny data a period of a few batches stands in for the paper's ImageNet epoch. ``state_dict`` holds
    the generator, the current pass's order and the position, so a resumed :func:`~paperlib.train.fit`
    sees exactly the batches the uninterrupted run would have.
    """

    def __init__(self, data: Any, batch_size: int, steps: int, seed: int = 0) -> None:
        from .data.tensors import InMemoryData

        if not isinstance(data, InMemoryData):
            raise TypeError(f"PeriodLoader needs an InMemoryData, got {type(data).__name__}")
        for name, value in (("batch_size", batch_size), ("steps", steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: must be an int >= 1")
        if batch_size > len(data):
            raise ValueError(f"batch_size={batch_size} > {len(data)} samples: lower batch_size")
        self.data, self.batch_size, self.steps = data, batch_size, steps
        self.generator = torch.Generator().manual_seed(int(seed))
        self.order: Tensor | None = None
        self.pos = 0

    def __len__(self) -> int:
        return self.steps

    def _next(self) -> tuple[Tensor, Tensor]:
        n, bs = len(self.data), self.batch_size
        if self.order is None or self.pos + bs > n:  # drop the ragged end of a pass: equal-size batches
            self.order = torch.randperm(n, generator=self.generator)
            self.pos = 0
        idx = self.order[self.pos:self.pos + bs].to(self.data.x.device)
        self.pos += bs
        return self.data.x[idx], self.data.y[idx]

    def __iter__(self):
        for _ in range(self.steps):
            yield self._next()

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "order": self.order, "pos": self.pos}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["generator"].cpu())
        self.order = None if state["order"] is None else state["order"].cpu()
        self.pos = int(state["pos"])


class CBPMonitor(Callback):
    """Callback next to :class:`CBP` (after it in ``callbacks``): checks the invariants of claims 1 and 8 per period.

    Logs ``cbp_lambda_monotone`` (every λ >= its value at the previous period and >= 0, per element),
    ``cbp_overshoot`` (max over weights of the distance outside ``[q_1, q_n]``, in units of the layer's
    ``s``) and ``cbp_outside_tol_frac`` (fraction of weights more than ``tol·s`` outside ``[q_1, q_n]``).
    Its state (the previous λ) is checkpointed with the run.
    """

    def __init__(self, cbp: CBP, tol: float = 0.01) -> None:
        self.cbp, self.tol = cbp, tol
        self.prev: Tensor | None = None  # all λ after the previous period, flat
        self.all_monotone = True

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if self.prev is None:
            self.prev = torch.cat([lam.detach().reshape(-1) for lam in self.cbp.lambdas])

    @torch.no_grad()
    def on_epoch_end(self, epoch: int, stats: dict[str, Any]) -> None:
        lam = torch.cat([lam.detach().reshape(-1) for lam in self.cbp.lambdas])
        prev = self.prev.to(lam) if self.prev is not None else torch.zeros_like(lam)
        ok = bool(((lam >= prev) & (lam >= 0)).all())
        self.all_monotone &= ok
        self.prev = lam
        over, frac = overshoot(self.cbp, self.tol)
        stats.update(cbp_lambda_monotone=ok, cbp_overshoot=over, cbp_outside_tol_frac=frac)

    def state_dict(self) -> dict[str, Any]:
        return {"prev": _clone_state(self.prev), "all_monotone": self.all_monotone}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.prev = _clone_state(state["prev"])
        self.all_monotone = bool(state["all_monotone"])


@torch.no_grad()
def overshoot(cbp: CBP, tol: float = 0.01) -> tuple[float, float]:
    """``(max, fraction)``: the largest distance of a constrained weight outside ``[q_1, q_n]`` in units of
    its layer's ``s``, and the fraction of weights more than ``tol·s`` outside (claim 8)."""
    u = cbp.normalized_weights()
    f = MODES[cbp.config.mode]
    o = torch.maximum(f[0] - u, u - f[-1]).clamp_min(0)
    over, frac = torch.stack([o.max(), (o > tol).double().mean().to(o.dtype)]).tolist()
    return over, frac


#: Per-period keys kept in metrics.json (fit's stats, CBP's ``cbp_*`` and the monitor's).
HISTORY_KEYS = ("epoch", "lr", "train_loss", "test_top1", "cbp_event", "cbp_g", "cbp_events", "cbp_loss_sum",
                "cbp_cfs", "cbp_cfs_scale_free", "cbp_lambda_mean", "cbp_lambda_max", "cbp_near_level_frac",
                "cbp_outside_frac", "cbp_lambda_monotone", "cbp_overshoot", "cbp_outside_tol_frac")


@torch.no_grad()
def weight_histogram(model_or_cbp: nn.Module | CBP, bins: int = 121, limit: float = 3.0) -> list[int]:
    """Counts of all constrained latent weights in units of their layer's scale, ``w / s_l``, over
    ``bins`` equal bins of ``[-limit, limit]`` (values outside are put in the end bins)."""
    layers = (model_or_cbp.layers.values() if isinstance(model_or_cbp, CBP)
              else CBP._find_layers(model_or_cbp).values())
    u = torch.cat([(ly.weight.detach() / ly.weight_quantizer.scale).flatten().double().cpu() for ly in layers])
    return torch.histc(u.clamp(-limit, limit), bins=bins, min=-limit, max=limit).long().tolist()


def constraint_curves(modes: Iterable[str] = ("bin", "ter"), gs: Iterable[float] = (2, 10),
                      points: int = 601) -> dict[str, Any]:
    """Paper Figure 1 as data: ``cs(w; Q, g)`` for ``s = 1`` on a grid around ``[q_1, q_n]`` and the windows
    ``U_i(g)``, per mode and g (JSON-native, for the figure)."""
    out: dict[str, Any] = {}
    for mode in modes:
        q = levels(mode, 1.0, dtype=torch.float64)
        w = torch.linspace(float(q[0]) - 0.5, float(q[-1]) + 0.5, points, dtype=torch.float64)
        out[mode] = {"levels": q.tolist(), "w": w.tolist(), "g": {}}
        for g in gs:
            out[mode]["g"][str(g)] = {"cs": constraint(w, q, g).tolist(), "windows": windows(q, g).tolist()}
    return out


def _hparams(cfg: Mapping[str, Any], arch: str, mode: str) -> dict[str, Any]:
    """Post-training hyper-parameters: the preset's, or :func:`paper_hparams` for ``hparams="paper"``."""
    keys = ("lr", "momentum", "weight_decay", "batch_size", "lr_lambda", "p_max")
    if cfg["hparams"] == "paper":
        return paper_hparams("alexnet" if arch == "alexnet_bn" else arch, mode)
    if cfg["hparams"] != "preset":
        raise ValueError(f"hparams={cfg['hparams']!r}: use 'preset' (the preset's values) or 'paper' "
                         "(paper_hparams per architecture and set, paper Sec. 4)")
    return {k: cfg[k] for k in keys}


def post_train(fp_model: nn.Module, train: Any, test: Any, mode: str, variant: str, seed: int,
               cfg: Mapping[str, Any], arch: str = "resnet20", device: str | torch.device | None = None,
               checkpoint: str | None = None, resume: bool = False, callbacks: Iterable[Any] = (),
               keep_model: bool = False, progress: bool | None = None) -> dict[str, Any]:
    """Post-train a copy of ``fp_model`` with CBP ``variant`` on ``mode`` (paper Algorithm 1) and return its record.

    The loop is :func:`paperlib.train.fit` with ``criterion=cbp.criterion``, callbacks ``[cbp,
    CBPMonitor, *callbacks]``, SGD over ``cbp.param_groups`` and no scheduler (CBP drops the lr once, at
    g = 20). ``train`` is an :class:`InMemoryData` (cut into :class:`PeriodLoader` periods of
    ``cfg["period_steps"]`` batches; 0: whole passes) or any iterable of batches (one period per pass).
    ``checkpoint``/``resume`` go to ``fit``: λ, the λ optimizer and the event state are in the checkpoint,
    so a resumed run continues identically. Returns JSON-native numbers (and ``"model"``/``"cbp"``
    objects when ``keep_model``).
    """
    from .data.tensors import InMemoryData
    from .train import TrainConfig, evaluate, fit, resolve_device

    dev = resolve_device(device)
    hp = _hparams(cfg, arch, mode)
    model = copy.deepcopy(fp_model).to(dev)
    cbp = CBP(model, mode, variant=variant, lr_lambda=hp["lr_lambda"], p_max=hp["p_max"],
              lambda_optimizer=cfg["lambda_optimizer"], recompute_scale=cfg["recompute_scale"])
    cbp.start()
    before = cbp.metrics()
    q_before = [layer.quantized_weight().detach().clone() for layer in cbp.layers.values()]
    monitor = CBPMonitor(cbp)
    opt = torch.optim.SGD(cbp.param_groups(hp["weight_decay"]), lr=hp["lr"], momentum=hp["momentum"])
    if isinstance(train, InMemoryData) and cfg["period_steps"]:
        loader: Any = PeriodLoader(train.to(dev), hp["batch_size"], cfg["period_steps"], seed=seed)
    else:
        loader = train
    tcfg = TrainConfig(epochs=cfg["periods"], lr=hp["lr"], momentum=hp["momentum"],
                       weight_decay=hp["weight_decay"], batch_size=hp["batch_size"], scheduler="none", seed=seed,
                       eval_every=cfg["eval_every"])
    res = fit(model, loader, test, tcfg, criterion=cbp.criterion, callbacks=[cbp, monitor, *callbacks],
              optimizer=opt, device=dev, checkpoint=checkpoint, resume=resume, progress=progress)
    final = res.final or evaluate(model, test, device=dev)
    after = cbp.metrics()
    with torch.no_grad():
        n_w = sum(q.numel() for q in q_before)
        changed, from_outer = 0, 0
        for layer, q0 in zip(cbp.layers.values(), q_before, strict=True):
            lv = layer.weight_quantizer.levels().to(q0)
            diff = layer.quantized_weight() != q0
            changed += int(diff.sum())
            from_outer += int((diff & ((q0 == lv[0]) | (q0 == lv[-1]))).sum())
        changed, from_outer = changed / n_w, from_outer / n_w
    history = [{k: h[k] for k in HISTORY_KEYS if k in h} for h in res.history]
    out = {
        "arch": arch, "mode": mode, "variant": variant, "seed": seed,
        "top1": final["top1"], "top5": final.get("top5"), "balanced_accuracy": final["balanced_accuracy"],
        "best_top1": res.best_top1 if any("test_top1" in h for h in res.history) else final["top1"],
        "cfs_initial": before["cfs"], "cfs_scale_free_initial": before["cfs_scale_free"],
        **{k: v for k, v in after.items()},
        "changed_frac": changed, "changed_from_outer_frac": from_outer, "events": cbp.events, "g": cbp.g,
        "lr_scale": cbp.lr_scale,
        "periods": len(res.history),
        "lambda_monotone": monitor.all_monotone, "scales": cbp.scales(), "history": history,
        "hist_after": weight_histogram(cbp, cfg["hist_bins"], cfg["hist_range"]),
        "per_class_accuracy": list(final["per_class_accuracy"]), "predicted_classes": _predicted_classes(final),
        **dict.fromkeys(RECOVERY_KEYS),
    }
    if variant in cfg["recovery_variants"]:
        out.update(recovery_breakdown(model, fp_model, train, test, batches=cfg["bn_batches"], device=dev))
    if keep_model:
        out.update(model=model, cbp=cbp)
    return out


def _predicted_classes(report: Mapping[str, Any]) -> int:
    """How many distinct classes a model predicted on the test set (columns of the confusion matrix that are
    not all zero): 1 means the network answers the same class for every image."""
    return int(sum(any(row[j] for row in report["confusion"]) for j in range(len(report["confusion"]))))


def _bn_recalibrated(model: nn.Module, data: Any, batches: int, device: torch.device) -> nn.Module:
    """``model`` with every BatchNorm's running statistics re-estimated on ``batches`` training batches (no
    weight update; :func:`paperlib.batchnorm.recalibrate_bn`, unshuffled batches of 256 of an ``InMemoryData``)."""
    from .batchnorm import recalibrate_bn

    recalibrate_bn(model, data, batches=batches, batch_size=256, device=device)
    return model


#: Keys of :func:`recovery_breakdown` in a run's record (``None`` where not measured).
RECOVERY_KEYS = ("top1_bn_recal", "top1_levels_reverted", "top1_bn_affine_reset", "top1_fp_layers_reset")


@torch.no_grad()
def recovery_breakdown(model: nn.Module, fp_model: nn.Module, data: Any, test: Any, *, batches: int = 2,
                       device: str | torch.device | None = None) -> dict[str, float]:
    """Where a post-trained network's accuracy comes from (docs/cbp.md, 'Where the accuracy comes from').

    Top-1 of copies of the post-trained ``model`` (a CBP-quantized copy of ``fp_model``), each with one part
    put back to the pretrained ``fp_model`` and the BatchNorm running statistics re-estimated on ``batches``
    training batches of ``data`` (no weight update), so that every number is measured the same way:

    - ``top1_bn_recal``: nothing put back (the post-trained network, BN statistics re-estimated);
    - ``top1_levels_reverted``: the constrained layers' latent weights put back, so their quantized weights are
      the projected pretrained ones (no level changed) while BN affine parameters and the FP first/last layers
      keep their training;
    - ``top1_bn_affine_reset``: the BN scales and shifts (gamma, beta) put back;
    - ``top1_fp_layers_reset``: the unconstrained (first and last) layers' weights and biases put back.

    Compare with the projected pretrained net with re-estimated BN statistics (``metrics["projected"]``,
    ``top1_bn``): the gap between it and ``top1_bn_recal`` is what post-training added, and each reset shows
    how much of that gap the reset part carries.
    """
    from .train import evaluate, resolve_device

    dev = resolve_device(device)
    constrained = set(CBP._find_layers(model))
    fp_params = dict(fp_model.named_parameters())
    modules = dict(model.named_modules())

    def part(name: str) -> str:
        owner, _, leaf = name.rpartition(".")
        m = modules[owner]
        if owner in constrained and leaf == "weight":
            return "levels"
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return "bn"
        if isinstance(m, nn.Conv2d | nn.Linear):
            return "fp_layers"
        return "other"

    def top1(reset: str | None) -> float:
        m = copy.deepcopy(model).to(dev)
        if reset is not None:
            for name, p in m.named_parameters():
                if part(name) == reset:
                    p.copy_(fp_params[name].to(p))
        _bn_recalibrated(m, data, batches, dev)
        return float(evaluate(m, test, device=dev)["top1"])

    return {"top1_bn_recal": top1(None), "top1_levels_reverted": top1("levels"),
            "top1_bn_affine_reset": top1("bn"), "top1_fp_layers_reset": top1("fp_layers")}


def _projected(fp_model: nn.Module, train: Any, test: Any, mode: str, cfg: Mapping[str, Any],
               dev: torch.device, arch: str = "resnet20") -> dict[str, Any]:
    """The pretrained net projected onto ``mode`` with no post-training (claim 6), as is and with its BN
    running statistics re-estimated on training batches (``*_bn``: the fair no-training baseline; no weight
    update)."""
    from .train import evaluate

    model = copy.deepcopy(fp_model).to(dev)
    cbp = CBP(model, mode, variant="ste")
    cbp.start()
    rep = evaluate(model, test, device=dev)
    over, frac = overshoot(cbp)
    with torch.no_grad():
        sq = [(float(ly.quantized_weight().double().square().sum()), float(ly.weight.double().square().sum()))
              for ly in cbp.layers.values()]
    out = {"top1": rep["top1"], "top5": rep.get("top5"), "balanced_accuracy": rep["balanced_accuracy"],
           "per_class_accuracy": list(rep["per_class_accuracy"]), "predicted_classes": _predicted_classes(rep),
           # ||W_q|| / ||W|| over all constrained weights: the projection shrinks the weights (levels end at s)
           "weight_norm_ratio": math.sqrt(sum(q for q, _ in sq) / sum(w for _, w in sq)),
           **cbp.metrics(), "overshoot": over, "outside_tol_frac": frac,
           "hist": weight_histogram(cbp, cfg["hist_bins"], cfg["hist_range"])}
    bn_data = train(_hparams(cfg, arch, mode)["batch_size"], cfg["seeds"][0]) if callable(train) else train
    rep_bn = evaluate(_bn_recalibrated(model, bn_data, cfg["bn_batches"], dev), test, device=dev)
    out.update(top1_bn=rep_bn["top1"], top5_bn=rep_bn.get("top5"), balanced_accuracy_bn=rep_bn["balanced_accuracy"],
               per_class_accuracy_bn=list(rep_bn["per_class_accuracy"]),
               predicted_classes_bn=_predicted_classes(rep_bn))
    return out


def _run_specs(cfg: Mapping[str, Any]) -> list[tuple[str, str, str, int]]:
    specs = []
    for arch in cfg["archs"]:
        for mode in cfg["sets"]:
            for variant in cfg["variants"]:
                if variant != "cbp" and not (arch in cfg["ablation_archs"] and mode in cfg["ablation_sets"]):
                    continue
                specs.extend((arch, mode, variant, seed) for seed in cfg["seeds"])
    return specs


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_cbp_config(cfg: Mapping[str, Any]) -> None:
    """Fail early, naming the setting and its valid range, on a preset/override that cannot run.

    The notebook's range check (registered with :func:`paperlib.presets.register_presets`, so
    ``python -m paperlib reproduce`` refuses bad values before any notebook starts) and the first thing
    :func:`run_cbp_experiment` does."""
    for key in ("sets", "variants", "archs", "seeds"):
        if not isinstance(cfg[key], list | tuple) or not cfg[key]:
            raise ValueError(f"cbp setting {key}={cfg[key]!r}: give a non-empty list")
    for mode in cfg["sets"]:
        check_mode(mode)
    bad = [v for v in cfg["variants"] if v not in VARIANTS]
    if bad:
        raise ValueError(f"cbp variants {bad} unknown: use some of {list(VARIANTS)}")
    if not all(_is_int(s) for s in cfg["seeds"]) or len(set(cfg["seeds"])) != len(cfg["seeds"]):
        raise ValueError(f"cbp setting seeds={cfg['seeds']!r}: distinct ints (each seed orders the mini-batches "
                         "of one run per set and variant; runs are paired by seed)")
    for key, allowed in (("ablation_sets", MODES), ("recovery_variants", VARIANTS)):
        value = cfg[key]
        if not isinstance(value, list | tuple) or any(v not in allowed for v in value):
            raise ValueError(f"cbp setting {key}={value!r}: a list (may be empty) of {list(allowed)}")
    if not isinstance(cfg["ablation_archs"], list | tuple):
        raise ValueError(f"cbp setting ablation_archs={cfg['ablation_archs']!r}: a list (may be empty) of "
                         "architectures that also run the ablation variants")
    why = {"periods": "post-training periods per run; 0 is no post-training, which the run reports anyway as "
                      "the projected network (metrics['projected'])",
           "eval_every": "evaluate every this many periods", "batch_size": "post-training mini-batch size",
           "p_max": "the longest gap between events, in periods", "hist_bins": "bins of the weight histograms",
           "image_size": "input height and width in pixels"}
    for key in why:
        if not _is_int(cfg[key]) or cfg[key] < 1:
            raise ValueError(f"cbp setting {key}={cfg[key]!r}: must be an int >= 1 ({why[key]})")
    if not _is_int(cfg["period_steps"]) or cfg["period_steps"] < 0:
        raise ValueError(f"period_steps={cfg['period_steps']!r}: batches per period, an int >= 0 (0: one pass)")
    if not _is_int(cfg["workers"]) or cfg["workers"] < 1:
        raise ValueError(f"cbp setting workers={cfg['workers']!r}: number of processes, an int >= 1 (1: every "
                         "post-training run in this process; > 1: that many CPU processes in parallel)")
    for key, meaning in (("threads", "torch threads per process, 0: torch's default"),
                         ("num_workers", "data-loader processes (ImageNet)"),
                         ("bn_batches", "training batches for re-estimating BatchNorm statistics, 0: one pass")):
        if not _is_int(cfg[key]) or cfg[key] < 0:
            raise ValueError(f"cbp setting {key}={cfg[key]!r}: must be an int >= 0 ({meaning})")
    fp_min = 0 if cfg["dataset"] == "imagenet" else 1
    if not _is_int(cfg["fp_epochs"]) or cfg["fp_epochs"] < fp_min:
        raise ValueError(f"cbp setting fp_epochs={cfg['fp_epochs']!r}: must be an int >= {fp_min} (epochs of the "
                         "FP network CBP starts from; ImageNet loads the paper's pretrained weights instead)")
    for key, low, strict in (("lr", 0.0, True), ("fp_lr", 0.0, True), ("lr_lambda", 0.0, False),
                             ("weight_decay", 0.0, False), ("momentum", 0.0, False), ("hist_range", 0.0, True)):
        v = cfg[key]
        if not _is_number(v) or (v <= low if strict else v < low):
            raise ValueError(f"cbp setting {key}={v!r}: must be a finite number {'>' if strict else '>='} {low:g}")
    if cfg["momentum"] >= 1:
        raise ValueError(f"cbp setting momentum={cfg['momentum']!r}: must be in [0, 1)")
    if cfg["hparams"] not in ("preset", "paper"):
        raise ValueError(f"hparams={cfg['hparams']!r}: use 'preset' (the preset's values) or 'paper' "
                         "(paper_hparams per architecture and set, paper Sec. 4)")
    if cfg["lambda_optimizer"] not in LAMBDA_OPTIMIZERS:
        raise ValueError(f"cbp setting lambda_optimizer={cfg['lambda_optimizer']!r}: use one of "
                         f"{list(LAMBDA_OPTIMIZERS)} (adam: original code; sgd: paper Algorithm 1)")


register_presets("cbp", PRESET_TABLE, validate=check_cbp_config)


# --- data and FP networks ---------------------------------------------------------------------------------
def _imagenet_paths(data_dir: str) -> tuple[Path, Path, Path]:
    from .data.errors import DataError

    hint = ("an ImageNet folder with train.csv and val.csv manifests (header 'image,label', image paths "
            "relative to data_dir, labels 0..999; write them with paperlib.data.manifest's format) and the "
            "pretrained checkpoints " + ", ".join(PAPER_WEIGHTS.values()) + " under it")
    if not data_dir:
        raise DataError(f"the cbp 'paper' preset needs data_dir: {hint}. ImageNet and the weights are never "
                        "downloaded by this project")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"data_dir {str(root)!r} is not a directory; it must be {hint}")
    train_csv, val_csv = root / "train.csv", root / "val.csv"
    missing = [p.name for p in (train_csv, val_csv) if not p.is_file()]
    if missing:
        raise DataError(f"data_dir {str(root)!r} lacks {missing}; it must be {hint}")
    return root, train_csv, val_csv


def _imagenet_loaders(cfg: Mapping[str, Any], data_dir: str) -> tuple[Callable[[int, int], Any], Any]:
    """``(train_loader(batch_size, seed), val_loader)`` over the ImageNet manifests (original code: dali.py)."""
    from torchvision import transforms

    from .data.manifest import IMAGENET_MEAN, IMAGENET_STD, manifest_loader

    root, train_csv, val_csv = _imagenet_paths(data_dir)
    size = cfg["image_size"]
    tf = None
    if cfg["color_jitter"]:  # the paper applies colour jitter; the original code (dali.py) discards it (default off)
        tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                 transforms.ColorJitter(0.4, 0.4, 0.4), transforms.ToTensor(),
                                 transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    pin = torch.cuda.is_available()

    def train(batch_size: int, seed: int) -> Any:
        return manifest_loader(train_csv, root, batch_size, train=True, size=size, num_workers=cfg["num_workers"],
                               seed=seed, transform=tf, pin_memory=pin)

    test = manifest_loader(val_csv, root, 256, train=False, size=size, num_workers=cfg["num_workers"],
                           pin_memory=pin)
    return train, test


def _fp_model(cfg: Mapping[str, Any], arch: str, train: Any, test: Any, data_dir: str,
              dev: torch.device, progress: bool | None) -> tuple[nn.Module, dict[str, Any]]:
    from .models import create_model
    from .pretrain import pretrained_fp32
    from .train import TrainConfig, evaluate

    if cfg["dataset"] == "imagenet":
        from .data.errors import DataError
        from .models import load_weights

        path = Path(data_dir).expanduser() / PAPER_WEIGHTS[arch] if arch in PAPER_WEIGHTS else None
        if path is None or not path.is_file():
            raise DataError(f"pretrained {arch} weights not found at {path}: CBP post-trains the paper's "
                            "pretrained networks (CBP paper, Sec. 4). Save torchvision's state dict there, e.g. "
                            "torch.save(torchvision.models.resnet18(weights='IMAGENET1K_V1').state_dict(), path),"
                            " or the authors' alexnet_pretrained.pth")
        model = create_model(arch, num_classes=1000)
        load_weights(model, path, strict=True)
        model.to(dev)
        return model, evaluate(model, test, device=dev)
    kwargs = {"num_classes": train.num_classes, "in_channels": train.x.shape[1], "shortcut": "A",
              "act_position": "pre_relu"}
    fp_cfg = TrainConfig(epochs=cfg["fp_epochs"], lr=cfg["fp_lr"], batch_size=cfg["fp_batch_size"],
                         seed=cfg["fp_seed"])
    return pretrained_fp32(arch, kwargs, train, test, fp_cfg, device=dev, progress=progress)


def _load_data(cfg: Mapping[str, Any], data_dir: str, dev: torch.device) -> tuple[Any, Any]:
    from .data.load import load_dataset

    if cfg["dataset"] == "imagenet":  # train: a loader factory, since the batch size depends on the run
        return _imagenet_loaders(cfg, data_dir)
    return load_dataset(cfg["dataset"], data_dir or None, size=cfg["image_size"],
                        channels=1 if cfg["dataset"] == "digits" else 3, device=dev)


# --- parallel runs (CPU) ----------------------------------------------------------------------------------
def _worker_init(threads: int) -> None:
    if threads:
        torch.set_num_threads(threads)


_WORKER_DATA: dict[str, Any] = {}  # per worker process: the data, loaded once


def _worker_run(job: dict[str, Any]) -> dict[str, Any]:
    """One post-training run in a worker process (data loaded there once; the FP weights are passed in)."""
    from .models import create_model

    cfg, dev = job["cfg"], torch.device(job["device"])
    key = json.dumps([cfg["dataset"], cfg["image_size"], job["data_dir"], job["device"]])
    if key not in _WORKER_DATA:
        _WORKER_DATA[key] = _load_data(cfg, job["data_dir"], dev)
    train, test = _WORKER_DATA[key]
    model = create_model(job["arch"], **job["model_kwargs"])
    model.load_state_dict(job["fp_state"])
    return post_train(model, train, test, job["mode"], job["variant"], job["seed"], cfg, arch=job["arch"],
                      device=dev, checkpoint=job["checkpoint"], resume=job["checkpoint"] is not None,
                      progress=False)


def run_cbp_experiment(cfg: Mapping[str, Any], device: str = "auto", data_dir: str = "",
                       progress: bool | None = None, checkpoint_dir: str | None = None) -> dict[str, Any]:
    """The notebook's experiment; returns the JSON-native metrics dict (see the module's section 6).

    For each architecture: the FP network, then for each set the projected pretrained net (no training)
    and the post-training runs of :func:`_run_specs` (``variants`` on ``ablation_archs`` x ``ablation_sets``,
    CBP alone elsewhere) for every seed. ``workers > 1`` runs them in that many spawned CPU processes with
    ``threads`` torch threads each (results are identical to ``workers = 1``: every run is seeded and
    single-threaded). ``checkpoint_dir`` (or ``cfg["checkpoint"]``: under ``runs/_cache/cbp-<key>``) keeps
    one resumable checkpoint per run.
    """
    from .train import resolve_device

    check_cbp_config(cfg)
    dev = resolve_device(device)
    with cpu_threads(cfg["threads"] if dev.type == "cpu" else 0):
        train, test = _load_data(cfg, data_dir, dev)
        fingerprint = (train.fingerprint() if hasattr(train, "fingerprint")
                       else _file_fingerprint(Path(data_dir) / "train.csv", Path(data_dir) / "val.csv"))
        if checkpoint_dir is None and cfg["checkpoint"]:
            checkpoint_dir = _cache_dir(cfg, fingerprint, data_dir)
        fp: dict[str, Any] = {}
        projected: dict[str, dict[str, Any]] = {}
        fp_models: dict[str, nn.Module] = {}
        for arch in cfg["archs"]:
            model, rep = _fp_model(cfg, arch, train, test, data_dir, dev, progress)
            fp_models[arch] = model
            fp[arch] = {"top1": rep["top1"], "top5": rep.get("top5"), "balanced_accuracy": rep["balanced_accuracy"],
                        "per_class_accuracy": list(rep["per_class_accuracy"]),
                        "predicted_classes": _predicted_classes(rep)}
            projected[arch] = {mode: _projected(model, train, test, mode, cfg, dev, arch) for mode in cfg["sets"]}
        specs = _run_specs(cfg)

        def ckpt(spec: tuple[str, str, str, int]) -> str | None:
            return None if checkpoint_dir is None else str(Path(checkpoint_dir) / "{}-{}-{}-seed{}.pt".format(*spec))

        if cfg["workers"] > 1 and dev.type == "cpu" and cfg["dataset"] != "imagenet":
            runs = _run_parallel(cfg, specs, fp_models, train, data_dir, ckpt)
        else:
            runs = [post_train(fp_models[a], train(_hparams(cfg, a, m)["batch_size"], s) if callable(train) else train,
                               test, m, v, s, cfg, arch=a, device=dev, checkpoint=ckpt((a, m, v, s)),
                               resume=checkpoint_dir is not None, progress=progress) for a, m, v, s in specs]
    return _assemble(cfg, dev, fingerprint, fp, projected, runs)


def _cache_dir(cfg: Mapping[str, Any], fingerprint: str, data_dir: str) -> str:
    """``runs/_cache/cbp-<key>``: the key hashes the settings, the data fingerprint and the start weights' files
    (another dataset or other pretrained weights with the same settings must not resume these checkpoints)."""
    from . import paths

    weights = {}
    for arch in cfg["archs"] if cfg["dataset"] == "imagenet" else ():  # other datasets train their FP nets
        path = Path(data_dir).expanduser() / PAPER_WEIGHTS[arch] if data_dir and arch in PAPER_WEIGHTS else None
        if path is not None and path.is_file():
            weights[arch] = _file_fingerprint(path)
    blob = json.dumps({"cfg": dict(cfg), "data": fingerprint, "weights": weights}, sort_keys=True, default=str)
    return str(paths.runs_dir() / "_cache" / f"cbp-{hashlib.sha256(blob.encode()).hexdigest()[:16]}")


def _file_fingerprint(*files: Path) -> str:
    """Hash of the manifests (the image files themselves are not read)."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _run_parallel(cfg: Mapping[str, Any], specs: list[tuple[str, str, str, int]],
                  fp_models: Mapping[str, nn.Module], train: Any, data_dir: str,
                  ckpt: Callable[[tuple[str, str, str, int]], str | None]) -> list[dict[str, Any]]:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    jobs = []
    for spec in specs:
        arch, mode, variant, seed = spec
        jobs.append({"cfg": dict(cfg), "device": "cpu", "data_dir": data_dir, "arch": arch, "mode": mode,
                     "variant": variant, "seed": seed, "checkpoint": ckpt(spec),
                     "model_kwargs": {"num_classes": train.num_classes, "in_channels": train.x.shape[1],
                                      "shortcut": "A", "act_position": "pre_relu"},
                     "fp_state": {k: v.detach().cpu() for k, v in fp_models[arch].state_dict().items()}})
    with ProcessPoolExecutor(max_workers=min(cfg["workers"], len(jobs)), mp_context=mp.get_context("spawn"),
                             initializer=_worker_init, initargs=(cfg["threads"],)) as pool:
        return list(pool.map(_worker_run, jobs))


# --- metrics, tables and the claims --------------------------------------------------------------------------
#: Claim 8: "inside [q_1, q_n]" means no weight more than this many scales ``s`` outside.
OVERSHOOT_TOL = 0.1
#: Claim 1b: "mean λ roughly linear in the number of events" means Pearson r >= this in every run.
LINEAR_R_MIN = 0.9
#: Claim 7c: 1-bit and 2-bit shift "equally accurate" means the paired difference lies within this margin.
EQUIVALENCE_POINTS = 1.0
#: Claim 3b: plain STE "leaves CFS high" means its CFS is at least this fraction of the initial one (margin).
STE_CFS_MARGIN = 0.1

_RUN_VALUES = ("top1", "balanced_accuracy", "cfs", "cfs_scale_free", "near_level_frac", "outside_frac",
               "changed_frac", "changed_from_outer_frac", "lambda_mean", "lambda_max", "events")
_PER_SEED_KEYS = ("arch", "mode", "variant", "seed", "top1", "top5", "balanced_accuracy", "best_top1",
                  "cfs_initial", "cfs_scale_free_initial", "cfs", "cfs_scale_free", "near_level_frac",
                  "outside_frac", "changed_frac", "changed_from_outer_frac", "lambda_mean", "lambda_max", "events",
                  "g", "lr_scale", "periods",
                  "lambda_monotone", "per_class_accuracy", "predicted_classes", *RECOVERY_KEYS)


def _assemble(cfg: Mapping[str, Any], dev: torch.device, fingerprint: str, fp: dict[str, Any],
              projected: dict[str, dict[str, Any]], runs: list[dict[str, Any]]) -> dict[str, Any]:
    import pandas as pd

    from .stats import summarize

    per_seed = [{k: r.get(k) for k in _PER_SEED_KEYS} for r in runs]
    summary = summarize(pd.DataFrame(per_seed), ["arch", "mode", "variant"], list(_RUN_VALUES))
    measured = [r for r in per_seed if r["top1_bn_recal"] is not None]
    recovery = (summarize(pd.DataFrame(measured), ["arch", "mode", "variant"], ["top1", "changed_frac",
                                                                                 *RECOVERY_KEYS])
                .to_dict("records") if measured else [])
    history = {f"{r['arch']}/{r['mode']}/{r['variant']}/seed{r['seed']}": r["history"] for r in runs}
    first_seed = cfg["seeds"][0]
    hist = {"range": cfg["hist_range"], "bins": cfg["hist_bins"], "before": {}, "after": {}}
    for arch, by_mode in projected.items():
        hist["before"][arch] = {mode: p.pop("hist") for mode, p in by_mode.items()}
        hist["after"][arch] = {}
    for r in runs:
        if r["seed"] == first_seed:
            hist["after"][r["arch"]].setdefault(r["mode"], {})[r["variant"]] = r["hist_after"]
    arch0 = cfg["archs"][0]
    rows = {(s["mode"], s["variant"]): s for s in summary.to_dict("records") if s["arch"] == arch0}
    key_set = "bin" if ("bin", "cbp") in rows else cfg["sets"][0]
    metrics = {
        "dataset": cfg["dataset"], "device": str(dev), "data_fingerprint": fingerprint,
        "seeds": list(cfg["seeds"]), "config": dict(cfg), "archs": list(cfg["archs"]),
        "sets": list(cfg["sets"]), "variants": list(cfg["variants"]),
        "fp": fp, "projected": projected, "per_seed": per_seed, "summary": summary.to_dict("records"),
        "recovery": recovery,
        "history": history, "histograms": hist, "figure1": constraint_curves(),
        "paper": {"imagenet_top1_top5": {a: {k: list(v) for k, v in d.items()} for a, d in PAPER_IMAGENET.items()},
                  "table4": {k: list(v) for k, v in PAPER_TABLE4.items()}},
        "key_metric": {"name": f"CBP {SET_LABELS[key_set]} top-1 ({arch0}, {cfg['dataset']})",
                       "value": rows[(key_set, "cbp")]["top1_mean"]},
    }
    metrics["claims"] = claims.as_records(cbp_claims(metrics))
    metrics["expectations"] = metrics["claims"]  # the name earlier versions used; the same records
    return metrics


def _rows(metrics: Mapping[str, Any], arch: str | None = None) -> dict[tuple[str, str], dict[str, Any]]:
    arch = arch or metrics["archs"][0]
    return {(s["mode"], s["variant"]): s for s in metrics["summary"] if s["arch"] == arch}


def _histories(metrics: Mapping[str, Any], arch: str, mode: str, variant: str) -> list[list[dict[str, Any]]]:
    return [h for k, h in metrics["history"].items() if k.startswith(f"{arch}/{mode}/{variant}/seed")]


def _missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _pct(x: float | None) -> str:
    return "–" if _missing(x) else f"{100 * x:.1f}"


def _by_seed(metrics: Mapping[str, Any], arch: str, mode: str, variant: str, key: str) -> dict[int, float]:
    """``{seed: value}`` of one run statistic (runs without it left out)."""
    return {r["seed"]: float(r[key]) for r in metrics["per_seed"]
            if (r["arch"], r["mode"], r["variant"]) == (arch, mode, variant) and not _missing(r.get(key))}


def _paired(metrics: Mapping[str, Any], a: dict[int, float], b: dict[int, float]) -> tuple[list[float], list[float]]:
    """The values of ``a`` and ``b`` on the seeds both have, in the order of ``metrics["seeds"]``."""
    seeds = [s for s in metrics["seeds"] if s in a and s in b]
    return [a[s] for s in seeds], [b[s] for s in seeds]


def _per_seed_values(metrics: Mapping[str, Any], arch: str, mode: str, variant: str, key: str) -> list[float]:
    d = _by_seed(metrics, arch, mode, variant, key)
    return [d[s] for s in metrics["seeds"] if s in d]


def _geo(values: Iterable[float]) -> float:
    v = [x for x in values if x > 0]
    return math.exp(sum(math.log(x) for x in v) / len(v)) if v else math.nan


TABLE4 = "CBP paper, Table 4 (ResNet-18 binary, ImageNet)"


def cbp_claims(metrics: Mapping[str, Any]) -> list[claims.Claim]:
    """The CBP claims checked on this run, judged by :mod:`paperlib.claims` (docs/cbp.md, 'Claims checked').

    Judged on the first architecture; comparisons pair runs by seed (every run of a seed sees the same
    mini-batch order and starts from the same FP network), ``n`` is the number of paired seeds. Per set where
    the paper's statement is per set (``"5 bin"``, ``"6 2bit"``, ...). Named thresholds: claim 1b Pearson
    ``r >= LINEAR_R_MIN``; claim 3b margin ``STE_CFS_MARGIN`` (STE's CFS at least 0.9 x its initial value);
    claim 7c equivalence margin ``EQUIVALENCE_POINTS``; claim 8 ``OVERSHOOT_TOL``. The fixed no-training
    baselines (initial CFS, the projected net with re-estimated BN statistics) have no seed: each seed's run is
    paired with the same baseline value.
    """
    arch = metrics["archs"][0]
    rows = _rows(metrics, arch)
    sets = [m for m in metrics["sets"] if (m, "cbp") in rows]
    proj = metrics["projected"][arch]
    out: list[claims.Claim] = []
    hist = {k: h for k, h in metrics["history"].items() if k.startswith(f"{arch}/")}
    lam_runs = {k: h for k, h in hist.items() if "/ste/" not in k}

    # 1. multipliers
    c1a = ("1a", "the multipliers λ never decrease and never go negative (per weight, every period)",
           "CBP paper, Eqs. 5-6 and Algorithm 1 (ascent on λ); original code: main.py (updatelambda)",
           "λ_t >= λ_(t-1) and λ_t >= 0 for every weight after every period")
    out.append(claims.property_claim(*c1a, "per element, every period of every CBP and no-window run",
                                     [all(e.get("cbp_lambda_monotone", True) for e in h) for h in lam_runs.values()]))
    rs = []
    for h in lam_runs.values():
        ev = np.array([e["cbp_events"] for e in h], dtype=float)
        lm = np.array([e["cbp_lambda_mean"] for e in h], dtype=float)
        rs.append(float(np.corrcoef(ev, lm)[0, 1]) if ev.std() > 0 and lm.std() > 0 else math.nan)
    out.append(claims.property_claim(
        "1b", "mean λ grows roughly linearly in the number of events (one Adam step of about lr_lambda per event)",
        "original code: main.py (Adam on λ, lr_lambda per step); docs/cbp.md, 'Multipliers, events and the window'",
        f"Pearson r(events, mean λ) >= {LINEAR_R_MIN} in every run",
        f"r between {min(rs, default=math.nan):.3f} and {max(rs, default=math.nan):.3f}",
        [r >= LINEAR_R_MIN for r in rs]))

    # 2. schedule
    p_max = metrics["config"]["p_max"] if metrics["config"]["hparams"] == "preset" else 20
    seq, drops_ok = [], []
    for h in hist.values():
        gs = [1] + [e["cbp_g"] for e in h if e["cbp_event"]]
        idx = [-1] + [i for i, e in enumerate(h) if e["cbp_event"]]
        seq.append(all(b == next_g(a) for a, b in itertools.pairwise(gs))
                   and all(b - a <= p_max for a, b in itertools.pairwise(idx)) and len(h) - 1 - idx[-1] < p_max)
        hit20 = [i for i, e in enumerate(h) if e["cbp_event"] and e["cbp_g"] == 20]
        if hit20:
            lrs = [e["lr"] for e in h]
            drops = [i for i in range(1, len(lrs)) if lrs[i] < lrs[i - 1] * (1 - 1e-9)]
            # fit logs the lr in effect during a period; the drop made at the event of period i shows from i + 1
            drops_ok.append([d - 1 for d in drops] == hit20[:1])
    max_g = max((e["cbp_g"] for h in hist.values() for e in h), default=1)
    out.append(claims.property_claim(
        "2a", "the window parameter g runs 1, 2, …, 10, 20, 30, … and an event comes at least every p_max periods",
        "CBP paper, Algorithm 1; original code: main.py", f"g sequence exact, gaps <= p_max = {p_max}",
        f"largest g reached: {max_g}", seq))
    c2b = ("2b", "the weight lr drops ×0.1 exactly once, when g reaches 20",
           "CBP paper, Sec. 4; original code: main.py", "descriptive", "one drop, at the event that sets g = 20")
    out.append(claims.property_claim(*c2b[:3], c2b[4], f"{len(drops_ok)} of {len(hist)} runs reached g = 20",
                                     drops_ok) if drops_ok else
               claims.not_measured(*c2b, f"no run reached g = 20 (largest g {max_g}): more periods or a smaller p_max"))

    # 3-5. Table 4 ablation, per set that ran it
    abl = [m for m in sets if (m, "ste") in rows and (m, "no_window") in rows]
    for m in abl:
        cbp_cfs, ste_cfs, nw_cfs = (_by_seed(metrics, arch, m, v, "cfs") for v in ("cbp", "ste", "no_window"))
        c0 = float(proj[m]["cfs"])
        a, b = _paired(metrics, ste_cfs, cbp_cfs)
        note = (f"CFS / initial CFS (geometric mean): CBP {_geo(v / c0 for v in cbp_cfs.values()):.3g}, "
                f"plain STE {_geo(v / c0 for v in ste_cfs.values()):.3g}")
        out.append(claims.log_ratio(
            f"3a {m}", f"CBP ends with a far lower CFS than plain STE ({SET_LABELS[m]})", TABLE4, "increase",
            "STE / CBP CFS > 1 (paper: 3.58e-2 / 1.19e-3 = 30x)", a, b, label="STE / CBP CFS", note=note))
        ste = [ste_cfs[s] for s in metrics["seeds"] if s in ste_cfs]
        out.append(claims.log_ratio(
            f"3b {m}", f"plain STE leaves the CFS high: its latent weights do not approach the levels "
            f"({SET_LABELS[m]})", TABLE4 + " (STE's CFS 3.58e-2)", "increase",
            f"STE / initial CFS > {1 - STE_CFS_MARGIN:g} (margin {STE_CFS_MARGIN:g})", ste, [c0] * len(ste),
            label="STE / initial CFS", margin=STE_CFS_MARGIN, note="the initial CFS is the projected pretrained "
            "net's (no seed): every seed is paired with it"))
        a, b = _paired(metrics, nw_cfs, cbp_cfs)
        out.append(claims.log_ratio(
            f"4a {m}", f"without the window the CFS ends lower than with it ({SET_LABELS[m]})", TABLE4, "decrease",
            "no-window / CBP CFS < 1 (paper: 1.05e-5 / 1.19e-3)", a, b, label="no-window / CBP CFS"))
        top1 = {v: _by_seed(metrics, arch, m, v, "top1") for v in ("cbp", "ste", "no_window")}
        for cid, other, paper in (("4b", "cbp", "60.2 vs 66.6"), ("4c", "ste", "60.2 vs 64.6")):
            a, b = _paired(metrics, top1["no_window"], top1[other])
            out.append(claims.paired(
                f"{cid} {m}", f"without the window top-1 is lower than {VARIANT_LABELS[other]}'s ({SET_LABELS[m]})",
                TABLE4, "decrease", f"no-window - {VARIANT_LABELS[other]} < 0 points (paper: {paper})", a, b,
                scale=100, unit="points", label=f"no-window - {VARIANT_LABELS[other]}"))
        a, b = _paired(metrics, top1["cbp"], top1["ste"])
        ties = sum(x == y for x, y in zip(a, b, strict=True))
        out.append(claims.paired(
            f"5 {m}", f"CBP is more accurate than plain STE at equal budget ({SET_LABELS[m]})", TABLE4, "increase",
            "CBP - STE > 0 points (paper: 66.6 - 64.6 = +2.0)", a, b, scale=100, unit="points", label="CBP - STE",
            note=f"identical top-1 in {ties} of {len(a)} seeds" if ties else ""))

    # 6. CBP against the projected pretrained net with re-estimated BN statistics (the fair no-training baseline)
    for m in sets:
        c = _per_seed_values(metrics, arch, m, "cbp", "top1")
        p = proj[m]
        c6 = (f"6 {m}", f"CBP post-training beats projecting the pretrained net, BN statistics re-estimated, no "
              f"training ({SET_LABELS[m]})", "CBP paper, Sec. 4 (CBP post-trains pretrained networks)", "increase",
              "CBP - (projected + BN re-estimation) > 0 points")
        if _missing(p.get("top1_bn")):
            out.append(claims.not_measured(*c6, "the projected net's BN re-estimation was not measured"))
            continue
        out.append(claims.paired(
            *c6, c, [float(p["top1_bn"])] * len(c), scale=100, unit="points", label="CBP - (projected + BN)",
            note=f"the baseline has no seed; projected without re-estimating BN: {_pct(p['top1'])} % top-1, "
                 f"{p.get('predicted_classes', '?')} predicted class(es)"))

    # 7. precision ordering of CBP's accuracy
    c7 = [("7a", "ter", "bin", "increase", "ternary is more accurate than binary", "ternary - binary > 0 points"),
          ("7b", "1bit", "ter", "increase", "1-bit shift is more accurate than ternary", "1-bit - ternary > 0 points"),
          ("7c", "2bit", "1bit", "equivalent", f"1-bit and 2-bit shift are equally accurate (within "
           f"{EQUIVALENCE_POINTS:g} point)", f"|2-bit - 1-bit| < {EQUIVALENCE_POINTS:g} point (margin)")]
    for cid, hi, lo, direction, text, expected in c7:
        head = (cid, f"CBP: {text}", "CBP paper, Tables 1-3", direction, expected)
        if hi in sets and lo in sets:
            a, b = _paired(metrics, _by_seed(metrics, arch, hi, "cbp", "top1"),
                           _by_seed(metrics, arch, lo, "cbp", "top1"))
            out.append(claims.paired(*head, a, b, scale=100, unit="points", label=f"{hi} - {lo}",
                                     margin=EQUIVALENCE_POINTS if direction == "equivalent" else None))
        else:
            out.append(claims.not_measured(*head, f"needs CBP on {SET_LABELS[lo]} and {SET_LABELS[hi]}"))

    # 8. weights inside [q_1, q_n]
    firsts, ends, fracs, holds = [], [], [], []
    for h in lam_runs.values():
        over = [e["cbp_overshoot"] for e in h]
        bad = [i for i, o in enumerate(over) if o > OVERSHOOT_TOL]
        first = 0 if not bad else bad[-1] + 1  # from this period on, every weight is within the tolerance
        holds.append(first < len(h))
        firsts.append(h[first]["cbp_events"] if first < len(h) else None)
        ends.append(over[-1])
        fracs.append(h[-1]["cbp_outside_tol_frac"])
    reached = [f for f in firsts if f is not None]
    initial = max((proj[m]["overshoot"] for m in sets), default=math.nan)
    out.append(claims.property_claim(
        "8", "the weights end inside [q_1, q_n] after the first events (outer penalty and clip(W))",
        "CBP paper, Eqs. 8-10 (cs > 0 outside [q_1, q_n]) and Algorithm 1 (clip(W))",
        f"from some event on, no weight more than {OVERSHOOT_TOL:g} s outside [q_1, q_n]",
        f"initially up to {initial:.1f} s outside; inside from event {max(reached) if reached else '–'} on; at the "
        f"end up to {100 * max(fracs, default=0):.1f} % of weights more than 1 % of s outside, largest overshoot "
        f"{max(ends, default=0):.3f} s", holds))
    return out


def check_expectations(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The claims of :func:`cbp_claims` as ``metrics.json`` records (:func:`paperlib.claims.as_records`).

    Kept under its earlier name; it now returns the claim records (``id``, ``claim``, ``source``,
    ``direction``, ``expected``, ``measured``, ``effect``, ``ci_low``, ``ci_high``, ``n``, ``margin``,
    ``verdict``, ``unit``, ``note``) instead of the earlier held True/False/None dicts."""
    return claims.as_records(cbp_claims(metrics))


def expectations_table(metrics: Mapping[str, Any]):
    """The claims as a table (:func:`paperlib.claims.claims_table`: one row per claim, every column a reader
    needs); show it untruncated with :func:`paperlib.claims.show_claims`."""
    return claims.claims_table(metrics["claims"] if "claims" in metrics else check_expectations(metrics))


def ablation_table(metrics: Mapping[str, Any]):
    """Table 4 beside ours: per set and variant, top-1 (mean ± 95 % CI over seeds) and CFS; the paper's
    ResNet-18 binary ImageNet numbers on the binary rows."""
    import pandas as pd

    from .stats import format_mean_ci

    arch = metrics["archs"][0]
    rows = _rows(metrics, arch)
    out = []
    for m in metrics["sets"]:
        for v in ("cbp", "no_window", "ste"):
            if (m, v) not in rows:
                continue
            r = rows[(m, v)]
            paper = PAPER_TABLE4.get(v) if m == "bin" else None
            out.append({
                "set": SET_LABELS[m], "variant": VARIANT_LABELS[v],
                "paper, ImageNet: top-1 (%)": f"{paper[0]:.1f}" if paper else "–",
                "paper, ImageNet: CFS": f"{paper[2]:.3g}" if paper else "–",
                f"ours, {metrics['dataset']}: top-1 (%)": format_mean_ci(r["top1_mean"], _nan(r["top1_ci"])),
                f"ours, {metrics['dataset']}: CFS": f"{r['cfs_mean']:.3g}",
                "ours: CFS/(2s)": f"{r['cfs_scale_free_mean']:.3g}",
                "ours: near level (%)": f"{100 * r['near_level_frac_mean']:.1f}",
                "ours: level changed (%)": f"{100 * r['changed_frac_mean']:.2f}",
                "seeds": r["n"],
            })
    return pd.DataFrame(out)


def _nan(x: Any) -> float:
    return math.nan if x is None else float(x)


def accuracy_table(metrics: Mapping[str, Any]):
    """Top-1 per set: the paper's ImageNet CBP numbers (Tables 1-3) beside ours (mean ± 95 % CI) for the
    FP net, the projected pretrained net (as is, and with BN statistics re-estimated) and each variant."""
    import pandas as pd

    from .stats import format_mean_ci

    arch = metrics["archs"][0]
    rows = _rows(metrics, arch)
    ds = metrics["dataset"]
    out = []
    for m in ["fp", *metrics["sets"]]:
        row: dict[str, Any] = {"set": "full precision" if m == "fp" else SET_LABELS[m]}
        for a, name in (("alexnet_bn", "AlexNet"), ("resnet18", "ResNet-18"), ("resnet50", "ResNet-50")):
            row[f"paper, ImageNet: {name} CBP"] = f"{PAPER_IMAGENET[a][m][0]:.1f}"
        p = metrics["projected"][arch].get(m, {})
        row[f"ours, {ds}: projected, no training"] = "–" if m == "fp" else _pct(p["top1"])
        row[f"ours, {ds}: projected + BN re-estimated"] = "–" if m == "fp" else _pct(p.get("top1_bn"))
        for v in ("ste", "cbp", "no_window"):
            if m == "fp":
                row[f"ours, {ds}: {VARIANT_LABELS[v]}"] = _pct(metrics["fp"][arch]["top1"]) if v == "cbp" else "–"
                continue
            r = rows.get((m, v))
            row[f"ours, {ds}: {VARIANT_LABELS[v]}"] = (format_mean_ci(r["top1_mean"], _nan(r["top1_ci"]))
                                                       if r else "–")
        row["seeds"] = max((rows[(m, v)]["n"] for v in VARIANTS if (m, v) in rows), default="–")
        out.append(row)
    return pd.DataFrame(out)


def recovery_table(metrics: Mapping[str, Any]):
    """Where the post-trained accuracy comes from (docs/cbp.md, 'Where the accuracy comes from'): per set and
    variant, top-1 (%) mean ± 95 % CI over seeds of the projected net (as is and with BN statistics
    re-estimated), the post-trained net, and the post-trained net with BN statistics re-estimated after
    putting one part back to the pretrained net (:func:`recovery_breakdown`), and the share of weights whose
    level changed."""
    import pandas as pd

    from .stats import format_mean_ci

    arch = metrics["archs"][0]
    out = []
    for r in metrics.get("recovery", []):
        if r["arch"] != arch:
            continue
        p = metrics["projected"][arch][r["mode"]]

        def cell(k: str, r: Mapping[str, Any] = r) -> str:
            return format_mean_ci(r[f"{k}_mean"], _nan(r[f"{k}_ci"]))

        out.append({
            "set": SET_LABELS[r["mode"]], "variant": VARIANT_LABELS[r["variant"]],
            "projected (%)": _pct(p["top1"]), "projected + BN (%)": _pct(p.get("top1_bn")),
            "post-trained (%)": cell("top1"), "post-trained + BN (%)": cell("top1_bn_recal"),
            "levels put back (%)": cell("top1_levels_reverted"),
            "BN γ, β put back (%)": cell("top1_bn_affine_reset"),
            "first/last layers put back (%)": cell("top1_fp_layers_reset"),
            "level changed (%)": format_mean_ci(r["changed_frac_mean"], _nan(r["changed_frac_ci"]), digits=2),
            "seeds": r["n"],
        })
    return pd.DataFrame(out)


def _recovery_row(metrics: Mapping[str, Any], mode: str, variant: str) -> dict[str, Any] | None:
    arch = metrics["archs"][0]
    return next((r for r in metrics.get("recovery", []) if (r["arch"], r["mode"], r["variant"]) ==
                 (arch, mode, variant)), None)


def findings(metrics: Mapping[str, Any]) -> str:
    """The notebook's "What we found" paragraphs (markdown), a pure function of the metrics: the verdicts, and
    the negative and surprising results stated plainly, with numbers and ``n``."""
    recs = claims.from_records(metrics["claims"])
    by_id = {c.id: c for c in recs}
    arch = metrics["archs"][0]
    rows = _rows(metrics, arch)
    proj = metrics["projected"][arch]
    sets = [m for m in metrics["sets"] if (m, "cbp") in rows]
    n = len(metrics["seeds"])
    ds = metrics["dataset"]
    parts = [f"**Set-up.** {arch} on {ds}, FP top-1 {_pct(metrics['fp'][arch]['top1'])} %; {n} seed"
             f"{'s' if n != 1 else ''} per set and variant (runs paired by seed; n below is the number of pairs). "
             + claims.summary_sentence(recs)]
    # the projection anomaly
    naive = [proj[m] for m in sets]
    if naive and all(not _missing(p.get("top1_bn")) for p in naive):
        one_class = all(p.get("predicted_classes") == 1 for p in naive)
        gain = min(p["top1_bn"] - p["top1"] for p in naive)
        bn = ", ".join(f"{SET_LABELS[m]} {_pct(proj[m]['top1_bn'])} %" for m in sets)
        norms = [p["weight_norm_ratio"] for p in naive if not _missing(p.get("weight_norm_ratio"))]
        batches = metrics["config"]["bn_batches"]
        where = (f"{batches} training batches{' of 256 images' if ds != 'imagenet' else ''}" if batches
                 else "one pass over the training data")
        parts.append(
            ("**Projection without training is a BatchNorm artefact.** " if gain > 0.3 else
             "**Projection without training.** ")
            + "Projecting the pretrained weights onto the levels gives "
            f"{', '.join(sorted({_pct(p['top1']) + ' %' for p in naive}))} top-1"
            + (" and a single predicted class for every set (balanced accuracy "
               f"{', '.join(sorted({_pct(p['balanced_accuracy']) + ' %' for p in naive}))})" if one_class else "")
            + ". The BN running statistics were estimated for the FP weights, and the projected weights are smaller "
            "(the levels end at s = mean|w|, so every larger weight is clipped"
            + (f"; ||W_q|| / ||W|| = {min(norms):.2f} to {max(norms):.2f}" if norms else "")
            + "), so every BN layer shifts and shrinks its output. "
            f"Re-estimating only the BN statistics on {where}, without changing a weight, gives {bn}. "
            "Claim 6 is judged against this baseline.")
    six = [by_id[f"6 {m}"] for m in sets if f"6 {m}" in by_id]
    if six:
        parts.append("**CBP against that baseline (claim 6):** " + "; ".join(
            f"{SET_LABELS[c.id.split()[1]]} {_effect(c)}, {c.verdict}" for c in six) + ".")
    # Table 4
    abl = [m for m in sets if f"5 {m}" in by_id]
    if abl:
        parts.append("**Table 4 ablation** (paper, ResNet-18 binary on ImageNet: CBP - STE +2.0, no window - CBP "
                     "-6.4 points, STE / CBP CFS 30x). " + "; ".join(
                         f"{SET_LABELS[m]}: CBP - STE {_effect(by_id[f'5 {m}'])}, {by_id[f'5 {m}'].verdict}; "
                         f"no window - CBP {_effect(by_id[f'4b {m}'])}, {by_id[f'4b {m}'].verdict}; "
                         f"STE / CBP CFS {_effect(by_id[f'3a {m}'], ratio=True)}, {by_id[f'3a {m}'].verdict}"
                         for m in abl) + ".")
        five = [by_id[f"5 {m}"] for m in abl]
        if not all(c.verdict == "held" for c in five):
            parts.append("The paper's headline ablation claim, that CBP is more accurate than plain STE, is "
                         + ("not supported here" if all(c.verdict != "held" for c in five) else "supported on only "
                            "some sets here") + ": "
                         + "; ".join(f"{SET_LABELS[c.id.split()[1]]} {c.verdict} ({c.measured})" for c in five)
                         + ". CBP does what it promises for the weights (far lower CFS, claim 3a) but, at this "
                         "scale, not for the accuracy.")
    # where the accuracy comes from
    rec_parts, largest = [], []
    for m in sets:
        for v in ("ste", "cbp"):
            r = _recovery_row(metrics, m, v)
            if r is None or _missing(proj[m].get("top1_bn")):
                continue
            base, full = proj[m]["top1_bn"], r["top1_bn_recal_mean"]
            drops = {"the levels": full - r["top1_levels_reverted_mean"],
                     "BN γ, β": full - r["top1_bn_affine_reset_mean"],
                     "the first/last layers": full - r["top1_fp_layers_reset_mean"]}
            largest.append(max(drops, key=lambda k: drops[k]))
            rec_parts.append(
                f"- {VARIANT_LABELS[v]}, {SET_LABELS[m]} (n = {r['n']}): {_pct(base)} → {_pct(full)} % "
                f"({100 * (full - base):+.1f} points) with {100 * r['changed_frac_mean']:.2f} % of the levels "
                "changed; putting back " + ", ".join(f"{k} {-100 * d:+.1f}" for k, d in drops.items()) + " points")
    if rec_parts:
        verdict = (f"In every one of these {len(largest)} measurements the largest loss comes from putting the "
                   "levels back: the gain over projection + BN is carried by the few weights whose level changed, "
                   "not by BN's γ, β or the full-precision first/last layers." if set(largest) == {"the levels"} else
                   "The largest loss comes from putting back " + ", ".join(
                       f"{k} in {largest.count(k)}" for k in dict.fromkeys(largest)) + f" of {len(largest)} "
                   "measurements.")
        parts.append("**Where the post-training accuracy comes from.** Beyond re-estimating the BN statistics "
                     "(above), post-training adds a few points. Top-1, mean over the seeds, BN statistics "
                     "re-estimated everywhere, from projection + BN to the post-trained net, and the change when one "
                     "part is put back to the pretrained net. " + verdict + "\n\n" + "\n".join(rec_parts))
    changed = {m: rows[(m, "cbp")] for m in sets if not _missing(rows[(m, "cbp")].get("changed_frac_mean"))}
    if changed:
        outer = {m: r.get("changed_from_outer_frac_mean") for m, r in changed.items()}
        parts.append(
            "**How many levels change.** Under CBP " + ", ".join(
                f"{SET_LABELS[m]} {100 * r['changed_frac_mean']:.2f} %"
                + ("" if _missing(outer[m]) or not r["changed_frac_mean"] or len(MODES[m]) <= 2 else
                   f" ({100 * outer[m] / r['changed_frac_mean']:.0f} % of them from the outer levels ±s)")
                for m, r in changed.items())
            + " of the constrained weights end on another level than projection gave them: the constraint pulls "
            "each weight toward the level it is already projected to."
            + (" On the shift sets most changes start on ±s: pretrained weights beyond ±s, pulled in by the outer "
               "penalty with momentum 0.9 and no restoring force inside the wide early windows, overshoot the "
               "median at ±3s/4 (docs/cbp.md, 'Where the accuracy comes from')."
               if any(m in ("1bit", "2bit") and not _missing(outer[m]) and outer[m] > 0.5 * r["changed_frac_mean"]
                      for m, r in changed.items()) else ""))
    # CFS under STE
    flat = [m for m in abl if by_id.get(f"3b {m}") is not None and by_id[f"3b {m}"].effect is not None]
    if flat:
        parts.append("**CFS.** Plain STE leaves the CFS where projection put it (STE / initial CFS "
                     + ", ".join(f"{SET_LABELS[m]} {_effect(by_id[f'3b {m}'], ratio=True)}" for m in flat)
                     + "): with lr "
                     f"{metrics['config']['lr']:g} and gradient clipping at 1 the latent weights move little, and "
                     "nothing pulls them to the levels; CBP's constraint does (claim 3a).")
    bad = [c for c in recs if c.verdict == "not held"]
    parts.append("**Not held:** " + ("; ".join(f"{c.id}: {c.claim} ({c.measured})" for c in bad) if bad else "none")
                 + ".")
    und = [c for c in recs if c.verdict == "undecidable"]
    if und:
        parts.append("**Undecidable** (the 95 % CI straddles the threshold, fewer than 2 seeds, or not measured): "
                     + "; ".join(f"{c.id} ({c.measured})" for c in und) + ".")
    if n < 2:
        parts.append("With one seed there is no confidence interval, so every comparison is undecidable: run the "
                     "default preset (5 seeds) for verdicts.")
    if ds != "imagenet":
        parts.append(f"Absolute accuracies on {ds} are not comparable with the paper's ImageNet numbers.")
    return "\n\n".join(parts)


def _effect(c: claims.Claim, ratio: bool = False) -> str:
    if c.effect is None:
        return "not measured"
    if ratio:
        ci = f" [{c.ci_low:.3f}, {c.ci_high:.3f}]" if c.ci_low is not None else ""
        return f"{c.effect:.3f}x{ci} (n = {c.n})"
    ci = f" [{c.ci_low:+.1f}, {c.ci_high:+.1f}]" if c.ci_low is not None else ""
    return f"{c.effect:+.1f} points{ci} (n = {c.n})"


__all__ = [
    "CBP", "CBPConfig", "CBPMonitor", "CBPWeight", "L_PRE_RESET", "MODES", "PAPER_IMAGENET", "PAPER_TABLE4",
    "PeriodLoader", "RECOVERY_KEYS", "SETS", "VARIANTS", "ablation_table", "accuracy_table", "cbp_claims", "cfs",
    "check_cbp_config", "check_expectations", "check_mode", "constraint", "constraint_curves", "expectations_table",
    "findings", "levels", "next_g", "paper_hparams", "post_train", "project", "recovery_breakdown", "recovery_table",
    "run_cbp_experiment", "weight_histogram", "windows",
]
