"""The fused ClimbQ / LifeQuant quantizers and the fused ProxQ penalty against straightforward
references kept here: the original float ops on the plain autograd path (transcribed from the original code:
``model/quantization.py`` of ClimbQ and LifeQuant, the penalty from LifeQuant's ``utils/lifelong.py``).

Forward values must be bit-identical, gradients equal to the reference's within 1e-5 (float32) or tightly in
float64, the penalty within 1e-6 relative.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_same_step
from torch import Tensor, nn

from paperlib import climbq as C
from paperlib.lifequant import prox as P
from paperlib.lifequant import quant as LQ
from paperlib.models import ResNetCifar
from paperlib.quant import quantize_model

# --------------------------------------------------------------------------------------------- references


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


def _uniform(u: Tensor, bits: int) -> Tensor:
    n = 2**bits - 1
    return _RoundSTE.apply(u * n) / n


def _cdf(x, loc, scale):
    return 0.5 * (1 + torch.erf((x - loc) * scale.reciprocal() / math.sqrt(2)))


def ref_climbq_weight(w: Tensor, bits: int) -> Tensor:
    return _uniform(_cdf(w, w.mean(), w.std()), bits) * 2 - 1


def ref_climbq_act(x: Tensor, bits: int, sigma, act_range: float = 2.0) -> Tensor:
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).detach()
    if s.ndim == 1 and x.ndim > 1:
        s = s.reshape(-1, *([1] * (x.ndim - 1)))
    return (_uniform(_cdf(x, 0.0, s), bits) * 2 - 1) * act_range


class _QkSTE(torch.autograd.Function):
    """LifeQuant's ``Q_k``: ``round(x n) / n`` forward, identity backward (one node, as the original)."""

    @staticmethod
    def forward(ctx, x, bits):
        n = 2**bits - 1
        return torch.round(x * n) / n

    @staticmethod
    def backward(ctx, g):
        return g, None


def ref_lq_weight(w: Tensor, bits: int, std: float = 0.5) -> Tensor:
    return _QkSTE.apply((w - w.mean()) / w.std() * std, bits)


def ref_lq_act(x: Tensor, bits: int) -> Tensor:
    inside = (x >= 0) & (x <= 1)
    return _QkSTE.apply(torch.where(inside, x, x.detach().clamp(0, 1)), bits)


def ref_prox(model: nn.Module, old: dict, imp: dict, lam: float) -> Tensor:
    total = None
    for n, p in model.named_parameters():
        if n in imp:
            term = (imp[n] * (p - old[n]).square()).sum()
            total = term if total is None else total + term
    return lam * total


def _grad(fn, x: Tensor, g: Tensor) -> Tensor:
    x = x.detach().clone().requires_grad_()
    (fn(x) * g).sum().backward()
    return x.grad


def _near_boundaries(bits: int, scale: float, dtype: torch.dtype) -> Tensor:
    """Inputs whose CDF value sits on (and a few ulps around) every rounding boundary ``(k + 1/2)/n``."""
    n = 2**bits - 1
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    x0 = (scale * math.sqrt(2) * torch.erfinv(2 * u - 1)).to(dtype)
    xs = [x0]
    for direction in (math.inf, -math.inf):
        x = x0
        for _ in range(4):
            x = torch.nextafter(x, torch.tensor(direction, dtype=dtype))
            xs.append(x)
    return torch.cat(xs)


# --------------------------------------------------------------------------------------------- ClimbQ


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_climbq_weight_fused_is_bit_identical_with_the_same_gradient(dtype, bits):
    gen = torch.Generator().manual_seed(bits)
    for shape in [(8,), (16, 3, 3, 3), (64, 32, 3, 3), (10, 64)]:
        w = (torch.randn(shape, generator=gen, dtype=dtype) * 0.05 + 0.01)
        assert torch.equal(C.quantize_weight(w, bits, native=False), ref_climbq_weight(w, bits))
        assert torch.equal(C.quantize_weight(w, bits, fused=False), ref_climbq_weight(w, bits))
        g = torch.randn(shape, generator=gen, dtype=dtype)
        got = _grad(lambda v: C.quantize_weight(v, bits), w, g)
        want = _grad(lambda v: ref_climbq_weight(v, bits), w, g)
        tol = 1e-5 if dtype == torch.float32 else 1e-11
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())
        with torch.no_grad():  # no-grad path: same values
            assert torch.equal(C.quantize_weight(w.requires_grad_(), bits, native=False), ref_climbq_weight(w, bits))


