"""MobileNetV2 for CIFAR-sized input, as ClimbQ and LifeQuant use it (original code:
``model/mobilenetV2.py`` of both; docs/climbq.md, docs/lifequant.md).

Topology of the originals (``model/mobilenetV2.py`` in both repos, the kuangliu CIFAR layout):

- stem: conv 3x3 ``in_channels -> 32``, stride 1, then BN, Q_a, ReLU;
- inverted-residual blocks with (t, c, n, s) = (1,16,1,1), (6,24,2,1), (6,32,3,2), (6,64,4,2), (6,96,3,1),
  (6,160,3,2), (6,320,1,1): expand 1x1 -> BN -> Q_a -> ReLU6, depthwise 3x3 (stride s) -> BN -> Q_a -> ReLU6,
  project 1x1 -> BN -> Q_a (linear bottleneck). The expand conv is kept even for t = 1, as in the originals;
- head: conv 1x1 ``320 -> 1280`` -> BN -> Q_a -> ReLU, global average pooling (1280-d features), FP ``fc``.

Flags instead of copies:

- ``shortcut="climbq"``: the originals' non-standard residual, added whenever the stride is 1:
  ``ReLU(BN(Conv1x1(x)))``, always a conv even when in == out (original code: ClimbQ ``model/mobilenetV2.py``).
  With 10 classes the model has 2,383,050 parameters, the original model's count. ``"standard"``: Sandler et
  al.'s identity residual, only when the stride is 1 and in == out, no residual otherwise.
- ``act_position="pre_relu"`` (the originals): Q_a after every BN, before the ReLU6/ReLU. ``"post_relu"``: the
  expand, depthwise, stem and head slots sit after their ReLU6/ReLU instead (every slot output then lies in
  the clipped range, as DoReFa-style activation quantizers expect). The projection slot has no ReLU to move
  past and stays after its BN in both modes; the ``climbq`` shortcut has no slot (as in the originals).

The originals pool with ``AvgPool2d(4)``, which at 32 px (and 28 px) input sees a 4x4 map and is the global
average; adaptive pooling gives the same there and also works from 8x8 to 224 px input.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from ..quant.core import ActSlot

MobileShortcut = Literal["climbq", "standard"]
ActPosition = Literal["pre_relu", "post_relu"]

#: (expansion t, output channels c, blocks n, first stride s) of ClimbQ's original ``model/mobilenetV2.py``.
CIFAR_CONFIG: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _check_positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name}={value}: must be >= 1")
    return value


def _check_flags(shortcut: str, act_position: str) -> None:
    if shortcut not in ("climbq", "standard"):
        raise ValueError(
            f"shortcut={shortcut!r}: use 'climbq' (ReLU(BN(Conv1x1(x))) whenever stride == 1, the originals) "
            "or 'standard' (identity when stride == 1 and in == out)"
        )
    if act_position not in ("pre_relu", "post_relu"):
        raise ValueError(f"act_position={act_position!r}: use 'pre_relu' (the originals) or 'post_relu'")


def _post_conv(x: Tensor, bn: nn.Module, act: nn.Module, relu6: bool, pre: bool) -> Tensor:
    """``BN -> Q_a -> ReLU(6)`` (``pre``, the originals) or ``BN -> ReLU(6) -> Q_a`` after a conv."""
    x = bn(x)
    relu = F.relu6 if relu6 else F.relu
    return relu(act(x)) if pre else act(relu(x))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: expand 1x1, depthwise 3x3 (stride), project 1x1, plus the shortcut (original code:
    ClimbQ ``model/mobilenetV2.py``).

    Module names follow the originals (``conv1..3``, ``bn1..3``, ``shortcut``); ``act1..3`` are the slots.
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        expansion: int,
        stride: int,
        shortcut: MobileShortcut,
        act_position: ActPosition,
    ) -> None:
        super().__init__()
        hidden = expansion * cin
        self.pre = act_position == "pre_relu"
        self.conv1 = nn.Conv2d(cin, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.act1 = ActSlot()
        self.conv2 = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.act2 = ActSlot()
        self.conv3 = nn.Conv2d(hidden, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.act3 = ActSlot()
        self.shortcut: nn.Module | None
        if shortcut == "climbq" and stride == 1:
            conv = nn.Conv2d(cin, cout, 1, bias=False)
            self.shortcut = nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU())
        elif shortcut == "standard" and stride == 1 and cin == cout:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = None

    def forward(self, x: Tensor) -> Tensor:
        out = _post_conv(self.conv1(x), self.bn1, self.act1, relu6=True, pre=self.pre)
        out = _post_conv(self.conv2(out), self.bn2, self.act2, relu6=True, pre=self.pre)
        out = self.act3(self.bn3(self.conv3(out)))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return out


class MobileNetV2Cifar(nn.Module):
    """MobileNetV2 for CIFAR-sized input (original code: ClimbQ ``model/mobilenetV2.py``).

    ``forward_features`` gives the pooled 1280-d vector.

    Module names follow the originals (``conv1``, ``bn1``, ``layers``, ``conv2``, ``bn2``), except that the
    classifier (``linear`` in ClimbQ, ``logit`` in LifeQuant) is ``fc`` here.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        shortcut: MobileShortcut = "climbq",
        act_position: ActPosition = "pre_relu",
    ) -> None:
        super().__init__()
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("in_channels", in_channels)
        _check_flags(shortcut, act_position)
        self.pre = act_position == "pre_relu"
        self.conv1 = nn.Conv2d(in_channels, 32, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.act1 = ActSlot()
        blocks: list[nn.Module] = []
        cin = 32
        for t, c, n, s in CIFAR_CONFIG:
            for i in range(n):
                blocks.append(InvertedResidual(cin, c, t, s if i == 0 else 1, shortcut, act_position))
                cin = c
        self.layers = nn.Sequential(*blocks)
        self.conv2 = nn.Conv2d(cin, 1280, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(1280)
        self.act2 = ActSlot()
        self.num_features = 1280
        self.fc = nn.Linear(1280, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        x = _post_conv(self.conv1(x), self.bn1, self.act1, relu6=False, pre=self.pre)
        x = self.layers(x)
        x = _post_conv(self.conv2(x), self.bn2, self.act2, relu6=False, pre=self.pre)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.forward_features(x))


def mobilenetv2(
    num_classes: int = 10,
    in_channels: int = 3,
    shortcut: MobileShortcut = "climbq",
    act_position: ActPosition = "pre_relu",
) -> MobileNetV2Cifar:
    """MobileNetV2-CIFAR of ClimbQ/LifeQuant (original code: ``model/mobilenetV2.py``).

    ``shortcut="climbq"`` is the originals' layout.
    """
    return MobileNetV2Cifar(num_classes, in_channels, shortcut, act_position)
