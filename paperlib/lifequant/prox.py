"""ProxQ's proximal penalty and the lifelong baselines' importance measures (docs/lifequant.md, "ProxQ" and
"Baselines"; original code: ``utils/lifelong.py``).

Every method regularises with ``λ · Σ_i Ω_i (θ_i - θ_i^old)²`` over all parameters, ``θ^old`` being the model
when task ``t`` starts and ``λ = 100``. They differ in ``Ω``, computed once per task in ``model.eval()`` mode
(BN uses running statistics) over the old-task loaders, divided by the number of *batches* ``B``:

- ``ours`` (LifeQuant, :func:`importance`): ``Ω = (1/B) Σ_b (∇ℓ_b)²`` with ``ℓ_b`` the BaLL loss (or CE);
  optionally plus the MobileNetV2-CIFAR "simulated quantization error" term (:func:`qnoise_loss`).
- ``ewc``: the same with plain cross-entropy.
- ``mas``: ``Ω = (1/B) Σ_b |∇ mean_i ‖z_i‖²|``.
- ``scp``: ``Ω = (1/B) Σ_b |∇ (1/L) Σ_ξ ξ · mean_i z_i|`` with ``L = 50`` random unit vectors ``ξ`` per
  batch (the original's simplification: real SCP squares per-ξ gradients).
- ``original``: no penalty.
- ``si`` and ``rwalk`` are **no-ops in the original** (called with ``[None] + loaders``, so ``Ω ≡ 0``; their
  buffers also do not survive the per-task model rebuild). They are not implemented here: asking for them
  raises and points to ``original``, which is what they reduce to.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..quant.core import compiling, quantized_layers
from ..quant.uniform import check_bits
from .quant import ACT_RANGE, cdf_space_error

LossFn = Callable[[Tensor, Tensor], Tensor]
Loaders = Sequence[Iterable[Any] | None]
DEFAULT_LAMBDA = 100.0  # ll_lambda (main.py L229-232)
SCP_PROJECTIONS = 50
QNOISE_REPEATS = 100
METHODS: tuple[str, ...] = ("ours", "ewc", "mas", "scp", "original")
NOOP_IN_ORIGINAL: tuple[str, ...] = ("si", "rwalk")


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """``θ^old``: detached copies of the trainable parameters (taken when a task starts, docs/lifequant.md, "ProxQ")."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def zero_importance(model: nn.Module) -> dict[str, Tensor]:
    """``Ω ≡ 0`` for every trainable parameter (task 0, and the ``original`` method)."""
    return {n: torch.zeros_like(p.detach()) for n, p in model.named_parameters() if p.requires_grad}


def _check_loaders(loaders: object) -> list[Iterable[Any]]:
    if isinstance(loaders, str | bytes) or not isinstance(loaders, Sequence):
        raise TypeError(
            f"loaders must be a list of loaders (None entries are skipped), got {type(loaders).__name__}; "
            "wrap a single loader as [loader]"
        )
    kept = [ld for ld in loaders if ld is not None]
    for ld in kept:
        if isinstance(ld, Tensor) or (isinstance(ld, tuple | list) and ld and isinstance(ld[0], Tensor)):
            raise TypeError(
                "loaders must be a list of loaders, but its entries look like batches or tensors; pass "
                "[loader] (a loader being a DataLoader, a TensorLoader or a list of (x, y) batches)"
            )
        if not hasattr(ld, "__len__"):
            raise TypeError(
                f"every loader needs len() (the penalty divides by the number of batches): got "
                f"{type(ld).__name__}; use a DataLoader, a TensorLoader or a list of (x, y) batches"
            )
    return kept


def _unpack(batch: object, device: torch.device) -> tuple[Tensor, Tensor]:
    if not isinstance(batch, Sequence) or len(batch) < 2:
        raise TypeError(f"a batch must be an (inputs, labels, ...) sequence, got {type(batch).__name__}")
    return batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)


