"""VGG-Small for CIFAR (Zhang et al., LQ-Nets, ECCV 2018), a CIFAR-10 net of DGMS (original
code: ``modeling/networks/vgg_small_cifar.py``; docs/dgms.md).

Six 3x3 convs 128-128-M-256-256-M-512-512-M, each block ``conv -> BN -> ReLU`` and, at the end of a stage,
``conv -> MaxPool(2) -> BN -> ReLU`` (the LQ-Nets order), then one ``Linear(512*4*4, classes)``. The features
are average-pooled to 4x4 before the classifier, which is the identity at the papers' 32x32 input and lets the
same net run on 8x8 digits. An :class:`~paperlib.quant.core.ActSlot` follows every ReLU so activation
quantizers can be plugged in by :func:`paperlib.quant.quantize_model`.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..quant.core import ActSlot
from .imagenet import _check_positive_int

STAGES = ((128, 128), (256, 256), (512, 512))


class VGGSmall(nn.Module):
    """VGG-Small; ``forward_features`` gives the flattened 512*4*4 input of ``fc``."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        if not width > 0:
            raise ValueError(f"width={width} must be > 0 (1.0 is the paper's 128-256-512 channels)")
        num_classes = _check_positive_int("num_classes", num_classes)
        cin = _check_positive_int("in_channels", in_channels)
        layers: list[nn.Module] = []
        for first, second in STAGES:
            first, second = max(1, round(first * width)), max(1, round(second * width))
            layers += [nn.Conv2d(cin, first, 3, 1, 1, bias=False), nn.BatchNorm2d(first), nn.ReLU(inplace=True),
                       ActSlot(),
                       nn.Conv2d(first, second, 3, 1, 1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(second),
                       nn.ReLU(inplace=True), ActSlot()]
            cin = second
        self.features = nn.Sequential(*layers)
        self.num_features = cin * 16
        self.fc = nn.Linear(self.num_features, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: Tensor) -> Tensor:
        if x.shape[-1] < 8 or x.shape[-2] < 8:
            raise ValueError(f"VGG-Small needs inputs of at least 8x8 (three 2x2 poolings), got "
                             f"{tuple(x.shape[-2:])}")
        x = self.features(x)
        return F.adaptive_avg_pool2d(x, 4).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.forward_features(x))


def vgg_small(**kw) -> VGGSmall:
    return VGGSmall(**kw)
