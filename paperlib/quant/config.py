"""What every quantization config shares, and :func:`quantize_`, the one entry point for any model.

A config is a frozen dataclass validated at construction. It says which weight quantizer each layer gets
(:meth:`QuantConfig.weight_quantizer`), which activation quantizer (:meth:`QuantConfig.activation_quantizer`, None
for a weights-only method), which layers stay in full precision (:meth:`QuantConfig.skip_layers`) and where the
activation quantizers go (``activation``):

- ``"auto"`` (default): the model's :class:`~paperlib.quant.core.ActSlot` modules when it has any (this project's
  models mark the places the papers quantize), else the inputs of the quantized layers;
- ``"slots"``: only the model's ``ActSlot`` modules (an error when it has none);
- ``"inputs"``: the input of every quantized ``Conv2d``/``Linear`` (the placement rule for models this project
  did not write, e.g. torchvision's ``resnet18``: each quantized layer multiplies quantized weights by quantized
  activations, as in DoReFa-Net and LSQ);
- ``"none"``: weights only.

Asking for activation quantizers where no place is found raises an error: never a silent weights-only model.
The methods' configs (``UniformConfig``, ``LSQConfig``, ``ClimbQConfig``, ``LifeQuantConfig``, ``DGMSConfig``,
``CBPConfig``) live next to their quantizers; this module imports none of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from torch import Tensor, nn

from ..callback import Callback, cross_entropy
from .core import ActSlot, QuantConv2d, QuantLinear, first_last_layers, quantize_model, weight_layers

PLACEMENTS = ("auto", "slots", "inputs", "none")
INPUT_QUANTIZER = "input_quantizer"  # the child module an "inputs" placement adds to a quantized layer


def check_int(value: Any, name: str, low: int, high: int) -> int:
    """``value`` as an int in ``[low, high]``; a ``TypeError``/``ValueError`` naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}={value!r}: must be an int in {low}..{high}")
    if not low <= value <= high:
        raise ValueError(f"{name}={value!r}: must be in {low}..{high}")
    return value


