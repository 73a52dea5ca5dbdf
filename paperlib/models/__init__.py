"""Models: one definition per architecture, a registry mapping names to builders."""

from __future__ import annotations

import numbers
from collections.abc import Callable

from torch import nn

from .imagenet import AlexNetBN, ResNetImageNet, alexnet_bn, load_weights, resnet18, resnet50
from .mobilenetv2 import MobileNetV2Cifar, mobilenetv2
from .resnet_cifar import ResNetCifar, resnet20, resnet32, resnet56
from .vgg_small import VGGSmall, vgg_small

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet8": lambda **kw: ResNetCifar(8, **kw),  # ResNet-20's blocks, one per stage: a fast digits net
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "mobilenetv2": mobilenetv2,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "alexnet_bn": alexnet_bn,
    "vgg_small": vgg_small,
}


def register_model(name: str, builder: Callable[..., nn.Module]) -> None:
    """Add a builder to the registry (``create_model(name, **kw)`` then calls it)."""
    MODELS[name] = builder


#: keyword arguments every builder reads as a count, each with what it counts
COUNTS = {"num_classes": "the classifier's output classes", "in_channels": "the input image's channels"}


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model, e.g. ``create_model("resnet20", num_classes=10, in_channels=1)``.

    ``num_classes`` and ``in_channels`` must be ints >= 1 (a 0-class head or a 0-channel stem builds a net
    that only fails at its first forward): a non-int raises ``TypeError``, an int < 1 ``ValueError``, each
    naming the argument."""
    try:
        builder = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {sorted(MODELS)}") from None
    for key, what in COUNTS.items():
        if key in kwargs:
            v = kwargs[key]
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"create_model({name!r}, {key}={v!r}): {key} must be an int >= 1 ({what})")
            if v < 1:
                raise ValueError(f"create_model({name!r}, {key}={v!r}): {key} must be an int >= 1 ({what})")
    return builder(**kwargs)


__all__ = [
    "MODELS", "AlexNetBN", "MobileNetV2Cifar", "ResNetCifar", "ResNetImageNet", "alexnet_bn",
    "create_model", "load_weights", "mobilenetv2", "register_model", "resnet18", "resnet20", "resnet32",
    "resnet50", "resnet56", "VGGSmall", "vgg_small",
]
