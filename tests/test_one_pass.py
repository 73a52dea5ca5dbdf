"""One-pass weight quantization of a whole model (paperlib.quant.core): the values and gradients are those
of the per-layer quantizers; the hook survives copies and is off when asked; stale results are never used."""

import copy
import io

import pytest
import torch
from helpers import assert_same_step
from torch import nn

from paperlib import climbq as C
from paperlib.lifequant import quant as LQ
from paperlib.models import create_model
from paperlib.quant import core
from paperlib.quant.core import (
    QuantConv2d,
    one_pass_enabled,
    quantize_model,
    quantize_weights_in_one_pass,
    set_one_pass,
    weight_groups,
)


class CountingQuantizer(nn.Module):
    """sign(w) * mean|w| with counters: per-layer calls and group calls (a test double with a group_key)."""

    calls = {"layer": 0, "group": 0}

    def __init__(self, key="k") -> None:
        super().__init__()
        self.key = key

    def forward(self, w):
        CountingQuantizer.calls["layer"] += 1
        return torch.sign(w) * w.abs().mean()

    def group_key(self, w):
        return self.key

    @staticmethod
    def quantize_group(ws, quantizers):
        CountingQuantizer.calls["group"] += 1
        return [torch.sign(w) * w.abs().mean() for w in ws]


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(64, 3))


def reset():
    CountingQuantizer.calls.update(layer=0, group=0)


def test_one_call_per_group_and_the_same_outputs():
    model = quantize_model(small_net(), weight=lambda _: CountingQuantizer())
    ref = quantize_model(small_net(), weight=lambda _: CountingQuantizer(), one_pass=False)
    assert one_pass_enabled(model) and not one_pass_enabled(ref)
    x = torch.randn(2, 1, 8, 8)
    reset()
    out = model(x)
    assert CountingQuantizer.calls == {"layer": 0, "group": 1}
    reset()
    assert torch.equal(out, ref(x))
    assert CountingQuantizer.calls == {"layer": 3, "group": 0}
    # groups split by key; a group of one is quantized by its layer
    model[4].weight_quantizer.key = "other"
    assert [len(v) for v in weight_groups(model).values()] == [2]
    reset()
    model(x)
    assert CountingQuantizer.calls == {"layer": 1, "group": 1}


def test_results_are_used_once_and_never_stale():
    model = quantize_model(small_net(), weight=lambda _: CountingQuantizer())
    conv = model[0]
    x = torch.randn(2, 1, 8, 8)
    model(x)
    assert not any(core._GROUPED in m.__dict__ for m in model.modules())  # nothing left after a forward
    assert quantize_weights_in_one_pass(model) == 3
    with torch.no_grad():
        conv.weight.mul_(3)  # changed after the pass: the layer must quantize the new weight itself
    reset()
    assert torch.equal(conv.quantized_weight(), torch.sign(conv.weight) * conv.weight.abs().mean())
    assert CountingQuantizer.calls["layer"] == 1
    quantize_weights_in_one_pass(model)
    with torch.no_grad():  # another grad mode than the pass's: recomputed too
        reset()
        conv.quantized_weight()
        assert CountingQuantizer.calls["layer"] == 1


def test_a_failing_forward_leaves_nothing_behind():
    model = quantize_model(small_net(), weight=lambda _: CountingQuantizer())
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 3, 8, 8))  # wrong channel count
    assert not any(core._GROUPED in m.__dict__ for m in model.modules())


def test_copies_keep_the_setting_and_switching_off_is_local():
    model = quantize_model(small_net(), weight=lambda _: CountingQuantizer())
    twin = copy.deepcopy(model)
    assert one_pass_enabled(twin)
    set_one_pass(twin, False)
    assert one_pass_enabled(model) and not one_pass_enabled(twin)
    x = torch.randn(2, 1, 8, 8)
    reset()
    twin(x)
    assert CountingQuantizer.calls == {"layer": 3, "group": 0}
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert one_pass_enabled(loaded)
    set_one_pass(model, True)  # idempotent: still one pre-hook
    assert sum(h is core._one_pass_pre_hook for h in model._forward_pre_hooks.values()) == 1


def _climbq_resnet(one_pass: bool, native):
    torch.manual_seed(0)
    m = create_model("resnet20", num_classes=10, in_channels=1, act_position="pre_relu")
    return quantize_model(m, weight=lambda _: C.ClimbQWeight(4, native=native),
                          activation=lambda: C.ClimbQActivation(4, native=native), skip=[], one_pass=one_pass)


@pytest.mark.parametrize("native", [None, False])
def test_climbq_resnet_one_pass_equals_per_layer(native):
    a, b = _climbq_resnet(True, native), _climbq_resnet(False, native)
    assert len(next(iter(weight_groups(a).values()))) == len(core.quantized_layers(a)) == 22
    x, y = torch.randn(16, 1, 8, 8), torch.arange(16) % 10
    for m in (a, b):
        C.set_sigma(m, C.batch_sigma(y, 10))
    assert_same_step(a, b, x, y)


@pytest.mark.parametrize("native", [None, False])
def test_lifequant_resnet_one_pass_equals_per_layer(native):
    torch.manual_seed(0)
    a = LQ.quantize_lifequant(create_model("resnet20", num_classes=10, in_channels=1), 4, 4, native=native)
    b = copy.deepcopy(a)
    set_one_pass(b, False)
    groups = weight_groups(a)
    assert [len(v) for v in groups.values()] == [21]  # every conv (the linear classifier stays FP)
    assert_same_step(a, b, torch.randn(8, 1, 8, 8), torch.arange(8) % 10)


def test_layers_of_different_dtypes_form_different_groups():
    model = quantize_model(small_net(), weight=lambda _: C.ClimbQWeight(4))
    model[4].double()
    keys = [k for k in weight_groups(model)]
    assert len(keys) == 1 and keys[0][1][1] == torch.float32  # the float64 layer is alone: per layer
    assert isinstance(model[0], QuantConv2d)


def test_no_hook_for_quantizers_that_cannot_group():
    from paperlib.quant import DoReFaWeight

    model = quantize_model(small_net(), weight=lambda _: DoReFaWeight(4))
    assert not one_pass_enabled(model) and not model._forward_pre_hooks
    quantize_model(model, weight=lambda _: CountingQuantizer())  # replaced by groupable ones: the hook comes
    assert one_pass_enabled(model)
