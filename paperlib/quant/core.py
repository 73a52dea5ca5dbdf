"""Quantization plumbing shared by every paper: straight-through rounding, quantized layers,
activation slots and ``quantize_model``.

A model marks where activation quantizers sit with :class:`ActSlot` modules (identity until filled).
``quantize_model`` swaps ``nn.Conv2d``/``nn.Linear`` for :class:`QuantConv2d`/:class:`QuantLinear` that
apply a weight quantizer in ``forward`` and fills the slots with activation quantizers. The weight
itself stays the latent full-precision parameter (state-dict key ``weight``), so an FP checkpoint loads
into a quantized model and back.

One pass over all weights (for speed; measured in ``benchmarks/results.md``): a weight quantizer may offer
``group_key(weight)`` (a hashable, or None when this weight cannot join a group) and a static
``quantize_group(weights, quantizers)``. ``quantize_model`` then installs a forward pre-hook on the model that
quantizes every layer whose quantizer shares a key in one call (one autograd node for all of them instead of one per
layer) and hands each layer its result; ``quantized_weight`` uses it once and falls back to the layer's own
quantizer otherwise (a layer called on its own, a weight changed since, a different grad mode). ``quantize_group``
must return what the per-layer quantizer returns for each weight (the tests compare them).

Under ``torch.compile`` (:mod:`paperlib.compiled`) the hooks do nothing and every layer quantizes its own weight
on the quantizer's torch path: Inductor fuses each layer's quantizer chain, and the one-pass stash (a tensor
kept in ``layer.__dict__``) would make dynamo recompile.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence

import torch
from torch import Tensor, nn

WeightQuantizerFactory = Callable[[nn.Module], nn.Module]
ActQuantizerFactory = Callable[[], nn.Module]


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: D102
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: D102
        return grad


def round_ste(x: Tensor) -> Tensor:
    """``torch.round`` (half to even) forward, identity backward (the straight-through estimator)."""
    return _RoundSTE.apply(x)


def ste(x: Tensor, x_q: Tensor) -> Tensor:
    """Forward ``x_q``, gradient of ``x``: ``x + (x_q - x).detach()``."""
    return x + (x_q - x).detach()


_SCALARS: dict[tuple[float, torch.dtype], Tensor] = {}


def compiling() -> bool:
    """Whether dynamo is tracing this call (``torch.compile``): then the quantizers take their plain torch-op
    paths (no native kernels, no caches of tensors across calls, no hand-written autograd nodes that keep state)."""
    return torch.compiler.is_compiling()


def scalar_operand(value: float, like: Tensor) -> Tensor:
    """``value`` as a cached 0-dim CPU tensor of ``like``'s dtype: the same operand a Python scalar becomes in an
    op on ``like`` (bit for bit; tested), without the per-call scalar-to-tensor copy of the fused quantizers."""
    key = (value, like.dtype)
    c = _SCALARS.get(key)
    if c is None:
        c = _SCALARS[key] = torch.tensor(value, dtype=like.dtype)
    return c


def refuse_double_backward(what: str) -> None:
    """Called first in a hand-written backward: under ``create_graph=True`` (grad mode on) raise a clear error
    naming the reference path, instead of a silently wrong second derivative."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"the {what} are differentiable once; for a double backward (create_graph=True) build "
                           "them with fused=False")


def standardize_flat(ws: Sequence[Tensor], by_reciprocal: bool) -> tuple[Tensor, list[Tensor], list[int]]:
    """``(w - mean w) / std w`` of each tensor (its own mean and unbiased std), concatenated into one flat
    buffer, with each tensor's scale and size. ``by_reciprocal=True`` multiplies by ``1/std`` (ClimbQ's ops) and
    returns the reciprocals; ``False`` divides by ``std`` (LifeQuant's) and returns the stds: each the per-tensor
    quantizer's float ops, so a one-pass result equals the per-tensor one bit for bit."""
    sizes = [w.numel() for w in ws]
    flat = torch.cat([w.detach().reshape(-1) for w in ws])
    scales = []
    for w, seg in zip(ws, flat.split(sizes), strict=True):
        w = w.detach()
        if by_reciprocal:
            scale = w.std().reciprocal()
            seg.sub_(w.mean()).mul_(scale)
        else:
            scale = w.std()
            seg.sub_(w.mean()).div_(scale)
        scales.append(scale)
    return flat, scales, sizes


