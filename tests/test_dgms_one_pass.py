"""DGMS's soft assignment of all layers in one pass (the chunked torch path a GPU runs, one autograd node
and one loop for the whole model instead of one per layer): the per-layer values and gradients."""

import copy

import pytest
import torch
import torch.nn.functional as F

from paperlib import dgms
from paperlib.models import create_model
from paperlib.quant.core import one_pass_enabled, set_one_pass, weight_groups


def pair(dtype, **kwargs):
    torch.manual_seed(0)
    a = dgms.quantize_dgms(create_model("resnet20", num_classes=10, in_channels=1, shortcut="A"), 16,
                           impl="fused", **kwargs).to(dtype)
    b = copy.deepcopy(a)
    set_one_pass(b, False)
    return a.train(), b.train()


def step_grads(model, x, y):
    out = model(x)
    F.cross_entropy(out, y).backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("logits", dgms.LOGITS)
@pytest.mark.parametrize("kwargs", [{}, {"learn_tau": False}, {"guards": False}, {"chunk_elements": 1 << 12}])
def test_one_pass_equals_per_layer_in_float64(logits, kwargs):
    a, b = pair(torch.float64, logits=logits, **kwargs)
    assert one_pass_enabled(a) and [len(v) for v in weight_groups(a).values()] == [18]
    x, y = torch.randn(8, 1, 8, 8, dtype=torch.float64), torch.arange(8) % 10
    out_a, ga = step_grads(a, x, y)
    out_b, gb = step_grads(b, x, y)
    torch.testing.assert_close(out_a, out_b, rtol=1e-12, atol=1e-12)
    assert ga.keys() == gb.keys()
    for name in gb:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-9, atol=1e-12 * gb[name].abs().max().item(), msg=name)
    hits = [(m.guard_hits, n.guard_hits) for m, n in zip(a.modules(), b.modules(), strict=True)
            if isinstance(m, dgms.DGMSWeight)]
    assert hits and all(torch.equal(u, v) for u, v in hits)


def test_one_pass_float32_is_as_accurate_as_per_layer():
    """Against the float64 step, the one-pass float32 gradients are about as close as the per-layer ones."""
    a64, _ = pair(torch.float64)
    a32, b32 = pair(torch.float32)
    x, y = torch.randn(8, 1, 8, 8, dtype=torch.float64), torch.arange(8) % 10
    _, g64 = step_grads(a64, x, y)
    _, ga = step_grads(a32, x.float(), y)
    _, gb = step_grads(b32, x.float(), y)
    for name, ref in g64.items():
        scale = ref.abs().max().item()
        err_a = (ga[name].double() - ref).abs().max().item() / scale
        err_b = (gb[name].double() - ref).abs().max().item() / scale
        assert err_a <= 4 * err_b + 1e-5, (name, err_a, err_b)


def test_what_stays_per_layer():
    a, _ = pair(torch.float32)
    a.eval()  # the hard assignment (eval) is per layer
    assert not weight_groups(a)
    for m in a.modules():
        if isinstance(m, dgms.DGMSWeight):
            m.eval_mode = "soft"  # soft eval (BN in eval mode) is the soft assignment: grouped again
    assert [len(v) for v in weight_groups(a).values()] == [18]
    torch.manual_seed(0)
    auto = dgms.quantize_dgms(create_model("resnet20", num_classes=10, in_channels=1, shortcut="A"), 16).train()
    if dgms.native_status()["available"]:  # on CPU the native kernel runs per layer
        assert not weight_groups(auto)
