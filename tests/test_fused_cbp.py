"""The fast CBP step against straightforward reference implementations kept in this file.

The arithmetic projection (:func:`paperlib.cbp._project_factors`), the arithmetic constraint
(:func:`paperlib.cbp._cs_fast`) and the fused step (:class:`paperlib.cbp._FusedStep`, used by
``CBP.criterion``) must give bit-identical values and gradients to the bucketize/gather definitions below
(the original code's projection and constraint, module.py; docs/cbp.md, 'Forward: projection with a
straight-through backward' and 'Constraint function and windows'), including on the measure-zero points
(levels, medians, window edges, -0.0).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import paperlib.cbp as cbp_mod
from paperlib.cbp import CBP, MODES, CBPWeight, constraint, levels, project
from paperlib.models import create_model

torch.set_num_threads(1)
GS = [1, 2, 3, 7, 10, 20, math.inf]


# ------------------------------------------------------------------------------------- reference definitions
def ref_nearest(w: Tensor, q: Tensor) -> Tensor:
    """Nearest level, saturating (original code: module.py); a weight exactly on a median maps to the median."""
    m = (q[1:] + q[:-1]) / 2
    c = torch.bucketize(w, m)  # medians strictly below w
    cm = c.clamp(max=m.numel() - 1)
    return torch.where(m[cm] == w, m[cm], q[c])


def ref_cs_slope(w: Tensor, q: Tensor, g: float) -> tuple[Tensor, Tensor]:
    """Paper Eqs. 8-10 by interval look-up: cs and dcs/dw (±2 or 0)."""
    r = 1.0 - 1.0 / g
    n = q.numel()
    k = torch.bucketize(w, q, right=True)
    below, above = k == 0, k == n
    j = (k - 1).clamp(0, n - 2)
    lo, hi = q[j], q[j + 1]
    half = r * (hi - lo) / 2
    lower = w < lo + half
    window = ~lower & (w < hi - half)
    y = 2 * torch.minimum(w - lo, hi - w)
    cs = torch.where(below, 2 * (q[0] - w), torch.where(above, 2 * (w - q[-1]),
                                                         torch.where(window, torch.zeros_like(w), y)))
    slope = torch.where(below, -2.0, torch.where(above, 2.0, torch.where(window, 0.0, torch.where(lower, 2.0, -2.0))))
    return cs, slope.to(w.dtype)


class RefProject(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, q):
        return ref_nearest(w, q)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class RefConstraint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, q, g):
        cs, slope = ref_cs_slope(u, q, g)
        ctx.save_for_backward(slope)
        return cs

    @staticmethod
    def backward(ctx, grad):
        (slope,) = ctx.saved_tensors
        return grad * slope, None, None


class RefQuant(nn.Module):
    def __init__(self, quantizer: CBPWeight) -> None:
        super().__init__()
        self.q = quantizer.levels().detach().clone()

    def forward(self, w):
        return RefProject.apply(w, self.q.to(w))


def ref_criterion(ctl: CBP, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """CE of the projected model + Σ λ·s·cs(w/s; F, g) over all constrained weights (flat, as CBP.penalty)."""
    layers = [m for m in model.modules() if isinstance(getattr(m, "weight_quantizer", None), RefQuant)]
    loss = F.cross_entropy(model(x), y)
    if ctl.config.variant == "ste":
        return loss
    ws = [m.weight for m in layers]
    s = torch.cat([m.weight_quantizer.q[-1].expand(w.numel()) / MODES[ctl.config.mode][-1]
                   for m, w in zip(layers, ws, strict=True)])
    lam = torch.cat([lam.reshape(-1) for lam in ctl.lambdas])
    fac = torch.tensor(MODES[ctl.config.mode])
    w = torch.cat([w.reshape(-1) for w in ws])
    return loss + ((lam * s) * RefConstraint.apply(w / s, fac, ctl.g_effective)).sum()


def special_points(q: Tensor, g: float) -> Tensor:
    """Levels, medians, window edges (and their float neighbours), zeros of both signs, far outside."""
    pts = [q, (q[1:] + q[:-1]) / 2, torch.tensor([0.0, -0.0, 1e-30, -1e-30], dtype=q.dtype)]
    if math.isfinite(g):
        r = 1.0 - 1.0 / g
        half = r * (q[1:] - q[:-1]) / 2
        pts += [q[:-1] + half, q[1:] - half]
    base = torch.cat(pts)
    inf = torch.tensor(math.inf, dtype=q.dtype)
    near = torch.cat([base, torch.nextafter(base, inf), torch.nextafter(base, -inf)])
    out = torch.tensor([1.5, 3.0], dtype=q.dtype)
    return torch.cat([near, q[0] * out, q[-1] * out])


def weights(q: Tensor, g: float, n: int = 4000, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    span = float(q[-1] - q[0])
    rnd = (torch.rand(n, generator=gen, dtype=torch.float64) * 1.6 - 0.8) * span
    return torch.cat([rnd.to(q.dtype), special_points(q, g)])


def assert_bits(a: Tensor, b: Tensor) -> None:
    """Equal values (``-0.0 == 0.0``) and the same NaN pattern."""
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(a, b), f"max diff {(a - b).abs().max().item()} at {(a != b).nonzero()[:5].flatten().tolist()}"


# ------------------------------------------------------------------------------------------- projection
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("scale", [1.0, 0.5, 0.0371, 3.3e-3, 0.7])
def test_projection_bit_identical_to_reference(mode, scale, dtype):
    quant = CBPWeight(mode, scale)
    q = quant.levels().to(dtype)
    w = weights(q, 2)
    w = w[: w.numel() // 6 * 6].reshape(-1, 2, 3)  # any weight shape
    fast = quant(w)  # _project_factors, 0-dim scale
    assert_bits(fast, ref_nearest(w, q))
    assert_bits(fast, project(w, q))
    quant.fast = False
    assert_bits(quant(w), fast)


@pytest.mark.parametrize("mode", list(MODES))
def test_flat_projection_with_per_element_scales(mode):
    scales = [0.0371, 0.5, 1.7e-2]
    parts = [weights(levels(mode, s), 10, n=500, seed=i) for i, s in enumerate(scales)]
    w = torch.cat(parts)
    s = torch.cat([torch.tensor(sc).expand(p.numel()) for sc, p in zip(scales, parts, strict=True)])
    medians, half_steps, centre = cbp_mod._factor_constants(mode, w.dtype, w.device)
    fast = cbp_mod._project_factors(w, s, medians, half_steps, centre)
    ref = torch.cat([ref_nearest(p, levels(mode, sc)) for sc, p in zip(scales, parts, strict=True)])
    assert_bits(fast, ref)
    cached = cbp_mod._project_factors(w, s, medians, half_steps, centre, medians * s.reshape(1, -1))
    assert_bits(cached, ref)


def test_projection_is_straight_through():
    quant = CBPWeight("ter", 0.3)
    w = torch.randn(50, dtype=torch.float64, requires_grad=True)
    gout = torch.randn(50, dtype=torch.float64)
    quant(w).backward(gout)
    assert torch.equal(w.grad, gout)


# ------------------------------------------------------------------------------------------- constraint
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("g", GS)
@pytest.mark.parametrize("mode", list(MODES))
def test_constraint_bit_identical_in_units_of_s(mode, g, dtype):
    q = torch.tensor(MODES[mode], dtype=dtype)
    u = weights(q, g)
    plan = cbp_mod._cs_plan(q, 1.0 - 1.0 / g)
    assert plan is not None  # the factor sets take the fast path
    cs, slope = cbp_mod._cs_fast(u, plan)
    cs_ref, slope_ref = ref_cs_slope(u, q, g)
    assert_bits(cs, cs_ref)
    assert_bits(slope, slope_ref)
    cs_only, none = cbp_mod._cs_fast(u, plan, slope=False)
    assert none is None
    assert_bits(cs_only, cs_ref)


@pytest.mark.parametrize("g", GS)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("scale", [0.5, 0.0371, 0.7])
def test_constraint_bit_identical_in_weight_units(mode, g, scale):
    """``constraint(w, s·F, g)`` (public): the fast path where it is exact, else the reference; same bits."""
    q = levels(mode, scale)
    w = weights(q, g).requires_grad_()
    cs = constraint(w, q, g)
    cs_ref, slope_ref = ref_cs_slope(w.detach(), q, g)
    assert_bits(cs.detach(), cs_ref)
    gout = torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    cs.backward(gout)
    assert_bits(w.grad, gout * slope_ref)


def test_inexact_levels_fall_back_to_reference():
    q = torch.tensor([-0.7, 0.1, 0.3000001, 0.9])  # arbitrary levels: fast or not, the bits must match
    for g in GS:
        w = weights(q, g)
        cs, slope = cbp_mod._constraint_and_slope(w, q, 1.0 - 1.0 / g)
        cs_ref, slope_ref = ref_cs_slope(w, q, g)
        assert_bits(cs, cs_ref)
        assert_bits(slope, slope_ref)
    odd = torch.tensor([-1.0, 1e-8, 1.0])  # the step 1 + 1e-8 is not exact in float32
    assert cbp_mod._cs_plan(odd, 0.5) is None
    for mode in ("bin", "ter"):  # s·F of equal steps: the fast path in weight units too
        assert cbp_mod._cs_plan(levels(mode, 0.0371), 0.5) is not None


def test_constraint_gradcheck_float64_away_from_kinks():
    q = levels("2bit", 0.37, dtype=torch.float64)
    w = weights(q, 3, n=300, seed=5)[:300].clone()
    pts = torch.cat([q, (q[1:] + q[:-1]) / 2, q[:-1] + (2 / 3) * (q[1:] - q[:-1]) / 2,
                     q[1:] - (2 / 3) * (q[1:] - q[:-1]) / 2])
    far = (w[:, None] - pts[None]).abs().min(1).values > 1e-4
    w = w[far].requires_grad_()
    assert torch.autograd.gradcheck(lambda v: constraint(v, q, 3).sum(), (w,), eps=1e-7, atol=1e-6)


# ------------------------------------------------------------------------------------------- the CBP step
def _model(shortcut: str = "B") -> nn.Module:
    torch.manual_seed(0)
    return create_model("resnet20", num_classes=10, in_channels=3, shortcut=shortcut)


def _batches(n: int, size: int = 8):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 3, size, size, generator=gen), torch.randint(0, 10, (16,), generator=gen))
            for _ in range(n)]


def _controller(mode: str, variant: str, fused: bool) -> tuple[nn.Module, CBP]:
    model = _model()
    ctl = CBP(model, mode, variant=variant, lr_lambda=0.05, p_max=2, fused=fused)
    ctl.start()
    ctl.g = 3
    ctl.update_lambda()  # λ > 0 on the violated weights at g = 3
    return model, ctl


@pytest.mark.parametrize("variant", ["cbp", "no_window", "ste"])
@pytest.mark.parametrize("mode", list(MODES))
def test_fused_step_matches_reference_step(mode, variant):
    """Loss, L_sum and every gradient of ``CBP.criterion`` (fused and layer by layer) = the reference."""
    x, y = _batches(1)[0]
    results = []
    for fused in (True, False):
        model, ctl = _controller(mode, variant, fused)
        loss = ctl.criterion(model, x, y)
        loss.backward()
        results.append((loss.detach(), ctl._l_sum, [p.grad for p in model.parameters()]))
    model, ctl = _controller(mode, variant, True)
    for layer in ctl.layers.values():
        layer.weight_quantizer = RefQuant(layer.weight_quantizer)
    ref_loss = ref_criterion(ctl, model, x, y)
    ref_loss.backward()
    for loss, l_sum, grads in results:
        assert_bits(loss, ref_loss.detach())
        assert_bits(l_sum, ref_loss.detach().double())
        for g, p in zip(grads, model.parameters(), strict=True):
            assert_bits(g, p.grad)


def _step(ctl, model, opt, x, y) -> Tensor:
    """One CBP training step as ``fit`` runs it: criterion, backward, after_backward, SGD step, after_step."""
    loss = ctl.criterion(model, x, y)
    opt.zero_grad()
    loss.backward()
    ctl.after_backward()
    opt.step()
    ctl.after_step()
    return loss


def _train(mode: str, variant: str, fused: bool, reference: bool, monkeypatch, device: str = "cpu") -> list[Tensor]:
    model = _model().to(device)
    ctl = CBP(model, mode, variant=variant, lr_lambda=0.05, p_max=2, fused=fused)
    opt = torch.optim.SGD(ctl.param_groups(), lr=0.05, momentum=0.9)
    if reference:  # the bucketize/gather paths everywhere (the code before the speed-up)
        for layer in ctl.layers.values():
            layer.weight_quantizer.fast = False
        monkeypatch.setattr(cbp_mod, "_cs_plan", lambda *a, **k: None)
    ctl.on_train_start(model, opt)
    out = []
    for i, (x, y) in enumerate(_batches(6)):
        out.append(_step(ctl, model, opt, x.to(device), y.to(device)).detach())
        if i % 2 == 1:
            out.append(torch.tensor(ctl.end_of_epoch()["loss_sum"]))
            out.append(torch.tensor(list(ctl.metrics().values())))
    monkeypatch.undo()
    out += [p.detach().clone() for p in model.parameters()] + [lam.clone() for lam in ctl.lambdas]
    return [t.cpu() for t in out]


@pytest.mark.parametrize(("mode", "variant"), [("ter", "cbp"), ("2bit", "cbp"), ("bin", "no_window"),
                                               ("1bit", "ste")])
def test_training_trajectory_unchanged(mode, variant, monkeypatch):
    """Six steps with three periods (events, λ steps, metrics): fused, layer-by-layer and the reference
    (bucketize) paths end in the very same weights, λ, losses and metrics."""
    ref = _train(mode, variant, False, True, monkeypatch)
    for fused in (True, False):
        got = _train(mode, variant, fused, False, monkeypatch)
        assert len(got) == len(ref)
        for a, b in zip(got, ref, strict=True):
            assert_bits(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", list(MODES))
def test_training_trajectory_unchanged_on_cuda(mode, monkeypatch):
    """The same on the GPU (deterministic cuDNN, so that only our ops could differ)."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    ref = _train(mode, "cbp", False, True, monkeypatch, "cuda")
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    got = _train(mode, "cbp", True, False, monkeypatch, "cuda")
    for a, b in zip(got, ref, strict=True):
        assert_bits(a, b)


