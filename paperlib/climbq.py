"""ClimbQ (Chen, Yang, Chen, NeurIPS 2022): Gaussian-CDF quantizer with class distribution scaling and the
HomoVar loss, as the official code implements them (docs/climbq.md describes the method and the departures).

- Quantizers (original code: ``model/quantization.py``): :func:`quantize_weight`:
  ``W_q = 2 U_k(Phi((W - mu)/s)) - 1`` with ``mu``/``s`` the mean and unbiased std of the whole tensor (inside
  the autograd graph); :func:`quantize_activation`: ``A_q = R (2 U_k(Phi(x/sigma)) - 1)``.
  ``U_k(u) = round(u n)/n``, ``n = 2^k - 1``, straight-through.
- Class distribution scaling (original code: ``main.py``): :func:`batch_sigma`: the per-sample
  ``sigma_i = 2 - p~_i`` with ``p~_i = b_{y_i} / sum_c b_c^2`` from the mini-batch class counts ``b``;
  :func:`set_sigma` hands it to every :class:`ClimbQActivation` of a model before a training forward. Eval uses
  sigma = 2 (``eval_sigma=1.0`` reproduces the ResNet-50/ImageNet quirk).
- HomoVar (original code: ``utils/lt_loss.py``): :func:`homovar_loss` / :class:`HomoVarLoss`: class-balanced
  softmax-BCE whose per-class beta comes from Levene bounds on the class size (the bound math is
  :func:`paperlib.levene.homogeneity_bounds`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data.long_tail import check_class_counts
from .levene import HomogeneityBounds, dispersion, homogeneity_bounds
from .quant import native as _native
from .quant.core import compiling, refuse_double_backward, standardize_flat
from .quant.core import scalar_operand as _c
from .quant.uniform import as_bits, uniform_quantize

FULL_PRECISION = 32
SigmaMode = Literal["batch_freq", "none", "prior"]
Base = Literal["bce", "ce"]

__all__ = [
    "ClimbQActivation", "ClimbQWeight", "HomoVarLoss", "HomoVarStep", "batch_sigma",
    "class_balanced_weights", "homovar_beta", "homovar_loss", "homovar_weighted_loss", "quantize_activation",
    "quantize_weight", "quantize_weights", "set_sigma",
]


# --------------------------------------------------------------------------------------------- quantizers


def _check_bits(bits: int) -> int:
    bits = as_bits(bits)
    if bits == 1:
        raise ValueError("bits=1 is degenerate for ClimbQ: sign(Phi) = +1 maps every weight to +1 and every "
                         "activation to +act_range (docs/climbq.md, 'Quantizers'); use bits in 2..8 or 32")
    if bits != FULL_PRECISION and not 2 <= bits <= 8:
        raise ValueError(f"bits={bits} is not supported by ClimbQ: use 2..8 or 32 (full precision)")
    return bits


def _normal_cdf(x: Tensor, loc: Tensor | float, scale: Tensor) -> Tensor:
    """``torch.distributions.Normal(loc, scale).cdf(x)`` written out (same float ops as the original)."""
    return 0.5 * (1 + torch.erf((x - loc) * scale.reciprocal() / math.sqrt(2)))


# Fused path. The forward runs the reference's float ops in place on one buffer, so its values are
# bit-identical: ``0.5 (1 + e) n`` is computed as ``(1 + e) (n/2)`` and ``(U/n) 2`` as ``U / (n/2)``, both exact
# (scaling by a power of two; ``1 + e`` is 0 or >= 2^-24, never subnormal). The backward is analytic and saves
# only the input (activations) or the standardised weight: the STE gradient of ``2 U(Phi(a)) - 1`` is
# ``2 phi(a)``. Used for float32/float64 tensors; other dtypes take the reference (plain autograd) path.
_SQRT2 = math.sqrt(2)
_INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)
_FUSED_DTYPES = (torch.float32, torch.float64)
def _levels_from_erf(t: Tensor, n: int) -> Tensor:
    """In place on ``t = erf(a / sqrt 2)``: ``2 U_k(0.5 (1 + t)) - 1``, the reference's ops, bit-identical."""
    half_n, one = _c(n / 2, t), _c(1.0, t)
    return t.add_(one).mul_(half_n).round_().div_(half_n).sub_(one)


