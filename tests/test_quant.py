"""Quantization plumbing and the uniform/LSQ baselines, against hand-computed values."""

import math

import pytest
import torch
from torch import nn

from paperlib.models import create_model
from paperlib.quant import (
    ActSlot,
    ClippedActivation,
    DoReFaWeight,
    LSQActivation,
    LSQWeight,
    QuantConv2d,
    QuantLinear,
    clipped_activation,
    dorefa_weight,
    lsq_quantize,
    quantize_model,
    round_ste,
    uniform_quantize,
)


def test_round_ste_is_half_to_even_with_identity_gradient():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, 0.49], requires_grad=True)
    y = round_ste(x)
    assert y.tolist() == [0.0, 2.0, 2.0, -0.0, 0.0]
    y.sum().backward()
    assert x.grad.tolist() == [1.0] * 5


def test_uniform_quantize_levels():
    u = torch.linspace(0, 1, 101)
    assert torch.unique(uniform_quantize(u, 2)).tolist() == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert len(torch.unique(uniform_quantize(u, 4))) == 16


def test_dorefa_weight_values_and_gradient():
    w = torch.tensor([-1.0, -0.5, 0.0, 0.2, 1.0], requires_grad=True)
    q = dorefa_weight(w, 2)
    # u = tanh(w)/(2 max|tanh|) + 1/2 = [0, .1966, .5, .6296, 1]; 3u rounds (half to even) to [0, 1, 2, 2, 3]
    assert q.tolist() == pytest.approx([-1, -1 / 3, 1 / 3, 1 / 3, 1])
    q.sum().backward()
    t = torch.tanh(w.detach())
    assert w.grad.tolist() == pytest.approx(((1 - t**2) / t.abs().max()).tolist(), rel=1e-6)


def test_dorefa_weight_one_bit_and_full_precision():
    w = torch.tensor([-2.0, 0.5, 1.5])
    assert dorefa_weight(w, 1).tolist() == pytest.approx([-4 / 3, 4 / 3, 4 / 3])
    assert torch.equal(dorefa_weight(w, 32), w)
    with pytest.raises(ValueError, match="bits=0"):
        DoReFaWeight(0)
    with pytest.raises(TypeError, match="int"):
        DoReFaWeight(4.0)


def test_clipped_activation_values_and_gradient():
    x = torch.tensor([-0.5, 0.1, 0.2, 0.5, 0.9, 1.5], requires_grad=True)
    q = clipped_activation(x, 2)
    assert q.tolist() == pytest.approx([0, 0, 1 / 3, 2 / 3, 1, 1])
    q.sum().backward()
    assert x.grad.tolist() == [0, 1, 1, 1, 1, 0]


def test_lsq_values_and_step_gradient():
    v = torch.tensor([-1.1, -0.3, 0.05, 0.4, 2.0])
    step = torch.tensor(0.25, requires_grad=True)
    q = lsq_quantize(v, step, 3, signed=True)  # Q_N = 4, Q_P = 3
    assert q.tolist() == pytest.approx([-1.0, -0.25, 0.0, 0.5, 0.75])
    q.sum().backward()
    # LSQ Eq. 3: -Q_N, -v/s + round(v/s), ..., Q_P; times g = 1/sqrt(N Q_P)
    assert step.grad.item() == pytest.approx((-4 + 0.2 - 0.2 + 0.4 + 3) / math.sqrt(5 * 3), rel=1e-5)


def test_lsq_modules_initialise_step():
    w = torch.randn(64, 16, 3, 3)
    mod = LSQWeight(4, w)
    assert mod.step.item() == pytest.approx(2 * w.abs().mean().item() / math.sqrt(7), rel=1e-5)
    act = LSQActivation(4).train()
    x = torch.rand(8, 16)
    act(x)
    assert bool(act.initialized) and act.step.item() == pytest.approx(2 * x.mean().item() / math.sqrt(15), rel=1e-5)
    q = act(x)
    assert len(torch.unique(q)) <= 16 and q.min() >= 0


def _count(model, cls):
    return sum(isinstance(m, cls) for m in model.modules())


@pytest.mark.parametrize("act_position, slots", [("pre_relu", 21), ("post_relu", 19)])
def test_quantize_model_swaps_layers_and_fills_slots(act_position, slots):
    model = create_model("resnet20", num_classes=10, shortcut="B", act_position=act_position)
    assert _count(model, ActSlot) == slots
    n_conv = _count(model, nn.Conv2d)
    quantize_model(model, weight=lambda _: DoReFaWeight(4), activation=lambda: ClippedActivation(4),
                   skip="first_last")
    assert type(model.conv0) is nn.Conv2d and type(model.fc) is nn.Linear
    assert _count(model, QuantConv2d) == n_conv - 1 and _count(model, QuantLinear) == 0
    assert all(isinstance(m.quantizer, ClippedActivation) for m in model.modules() if isinstance(m, ActSlot))
    out = model(torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 10)


def test_quantized_model_keeps_latent_weights_and_state_dict_keys():
    torch.manual_seed(0)
    fp = create_model("resnet20", num_classes=10, in_channels=1).eval()
    q = create_model("resnet20", num_classes=10, in_channels=1).eval()
    quantize_model(q, weight=lambda _: DoReFaWeight(32), activation=lambda: ClippedActivation(32))
    q.load_state_dict(fp.state_dict())  # same keys: FP checkpoints load into quantized models
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(q(x), fp(x))  # 32 bits is the identity
    quantize_model(q, weight=lambda _: DoReFaWeight(2))  # re-quantizing replaces quantizers, keeps weights
    assert torch.equal(q.blocks[0].conv0.weight, fp.blocks[0].conv0.weight)
    assert len(torch.unique(q.blocks[0].conv0.quantized_weight())) <= 4


def test_quantize_model_rejects_unknown_skip():
    model = create_model("resnet20")
    with pytest.raises(ValueError, match="not Conv2d/Linear"):
        quantize_model(model, weight=lambda _: DoReFaWeight(4), skip=["nope"])
    with pytest.raises(ValueError, match="first_last"):
        quantize_model(model, weight=lambda _: DoReFaWeight(4), skip="first")


def test_resnet_cifar_shortcut_a_has_no_shortcut_params_and_runs_small_inputs():
    a = create_model("resnet20", shortcut="A")
    b = create_model("resnet20", shortcut="B")
    assert sum(p.numel() for p in b.parameters()) - sum(p.numel() for p in a.parameters()) == 2752
    for size in (8, 16, 32):
        assert a(torch.randn(2, 3, size, size)).shape == (2, 10)
    with pytest.raises(ValueError, match="6n\\+2"):
        create_model("resnet20").__class__(depth=21)


def test_bits_accept_any_integer_type_but_bool_or_float():
    """numpy integers (e.g. from a pandas sweep) are bit-widths; True and 4.0 are refused with a clear error."""
    import numpy as np

    from paperlib.climbq import quantize_activation
    from paperlib.lifequant.quant import quantize_weight as lq_weight
    from paperlib.quant.uniform import check_bits

    x = torch.randn(64)
    assert torch.equal(quantize_activation(x, np.int64(4)), quantize_activation(x, 4))
    assert torch.equal(lq_weight(x, np.int32(3)), lq_weight(x, 3))
    assert type(check_bits(np.int16(8))) is int
    for bad in (True, 4.0, "4"):
        with pytest.raises(TypeError, match="bits must be an int"):
            check_bits(bad)
        with pytest.raises(TypeError, match="bits must be an int"):
            quantize_activation(x, bad)
