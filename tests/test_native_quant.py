"""The native CPU kernels of the standardising quantizers (paperlib.quant.native).

Oracles kept here: ClimbQ's levels computed in float64 with scipy's ``ndtr`` (so the *exact* level of each value,
which the kernel must match bit for bit, thresholds included), LifeQuant's ops in torch with the kernel's
statistics (torch's own ``w.mean()``/``w.std()``, as the original code), and the torch paths of paperlib
(``native=False``): the kernels may differ from those only where the torch erf's approximation puts a value on
the other side of a ClimbQ level boundary (LifeQuant: never), and gradients agree to rounding.
"""

import copy
import math

import numpy as np
import pytest
import torch
from scipy.special import ndtr, ndtri

from paperlib import climbq as C
from paperlib.lifequant import quant as LQ
from paperlib.quant import native as N

pytestmark = pytest.mark.skipif(not N.native_status()["available"],
                                reason=f"native kernel unavailable: {N.native_status()['error']}")
DTYPES = [torch.float32, torch.float64]


def kernel_stats(w):
    """Mean and unbiased std as the kernel takes them: torch's ``w.mean()`` and ``w.std()`` (the original's)."""
    return w.detach().mean(), w.detach().std()


def exact_levels(a, n):
    """round(n Phi(a)) for the dtype values ``a``, in float64 (exact away from ties at 1e-12)."""
    return torch.from_numpy(np.round(n * ndtr(a.detach().double().numpy()))).to(a.dtype)


def exact_climbq_weight(w, bits):
    n = 2**bits - 1
    mean, std = kernel_stats(w)
    a = (w.detach() - mean) * std.reciprocal()
    return exact_levels(a, n) / (n / 2) - 1


def exact_climbq_act(x, bits, rec, act_range):
    n = 2**bits - 1
    a = x.detach() * rec
    idx = exact_levels(a, n)
    if math.frexp(act_range)[0] == 0.5:
        return idx / (n / (2 * act_range)) - act_range
    return (idx / (n / 2) - 1) * act_range


def boundary_distance(a, n):
    """|n Phi(a) - (k + 1/2)| for the nearest k: how close each value is to a level boundary."""
    u = n * ndtr(a.detach().double().numpy())
    return torch.from_numpy(np.abs(u - np.floor(u) - 0.5))


def grad_of(fn, x, g):
    x = x.detach().clone().requires_grad_()
    (fn(x) * g).sum().backward()
    return x.grad


# --------------------------------------------------------------------------------------------- thresholds


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_float32_thresholds_are_the_exact_ones_rounded_up(bits):
    n = 2**bits - 1
    exact = ndtri((np.arange(n) + 0.5) / n)
    t = N._thresholds(n, torch.float32).numpy()
    assert (t.astype(np.float64) >= exact).all()
    below = np.nextafter(t, np.float32(-np.inf)).astype(np.float64)
    assert (below < exact).all()  # the smallest float32 at or above each threshold


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_activation_levels_switch_exactly_at_the_thresholds(dtype, bits):
    """With sigma = 1 the kernel compares x itself: x = t_i is level i + 1, the float below it level i."""
    n = 2**bits - 1
    t = N._thresholds(n, dtype)
    x = torch.cat([t, torch.nextafter(t, torch.tensor(-math.inf, dtype=dtype))])
    got = C.quantize_activation(x, bits, 1.0, 1.0, native=True)
    idx = torch.cat([torch.arange(1, n + 1), torch.arange(n)]).to(dtype)
    assert torch.equal(got, idx / (n / 2) - 1)