class _ClimbQWeightFn(torch.autograd.Function):
    """``2 U_k(Phi((w - mean w) / std w)) - 1`` with the exact gradient through mean and std (pinned by the
    weight reference vectors): with ``a = (w - mu)/s`` and ``h = 2 phi(a) g``:
    ``dL/dw = (h - mean h - a <h, a>/(N - 1)) / s``.
    ``a`` and ``1/s`` are internal tensors, kept on ``ctx`` (nothing else can modify them)."""

    @staticmethod
    def forward(ctx, w: Tensor, n: int) -> Tensor:  # noqa: D102
        rec = w.std().reciprocal()
        a = torch.sub(w, w.mean()).mul_(rec)  # (w - loc) * scale.reciprocal(), as _normal_cdf
        out = _levels_from_erf(torch.div(a, _c(_SQRT2, a)).erf_(), n)
        ctx.a, ctx.rec = a, rec
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        _no_double_backward()
        a, rec = ctx.a, ctx.rec
        h = torch.square(a).mul_(_c(-0.5, a)).exp_().mul_(grad)  # sqrt(2 pi) phi(a) g
        dot = torch.dot(h.reshape(-1), a.reshape(-1))
        gw = torch.sub(h, h.mean()).addcmul_(a, dot, value=-1 / (a.numel() - 1))
        return gw.mul_(rec.mul(_c(2 * _INV_SQRT_2PI, rec))), None


class _ClimbQWeightGroupFn(torch.autograd.Function):
    """:class:`_ClimbQWeightFn` for several tensors at once: one autograd node, the elementwise work on one
    flat buffer. Each tensor keeps its own mean and std (computed as the per-tensor path does), so the values
    are those of ``quantize_weight`` per tensor and the gradients its gradients (same ops, per segment)."""

    @staticmethod
    def forward(ctx, n: int, *ws: Tensor) -> tuple[Tensor, ...]:  # noqa: D102
        a, recs, sizes = standardize_flat(ws, by_reciprocal=True)
        out = _levels_from_erf(torch.div(a, _c(_SQRT2, a)).erf_(), n)
        ctx.a, ctx.recs, ctx.sizes = a, recs, sizes
        ctx.set_materialize_grads(False)
        return tuple(o.view_as(w) for o, w in zip(out.split(sizes), ws, strict=True))

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:  # noqa: D102
        _no_double_backward()
        a, recs, sizes = ctx.a, ctx.recs, ctx.sizes
        g = torch.cat([a.new_zeros(k) if gi is None else gi.reshape(-1) for gi, k in zip(grads, sizes, strict=True)])
        h = torch.square(a).mul_(_c(-0.5, a)).exp_().mul_(g)  # sqrt(2 pi) phi(a) g
        out: list[Tensor | None] = [None]
        for hs, seg, rec, k, gi in zip(h.split(sizes), a.split(sizes), recs, sizes, grads, strict=True):
            dot = torch.dot(hs, seg)
            hs.sub_(hs.mean()).addcmul_(seg, dot, value=-1 / (k - 1)).mul_(rec.mul(_c(2 * _INV_SQRT_2PI, rec)))
            out.append(None if gi is None else hs.view_as(gi))
        return tuple(out)


def quantize_weights(ws: Sequence[Tensor], bits: int, *, native: bool | None = None) -> list[Tensor]:
    """:func:`quantize_weight` of each tensor in ``ws`` in one pass (one mean and std per tensor): one autograd
    node for all of them. Used by the model's one-pass hook (:func:`paperlib.quant.core.set_one_pass`); the
    tensors must share dtype and device. On CPU the native kernel takes them all in one call (``native``: see
    :func:`quantize_weight`); elsewhere the torch path works on one flat buffer (same values as per tensor)."""
    bits = _check_bits(bits)
    if bits == FULL_PRECISION:
        return list(ws)
    ws = list(ws)
    if not ws:
        return []
    bad = [tuple(w.shape) for w in ws if w.numel() < 2]
    if bad:
        raise ValueError(f"quantize_weights needs at least 2 weights per tensor for the std, got shapes {bad}")
    if len({(w.dtype, w.device) for w in ws}) != 1 or ws[0].dtype not in _FUSED_DTYPES:
        raise ValueError("quantize_weights needs float32 or float64 tensors of one dtype on one device; "
                         "quantize others one by one with quantize_weight")
    if compiling():  # torch.compile: per tensor on plain torch ops (Inductor fuses each chain)
        return [_weight_reference(w, bits) for w in ws]
    if _native.use_native(native, *ws):
        return _native.climbq_weights(ws, bits)
    n = 2**bits - 1
    if torch.is_grad_enabled() and any(w.requires_grad for w in ws):
        return list(_ClimbQWeightGroupFn.apply(n, *ws))
    with torch.no_grad():
        a, _, sizes = standardize_flat(ws, by_reciprocal=True)
        out = _levels_from_erf(a.div_(_c(_SQRT2, a)).erf_(), n)
        return [o.view_as(w) for o, w in zip(out.split(sizes), ws, strict=True)]


def _no_double_backward() -> None:
    refuse_double_backward("fused ClimbQ quantizers")


