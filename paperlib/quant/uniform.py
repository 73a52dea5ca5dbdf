"""Uniform k-bit baseline: DoReFa-style weights and clipped activations (Zhou et al. 2016, Eq. 9 and §2.3).

``uniform_quantize(u, k) = round((2^k - 1) u) / (2^k - 1)`` for ``u`` in [0, 1], straight-through.
Weights: ``w_q = 2 Q_k(tanh(w) / (2 max|tanh(w)|) + 1/2) - 1`` (2^k symmetric levels in [-1, 1]);
``k = 1`` is ``sign(w) * mean|w|``. Activations: ``c Q_k(clamp(x, 0, c) / c)`` with clip ``c = 1`` in DoReFa
(which assumes bounded activations); ``c`` is an option because BN-ReLU outputs often exceed 1 (PACT's
observation), so a larger fixed ``c`` suits short fine-tuning from FP32. ``k = 32`` is the identity.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from .config import QuantConfig, check_positive
from .core import round_ste, ste

FULL_PRECISION = 32


def as_bits(bits: int) -> int:
    """``bits`` as a Python int: any integer (``int``, ``numpy.int64``, a 0-d integer tensor) but a bool."""
    if isinstance(bits, bool) or (isinstance(bits, torch.Tensor) and bits.dtype == torch.bool):
        raise TypeError(f"bits must be an int, got {type(bits).__name__} {bits!r}")
    try:
        return operator.index(bits)
    except TypeError:
        raise TypeError(f"bits must be an int, got {type(bits).__name__} {bits!r}") from None


def check_bits(bits: int, allowed: range | tuple[int, ...] = range(1, 17)) -> int:
    """Validate a bit-width: ``bits`` in ``allowed`` or 32 (full precision); returns it as a Python int."""
    bits = as_bits(bits)
    if bits != FULL_PRECISION and bits not in allowed:
        raise ValueError(f"bits={bits} is not supported: use one of {list(allowed)} or 32 (full precision)")
    return bits


def uniform_quantize(u: Tensor, bits: int) -> Tensor:
    """``round(u n) / n`` with ``n = 2^bits - 1``, straight-through (DoReFa Eq. 5)."""
    n = 2**bits - 1
    return round_ste(u * n) / n


def dorefa_weight(w: Tensor, bits: int) -> Tensor:
    """DoReFa weight quantizer (Eq. 9): 2^bits symmetric levels in [-1, 1]; bits=1 is sign(w)·E|w|."""
    check_bits(bits)
    if bits == FULL_PRECISION:
        return w
    if bits == 1:
        scale = w.abs().mean().detach()
        return ste(w, torch.where(w >= 0, scale, -scale))
    t = torch.tanh(w)
    u = t / (2 * t.abs().max().detach().clamp_min(1e-12)) + 0.5
    return 2 * uniform_quantize(u, bits) - 1


def clipped_activation(x: Tensor, bits: int, clip: float = 1.0) -> Tensor:
    """DoReFa activation quantizer ``c Q_k(clamp(x, 0, c) / c)``; gradient zero outside [0, c]."""
    check_bits(bits)
    if bits == FULL_PRECISION:
        return x
    if not clip > 0:
        raise ValueError(f"clip={clip}: the activation clip range must be positive")
    return uniform_quantize(x.clamp(0, clip) / clip, bits) * clip


class DoReFaWeight(nn.Module):
    """Weight quantizer module around :func:`dorefa_weight`."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = check_bits(bits)

    def forward(self, w: Tensor) -> Tensor:
        return dorefa_weight(w, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class ClippedActivation(nn.Module):
    """Activation quantizer module around :func:`clipped_activation`."""

    def __init__(self, bits: int, clip: float = 1.0) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        if not clip > 0:
            raise ValueError(f"clip={clip}: the activation clip range must be positive")
        self.clip = float(clip)

    def forward(self, x: Tensor) -> Tensor:
        return clipped_activation(x, self.bits, self.clip)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, clip={self.clip}"


@dataclass(frozen=True)
class UniformConfig(QuantConfig):
    """The uniform baseline for :func:`paperlib.quantize_`: DoReFa weights and clipped activations.

    ``UniformConfig(bits=4)`` quantizes weights and activations at 4 bits (``act_bits`` sets the activations
    apart; 32 keeps them in full precision); first and last layers stay FP32 (``skip``); ``act_clip`` is the
    activation range [0, c]; ``activation`` the placement (:mod:`paperlib.quant.config`)."""

    bits: int = 4
    act_bits: int | None = None
    act_clip: float = 1.0
    skip: str | tuple[str, ...] = "first_last"
    activation: str = "auto"
    method: ClassVar[str] = "uniform"

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.act_bits is not None:
            check_bits(self.act_bits)
        check_positive(self.act_clip, "act_clip")
        self.check_common()

    def weight_quantizer(self, layer: nn.Module) -> nn.Module:
        return DoReFaWeight(self.bits)

    def activation_quantizer(self) -> nn.Module | None:
        bits = self.activation_bits()
        return None if bits == FULL_PRECISION else ClippedActivation(bits, self.act_clip)