# --------------------------------------------------------------------------------------------- ClimbQ


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_climbq_weight_native_is_exact(dtype, bits):
    gen = torch.Generator().manual_seed(bits)
    for shape in [(8,), (16, 3, 3, 3), (64, 32, 3, 3), (10, 64), (5000,)]:
        w = torch.randn(shape, generator=gen, dtype=dtype) * 0.05 + 0.01
        got = C.quantize_weight(w, bits, native=True)
        assert torch.equal(got, exact_climbq_weight(w, bits))
        torch_path = C.quantize_weight(w, bits, native=False)
        differ = got != torch_path  # only next to a boundary, by one level
        a = (w - kernel_stats(w)[0]) / kernel_stats(w)[1]
        assert (boundary_distance(a[differ], 2**bits - 1) < 1e-5).all()
        assert ((got - torch_path)[differ].abs() <= 2 / (2**bits - 1) * (1 + 1e-6)).all()
        with torch.no_grad():
            assert torch.equal(C.quantize_weight(w.clone().requires_grad_(), bits, native=True), got)


@pytest.mark.parametrize("dtype", DTYPES)
def test_climbq_weight_native_gradient_matches_the_torch_path(dtype):
    gen = torch.Generator().manual_seed(0)
    tol = 1e-5 if dtype == torch.float32 else 1e-11
    for shape in [(8,), (16, 3, 3, 3), (64, 32, 3, 3), (9000,)]:
        w = torch.randn(shape, generator=gen, dtype=dtype) * 0.05
        g = torch.randn(shape, generator=gen, dtype=dtype)
        got = grad_of(lambda v: C.quantize_weight(v, 4, native=True), w, g)
        want = grad_of(lambda v: C.quantize_weight(v, 4, native=False), w, g)
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())


def test_climbq_weight_native_gradcheck_float64():
    """The kernel's backward is the gradient of the smooth 2 Phi((w - mean) / std) - 1 (straight-through)."""
    w = torch.randn(40, dtype=torch.float64) * 0.1
    g = torch.randn(40, dtype=torch.float64)
    got = grad_of(lambda v: C.quantize_weight(v, 4, native=True), w, g)
    smooth = grad_of(lambda v: 2 * torch.special.ndtr((v - v.mean()) / v.std()) - 1, w, g)
    torch.testing.assert_close(got, smooth, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("act_range", [2.0, 1.0, 3.0])
def test_climbq_activation_native_is_exact_with_per_sample_sigma(dtype, bits, act_range):
    gen = torch.Generator().manual_seed(bits)
    y = torch.randint(0, 10, (16,), generator=gen)
    x = torch.randn(16, 4, 5, 5, generator=gen, dtype=dtype) * 3
    x[0, 0, 0, :] = torch.tensor([0.0, -0.0, 40.0, -40.0, 1e-30], dtype=dtype)
    g = torch.randn(x.shape, generator=gen, dtype=dtype)
    for sigma in [C.batch_sigma(y, 10), 2.0, 1.0, C.batch_sigma(y, 10).double()]:
        rec = C._per_sample(sigma, x).reciprocal()
        got = C.quantize_activation(x, bits, sigma, act_range, native=True)
        assert torch.equal(got, exact_climbq_act(x, bits, rec, act_range)), sigma
        want = C.quantize_activation(x, bits, sigma, act_range, native=False)
        differ = got != want
        assert (boundary_distance((x * rec)[differ], 2**bits - 1) < 1e-5).all()
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        gn = grad_of(lambda v, s=sigma: C.quantize_activation(v, bits, s, act_range, native=True), x, g)
        gt = grad_of(lambda v, s=sigma: C.quantize_activation(v, bits, s, act_range, native=False), x, g)
        torch.testing.assert_close(gn, gt, rtol=tol, atol=tol * gt.abs().max().item())


def test_nan_and_infinities_are_kept():
    x = torch.tensor([math.nan, math.inf, -math.inf, 0.5])
    got = C.quantize_activation(x, 4, 2.0, native=True)
    assert math.isnan(got[0]) and got[1] == 2.0 and got[2] == -2.0
    w = torch.randn(10)
    w[3] = math.nan
    assert C.quantize_weight(w, 4, native=True).isnan().all()  # a NaN weight makes mean and std NaN
    assert C.quantize_weight(w, 4, native=False).isnan().all()


def test_results_do_not_depend_on_the_thread_count():
    gen = torch.Generator().manual_seed(1)
    ws = [torch.randn(s, generator=gen) * 0.1 for s in [(64, 64, 3, 3), (16, 3, 3, 3), (20000,)]]
    gs = [torch.randn(w.shape, generator=gen) for w in ws]
    x = torch.randn(64, 16, 8, 8, generator=gen)
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            ps = [w.clone().requires_grad_() for w in ws]
            outs = C.quantize_weights(ps, 4, native=True) + LQ.quantize_weights(ps, 4, native=True)
            torch.autograd.backward(outs, gs + gs)
            xa = x.clone().requires_grad_()
            ya = C.quantize_activation(xa, 4, C.batch_sigma(torch.arange(64) % 10, 10), native=True)
            ya.backward(x)
            results.append([o.detach() for o in outs] + [p.grad for p in ps] + [ya.detach(), xa.grad])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))