class _ClimbQActFn(torch.autograd.Function):
    """``R (2 U_k(Phi(x rec)) - 1)`` (``rec = 1/sigma``, a constant); backward ``2 R phi(x rec) rec g``."""

    @staticmethod
    def forward(ctx, x: Tensor, rec: Tensor, n: int, act_range: float) -> Tensor:  # noqa: D102
        ctx.save_for_backward(x, rec)
        ctx.act_range = act_range
        return _act_forward(x, rec, n, act_range)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:  # noqa: D102
        _no_double_backward()
        x, rec = ctx.saved_tensors
        expo, coef = _act_grad_coefs(rec, ctx.act_range)
        return torch.square(x).mul_(expo).exp_().mul_(grad).mul_(coef), None, None, None


def _act_forward(x: Tensor, rec: Tensor, n: int, act_range: float) -> Tensor:
    t = torch.mul(x, rec).div_(_c(_SQRT2, x)).erf_()  # x - 0.0 == x exactly
    if math.frexp(act_range)[0] == 0.5 and 2.0**-30 <= act_range <= 2.0**30:  # R = 2^e: exact scalings
        half_n, r = _c(n / 2, t), _c(act_range, t)
        return t.add_(_c(1.0, t)).mul_(half_n).round_().div_(_c(n / (2 * act_range), t)).sub_(r)
    out = _levels_from_erf(t, n)
    return out if act_range == 1.0 else out.mul_(_c(act_range, out))


_COEF_CACHE: list[tuple[Tensor, float, Tensor, Tensor]] = []


def _act_grad_coefs(rec: Tensor, act_range: float) -> tuple[Tensor, Tensor]:
    """``-rec^2 / 2`` and ``2 R rec / sqrt(2 pi)`` (the backward's per-sample factors), cached per ``rec``."""
    if _COEF_CACHE and _COEF_CACHE[0][0] is rec and _COEF_CACHE[0][1] == act_range:
        return _COEF_CACHE[0][2], _COEF_CACHE[0][3]
    expo = rec.square().mul_(_c(-0.5, rec))
    coef = rec.mul(_c(2 * act_range * _INV_SQRT_2PI, rec))
    _COEF_CACHE[:] = [(rec, act_range, expo, coef)]
    return expo, coef


def quantize_weight(w: Tensor, bits: int, *, fused: bool = True, native: bool | None = None) -> Tensor:
    """ClimbQ weight quantizer (original code: ``model/quantization.py``, ``weight_quantize_fn``):
    ``2 U_k(Phi((w - mean w) / std w)) - 1``.

    One mean and unbiased std over the whole tensor, kept in the autograd graph, so the gradient is
    ``2 phi(.)/s`` plus the terms through ``mu`` and ``s``; the rounding is straight-through. Levels are
    ``2i/n - 1`` in [-1, 1] with no zero level and no scale. ``bits=32`` returns ``w`` unchanged.

    ``fused=True`` (default) computes float32/float64 tensors in place with an analytic backward: the same
    values bit for bit and the same gradient (to rounding) as ``fused=False``, the plain autograd graph.
    ``native=None`` (default) uses the native CPU kernel (:mod:`paperlib.quant.native`) for contiguous CPU
    float32/float64 tensors: exact levels, so it can differ from the torch path's erf where ``Phi(a) n`` lies
    within ~1e-6 of a level boundary; ``native=False`` keeps the torch path, ``True`` insists on the kernel.
    Under ``torch.compile`` (:mod:`paperlib.compiled`) it takes the ``fused=False`` ops, whatever the options.
    """
    bits = _check_bits(bits)
    if bits == FULL_PRECISION:
        return w
    if w.numel() < 2:
        raise ValueError(f"quantize_weight needs at least 2 weights for the std, got shape {tuple(w.shape)}")
    if native and not fused:
        raise ValueError("native=True is the fused path's kernel; fused=False is the plain autograd reference")
    if compiling():  # torch.compile: plain torch ops, autograd's gradient (the fused path's, to rounding)
        return _weight_reference(w, bits)
    n = 2**bits - 1
    if fused and _native.use_native(native, w):
        return _native.climbq_weights([w], bits)[0]
    if fused and w.dtype in _FUSED_DTYPES:
        if w.requires_grad and torch.is_grad_enabled():
            return _ClimbQWeightFn.apply(w, n)
        with torch.no_grad():
            a = torch.sub(w, w.mean()).mul_(w.std().reciprocal())
            return _levels_from_erf(a.div_(_c(_SQRT2, a)).erf_(), n)
    return _weight_reference(w, bits)


def _weight_reference(w: Tensor, bits: int) -> Tensor:
    """``fused=False``: the original's ops under plain autograd (also the path under ``torch.compile``)."""
    phi = _normal_cdf(w, w.mean(), w.std())
    return uniform_quantize(phi, bits) * 2 - 1


def _per_sample(sigma: Tensor | float, x: Tensor) -> Tensor:
    """sigma as a tensor broadcastable to ``x``: a [B] (or [B, 1, ...]) tensor is one value per sample."""
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).detach()
    if s.ndim == 1 and x.ndim > 1:
        if s.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"sigma has {s.shape[0]} per-sample values but the input batch has "
                             f"{x.shape[0]}; call set_sigma(model, batch_sigma(labels, num_classes)) "
                             "before each training forward")
        s = s.reshape(-1, *([1] * (x.ndim - 1)))
    return s