def test_fused_step_leaves_no_projection_behind_and_follows_the_weights():
    model, ctl = _controller("ter", "cbp", True)
    x, y = _batches(1)[0]
    ctl.criterion(model, x, y).backward()
    assert all(layer.weight_quantizer._pre is None for layer in ctl.layers.values())
    layer = next(iter(ctl.layers.values()))
    with torch.no_grad():
        layer.weight.mul_(0.5)
    assert_bits(layer.weight_quantizer(layer.weight), ref_nearest(layer.weight, layer.weight_quantizer.levels()))

    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    model.fc = Boom()
    with pytest.raises(RuntimeError, match="boom"):
        ctl.criterion(model, x, y)
    assert all(layer.weight_quantizer._pre is None for layer in ctl.layers.values())


def test_fused_step_through_a_wrapper_and_with_a_foreign_model():
    model, ctl = _controller("ter", "cbp", True)
    x, y = _batches(1)[0]

    class Wrapper(nn.Module):  # as DDP: .module is the model
        def __init__(self, m):
            super().__init__()
            self.module = m

        def forward(self, x):
            return self.module(x)

    loss_wrapped = ctl.criterion(Wrapper(model), x, y)
    other = copy.deepcopy(model)
    loss_other = ctl.criterion(other, x, y)  # not the controller's model: the layer-by-layer path
    loss_plain = ctl.criterion(model, x, y)
    assert_bits(loss_wrapped, loss_plain)
    assert_bits(loss_other, loss_plain)


def test_no_host_sync_in_the_fused_step(monkeypatch):
    """After the first step (which builds the cached constants), a step never reads a tensor on the host."""
    model, ctl = _controller("2bit", "cbp", True)
    opt = torch.optim.SGD(ctl.param_groups(), lr=0.01)
    batches = _batches(3)

    def step(x, y):
        _step(ctl, model, opt, x, y)

    step(*batches[0])

    def sync(*args, **kwargs):
        raise AssertionError("host sync in the CBP step")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    for x, y in batches[1:]:
        step(x, y)
    monkeypatch.undo()
    assert ctl._batches == 3


def test_after_step_clamps_every_constrained_weight():
    model, ctl = _controller("bin", "cbp", True)
    with torch.no_grad():
        for w in ctl._weights():
            w.mul_(200)
    expect = [w.detach().clamp(-1, 1) for w in ctl._weights()]
    ctl.after_step()
    for w, e in zip(ctl._weights(), expect, strict=True):
        assert_bits(w.detach(), e)