def _accumulate(
    model: nn.Module,
    loaders: Loaders,
    objective: Callable[[Tensor, Tensor, int], Tensor],
    power: int,
) -> dict[str, Tensor]:
    """``(1/B) Σ_b |∇ objective_b|^power`` per parameter in eval mode; grads cleared, mode restored after."""
    kept = _check_loaders(loaders)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    acc = {n: torch.zeros_like(p).detach() for n, p in params.items()}
    num_batches = sum(len(ld) for ld in kept)  # type: ignore[arg-type]
    if not params or num_batches == 0:
        return acc
    device = next(iter(params.values())).device
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for loader in kept:
            for batch in loader:
                x, y = _unpack(batch, device)
                model.zero_grad(set_to_none=True)
                objective(x, y, num_batches).backward()
                with torch.no_grad():
                    for n, p in params.items():
                        if p.grad is not None:
                            acc[n] += p.grad.square() if power == 2 else p.grad.abs()
                seen += 1
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if seen != num_batches:
        raise ValueError(f"the loaders yielded {seen} batches but their len() sums to {num_batches}")
    for a in acc.values():
        a /= num_batches
    return acc


def qnoise_loss(
    features: Tensor,
    logits: Tensor,
    head: nn.Module,
    bits: int,
    act_range: float = ACT_RANGE,
    repeats: int = QNOISE_REPEATS,
    generator: torch.Generator | None = None,
) -> Tensor:
    """MobileNetV2-CIFAR's simulated-quantization-error term (docs/lifequant.md, "ProxQ"), averaged over ``repeats``
    draws:

    ``(1/R) Σ_r -log mean_{i,c}[log_softmax(head(h + ε_r))_{ic} · log_softmax(z)_{ic}]``,
    ``ε_r ~ U(-Δ, Δ)`` elementwise, ``Δ = act_range / (2^bits - 1)`` (the original uses the *weight*
    bit-width). The original adds it divided by the batch count ``B``; :func:`importance` does that. All
    ``R`` draws run as one batched call of ``head``. ``generator`` (CPU) makes the noise reproducible.
    """
    bits = check_bits(bits)
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats={repeats!r} must be a positive int (100 in the original)")
    delta = act_range / (2**bits - 1)
    shape = (repeats, *features.shape)
    if generator is None:
        u = torch.rand(shape, device=features.device, dtype=features.dtype)
    else:
        u = torch.rand(shape, generator=generator, dtype=features.dtype).to(features.device)
    noisy = head(features.unsqueeze(0) + (u * 2 - 1) * delta)
    prod = F.log_softmax(noisy, dim=-1) * F.log_softmax(logits, dim=-1).unsqueeze(0)
    return -torch.log(prod.flatten(1).mean(dim=1)).mean()