# one entry: (sigma, its version, x's dtype/device/ndim/batch) -> 1/sigma shaped for x. Every quantizer of a
# model gets the same sigma object from set_sigma, so the reciprocal is computed once per step, not per layer.
_REC_CACHE: list[tuple[tuple, Tensor]] = []


def _reciprocal(sigma: Tensor | float, x: Tensor) -> Tensor:
    """``_per_sample(sigma, x).reciprocal()``, cached for the last sigma seen (same values, fewer small ops)."""
    key = (sigma if isinstance(sigma, Tensor) else float(sigma),
           sigma._version if isinstance(sigma, Tensor) else 0, x.dtype, x.device, x.ndim,
           x.shape[0] if x.ndim else 0)
    if _REC_CACHE:
        k, rec = _REC_CACHE[0]
        same = k[0] is key[0] if isinstance(key[0], Tensor) else (type(k[0]) is float and k[0] == key[0])
        if same and k[1:] == key[1:]:
            return rec
    rec = _per_sample(sigma, x).reciprocal()
    _REC_CACHE[:] = [(key, rec)]
    return rec


def quantize_activation(
    x: Tensor, bits: int, sigma: Tensor | float = 2.0, act_range: float = 2.0, *, fused: bool = True,
    native: bool | None = None,
) -> Tensor:
    """ClimbQ activation quantizer (original code: ``model/quantization.py``, ``activation_quantize_fn``):
    ``R (2 U_k(Phi(x / sigma)) - 1)``.

    The projection mean is 0; ``sigma`` is a float or a per-sample tensor ([B] or broadcastable), treated as
    a constant (no gradient). Levels ``R (2i/n - 1)``, i = 0..n, no zero level, no clipping; the gradient is
    ``2 R phi(x/sigma) / sigma`` (straight-through rounding). ``bits=32`` returns ``x`` unchanged.

    ``fused=True`` (default) computes float32/float64 tensors in place and saves only ``x`` for an analytic
    backward: the same values bit for bit and the same gradient (to rounding) as ``fused=False``.
    ``native``: as in :func:`quantize_weight` (the kernel for contiguous CPU float32/float64 inputs).
    Under ``torch.compile`` it takes the ``fused=False`` ops; a tensor sigma is then a graph input (a new one per
    batch does not recompile), a float sigma a constant (each new value compiles once).
    """
    bits = _check_bits(bits)
    if bits == FULL_PRECISION:
        return x
    if not isinstance(sigma, Tensor) and not sigma > 0:
        raise ValueError(f"sigma={sigma} must be > 0")
    if native and not fused:
        raise ValueError("native=True is the fused path's kernel; fused=False is the plain autograd reference")
    if compiling():  # torch.compile: plain torch ops (no kernel, no cached reciprocal)
        return _activation_reference(x, bits, sigma, act_range)
    if native:
        _native.use_native(True, x)  # raises, saying why, when the kernel cannot take x
    if fused and x.dtype in _FUSED_DTYPES:
        rec, n = _reciprocal(sigma, x), 2**bits - 1
        if _native.use_native(native, x, rec):
            return _native.climbq_activation(x, rec, bits, float(act_range))
        if x.requires_grad and torch.is_grad_enabled():
            return _ClimbQActFn.apply(x, rec, n, float(act_range))
        with torch.no_grad():
            return _act_forward(x, rec, n, float(act_range))
    return _activation_reference(x, bits, sigma, act_range)


def _activation_reference(x: Tensor, bits: int, sigma: Tensor | float, act_range: float) -> Tensor:
    """``fused=False``: the original's ops under plain autograd (also the path under ``torch.compile``)."""
    phi = _normal_cdf(x, 0.0, _per_sample(sigma, x))
    return (uniform_quantize(phi, bits) * 2 - 1) * act_range


# ------------------------------------------------------------------------------------ class distribution scaling


def _label_range_error(labels: Tensor, num_classes: int) -> ValueError:
    lo, hi = (int(v) for v in torch.aminmax(labels.long()))
    return ValueError(f"labels must be in [0, {num_classes}), got [{lo}, {hi}]")


