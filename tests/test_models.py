"""Models beyond the CIFAR ResNet: MobileNetV2-CIFAR, ResNet-18/50, AlexNet-BN (CBP); the registry."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from paperlib.models import MODELS, create_model, load_weights
from paperlib.models.imagenet import MaxPool2dFit, ReLUAct
from paperlib.models.mobilenetv2 import CIFAR_CONFIG
from paperlib.quant import ActSlot, ClippedActivation, DoReFaWeight, QuantConv2d, QuantLinear, quantize_model


@functools.cache
def _pristine(name: str, items: tuple) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, **dict(items))


def built(name: str, **kwargs) -> nn.Module:
    """A fresh copy of a model built once per session (AlexNet-BN's 57M-weight init is the slow part)."""
    return copy.deepcopy(_pristine(name, tuple(sorted(kwargs.items()))))


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def n_slots(m: nn.Module) -> int:
    return sum(isinstance(s, ActSlot) for s in m.modules())


class Shift(nn.Module):
    """A test activation quantizer ``x - 0.5``: it does not commute with ReLU, so it reveals slot order."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - 0.5


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread_and_free_cache():
    """One intra-op thread: these are many small forwards, and on 2 shared cores OpenMP's spin-waiting made
    the file 4x slower with 2 threads. The cached models are freed when the module ends."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    _pristine.cache_clear()


# ----------------------------------------------------------------------------------- registry
def test_registry_names_and_unknown_name() -> None:
    for name in ("resnet20", "resnet32", "resnet56", "mobilenetv2", "resnet18", "resnet50", "alexnet_bn"):
        assert name in MODELS
    with pytest.raises(ValueError, match="unknown model 'resnet19'.*available"):
        create_model("resnet19")


@pytest.mark.parametrize(
    ("name", "kwargs", "error", "match"),
    [
        ("mobilenetv2", {"shortcut": "B"}, ValueError, "shortcut='B'"),
        ("mobilenetv2", {"act_position": "after"}, ValueError, "act_position"),
        ("mobilenetv2", {"num_classes": 0}, ValueError, "num_classes=0"),
        ("resnet18", {"act_position": "x"}, ValueError, "act_position='x'"),
        ("resnet50", {"in_channels": "3"}, TypeError, "in_channels must be an int"),
        ("alexnet_bn", {"num_classes": 2.5}, TypeError, "num_classes must be an int"),
    ],
)
def test_bad_arguments(name: str, kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        create_model(name, **kwargs)


# ----------------------------------------------------------------------------------- parameter counts
def test_resnet_cifar_param_counts_match_climbq_originals() -> None:
    """Counts of ClimbQ's original ``model/resnet.py``: resnet20 option B, 10 classes = 272,474; resnet56,
    100 classes = 861,620."""
    assert n_params(create_model("resnet20", shortcut="B", num_classes=10)) == 272_474
    assert n_params(create_model("resnet56", shortcut="B", num_classes=100)) == 861_620


def test_mobilenetv2_param_count_matches_climbq_original() -> None:
    """ClimbQ's original ``model/mobilenetV2.py``: 2,383,050 parameters for 10 classes (its conv shortcut)."""
    assert n_params(create_model("mobilenetv2", num_classes=10)) == 2_383_050


def test_mobilenetv2_shortcut_flag() -> None:
    climbq, standard = create_model("mobilenetv2"), create_model("mobilenetv2", shortcut="standard")
    shortcuts_c = [b.shortcut for b in climbq.layers]
    shortcuts_s = [b.shortcut for b in standard.layers]
    # climbq: a conv-BN-ReLU shortcut on every stride-1 block, whatever the widths
    cin, extra, n_conv, n_identity = 32, 0, 0, 0
    for _, c, n, s in CIFAR_CONFIG:
        for i in range(n):
            stride = s if i == 0 else 1
            if stride == 1:
                n_conv += 1
                extra += cin * c + 2 * c  # 1x1 conv + BN affine
                n_identity += cin == c
            cin = c
    assert n_conv == 14 and n_identity == 10
    assert sum(isinstance(s, nn.Sequential) for s in shortcuts_c) == 14
    assert sum(s is None for s in shortcuts_c) == 3
    assert sum(isinstance(s, nn.Identity) for s in shortcuts_s) == 10
    assert sum(s is None for s in shortcuts_s) == 7
    assert n_params(climbq) - n_params(standard) == extra == 145_280


def test_alexnet_bn_param_count_from_cbp_layer_list() -> None:
    """CBP's original ``alexnet_mode.py``: bias-free convs 64/192/384/256/256 + BN2d, bias-free FC
    9216-4096-4096 + BN1d, FC + bias."""
    convs = 64 * 3 * 11 * 11 + 192 * 64 * 5 * 5 + 384 * 192 * 9 + 256 * 384 * 9 + 256 * 256 * 9
    bn2d = 2 * (64 + 192 + 384 + 256 + 256)
    fcs = 9216 * 4096 + 2 * 4096 + 4096 * 4096 + 2 * 4096 + 4096 * 10 + 10
    model = built("alexnet_bn", num_classes=10)
    assert n_params(model) == convs + bn2d + fcs == 57_054_154
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)]
    assert len(bns) == 7 and all(m.eps == 1e-4 and m.momentum == 0.1 for m in bns)
    assert model.fc.bias is not None
    others = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear) and m is not model.fc]
    assert len(others) == 7 and all(m.bias is None for m in others)


