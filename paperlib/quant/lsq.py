"""LSQ: learned step size quantization (Esser et al., ICLR 2020, Eq. 1-4).

``v_q = round(clamp(v / s, -Q_N, Q_P)) * s`` with the step ``s`` learned; its gradient is scaled by
``g = 1 / sqrt(N_elements * Q_P)`` (LSQ paper, §2.2). Signed: ``Q_N = 2^(b-1)``, ``Q_P = 2^(b-1) - 1``;
unsigned: ``Q_N = 0``, ``Q_P = 2^b - 1``. The step is initialised to ``2 mean|v| / sqrt(Q_P)`` from the
weights or from the first activation batch seen in training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from .config import QuantConfig
from .core import compiling, round_ste
from .uniform import FULL_PRECISION, check_bits


def lsq_range(bits: int, signed: bool) -> tuple[int, int]:
    """``(Q_N, Q_P)`` of LSQ's integer range."""
    if signed:
        return 2 ** (bits - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def grad_scale(x: Tensor, scale: float) -> Tensor:
    """Forward ``x``, backward ``grad * scale`` (LSQ §2.2)."""
    return (x - x * scale).detach() + x * scale


def lsq_quantize(v: Tensor, step: Tensor, bits: int, signed: bool = True) -> Tensor:
    """LSQ quantizer (Eq. 1-2) with the step-gradient scale of LSQ §2.2; straight-through in ``v`` inside range."""
    bits = check_bits(bits, range(2, 17))
    if bits == FULL_PRECISION:
        return v
    qn, qp = lsq_range(bits, signed)
    g = 1.0 / math.sqrt(v.numel() * qp)
    s = grad_scale(step, g)
    return round_ste((v / s).clamp(-qn, qp)) * s


def lsq_init_step(v: Tensor, bits: int, signed: bool) -> Tensor:
    """The paper's initial step ``2 mean|v| / sqrt(Q_P)``."""
    _, qp = lsq_range(bits, signed)
    return (2 * v.detach().abs().mean() / math.sqrt(qp)).clamp_min(1e-8)


class LSQWeight(nn.Module):
    """LSQ weight quantizer (signed), step initialised from the layer's weight."""

    def __init__(self, bits: int, weight: Tensor | None = None) -> None:
        super().__init__()
        self.bits = check_bits(bits, range(2, 17))
        init = lsq_init_step(weight, bits, True) if weight is not None else torch.tensor(1.0)
        self.step = nn.Parameter(init.reshape(()).clone())

    def forward(self, w: Tensor) -> Tensor:
        return lsq_quantize(w, self.step, self.bits, signed=True)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


def _forget_initialized(module: nn.Module, incompatible_keys: object) -> None:
    module._initialized_seen = False  # a loaded state may say "not initialised": read the buffer again


class LSQActivation(nn.Module):
    """LSQ activation quantizer; the step is initialised from the first training batch.

    The ``initialized`` buffer is read on the host until it has been seen True (then never again, so a training
    step on a GPU waits for no device value); loading a state dict makes it read the buffer once more."""

    def __init__(self, bits: int, signed: bool = False) -> None:
        super().__init__()
        self.bits = check_bits(bits, range(2, 17))
        self.signed = signed
        self.step = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("initialized", torch.tensor(False))
        self._initialized_seen = False
        self.register_load_state_dict_post_hook(_forget_initialized)

    def forward(self, x: Tensor) -> Tensor:
        if self.bits == FULL_PRECISION:
            return x
        if self.training and not getattr(self, "_initialized_seen", False) and compiling():
            # torch.compile: the same initialisation without reading the flag on the host (a graph break):
            # ``step`` keeps its value where ``initialized`` is already True. The flag flips once, so the next
            # call compiles the steady-state graph (one recompile, in the second training step)
            with torch.no_grad():
                init = lsq_init_step(x, self.bits, self.signed)
                self.step.copy_(torch.where(self.initialized, self.step, init))
                self.initialized.fill_(True)
            self._initialized_seen = True
        elif self.training and not getattr(self, "_initialized_seen", False):
            if not bool(self.initialized):  # one host read per quantizer, until initialised
                with torch.no_grad():
                    self.step.copy_(lsq_init_step(x, self.bits, self.signed))
                    self.initialized.fill_(True)
            self._initialized_seen = True
        return lsq_quantize(x, self.step, self.bits, signed=self.signed)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}"


@dataclass(frozen=True)
class LSQConfig(QuantConfig):
    """LSQ (Esser et al. 2020) for :func:`paperlib.quantize_`: learned step sizes for weights (signed, step
    initialised from each layer's weight) and activations (unsigned by default, step initialised from the first
    training batch). ``LSQConfig(bits=4)``: W4A4, first and last layers FP32; ``act_signed=True`` for layers
    whose input can be negative (e.g. after a linear bottleneck)."""

    bits: int = 4
    act_bits: int | None = None
    act_signed: bool = False
    skip: str | tuple[str, ...] = "first_last"
    activation: str = "auto"
    method: ClassVar[str] = "lsq"

    def __post_init__(self) -> None:
        check_bits(self.bits, range(2, 17))
        if self.act_bits is not None:
            check_bits(self.act_bits, range(2, 17))
        if not isinstance(self.act_signed, bool):
            raise TypeError(f"act_signed={self.act_signed!r}: must be True or False")
        self.check_common()

    def weight_quantizer(self, layer: nn.Module) -> nn.Module:
        return LSQWeight(self.bits, layer.weight)

    def activation_quantizer(self) -> nn.Module | None:
        bits = self.activation_bits()
        return None if bits == FULL_PRECISION else LSQActivation(bits, signed=self.act_signed)