def batch_sigma(
    labels: Tensor,
    num_classes: int,
    mode: SigmaMode = "batch_freq",
    counts: Sequence[float] | np.ndarray | Tensor | None = None,
    *,
    validate: bool = True,
) -> Tensor:
    """Per-sample projection sigma for a training batch (original code: ``main.py`` L181-187, quantizer L91-94).

    ``"batch_freq"`` (the original): ``p_i = b_{y_i}/B`` with ``b`` the class counts *in the batch*,
    ``p~ = p / sum_j p_j`` (``= b_{y_i} / sum_c b_c^2``), ``sigma_i = 2 - p~_i`` (within 1 % of 2 for
    B = 128). ``"none"``: sigma = 2 (the eval value; nearly equivalent, docs/climbq.md 'Class distribution
    scaling'). ``"prior"`` is **not from the paper**: ``sigma_i = 2 - n_{y_i}/N`` from dataset ``counts``.
    Returns float32 [B] on the labels' device.

    Labels outside ``[0, num_classes)`` raise. In ``"batch_freq"`` mode the check rides on the class count
    (no extra reduction or host sync); ``validate=False`` skips it in the other modes too (labels the
    loader already checked).
    """
    if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.dtype.is_floating_point:
        raise TypeError("labels must be a 1-D integer tensor of class ids")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if labels.numel() == 0:
        raise ValueError("labels is empty: batch_sigma needs at least one sample")
    y = labels.long()
    if mode == "batch_freq":
        try:
            b = torch.bincount(y, minlength=num_classes)
        except RuntimeError as e:  # a negative label
            raise _label_range_error(labels, num_classes) from e
        if b.numel() != num_classes:  # a label >= num_classes made the count longer
            raise _label_range_error(labels, num_classes)
        p = b.float()[y] / y.numel()
        return 2 - p / p.sum()
    if validate and mode in ("none", "prior"):
        lo, hi = (int(v) for v in torch.aminmax(y))  # one reduction, one host sync
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"labels must be in [0, {num_classes}), got [{lo}, {hi}]")
    if mode == "none":
        return torch.full(y.shape, 2.0, device=y.device)
    if mode == "prior":
        if counts is None:
            raise ValueError("mode='prior' needs the dataset counts: batch_sigma(..., counts=class_counts)")
        n = check_class_counts(counts)
        if n.size != num_classes:
            raise ValueError(f"counts has {n.size} classes, num_classes={num_classes}")
        prior = torch.as_tensor(n / n.sum(), dtype=torch.float32, device=y.device)
        return 2 - prior[y]
    raise ValueError(f"mode={mode!r}: use 'batch_freq' (the original), 'none' (sigma=2) "
                     "or 'prior' (not from the paper)")


class ClimbQWeight(nn.Module):
    """Weight quantizer module around :func:`quantize_weight`; use with ``quantize_model(weight=...)``.

    ``fused=False`` uses the plain autograd reference path (same values, slower); ``native`` as in
    :func:`quantize_weight`."""

    def __init__(self, bits: int, *, fused: bool = True, native: bool | None = None) -> None:
        super().__init__()
        self.bits = _check_bits(bits)
        self.fused = bool(fused)
        if native and not fused:
            raise ValueError("native=True needs fused=True (the kernel is the fused path's)")
        self.native = native

    def forward(self, w: Tensor) -> Tensor:
        return quantize_weight(w, self.bits, fused=self.fused, native=self.native)

    def group_key(self, w: Tensor) -> tuple | None:
        """Weights of one dtype and device quantize together (:func:`quantize_weights`); None: one by one."""
        if not self.fused or self.bits == FULL_PRECISION or w.dtype not in _FUSED_DTYPES or w.numel() < 2:
            return None
        return (self.bits, w.dtype, w.device, self.native)

    @staticmethod
    def quantize_group(ws: Sequence[Tensor], quantizers: Sequence[ClimbQWeight]) -> list[Tensor]:
        """The one-pass form of ``forward`` for layers whose ``group_key`` agree."""
        return quantize_weights(ws, quantizers[0].bits, native=quantizers[0].native)

    def extra_repr(self) -> str:
        return (f"bits={self.bits}" + ("" if self.fused else ", fused=False")
                + ("" if self.native is None else f", native={self.native}"))


class ClimbQActivation(nn.Module):
    """Activation quantizer module around :func:`quantize_activation` for ``ActSlot``s.

    In training mode it uses the per-sample sigma last given by :func:`set_sigma` (sigma = 2 if none was
    set, i.e. ``scaling="none"``); in eval mode it always uses ``eval_sigma`` (2, as in the CIFAR/SynDigits
    code; ``eval_sigma=1.0`` reproduces the ResNet-50/ImageNet eval quirk ``p=[1]``, docs/climbq.md 'Departures').
    ``fused=False`` uses the plain autograd reference path (same values, slower); ``native`` as in
    :func:`quantize_activation`.
    """

    def __init__(self, bits: int, act_range: float = 2.0, eval_sigma: float = 2.0, *, fused: bool = True,
                 native: bool | None = None) -> None:
        super().__init__()
        self.bits = _check_bits(bits)
        if not act_range > 0 or not eval_sigma > 0:
            raise ValueError(f"act_range={act_range} and eval_sigma={eval_sigma} must be > 0")
        self.act_range = float(act_range)
        self.eval_sigma = float(eval_sigma)
        self.fused = bool(fused)
        if native and not fused:
            raise ValueError("native=True needs fused=True (the kernel is the fused path's)")
        self.native = native
        self.sigma: Tensor | float | None = None  # per-batch state set by set_sigma, not a parameter

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            sigma: Tensor | float = self.eval_sigma
        else:
            sigma = 2.0 if self.sigma is None else self.sigma
        return quantize_activation(x, self.bits, sigma, self.act_range, fused=self.fused, native=self.native)

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, act_range={self.act_range}, eval_sigma={self.eval_sigma}"
                + ("" if self.fused else ", fused=False") + ("" if self.native is None else f", native={self.native}"))


