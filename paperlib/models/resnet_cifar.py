"""ResNet-20/32/56 for CIFAR-sized input (He et al. 2016, §4.2), post-activation, as the papers use.

One definition with flags instead of one copy per paper:
- ``shortcut="B"``: a 1x1 conv + BN on a stride/width change (ClimbQ, LifeQuant); ``"A"``: zero-padded
  identity of the subsampled input, no parameters (He et al. option A; DGMS).
- ``act_position="pre_relu"``: activation quantizer slots after every BN, before the ReLU (ClimbQ and LifeQuant,
  original code: ``model/resnet.py`` of both: stem conv-BN-Q-ReLU; block conv-BN-Q-ReLU-conv-BN-Q, + shortcut, ReLU;
  the option-B shortcut is conv-BN-Q). ``"post_relu"``: slots after every ReLU, so every conv input is quantized
  (DoReFa-style, for clipped [0, 1] activation quantizers).

Stem conv 3->16, three stages of ``n`` blocks with 16/32/64 channels, stride 2 at the first block of stages
2 and 3, global average pooling, ``fc``. Works for any input size from 8x8 up.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from ..quant.core import ActSlot

Shortcut = Literal["A", "B"]
ActPosition = Literal["pre_relu", "post_relu"]


def _check(shortcut: str, act_position: str) -> None:
    if shortcut not in ("A", "B"):
        raise ValueError(f"shortcut={shortcut!r}: use 'A' (zero-pad identity) or 'B' (1x1 conv + BN)")
    if act_position not in ("pre_relu", "post_relu"):
        raise ValueError(f"act_position={act_position!r}: use 'pre_relu' or 'post_relu'")


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and zero-pad the new channels."""

    def __init__(self, stride: int, extra_channels: int) -> None:
        super().__init__()
        self.stride, self.extra = stride, extra_channels

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        half = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, half, self.extra - half))


class BasicBlock(nn.Module):
    """Post-activation basic block with activation slots at ``act_position``."""

    def __init__(self, cin: int, cout: int, stride: int, shortcut: Shortcut, act_position: ActPosition) -> None:
        super().__init__()
        pre = act_position == "pre_relu"
        self.conv0 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn0 = nn.BatchNorm2d(cout)
        self.act0 = ActSlot()
        self.conv1 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = ActSlot()
        self.pre = pre
        if stride == 1 and cin == cout:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "B":
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)]
            if pre:
                layers.append(ActSlot())
            self.shortcut = nn.Sequential(*layers)
        else:
            self.shortcut = PadShortcut(stride, cout - cin)

    def forward(self, x: Tensor) -> Tensor:
        if self.pre:
            h = F.relu(self.act0(self.bn0(self.conv0(x))))
            return F.relu(self.act1(self.bn1(self.conv1(h))) + self.shortcut(x))
        h = self.act0(F.relu(self.bn0(self.conv0(x))))
        return self.act1(F.relu(self.bn1(self.conv1(h)) + self.shortcut(x)))


class ResNetCifar(nn.Module):
    """CIFAR ResNet with ``depth = 6n + 2``; ``forward_features`` gives the pooled 64-d vector."""

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        in_channels: int = 3,
        shortcut: Shortcut = "B",
        act_position: ActPosition = "pre_relu",
        width: int = 16,
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"depth={depth}: a CIFAR ResNet has depth 6n+2 (20, 32, 44, 56, 110)")
        _check(shortcut, act_position)
        n = (depth - 2) // 6
        self.pre = act_position == "pre_relu"
        self.conv0 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn0 = nn.BatchNorm2d(width)
        self.act0 = ActSlot()
        blocks: list[nn.Module] = []
        cin = width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(cin, cout, stride, shortcut, act_position))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.num_features = cin
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: Tensor) -> Tensor:
        if self.pre:
            x = F.relu(self.act0(self.bn0(self.conv0(x))))
        else:
            x = self.act0(F.relu(self.bn0(self.conv0(x))))
        x = self.blocks(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.forward_features(x))


def resnet20(**kw) -> ResNetCifar:
    return ResNetCifar(20, **kw)


def resnet32(**kw) -> ResNetCifar:
    return ResNetCifar(32, **kw)


def resnet56(**kw) -> ResNetCifar:
    return ResNetCifar(56, **kw)
