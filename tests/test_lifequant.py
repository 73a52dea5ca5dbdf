"""LifeQuant: the reference vectors (docs/lifequant.md, "Reference vectors": computed with the original code's
formulas, run on a CPU in float32), generators, BaLL, ProxQ, baselines, metrics."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import norm
from torch import nn

import paperlib.lifequant as L
from paperlib.models.resnet_cifar import ResNetCifar
from paperlib.quant.core import ActSlot, QuantConv2d, QuantLinear

W = [-1.0, -0.3, 0.0, 0.2, 0.45, 1.1]  # reference vector 1
X = [-0.5, 0.0, 0.03, 1 / 30, 0.1, 0.5, 0.9667, 1.2]  # reference vector 2
S_4_9 = 0.4444444477558136  # float32(4/9)
S_2_3 = 0.6666666865348816  # float32(2/3)


def _w(requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(W, requires_grad=requires_grad)


def _codes(q: torch.Tensor, bits: int) -> list[int]:
    n = 2**bits - 1
    codes = torch.round(q.detach() * n)
    assert torch.allclose(q.detach(), codes / n, atol=1e-7), "not on the k-bit grid"
    return [int(c) for c in codes]


# -------------------------------------------------------------------------------------------- ref. 1 weights


def test_tv1_standardized_weight_and_codes():
    w = _w()
    assert float(w.mean()) == pytest.approx(0.075, abs=1e-7)
    assert float(w.std()) == pytest.approx(0.70834315, abs=1e-7)
    expected = [-0.75881302, -0.26470220, -0.05294044, 0.08823407, 0.26470220, 0.72351938]
    torch.testing.assert_close(L.standardize(w), torch.tensor(expected), atol=1e-7, rtol=0)
    assert _codes(L.quantize_weight(w, 2), 2) == [-2, -1, 0, 0, 1, 2]
    assert _codes(L.quantize_weight(w, 4), 4) == [-11, -4, -1, 1, 4, 11]
    assert _codes(L.quantize_weight(w, 8), 8) == [-193, -67, -13, 22, 67, 184]
    torch.testing.assert_close(
        L.quantize_weight(w, 2), torch.tensor([-0.6666667, -0.3333333, 0, 0, 0.3333333, 0.6666667]),
        atol=1e-7, rtol=0,
    )


def test_tv1_one_bit_is_sign_times_mean_abs():
    e = 0.5083334
    expected = torch.tensor([-e, -e, 0, e, e, e])
    torch.testing.assert_close(L.quantize_weight(_w(), 1), expected, atol=1e-7, rtol=0)


def test_tv1_gradient_flows_through_mean_and_std():
    w = _w(requires_grad=True)
    c = torch.arange(1.0, 7.0)
    (c * L.quantize_weight(w, 4)).sum().backward()
    expected = [0.19378996, -0.37562108, -0.21629882, 0.12520742, 0.37562132, -0.10269809]
    torch.testing.assert_close(w.grad, torch.tensor(expected), atol=1e-6, rtol=0)
    # oracle: with the identity STE the gradient is that of sum(c * standardize(w)) (mean/std not detached)
    w64 = torch.tensor(W, dtype=torch.float64, requires_grad=True)
    (c.double() * (w64 - w64.mean()) / w64.std() * 0.5).sum().backward()
    torch.testing.assert_close(w.grad.double(), w64.grad, atol=1e-6, rtol=0)


def test_tv1_variants_mobilenet_cdf_alignq():
    w = _w()
    assert _codes(L.quantize_weight(w, 4, std=L.MOBILENET_CIFAR_WEIGHT_STD), 4) == [-3, -1, 0, 0, 1, 3]
    u = [-0.87089133, -0.40347511, -0.08432317, 0.14007378, 0.40347505, 0.85211396]
    torch.testing.assert_close(L.cdf_space(w), torch.tensor(u), atol=1e-7, rtol=0)
    w64 = np.array(W)
    oracle = 2 * norm.cdf((w64 - w64.mean()) / w64.std(ddof=1)) - 1  # scipy
    np.testing.assert_allclose(L.cdf_space(w).numpy(), oracle, atol=1e-6)
    assert _codes(L.quantize_weight(w, 4, "cdf"), 4) == [-13, -6, -1, 2, 6, 13]
    codes = torch.tensor([1, 4, 7, 9, 11, 14], dtype=torch.float32)
    torch.testing.assert_close(L.quantize_weight(w, 4, "alignq"), 2 * codes / 15 - 1, atol=1e-7, rtol=0)


def test_unclipped_weight_levels_are_unbounded_and_clip_bounds_them():
    w = torch.randn(64, 64, 3, 3, generator=torch.Generator().manual_seed(0))
    levels = {k: L.quantize_weight(w, k).unique().numel() for k in (2, 4, 8)}
    assert levels == {2: 13, 4: 63, 8: 827}  # more than 2^k levels: not a true k-bit code
    for k in (2, 4, 8):
        n = 2**k - 1
        assert L.quantize_weight(w, k, clip=True).unique().numel() == 2 * n + 1
        assert L.quantize_weight(w, k, "cdf").unique().numel() <= 2 * n + 1
        assert L.quantize_weight(w, k, "alignq").unique().numel() == 2**k
        assert L.quantize_weight(w, k, clip=True).abs().max() <= 1


@pytest.mark.parametrize("quantizer", L.WEIGHT_QUANTIZERS)
def test_32_bits_is_identity(quantizer):
    w = torch.randn(5, 7, requires_grad=True)
    assert L.quantize_weight(w, 32, quantizer) is w
    act = {"standardize": "clamp"}.get(quantizer, quantizer)
    x = torch.randn(3, 4) * 3
    assert L.quantize_activation(x, 32, act) is x
    assert L.quantize_activation(x, 32, "standardize") is x


def test_quantizer_bad_input():
    with pytest.raises(ValueError, match="quantizer"):
        L.quantize_weight(_w(), 4, "lsq")
    with pytest.raises(ValueError, match="bits"):
        L.quantize_weight(_w(), 0)
    with pytest.raises(TypeError, match="bits"):
        L.quantize_weight(_w(), 4.0)
    with pytest.raises(TypeError, match="floating"):
        L.quantize_weight(torch.arange(6), 4)
    with pytest.raises(ValueError, match="at least 2"):
        L.quantize_weight(torch.ones(1), 4)
    with pytest.raises(ValueError, match="alignq"):
        L.quantize_weight(_w(), 1, "alignq")
    with pytest.raises(ValueError, match="std"):
        L.quantize_weight(_w(), 4, std=0)
    with pytest.raises(ValueError, match="quantizer"):
        L.quantize_activation(torch.ones(3), 4, "relu")


# ---------------------------------------------------------------------------------------- ref. 2 activations


def test_tv2_activation_values_ties_and_gradient():
    x = torch.tensor(X, requires_grad=True)
    torch.testing.assert_close(
        L.quantize_activation(x, 2), torch.tensor([0, 0, 0, 0, 0, 0.6666667, 1, 1]), atol=1e-7, rtol=0
    )
    a4 = L.quantize_activation(x, 4)
    assert _codes(a4, 4) == [0, 0, 0, 0, 2, 8, 15, 15]  # ties to even: 0.5 -> 0, 1.5 -> 2, 7.5 -> 8
    torch.testing.assert_close(a4, torch.tensor([0, 0, 0, 0, 0.1333333, 0.5333333, 1, 1]), atol=1e-7, rtol=0)
    expected8 = [0, 0, 0.03137255, 0.03137255, 0.10196079, 0.50196081, 0.96862745, 1]
    torch.testing.assert_close(L.quantize_activation(x, 8), torch.tensor(expected8), atol=1e-7, rtol=0)
    a4.sum().backward()
    assert x.grad.tolist() == [0, 1, 1, 1, 1, 1, 1, 0]  # clamp passes the gradient at 0 and 1 (endpoints)
    assert _codes(L.quantize_activation(torch.tensor(X), 4, "standardize"), 4) == [0, 0, 0, 0, 0, 3, 9, 12]


def test_clamp_inclusive_gradient_at_both_endpoints():
    x = torch.tensor([-0.1, 0.0, 0.3, 1.0, 1.1], requires_grad=True)
    y = L.clamp_inclusive(x, 0.0, 1.0)
    assert y.tolist() == pytest.approx([0.0, 0.0, 0.3, 1.0, 1.0])
    y.sum().backward()
    assert x.grad.tolist() == [0, 1, 1, 1, 0]


def test_cdf_and_alignq_activations_against_scipy():
    x = torch.linspace(-3, 3, 41)
    phi = norm.cdf(x.double().numpy())
    cdf = np.round(2.0 * (2 * phi - 1) * 15) / 15
    np.testing.assert_allclose(L.quantize_activation(x, 4, "cdf").numpy(), cdf, atol=1e-6)
    alignq = 2.0 * (2 * np.round(phi * 15) / 15 - 1)
    np.testing.assert_allclose(L.quantize_activation(x, 4, "alignq").numpy(), alignq, atol=1e-6)
    assert L.quantize_activation(torch.tensor([-0.2, 0.0, 0.4]), 1).tolist() == [0, 0, 1]  # sign(clamp)


# ------------------------------------------------------------------------------------- modules on a model


def test_quantize_lifequant_on_resnet():
    torch.manual_seed(0)
    model = ResNetCifar(8, num_classes=5, in_channels=1)
    x = torch.randn(4, 1, 8, 8)
    model.eval()
    ref = model(x)
    L.quantize_lifequant(model, 32, 32)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(isinstance(m, QuantConv2d) for m in convs)  # stem and 1x1 shortcuts too
    assert not isinstance(model.fc, QuantLinear)  # the classifier stays full precision
    slots = [m for m in model.modules() if isinstance(m, ActSlot)]
    assert slots and all(isinstance(s.quantizer, L.LifeQuantActivation) for s in slots)
    torch.testing.assert_close(model(x), ref, atol=0, rtol=0)  # 32/32 bits: the identity
    L.quantize_lifequant(model, 4, 4, clip=True)
    conv = model.conv0
    assert conv.weight_quantizer.bits == 4 and conv.quantized_weight().unique().numel() <= 31
    out = model(x)
    assert out.shape == (4, 5) and not torch.allclose(out, ref)
    out.sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    L.quantize_lifequant(model, 4, 4, quantizer="cdf")
    assert model.conv0.weight_quantizer.quantizer == "cdf" and slots[0].quantizer.quantizer == "cdf"
    with pytest.raises(ValueError, match="skip"):
        L.quantize_lifequant(model, 4, 4, skip="first")


# --------------------------------------------------------------------------------------- ref. 3 class split


def test_tv3_class_split():
    assert L.class_order(10) == [4, 0, 7, 5, 8, 3, 1, 6, 9, 2]
    assert L.class_split(10, 3, 0.5) == [[4, 0, 7, 5, 8], [7, 5, 8, 3, 1], [8, 3, 1, 6, 9, 2]]
    assert [len(t) for t in L.class_split(100, 3, 1)] == [33, 33, 34]
    assert [len(t) for t in L.class_split(100, 5, 0.25)] == [50, 50, 50, 50, 52]
    t = [set(c) for c in L.class_split(100, 3, 0.25)]
    assert [len(c) for c in t] == [66, 66, 68]
    assert (len(t[0] & t[1]), len(t[1] & t[2]), len(t[0] & t[2])) == (50, 50, 34)
    assert set().union(*t) == set(range(100))
    readme = L.class_split(100, 3, 25, allow_degenerate=True)
    assert readme[:2] == [[8], [91]] and len(readme[2]) == 50


def test_class_split_leaves_global_rng_alone():
    np.random.seed(7)
    expected = np.random.rand()
    np.random.seed(7)
    L.class_split(10, 3, 0.5)
    assert np.random.rand() == expected


def test_class_split_errors():
    with pytest.raises(ValueError, match=r"\[1, 1, 50\].*allow_degenerate|diminish_rate 25.*\[1, 1, 50\]"):
        L.class_split(100, 3, 25)  # the README's --diminish_rate 25
    with pytest.raises(ValueError, match="one class"):
        L.class_split(10, 9, 1.0)  # m = 1
    with pytest.raises(ValueError, match="empty"):
        L.class_split(3, 5, 1.0)  # m = 0
    with pytest.raises(ValueError, match="negative"):
        L.class_split(10, 3, -0.1)
    with pytest.raises(ValueError, match="finite"):
        L.class_split(10, 3, float("nan"))
    with pytest.raises(TypeError, match="num_tasks"):
        L.class_split(10, 3.0, 0.5)
    with pytest.raises(TypeError, match="drop_rate"):
        L.class_split(10, 3, True)


# ------------------------------------------------------------------------------------ ref. 4 replay rows


@pytest.mark.parametrize(
    ("n", "rate"), [(20, 0.2), (24, 0.2), (5, 0.5), (3, 0.5), (33, 0.3), (5, 1.0), (3, 0.1)]  # 2.5, 1.5: ties
)
def test_tv4_replay_positions_match_pandas(n, rate):
    frame = pd.DataFrame({"row": range(n)})
    oracle = frame.sample(frac=rate, replace=False, random_state=123).index.tolist()
    assert L.replay_positions(n, rate) == oracle


def test_tv4_replay_values_and_bad_rates():
    assert L.replay_positions(20, 0.2) == [14, 5, 4, 17]
    assert len(L.replay_positions(24, 0.2)) == 5
    for bad in (0, -0.2, 1.5, float("inf")):
        with pytest.raises(ValueError, match="replay rate|finite"):
            L.replay_positions(20, bad)


# ---------------------------------------------------------------------------- generators on a fake tree


def _fake_tree(root, classes=10, images=4):
    for source in ("train", "test"):
        for c in range(classes):
            d = root / source / f"c{c}"
            d.mkdir(parents=True)
            for i in range(images):
                (d / f"{i}.png").write_bytes(b"png")
    (root / "train" / "c0" / ".hidden.png").write_bytes(b"x")  # skipped, like glob('*/*.*')
    (root / "train" / "c0" / "README").write_text("no extension: skipped")


def _rows(frame: pd.DataFrame) -> list[str]:
    return [p.split("/", 1)[1].rsplit(".", 1)[0] for p in frame["image"]]  # "train/c5/2.png" -> "c5/2"


def _count_classes_oracle(frames: list[pd.DataFrame]) -> dict[str, float]:
    """``count_classes.py`` as shipped, on the written CSVs."""
    counts: dict[int, int] = {}
    for f in frames:
        for c in f["label"]:
            counts[c] = counts.get(c, 0) + 1
    n = torch.Tensor(list(counts.values()))
    weights = 1 / ((n / torch.sum(n) + 1 / len(counts)) * len(counts))
    return {str(k): weights[i].item() for i, k in enumerate(counts)}


def test_tv3_tv4_tv5_class_incremental_files(tmp_path):
    _fake_tree(tmp_path / "data")
    out = tmp_path / "out"
    files = L.write_class_incremental(tmp_path / "data", out, num_tasks=3, drop_rate=0.5)
    train = [pd.read_csv(out / f"train{t}.csv") for t in range(3)]
    replay = [pd.read_csv(out / f"replay{t}.csv") for t in range(3)]
    test = [pd.read_csv(out / f"test{t}.csv") for t in range(3)]
    assert list(train[0].columns) == ["image", "label"] and len(train[0]) == 20 and len(train[2]) == 24
    assert train[0]["image"].tolist()[:4] == [f"train/c4/{i}.png" for i in range(4)]
    assert train[0]["label"].tolist()[:4] == [4, 4, 4, 4]
    assert (out / "train0.csv").read_text().startswith("image,label\ntrain/c4/0.png,4\n")
    assert _rows(replay[0]) == ["c5/2", "c0/1", "c0/0", "c8/1"]
    assert _rows(replay[1]) == ["c3/2", "c5/1", "c5/0", "c1/1"]
    assert _rows(replay[2]) == ["c3/1", "c2/0", "c2/1", "c9/2", "c6/3"]
    for t in range(3):  # pandas is the oracle of replayDataGeneator.py
        oracle = train[t].sample(frac=0.2, replace=False, random_state=123).reset_index(drop=True)
        pd.testing.assert_frame_equal(replay[t], oracle)
        assert set(test[t]["label"]) == set(train[t]["label"]) == set(files.split.classes[t])
        assert test[t]["image"].str.startswith("test/").all()
    reweight = [json.loads((out / f"reweight_{t}.json").read_text()) for t in range(3)]
    assert list(reweight[0].items()) == [("4", 0.5), ("0", 0.5), ("7", 0.5), ("5", 0.5), ("8", 0.5)]
    assert list(reweight[1].items()) == [
        ("7", 0.5), ("5", S_4_9), ("8", S_4_9), ("3", 0.5), ("1", 0.5), ("0", S_2_3)
    ]
    assert '"8": 0.4444444477558136' in (out / "reweight_1.json").read_text()
    for t in range(3):
        assert reweight[t] == _count_classes_oracle([train[t], *replay[:t]])
    manifest = json.loads((out / "split.json").read_text())
    assert manifest["classes"] == L.class_split(10, 3, 0.5) and manifest["class_names"][4] == "c4"
    assert not list(out.glob(".*")) and not list(out.glob("*.tmp"))  # atomic writes leave no temp file


def test_generator_any_number_of_tasks_and_rewrite(tmp_path):
    _fake_tree(tmp_path / "data")
    out = tmp_path / "out"
    L.write_class_incremental(tmp_path / "data", out, num_tasks=3, drop_rate=0.5)
    files = L.write_class_incremental(tmp_path / "data", out, num_tasks=4, drop_rate=0.5, replay_rate=0.5)
    assert [p.name for p in files.train] == ["train0.csv", "train1.csv", "train2.csv", "train3.csv"]
    assert [len(c) for c in files.split.classes] == [4, 4, 4, 4]  # m = int(10 / 2.5) = 4, step 2
    for t in range(4):
        tr = pd.read_csv(out / f"train{t}.csv")
        assert len(tr) == 16 and len(pd.read_csv(out / f"replay{t}.csv")) == 8
        scale = L.read_reweight(out / f"reweight_{t}.json")
        assert scale == L.ball_scale(files.split.counts[t])
    assert json.loads((out / "split.json").read_text())["num_tasks"] == 4


def test_generator_errors(tmp_path):
    _fake_tree(tmp_path / "data")
    with pytest.raises(ValueError, match="one class"):
        L.write_class_incremental(tmp_path / "data", tmp_path / "o", num_tasks=9, drop_rate=1.0)
    with pytest.raises(ValueError, match="replay rate"):
        L.write_class_incremental(tmp_path / "data", tmp_path / "o", 3, drop_rate=0.5, replay_rate=0)
    (tmp_path / "data" / "test" / "extra").mkdir()
    with pytest.raises(ValueError, match="same class folders"):
        L.write_class_incremental(tmp_path / "data", tmp_path / "o", num_tasks=3, drop_rate=0.5)
    with pytest.raises(ValueError, match="not a directory"):
        L.write_class_incremental(tmp_path / "nowhere", tmp_path / "o", num_tasks=3, drop_rate=0.5)


def _domain_tree(root, domains, classes, subdir):
    for dom in domains:
        for source in ("train", "test"):
            for j, c in enumerate(classes):
                d = root / dom / subdir / source / c if subdir else root / dom / source / c
                d.mkdir(parents=True)
                for i in range(2 + j % 2):
                    (d / f"{dom}_{i}.jpg").write_bytes(b"jpg")


def test_domain_incremental_office_and_clef(tmp_path):
    office = ["back_pack", "bike", "calculator"]
    _domain_tree(tmp_path / "office", ["webcam", "dslr", "amazon"], office, "images")
    files = L.write_domain_incremental(tmp_path / "office", tmp_path / "o", **L.OFFICE31)
    assert files.class_names == office and files.split.classes == [[0, 1, 2]] * 3
    for t, dom in enumerate(["webcam", "dslr", "amazon"]):
        tr = pd.read_csv(tmp_path / "o" / f"train{t}.csv")
        assert tr["image"].tolist()[:2] == [f"{dom}/images/train/back_pack/{dom}_{i}.jpg" for i in range(2)]
        assert tr["label"].tolist() == [0, 0, 1, 1, 1, 2, 2]
        rp = pd.read_csv(tmp_path / "o" / f"replay{t}.csv")
        pd.testing.assert_frame_equal(rp, tr.sample(frac=0.5, random_state=123).reset_index(drop=True))
        te = pd.read_csv(tmp_path / "o" / f"test{t}.csv")
        assert te["image"].str.startswith(f"{dom}/images/test/").all()
    clef = [str(i) for i in range(11)]  # numeric labels: folder "10" is class 10, not sorted position 2
    _domain_tree(tmp_path / "clef", ["b", "c", "i", "p"], clef, "")
    files = L.write_domain_incremental(tmp_path / "clef", tmp_path / "c", **L.IMAGECLEF)
    tr = pd.read_csv(tmp_path / "c" / "train3.csv")
    assert tr.loc[tr["label"] == 10, "image"].str.startswith("p/train/10/").all()
    assert len(files.reweight) == 4 and files.split.num_tasks == 4
    with pytest.raises(ValueError, match="numeric"):
        L.write_domain_incremental(tmp_path / "office", tmp_path / "x", ["webcam"], subdir="images",
                                   class_names="numeric")
    with pytest.raises(ValueError, match="distinct"):
        L.write_domain_incremental(tmp_path / "office", tmp_path / "x", ["webcam", "webcam"])


# ------------------------------------------------------------------------------------- in-memory splits


def test_in_memory_split_matches_the_test_vectors():
    labels = np.repeat(np.arange(10), 4)  # position 4c + i = image i of class c, as the fake tree
    split = L.class_incremental_split(torch.as_tensor(labels), labels, num_tasks=3, drop_rate=0.5)

    def rows(idx):
        return [f"c{i // 4}/{i % 4}" for i in idx]

    assert rows(split.train[0])[:5] == ["c4/0", "c4/1", "c4/2", "c4/3", "c0/0"]
    assert rows(split.replay[0]) == ["c5/2", "c0/1", "c0/0", "c8/1"]
    assert rows(split.replay[2]) == ["c3/1", "c2/0", "c2/1", "c9/2", "c6/3"]
    assert split.scale[1] == {7: 0.5, 5: S_4_9, 8: S_4_9, 3: 0.5, 1: 0.5, 0: S_2_3}
    assert split.counts[1] == {7: 4, 5: 5, 8: 5, 3: 4, 1: 4, 0: 2}
    assert len(split.training_indices(1)) == 24 and len(split.training_indices(1, replay=False)) == 20
    assert split.replay_before(0).size == 0 and split.replay_before(2).size == 8
    assert np.isin(split.replay[1], split.train[1]).all()
    with pytest.raises(ValueError, match="task"):
        split.training_indices(3)


def test_domain_split_in_memory():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 60)
    domains = np.repeat(["a", "b", "c"], 20)
    split = L.domain_incremental_split(labels, domains, labels, domains, ["c", "a"])
    assert split.num_tasks == 2
    assert (split.train[0] >= 40).all() and (split.train[1] < 20).all()
    assert (np.diff(labels[split.train[0]]) >= 0).all()  # grouped by class
    assert len(split.replay[0]) == 10
    with pytest.raises(ValueError, match="no sample"):
        L.domain_incremental_split(labels, domains, labels, domains, ["z"])


# ------------------------------------------------------------------------------------------ ref. 5/6 BaLL


def test_tv5_ball_scale_float32():
    scale = L.ball_scale({7: 4, 5: 5, 8: 5, 3: 4, 1: 4, 0: 2})
    assert list(scale) == [7, 5, 8, 3, 1, 0]
    assert scale == {7: 0.5, 5: S_4_9, 8: S_4_9, 3: 0.5, 1: 0.5, 0: S_2_3}
    assert L.ball_scale({4: 4, 0: 4, 7: 4}) == {4: 0.5, 0: 0.5, 7: 0.5}
    counts = {0: 1, 1: 10, 2: 100}
    n = np.array([1, 10, 100], np.float64)
    np.testing.assert_allclose(list(L.ball_scale(counts).values()), 1 / (1 + 3 * n / n.sum()), rtol=1e-6)
    assert L.class_counts([3, 1, 3], torch.tensor([1, 0])) == {3: 2, 1: 2, 0: 1}
    with pytest.raises(ValueError, match="positive"):
        L.ball_scale({0: 0})
    with pytest.raises(ValueError, match="empty"):
        L.ball_scale({})


PHI = [[2, 0.5, -1, 0], [0.1, 1.5, 0.3, -0.7], [-0.4, 0.2, 1, 0.9]]
SCALE = {0: 0.5, 1: S_4_9, 2: S_2_3, 3: 1.0}


def test_tv6_ball_forms():
    phi, y = torch.tensor(PHI), torch.tensor([0, 2, 3])
    assert float(F.cross_entropy(phi, y)) == pytest.approx(1.0347084, abs=1e-6)
    assert float(L.ball_loss(phi, y, SCALE, "softmax_add")) == pytest.approx(1.0024716, abs=1e-6)
    assert float(L.ball_loss(phi, y, SCALE, "mult")) == pytest.approx(0.9986473, abs=1e-6)
    assert float(L.ball_loss(phi, y, SCALE)) == pytest.approx(0.8815422, abs=1e-6)  # "log" is the default
    missing = {str(k): v for k, v in SCALE.items() if k != 3}  # JSON keys; class 3 missing -> s = 1
    vec = torch.tensor(list(SCALE.values()))
    for form in L.BALL_FORMS:
        ref = L.ball_loss(phi, y, SCALE, form)
        assert float(L.ball_loss(phi, y, missing, form)) == float(ref)
        assert float(L.ball_loss(phi, y, vec, form)) == float(ref)
        assert float(L.BaLLLoss(SCALE, form)(phi, y)) == float(ref)
    for form in ("log", "mult"):  # with every s_c = 1 these two forms are plain cross-entropy
        assert float(L.ball_loss(phi, y, {}, form)) == pytest.approx(float(F.cross_entropy(phi, y)), abs=1e-7)


def test_ball_log_form_gradient():
    phi = torch.tensor(PHI, requires_grad=True)
    y = torch.tensor([0, 2, 3])
    L.ball_loss(phi, y, SCALE).backward()
    s = torch.tensor(list(SCALE.values()))
    p = torch.softmax(phi.detach() + s.log(), 1)
    torch.testing.assert_close(phi.grad, (p - F.one_hot(y, 4)) / 3, atol=1e-7, rtol=0)


def test_ball_bad_input():
    phi, y = torch.tensor(PHI), torch.tensor([0, 2, 3])
    with pytest.raises(ValueError, match="form"):
        L.ball_loss(phi, y, SCALE, "focal")
    with pytest.raises(ValueError, match="class 7"):
        L.ball_loss(phi, y, {7: 0.5})
    with pytest.raises(ValueError, match="positive"):
        L.ball_loss(phi, y, {1: 0.0})
    with pytest.raises(ValueError, match="labels"):
        L.ball_loss(phi, torch.tensor([0, 1]), SCALE)
    with pytest.raises(ValueError, match="shape"):
        L.ball_loss(phi, y, torch.ones(3))


# --------------------------------------------------------------------------- ProxQ importance and penalty


def _batches(xs, ys):
    return [(torch.tensor(x), torch.tensor(y)) for x, y in zip(xs, ys, strict=True)]


def _mse(out, y):
    return ((out.squeeze(1) - y) ** 2).mean()


def test_importance_and_penalty_hand_computed():
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(2.0)
    # batch 1: x = [1, 3], y = [1, 2]: residual [1, 4], grad = mean(2 r x) = 13; batch 2: grad = 2 * 2 * 1 = 4
    loaders = [None, _batches([[[1.0], [3.0]]], [[1.0, 2.0]]), _batches([[[1.0]]], [[0.0]])]
    fisher = L.importance(model, loaders, _mse)
    assert fisher["weight"].item() == pytest.approx((13**2 + 4**2) / 2)  # / number of batches, not samples
    old = L.snapshot(model)
    with torch.no_grad():
        model.weight.fill_(3.0)
    pen = L.prox_penalty(model, old, fisher)
    assert pen.item() == pytest.approx(100 * 92.5 * 1.0)
    pen.backward()
    assert model.weight.grad.item() == pytest.approx(2 * 100 * 92.5 * 1.0)
    assert L.prox_penalty(model, old, fisher, lam=1.0).item() == pytest.approx(92.5)
    assert L.importance(model, [None], _mse)["weight"].item() == 0  # task 0: F = 0, penalty 0
    assert L.prox_penalty(model, old, {}).item() == 0


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.ReLU())
        self.fc = nn.Linear(5, 4)

    def forward_features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.fc(self.forward_features(x))


def _tiny_setup():
    torch.manual_seed(0)
    model = _Tiny()
    model.train()
    for _ in range(3):  # give BN non-trivial running statistics
        model(torch.randn(8, 3) * 2 + 1)
    g = torch.Generator().manual_seed(1)
    loaders = [[(torch.randn(6, 3, generator=g), torch.randint(0, 4, (6,), generator=g)) for _ in range(2)],
               [(torch.randn(3, 3, generator=g), torch.randint(0, 4, (3,), generator=g))]]
    return model, loaders


def _direct(model, loaders, objective, power):
    """Per-batch autograd.grad in eval mode, then the mean over batches: the oracle of every importance."""
    params = dict(model.named_parameters())
    model.eval()
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    batches = [b for ld in loaders for b in ld]
    for x, y in batches:
        grads = torch.autograd.grad(objective(x, y), list(params.values()), allow_unused=True)
        for n, gr in zip(params, grads, strict=True):
            if gr is not None:
                total[n] += gr.square() if power == 2 else gr.abs()
    model.train()
    return {n: t / len(batches) for n, t in total.items()}


def test_importance_ewc_mas_scp_against_direct_computation():
    model, loaders = _tiny_setup()
    ball = L.BaLLLoss(SCALE)
    got = L.importance(model, loaders, ball)
    assert model.training and all(p.grad is None for p in model.parameters())  # mode restored, grads cleared
    want = _direct(model, loaders, lambda x, y: ball(model(x), y), 2)
    assert set(got) == set(want) == {n for n, _ in model.named_parameters()}  # conv/BN/FC: all parameters
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-7, rtol=1e-5)
    assert got["body.1.weight"].abs().sum() > 0  # BN gamma is in F
    ewc = L.method_importance("ewc", model, loaders)
    want = _direct(model, loaders, lambda x, y: F.cross_entropy(model(x), y), 2)
    for n in want:
        torch.testing.assert_close(ewc[n], want[n], atol=1e-7, rtol=1e-5)
    mas = L.method_importance("mas", model, loaders)
    want = _direct(model, loaders, lambda x, y: (model(x) ** 2).sum(1).mean(), 1)
    for n in want:
        torch.testing.assert_close(mas[n], want[n], atol=1e-7, rtol=1e-5)
    scp = L.method_importance("scp", model, loaders, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)

    def scp_objective(x, y):
        z = model(x)
        xi = torch.randn(4, 50, generator=g, dtype=torch.float64)
        xi = (xi / xi.norm(dim=0)).T.float()
        return sum(v @ z.mean(0) for v in xi) / 50

    want = _direct(model, loaders, scp_objective, 1)
    for n in want:
        torch.testing.assert_close(scp[n], want[n], atol=1e-6, rtol=1e-4)
    assert all(v.abs().sum() == 0 for v in L.method_importance("original", model, loaders).values())


def test_importance_uses_eval_mode_bn():
    model, loaders = _tiny_setup()
    got = L.importance(model, loaders)
    model.train()  # the same computation with batch statistics differs
    params = dict(model.named_parameters())
    x, y = loaders[0][0]
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(params.values()))
    assert not all(torch.allclose(g.square() / 3, got[n]) for n, g in zip(params, grads, strict=True))


def test_method_names_and_loader_errors():
    model, loaders = _tiny_setup()
    for name in ("si", "rwalk"):
        with pytest.raises(NotImplementedError, match="no-op in the original"):
            L.method_importance(name, model, loaders)
    with pytest.raises(ValueError, match="unknown"):
        L.method_importance("ours2", model, loaders)
    for wrong in (loaders[0][0], loaders[0], loaders[0][0][0]):  # a batch, a bare loader, a tensor
        with pytest.raises(TypeError, match="list of loaders"):
            L.importance(model, wrong)
    with pytest.raises(TypeError, match="len"):
        L.importance(model, [iter(loaders[0])])
    with pytest.raises(ValueError, match="not parameters"):
        L.prox_penalty(model, L.snapshot(model), {"nope": torch.zeros(1)})


def test_qnoise_term_against_a_loop_and_in_importance():
    model, loaders = _tiny_setup()
    model.eval()
    x, _ = loaders[0][0]
    h = model.forward_features(x)
    z = model.fc(h)
    got = L.qnoise_loss(h, z, model.fc, bits=4, repeats=7, generator=torch.Generator().manual_seed(3))
    eps = torch.rand((7, *h.shape), generator=torch.Generator().manual_seed(3))
    delta = 2.0 / 15
    loop = sum(
        -torch.log(torch.mean(F.log_softmax(model.fc(h + (e * 2 - 1) * delta), 1) * F.log_softmax(z, 1)))
        for e in eps
    ) / 7
    torch.testing.assert_close(got, loop, atol=1e-6, rtol=1e-6)
    plain = L.importance(model, loaders)
    noisy = L.importance(model, loaders, qnoise_bits=4, qnoise_repeats=5, generator=torch.Generator())
    assert set(noisy) == set(plain) and any(not torch.equal(noisy[n], plain[n]) for n in plain)
    with pytest.raises(TypeError, match="forward_features"):
        L.importance(nn.Linear(3, 4), loaders, qnoise_bits=4)


def test_tv8_cdf_space_error_and_its_penalty():
    w = _w(requires_grad=True)
    err = L.cdf_space_error(w, 4)
    expected = [1.12658e-05, 9.26693e-06, 4.70840e-05, 1.79745e-05, 9.26677e-06, 3.88072e-05]
    torch.testing.assert_close(err.detach(), torch.tensor(expected), rtol=1e-4, atol=0)
    assert float(err.detach().sum()) == pytest.approx(1.3366518e-04, rel=1e-6)
    err.sum().backward()
    assert w.grad.abs().max() < 1e-9  # the original's STE makes the term gradient-free
    w.grad = None
    L.cdf_space_error(w, 4, straight_through=False).sum().backward()
    assert w.grad.abs().max() > 1e-6
    assert L.cdf_space_error(w, 32).abs().sum() == 0
    model = L.quantize_lifequant(ResNetCifar(8, num_classes=3, in_channels=1), 4, 4)
    pen = L.cdf_prox_penalty(model, 4, beta=2.0)
    direct = sum(L.cdf_space_error(m.weight, 4).sum() for m in model.modules() if isinstance(m, QuantConv2d))
    assert float(pen.detach()) == pytest.approx(2.0 * float(direct.detach()), rel=1e-6)
    with pytest.raises(ValueError, match="quantized"):
        L.cdf_prox_penalty(nn.Linear(2, 2), 4, 1.0)


# ------------------------------------------------------------------------------------------------ metrics


def test_lifelong_metrics():
    nan = math.nan
    acc = [[0.9, nan, nan], [0.5, 0.8, nan], [0.3, 0.6, 0.7]]
    m = L.lifelong_metrics(acc)
    assert m["A_T"] == pytest.approx(1.6 / 3)
    assert m["forgetting"] == pytest.approx([0.6, 0.2])
    assert m["F_T"] == pytest.approx(0.4)
    assert m["BWT"] == pytest.approx(-0.4)
    one = L.lifelong_metrics([[0.7]])
    assert one["A_T"] == 0.7 and math.isnan(one["F_T"]) and math.isnan(one["BWT"])
    with pytest.raises(ValueError, match="square"):
        L.lifelong_metrics([[0.1, 0.2]])
    with pytest.raises(ValueError, match="finite"):
        L.lifelong_metrics([[0.9, nan], [nan, 0.8]])


def test_forgetting_plus_bwt_is_the_rise_after_learning():
    """docs/lifequant.md, "Metrics": F_T + BWT = mean_k (max_{k<=l<T-1} a[l,k] - a[k,k]) >= 0, so F_T = -BWT exactly
    when no old task improved after it was learned; here task 0 rose from 0.5 to 0.9 after task 1."""
    nan = math.nan
    rose = [[0.5, nan, nan], [0.9, 0.8, nan], [0.3, 0.6, 0.7]]
    m = L.lifelong_metrics(rose)
    assert m["F_T"] == pytest.approx(0.4) and m["BWT"] == pytest.approx(-0.2)
    assert L.forgetting_minus_bwt(rose) == pytest.approx(0.2) == pytest.approx(m["F_T"] + m["BWT"])
    rng = np.random.default_rng(0)
    for T in (2, 3, 5):
        for _ in range(20):
            a = np.tril(rng.uniform(size=(T, T)))
            m = L.lifelong_metrics(a)
            gap = L.forgetting_minus_bwt(a)
            assert gap >= 0 and gap == pytest.approx(m["F_T"] + m["BWT"], abs=1e-12)
            mono = np.tril(np.sort(rng.uniform(size=(T, T)), axis=0)[::-1])  # every column only falls
            assert L.forgetting_minus_bwt(mono) == 0.0
            assert L.lifelong_metrics(mono)["F_T"] == pytest.approx(-L.lifelong_metrics(mono)["BWT"], abs=1e-12)
    assert math.isnan(L.forgetting_minus_bwt([[0.7]]))


def test_learned_tasks_and_forgetting_on_learned_tasks():
    """A task never learned (a[2,2] = 0, as paper mode's task 2 in an early digits run) cannot be forgotten: its
    f_k is ~0 and would lower F_T; forgetting_on judges the learned tasks only."""
    nan = math.nan
    acc = [[1.0, nan, nan, nan], [0.0, 0.83, nan, nan], [0.2, 0.76, 0.0, nan], [0.4, 0.37, 0.01, 0.7]]
    assert L.learned_tasks(acc) == [True, True, False, True]
    assert L.learned_tasks(acc, 0.0) == [True] * 4
    assert L.forgetting_per_task(acc) == pytest.approx([0.6, 0.46, -0.01])
    assert L.forgetting_on(acc, [0, 1]) == pytest.approx(0.53)
    assert L.lifelong_metrics(acc)["F_T"] == pytest.approx(1.05 / 3)  # lower: the unlearned task counts as ~0
    assert math.isnan(L.forgetting_on(acc, []))
    with pytest.raises(ValueError, match="not old tasks"):
        L.forgetting_on(acc, [3])
    with pytest.raises(ValueError, match="threshold"):
        L.learned_tasks(acc, 50)


def test_ball_log_form_trains_rare_classes_lower_logits():
    """docs/lifequant.md, "BaLL": at the optimum of CE(φ + log s, y) over class frequencies p, softmax(φ + log s)
    = p, i.e. φ = log p - log s + const. s_c = 1/(1 + C n_c/N) is largest for the rarest class, so its trained
    logit ends *below* plain CE's (φ = log p): the opposite of a balanced softmax. And at equal logits a rare
    sample's BaLL gradient is smaller than its CE gradient (its influence shrinks)."""
    counts = {0: 300, 1: 300, 2: 60}  # two new classes and one replay-only class
    s = L.ball_scale(counts)
    assert s[2] > s[0] == s[1]
    n = torch.tensor([float(v) for v in counts.values()])
    p = n / n.sum()
    y = torch.cat([torch.full((int(v),), c) for c, v in counts.items()])
    svec = torch.tensor([s[c] for c in range(3)])
    logits = {"ce": p.log(), "log": p.log() - svec.log()}  # the claimed optima (a bias-only model, convex loss)
    for form, b in logits.items():
        b = b.clone().requires_grad_(True)
        z = b.expand(len(y), 3)
        (F.cross_entropy(z, y) if form == "ce" else L.ball_loss(z, y, s)).backward()
        assert b.grad.abs().max() < 1e-6, (form, b.grad)  # zero gradient: the minimum
        logits[form] = logits[form] - logits[form][0]
    assert logits["log"][2] < logits["ce"][2] - 0.4  # log(s_2 / s_0) = 0.62 lower
    z = torch.zeros(1, 3, requires_grad=True)
    L.ball_loss(z, torch.tensor([2]), s).backward()
    g_ball = z.grad[0, 2].abs().item()
    z.grad = None
    F.cross_entropy(z, torch.tensor([2])).backward()
    assert g_ball < z.grad[0, 2].abs().item()


def test_importance_vanishes_on_data_the_model_fits():
    """docs/lifequant.md, "ProxQ": F is a squared loss gradient at the labels, so on data the model already fits (as
    task 0's replay right after task 0) it nearly vanishes, and with it the penalty."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, generator=gen)
    x[:, 0] += x[:, 0].sign()  # a margin of 1 between the two classes
    y = (x[:, 0] > 0).long()
    model = nn.Linear(2, 2)
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    before = sum(float(v.sum()) for v in L.importance(model, [batches], F.cross_entropy).values())
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert F.cross_entropy(model(x), y).item() < 0.02
    after = sum(float(v.sum()) for v in L.importance(model, [batches], F.cross_entropy).values())
    assert after < 1e-3 * before