def set_sigma(model: nn.Module, sigma: Tensor | float | None) -> int:
    """Give every :class:`ClimbQActivation` in ``model`` the training sigma for the next forward (docs/climbq.md,
    'Class distribution scaling').

    ``sigma`` is :func:`batch_sigma`'s [B] tensor, a float, or ``None`` (back to sigma = 2). Returns how many
    quantizers were set (0 for a model without ClimbQ activation quantizers, e.g. during FP32 pretraining).
    """
    if isinstance(sigma, Tensor):
        if sigma.ndim > 1:
            raise ValueError(f"sigma must be a scalar or a [B] tensor, got shape {tuple(sigma.shape)}")
        sigma = sigma.detach()
    elif sigma is not None and not float(sigma) > 0:
        raise ValueError(f"sigma={sigma} must be > 0")
    n = 0
    for m in model.modules():
        if isinstance(m, ClimbQActivation):
            m.sigma = sigma
            n += 1
    return n


# --------------------------------------------------------------------------------------------- HomoVar


def homovar_beta(counts: Tensor, n_lb: Tensor, n_ub: Tensor, beta: float = 0.999) -> Tensor:
    """Per-class beta from the bounds (docs/climbq.md 'HomoVar loss', step 7): ``beta^(1/(n_lb - n))`` below,
    ``beta^(1/(n - n_ub))`` above, ``beta`` inside; a NaN bound compares False and falls in the last case, as in
    the original."""
    below, above = counts < n_lb, counts > n_ub
    dist = torch.where(below, n_lb - counts, n_ub - counts).abs()
    return torch.where(below | above, beta ** (1 / dist), torch.full_like(counts, beta))


def class_balanced_weights(beta: Tensor, counts: Tensor) -> Tensor:
    """Cui et al. (2019) effective-number weights (HomoVar step 8): ``w_k = (1 - b_k)/(1 - b_k^{n_k})``,
    renormalised to ``K w / sum w``."""
    w = (1 - beta) / (1 - beta**counts)
    return w * (beta.numel() / w.sum())


@dataclass(frozen=True)
class HomoVarStep:
    """Diagnostics of one HomoVar step (detached float64 tensors on the statistics' device).

    Per class: ``counts`` (the n_k used for the bounds and weights), ``n_lb``, ``n_ub``, ``beta``,
    ``weights``, ``out_of_bounds``; ``fraction_out`` of classes out of bounds and Levene's ``W`` = ssb/ssw
    (the original's statistic; NaN when undefined). ``bounds`` holds every intermediate (HomoVar steps 3-6);
    in ``counts="batch"`` mode its rows are the classes present in the batch, ``classes``.
    """

    counts: Tensor
    n_lb: Tensor
    n_ub: Tensor
    beta: Tensor
    weights: Tensor
    out_of_bounds: Tensor
    fraction_out: Tensor
    W: Tensor
    bounds: HomogeneityBounds | None
    classes: Tensor

    def frame(self) -> pd.DataFrame:
        """Per-class table: n, n_lb, n_ub, beta, weight, out_of_bounds."""
        cols = {"n": self.counts, "n_lb": self.n_lb, "n_ub": self.n_ub, "beta": self.beta,
                "weight": self.weights, "out_of_bounds": self.out_of_bounds}
        df = pd.DataFrame({k: v.detach().cpu().numpy() for k, v in cols.items()})
        df.index.name = "class"
        return df


def _check_homovar_inputs(logits: Tensor, labels: Tensor, features: Tensor, alpha: float, beta: float,
                          base: str, check_labels: bool = True) -> tuple[Tensor, Tensor]:
    if not isinstance(logits, Tensor) or logits.ndim != 2 or not logits.dtype.is_floating_point:
        raise ValueError("logits must be a float [B, K] tensor")
    if not isinstance(labels, Tensor) or labels.shape != logits.shape[:1] or labels.dtype.is_floating_point:
        raise ValueError(f"labels must be an integer [B] tensor matching logits' batch {logits.shape[0]}")
    if labels.numel() == 0:
        raise ValueError("the batch is empty: HomoVar needs at least one sample")
    lo, hi = torch.stack(torch.aminmax(labels)).tolist() if check_labels else (0, 0)  # one host read for both
    if lo < 0 or hi >= logits.shape[1]:
        raise ValueError(f"labels must be class ids in [0, {logits.shape[1]}) (K from the logits), got [{lo}, {hi}]")
    if not isinstance(features, Tensor) or features.ndim < 2 or features.shape[0] != logits.shape[0]:
        raise ValueError("features must be the [B, D] penultimate features (the FC's input) of this batch")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha} must be in (0, 1)")
    if not 0 < beta < 1:
        raise ValueError(f"beta={beta} must be in (0, 1) (the original's beta_factor is 0.999)")
    if base not in ("bce", "ce"):
        raise ValueError(f"base={base!r}: use 'bce' (the original: BCE on softmax) or 'ce' (cross entropy)")
    return labels.long(), features.flatten(1)