def importance(
    model: nn.Module,
    loaders: Loaders,
    loss_fn: LossFn | None = None,
    *,
    qnoise_bits: int | None = None,
    qnoise_repeats: int = QNOISE_REPEATS,
    act_range: float = ACT_RANGE,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """LifeQuant's EWC-style diagonal importance ``F`` (docs/lifequant.md, "ProxQ";
    ``utils/lifelong.py``, ``ll_method='ours'``).

    In ``model.eval()`` mode, for every batch ``b`` of every loader (``None`` entries skipped, so ``[None]``
    at task 0 gives ``F ≡ 0``): zero the grads, ``ℓ_b = loss_fn(model(x), y)``, backward, ``F += grad²``;
    finally
    ``F /= B``, ``B`` = number of batches (the sum of ``len(loader)``, not samples). Covers every trainable
    parameter (conv, BN γ/β, FC). ``loss_fn`` defaults to cross-entropy; LifeQuant passes BaLL
    (``BaLLLoss(scale, form)``). In paper mode the loaders are ``replay_0..replay_{t-1}``, never test data.

    ``qnoise_bits``: add :func:`qnoise_loss` ``/ B`` to ``ℓ_b`` (MobileNetV2-CIFAR, ``prox_qnoise``); needs a
    model with ``forward_features`` and ``fc``. Returns ``{name: F}``; the model's grads are cleared and its
    train/eval mode restored.
    """
    loss = F.cross_entropy if loss_fn is None else loss_fn
    if qnoise_bits is not None:
        qnoise_bits = check_bits(qnoise_bits)
        if not (hasattr(model, "forward_features") and isinstance(getattr(model, "fc", None), nn.Module)):
            raise TypeError(
                "qnoise_bits needs a model with forward_features(x) and an fc head (e.g. ResNetCifar)"
            )

    def objective(x: Tensor, y: Tensor, num_batches: int) -> Tensor:
        if qnoise_bits is None:
            return loss(model(x), y)
        h = model.forward_features(x)
        z = model.fc(h)
        noise = qnoise_loss(h, z, model.fc, qnoise_bits, act_range, qnoise_repeats, generator)
        return noise / num_batches + loss(z, y)

    return _accumulate(model, loaders, objective, power=2)


def ewc_importance(model: nn.Module, loaders: Loaders) -> dict[str, Tensor]:
    """EWC (original code: ``utils/lifelong.py``): ``Ω = (1/B) Σ_b (∇ CE_b)²`` in eval mode."""
    return importance(model, loaders, F.cross_entropy)


def mas_importance(model: nn.Module, loaders: Loaders) -> dict[str, Tensor]:
    """MAS (original code: ``utils/lifelong.py``): ``Ω = (1/B) Σ_b |∇ mean_i ‖z_i‖²|`` in eval mode (absolute gradient,
    not squared)."""
    return _accumulate(model, loaders, lambda x, y, _: model(x).square().sum(dim=1).mean(), power=1)


def scp_importance(
    model: nn.Module, loaders: Loaders, num_projections: int = SCP_PROJECTIONS,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """SCP as shipped (original code: ``utils/lifelong.py``): ``Ω = (1/B) Σ_b |∇ (1/L) Σ_ξ ξ · mean_i z_i|``, ``L``
    fresh unit vectors per
    batch. ``ξ``: float64 Gaussian columns normalised to unit length, then cast (``sample_spherical``); the
    original draws them from the unseeded NumPy global RNG, here from ``generator`` (CPU) when given.
    """
    if not isinstance(num_projections, int) or num_projections < 1:
        raise ValueError(f"num_projections={num_projections!r} must be a positive int (50 in the original)")

    def objective(x: Tensor, y: Tensor, _: int) -> Tensor:
        z = model(x)
        mean_vec = z.mean(dim=0)
        xi = torch.randn(z.shape[-1], num_projections, generator=generator, dtype=torch.float64)
        xi = (xi / xi.norm(dim=0)).T.to(device=z.device, dtype=z.dtype)
        return (xi @ mean_vec).sum() / num_projections

    return _accumulate(model, loaders, objective, power=1)


def method_importance(
    method: str,
    model: nn.Module,
    loaders: Loaders,
    *,
    loss_fn: LossFn | None = None,
    generator: torch.Generator | None = None,
    **kwargs: Any,
) -> dict[str, Tensor]:
    """``Ω`` of a lifelong method by its ``ll_method`` name (docs/lifequant.md, "Baselines"): ``ours``
    (:func:`importance` with
    ``loss_fn``, extra keywords passed on), ``ewc``, ``mas``, ``scp``, ``original`` (zeros).

    ``si``/``rwalk`` raise ``NotImplementedError``: in the original they are no-ops (``Ω ≡ 0``, i.e. exactly
    ``original``); this companion does not pretend to run them. Unknown names raise ``ValueError`` (the
    original silently fell back to ``ours``).
    """
    if method in NOOP_IN_ORIGINAL:
        raise NotImplementedError(
            f"ll_method={method!r} is a no-op in the original code (built with [None] + loaders, so its "
            "importance is identically zero and it reduces to 'original'); it is not faked here: use "
            "method='original' to reproduce its shipped behaviour"
        )
    if method not in METHODS:
        raise ValueError(f"ll_method={method!r} is unknown; use one of {list(METHODS)}")
    if kwargs and method != "ours":
        raise TypeError(f"extra options {sorted(kwargs)} only apply to method='ours'")
    if method == "ours":
        return importance(model, loaders, loss_fn, generator=generator, **kwargs)
    if method == "ewc":
        return ewc_importance(model, loaders)
    if method == "mas":
        return mas_importance(model, loaders)
    if method == "scp":
        return scp_importance(model, loaders, generator=generator)
    return zero_importance(model)


def prox_penalty(
    model: nn.Module,
    old_params: Mapping[str, Tensor],
    importance: Mapping[str, Tensor],
    lam: float = DEFAULT_LAMBDA,
    *,
    fused: bool = True,
) -> Tensor:
    """ProxQ's proximal term ``λ · Σ_i F_i (θ_i - θ_i^old)²`` (docs/lifequant.md, "ProxQ"), differentiable in ``θ``.

    Sums over the model's parameters that have an entry in ``importance`` (parameters without one count as
    ``F = 0``); each needs a matching ``old_params`` entry (:func:`snapshot`). Recompute it every iteration.

    ``fused=True`` (default): the parameters are concatenated into one flat buffer (``F`` and ``θ_old`` are
    flattened once and cached, rebuilt when one of these tensors is replaced or modified in place), a few ops
    give the value and an analytic backward ``2 λ F (θ - θ_old)``; parameters whose importance is all zero
    are left out of the arithmetic (their gradient is a zero view, so ``.grad`` is defined as before). Same
    value to float rounding (one sum instead of one per parameter) and the same gradients as
    ``fused=False``, the per-parameter loop.
    """
    params = dict(model.named_parameters())
    # under torch.compile the per-parameter loop (plain ops; the fused path's plan cache keys on ids and versions)
    if fused and isinstance(lam, int | float) and not isinstance(lam, bool) and not compiling():
        found = _prox_plan(params, old_params, importance)
        if found is not None:
            plan, ordered = found
            if not ordered:
                device = next(iter(params.values())).device if params else torch.device("cpu")
                return torch.zeros((), device=device)
            return _ProxFn.apply(float(lam), plan, *ordered)
    unknown = set(importance) - set(params)
    if unknown:
        raise ValueError(f"importance has entries {sorted(unknown)[:5]} that are not parameters of the model")
    total: Tensor | None = None
    for n, p in params.items():
        if n not in importance:
            continue
        if n not in old_params:
            raise ValueError(f"old_params has no entry for parameter {n!r}; take it with snapshot(model)")
        f, old = importance[n], old_params[n]
        _check_prox_shapes(n, p, f, old)
        term = (f * (p - old).square()).sum()
        total = term if total is None else total + term
    if total is None:
        device = next(iter(params.values())).device if params else torch.device("cpu")
        return torch.zeros((), device=device)
    return lam * total


def _check_prox_shapes(n: str, p: Tensor, f: Tensor, old: Tensor) -> None:
    if f.shape != p.shape or old.shape != p.shape:
        raise ValueError(
            f"parameter {n!r} has shape {tuple(p.shape)} but importance {tuple(f.shape)} and old_params "
            f"{tuple(old.shape)}; they must come from the same architecture"
        )


class _ProxPlan:
    """How to evaluate the penalty for one (parameters, importance, old_params) set: ``order`` lists the entries
    with some non-zero ``F`` first (``n_active`` of them; their ``F`` and ``θ_old`` flattened into one buffer
    each), then the all-zero ones. ``key`` identifies every tensor and the version of ``F`` and ``θ_old``;
    ``refs`` are weak references to them (a plan whose tensors died is dropped; a live tensor's id is unique)."""

    def __init__(self, key: tuple, entries: list[tuple[str, Tensor, Tensor, Tensor]], nonzero: list[bool]) -> None:
        self.key = key
        self.refs = [weakref.ref(t) for _, p, f, old in entries for t in (p, f, old)]
        self.order = [i for i, nz in enumerate(nonzero) if nz] + [i for i, nz in enumerate(nonzero) if not nz]
        self.n_active = sum(nonzero)
        active = [entries[i] for i in self.order[: self.n_active]]
        self.shapes = [p.shape for _, p, _, _ in active]
        self.sizes = [p.numel() for _, p, _, _ in active]
        with torch.no_grad():
            self.imp = torch.cat([f.reshape(-1) for _, _, f, _ in active]) if active else None
            self.old = torch.cat([o.reshape(-1) for *_, o in active]) if active else None

    def alive(self) -> bool:
        return all(r() is not None for r in self.refs)


_PROX_PLANS: list[_ProxPlan] = []  # most recent first; two entries (e.g. two models alternating)
_PROX_PLANS_MAX = 2


def _prox_plan(params: dict[str, Tensor], old_params: Mapping[str, Tensor],
               importance: Mapping[str, Tensor]) -> tuple[_ProxPlan, list[Tensor]] | None:
    """The cached plan for these tensors and the parameters in its order, the plan built (and checked like the
    loop) on a miss; ``None`` when the fused path does not apply (gradients into ``F`` or ``θ_old``, mixed
    dtypes or devices, or an error the loop reports)."""
    entries = []
    for n, p in params.items():
        if n in importance:
            entries.append((n, p, importance[n], old_params.get(n)))
    if len(entries) != len(importance) or any(old is None for *_, old in entries):
        return None  # the loop raises the error
    key = tuple((id(p), tuple(p.shape), id(f), f._version, f.data_ptr(), id(old), old._version, old.data_ptr())
                for _, p, f, old in entries)
    plan = next((q for q in _PROX_PLANS if q.key == key and q.alive()), None)
    if plan is None:
        dtype, device = (entries[0][1].dtype, entries[0][1].device) if entries else (None, None)
        for n, p, f, old in entries:
            _check_prox_shapes(n, p, f, old)
            grad_into_constants = (f.requires_grad or old.requires_grad) and torch.is_grad_enabled()
            if grad_into_constants or not (dtype == p.dtype == f.dtype == old.dtype
                                           and device == p.device == f.device == old.device):
                return None
        nonzero = torch.stack([f.ne(0).any() for _, _, f, _ in entries]).tolist() if entries else []
        plan = _ProxPlan(key, entries, nonzero)
        _PROX_PLANS[:] = [q for q in _PROX_PLANS if q.alive()]
    if _PROX_PLANS[:1] != [plan]:
        _PROX_PLANS[:] = [plan] + [q for q in _PROX_PLANS if q is not plan][: _PROX_PLANS_MAX - 1]
    return plan, [entries[i][1] for i in plan.order]


class _ProxFn(torch.autograd.Function):
    """``λ Σ F (θ - θ_old)²`` over the plan's active parameters, on one flat buffer; gradient
    ``2 λ F (θ - θ_old)`` as views of one buffer, and zero views for the all-zero-importance parameters (so
    their ``.grad`` is defined, as with the loop)."""

    @staticmethod
    def forward(ctx, lam: float, plan: _ProxPlan, *params: Tensor) -> Tensor:  # noqa: D102
        ctx.lam, ctx.plan = lam, plan
        ctx.zero_meta = [(p.shape, p.dtype, p.device) for p in params[plan.n_active:]]
        if not plan.n_active:
            ctx.fd = None
            return torch.zeros((), dtype=params[0].dtype, device=params[0].device)
        d = torch.cat([p.reshape(-1) for p in params[: plan.n_active]]).sub_(plan.old)
        fd = torch.mul(d, plan.imp)
        ctx.fd = fd
        return d.mul_(fd).sum().mul_(lam)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple:  # noqa: D102
        if torch.is_grad_enabled():
            raise RuntimeError("the fused ProxQ penalty is differentiable once; for a double backward "
                               "(create_graph=True) use prox_penalty(..., fused=False)")
        plan = ctx.plan
        grads: list[Tensor] = []
        if ctx.fd is not None:
            g = torch.mul(ctx.fd, grad * (2 * ctx.lam))
            grads = [v.view(shape) for v, shape in zip(g.split(plan.sizes), plan.shapes, strict=True)]
        grads += [torch.zeros((), dtype=dt, device=dev).expand(shape) for shape, dt, dev in ctx.zero_meta]
        return (None, None, *grads)


def cdf_prox_penalty(
    model: nn.Module, bits: int, beta: float, act_range: float = ACT_RANGE, straight_through: bool = False
) -> Tensor:
    """Optional ``prox_cdf_weight`` term (docs/lifequant.md, "ProxQ"): ``β · Σ_layers Σ cdf_space_error(W_layer)`` over
    the
    quantized weight layers. Off in the original (the function is never called). ``straight_through=False`` by
    default because with the original's STE the term has zero gradient (see :func:`cdf_space_error`).
    """
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("model has no quantized layer: call quantize_lifequant(model, ...) first")
    total = sum(cdf_space_error(m.weight, bits, act_range, straight_through).sum() for m in layers.values())
    return beta * total