@pytest.mark.parametrize("native", [True, False])
def test_climbq_weights_in_one_call_equal_one_by_one(native):
    gen = torch.Generator().manual_seed(2)
    ws = [(torch.randn(s, generator=gen) * 0.1).requires_grad_() for s in [(16, 3, 3, 3), (32, 16, 3, 3), (10, 64)]]
    gs = [torch.randn(w.shape, generator=gen) for w in ws]
    one = [C.quantize_weight(w, 3, native=native) for w in ws]
    torch.autograd.backward(one, gs)
    g_one = [w.grad.clone() for w in ws]
    for w in ws:
        w.grad = None
    many = C.quantize_weights(ws, 3, native=native)
    torch.autograd.backward(many, gs)
    assert all(torch.equal(a, b) for a, b in zip(one, many, strict=True))
    for a, w in zip(g_one, ws, strict=True):
        torch.testing.assert_close(w.grad, a, rtol=1e-6, atol=1e-9)
    # a tensor whose output the loss does not use gets a zero gradient, the others theirs
    for w in ws:
        w.grad = None
    out = C.quantize_weights(ws, 3, native=native)
    (out[0] * gs[0]).sum().backward()
    assert ws[1].grad is None or torch.equal(ws[1].grad, torch.zeros_like(ws[1]))
    torch.testing.assert_close(ws[0].grad, g_one[0], rtol=1e-6, atol=1e-9)


