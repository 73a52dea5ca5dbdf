"""ImageNet-topology models: ResNet-18/50 (torchvision layout) and AlexNet-BN (CBP).

**ResNet-18/50** follow torchvision's topology (ResNet v1.5: the stride of a bottleneck sits on its 3x3 conv)
and its module names, so ``model.load_state_dict(torchvision_state_dict)`` works with ``strict=True``
(:class:`~paperlib.quant.core.ActSlot` modules hold no state). Used by ClimbQ (ResNet-50, original code:
``resnet-50-imgnet/model/resnet.py``), CBP (ResNet-18/50, original code: ``resnet_mode.py``) and DGMS
(ResNet-18/50, original code: ``modeling/networks/resnet.py``). Activation slots, by ``act_position``:

- ``"post_relu"`` (ClimbQ-ResNet-50, original code: ``resnet-50-imgnet/model/resnet.py``): the stem is
  conv-BN-ReLU-Q_a-maxpool; a bottleneck is conv1-BN-ReLU-Q_a, conv2-BN-ReLU-Q_a, conv3-BN-Q_a, then
  ``+ downsample(x)`` (not quantized), ReLU (not re-quantized); a basic block is conv1-BN-ReLU-Q_a,
  conv2-BN-Q_a, add, ReLU (ClimbQ's ``quant_BasicBlock``).
- ``"pre_relu"``: every Q_a sits right after its BN, before the ReLU, and the downsample gets one too
  (conv-BN-Q_a), as in the CIFAR ResNet's ``pre_relu`` (ClimbQ/LifeQuant CIFAR layout).

``small_input=False`` keeps torchvision's stem (7x7 stride-2 conv, 3x3 stride-2 max-pool with padding 1),
which already runs at 8 px (the map shrinks to 1x1, never to 0). ``small_input=True`` swaps in the usual
CIFAR stem (3x3 stride-1 conv, no max-pool) for better accuracy on small images; ``conv1.weight`` then has a
different shape, so a torchvision checkpoint no longer loads into it.

**AlexNet-BN** is CBP's (original code: ``alexnet_mode.py``): conv 11x11/4 pad 2 (64), BN, ReLU, MaxPool 3/2; conv 5x5
(192), BN, ReLU, MaxPool; conv 3x3 (384), BN, ReLU; conv 3x3 (256), BN, ReLU; conv 3x3 (256), BN, ReLU,
MaxPool; AdaptiveAvgPool 6x6; FC 9216->4096, BN1d, ReLU; FC 4096->4096, BN1d, ReLU; FC with bias.
All BN eps 1e-4; every conv/FC bias-free except the last; no dropout. The original pools cannot run below
about 63 px (a 3x3 max-pool on a 1x1 map has no output); here the max-pools pad a map smaller than their
window with -inf up to the window (:class:`MaxPool2dFit`), which changes nothing at 63 px and above and lets
the model run from 7 px up. Activation slots sit after every ReLU (``post_relu``) or between BN and ReLU
(``pre_relu``); CBP itself quantizes no activation. Module names are CBP's (``features.N``, ``classifier.N``)
except that the last layer is ``fc`` (CBP's ``classifier.6``); a state dict with CBP's name loads too.

``weights_path`` loads a checkpoint file the user supplies (a torchvision state dict saved with
``torch.save``); nothing is ever downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..quant.core import ActSlot

ActPosition = Literal["pre_relu", "post_relu"]
BlockKind = Literal["basic", "bottleneck"]


# ----------------------------------------------------------------------------------------------- checks
def _check_positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name}={value}: must be >= 1")
    return value


def _check_act_position(act_position: str) -> None:
    if act_position not in ("pre_relu", "post_relu"):
        raise ValueError(
            f"act_position={act_position!r}: use 'post_relu' (ClimbQ ResNet-50 layout) or 'pre_relu' "
            "(a slot after every BN, before its ReLU)"
        )


def _relu_act(x: Tensor, act: nn.Module, pre: bool) -> Tensor:
    """``Q_a`` then ReLU (``pre``) or ReLU then ``Q_a``."""
    return F.relu(act(x)) if pre else act(F.relu(x))


# ----------------------------------------------------------------------------------------------- ResNet
class BasicBlock(nn.Module):
    """torchvision ``BasicBlock`` (names ``conv1, bn1, conv2, bn2, downsample``) with slots ``act1, act2``."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, downsample: nn.Module | None, pre: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = ActSlot()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = ActSlot()
        self.downsample = downsample
        self.pre = pre

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = _relu_act(self.bn1(self.conv1(x)), self.act1, self.pre)
        out = self.act2(self.bn2(self.conv2(out)))
        return F.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision v1.5 ``Bottleneck`` (stride on the 3x3 conv) with slots ``act1, act2, act3``."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, downsample: nn.Module | None, pre: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = ActSlot()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = ActSlot()
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.act3 = ActSlot()
        self.downsample = downsample
        self.pre = pre

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = _relu_act(self.bn1(self.conv1(x)), self.act1, self.pre)
        out = _relu_act(self.bn2(self.conv2(out)), self.act2, self.pre)
        out = self.act3(self.bn3(self.conv3(out)))
        return F.relu(out + identity)