# ----------------------------------------------------------------------------------- shapes / input sizes
@pytest.mark.parametrize(("size", "batch"), [(8, 2), (32, 2), (224, 1)])
def test_mobilenetv2_shapes(size: int, batch: int) -> None:
    """224 px at batch 1 only: the CIFAR stem (stride 1) makes a 224 px forward cost ~1 GFLOP per image."""
    model = built("mobilenetv2", num_classes=10).eval()
    with torch.no_grad():
        x = torch.randn(batch, 3, size, size)
        assert model(x).shape == (batch, 10)
        if size < 224:
            assert model.forward_features(x).shape == (batch, 1280)


def test_mobilenetv2_one_channel_train_mode() -> None:
    model = create_model("mobilenetv2", num_classes=5, in_channels=1)
    out = model(torch.randn(2, 1, 8, 8))
    out.sum().backward()
    assert out.shape == (2, 5) and model.conv1.weight.grad is not None


@pytest.mark.parametrize(
    ("name", "act_position", "small_input"),
    [("resnet18", "post_relu", False), ("resnet18", "pre_relu", True), ("resnet50", "pre_relu", False),
     ("resnet50", "post_relu", True)],
)
def test_resnet_small_shapes(name: str, act_position: str, small_input: bool) -> None:
    model = built(name, num_classes=7, act_position=act_position, small_input=small_input)
    width = 512 if name == "resnet18" else 2048
    for size in (8, 32):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():  # train mode: BN needs > 1 value per channel, batch 2 gives it
            assert model(x).shape == (2, 7)
            assert model.forward_features(x).shape == (2, width)
    assert model.num_features == width


def test_resnet_small_input_keeps_resolution() -> None:
    """small_input: 3x3 stride-1 stem, no max-pool, so a 32 px input reaches layer4 at 4x4 (else 1x1)."""
    seen = {}
    for small in (False, True):
        model = create_model("resnet18", small_input=small)
        model.layer4.register_forward_hook(lambda m, i, o, small=small: seen.__setitem__(small, o.shape[-2:]))
        model(torch.randn(2, 3, 32, 32))
        assert model.conv1.kernel_size == ((3, 3) if small else (7, 7))
    assert seen == {False: (1, 1), True: (4, 4)}


def test_resnet18_224px_batch1() -> None:
    model = create_model("resnet18").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


