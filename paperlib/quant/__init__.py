"""Quantization plumbing (``core``) and the baselines every paper table compares with."""

from .core import (
    ActSlot,
    QuantConv2d,
    QuantLinear,
    first_last_layers,
    quantize_model,
    quantized_layers,
    round_ste,
    ste,
    weight_layers,
)
from .lsq import LSQActivation, LSQWeight, lsq_quantize
from .uniform import ClippedActivation, DoReFaWeight, clipped_activation, dorefa_weight, uniform_quantize

__all__ = [
    "ActSlot", "QuantConv2d", "QuantLinear", "first_last_layers", "quantize_model", "quantized_layers",
    "round_ste", "ste", "weight_layers", "LSQActivation", "LSQWeight", "lsq_quantize", "ClippedActivation",
    "DoReFaWeight", "clipped_activation", "dorefa_weight", "uniform_quantize",
]