class ResNetImageNet(nn.Module):
    """ResNet with torchvision's topology and state-dict names; ``forward_features`` gives the pooled vector.

    ``block`` is ``"basic"`` (ResNet-18/34) or ``"bottleneck"`` (ResNet-50/101/152), ``layers`` the block
    count per stage. See the module docstring for ``act_position`` and ``small_input``.
    """

    def __init__(
        self,
        block: BlockKind,
        layers: tuple[int, int, int, int],
        num_classes: int = 1000,
        in_channels: int = 3,
        act_position: ActPosition = "post_relu",
        small_input: bool = False,
    ) -> None:
        super().__init__()
        if block not in ("basic", "bottleneck"):
            raise ValueError(f"block={block!r}: use 'basic' (ResNet-18/34) or 'bottleneck' (ResNet-50+)")
        if len(layers) != 4:
            raise ValueError(f"layers={layers!r}: give 4 block counts, e.g. (2, 2, 2, 2) for ResNet-18")
        for n in layers:
            _check_positive_int("layers[i]", n)
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("in_channels", in_channels)
        _check_act_position(act_position)
        self.pre = act_position == "pre_relu"
        self.small_input = bool(small_input)
        cls = BasicBlock if block == "basic" else Bottleneck
        if small_input:
            self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.act1 = ActSlot()
        self.maxpool: nn.Module = nn.Identity() if small_input else nn.MaxPool2d(3, 2, 1)
        cin = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            stride = 1 if i == 0 else 2
            stage: list[nn.Module] = []
            for j in range(n):
                s = stride if j == 0 else 1
                downsample = None
                if s != 1 or cin != planes * cls.expansion:
                    parts: list[nn.Module] = [
                        nn.Conv2d(cin, planes * cls.expansion, 1, s, bias=False),
                        nn.BatchNorm2d(planes * cls.expansion),
                    ]
                    if self.pre:
                        parts.append(ActSlot())
                    downsample = nn.Sequential(*parts)
                stage.append(cls(cin, planes, s, downsample, self.pre))
                cin = planes * cls.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.num_features = cin
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: Tensor) -> Tensor:
        x = _relu_act(self.bn1(self.conv1(x)), self.act1, self.pre)
        x = self.maxpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.forward_features(x))


# ----------------------------------------------------------------------------------------------- AlexNet
class MaxPool2dFit(nn.MaxPool2d):
    """``nn.MaxPool2d`` that first pads (with -inf, bottom/right) a map smaller than the window to the window.

    Identical to ``nn.MaxPool2d`` whenever the map is at least as large as the window; on a smaller map it
    returns the max over the whole map (1x1) instead of raising an empty-output error.
    """

    def forward(self, x: Tensor) -> Tensor:
        k = self.kernel_size if isinstance(self.kernel_size, tuple) else (self.kernel_size,) * 2
        p = self.padding if isinstance(self.padding, tuple) else (self.padding,) * 2
        ph = max(k[0] - x.shape[-2] - 2 * p[0], 0)
        pw = max(k[1] - x.shape[-1] - 2 * p[1], 0)
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), value=float("-inf"))
        return super().forward(x)


class ReLUAct(nn.Module):
    """ReLU with an activation slot ``act`` before (``pre``) or after it; stands where CBP has ``nn.ReLU``."""

    def __init__(self, pre: bool) -> None:
        super().__init__()
        self.act = ActSlot()
        self.pre = pre

    def forward(self, x: Tensor) -> Tensor:
        return _relu_act(x, self.act, self.pre)

    def extra_repr(self) -> str:
        return "pre_relu" if self.pre else "post_relu"


