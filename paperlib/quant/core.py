"""Quantization plumbing shared by every paper: straight-through rounding, quantized layers,
activation slots and ``quantize_model``.

A model marks where activation quantizers sit with :class:`ActSlot` modules (identity until filled).
``quantize_model`` swaps ``nn.Conv2d``/``nn.Linear`` for :class:`QuantConv2d`/:class:`QuantLinear` that
apply a weight quantizer in ``forward`` and fills the slots with activation quantizers. The weight
itself stays the latent full-precision parameter (state-dict key ``weight``), so an FP checkpoint loads
into a quantized model and back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

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


class ActSlot(nn.Module):
    """The place where a model's activation quantizer sits; identity until ``quantize_model`` fills it.

    ``quantizer`` is any module mapping a tensor to a tensor of the same shape.
    """

    def __init__(self) -> None:
        super().__init__()
        self.quantizer: nn.Module = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.quantizer(x)


class QuantConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose forward uses ``weight_quantizer(weight)``; ``weight`` stays the latent weight."""

    def __init__(self, *args, weight_quantizer: nn.Module | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.weight_quantizer: nn.Module = weight_quantizer if weight_quantizer is not None else nn.Identity()

    def quantized_weight(self) -> Tensor:
        return self.weight_quantizer(self.weight)

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
        return self.weight_quantizer(self.weight)

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


def quantize_model(
    model: nn.Module,
    weight: WeightQuantizerFactory | None = None,
    activation: ActQuantizerFactory | None = None,
    skip: Iterable[str] | str = (),
) -> nn.Module:
    """Turn ``model`` into a quantized model in place and return it.

    ``weight(layer)`` builds the weight quantizer of each ``Conv2d``/``Linear`` not named in ``skip``
    (it receives the float layer, so a quantizer can initialise from the weights: LSQ's step, DGMS's
    mixture). ``activation()`` builds the quantizer of every :class:`ActSlot`. ``skip="first_last"`` keeps
    the first and last weight layers in full precision. Calling it again on a quantized model replaces the
    quantizers (the latent weights are kept).
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
    return model


def quantized_layers(model: nn.Module) -> dict[str, QuantConv2d | QuantLinear]:
    """The quantized weight layers of ``model`` by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantConv2d | QuantLinear)}