# --------------------------------------------------------------------------------------------- LifeQuant


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("std", [0.5, 0.125, 0.3])
def test_lifequant_weight_native_equals_the_torch_ops_on_its_statistics(dtype, bits, std):
    gen = torch.Generator().manual_seed(bits)
    n = 2**bits - 1
    for shape in [(6,), (16, 3, 3, 3), (64, 32, 3, 3), (7000,)]:
        w = torch.randn(shape, generator=gen, dtype=dtype) * 0.05
        mean, sd = kernel_stats(w)
        z = (w - mean) / sd
        want = (z * (std * n) if math.frexp(std)[0] == 0.5 else z * std * n).round() / n
        assert torch.equal(LQ.quantize_weight(w, bits, std=std, native=True), want)
        g = torch.randn(shape, generator=gen, dtype=dtype)
        got = grad_of(lambda v: LQ.quantize_weight(v, bits, std=std, native=True), w, g)
        ref = grad_of(lambda v: LQ.quantize_weight(v, bits, std=std, native=False), w, g)
        tol = 1e-5 if dtype == torch.float32 else 1e-11
        torch.testing.assert_close(got, ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_lifequant_weights_in_one_call_and_their_errors():
    ws = [torch.randn(8, 4, 3, 3, requires_grad=True), torch.randn(12, 8, requires_grad=True)]
    many = LQ.quantize_weights(ws, 4)
    assert all(torch.equal(a, LQ.quantize_weight(w, 4)) for a, w in zip(many, ws, strict=True))
    gs = [torch.randn_like(w) for w in ws]
    torch.autograd.backward([LQ.quantize_weight(w, 4, native=False) for w in ws], gs)
    one = [w.grad.clone() for w in ws]
    for w in ws:
        w.grad = None
    flat = LQ.quantize_weights(ws, 4, native=False)  # the torch path on one buffer: the per-tensor bits
    assert all(torch.equal(a, LQ.quantize_weight(w, 4, native=False)) for a, w in zip(flat, ws, strict=True))
    torch.autograd.backward(flat, gs)
    assert all(torch.equal(a, w.grad) for a, w in zip(one, ws, strict=True))
    with pytest.raises(ValueError, match="2 <= k <= 8"):
        LQ.quantize_weights(ws, 1)
    with pytest.raises(ValueError, match="at least 2"):
        LQ.quantize_weights([torch.ones(1)], 4)


# --------------------------------------------------------------------------------------------- choice and fallback


def test_native_choice_and_clear_errors(monkeypatch):
    x = torch.randn(4, 3, 2, 2)
    with pytest.raises(RuntimeError, match="native=True cannot run here"):
        C.quantize_activation(x.to(torch.bfloat16), 4, native=True)
    with pytest.raises(ValueError, match="fused=False"):
        C.quantize_weight(torch.randn(8), 4, fused=False, native=True)
    with pytest.raises(ValueError, match="fused=True"):
        C.ClimbQActivation(4, fused=False, native=True)
    # a non-contiguous input takes the torch path under native=None
    xt = torch.randn(2, 3, 4, 5).transpose(1, 3)
    assert torch.equal(C.quantize_activation(xt, 4, 2.0), C.quantize_activation(xt, 4, 2.0, native=False))
    # without the kernel, None is the torch path and True says why it cannot run
    monkeypatch.setattr(N, "_state", {"lib": None, "error": "disabled for this test"})
    assert N.native_status() == {"available": False, "path": None, "error": "disabled for this test"}
    w = torch.randn(16, 3, 3, 3)
    assert torch.equal(C.quantize_weight(w, 4), C.quantize_weight(w, 4, native=False))
    with pytest.raises(RuntimeError, match="disabled for this test"):
        C.quantize_weight(w, 4, native=True)
    assert LQ.LifeQuantWeight(4).group_key(w) is not None  # the torch path groups too (one flat buffer)
    assert LQ.LifeQuantWeight(4, clip=True).group_key(w) is None


def test_double_backward_is_refused():
    for fn in (lambda v: C.quantize_weight(v, 4, native=True), lambda v: C.quantize_activation(v, 4, native=True),
               lambda v: LQ.quantize_weight(v, 4, native=True)):
        v = torch.randn(6, 5, requires_grad=True)
        with pytest.raises(RuntimeError, match="differentiable once"):
            torch.autograd.grad(fn(v).sum(), v, create_graph=True)


def test_modules_repr_and_copy():
    q = C.ClimbQWeight(4, native=False)
    assert "native=False" in repr(q) and "native" not in repr(C.ClimbQWeight(4))
    assert copy.deepcopy(C.ClimbQActivation(4, native=True)).native is True
    assert "native=True" in repr(LQ.LifeQuantWeight(4, native=True))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_zero_takes_the_upper_middle_level_as_round_half_to_even_does(bits):
    """Phi(0) n = n/2 is a tie (n odd): torch.round gives the even (n + 1)/2, as does the kernel's a >= t."""
    n = 2**bits - 1
    x = torch.tensor([0.0, -0.0])
    want = torch.full((2,), (n + 1) / 2) / (n / 2) - 1
    for native in (True, False):
        assert torch.equal(C.quantize_activation(x, bits, 2.0, 1.0, native=native), want)
    w = torch.tensor([-1.0, 0.0, 1.0])  # the middle weight is its tensor's mean
    assert C.quantize_weight(w, bits, native=True)[1] == C.quantize_weight(w, bits, native=False)[1]


# --------------------------------------------------------------------------------------------- offset tensors


def offset_weights(seed, dtype=torch.float32):
    """Weights far from zero mean (a layer's weights + 3.7, and - 2.1): where float64 statistics rounded once
    differ from torch's ``w.mean()``/``w.std()`` in the last bit, and a few values per million then land one
    level off the original's."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(64, 64, 3, 3, generator=gen, dtype=dtype) * 0.05 + 3.7,
            torch.randn(16, 3, 3, 3, generator=gen, dtype=dtype) * 0.2 - 2.1,
            torch.randn(10, 64, generator=gen, dtype=dtype) * 0.01 + 0.5]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_lifequant_native_equals_the_torch_path_on_offset_tensors(seed, bits):
    """The kernel takes torch's per-tensor mean and std, so its values are the torch path's bit for bit, one by
    one and in one call; the gradients agree to rounding (the kernel sums them in float64)."""
    ws = offset_weights(seed)
    for w in ws:
        assert torch.equal(LQ.quantize_weight(w, bits, native=True), LQ.quantize_weight(w, bits, native=False))
    many = LQ.quantize_weights(ws, bits, native=True)
    ref = LQ.quantize_weights(ws, bits, native=False)
    assert all(torch.equal(a, b) for a, b in zip(many, ref, strict=True))
    gen = torch.Generator().manual_seed(100 + seed)
    gs = [torch.randn(w.shape, generator=gen) for w in ws]
    for native in (True, False):
        ps = [w.clone().requires_grad_() for w in ws]
        out = LQ.quantize_weights(ps, bits, native=native)
        assert all(torch.equal(o.detach(), r) for o, r in zip(out, ref, strict=True))
        torch.autograd.backward(out, gs)
        if native:
            got = [p.grad for p in ps]
        else:
            want = [p.grad for p in ps]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_climbq_native_levels_use_torch_statistics_on_offset_tensors(seed, bits):
    """ClimbQ's kernel on torch's ``w.mean()``/``w.std()``: the exact level of ``(w - mean) / std`` everywhere,
    so it equals the torch path except within 1e-5 of a level boundary (torch's erf approximation, module
    docstring), and there by one level; gradients agree to rounding."""
    ws = offset_weights(seed)
    n = 2**bits - 1
    gen = torch.Generator().manual_seed(100 + seed)
    gs = [torch.randn(w.shape, generator=gen) for w in ws]
    many = C.quantize_weights(ws, bits, native=True)
    for w, got in zip(ws, many, strict=True):
        assert torch.equal(got, exact_climbq_weight(w, bits))
        assert torch.equal(C.quantize_weight(w, bits, native=True), got)
        torch_path = C.quantize_weight(w, bits, native=False)
        differ = got != torch_path
        a = (w - w.mean()) * w.std().reciprocal()
        assert (boundary_distance(a[differ], n) < 1e-5).all()
        assert ((got - torch_path)[differ].abs() <= 2 / n * (1 + 1e-6)).all()
    grads = {}
    for native in (True, False):
        ps = [w.clone().requires_grad_() for w in ws]
        torch.autograd.backward(C.quantize_weights(ps, bits, native=native), gs)
        grads[native] = [p.grad for p in ps]
    for a, b in zip(grads[True], grads[False], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_kernel_statistics_are_torchs():
    """The statistics the kernels take are ``w.mean()`` and ``w.std()`` bit for bit (not float64 sums)."""
    ws = offset_weights(0)
    mean, std = N.torch_mean_std(ws)
    assert torch.equal(mean, torch.stack([w.mean() for w in ws]))
    assert torch.equal(std, torch.stack([w.std() for w in ws]))
    m64, s64 = N.mean_std(ws)  # the float64 reference: equal to rounding, not bit for bit
    torch.testing.assert_close(m64, mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(s64, std, rtol=1e-5, atol=0)