def test_climbq_weight_fused_gradient_matches_the_oracle_in_float64():
    w = torch.tensor([-0.30, -0.12, -0.05, 0.0, 0.02, 0.07, 0.15, 0.40], dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(  # smooth part only: the analytic backward equals autograd of 2 Phi(a) - 1
        lambda v: C._ClimbQWeightFn.apply(v, 15), (w,), eps=1e-6, atol=1e-4, raise_exception=False)
    g = torch.linspace(-1, 1, 8, dtype=torch.float64)
    got = _grad(lambda v: C.quantize_weight(v, 4), w, g)
    smooth = _grad(lambda v: 2 * _cdf(v, v.mean(), v.std()) - 1, w, g)  # STE: the same gradient
    torch.testing.assert_close(got, smooth, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("act_range", [2.0, 1.0, 0.5, 3.0])
def test_climbq_activation_fused_is_bit_identical_with_the_same_gradient(dtype, bits, act_range):
    gen = torch.Generator().manual_seed(bits)
    y = torch.randint(0, 10, (16,), generator=gen)
    sigmas = [C.batch_sigma(y, 10), 2.0, 1.0, C.batch_sigma(y, 10).double()]
    x = torch.randn(16, 4, 5, 5, generator=gen, dtype=dtype) * 3
    x[0, 0, 0, :] = torch.tensor([0.0, -0.0, 40.0, -40.0, 1e-30], dtype=dtype)
    edge = _near_boundaries(bits, 2.0, dtype)
    x.view(-1)[16 : 16 + edge.numel()] = edge[: x.numel() - 16]
    g = torch.randn(x.shape, generator=gen, dtype=dtype)
    for sigma in sigmas:
        want = ref_climbq_act(x, bits, sigma, act_range)
        got = C.quantize_activation(x, bits, sigma, act_range, native=False)
        assert torch.equal(got, want), (sigma, act_range)
        assert got.unique().numel() == 2**bits or bits > 6  # every level is reached
        gw = _grad(lambda v, s=sigma: ref_climbq_act(v, bits, s, act_range), x, g)
        gf = _grad(lambda v, s=sigma: C.quantize_activation(v, bits, s, act_range, native=False), x, g)
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(gf, gw, rtol=tol, atol=tol * gw.abs().max().item())


def test_climbq_activation_tail_is_exact_for_every_level():
    """The fused tail computes ``(U/n·2 - 1)·R`` as ``U/(n/(2R)) - R`` for R = 2^e: equal for every level."""
    for dtype in (torch.float32, torch.float64):
        for bits in range(2, 9):
            n = 2**bits - 1
            for r in (2.0, 1.0, 0.5, 4.0, 0.25):
                k = torch.arange(n + 1, dtype=dtype).repeat(37)  # vector body and scalar tail of the kernels
                want = (k / n * 2 - 1) * r
                got = k.clone().div_(C._c(n / (2 * r), k)).sub_(C._c(r, k))
                assert torch.equal(got, want), (dtype, bits, r)
            # and the head: (1 + e)·(n/2) == 0.5·(1 + e)·n for any e in [-1, 1], boundaries included
            e = torch.cat([torch.linspace(-1, 1, 200_001, dtype=dtype), (2 * torch.arange(n + 1) / n - 1).to(dtype)])
            e = torch.cat([e, torch.nextafter(e, torch.ones_like(e)), torch.nextafter(e, -torch.ones_like(e))])
            assert torch.equal((e + 1).mul_(C._c(n / 2, e)), 0.5 * (1 + e) * n), (dtype, bits)


def test_scalar_constants_act_like_python_scalars():
    x = torch.randn(100_003) * 50
    for v in (math.sqrt(2), 7.5, 127.5, 3.75, 1.0, 2.0, -0.5, 0.125 * 15):
        assert torch.equal(x / v, x.clone().div_(C._c(v, x)))
        assert torch.equal(x * v, x.clone().mul_(C._c(v, x)))
        assert torch.equal(x + v, x.clone().add_(C._c(v, x)))
        assert torch.equal(x - v, x.clone().sub_(C._c(v, x)))
        xd = x.double()
        assert torch.equal(xd / v, xd.clone().div_(C._c(v, xd)))


def test_climbq_modules_and_model_fused_equal_reference_path():
    torch.manual_seed(0)
    model = quantize_model(ResNetCifar(8, num_classes=3, in_channels=1, act_position="pre_relu"),
                           weight=lambda _: C.ClimbQWeight(4, native=False),
                           activation=lambda: C.ClimbQActivation(4, native=False), skip=[])
    ref = quantize_model(ResNetCifar(8, num_classes=3, in_channels=1, act_position="pre_relu"),
                         weight=lambda _: C.ClimbQWeight(4, fused=False),
                         activation=lambda: C.ClimbQActivation(4, fused=False), skip=[])
    ref.load_state_dict(model.state_dict())
    assert "fused=False" in repr(ref) and "fused" not in repr(model) and "native=False" in repr(model)
    x, y = torch.randn(12, 1, 8, 8), torch.tensor([0, 0, 0, 1, 1, 2] * 2)
    for m in (model, ref):
        C.set_sigma(m, C.batch_sigma(y, 3))
    assert_same_step(model, ref, x, y, rtol=1e-4, atol=1e-6)
    model.eval()
    ref.eval()
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


def test_climbq_other_dtypes_take_the_reference_path():
    x = torch.randn(4, 3, 2, 2).to(torch.bfloat16)
    assert torch.equal(C.quantize_activation(x, 4, 2.0), C.quantize_activation(x, 4, 2.0, fused=False))
    w = torch.randn(8, 3, 3, 3).half()
    assert torch.equal(C.quantize_weight(w.float(), 4).half(), C.quantize_weight(w.float(), 4, fused=False).half())


def test_climbq_reciprocal_cache_follows_the_sigma():
    x = torch.randn(4, 2, 3, 3)
    s = torch.tensor([1.5, 2.0, 1.9, 1.7])
    a = C.quantize_activation(x, 4, s)
    assert torch.equal(a, ref_climbq_act(x, 4, s))
    s.fill_(1.0)  # in place: a new version, so a new reciprocal
    assert torch.equal(C.quantize_activation(x, 4, s), ref_climbq_act(x, 4, s))
    assert torch.equal(C.quantize_activation(x, 4, 2.0), ref_climbq_act(x, 4, 2.0))
    assert torch.equal(C.quantize_activation(x, 4, 3), ref_climbq_act(x, 4, 3.0))
    with pytest.raises(ValueError, match="set_sigma"):
        C.quantize_activation(torch.randn(5, 2, 3, 3), 4, torch.full((4,), 2.0))  # stale batch size


def test_double_backward_is_refused_clearly_and_the_reference_path_allows_it():
    x = torch.randn(6, requires_grad=True)
    w = torch.randn(4, 3, requires_grad=True)
    model, old, imp = _prox_setup()
    for fn in (lambda: C.quantize_activation(x, 4), lambda: C.quantize_weight(w, 4),
               lambda: LQ.quantize_activation(x, 4), lambda: LQ.quantize_weight(w, 4),
               lambda: P.prox_penalty(model, old, imp)):
        with pytest.raises(RuntimeError, match="differentiable once"):
            torch.autograd.grad(fn().sum(), [t for t in (x, w, *model.parameters()) if t.requires_grad],
                                create_graph=True, allow_unused=True)
    (g,) = torch.autograd.grad(C.quantize_activation(x, 4, fused=False).sum(), x, create_graph=True)
    g.sum().backward()


def test_batch_sigma_checks_labels_cheaply_with_the_same_message():
    y = torch.tensor([0, 0, 0, 1])
    torch.testing.assert_close(C.batch_sigma(y, 10), torch.tensor([1.7, 1.7, 1.7, 1.9]))
    for mode in ("batch_freq", "none", "prior"):
        for bad, rng in ((torch.tensor([0, 3, 1]), r"\[0, 3\]"), (torch.tensor([-1, 2]), r"\[-1, 2\]")):
            with pytest.raises(ValueError, match=r"labels must be in \[0, 3\), got " + rng):
                C.batch_sigma(bad, 3, mode, counts=[5, 4, 3])
    # validate=False skips the extra reduction where the result does not depend on it
    torch.testing.assert_close(C.batch_sigma(torch.tensor([5, 7]), 3, "none", validate=False), torch.full((2,), 2.0))
    with pytest.raises(ValueError, match="labels must be in"):  # batch_freq still checks (it is free there)
        C.batch_sigma(torch.tensor([0, 3]), 3, validate=False)
    y = torch.randint(0, 10, (128,), dtype=torch.int32)
    b = torch.bincount(y.long(), minlength=10).float()
    p = b[y.long()] / 128
    assert torch.equal(C.batch_sigma(y, 10), 2 - p / p.sum())


# --------------------------------------------------------------------------------------------- LifeQuant


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("std", [0.5, 0.125, 0.3])
def test_lifequant_weight_fused_is_bit_identical_with_the_same_gradient(dtype, bits, std):
    gen = torch.Generator().manual_seed(bits)
    for shape in [(6,), (16, 3, 3, 3), (64, 32, 3, 3)]:
        w = torch.randn(shape, generator=gen, dtype=dtype) * 0.05
        want = ref_lq_weight(w, bits, std)
        assert torch.equal(LQ.quantize_weight(w, bits, std=std, native=False), want)
        assert torch.equal(LQ.quantize_weight(w, bits, std=std, fused=False), want)
        with torch.no_grad():
            assert torch.equal(LQ.quantize_weight(w.clone().requires_grad_(), bits, std=std, native=False), want)
        g = torch.randn(shape, generator=gen, dtype=dtype)
        got = _grad(lambda v: LQ.quantize_weight(v, bits, std=std), w, g)
        ref = _grad(lambda v: ref_lq_weight(v, bits, std), w, g)
        tol = 1e-5 if dtype == torch.float32 else 1e-11
        torch.testing.assert_close(got, ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_lifequant_weight_reference_vector_gradient_with_the_fused_path():
    """Reference vector: the gradient computed with the original code's ``weight_quantize_fn`` (LifeQuant,
    ``model/quantization.py``) at 4 bits for L = sum(c_i q_i), c = 1..6, float32."""
    w = torch.tensor([-1.0, -0.3, 0.0, 0.2, 0.45, 1.1], requires_grad=True)
    (LQ.quantize_weight(w, 4) * torch.arange(1.0, 7.0)).sum().backward()
    expected = [0.19378996, -0.37562108, -0.21629882, 0.12520742, 0.37562132, -0.10269809]
    torch.testing.assert_close(w.grad, torch.tensor(expected), rtol=0, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_lifequant_clamp_activation_fused_is_bit_identical_with_identical_gradient(dtype, bits):
    gen = torch.Generator().manual_seed(bits)
    tiny = torch.finfo(dtype).tiny
    special = torch.tensor([0.0, -0.0, 1.0, -tiny, tiny, -tiny * 2**-20, tiny * 2**-20, 1 - 2**-20, 0.5,
                            1 / 30, -0.5, 1.2, math.inf, -math.inf], dtype=dtype)
    special = torch.cat([special, torch.nextafter(torch.tensor([1.0, 0.0], dtype=dtype),
                                                  torch.tensor([2.0, -1.0], dtype=dtype))])
    x = torch.cat([special, torch.rand(997, generator=gen, dtype=dtype) * 1.6 - 0.3])
    x = torch.cat([x, x.flip(0)[:35]])  # vector body and scalar tail
    want = ref_lq_act(x, bits)
    assert torch.equal(LQ.quantize_activation(x, bits), want)
    assert torch.equal(LQ.quantize_activation(x, bits, fused=False), want)
    g = torch.randn(x.shape, generator=gen, dtype=dtype)
    got, want_g = _grad(lambda v: LQ.quantize_activation(v, bits), x, g), _grad(lambda v: ref_lq_act(v, bits), x, g)
    assert torch.equal(got, want_g)
    gx = _grad(lambda v: LQ.quantize_activation(v, bits), x, torch.ones_like(x))
    # both endpoints and -0.0 pass the gradient (as the original code's clamp does)
    assert gx[:3].tolist() == [1.0, 1.0, 1.0]
    assert gx[3].item() == 0 and gx[5].item() == 0  # a negative (even subnormal) input does not


def test_lifequant_model_fused_equals_reference_path():
    torch.manual_seed(0)
    model = LQ.quantize_lifequant(ResNetCifar(8, num_classes=3, in_channels=1), 4, 4, native=False)
    ref = LQ.quantize_lifequant(ResNetCifar(8, num_classes=3, in_channels=1), 4, 4, fused=False)
    ref.load_state_dict(model.state_dict())
    assert_same_step(model, ref, torch.randn(10, 1, 8, 8), torch.randint(0, 3, (10,)), rtol=1e-4, atol=1e-6)


def test_lifequant_unfused_variants_unchanged():
    w = torch.randn(16, 3, 3, 3)
    x = torch.randn(4, 5) * 2
    assert torch.equal(LQ.quantize_weight(w, 4, clip=True), LQ.quantize_weight(w, 4, clip=True, fused=False))
    assert torch.equal(LQ.quantize_weight(w, 1), LQ.quantize_weight(w, 1, fused=False))
    assert torch.equal(LQ.quantize_activation(x, 1), LQ.quantize_activation(x, 1, fused=False))
    assert "fused=False" in repr(LQ.LifeQuantActivation(4, fused=False))


# --------------------------------------------------------------------------------------------- ProxQ penalty


def _prox_setup(seed=0, zero=()):
    torch.manual_seed(seed)
    model = LQ.quantize_lifequant(ResNetCifar(8, num_classes=3, in_channels=1), 4, 4)
    old = P.snapshot(model)
    imp = {k: torch.rand_like(v) for k, v in old.items()}
    for k in zero:
        imp[k].zero_()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model, old, imp


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("lam", [100.0, 1.0, 0.0])
def test_prox_fused_equals_the_loop(lam):
    model, old, imp = _prox_setup(zero=("fc.bias", "conv0.weight"))
    want = ref_prox(model, old, imp, lam)
    ref_g = _grads(model, want)
    for _ in range(2):  # the second call hits the cached plan
        got = P.prox_penalty(model, old, imp, lam)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        got_g = _grads(model, got)
        for n, g in ref_g.items():
            assert got_g[n] is not None, n  # zero-importance parameters still get a (zero) gradient
            torch.testing.assert_close(got_g[n], g, rtol=1e-5, atol=1e-7 * max(1.0, lam), msg=n)
    assert torch.equal(_grads(model, P.prox_penalty(model, old, imp, lam))["fc.bias"], torch.zeros(3))
    torch.testing.assert_close(P.prox_penalty(model, old, imp, lam, fused=False), want, rtol=1e-6, atol=0)


def test_prox_cache_follows_changes_to_the_tensors():
    model, old, imp = _prox_setup()
    P.prox_penalty(model, old, imp)
    imp["blocks.0.conv0.weight"].mul_(3)  # in place
    torch.testing.assert_close(P.prox_penalty(model, old, imp), ref_prox(model, old, imp, 100.0), rtol=1e-6, atol=0)
    old["fc.weight"] = old["fc.weight"] + 1  # replaced
    torch.testing.assert_close(P.prox_penalty(model, old, imp), ref_prox(model, old, imp, 100.0), rtol=1e-6, atol=0)
    with torch.no_grad():
        model.fc.weight.add_(1)  # the parameter moves every step: no rebuild needed, the value follows
    torch.testing.assert_close(P.prox_penalty(model, old, imp), ref_prox(model, old, imp, 100.0), rtol=1e-6, atol=0)
    for k in imp:
        imp[k].zero_()
    pen = P.prox_penalty(model, old, imp)
    assert pen.item() == 0 and pen.requires_grad
    assert all(g is not None and not g.any() for g in _grads(model, pen).values())


def test_prox_plan_does_not_keep_the_tensors_alive():
    import gc
    import weakref

    model, old, imp = _prox_setup()
    P.prox_penalty(model, old, imp)
    plan = P._PROX_PLANS[0]
    probe = weakref.ref(old["fc.weight"])
    del old, imp
    gc.collect()
    assert probe() is None and not plan.alive()
    model2, old2, imp2 = _prox_setup(seed=1)  # the next miss drops the dead plan
    P.prox_penalty(model2, old2, imp2)
    assert plan not in P._PROX_PLANS and len(P._PROX_PLANS) <= P._PROX_PLANS_MAX


def test_prox_errors_and_fallbacks():
    model, old, imp = _prox_setup()
    with pytest.raises(ValueError, match="not parameters of the model"):
        P.prox_penalty(model, old, {**imp, "nope": torch.zeros(1)})
    with pytest.raises(ValueError, match="old_params has no entry"):
        P.prox_penalty(model, {k: v for k, v in old.items() if k != "fc.bias"}, imp)
    with pytest.raises(ValueError, match="same architecture"):
        P.prox_penalty(model, old, {**imp, "fc.bias": torch.zeros(4)})
    assert P.prox_penalty(model, old, {}).item() == 0
    # importance that requires grad: the loop runs and the gradient reaches it
    f = imp["fc.bias"].clone().requires_grad_()
    P.prox_penalty(model, old, {"fc.bias": f}).backward()
    assert f.grad is not None and f.grad.abs().sum() > 0


def test_prox_with_a_parameter_the_loss_does_not_use():
    lin = nn.Linear(2, 2)
    old = P.snapshot(lin)
    imp = {"weight": torch.ones(2, 2), "bias": torch.zeros(2)}
    with torch.no_grad():
        lin.weight.add_(1.0)
    pen = P.prox_penalty(lin, old, imp, lam=2.0)
    assert pen.item() == pytest.approx(2.0 * 4)
    pen.backward()
    torch.testing.assert_close(lin.weight.grad, torch.full((2, 2), 4.0))
    assert lin.bias.grad is not None and not lin.bias.grad.any()  # defined, as with the loop