class ActSlot(nn.Module):
    """The place where a model's activation quantizer sits; identity until ``quantize_model`` fills it.

    ``quantizer`` is any module mapping a tensor to a tensor of the same shape.
    """

    def __init__(self) -> None:
        super().__init__()
        self.quantizer: nn.Module = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.quantizer(x)


_GROUPED = "_grouped_weight"  # instance attribute: (quantized weight, latent weight, its _version, grad mode)


def _quantized_weight(layer: nn.Module) -> Tensor:
    if compiling():  # no stash under compile (the hooks are off): the layer's own quantizer
        return layer.weight_quantizer(layer.weight)
    stash = layer.__dict__.pop(_GROUPED, None)
    if stash is not None:
        q, w, version, grad = stash
        if w is layer.weight and version == w._version and grad == torch.is_grad_enabled():
            return q
    return layer.weight_quantizer(layer.weight)


class QuantConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose forward uses ``weight_quantizer(weight)``; ``weight`` stays the latent weight."""

    def __init__(self, *args, weight_quantizer: nn.Module | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.weight_quantizer: nn.Module = weight_quantizer if weight_quantizer is not None else nn.Identity()

    def quantized_weight(self) -> Tensor:
        """The weight the forward uses: the model's one-pass result when it has one, else the quantizer's."""
        return _quantized_weight(self)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.bias)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, weight_quantizer: nn.Module) -> QuantConv2d:
        q = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
            padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype,
        )
        q.weight = conv.weight
        q.bias = conv.bias
        q.weight_quantizer = weight_quantizer
        return q


class QuantLinear(nn.Linear):
    """``nn.Linear`` whose forward uses ``weight_quantizer(weight)``; ``weight`` stays the latent weight."""

    def __init__(self, *args, weight_quantizer: nn.Module | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.weight_quantizer: nn.Module = weight_quantizer if weight_quantizer is not None else nn.Identity()

    def quantized_weight(self) -> Tensor:
        """The weight the forward uses: the model's one-pass result when it has one, else the quantizer's."""
        return _quantized_weight(self)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.quantized_weight(), self.bias)

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_quantizer: nn.Module) -> QuantLinear:
        q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                device=linear.weight.device, dtype=linear.weight.dtype)
        q.weight = linear.weight
        q.bias = linear.bias
        q.weight_quantizer = weight_quantizer
        return q


def weight_layers(model: nn.Module) -> list[str]:
    """Names of the ``Conv2d``/``Linear`` layers of ``model`` in module order (quantized ones included)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def first_last_layers(model: nn.Module) -> list[str]:
    """Names of the first and the last weight layer: the layers most papers keep in full precision."""
    names = weight_layers(model)
    if not names:
        raise ValueError("model has no Conv2d or Linear layer to quantize")
    return sorted({names[0], names[-1]}, key=names.index)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def weight_groups(model: nn.Module) -> dict[tuple[type, Hashable], list[QuantConv2d | QuantLinear]]:
    """The quantized layers of ``model`` that one pass can quantize together, by (quantizer type, group key).

    Only groups of two or more layers are listed; a quantizer without ``group_key``, or whose key is None for
    its weight, is quantized per layer."""
    groups: dict[tuple[type, Hashable], list[QuantConv2d | QuantLinear]] = {}
    for m in model.modules():
        if isinstance(m, QuantConv2d | QuantLinear):
            key_of = getattr(m.weight_quantizer, "group_key", None)
            key = key_of(m.weight) if key_of is not None else None
            if key is not None:
                groups.setdefault((type(m.weight_quantizer), key), []).append(m)
    return {k: v for k, v in groups.items() if len(v) > 1}


def quantize_weights_in_one_pass(model: nn.Module) -> int:
    """Quantize every groupable weight of ``model`` now, one call per group, and hand each layer its result
    for its next forward (the pre-hook ``quantize_model`` installs calls this). Returns how many layers got one.
    """
    grad = torch.is_grad_enabled()
    n = 0
    for (cls, _key), layers in weight_groups(model).items():
        outs = cls.quantize_group([m.weight for m in layers], [m.weight_quantizer for m in layers])
        for m, q in zip(layers, outs, strict=True):
            m.__dict__[_GROUPED] = (q, m.weight, m.weight._version, grad)
        n += len(layers)
    return n


