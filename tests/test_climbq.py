"""ClimbQ quantizer, class distribution scaling and HomoVar loss (docs/climbq.md), pinned by reference vectors
computed with the original code's formulas (its functions run on a CPU in float32)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F

from paperlib.climbq import (
    ClimbQActivation,
    ClimbQWeight,
    HomoVarLoss,
    batch_sigma,
    class_balanced_weights,
    homovar_beta,
    homovar_loss,
    quantize_activation,
    quantize_weight,
    set_sigma,
)
from paperlib.data.long_tail import long_tail_counts
from paperlib.levene import dispersion, homogeneity_bounds
from paperlib.models.resnet_cifar import ResNetCifar
from paperlib.quant.core import ActSlot, quantize_model

TV_W = torch.tensor([-0.30, -0.12, -0.05, 0.0, 0.02, 0.07, 0.15, 0.40])
TV_A = torch.tensor([-3, -1, -0.2, 0, 0.1, 0.5, 1.5, 4.0])
TV_H1_F = [[.5, 1, 0], [.7, .8, .2], [.6, 1.2, .1], [.2, .3, .9], [.1, .5, 1.1], [1.5, 0, .4]]
TV_H1_Y = [0, 0, 0, 1, 1, 2]
TV_H1_LOGITS = [[2, .5, -1], [1, .2, .1], [.3, .3, .3], [0, 1.5, -.5], [-1, .5, .7], [.2, -.3, .9]]
CIFAR10_G10 = [5000, 3871, 2997, 2320, 1796, 1390, 1076, 833, 644, 498]
CIFAR10_G200 = [5000, 2775, 1540, 854, 474, 263, 145, 80, 44, 24]
ATOL = 1e-6  # the TVs are printed with 6 decimals


# --------------------------------------------------------------------------------------------- weight reference vectors


def test_tv_w_statistics_and_cdf():
    assert float(TV_W.mean()) == pytest.approx(0.021250, abs=ATOL)
    assert float(TV_W.std()) == pytest.approx(0.203921, abs=ATOL)
    phi = scipy.stats.norm.cdf((TV_W.numpy() - TV_W.numpy().mean()) / TV_W.numpy().std(ddof=1))
    np.testing.assert_allclose(
        phi, [0.057586, 0.244259, 0.363395, 0.458503, 0.497555, 0.594472, 0.736101, 0.968368], atol=ATOL)


def test_tv_w_k2_and_k4():
    torch.testing.assert_close(quantize_weight(TV_W, 2), torch.tensor([-3, -1, -1, -1, -1, 1, 1, 3]) / 3,
                               atol=ATOL, rtol=0)
    torch.testing.assert_close(
        quantize_weight(TV_W, 4),
        torch.tensor([-0.866667, -0.466667, -0.333333, -0.066667, -0.066667, 0.2, 0.466667, 1.0]),
        atol=ATOL, rtol=0)


def test_weight_levels_have_no_zero_and_32_bits_is_identity():
    w = torch.randn(64, 3, 3, 3)
    for k in range(2, 9):
        n = 2**k - 1
        codes = (quantize_weight(w, k) + 1) * n / 2
        torch.testing.assert_close(codes, codes.round(), atol=1e-4, rtol=0)
        assert codes.min() >= 0 and codes.max() <= n
        assert not torch.isclose(quantize_weight(w, k), torch.zeros(())).any()
    assert quantize_weight(w, 32) is w


def _weight_grad_oracle(w: np.ndarray, g: np.ndarray) -> np.ndarray:
    """d/dw_j sum_i g_i (2 Phi(u_i) - 1), u = (w - mean)/std (ddof 1), with mean and std differentiated."""
    n, mu, s = w.size, w.mean(), w.std(ddof=1)
    u = (w - mu) / s
    ds = (w - mu) / ((n - 1) * s)  # d s / d w_j
    jac = (np.eye(n) - 1 / n) / s - np.outer(w - mu, ds) / s**2  # jac[i, j] = d u_i / d w_j
    return (g * 2 * scipy.stats.norm.pdf(u)) @ jac


def test_weight_gradient_flows_through_mean_and_std():
    rng = np.random.default_rng(0)
    for w_np, g_np in [(TV_W.double().numpy(), np.ones(8)), (rng.normal(0, 0.1, 50), rng.normal(size=50))]:
        w = torch.tensor(w_np, requires_grad=True)
        (quantize_weight(w, 4) * torch.tensor(g_np)).sum().backward()
        oracle = _weight_grad_oracle(w_np, g_np)
        np.testing.assert_allclose(w.grad.numpy(), oracle, rtol=1e-9, atol=1e-12)
        # and it is not just the diagonal 2 phi / s (the terms through mu and s matter)
        naive = g_np * 2 * scipy.stats.norm.pdf((w_np - w_np.mean()) / w_np.std(ddof=1)) / w_np.std(ddof=1)
        assert np.abs(naive - oracle).max() > 1e-3


# ----------------------------------------------------------------------------------------- activation reference vectors


def test_tv_a_k4_values_and_gradient():
    x = TV_A.clone().requires_grad_()
    a = quantize_activation(x, 4)  # sigma = 2, act_range = 2: eval
    torch.testing.assert_close(
        a.detach(), torch.tensor([-1.733333, -0.666667, -0.133333, 0.133333, 0.133333, 0.4, 1.2, 2.0]),
        atol=ATOL, rtol=0)
    a.sum().backward()
    expected = [0.259035, 0.704131, 0.793905, 0.797885, 0.796888, 0.773336, 0.602275, 0.107982]
    torch.testing.assert_close(x.grad, torch.tensor(expected), atol=ATOL, rtol=0)
    # = 2 R phi(x/sigma)/sigma = 2 phi(x/2) for R = sigma = 2
    np.testing.assert_allclose(x.grad.numpy(), 2 * scipy.stats.norm.pdf(TV_A.numpy() / 2), rtol=1e-5)


def test_tv_a_k2_k32_and_k1():
    torch.testing.assert_close(quantize_activation(TV_A, 2),
                               torch.tensor([-6, -2, -2, 2, 2, 2, 2, 6]) / 3, atol=ATOL, rtol=0)
    x = TV_A.clone().requires_grad_()
    y = quantize_activation(x, 32)
    assert y is x
    with pytest.raises(ValueError, match=r"bits=1 is degenerate.*2\.\.8 or 32"):
        quantize_activation(TV_A, 1)  # the original maps everything to +2 (k=1)
    with pytest.raises(ValueError, match="degenerate"):
        quantize_weight(TV_W, 1)
    for bad in (0, 9, 16):
        with pytest.raises(ValueError, match="2..8 or 32"):
            ClimbQWeight(bad)
    with pytest.raises(TypeError, match="int"):
        ClimbQActivation(4.0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sigma", [1.0, 1.7, 2.0])
def test_activation_equals_threshold_form(bits, sigma):
    """Inference form (docs/climbq.md, 'Quantizers'): thresholds t_i = sigma Phi^-1((i - 1/2)/n), uniformly spaced
    codes."""
    n = 2**bits - 1
    t = sigma * scipy.stats.norm.ppf((np.arange(1, n + 1) - 0.5) / n)
    x = np.random.default_rng(bits).normal(0, 2.5, 4000)
    x = x[np.min(np.abs(x[:, None] - t[None]), axis=1) > 1e-4]  # away from ties
    code = np.searchsorted(t, x)
    got = quantize_activation(torch.tensor(x), bits, sigma=sigma, act_range=1.5).numpy()
    np.testing.assert_allclose(got, 1.5 * (2 * code / n - 1), atol=1e-12)


# -------------------------------------------------------------------------------------------- scaling reference vectors


TV_S_X = torch.tensor([-1, -0.1, 0.3, 1.2]).reshape(1, 1, 2, 2).repeat(4, 1, 1, 1)


def test_tv_s_batch_sigma():
    sigma = batch_sigma(torch.tensor([0, 0, 0, 1]), 10)
    torch.testing.assert_close(sigma, torch.tensor([1.7, 1.7, 1.7, 1.9]), atol=ATOL, rtol=0)


def test_tv_s_train_eval_and_imagenet_quirk():
    q = ClimbQActivation(4).train()
    assert set_sigma(q, batch_sigma(torch.tensor([0, 0, 0, 1]), 10)) == 1
    out = q(TV_S_X).reshape(4, 4)
    rows = torch.tensor([-0.933333, -0.133333, 0.4, 0.933333]).repeat(3, 1)
    torch.testing.assert_close(out[:3], rows, atol=ATOL, rtol=0)
    torch.testing.assert_close(out[3], torch.tensor([-0.933333, -0.133333, 0.133333, 0.933333]),
                               atol=ATOL, rtol=0)
    q.eval()  # eval: sigma = 2 whatever was set
    torch.testing.assert_close(q(TV_S_X).reshape(4, 4),
                               torch.tensor([-0.666667, -0.133333, 0.133333, 0.933333]).repeat(4, 1),
                               atol=ATOL, rtol=0)
    quirk = ClimbQActivation(4, eval_sigma=1.0).eval()  # resnet-50-imgnet: p=[1] -> sigma = 1 at test
    torch.testing.assert_close(quirk(TV_S_X).reshape(4, 4),
                               torch.tensor([-1.466667, -0.133333, 0.4, 1.466667]).repeat(4, 1),
                               atol=ATOL, rtol=0)


def test_batch_sigma_formula_and_special_batches():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 7, (50,), generator=g)
    b = np.bincount(y.numpy(), minlength=7)
    np.testing.assert_allclose(batch_sigma(y, 7).numpy(), 2 - b[y.numpy()] / (b**2).sum(), rtol=1e-6)
    balanced = torch.arange(8).repeat(16)
    torch.testing.assert_close(batch_sigma(balanced, 8), torch.full((128,), 2 - 1 / 128))
    torch.testing.assert_close(batch_sigma(torch.full((128,), 3), 8), torch.full((128,), 2 - 1 / 128))
    assert batch_sigma(torch.tensor([5]), 8).tolist() == [1.0]  # the original's len(p) == 1 branch: p[0]


def test_sigma_stays_within_0_05_of_2_for_b128_long_tail_batches():
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for counts in (long_tail_counts([183] * 10, 10), long_tail_counts([183] * 10, 100), CIFAR10_G200):
        p = torch.tensor(counts, dtype=torch.float)
        for _ in range(50):
            y = torch.multinomial(p, 128, replacement=True, generator=g)
            worst = max(worst, float((batch_sigma(y, 10) - 2).abs().max()))
    assert 0 < worst < 0.05


def test_batch_sigma_other_modes_and_errors():
    y = torch.tensor([0, 1, 1, 2])
    assert batch_sigma(y, 3, "none").tolist() == [2.0] * 4
    torch.testing.assert_close(batch_sigma(y, 3, "prior", counts=[50, 30, 20]),
                               torch.tensor([1.5, 1.7, 1.7, 1.8]))
    with pytest.raises(ValueError, match="counts"):
        batch_sigma(y, 3, "prior")
    with pytest.raises(ValueError, match="mode="):
        batch_sigma(y, 3, "class")
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        batch_sigma(y, 2)
    with pytest.raises(TypeError, match="1-D integer"):
        batch_sigma(y.float(), 3)


def test_per_sample_sigma_equals_row_by_row():
    x = torch.randn(5, 3, 4, 4)
    sigma = torch.tensor([1.5, 1.8, 2.0, 1.95, 1.2])
    full = quantize_activation(x, 3, sigma)
    for i in range(5):
        torch.testing.assert_close(full[i], quantize_activation(x[i], 3, float(sigma[i])))


# --------------------------------------------------------------------------------------------- modules


def _climbq_resnet() -> ResNetCifar:
    torch.manual_seed(0)
    model = ResNetCifar(8, num_classes=3, in_channels=1)
    return quantize_model(model, weight=lambda layer: ClimbQWeight(4),
                          activation=lambda: ClimbQActivation(4), skip=["fc"])


def test_quantize_model_with_climbq_modules_and_set_sigma():
    model = _climbq_resnet().train()
    slots = [m for m in model.modules() if isinstance(m, ActSlot)]
    assert slots and all(isinstance(s.quantizer, ClimbQActivation) for s in slots)
    y = torch.tensor([0, 0, 1, 2, 2, 2])
    sigma = batch_sigma(y, 3)
    assert set_sigma(model, sigma) == len(slots)
    assert all(s.quantizer.sigma is not None and torch.equal(s.quantizer.sigma, sigma) for s in slots)
    x = torch.randn(6, 1, 8, 8)
    logits = model(x)
    assert logits.shape == (6, 3) and torch.isfinite(logits).all()
    w_q = model.conv0.quantized_weight()  # first layer quantized (original code: model/resnet.py)
    codes = (w_q + 1) * 15 / 2
    torch.testing.assert_close(codes, codes.round(), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="set_sigma"):
        model(torch.randn(4, 1, 8, 8))  # stale sigma for a different batch size
    model.eval()
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 3)  # eval ignores the training sigma
    assert set_sigma(model, None) == len(slots)
    assert set_sigma(ResNetCifar(8, num_classes=3), 2.0) == 0  # an FP model has no ClimbQ quantizer


# --------------------------------------------------------------------------------------------- HomoVar


def dense_reference(logits, labels, features, counts, alpha=0.05, beta_f=0.999):
    """``utils/lt_loss.py`` transcribed in float64: its dense [B, D, K] tensor and Python loops."""
    feats = features.double()
    b, d = feats.shape
    k = logits.shape[1]
    n = torch.tensor(counts, dtype=torch.float64)
    x = torch.zeros(b, k, d, dtype=torch.float64)
    for i in range(b):
        x[i, labels[i]] = feats[i]
    x = x.transpose(1, 2)
    m = x.sum(0) / n.reshape(1, -1)
    zij = torch.sum(torch.abs((x - m) * (x != 0.0)), 1)
    zi_mean = zij.sum(0) / n
    z_mean = zi_mean.mean()
    big_n = float(n.sum())
    f_score = scipy.stats.f.ppf(1 - alpha, k - 1, big_n - k)
    ssw = torch.sum((zij - zi_mean) ** 2 * (zij != 0)) / (big_n - k)
    sb = (zi_mean - z_mean) ** 2 * n
    ssb = sb.sum() / (k - 1)
    c_k = f_score * ssw * (k - 1) - (ssb * (k - 1) - sb)
    qa, qb, qc = z_mean**2, -(2 * z_mean * zij.sum(0) + c_k), zij.sum(0) ** 2
    n_lb = torch.abs((-qb - torch.sqrt(qb**2 - 4 * qa * qc)) / (2 * qa))
    n_ub = torch.abs((-qb + torch.sqrt(qb**2 - 4 * qa * qc)) / (2 * qa))
    beta = torch.zeros(k, dtype=torch.float64)
    for j in range(k):
        if n[j] < n_lb[j]:
            beta[j] = beta_f ** (1 / (n_lb[j] - n[j]))
        elif n[j] > n_ub[j]:
            beta[j] = beta_f ** (1 / (n[j] - n_ub[j]))
        else:
            beta[j] = beta_f
    w = (1 - beta) / (1 - beta**n)
    w = w / w.sum() * k
    weights = w[labels][:, None].repeat(1, k)
    loss = F.binary_cross_entropy(logits.double().softmax(1), F.one_hot(labels, k).double(), weight=weights)
    return {"loss": loss, "n_lb": n_lb, "n_ub": n_ub, "beta": beta, "w": w, "W": ssb / ssw}


def _tv_h1():
    return (torch.tensor(TV_H1_LOGITS), torch.tensor(TV_H1_Y), torch.tensor(TV_H1_F))


def test_tv_h1_loss_weights_and_diagnostics():
    logits, y, f = _tv_h1()
    crit = HomoVarLoss([100, 30, 10])
    loss = crit(logits, y, f)
    assert float(loss) == pytest.approx(0.2575427, rel=5e-5)
    assert loss.dtype == logits.dtype
    step = crit.last
    np.testing.assert_allclose(step.weights.numpy(), [0.217651, 0.700802, 2.081548], rtol=1e-3)
    assert step.beta.tolist() == [0.999] * 3
    np.testing.assert_allclose(step.n_lb.numpy(), [17.171055, 11.220180, 4.811215], rtol=5e-5)
    np.testing.assert_allclose(step.n_ub.numpy(), [127.846756, 66.845680, 54.451973], rtol=5e-5)
    assert float(step.W) == pytest.approx(1.786475, rel=5e-5)
    assert float(step.fraction_out) == 0.0
    assert float(homovar_loss(logits, y, f, [100, 30, 10])) == float(loss)
    frame = step.frame()
    assert list(frame.columns) == ["n", "n_lb", "n_ub", "beta", "weight", "out_of_bounds"]


def test_tv_h2_class_balanced_weights():
    for counts, expected in [
        (CIFAR10_G10, [0.686802, 0.696675, 0.717987, 0.756440, 0.817788, 0.908257, 1.034834, 1.206483,
                       1.436249, 1.738484]),
        (CIFAR10_G200, [0.102909, 0.109004, 0.130084, 0.177933, 0.270676, 0.441816, 0.756946, 1.328881,
                        2.373467, 4.308283]),
    ]:
        n = torch.tensor(counts, dtype=torch.float64)
        w = class_balanced_weights(torch.full((10,), 0.999, dtype=torch.float64), n)
        np.testing.assert_allclose(w.numpy(), expected, rtol=1e-3)  # rtol 1e-3 when beta ~ 1 (float32 reference values)
        assert float(w.sum()) == pytest.approx(10)
        # through the loss: a homogeneous batch keeps every class in bounds, so w is exactly the reference weights
        g = torch.Generator().manual_seed(0)
        y = torch.multinomial(n.float(), 128, replacement=True, generator=g)
        f = torch.relu(torch.randn(128, 64, generator=g) + 0.2)
        crit = HomoVarLoss(counts)
        crit(torch.randn(128, 10, generator=g), y, f)
        assert float(crit.last.fraction_out) == 0.0
        torch.testing.assert_close(crit.last.weights, w)


def test_tv_l_homovar_betas_and_zero_logit_loss():
    f = torch.tensor([1, 2, 3, 4, 1, 5, 9, 2.5, 2, 2.2, 2.4, 2.6])[:, None]
    y = torch.arange(3).repeat_interleave(4)
    crit = HomoVarLoss([4, 4, 4])
    loss = crit(torch.zeros(12, 3), y, f)
    assert float(loss) == pytest.approx(0.6365142, rel=1e-6)
    np.testing.assert_allclose(crit.last.beta.numpy(), [0.999, 0.99831855, 0.99940109], rtol=1e-7)
    ref = scipy.stats.levene([1, 2, 3, 4], [1, 5, 9, 2.5], [2, 2.2, 2.4, 2.6], center="mean")
    assert float(crit.last.W) == pytest.approx(ref.statistic, rel=1e-6)
    assert crit.last.out_of_bounds.tolist() == [False, True, True]


def _random_case(seed, k, d, b, spread):
    g = torch.Generator().manual_seed(seed)
    counts = long_tail_counts([500] * k, 20, "closed_form")
    y = torch.multinomial(torch.tensor(counts, dtype=torch.float), b, replacement=True, generator=g)
    scale = torch.linspace(1, spread, k)[y][:, None]
    f = torch.relu(torch.randn(b, d, generator=g) * scale + 0.1)
    f[::5] = 0  # dead rows: z_i = 0, which the original leaves out of ssw
    return torch.randn(b, k, generator=g, dtype=torch.float64), y, f, counts


@pytest.mark.parametrize(("k", "d", "b", "spread"), [(3, 4, 12, 1.0), (5, 7, 40, 6.0), (10, 64, 128, 10.0),
                                                     (10, 16, 128, 1.0), (20, 8, 64, 4.0)])
def test_vectorised_homovar_equals_dense_float64_reference(k, d, b, spread):
    seen = {"nan": 0, "out": 0, "in": 0}
    for seed in range(3):
        logits, y, f, counts = _random_case(seed, k, d, b, spread)
        crit = HomoVarLoss(counts)
        loss = crit(logits, y, f)
        ref = dense_reference(logits, y, f, counts)
        assert float(loss) == pytest.approx(float(ref["loss"]), rel=1e-10)
        for key, ours in (("n_lb", crit.last.n_lb), ("n_ub", crit.last.n_ub), ("beta", crit.last.beta),
                          ("w", crit.last.weights)):
            torch.testing.assert_close(ours, ref[key], rtol=1e-9, atol=0, equal_nan=True)
        assert float(crit.last.W) == pytest.approx(float(ref["W"]), rel=1e-10)
        seen["nan"] += int(crit.last.n_lb.isnan().sum())
        seen["out"] += int(crit.last.out_of_bounds.sum())
        seen["in"] += int((~crit.last.out_of_bounds).sum())
    if spread >= 6:  # heterogeneous classes exercise the NaN and out-of-bounds paths
        assert seen["nan"] > 0 and seen["out"] > 0 and seen["in"] > 0


def test_bounds_in_diagnostics_are_levene_homogeneity_bounds():
    logits, y, f, counts = _random_case(7, 6, 12, 60, 5.0)
    crit = HomoVarLoss(counts)
    crit(logits, y, f)
    bounds = homogeneity_bounds(dispersion(f, y, counts=counts), y, counts)
    for name in ("n_lb", "n_ub", "W"):
        torch.testing.assert_close(getattr(crit.last, name), getattr(bounds, name), equal_nan=True)
    torch.testing.assert_close(crit.last.out_of_bounds, bounds.out_of_bounds)
    torch.testing.assert_close(crit.last.beta, homovar_beta(bounds.counts, bounds.n_lb, bounds.n_ub, 0.999))


def test_homovar_gradient_only_through_logits_with_constant_weights():
    logits, y, f, counts = _random_case(3, 5, 9, 30, 3.0)
    logits = logits.float().requires_grad_()
    f = f.requires_grad_()
    crit = HomoVarLoss(counts)
    crit(logits, y, f).backward()
    assert f.grad is None  # no gradient through features, bounds or beta (HomoVar step 8)
    lg2 = logits.detach().clone().requires_grad_()
    w = crit.last.weights.float()[y][:, None].expand(-1, 5)
    F.binary_cross_entropy(lg2.softmax(1), F.one_hot(y, 5).float(), weight=w).backward()
    torch.testing.assert_close(logits.grad, lg2.grad)


def test_homovar_base_ce():
    logits, y, f = _tv_h1()
    loss = homovar_loss(logits, y, f, [100, 30, 10], base="ce")
    w = torch.tensor([0.217651, 0.700802, 2.081548])
    expected = (w[y] * F.cross_entropy(logits, y, reduction="none")).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_homovar_batch_counts_is_textbook_levene():
    g = torch.Generator().manual_seed(1)
    y = torch.tensor([0] * 9 + [1] * 14 + [3] * 7)  # class 2 absent from the batch
    f = torch.randn(30, 1, generator=g, dtype=torch.float64) * torch.tensor([1.0, 3.0, 1.0, 0.5])[y][:, None]
    logits = torch.randn(30, 4, generator=g)
    crit = HomoVarLoss("batch")
    crit(logits, y, f)
    groups = [f[y == c, 0].numpy() for c in (0, 1, 3)]
    assert float(crit.last.W) == pytest.approx(scipy.stats.levene(*groups, center="mean").statistic, rel=1e-9)
    assert crit.last.counts.tolist() == [9, 14, 0, 7] and crit.last.classes.tolist() == [0, 1, 3]
    assert float(crit.last.weights[2]) == 0.0 and float(crit.last.weights.sum()) == pytest.approx(3)
    assert math.isnan(float(crit.last.n_lb[2]))
    one_class = HomoVarLoss("batch")
    assert torch.isfinite(one_class(logits[:9], y[:9], f[:9]))  # undefined test: beta stays beta_f
    assert float(one_class.last.weights[0]) == pytest.approx(1.0)  # the one present class: weight 1


def test_homovar_float64_statistics_at_imagenet_scale():
    """docs/climbq.md 'Departures': B=256, K=1000, D=2048, counts 5..1300: the original's float32 gives NaN;
    float64 is finite."""
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(5, 1301, (1000,), generator=g)
    y = torch.randint(0, 1000, (256,), generator=g)
    f = torch.relu(torch.randn(256, 2048, generator=g))
    logits = torch.randn(256, 1000, generator=g, requires_grad=True)
    crit = HomoVarLoss(counts)
    loss = crit(logits, y, f)
    assert torch.isfinite(loss) and torch.isfinite(crit.last.weights).all()
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_homovar_zero_count_class_raises_the_generator_error():
    logits, y, f = _tv_h1()
    for make in (lambda: HomoVarLoss([100, 0, 10]), lambda: homovar_loss(logits, y, f, [100, 0, 10])):
        with pytest.raises(ValueError, match=r"class 1 .*0 training samples.*'closed_form'.*min_count=1"):
            make()


def test_homovar_rejects_bad_input():
    logits, y, f = _tv_h1()
    with pytest.raises(ValueError, match="K=3"):
        homovar_loss(logits, y, f, [100, 30])
    with pytest.raises(ValueError, match="logits"):
        homovar_loss(logits[0], y, f, [100, 30, 10])
    with pytest.raises(ValueError, match="features"):
        homovar_loss(logits, y, f[:4], [100, 30, 10])
    with pytest.raises(ValueError, match="base="):
        homovar_loss(logits, y, f, [100, 30, 10], base="focal")
    with pytest.raises(ValueError, match="beta"):
        HomoVarLoss([100, 30, 10], beta=1.0)
    with pytest.raises(ValueError, match="'batch'"):
        HomoVarLoss("dataset")
    for counts in ([100, 30, 10], "batch"):
        with pytest.raises(ValueError, match=r"\[0, 3\)"):
            homovar_loss(logits, torch.tensor([0, 0, 0, 1, 1, 3]), f, counts)