def check_positive(value: Any, name: str) -> float:
    """``value`` as a finite float > 0; an error naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0 or value == float("inf"):
        raise ValueError(f"{name}={value!r}: must be a finite number > 0")
    return float(value)


def check_skip(skip: Any, named: tuple[str, ...]) -> None:
    """``skip`` is one of the rule names ``named`` or an iterable of layer names."""
    if isinstance(skip, str):
        if skip not in named:
            raise ValueError(f"skip={skip!r}: use one of {list(named)} or a list of layer names")
        return
    if not isinstance(skip, Iterable) or not all(isinstance(s, str) for s in skip):
        raise TypeError(f"skip={skip!r}: use one of {list(named)} or a list of layer names (str)")


def skip_by_rule(model: nn.Module, rule: str) -> list[str]:
    """Layer names a skip rule keeps in full precision: ``"first_last"``, ``"last"``, ``"linear"`` (every
    ``nn.Linear``), ``"none"``."""
    if rule == "first_last":
        return first_last_layers(model)
    if rule == "last":
        return first_last_layers(model)[-1:]
    if rule == "linear":
        return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if rule == "none":
        return []
    raise ValueError(f"unknown skip rule {rule!r}")


class Hooks(NamedTuple):
    """What :func:`paperlib.train.fit` needs to train a model quantized with a config: ``criterion(model, x, y)``
    and the ``callbacks``; ``criterion, callbacks = hooks(model, train, config)``."""

    criterion: Callable[[nn.Module, Tensor, Tensor], Tensor]
    callbacks: list[Callback]


@dataclass(frozen=True)
class QuantConfig:
    """Base of the method configs: ``activation`` placement (module docstring) and ``skip`` (a rule name of
    :data:`SKIP_RULES` or layer names). Subclasses set ``SKIP_RULES`` and implement :meth:`weight_quantizer`."""

    SKIP_RULES: ClassVar[tuple[str, ...]] = ("first_last", "last", "linear", "none")
    method: ClassVar[str] = ""

    def check_common(self) -> None:
        """Validate ``activation`` and ``skip`` (called by each subclass's ``__post_init__``)."""
        placement = getattr(self, "activation", "none")
        if placement not in PLACEMENTS:
            raise ValueError(f"activation={placement!r}: use one of {list(PLACEMENTS)}")
        check_skip(getattr(self, "skip", "none"), self.SKIP_RULES)

    def weight_quantizer(self, layer: nn.Module) -> nn.Module:
        """The weight quantizer of ``layer`` (a float ``Conv2d``/``Linear``, or an already quantized one)."""
        raise NotImplementedError

    def activation_quantizer(self) -> nn.Module | None:
        """A new activation quantizer, or None for a weights-only method."""
        return None

    def activation_bits(self) -> int:
        """The activations' bits: ``act_bits`` when set, else the weights' ``bits`` (32: full precision)."""
        act_bits = getattr(self, "act_bits", None)
        return getattr(self, "bits", 32) if act_bits is None else act_bits

    def skip_layers(self, model: nn.Module) -> list[str]:
        """The weight layers of ``model`` this config keeps in full precision."""
        skip = getattr(self, "skip", "none")
        return skip_by_rule(model, skip) if isinstance(skip, str) else list(skip)

    def hooks(self, model: nn.Module, train_data: Any) -> Hooks:
        """The criterion and callbacks this method trains with (default: cross entropy, no callback)."""
        return Hooks(cross_entropy, [])

    def placement(self) -> str:
        """Where the activation quantizers go: ``activation``, or ``"none"`` when the method has none."""
        return "none" if self.activation_quantizer() is None else getattr(self, "activation", "auto")


def _input_quantizer_pre_hook(layer: nn.Module, args: tuple) -> tuple:
    return (getattr(layer, INPUT_QUANTIZER)(args[0]), *args[1:])


def place_input_quantizers(model: nn.Module, factory: Any) -> int:
    """Give every quantized layer of ``model`` an ``input_quantizer`` (an :class:`ActSlot` filled by
    ``factory()``) applied to its input by a forward pre-hook; returns how many layers got one. Calling it again
    refills the slots (no second hook)."""
    n = 0
    for m in model.modules():
        if not isinstance(m, QuantConv2d | QuantLinear):
            continue
        slot = getattr(m, INPUT_QUANTIZER, None)
        if not isinstance(slot, ActSlot):
            slot = ActSlot()
            m.add_module(INPUT_QUANTIZER, slot)
        if not any(h is _input_quantizer_pre_hook for h in m._forward_pre_hooks.values()):
            m.register_forward_pre_hook(_input_quantizer_pre_hook)
        slot.quantizer = factory()
        n += 1
    return n


def activation_sites(model: nn.Module) -> dict[str, nn.Module]:
    """Every filled activation quantizer of ``model`` by the name of its slot (``ActSlot``s that hold a quantizer
    other than identity)."""
    return {n: m.quantizer for n, m in model.named_modules()
            if isinstance(m, ActSlot) and not isinstance(m.quantizer, nn.Identity)}


def quantize_(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Quantize ``model`` in place with ``config`` (e.g. ``UniformConfig(bits=4)``, ``DGMSConfig(16)``) and
    return it.

    Every ``Conv2d``/``Linear`` outside ``config.skip_layers(model)`` becomes a ``QuantConv2d``/``QuantLinear``
    whose latent weight keeps the state-dict key ``weight``; activation quantizers go where ``config.activation``
    says (module docstring). Errors name the problem: a config that is not one, a model without a layer to
    quantize, activation bits with no place to put them."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_ needs an nn.Module, got {type(model).__name__}")
    if not all(callable(getattr(config, a, None)) for a in ("weight_quantizer", "activation_quantizer",
                                                             "skip_layers", "placement")):
        raise TypeError(f"quantize_ needs a quantization config (UniformConfig, LSQConfig, ClimbQConfig, "
                        f"LifeQuantConfig, DGMSConfig, CBPConfig), got {type(config).__name__}")
    layers = weight_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Conv2d or Linear layer to quantize")
    skip = config.skip_layers(model)
    if not set(layers) - set(skip):
        raise ValueError(f"{type(config).__name__}: every weight layer of {type(model).__name__} is skipped "
                         f"({skip}); pass skip='none' or fewer layer names")
    placement = config.placement()
    slots = [m for m in model.modules() if isinstance(m, ActSlot) and not _is_input_slot(model, m)]
    if placement == "slots" and not slots:
        raise ValueError(f"activation='slots' but {type(model).__name__} has no ActSlot: use activation='inputs' "
                         "(quantize the input of every quantized layer) or 'none' (weights only)")
    use_slots = placement == "slots" or (placement == "auto" and bool(slots))
    quantize_model(model, weight=config.weight_quantizer,
                   activation=config.activation_quantizer if use_slots else None, skip=skip)
    if placement == "inputs" or (placement == "auto" and not slots):
        if place_input_quantizers(model, config.activation_quantizer) == 0:
            raise ValueError(f"{type(config).__name__} asks for activation quantizers but {type(model).__name__} "
                             "has no quantized layer to put them before")
    return model


def hooks(model: nn.Module, train_data: Any, config: QuantConfig) -> Hooks:
    """The criterion and callbacks :func:`paperlib.train.fit` needs for ``model`` quantized with ``config``, on
    ``train_data`` (an ``InMemoryData``: ClimbQ reads its class counts). They work unchanged in one process and
    under ``torchrun``: statistics of a batch come from the global batch through collectives that are the identity
    in one process. ``fit(model, train, test, cfg, criterion=h.criterion, callbacks=h.callbacks)``."""
    if not callable(getattr(config, "hooks", None)):
        raise TypeError(f"hooks needs a quantization config, got {type(config).__name__}")
    return config.hooks(model, train_data)


def _is_input_slot(model: nn.Module, slot: nn.Module) -> bool:
    return any(getattr(m, INPUT_QUANTIZER, None) is slot for m in model.modules())


__all__ = ["INPUT_QUANTIZER", "PLACEMENTS", "Hooks", "QuantConfig", "hooks", "activation_sites", "check_int",
           "check_positive", "check_skip", "place_input_quantizers", "quantize_", "skip_by_rule"]