@pytest.mark.parametrize("act_position", ["post_relu", "pre_relu"])
def test_alexnet_bn_small_shapes(act_position: str) -> None:
    model = built("alexnet_bn", num_classes=10, act_position=act_position)
    for size in (7, 8, 32):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            assert model(x).shape == (2, 10)
    assert model.forward_features(torch.randn(2, 3, 8, 8)).shape == (2, 4096)
    with pytest.raises(ValueError, match="H, W >= 7"):
        model(torch.randn(2, 3, 6, 6))


def test_maxpool_fit_matches_maxpool_where_defined() -> None:
    fit, ref = MaxPool2dFit(3, 2), nn.MaxPool2d(3, 2)
    for h, w in [(3, 3), (4, 7), (13, 13), (55, 55)]:
        x = torch.randn(2, 4, h, w)
        torch.testing.assert_close(fit(x), ref(x), rtol=0, atol=0)
    x = torch.randn(2, 4, 2, 1)  # smaller than the window: the global max, not an error
    torch.testing.assert_close(fit(x), x.amax(dim=(2, 3), keepdim=True), rtol=0, atol=0)


def test_alexnet_bn_equals_plain_pools_at_63px() -> None:
    """63 px is the smallest input the original (plain MaxPool2d) AlexNet accepts: both must agree there."""
    model = built("alexnet_bn", num_classes=10).eval()
    x = torch.randn(2, 3, 63, 63)
    with torch.no_grad():
        ours = model(x)
        for i, layer in enumerate(model.features):
            if isinstance(layer, MaxPool2dFit):
                model.features[i] = nn.MaxPool2d(3, 2)
        torch.testing.assert_close(model(x), ours, rtol=0, atol=0)


# ----------------------------------------------------------------------------------- torchvision keys
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_state_dict_loads_strict_and_logits_match(name: str) -> None:
    tv = getattr(torchvision.models, name)(weights=None).eval()
    ours = create_model(name).eval()
    tv_sd = tv.state_dict()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in tv_sd.items()}
    ours.load_state_dict(tv_sd, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x), rtol=1e-5, atol=1e-5)
        h = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        h = tv.avgpool(tv.layer4(tv.layer3(tv.layer2(tv.layer1(h))))).flatten(1)
        torch.testing.assert_close(ours.forward_features(x), h, rtol=1e-5, atol=1e-5)


def test_weights_path(tmp_path) -> None:
    tv = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "resnet18.pth"
    torch.save(tv.state_dict(), path)
    model = create_model("resnet18", weights_path=path).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tv(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="missing.pth.*never downloads"):
        create_model("resnet18", weights_path=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="does not match the model"):
        create_model("resnet18", num_classes=10, weights_path=path)
    small = create_model("resnet18", small_input=True)
    assert load_weights(small, path, strict=False) == ["conv1.weight"]
    torch.testing.assert_close(small.layer3[1].conv2.weight, tv.layer3[1].conv2.weight, rtol=0, atol=0)


def test_load_weights_wrapped_and_prefixed(tmp_path) -> None:
    src = create_model("mobilenetv2")
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}, "epoch": 3}, path)
    dst = create_model("mobilenetv2")
    assert load_weights(dst, path) == []
    torch.testing.assert_close(dst.layers[5].conv2.weight, src.layers[5].conv2.weight, rtol=0, atol=0)
    other = create_model("mobilenetv2", num_classes=3)
    assert load_weights(other, path, strict=False) == ["fc.weight", "fc.bias"]


