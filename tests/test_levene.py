"""Levene analysis (docs/climbq.md, 'Levene analysis', 'Size bounds'; reference vectors computed with the original
code's formulas): scipy and direct loops as oracles."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch
from torch import nn

from paperlib.levene import capture_features, dispersion, homogeneity_bounds, levene, levene_features

TV_L_GROUPS = [[1, 2, 3, 4], [1, 5, 9, 2.5], [2, 2.2, 2.4, 2.6]]
CENTERS = ["mean", "median", "trimmed"]


def _random_groups(seed: int, sizes=(7, 23, 12, 40)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(rng.uniform(-2, 2), rng.uniform(0.3, 3), n) for n in sizes]


def _flat(groups):
    return np.concatenate(groups), np.repeat(np.arange(len(groups)), [len(g) for g in groups])


# --------------------------------------------------------------------------------------------- levene


def test_tv_l_levene_mean_and_median():
    res = levene(TV_L_GROUPS)  # center="mean" by default, as ClimbQ
    assert res.statistic == pytest.approx(5.4075255, rel=1e-7)
    assert res.pvalue == pytest.approx(0.028682, rel=1e-4)
    assert levene(TV_L_GROUPS, center="median").statistic == pytest.approx(4.687060, rel=1e-6)
    assert scipy.stats.f.ppf(0.95, 2, 9) == pytest.approx(4.256495, rel=1e-6)


@pytest.mark.parametrize("center", CENTERS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_levene_equals_scipy_on_unequal_groups(center, seed):
    groups = _random_groups(seed)
    ours = levene([torch.tensor(groups[0]), *groups[1:]], center=center, proportiontocut=0.1)
    ref = scipy.stats.levene(*groups, center=center, proportiontocut=0.1)
    assert ours.statistic == ref.statistic and ours.pvalue == ref.pvalue


def test_levene_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 2 groups"):
        levene([[1, 2, 3]])
    with pytest.raises(ValueError, match="at least 2 values"):
        levene([[1, 2], [3]])
    with pytest.raises(ValueError, match="NaN"):
        levene([[1, 2], [3, np.nan]])
    with pytest.raises(ValueError, match="center="):
        levene(TV_L_GROUPS, center="mode")
    with pytest.raises(TypeError, match="numbers"):
        levene([["a", "b"], [1, 2]])


# --------------------------------------------------------------------------------------------- dispersion


def _dispersion_loop(f, y, center, reduce, mask_zeros, counts=None, cut=0.05):
    """Per sample, per class, per dimension: the obviously-correct version."""
    z = np.zeros(len(f))
    for i in range(len(f)):
        rows = f[y == y[i]]
        if counts is not None:
            m = rows.sum(0) / counts[y[i]]
        elif center == "mean":
            m = rows.mean(0)
        elif center == "median":
            m = np.median(rows, axis=0)
        else:
            m = np.array([scipy.stats.trim_mean(rows[:, d], cut) for d in range(f.shape[1])])
        d = f[i] - m
        if mask_zeros:
            d = d * (f[i] != 0)
        z[i] = np.abs(d).sum() if reduce == "l1" else np.sqrt((d**2).sum())
    return z


@pytest.mark.parametrize("center", CENTERS)
@pytest.mark.parametrize("reduce", ["l1", "l2"])
@pytest.mark.parametrize("mask_zeros", [True, False])
def test_dispersion_against_direct_loop(center, reduce, mask_zeros):
    rng = np.random.default_rng(3)
    y = rng.integers(0, 5, 60)
    y[:5] = np.arange(5)
    f = np.maximum(rng.normal(0.2, 1, (60, 6)), 0)  # ReLU zeros
    got = dispersion(torch.tensor(f), torch.tensor(y), center, reduce, mask_zeros, proportiontocut=0.1)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), _dispersion_loop(f, y, center, reduce, mask_zeros, cut=0.1),
                               rtol=1e-12, atol=1e-12)


def test_dispersion_with_dataset_counts_is_climbq_shrunk_mean():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 4, 30)
    f = np.maximum(rng.normal(0, 1, (30, 5)), 0)
    counts = np.array([100.0, 40, 20, 9])
    got = dispersion(f, y, counts=counts)
    np.testing.assert_allclose(got.numpy(), _dispersion_loop(f, y, "mean", "l1", True, counts), rtol=1e-12)
    with pytest.raises(ValueError, match="center='mean'"):
        dispersion(f, y, "median", counts=counts)
    with pytest.raises(ValueError, match="class 2"):
        dispersion(f, y, counts=[5, 5, 0, 5])
    with pytest.raises(ValueError, match=r"labels must be class ids in \[0, 3\)"):
        dispersion(f, y, counts=[5, 5, 5])


def test_dispersion_rejects_bad_shapes_and_types():
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        dispersion(torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="one label per sample"):
        dispersion(torch.zeros(4, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        dispersion(torch.zeros(4, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="reduce="):
        dispersion(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), reduce="max")


# --------------------------------------------------------------------------------------------- bounds


def test_homogeneity_bounds_tv_h1_intermediates():
    f = torch.tensor([[.5, 1, 0], [.7, .8, .2], [.6, 1.2, .1], [.2, .3, .9], [.1, .5, 1.1], [1.5, 0, .4]],
                     dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1, 1, 2])
    n = [100, 30, 10]
    b = homogeneity_bounds(dispersion(f, y, counts=n), y, n)
    rel = dict(rtol=5e-5, atol=0)  # a float64 re-derivation agrees with the float32 reference within 5e-5 relative
    np.testing.assert_allclose(b.S.numpy(), [4.95, 2.893333, 1.71], **rel)
    np.testing.assert_allclose(b.zbar_k.numpy(), [0.0495, 0.096444, 0.171], **rel)
    assert float(b.zbar) == pytest.approx(0.105648, rel=5e-5)
    assert b.F_star == pytest.approx(3.062204, rel=5e-5)
    assert float(b.ssw) == pytest.approx(0.1009002, rel=5e-5)
    assert float(b.ssb) == pytest.approx(0.1802557, rel=5e-5)
    assert float(b.W) == pytest.approx(1.786475, rel=5e-5)
    np.testing.assert_allclose(b.C.numpy(), [0.572704, 0.259984, 0.300151], **rel)
    np.testing.assert_allclose(b.n_lb.numpy(), [17.171055, 11.220180, 4.811215], **rel)
    np.testing.assert_allclose(b.n_ub.numpy(), [127.846756, 66.845680, 54.451973], **rel)
    assert not b.out_of_bounds.any() and b.fraction_out == 0.0
    assert b.homogeneous  # W = 1.79 <= F* = 3.06
    # the bounds are the roots: n (S/n - zbar)^2 = C_k at n_lb and n_ub
    for nk in (b.n_lb, b.n_ub):
        np.testing.assert_allclose((nk * (b.S / nk - b.zbar) ** 2).numpy(), b.C.numpy(), rtol=1e-9)
    frame = b.frame()
    assert list(frame.columns) == ["n", "S", "zbar_k", "sb", "C", "n_lb", "n_ub", "out_of_bounds"]


def test_homogeneity_bounds_tv_l_negative_budget_and_nan_root():
    f = torch.tensor(sum(TV_L_GROUPS, []), dtype=torch.float64)
    y = torch.arange(3).repeat_interleave(4)
    b = homogeneity_bounds(dispersion(f, y, counts=[4, 4, 4]), y, [4, 4, 4])
    assert float(b.W) == pytest.approx(5.407525, rel=1e-6)
    assert b.F_star == pytest.approx(4.256495, rel=1e-6)
    np.testing.assert_allclose(b.C.numpy(), [-2.297551, 4.689950, 2.022449], rtol=1e-6)
    # C_0 < 0 and C_0 > -4 zbar S_0: negative discriminant, NaN bounds (the original's NaN path)
    assert torch.isnan(b.n_lb[0]) and torch.isnan(b.n_ub[0])
    assert b.below.tolist() == [False, True, False] and b.above.tolist() == [False, False, True]
    assert not b.homogeneous and b.p_value == pytest.approx(0.028682, rel=1e-4)


def test_ssw_leaves_out_zero_dispersions_only_when_masked():
    z = torch.tensor([0.0, 1.0, 2.0, 0.0, 3.0, 5.0, 1.0], dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    n = torch.tensor([10.0, 20.0], dtype=torch.float64)
    zbar_k = torch.tensor([3.0 / 10, 9.0 / 20], dtype=torch.float64)
    dev2 = (z - zbar_k[y]) ** 2
    masked = homogeneity_bounds(z, y, n)
    unmasked = homogeneity_bounds(z, y, n, mask_zero_z=False)
    assert float(masked.ssw) == pytest.approx(float(dev2[z != 0].sum()) / 28, rel=1e-12)
    assert float(unmasked.ssw) == pytest.approx(float(dev2.sum()) / 28, rel=1e-12)


def test_weighted_unmasked_bounds_give_the_anova_f_of_z():
    rng = np.random.default_rng(5)
    groups = [np.abs(rng.normal(0, s, n)) for s, n in [(1, 9), (2, 30), (0.5, 14)]]
    z, y = _flat(groups)
    b = homogeneity_bounds(z, y, [len(g) for g in groups], grand_mean="weighted", mask_zero_z=False)
    ref = scipy.stats.f_oneway(*groups)
    assert float(b.W) == pytest.approx(ref.statistic, rel=1e-12)
    assert b.p_value == pytest.approx(ref.pvalue, rel=1e-9)


def test_homogeneity_bounds_rejects_bad_input():
    z, y = torch.rand(6, dtype=torch.float64), torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match="class 1"):
        homogeneity_bounds(z, y, [3, 0, 3])
    with pytest.raises(ValueError, match="N-K"):
        homogeneity_bounds(z, y, [1, 1, 1])
    with pytest.raises(ValueError, match="alpha"):
        homogeneity_bounds(z, y, [2, 2, 2], alpha=1.5)
    with pytest.raises(ValueError, match="grand_mean"):
        homogeneity_bounds(z, y, [2, 2, 2], grand_mean="median")
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        homogeneity_bounds(z, y, [3, 3])


# --------------------------------------------------------------------------------------------- features


@pytest.mark.parametrize("center", CENTERS)
@pytest.mark.parametrize("seed", [0, 1])
def test_levene_features_d1_equals_scipy_levene(center, seed):
    groups = _random_groups(seed)
    x, y = _flat(groups)
    res = levene_features(x, y + 3, center=center, mask_zeros=False, proportiontocut=0.1)
    ref = scipy.stats.levene(*groups, center=center, proportiontocut=0.1)
    assert res.W == pytest.approx(ref.statistic, rel=1e-10)
    assert res.p == pytest.approx(ref.pvalue, rel=1e-8)
    assert res.F_star == pytest.approx(scipy.stats.f.ppf(0.95, 3, len(x) - 4), rel=1e-12)
    assert res.homogeneous == (res.p > 0.05) == (res.W <= res.F_star)
    assert res.frame["class"].tolist() == [3, 4, 5, 6]  # original labels kept


def test_levene_features_tv_l():
    x, y = _flat([np.array(g) for g in TV_L_GROUPS])
    res = levene_features(torch.tensor(x)[:, None], torch.tensor(y))
    assert res.W == pytest.approx(5.4075255, rel=1e-7) and res.p == pytest.approx(0.028682, rel=1e-4)
    assert not res.homogeneous


def test_levene_features_per_class_table():
    rng = np.random.default_rng(6)
    y = np.repeat([0, 2, 5], [20, 35, 11])
    f = np.maximum(rng.normal(0, 1, (66, 8)) * np.where(y == 2, 3, 1)[:, None], 0)
    res = levene_features(f, y)
    assert isinstance(res.frame, pd.DataFrame) and res.num_classes == 3 and res.num_samples == 66
    for row in res.frame.itertuples():
        zk = res.z[y == row[1]]
        assert row.n == zk.size
        assert row.mean_dispersion == pytest.approx(zk.mean(), rel=1e-12)
        assert row.var_dispersion == pytest.approx(zk.var(ddof=1), rel=1e-10)
        assert row.feature_var == pytest.approx(f[y == row[1]].var(0, ddof=1).mean(), rel=1e-10)
    np.testing.assert_allclose(res.z, _dispersion_loop(f, y, "mean", "l1", True), rtol=1e-12)
    groups = [res.z[y == c] for c in (0, 2, 5)]
    assert res.W == pytest.approx(scipy.stats.f_oneway(*groups).statistic, rel=1e-10)
    assert res.W > res.F_star and not res.homogeneous  # class 2 is three times as spread


def test_levene_features_rejects_bad_input():
    f, y = np.random.default_rng(0).normal(size=(10, 3)), np.repeat([0, 1], 5)
    with pytest.raises(ValueError, match=r"classes \[7\] have fewer than 2 samples"):
        levene_features(f, np.array([0] * 5 + [1] * 4 + [7]))
    with pytest.raises(ValueError, match="at least 2 classes"):
        levene_features(f, np.zeros(10, dtype=int))
    f_nan = f.copy()
    f_nan[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        levene_features(f_nan, y)
    with pytest.raises(TypeError, match="integer"):
        levene_features(f, y.astype(float))
    with pytest.raises(ValueError, match="one label per feature row"):
        levene_features(f, y[:-1])


# --------------------------------------------------------------------------------------------- capture


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1))
        self.fc = nn.Linear(6, 3)
        self.drop = nn.Dropout(0.5)

    def forward_features(self, x):
        return self.drop(self.body(self.conv(x))).mean((2, 3))

    def forward(self, x):
        return self.fc(self.forward_features(x))


class _Bomb(nn.Module):
    def forward(self, x):
        raise AssertionError("the forward pass should have stopped at the captured layer")


def _batches(n=3, b=5):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(b, 1, 6, 6, generator=g), torch.randint(0, 3, (b,), generator=g)) for _ in range(n)]


def test_capture_forward_features_and_named_layer():
    torch.manual_seed(0)
    net = _Net().train()
    batches = _batches()
    feats, labels = capture_features(net, batches)
    assert net.training  # mode restored
    net.eval()
    with torch.no_grad():
        ref = torch.cat([net.forward_features(x) for x, _ in batches])
        conv = torch.cat([net.body(net.conv(x)) for x, _ in batches])
    torch.testing.assert_close(feats, ref)  # eval mode: dropout off
    assert labels.tolist() == torch.cat([y for _, y in batches]).tolist()
    f_avg, _ = capture_features(net, batches, layer="body.1")
    torch.testing.assert_close(f_avg, conv.mean((2, 3)))
    f_flat, _ = capture_features(net, batches, layer="body.1", pool="flatten", max_batches=2)
    torch.testing.assert_close(f_flat, conv[:10].flatten(1))


def test_capture_stops_the_forward_at_the_layer_and_reports_errors():
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 4), _Bomb())
    feats, _ = capture_features(model, _batches(2), layer="1")
    assert feats.shape == (10, 4)
    with pytest.raises(ValueError, match="no submodule 'nope'"):
        capture_features(model, _batches(1), layer="nope")
    with pytest.raises(ValueError, match="forward_features"):
        capture_features(model, _batches(1))
    with pytest.raises(ValueError, match="empty"):
        capture_features(_Net(), [])