class AlexNetBN(nn.Module):
    """AlexNet with batch norm of CBP (``alexnet_mode.py``); ``forward_features`` gives the 4096-d input of ``fc``.

    ``features`` and ``classifier`` keep CBP's indices (``features.0`` conv1, ..., ``classifier.4`` the second
    BN1d); CBP's last layer ``classifier.6`` is ``fc`` here, and state dicts using the old name load as well.
    Smallest input: 7x7 (the 11x11 stride-4 conv with padding 2 needs it).
    """

    min_input_size = 7

    def __init__(
        self, num_classes: int = 1000, in_channels: int = 3, act_position: ActPosition = "post_relu"
    ) -> None:
        super().__init__()
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("in_channels", in_channels)
        _check_act_position(act_position)
        pre = act_position == "pre_relu"

        def bn2d(c: int) -> nn.BatchNorm2d:
            return nn.BatchNorm2d(c, eps=1e-4, momentum=0.1)

        def bn1d(c: int) -> nn.BatchNorm1d:
            return nn.BatchNorm1d(c, eps=1e-4, momentum=0.1)

        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, 11, 4, 2, bias=False), bn2d(64), ReLUAct(pre), MaxPool2dFit(3, 2),
            nn.Conv2d(64, 192, 5, padding=2, bias=False), bn2d(192), ReLUAct(pre), MaxPool2dFit(3, 2),
            nn.Conv2d(192, 384, 3, padding=1, bias=False), bn2d(384), ReLUAct(pre),
            nn.Conv2d(384, 256, 3, padding=1, bias=False), bn2d(256), ReLUAct(pre),
            nn.Conv2d(256, 256, 3, padding=1, bias=False), bn2d(256), ReLUAct(pre), MaxPool2dFit(3, 2),
        )  # fmt: skip
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Linear(256 * 6 * 6, 4096, bias=False), bn1d(4096), ReLUAct(pre),
            nn.Linear(4096, 4096, bias=False), bn1d(4096), ReLUAct(pre),
        )  # fmt: skip
        self.num_features = 4096
        self.fc = nn.Linear(4096, num_classes)
        for m in self.modules():  # CBP's initialisation (alexnet_mode.py)
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.register_load_state_dict_pre_hook(_rename_cbp_head)

    def forward_features(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or min(x.shape[-2:]) < self.min_input_size:
            raise ValueError(
                f"AlexNetBN needs an [N, C, H, W] input with H, W >= {self.min_input_size}; "
                f"got {tuple(x.shape)}"
            )
        x = self.avgpool(self.features(x)).flatten(1)
        return self.classifier(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.forward_features(x))


def _rename_cbp_head(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    """Load-state-dict pre-hook: CBP's ``classifier.6.*`` is our ``fc.*``."""
    old = prefix + "classifier.6."
    for key in [k for k in state_dict if k.startswith(old)]:
        state_dict[prefix + "fc." + key[len(old):]] = state_dict.pop(key)


# ----------------------------------------------------------------------------------------------- weights
def load_weights(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> list[str]:
    """Load a checkpoint file into ``model`` and return the model keys that were not loaded.

    The file is a state dict saved with ``torch.save`` (e.g. torchvision's ``resnet50-0676ba61.pth``, or
    ``torchvision.models.resnet50(weights=...).state_dict()`` saved on a machine with internet access), or a
    dict holding one under ``"state_dict"``. ``strict=True`` requires every key and shape to match;
    ``strict=False`` copies the tensors whose name and shape match and leaves the rest (ClimbQ's ``main.py``
    loader, e.g. for a different ``num_classes``). Nothing is ever downloaded. Load into the float model,
    before ``quantize_model`` (quantizers with parameters add state-dict keys a float checkpoint lacks).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file {str(path)!r} not found. This library never downloads weights: save a "
            "torchvision state dict yourself on a machine with internet access, e.g. "
            "torch.save(torchvision.models.resnet50(weights='IMAGENET1K_V1').state_dict(), path), "
            "and pass its path"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} holds a {type(state).__name__}, not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if strict:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(
                f"checkpoint {str(path)!r} does not match the model ({e}). Build the model with the "
                "checkpoint's num_classes / in_channels and small_input=False, or pass strict=False to load "
                "what matches"
            ) from None
        return []
    own = model.state_dict()
    if isinstance(model, AlexNetBN):
        _rename_cbp_head(model, state, "", {}, False, [], [], [])
    matching = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(matching, strict=False)
    return [k for k in own if k not in matching]


M = TypeVar("M", bound=nn.Module)


def _build(model: M, weights_path: str | os.PathLike | None) -> M:
    if weights_path is not None:
        load_weights(model, weights_path, strict=True)
    return model


# ----------------------------------------------------------------------------------------------- builders
def resnet18(
    num_classes: int = 1000,
    in_channels: int = 3,
    act_position: ActPosition = "post_relu",
    small_input: bool = False,
    weights_path: str | os.PathLike | None = None,
) -> ResNetImageNet:
    """ResNet-18 (torchvision topology and names; used by CBP and DGMS); optional user-given weights file."""
    model = ResNetImageNet("basic", (2, 2, 2, 2), num_classes, in_channels, act_position, small_input)
    return _build(model, weights_path)


def resnet50(
    num_classes: int = 1000,
    in_channels: int = 3,
    act_position: ActPosition = "post_relu",
    small_input: bool = False,
    weights_path: str | os.PathLike | None = None,
) -> ResNetImageNet:
    """ResNet-50 v1.5 (torchvision topology and names; used by ClimbQ and CBP); optional weights file."""
    model = ResNetImageNet("bottleneck", (3, 4, 6, 3), num_classes, in_channels, act_position, small_input)
    return _build(model, weights_path)


def alexnet_bn(
    num_classes: int = 1000,
    in_channels: int = 3,
    act_position: ActPosition = "post_relu",
    weights_path: str | os.PathLike | None = None,
) -> AlexNetBN:
    """AlexNet-BN of CBP (original code: ``alexnet_mode.py``); optional user-given weights file."""
    return _build(AlexNetBN(num_classes, in_channels, act_position), weights_path)