def test_alexnet_bn_loads_cbp_key_names() -> None:
    src = built("alexnet_bn", num_classes=10).eval()
    cbp_sd = {k.replace("fc.", "classifier.6.", 1) if k.startswith("fc.") else k: v
              for k, v in src.state_dict().items()}
    assert {"classifier.6.weight", "features.0.weight", "classifier.4.running_var"} <= set(cbp_sd)
    dst = built("alexnet_bn", num_classes=10).eval()
    with torch.no_grad():
        for p in dst.parameters():
            p.add_(1.0)
    dst.load_state_dict(cbp_sd, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------------- slot placement oracles
@pytest.mark.parametrize("act_position", ["post_relu", "pre_relu"])
def test_resnet18_slot_placement_oracle(act_position: str) -> None:
    """post_relu = ClimbQ quant_BasicBlock (conv-BN-ReLU-Q, conv-BN-Q, add, ReLU); pre_relu: Q before ReLU."""
    model = quantize_model(create_model("resnet18", act_position=act_position), activation=Shift).eval()
    pre = act_position == "pre_relu"

    def bn_relu_q(x, bn):
        return F.relu(bn(x) - 0.5) if pre else F.relu(bn(x)) - 0.5

    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = model.maxpool(bn_relu_q(model.conv1(x), model.bn1))
        for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
            for b in layer:
                idn = h
                if b.downsample is not None:
                    idn = b.downsample[1](b.downsample[0](h)) - (0.5 if pre else 0.0)
                out = bn_relu_q(b.conv1(h), b.bn1)
                out = b.bn2(b.conv2(out)) - 0.5
                h = F.relu(out + idn)
        expected = model.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    assert n_slots(model) == (20 if pre else 17)


@pytest.mark.parametrize("act_position", ["post_relu", "pre_relu"])
def test_resnet50_bottleneck_slot_placement_oracle(act_position: str) -> None:
    """ClimbQ quant_Bottleneck: Q after ReLU of conv1/2, after bn3 before the add; downsample unquantized."""
    model = quantize_model(create_model("resnet50", act_position=act_position), activation=Shift).eval()
    pre = act_position == "pre_relu"
    b = model.layer2[0]
    x = torch.randn(2, 256, 6, 6)

    def bn_relu_q(t, bn):
        return F.relu(bn(t) - 0.5) if pre else F.relu(bn(t)) - 0.5

    with torch.no_grad():
        out = bn_relu_q(b.conv2(bn_relu_q(b.conv1(x), b.bn1)), b.bn2)
        out = b.bn3(b.conv3(out)) - 0.5
        idn = b.downsample[1](b.downsample[0](x)) - (0.5 if pre else 0.0)
        torch.testing.assert_close(b(x), F.relu(out + idn), rtol=1e-5, atol=1e-5)
    assert n_slots(model) == (53 if pre else 49)


@pytest.mark.parametrize("act_position", ["pre_relu", "post_relu"])
def test_mobilenetv2_slot_placement_oracle(act_position: str) -> None:
    """ClimbQ's original block (``model/mobilenetV2.py``): expand-BN-Q-ReLU6, depthwise-BN-Q-ReLU6,
    project-BN-Q, + ReLU(BN(conv1x1 x))."""
    model = quantize_model(create_model("mobilenetv2", act_position=act_position), activation=Shift).eval()
    pre = act_position == "pre_relu"
    b = model.layers[1]  # 16 -> 24, stride 1: has the climbq conv shortcut
    x = torch.randn(2, 16, 5, 5)

    def bn_q_relu6(t, bn):
        return F.relu6(bn(t) - 0.5) if pre else F.relu6(bn(t)) - 0.5

    with torch.no_grad():
        out = bn_q_relu6(b.conv2(bn_q_relu6(b.conv1(x), b.bn1)), b.bn2)
        out = b.bn3(b.conv3(out)) - 0.5
        sc = F.relu(b.shortcut[1](b.shortcut[0](x)))
        torch.testing.assert_close(b(x), out + sc, rtol=1e-5, atol=1e-5)
        y = torch.randn(2, 3, 8, 8)
        stem = F.relu(model.bn1(model.conv1(y)) - 0.5) if pre else F.relu(model.bn1(model.conv1(y))) - 0.5
        feat = model.layers(stem)
        head = model.bn2(model.conv2(feat))
        head = F.relu(head - 0.5) if pre else F.relu(head) - 0.5
        torch.testing.assert_close(model.forward_features(y), head.mean(dim=(2, 3)), rtol=1e-5, atol=1e-5)
    assert n_slots(model) == 2 + 3 * 17


def test_alexnet_bn_slot_placement_oracle() -> None:
    for act_position in ("post_relu", "pre_relu"):
        model = quantize_model(built("alexnet_bn", num_classes=10, act_position=act_position),
                               activation=Shift).eval()
        pre = act_position == "pre_relu"
        x = torch.randn(2, 3, 8, 8)
        with torch.no_grad():
            h = x
            for layer in model.features:
                if isinstance(layer, ReLUAct):
                    h = F.relu(h - 0.5) if pre else F.relu(h) - 0.5
                else:
                    h = layer(h)
            h = model.avgpool(h).flatten(1)
            c = model.classifier
            for lin, bn in ((c[0], c[1]), (c[3], c[4])):
                h = bn(lin(h))
                h = F.relu(h - 0.5) if pre else F.relu(h) - 0.5
            torch.testing.assert_close(model.forward_features(x), h, rtol=1e-5, atol=1e-5)
        assert n_slots(model) == 7


# ----------------------------------------------------------------------------------- quantize_model
@pytest.mark.parametrize(
    ("name", "kwargs", "first", "slots"),
    [
        ("mobilenetv2", {}, "conv1", 53),
        ("resnet18", {"num_classes": 10}, "conv1", 17),
        ("resnet50", {"num_classes": 10, "act_position": "pre_relu"}, "conv1", 53),
        ("alexnet_bn", {"num_classes": 10}, "features.0", 7),
        ("resnet20", {}, "conv0", 21),
    ],
)
def test_quantize_model_on_every_model(name: str, kwargs: dict, first: str, slots: int) -> None:
    model = built(name, **kwargs).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        fp = model(x)
    quantize_model(model, weight=lambda layer: DoReFaWeight(2), activation=lambda: ClippedActivation(2),
                   skip="first_last")
    slots_ = [s for s in model.modules() if isinstance(s, ActSlot)]
    filled = [s for s in slots_ if isinstance(s.quantizer, ClippedActivation)]
    assert len(filled) == n_slots(model) == slots
    assert type(model.get_submodule(first)) is nn.Conv2d
    assert type(model.fc) is nn.Linear
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    quantized = [n for n, m in layers if isinstance(m, QuantConv2d | QuantLinear)]
    assert sorted(quantized) == sorted(n for n, _ in layers if n not in (first, "fc"))
    with torch.no_grad():
        assert not torch.allclose(model(x), fp, atol=1e-3)  # 2-bit weights and activations change the output
    if name == "alexnet_bn":  # 54M quantized weights: skip the (slow) backward, the plumbing is the same
        return
    out = model.train()(x)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert all(model.get_submodule(n).weight.grad is not None for n in quantized)


def test_vgg_small_param_count_and_shapes() -> None:
    """VGG-Small (LQ-Nets, DGMS's CIFAR-10 net): 6 convs 128-128-256-256-512-512 + BN + Linear(8192, 10)."""
    m = create_model("vgg_small", num_classes=10)
    convs = 3 * 128 * 9 + 128 * 128 * 9 + 128 * 256 * 9 + 256 * 256 * 9 + 256 * 512 * 9 + 512 * 512 * 9
    bns = 2 * (128 + 128 + 256 + 256 + 512 + 512)
    assert sum(p.numel() for p in m.parameters()) == convs + bns + 512 * 16 * 10 + 10 == 4_660_106
    m.eval()
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    small = create_model("vgg_small", num_classes=10, in_channels=1, width=0.125).eval()
    assert small(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    with pytest.raises(ValueError, match="at least 8x8"):
        small(torch.randn(1, 1, 4, 4))
    with pytest.raises(ValueError, match="width"):
        create_model("vgg_small", width=0)
    with pytest.raises(TypeError, match="num_classes must be an int"):
        create_model("vgg_small", num_classes=2.5)
