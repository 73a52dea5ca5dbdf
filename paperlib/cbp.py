"""CBP: constrained backpropagation with a pseudo-Lagrange multiplier method (Kim & Jeong, NeurIPS 2021).

Spec: ``shared/papers/cbp.md`` (cited as "spec §"). Read top to bottom:

1. the quantization sets ``Q = s * F`` (:func:`levels`, spec §1.2),
2. the forward quantizer, nearest-level projection with a straight-through backward (:func:`project`,
   :class:`CBPWeight`, spec §1.3),
3. the windowed sawtooth constraint ``cs(w; Q, g)`` with the subgradient of spec §1.4 as its autograd
   gradient (:func:`constraint`, :func:`windows`), and the constraint-failure score (:func:`cfs`, §1.8),
4. the training controller :class:`CBP` (spec §1.5): per-weight multipliers λ, the event rule, the window
   schedule ``g``, the single lr drop, gradient clipping, weight clamping, checkpointable state.

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

Options of spec §3, each labelled with its source (:class:`CBPConfig`):

=====  ============================  ========================================================================
§3 #   option                        default / alternatives
=====  ============================  ========================================================================
1      ``lambda_optimizer``          ``"adam"`` (code, paper §4) / ``"sgd"`` (paper Alg. 1 plain ascent)
2      ``grad_clip``, ``clamp``      both on (grad clip 1: code only; clip(W) to [-1, 1]: paper and code)
5      colour jitter                 a data-pipeline option, not here (code: off, paper: on)
7      ``recompute_scale``           ``False`` (code: frozen) / ``True`` (ablation: s at every event)
9      window                        ``variant="cbp"`` (paper Eq. 10 = code); ``"no_window"`` (Table 4)
10     initial λ step at ``g = 1``   done in :meth:`CBP.start` (code)
11     lr × 0.1 at ``g = 20``        all param groups, once (paper and code)
=====  ============================  ========================================================================

Weight decay, batch size and lr per architecture (§3 #3, #4, #12) are training-loop data:
:func:`paper_hparams` returns the paper/code values.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .quant.core import QuantConv2d, QuantLinear, quantize_model

# ---------------------------------------------------------------------------------------------------------
# 1. Quantization sets (spec §1.2)
# ---------------------------------------------------------------------------------------------------------

#: Factor sets ``F`` per mode (spec §1.2 table; ``module.py:L24-44``); levels are ``Q = s * F``.
MODES: dict[str, tuple[float, ...]] = {
    "bin": (-1.0, 1.0),
    "ter": (-1.0, 0.0, 1.0),
    "1bit": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "2bit": (-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0),
}

#: ``L_pre`` after an event and at the start (``main.py``: ``lagsum_pre = 1e10``; paper: L_sum^max).
L_PRE_RESET = 1e10


def check_mode(mode: str) -> str:
    """Validate a CBP quantization-set name (spec §1.2)."""
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
    """Sorted quantization levels ``Q = scale * F(mode)`` (spec §1.2), a 1-D tensor of ``n`` levels.

    ``scale`` is a positive float or a one-element tensor (then the result follows its device and dtype
    unless ``dtype``/``device`` are given). ``mode`` is ``"bin"``, ``"ter"``, ``"1bit"`` or ``"2bit"``.
    """
    check_mode(mode)
    if isinstance(scale, bool) or not isinstance(scale, int | float | Tensor):
        raise TypeError(f"scale must be a positive float or a one-element tensor, got {type(scale).__name__}")
    if isinstance(scale, Tensor):
        if scale.numel() != 1:
            raise ValueError(f"scale must be one number per layer (spec §1.2), got {tuple(scale.shape)}")
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
    """``g >= 1`` (``math.inf`` allowed); returns ``r = 1 - 1/g`` (spec §1.4, code variable ``ucs``)."""
    if isinstance(g, bool) or not isinstance(g, numbers.Real):
        raise TypeError(f"g must be a number >= 1 (math.inf for no window), got {type(g).__name__}")
    if math.isnan(g) or g < 1:
        raise ValueError(f"g={g}: the window parameter must be >= 1 (1: whole interior free; inf: no window)")
    return 1.0 - 1.0 / float(g)


# ---------------------------------------------------------------------------------------------------------
# 2. Forward quantizer (spec §1.3)
# ---------------------------------------------------------------------------------------------------------


def _nearest(w: Tensor, q: Tensor) -> Tensor:
    """Nearest level, saturating, with the tie rule of spec §1.3 (no autograd)."""
    m = (q[1:] + q[:-1]) / 2
    c = torch.bucketize(w, m)  # number of medians strictly below w
    cm = c.clamp(max=m.numel() - 1)
    return torch.where(m[cm] == w, m[cm], q[c])


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
    """Nearest-level projection with a straight-through backward (spec §1.3, ``module.py:L9-22``).

    Forward ``w_q = q_1 + Σ_i Δ_i (sign(w - m_i) + 1) / 2``: the nearest level of ``levels``, saturating at
    ``q_1``/``q_n``. Tie rule: ``sign(0) = 0``, so ``w`` exactly on a median ``m_i`` maps to ``m_i`` itself
    (binary ``w = 0`` gives 0). Backward: identity, no ``|w| <= 1`` gating, no gradient to the levels.
    """
    _check_weight(w)
    return _ProjectSTE.apply(w, _check_levels(levels).detach().to(w))


class CBPWeight(nn.Module):
    """CBP weight quantizer for :func:`paperlib.quant.quantize_model`: ``project(w, s * F(mode))``.

    ``scale`` is a frozen buffer (spec §1.2: a per-layer scalar, in no optimizer group, saved in the
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

    @classmethod
    def factory(cls, mode: str) -> Callable[[nn.Module], CBPWeight]:
        """``layer -> CBPWeight(mode, mean|layer.weight|)`` for ``quantize_model(model, weight=...)``."""
        check_mode(mode)
        return lambda layer: cls(mode, layer.weight.detach().abs().mean())

    def levels(self) -> Tensor:
        """The layer's levels ``Q = s * F`` (sorted, on the buffer's device)."""
        return self.factors * self.scale

    def set_scale(self, w: Tensor) -> None:
        """``s = mean|w|`` (spec §1.2; done once at the start, or at events for ``recompute_scale``)."""
        s = w.detach().abs().mean()
        if not bool(torch.isfinite(s)) or float(s) <= 0:
            raise ValueError(f"cannot set the CBP scale from weights with mean|w| = {float(s)}: "
                             "the layer's weights are all zero or not finite")
        self.scale.copy_(s)

    def forward(self, w: Tensor) -> Tensor:
        return _ProjectSTE.apply(w, self.levels().detach().to(w))

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, scale={float(self.scale):.4g}"


# ---------------------------------------------------------------------------------------------------------
# 3. Constraint function, windows and CFS (spec §1.4, §1.8)
# ---------------------------------------------------------------------------------------------------------


def windows(levels: Tensor, g: float) -> Tensor:
    """Unconstrained windows ``U_i(g) = [q_i + rΔ_i/2, q_{i+1} - rΔ_i/2)``, ``r = 1 - 1/g`` (§1.4, Eq. 10).

    Returns an ``(n - 1, 2)`` tensor of ``[start, end)`` per interval: width ``Δ_i / g``, centred on the
    median ``m_i``; empty (start = end = m_i) for ``g = inf``.
    """
    r = _check_g(g)
    q = _check_levels(levels)
    lo, hi = q[:-1], q[1:]
    half = r * (hi - lo) / 2
    return torch.stack([lo + half, hi - half], dim=1)


def _constraint_and_slope(w: Tensor, q: Tensor, r: float) -> tuple[Tensor, Tensor]:
    """``cs(w; Q, g)`` and its subgradient's sign (int8, slope = 2·sign), element-wise (spec §1.4)."""
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
    return cs, sign


class _Constraint(torch.autograd.Function):
    """cs forward; backward ``grad * dcs/dw`` out of place (spec §1.4 warns the original's in-place one)."""

    @staticmethod
    def forward(ctx, w: Tensor, q: Tensor, r: float) -> Tensor:  # noqa: D102
        cs, sign = _constraint_and_slope(w, q, r)
        ctx.save_for_backward(sign)
        return cs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # noqa: D102
        (sign,) = ctx.saved_tensors
        return grad * (2 * sign).to(grad.dtype), None, None


def constraint(w: Tensor, levels: Tensor, g: float) -> Tensor:
    """Windowed sawtooth ``cs(w; Q, g)``, element-wise (paper Eqs. 8-10, spec §1.4, ``module.py:L86-126``).

    ``Y(w) = 2·dist(w, Q)``; ``cs = 0`` on the windows ``U_i(g)`` (:func:`windows`) and ``Y`` elsewhere,
    including everywhere outside ``[q_1, q_n]``. ``g = 1``: only confinement to ``[q_1, q_n]``;
    ``g = math.inf``: ``cs = Y``. The autograd gradient is the subgradient of §1.4: -2 below ``q_1``, +2 at
    or above ``q_n``, +2 on ``[q_i, q_i + rΔ_i/2)``, -2 on ``[q_{i+1} - rΔ_i/2, q_{i+1})``, 0 on ``U_i``
    (it points away from the nearest level). No gradient flows to ``levels``. Windows are half-open in
    both forward and backward (the original's forward keeps the measure-zero left edge; see the report).
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
    """Constraint-failure score (paper Eq. 11, spec §1.8, ``main.py:L311-316``).

    ``CFS = (1/n_w) Σ_j Y(w_j)`` over all constrained weights of all layers: 2 × the mean distance to the
    nearest level, in weight units, no window (``g = inf``). Accepts a model with :class:`CBPWeight`
    layers, an iterable of ``(weight, levels)`` pairs, or tensor(s) with ``levels=``.
    """
    total, count = 0.0, 0
    for w, q in _pairs(model_or_tensors, levels):
        _check_weight(w)
        cs, _ = _constraint_and_slope(w.detach(), _check_levels(q).detach().to(w), 1.0)
        total += float(cs.double().sum())
        count += w.numel()
    if count == 0:
        raise ValueError("cfs of no weights: pass at least one non-empty tensor")
    return total / count


# ---------------------------------------------------------------------------------------------------------
# 4. Training controller (spec §1.5)
# ---------------------------------------------------------------------------------------------------------

VARIANTS = ("cbp", "no_window", "ste")
LAMBDA_OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class CBPConfig:
    """Hyper-parameters of :class:`CBP` (defaults: the original code, spec §1.7; sources in brackets)."""

    mode: str = "bin"  # quantization set, spec §1.2 [paper = code]
    # "cbp": windowed cs with the g schedule [paper = code]; "no_window": cs = Y (g = inf) from the start
    # (Table 4 ablation); "ste": λ ≡ 0, plain backprop with the STE forward (Table 4 baseline). Events, g and
    # the lr drop run identically in all three, so the budgets match.
    variant: str = "cbp"
    lr_lambda: float = 1e-4  # step of the λ optimizer [paper §4 = code]
    lambda_optimizer: str = "adam"  # "adam" [code, paper §4]; "sgd": λ += lr_lambda·cs [paper Alg. 1]
    p_max: int = 20  # an event at the latest every p_max epochs [code --period]
    lr_drop: float = 0.1  # lr factor applied once ... [paper = code]
    lr_drop_at_g: int = 20  # ... when g reaches this value [paper = code]
    grad_clip: float | None = 1.0  # element-wise value clip of all gradients [code; not in paper]; None: off
    clamp: tuple[float, float] | None = (-1.0, 1.0)  # clip(W) of constrained latent weights [paper = code]
    recompute_scale: bool = False  # s = mean|w| re-estimated at each event [ablation; code: frozen]
    skip: tuple[str, ...] | str = "first_last"  # FP layers when CBP quantizes the model [paper §4 = code]

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


def next_g(g: int) -> int:
    """The window schedule (spec §1.5c): ``g + 1`` below 10, then ``+ 10`` (1, 2, ..., 10, 20, 30, ...)."""
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
    """CBP training controller: multipliers, events, window schedule (spec §1.5, Algorithm 1, ``main.py``).

    ``CBP(model, mode, **options)`` (options: the fields of :class:`CBPConfig`, or ``config=``) quantizes
    ``model`` in place with :class:`CBPWeight` (first and last layers FP) unless it already has CBPWeight
    layers. State: one multiplier per constrained weight (``lambdas``, init 0), ``g = 1``, ``p = 0``,
    ``L_pre = 1e10``. See the module docstring for the loop.
    """

    def __init__(self, model: nn.Module, mode: str | None = None, *, config: CBPConfig | None = None,
                 **options: Any) -> None:
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
        """``s_l = mean|W_l|`` for every constrained layer (spec §1.2)."""
        for layer in self.layers.values():
            layer.weight_quantizer.set_scale(layer.weight)

    @torch.no_grad()
    def update_lambda(self, g: float | None = None) -> None:
        """One ascent step of the multipliers (``updatelambda``, ``main.py:L293-299``, spec §1.5).

        Minimises ``-Σ λ·cs(W.detach(); g)`` with the λ optimizer (Adam by default), i.e. gradient
        ``-cs <= 0``: λ never decreases and never goes negative. ``g`` defaults to the effective g.
        """
        self._sync_device()
        r = _check_g(self.g_effective if g is None else g)
        for lam, w, q in zip(self.lambdas, self._weights(), self._levels(), strict=True):
            cs, _ = _constraint_and_slope(w.detach(), q, r)
            lam.grad = -cs
        self._lambda_opt.step()
        for lam in self.lambdas:
            lam.grad = None

    def penalty(self) -> Tensor:
        """``Σ_l Σ_j λ_lj · cs(w_lj; Q_l, g)``, λ detached (paper Eq. 7, spec §1.1): add it to the loss."""
        self._sync_device()
        ws = self._weights()
        if self.config.variant == "ste":
            return ws[0].new_zeros(())
        r = _check_g(self.g_effective)
        terms = [(lam.detach() * _Constraint.apply(w, q, r)).sum()
                 for lam, w, q in zip(self.lambdas, ws, self._levels(), strict=True)]
        return torch.stack(terms).sum()

    def lagrangian(self, loss: Tensor) -> Tensor:
        """``loss + penalty()``; accumulates the detached value into this epoch's ``L_sum`` (spec §1.5a)."""
        if not self.started:
            self.start()
        lag = loss + self.penalty()
        d = lag.detach().double()
        self._l_sum = d if self._l_sum is None else self._l_sum + d
        self._batches += 1
        return lag

    def criterion(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """``CE(model(x; W_q), y) + Σ λ·cs`` (paper Eq. 7), for ``fit(..., criterion=cbp.criterion)``."""
        return self.lagrangian(F.cross_entropy(model(x), y))

    # --- the schedule ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Once, after the pretrained weights are loaded: ``s = mean|w|`` frozen (spec §1.2) and the initial
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
        """Event rule of spec §1.5b-c; returns ``{"epoch", "event", "g", "lr_factor", "events", "p",
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

    # --- observation -----------------------------------------------------------------------------------
    @torch.no_grad()
    def metrics(self) -> dict[str, float]:
        """Per-epoch log of spec §4: CFS, scale-free CFS, λ mean/max, fraction of weights within 1 % of s of a
        level and fraction outside ``[q_1, q_n]``.

        ``cfs_scale_free`` = mean over weights of ``Y(w) / (2 s_l)`` (distance to the nearest level in units
        of the layer's scale; equals ``CFS / (2 s)`` with one scale).
        """
        self._sync_device()
        n = 0
        y_sum = y_rel = near = outside = lam_sum = 0.0
        lam_max = 0.0
        for lam, w, q, layer in zip(self.lambdas, self._weights(), self._levels(), self.layers.values(),
                                    strict=True):
            s = float(layer.weight_quantizer.scale)
            y, _ = _constraint_and_slope(w.detach(), q, 1.0)
            y = y.double()
            y_sum += float(y.sum())
            y_rel += float(y.sum()) / (2 * s)
            near += float((y <= 2 * 0.01 * s).sum())
            outside += float(((w < q[0]) | (w > q[-1])).sum())
            lam_sum += float(lam.double().sum())
            lam_max = max(lam_max, float(lam.max()))
            n += w.numel()
        return {"cfs": y_sum / n, "cfs_scale_free": y_rel / n, "lambda_mean": lam_sum / n,
                "lambda_max": lam_max, "near_level_frac": near / n, "outside_frac": outside / n}

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
        """``clip_grad_value_(model.parameters(), 1)`` on all parameters (``main.py``; spec §1.5a, §3 #2)."""
        if self.config.grad_clip is not None:
            torch.nn.utils.clip_grad_value_(self.model.parameters(), self.config.grad_clip)

    @torch.no_grad()
    def after_step(self, model: nn.Module | None = None) -> None:
        """Clamp every constrained latent weight to ``clamp`` = [-1, 1] (paper clip(W); spec §1.5a)."""
        if self.config.clamp is not None:
            low, high = self.config.clamp
            for w in self._weights():
                w.clamp_(low, high)

    def on_epoch_end(self, epoch: int, stats: dict[str, Any]) -> None:
        """:meth:`end_of_epoch` with the L_sum accumulated by :meth:`criterion` (the loop's own loss sum is
        weighted by batch size, not the spec's Σ over minibatches), then log ``cbp_*`` keys (event, g, lr
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
# 5. Hyper-parameters of the paper's runs (spec §1.7, §3 #3, #4, #12)
# ---------------------------------------------------------------------------------------------------------


def paper_hparams(arch: str, mode: str) -> dict[str, Any]:
    """ImageNet hyper-parameters for ``arch`` in ``{"alexnet", "resnet18", "resnet50"}`` (spec §1.7).

    SGD momentum 0.9; lr 1e-3, except 1e-4 for 1-bit/2-bit shift on AlexNet and ResNet-50 (README, paper
    §4.1/4.2); weight decay 1e-4, 5e-4 for AlexNet (paper; code default 1e-4); batch 256, 128 for
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


__all__ = [
    "CBP", "CBPConfig", "CBPWeight", "L_PRE_RESET", "MODES", "VARIANTS", "cfs", "check_mode", "constraint",
    "levels", "next_g", "paper_hparams", "project", "windows",
]
