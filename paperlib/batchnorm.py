"""BatchNorm statistics re-estimated after quantization (no training): a quantized network's BatchNorm inputs no
longer match the running statistics gathered with FP32 weights, and a short schedule does not refresh them. DGMS,
CBP and LifeQuant's evaluation use it (docs/dgms.md, 'Baselines'; docs/cbp.md)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .data.tensors import InMemoryData, TensorLoader


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data: InMemoryData | Iterable, batches: int = 0, batch_size: int = 256,
                   device: torch.device | None = None) -> int:
    """Re-estimate every BatchNorm's running statistics of ``model`` as the plain average over ``batches``
    batches of ``data`` (0: all), computed with the weights eval mode uses (quantized; DGMS: hard). No gradient, no
    weight changes; the model is left in eval mode. Returns the number of batches used."""
    device = device or next(model.parameters()).device
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    momenta = [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
        m.train()
    loader = TensorLoader(data.to(device), batch_size) if isinstance(data, InMemoryData) else data
    used = 0
    try:
        for x, _ in loader:
            model(x.to(device, non_blocking=True))
            used += 1
            if batches and used >= batches:
                break
    finally:
        for m, mom in zip(bns, momenta, strict=True):
            m.momentum = mom
        model.eval()
    return used


__all__ = ["recalibrate_bn"]