def homovar_weighted_loss(logits: Tensor, labels: Tensor, w: Tensor, base: Base = "bce") -> Tensor:
    """HomoVar step 9 (docs/climbq.md, 'HomoVar loss') with given per-class weights ``w`` [K]:
    ``1/(BK) sum_{i,k} w_{y_i} BCE(softmax_ik, 1[y_i = k])`` (``base="bce"``, the original) or
    ``mean_i w_{y_i} CE_i`` (``"ce"``). The weights are taken as constants (the original detaches them);
    ``HomoVarStep.weights`` holds the ones HomoVar chose."""
    w_i = w.to(device=logits.device, dtype=logits.dtype)[labels]
    if base == "ce":
        return (w_i * F.cross_entropy(logits, labels, reduction="none")).mean()
    with torch.autocast(device_type=logits.device.type, enabled=False):  # BCE is unsafe under autocast
        probs = (logits if logits.dtype == torch.float64 else logits.float()).softmax(dim=1)
        target = F.one_hot(labels, logits.shape[1]).to(probs.dtype)
        weight = w_i.to(probs.dtype)[:, None].expand_as(probs)
        return F.binary_cross_entropy(probs, target, weight=weight).to(logits.dtype)



def _homovar(
    logits: Tensor, labels: Tensor, features: Tensor, counts: Sequence[float] | np.ndarray | Tensor | str,
    alpha: float, beta: float, base: Base, mask_zeros: bool, check_labels: bool = True,
) -> tuple[Tensor, HomoVarStep]:
    y, feats = _check_homovar_inputs(logits, labels, features, alpha, beta, base, check_labels)
    k = logits.shape[1]
    feats = feats.detach()  # no gradient through the statistics: the original copies the weights (step 8)
    if isinstance(counts, str):
        if counts != "batch":
            raise ValueError(f"counts={counts!r}: pass the per-class dataset counts or 'batch'")
        return _homovar_batch(logits, y, feats, k, alpha, beta, base, mask_zeros)

    n_np = check_class_counts(counts)
    if n_np.size != k:
        raise ValueError(f"counts has {n_np.size} classes but logits have K={k}")
    z = dispersion(feats, y, "mean", "l1", mask_zeros, counts=n_np, check_labels=False)  # float64: see 'Departures'
    bounds = homogeneity_bounds(z, y.to(z.device), n_np, alpha, check_labels=False)  # y checked above
    b = homovar_beta(bounds.counts, bounds.n_lb, bounds.n_ub, beta)
    w = class_balanced_weights(b, bounds.counts)
    out = bounds.out_of_bounds
    step = HomoVarStep(counts=bounds.counts, n_lb=bounds.n_lb, n_ub=bounds.n_ub, beta=b, weights=w,
                       out_of_bounds=out, fraction_out=out.double().mean(), W=bounds.W, bounds=bounds,
                       classes=torch.arange(k, device=z.device))
    return homovar_weighted_loss(logits, y, w, base), step


def _homovar_batch(logits: Tensor, y: Tensor, feats: Tensor, k: int, alpha: float, beta: float, base: Base,
                   mask_zeros: bool) -> tuple[Tensor, HomoVarStep]:
    """``counts="batch"``: textbook Levene over the classes present in the batch (actual sizes, weighted
    grand mean, no z != 0 mask); beta compares the batch count with the bounds; weights from batch counts,
    normalised over the present classes (absent classes get weight 0: they enter no loss term)."""
    dev = torch.device("cpu") if feats.device.type == "mps" else feats.device  # mps has no float64
    b_all = torch.bincount(y, minlength=k).to(device=dev, dtype=torch.float64)
    present = b_all > 0
    classes = torch.nonzero(present).flatten()
    kp, big_b = int(classes.numel()), int(y.numel())
    n_lb = torch.full((k,), torch.nan, dtype=torch.float64, device=dev)
    n_ub = n_lb.clone()
    b_full = torch.full((k,), beta, dtype=torch.float64, device=dev)
    bounds, w_stat = None, torch.tensor(torch.nan, dtype=torch.float64, device=dev)
    if kp >= 2 and big_b > kp:
        remap = torch.cumsum(present.long(), 0) - 1
        yp = remap[y.to(dev)]
        bc = b_all[classes]
        z = dispersion(feats, yp, "mean", "l1", mask_zeros, check_labels=False)
        bounds = homogeneity_bounds(z, yp, bc, alpha, grand_mean="weighted", mask_zero_z=False, check_labels=False)
        n_lb[classes], n_ub[classes] = bounds.n_lb, bounds.n_ub
        b_full[classes] = homovar_beta(bc, bounds.n_lb, bounds.n_ub, beta)
        w_stat = bounds.W
    w_p = class_balanced_weights(b_full[classes], b_all[classes])
    w = torch.zeros(k, dtype=torch.float64, device=dev)
    w[classes] = w_p
    out = (b_all < n_lb) | (b_all > n_ub)
    step = HomoVarStep(counts=b_all, n_lb=n_lb, n_ub=n_ub, beta=b_full, weights=w, out_of_bounds=out,
                       fraction_out=out[classes].double().mean(), W=w_stat, bounds=bounds, classes=classes)
    return homovar_weighted_loss(logits, y, w, base), step


