"""Quantization plumbing (``core``) and the baselines every paper table compares with."""

from .config import QuantConfig, activation_sites, quantize_
from .core import (
    ActSlot,
    QuantConv2d,
    QuantLinear,
    first_last_layers,
    one_pass_enabled,
    quantize_model,
    quantize_weights_in_one_pass,
    quantized_layers,
    round_ste,
    set_one_pass,
    ste,
    weight_groups,
    weight_layers,
)
from .lsq import LSQActivation, LSQConfig, LSQWeight, lsq_quantize
from .uniform import (
    ClippedActivation,
    DoReFaWeight,
    UniformConfig,
    clipped_activation,
    dorefa_weight,
    uniform_quantize,
)

__all__ = [
    "ActSlot", "QuantConv2d", "QuantLinear", "first_last_layers", "one_pass_enabled", "quantize_model",
    "quantize_weights_in_one_pass", "quantized_layers", "round_ste", "set_one_pass", "ste", "weight_groups",
    "weight_layers", "LSQActivation", "LSQWeight", "lsq_quantize", "ClippedActivation",
    "DoReFaWeight", "clipped_activation", "dorefa_weight", "uniform_quantize", "QuantConfig", "activation_sites",
    "quantize_", "LSQConfig", "UniformConfig",
]