def _one_pass_pre_hook(model: nn.Module, args: tuple) -> None:
    if not compiling():
        quantize_weights_in_one_pass(model)


def _one_pass_post_hook(model: nn.Module, args: tuple, output: object) -> None:
    if compiling():
        return
    for m in model.modules():  # results a forward did not use (a layer it skipped) hold a graph: drop them
        m.__dict__.pop(_GROUPED, None)


def set_one_pass(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Turn the one-pass weight quantization of ``model`` on (the ``quantize_model`` default) or off.

    On, each forward of ``model`` first quantizes all groupable weights together (see the module docstring);
    the values are those of the per-layer quantizers. Off, every layer quantizes its own weight. The hooks are
    plain module-level functions, so a deep copy or a pickled model keeps the setting."""
    always = getattr(model, "_forward_hooks_always_called", {})
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for k in [k for k, h in hooks.items() if h is _one_pass_pre_hook or h is _one_pass_post_hook]:
            del hooks[k]
            always.pop(k, None)
    for m in model.modules():
        m.__dict__.pop(_GROUPED, None)
    if enabled:
        model.register_forward_pre_hook(_one_pass_pre_hook)
        model.register_forward_hook(_one_pass_post_hook, always_call=True)
    return model


def one_pass_enabled(model: nn.Module) -> bool:
    """Whether ``model`` quantizes its weights in one pass (:func:`set_one_pass`)."""
    return any(h is _one_pass_pre_hook for h in model._forward_pre_hooks.values())


def quantize_model(
    model: nn.Module,
    weight: WeightQuantizerFactory | None = None,
    activation: ActQuantizerFactory | None = None,
    skip: Iterable[str] | str = (),
    *,
    one_pass: bool = True,
) -> nn.Module:
    """Turn ``model`` into a quantized model in place and return it.

    ``weight(layer)`` builds the weight quantizer of each ``Conv2d``/``Linear`` not named in ``skip``
    (it receives the float layer, so a quantizer can initialise from the weights: LSQ's step, DGMS's
    mixture). ``activation()`` builds the quantizer of every :class:`ActSlot`. ``skip="first_last"`` keeps
    the first and last weight layers in full precision. Calling it again on a quantized model replaces the
    quantizers (the latent weights are kept).

    ``one_pass=True`` (default) quantizes the weights of all layers whose quantizers allow it (``group_key``) in
    one call per forward (:func:`set_one_pass`; same values, fewer autograd nodes); ``False`` keeps one call per
    layer.
    """
    if isinstance(skip, str):
        if skip != "first_last":
            raise ValueError(f"skip={skip!r}: pass layer names or 'first_last'")
        skip = first_last_layers(model)
    skip = set(skip)
    known = set(weight_layers(model))
    unknown = skip - known
    if unknown:
        raise ValueError(f"skip names {sorted(unknown)} are not Conv2d/Linear layers; valid: {sorted(known)}")
    if weight is not None:
        for name in weight_layers(model):
            if name in skip:
                continue
            layer = model.get_submodule(name)
            if isinstance(layer, QuantConv2d | QuantLinear):
                layer.weight_quantizer = weight(layer)
            elif isinstance(layer, nn.Conv2d):
                _set_submodule(model, name, QuantConv2d.from_float(layer, weight(layer)))
            else:
                _set_submodule(model, name, QuantLinear.from_float(layer, weight(layer)))
    if activation is not None:
        for m in model.modules():
            if isinstance(m, ActSlot):
                m.quantizer = activation()
    want = one_pass and any(hasattr(m.weight_quantizer, "group_key") for m in quantized_layers(model).values())
    if want != one_pass_enabled(model):  # no hook at all for quantizers that cannot group (CBP, DGMS, LSQ...)
        set_one_pass(model, want)
    return model


def quantized_layers(model: nn.Module) -> dict[str, QuantConv2d | QuantLinear]:
    """The quantized weight layers of ``model`` by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantConv2d | QuantLinear)}