def homovar_loss(
    logits: Tensor,
    labels: Tensor,
    features: Tensor,
    counts: Sequence[float] | np.ndarray | Tensor | Literal["batch"],
    alpha: float = 0.05,
    beta: float = 0.999,
    *,
    base: Base = "bce",
    mask_zeros: bool = True,
    check_labels: bool = True,
) -> Tensor:
    """ClimbQ's HomoVar loss (original code: ``utils/lt_loss.py``), faithful by default; it *replaces* cross
    entropy (as the original's ``main.py``).

    ``counts`` are the per-class *dataset* training counts n_k (``num_cls_data/result{gamma}.json`` or
    :func:`paperlib.data.long_tail.long_tail_counts`); ``features`` the [B, D] penultimate features (the FC's
    input). Steps 1-6 (:func:`paperlib.levene.dispersion` with the batch-sum/dataset-count mean and the zero
    mask, then :func:`paperlib.levene.homogeneity_bounds`: unweighted grand mean, abs of the roots, NaN for
    a negative discriminant), step 7 :func:`homovar_beta`, step 8 :func:`class_balanced_weights` (detached,
    float64 then cast to the logits' dtype, docs/climbq.md 'Departures'), step 9 the weighted BCE on softmax
    (``base="ce"``: ``mean_i w_{y_i} CE_i`` instead). ``counts="batch"`` is the textbook-Levene variant.
    Vectorised with ``index_add``: no [B, K, D] tensor, no loop over classes or samples. A zero-count class
    raises the generator's error (it would make the loss NaN). The labels' range is checked with one host
    read per call; ``check_labels=False`` skips it (labels a loader has checked: then a step reads nothing
    back from a GPU here, except what ``torch.unique`` itself needs).
    """
    return _homovar(logits, labels, features, counts, alpha, beta, base, mask_zeros, check_labels)[0]


class HomoVarLoss(nn.Module):
    """:func:`homovar_loss` as a module; ``last`` holds the :class:`HomoVarStep` diagnostics of the last call.

    ``HomoVarLoss(counts)(logits, labels, features)``; counts are validated once here (a zero-count class
    raises the generator's error). ``check_labels``: as in :func:`homovar_loss`.
    """

    def __init__(
        self,
        counts: Sequence[float] | np.ndarray | Tensor | Literal["batch"],
        alpha: float = 0.05,
        beta: float = 0.999,
        *,
        base: Base = "bce",
        mask_zeros: bool = True,
        check_labels: bool = True,
    ) -> None:
        super().__init__()
        self.check_labels = bool(check_labels)
        if isinstance(counts, str):
            if counts != "batch":
                raise ValueError(f"counts={counts!r}: pass the per-class dataset counts or 'batch'")
            self.counts: np.ndarray | str = counts
        else:
            self.counts = check_class_counts(counts)
        if not 0 < alpha < 1 or not 0 < beta < 1:
            raise ValueError(f"alpha={alpha} and beta={beta} must be in (0, 1)")
        if base not in ("bce", "ce"):
            raise ValueError(f"base={base!r}: use 'bce' (the original) or 'ce'")
        self.alpha, self.beta, self.base, self.mask_zeros = alpha, beta, base, mask_zeros
        self.last: HomoVarStep | None = None

    def forward(self, logits: Tensor, labels: Tensor, features: Tensor) -> Tensor:
        loss, self.last = _homovar(logits, labels, features, self.counts, self.alpha, self.beta, self.base,
                                   self.mask_zeros, getattr(self, "check_labels", True))
        return loss

    def extra_repr(self) -> str:
        k = "batch" if isinstance(self.counts, str) else f"K={self.counts.size}"
        return f"{k}, alpha={self.alpha}, beta={self.beta}, base={self.base!r}, mask_zeros={self.mask_zeros}"
