"""LifeQuant quantizers (docs/lifequant.md, "Quantizers"; original code: ``model/quantization.py``): the shipped
"standardize" quantizer, the development CDF quantizer and
AlignQ, as pure functions plus thin ``nn.Module``s for :func:`paperlib.quant.quantize_model`.

``Q_k(v) = round(v n) / n`` with ``n = 2^k - 1`` (``torch.round``: half to even), straight-through backward;
``k = 32`` is the identity and ``k = 1`` is ``sign`` (also straight-through), exactly as the original
``uniform_quantize``.

Weights (``quantizer=``):
- ``"standardize"`` (shipped R20/Office/CLEF, the default): ``ŵ = std · (w - mean(w)) / std(w)`` over the
  whole tensor (unbiased std, mean/std *not* detached), ``std = 0.5`` (``range_ = 2``; MobileNetV2-CIFAR
  uses ``std = 0.125``), then ``Q_k(ŵ)``. No clipping by default, so the number of levels is unbounded (not
  a true k-bit code); ``clip=True`` clips ``ŵ`` to [-1, 1] first (at most ``2n + 1`` levels). ``k = 1``:
  ``sign(w / E) · E`` with ``E = mean|w|`` detached.
- ``"cdf"`` (development build): ``u = 2 Φ((w - μ_w) / σ_w) - 1`` in (-1, 1), then ``Q_k(u)`` (``2n + 1``
  levels).
- ``"alignq"`` (AlignQ, ``quantization_alignq``): ``2 Q_k(Φ_{μ_w,σ_w}(w)) - 1`` (exactly ``2^k`` levels).

Activations (``quantizer=``): ``"clamp"`` (shipped R20): ``Q_k(clamp(x, 0, 1))``; ``"standardize"``
(MobileNetV2-CIFAR): ``Q_k(clamp(0.5 (x - mean) / std, 0, 1))`` over the whole batch tensor; ``"cdf"``
(development): ``Q_k(r (2 Φ(x) - 1))``; ``"alignq"``: ``r (2 Q_k(Φ(x)) - 1)``, ``r = act_range = 2``.

Choice (the original is silent for cdf/alignq): at 32 bits every quantizer is the identity (the shipped one is; the
development activation returned the unquantized CDF value ã in its 'align' stage, which is not reproduced).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from ..quant import native as _native
from ..quant.config import QuantConfig, check_positive
from ..quant.core import compiling, quantize_model, refuse_double_backward, standardize_flat
from ..quant.core import scalar_operand as _c
from ..quant.uniform import FULL_PRECISION, check_bits

WeightQuantizer = Literal["standardize", "cdf", "alignq"]
ActQuantizer = Literal["clamp", "standardize", "cdf", "alignq"]
WEIGHT_QUANTIZERS: tuple[str, ...] = ("standardize", "cdf", "alignq")
ACT_QUANTIZERS: tuple[str, ...] = ("clamp", "standardize", "cdf", "alignq")
#: the activation quantizer each weight quantizer was paired with in the original code
PAIRED_ACTIVATION: dict[str, str] = {"standardize": "clamp", "cdf": "cdf", "alignq": "alignq"}
SHIPPED_WEIGHT_STD = 0.5  # range_ = 2 -> new_s = range_ / 4 (R20, Office, CLEF)
MOBILENET_CIFAR_WEIGHT_STD = 0.125  # range_ = 0.5 (src/mobilenet-v2-cifar-100/model/quantization.py)
ACT_RANGE = 2.0


class _QkSTE(torch.autograd.Function):
    """``Q_k``: forward ``sign`` (k = 1) or ``round(v n) / n``; backward identity (the original ``qfn``)."""

    @staticmethod
    def forward(ctx, x: Tensor, bits: int) -> Tensor:  # noqa: D102
        if bits == 1:
            return torch.sign(x)
        n = 2**bits - 1
        return torch.round(x * n) / n

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        return grad, None


def quantize_k(x: Tensor, bits: int) -> Tensor:
    """``Q_k(x)`` (docs/lifequant.md, "Quantizers"): ``round(x (2^k - 1)) / (2^k - 1)``; ``sign`` at k = 1; identity at
    32; STE."""
    bits = check_bits(bits)
    if bits == FULL_PRECISION:
        return x
    return _QkSTE.apply(x, bits)


def _round_k(x: Tensor, bits: int) -> Tensor:
    """``Q_k`` without the straight-through gradient (``round``/``sign`` have zero gradient)."""
    if bits == 1:
        return torch.sign(x)
    n = 2**bits - 1
    return torch.round(x * n) / n


def clamp_inclusive(x: Tensor, low: float, high: float) -> Tensor:
    """``clamp(x, low, high)`` whose gradient is 1 on the closed interval ``[low, high]`` and 0 outside.

    That is ``torch.clamp``'s gradient in the torch 2.13 the reference vectors were computed with (reference
    vector 2 of docs/lifequant.md: the endpoints pass the gradient). torch 2.14 gives 0 at the endpoints, so the rule
    is written out here.
    """
    inside = (x >= low) & (x <= high)
    return torch.where(inside, x, x.detach().clamp(low, high))


# Fused paths for the shipped quantizers, float32/float64: the forward runs the reference's float ops
# in place on one buffer (bit-identical values), the backward is analytic and saves one tensor.
_FUSED_DTYPES = (torch.float32, torch.float64)
# hardtanh_backward passes the gradient strictly inside (lo, hi); these bounds make that [0, 1] inclusive:
# the largest float below 0 (the negative smallest subnormal) and the smallest float above 1.
_INCLUSIVE_01 = {torch.float32: (-(2.0**-149), 1 + 2.0**-23), torch.float64: (-(2.0**-1074), 1 + 2.0**-52)}


def _std_scale_merges(std: float) -> bool:
    """``round(z std n)`` may be computed as ``round(z (std n))``: exact when ``std`` is a power of two (then
    ``z std`` is an exact scaling, and where it would be subnormal the product rounds to 0 either way)."""
    return math.frexp(std)[0] == 0.5


class _StandardizeQkFn(torch.autograd.Function):
    """``Q_k(std (w - mean w) / std(w))`` with the STE and the gradient through mean and std (reference vector 1):
    with ``z = (w - mu)/s``: ``dL/dw = (std / s) (g - mean g - z <g, z>/(N - 1))``. ``z`` and ``s`` are
    internal tensors, kept on ``ctx``."""

    @staticmethod
    def forward(ctx, w: Tensor, n: int, std: float) -> Tensor:  # noqa: D102
        s = w.std()
        z = torch.sub(w, w.mean()).div_(s)
        ctx.z, ctx.s, ctx.std = z, s, std
        return _standardized_qk(z, n, std, out=None)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # noqa: D102
        _no_double_backward()
        z, s = ctx.z, ctx.s
        dot = torch.dot(grad.reshape(-1), z.reshape(-1))
        gw = torch.sub(grad, grad.mean()).addcmul_(z, dot, value=-1 / (z.numel() - 1))
        return gw.mul_(torch.div(_c(ctx.std, s), s)), None, None


class _StandardizeQkGroupFn(torch.autograd.Function):
    """:class:`_StandardizeQkFn` for several tensors at once: one autograd node, the rounding on one flat buffer;
    each tensor keeps its own mean and std and the same ops, so values and gradients are the per-tensor ones."""

    @staticmethod
    def forward(ctx, n: int, std: float, *ws: Tensor) -> tuple[Tensor, ...]:  # noqa: D102
        z, stds, sizes = standardize_flat(ws, by_reciprocal=False)
        out = _standardized_qk(z, n, std, out=None)
        ctx.z, ctx.stds, ctx.sizes, ctx.std = z, stds, sizes, std
        ctx.set_materialize_grads(False)
        return tuple(o.view_as(w) for o, w in zip(out.split(sizes), ws, strict=True))

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:  # noqa: D102
        _no_double_backward()
        out: list[Tensor | None] = [None, None]
        for gi, z, s, k in zip(grads, ctx.z.split(ctx.sizes), ctx.stds, ctx.sizes, strict=True):
            if gi is None:
                out.append(None)
                continue
            g = gi.reshape(-1)
            dot = torch.dot(g, z)
            gw = torch.sub(g, g.mean()).addcmul_(z, dot, value=-1 / (k - 1))
            out.append(gw.mul_(torch.div(_c(ctx.std, s), s)).view_as(gi))
        return tuple(out)


def _no_double_backward() -> None:
    refuse_double_backward("fused LifeQuant quantizers")


def _standardized_qk(z: Tensor, n: int, std: float, out: Tensor | None) -> Tensor:
    """``round(z std n) / n`` as the reference computes ``Q_k(z * std)``; in place on ``out`` if given."""
    if _std_scale_merges(std):
        t = torch.mul(z, _c(std * n, z)) if out is None else out.mul_(_c(std * n, out))
    else:
        t = (torch.mul(z, _c(std, z)) if out is None else out.mul_(_c(std, out))).mul_(_c(float(n), z))
    return t.round_().div_(_c(float(n), t))


class _ClampQkFn(torch.autograd.Function):
    """``Q_k(clamp(x, 0, 1))``; backward: the gradient on the closed interval [0, 1], 0 outside (reference vector 2)."""

    @staticmethod
    def forward(ctx, x: Tensor, n: int) -> Tensor:  # noqa: D102
        ctx.save_for_backward(x)
        return _clamp_qk(x, n)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        _no_double_backward()
        (x,) = ctx.saved_tensors
        lo, hi = _INCLUSIVE_01[x.dtype]
        return torch.ops.aten.hardtanh_backward(grad, x, lo, hi), None


def _clamp_qk(x: Tensor, n: int) -> Tensor:
    nn_ = _c(float(n), x)
    return torch.clamp(x, 0.0, 1.0).mul_(nn_).round_().div_(nn_)


def _check_tensor(x: object, what: str, min_numel: int = 1) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got dtype {x.dtype}; convert with .float()")
    if x.numel() < min_numel:
        raise ValueError(
            f"{what} has {x.numel()} element(s); the quantizer standardises over the whole tensor and "
            f"needs at least {min_numel}"
        )
    return x


def _check_name(name: object, allowed: tuple[str, ...], what: str) -> str:
    if name not in allowed:
        raise ValueError(f"{what}={name!r} is unknown; use one of {list(allowed)}")
    return name  # type: ignore[return-value]


def normal_cdf(x: Tensor, mean: Tensor | float = 0.0, std: Tensor | float = 1.0) -> Tensor:
    """``Φ((x - mean) / std)``, written as ``torch.distributions.Normal(mean, std).cdf`` computes it."""
    if isinstance(std, Tensor):
        inv = std.reciprocal()
    else:
        inv = 1.0 / std
    return 0.5 * (1 + torch.erf((x - mean) * inv / math.sqrt(2)))


def standardize(x: Tensor, std: float = SHIPPED_WEIGHT_STD) -> Tensor:
    """``(x - mean(x)) / std(x) · std`` over the whole tensor (unbiased std, not detached): ``normalize``."""
    return (x - x.mean()) / x.std() * std


def cdf_space(w: Tensor) -> Tensor:
    """The development "standard space" ``u = 2 Φ((w - μ_w) / σ_w) - 1`` in (-1, 1) (docs/lifequant.md,
    "Quantizers")."""
    return normal_cdf(w, w.mean(), w.std()) * 2 - 1


def quantize_weight(
    w: Tensor,
    bits: int,
    quantizer: WeightQuantizer = "standardize",
    clip: bool = False,
    *,
    std: float = SHIPPED_WEIGHT_STD,
    fused: bool = True,
    native: bool | None = None,
) -> Tensor:
    """LifeQuant weight quantizer (docs/lifequant.md, "Quantizers"; reference vector 1); straight-through, identity at
    32 bits.

    ``quantizer``: ``"standardize"`` (shipped, default; ``std=0.125`` gives the MobileNetV2-CIFAR
    variant), ``"cdf"`` (development build) or ``"alignq"``. ``clip=True`` clips the standardised weight to
    [-1, 1] before rounding (off by default: faithful, unbounded levels); the CDF and AlignQ spaces are
    already bounded, so ``clip`` does not change them.

    ``fused=True`` (default) computes the shipped ``"standardize"`` quantizer (k >= 2, no clip) on
    float32/float64 in place with an analytic backward: the same values bit for bit and the same gradient
    (to rounding) as ``fused=False``, the plain autograd graph. ``native=None`` (default) runs that fused path
    through the native CPU kernel (:mod:`paperlib.quant.native`) for contiguous CPU float32/float64 tensors: the
    same ops on torch's own ``w.mean()`` / ``w.std()``, so its values equal the torch path's bit for bit;
    ``False`` keeps the torch path, ``True`` insists on the kernel.
    Under ``torch.compile`` (:mod:`paperlib.compiled`) the shipped quantizer takes the ``fused=False`` ops.
    """
    _check_name(quantizer, WEIGHT_QUANTIZERS, "quantizer")
    bits = check_bits(bits)
    _check_tensor(w, "w", min_numel=2)
    if not isinstance(std, int | float) or isinstance(std, bool) or not std > 0:
        raise ValueError(f"std={std!r} must be a positive number (0.5 shipped, 0.125 MobileNetV2-CIFAR)")
    if bits == FULL_PRECISION:
        return w
    if native and (quantizer != "standardize" or bits == 1 or clip or not fused):
        raise ValueError("native=True is the kernel of the fused shipped quantizer (quantizer='standardize', "
                         "2 <= bits <= 8, clip=False, fused=True); pass native=None for the others")
    if quantizer == "standardize":
        if bits == 1:
            scale = w.abs().mean().detach()
            return quantize_k(w / scale, 1) * scale
        if fused and not clip and w.dtype in _FUSED_DTYPES and not compiling():  # compile: plain ops below
            n = 2**bits - 1
            if _native.use_native(native, w):
                return _native.lifequant_weights([w], bits, float(std))[0]
            if w.requires_grad and torch.is_grad_enabled():
                return _StandardizeQkFn.apply(w, n, float(std))
            with torch.no_grad():
                z = torch.sub(w, w.mean()).div_(w.std())
                return _standardized_qk(z, n, float(std), out=z)
        w_hat = standardize(w, std)
        if clip:
            w_hat = clamp_inclusive(w_hat, -1.0, 1.0)
        return quantize_k(w_hat, bits)
    if quantizer == "cdf":
        return quantize_k(cdf_space(w), bits)
    if bits == 1:
        raise ValueError("quantizer='alignq' needs bits >= 2: at 1 bit 2·sign(Φ(w)) - 1 is +1 everywhere")
    return 2 * quantize_k(normal_cdf(w, w.mean(), w.std()), bits) - 1


def quantize_weights(
    ws: Sequence[Tensor], bits: int, *, std: float = SHIPPED_WEIGHT_STD, native: bool | None = None
) -> list[Tensor]:
    """The shipped ``"standardize"`` quantizer (k >= 2, no clip) of each tensor in ``ws`` in one pass: one
    autograd node for all of them (the model's one-pass hook, :func:`paperlib.quant.core.set_one_pass`). On CPU
    the native kernel takes them in one call; elsewhere the torch path rounds them on one flat buffer (the
    per-tensor values and gradients, bit for bit)."""
    bits = check_bits(bits)
    ws = list(ws)
    if bits in (1, FULL_PRECISION):
        raise ValueError(f"quantize_weights is the fused k-bit path (2 <= k <= 8), got bits={bits}")
    for w in ws:
        _check_tensor(w, "w", min_numel=2)
    if not ws:
        return []
    if compiling():  # torch.compile: per tensor on plain torch ops (Inductor fuses each chain)
        return [quantize_weight(w, bits, std=std) for w in ws]
    if _native.use_native(native, *ws):
        return _native.lifequant_weights(ws, bits, float(std))
    if len({(w.dtype, w.device) for w in ws}) != 1 or ws[0].dtype not in _FUSED_DTYPES:
        return [quantize_weight(w, bits, std=std, native=False) for w in ws]
    n = 2**bits - 1
    if torch.is_grad_enabled() and any(w.requires_grad for w in ws):
        return list(_StandardizeQkGroupFn.apply(n, float(std), *ws))
    with torch.no_grad():
        z, _, sizes = standardize_flat(ws, by_reciprocal=False)
        out = _standardized_qk(z, n, float(std), out=z)
        return [o.view_as(w) for o, w in zip(out.split(sizes), ws, strict=True)]


def quantize_activation(
    x: Tensor, bits: int, quantizer: ActQuantizer = "clamp", *, act_range: float = ACT_RANGE, fused: bool = True
) -> Tensor:
    """LifeQuant activation quantizer (docs/lifequant.md, "Quantizers"; reference vector 2); straight-through, identity
    at 32 bits.

    ``"clamp"`` (shipped, default): ``Q_k(clamp(x, 0, 1))``, gradient 1 on [0, 1] (endpoints included), 0
    outside.
    ``"standardize"``: MobileNetV2-CIFAR, ``0.5 (x - mean) / std`` over the whole tensor first (also at eval).
    ``"cdf"``: ``Q_k(act_range (2 Φ(x) - 1))``; ``"alignq"``: ``act_range (2 Q_k(Φ(x)) - 1)``.

    ``fused=True`` (default) computes ``"clamp"`` (k >= 2) on float32/float64 in place, saving only ``x``:
    the same values bit for bit and the same gradient as ``fused=False`` (with the default floating-point
    mode; under ``torch.set_flush_denormal(True)`` use ``fused=False``).
    """
    _check_name(quantizer, ACT_QUANTIZERS, "quantizer")
    bits = check_bits(bits)
    _check_tensor(x, "x", min_numel=2 if quantizer == "standardize" else 1)
    if bits == FULL_PRECISION:
        return x
    if quantizer == "clamp":
        if fused and bits != 1 and x.dtype in _FUSED_DTYPES and not compiling():  # compile: plain ops below
            if x.requires_grad and torch.is_grad_enabled():
                return _ClampQkFn.apply(x, 2**bits - 1)
            with torch.no_grad():
                return _clamp_qk(x, 2**bits - 1)
        return quantize_k(clamp_inclusive(x, 0.0, 1.0), bits)
    if quantizer == "standardize":
        return quantize_k(clamp_inclusive(standardize(x, 0.5), 0.0, 1.0), bits)
    if quantizer == "cdf":
        return quantize_k(act_range * (2 * normal_cdf(x) - 1), bits)
    if bits == 1:
        raise ValueError("quantizer='alignq' needs bits >= 2: at 1 bit every activation maps to +act_range")
    return act_range * (2 * quantize_k(normal_cdf(x), bits) - 1)


def cdf_space_error(
    w: Tensor, bits: int, act_range: float = ACT_RANGE, straight_through: bool = True
) -> Tensor:
    """Per-element CDF-space quantization error ``|Q_k(u) - u| / (2^k - 1) · 2 act_range · 0.01`` (original
    code: ``utils/lifelong.py``, ``weight_quantize_fn``; reference vector 8), ``u`` from :func:`cdf_space`. Never
    called in the original.

    ``straight_through=True`` is the original (``Q_k`` with identity backward): then the gradient of the error
    with respect to ``w`` is exactly zero, so as a loss term it does nothing. ``False`` uses plain rounding,
    whose gradient pulls ``u`` toward the grid. Choice: zeros at 32 bits (the original returned ``w``
    itself there).
    """
    bits = check_bits(bits)
    _check_tensor(w, "w", min_numel=2)
    if bits == FULL_PRECISION:
        return torch.zeros_like(w)
    u = cdf_space(w)
    q = quantize_k(u, bits) if straight_through else _round_k(u, bits)
    return torch.abs(q - u) / (2**bits - 1) * (2 * act_range) * 0.01


class LifeQuantWeight(nn.Module):
    """Weight quantizer module around :func:`quantize_weight` (for ``quantize_model(weight=...)``)."""

    def __init__(
        self, bits: int, quantizer: WeightQuantizer = "standardize", clip: bool = False,
        std: float = SHIPPED_WEIGHT_STD, *, fused: bool = True, native: bool | None = None,
    ) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        self.quantizer = _check_name(quantizer, WEIGHT_QUANTIZERS, "quantizer")
        self.clip = bool(clip)
        self.std = std
        self.fused = bool(fused)
        self.native = native

    def forward(self, w: Tensor) -> Tensor:
        return quantize_weight(w, self.bits, self.quantizer, self.clip, std=self.std, fused=self.fused,
                               native=self.native)

    def group_key(self, w: Tensor) -> tuple | None:
        """The shipped fused quantizer groups by (bits, std, dtype, device, native); anything else: one by one."""
        if (self.quantizer != "standardize" or self.clip or not self.fused or self.bits in (1, FULL_PRECISION)
                or w.numel() < 2 or w.dtype not in _FUSED_DTYPES):
            return None
        return (self.bits, float(self.std), w.dtype, w.device, self.native)

    @staticmethod
    def quantize_group(ws: Sequence[Tensor], quantizers: Sequence[LifeQuantWeight]) -> list[Tensor]:
        """The one-pass form of ``forward`` for layers whose ``group_key`` agree."""
        q = quantizers[0]
        return quantize_weights(ws, q.bits, std=q.std, native=q.native)

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, quantizer={self.quantizer!r}, clip={self.clip}, std={self.std}"
                + ("" if self.fused else ", fused=False") + ("" if self.native is None else f", native={self.native}"))


class LifeQuantActivation(nn.Module):
    """Activation quantizer module around :func:`quantize_activation` (for ``ActSlot``s)."""

    def __init__(
        self, bits: int, quantizer: ActQuantizer = "clamp", act_range: float = ACT_RANGE, *, fused: bool = True
    ) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        self.quantizer = _check_name(quantizer, ACT_QUANTIZERS, "quantizer")
        self.act_range = act_range
        self.fused = bool(fused)

    def forward(self, x: Tensor) -> Tensor:
        return quantize_activation(x, self.bits, self.quantizer, act_range=self.act_range, fused=self.fused)

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, quantizer={self.quantizer!r}, act_range={self.act_range}"
                + ("" if self.fused else ", fused=False"))


def quantize_lifequant(
    model: nn.Module,
    weight_bits: int,
    act_bits: int,
    *,
    quantizer: WeightQuantizer = "standardize",
    clip: bool = False,
    std: float = SHIPPED_WEIGHT_STD,
    act_quantizer: ActQuantizer | None = None,
    act_range: float = ACT_RANGE,
    skip: Iterable[str] | Literal["linear"] = "linear",
    fused: bool = True,
    native: bool | None = None,
) -> nn.Module:
    """Quantize ``model`` in place the LifeQuant way (docs/lifequant.md, "Quantizers") and return it.

    Every conv is quantized (stem and 1x1 shortcuts included); ``skip="linear"`` keeps every ``nn.Linear``
    (the classifier) in full precision as the original does; pass layer names to choose otherwise. Every
    ``ActSlot`` gets the activation quantizer; ``act_quantizer=None`` picks the one paired with ``quantizer``
    in the original (``PAIRED_ACTIVATION``). Calling it again (32 -> 8 -> 4 bits) replaces the quantizers and
    keeps the latent weights. ``fused=False`` builds quantizers on the plain autograd reference path;
    ``native`` chooses the weight quantizer's CPU kernel (:func:`quantize_weight`).
    """
    _check_name(quantizer, WEIGHT_QUANTIZERS, "quantizer")
    act_q = PAIRED_ACTIVATION[quantizer] if act_quantizer is None else act_quantizer
    _check_name(act_q, ACT_QUANTIZERS, "act_quantizer")
    weight_bits = check_bits(weight_bits)
    act_bits = check_bits(act_bits)
    if isinstance(skip, str):
        if skip != "linear":
            raise ValueError(
                f"skip={skip!r}: pass 'linear' (keep nn.Linear layers full precision) or layer names"
            )
        skip = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return quantize_model(
        model,
        weight=lambda layer: LifeQuantWeight(weight_bits, quantizer, clip, std, fused=fused, native=native),
        activation=lambda: LifeQuantActivation(act_bits, act_q, act_range, fused=fused),
        skip=list(skip),
    )


@dataclass(frozen=True)
class LifeQuantConfig(QuantConfig):
    """LifeQuant's quantizers for :func:`paperlib.quantize_` (docs/lifequant.md, "Quantizers"): the same layers
    and quantizers as :func:`quantize_lifequant`. ``LifeQuantConfig(bits=4)``: W4A4 with the shipped
    "standardize" weights and "clamp" activations; every conv quantized, every ``nn.Linear`` FP (``skip``)."""

    bits: int = 4
    act_bits: int | None = None
    quantizer: str = "standardize"
    clip: bool = False
    std: float = SHIPPED_WEIGHT_STD
    act_quantizer: str | None = None
    act_range: float = ACT_RANGE
    skip: str | tuple[str, ...] = "linear"
    activation: str = "auto"
    method: ClassVar[str] = "lifequant"

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.act_bits is not None:
            check_bits(self.act_bits)
        _check_name(self.quantizer, WEIGHT_QUANTIZERS, "quantizer")
        if self.act_quantizer is not None:
            _check_name(self.act_quantizer, ACT_QUANTIZERS, "act_quantizer")
        if not isinstance(self.clip, bool):
            raise TypeError(f"clip={self.clip!r}: must be True or False")
        check_positive(self.std, "std")
        check_positive(self.act_range, "act_range")
        self.check_common()

    def weight_quantizer(self, layer: nn.Module) -> nn.Module:
        return LifeQuantWeight(self.bits, self.quantizer, self.clip, self.std)

    def activation_quantizer(self) -> nn.Module | None:
        bits = self.activation_bits()
        act_q = PAIRED_ACTIVATION[self.quantizer] if self.act_quantizer is None else self.act_quantizer
        return None if bits == FULL_PRECISION else LifeQuantActivation(bits, act_q, self.act_range)
