"""The ClimbQ/Levene notebook drivers: data splits, methods, training hooks, stored models, Levene analysis."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from paperlib import climbq_experiment as cq
from paperlib.climbq import ClimbQActivation, ClimbQWeight, HomoVarLoss, batch_sigma, quantize_activation
from paperlib.data.errors import DataError
from paperlib.data.load import load_dataset
from paperlib.data.long_tail import long_tail_subset
from paperlib.levene import capture_features, dispersion, homogeneity_bounds, levene_features
from paperlib.models import create_model
from paperlib.presets import resolve
from paperlib.quant import DoReFaWeight, QuantConv2d
from paperlib.quant.core import ActSlot
from paperlib.runs import check_json_native, write_json
from paperlib.train import evaluate

TINY = {"gammas": [10], "bits": [4], "seeds": [0], "fp_epochs": 1, "qat_epochs": 2, "batch_size": 128}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny 8x8 ResNets are bound by per-op overhead: one thread is faster (and the drivers use one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", size=8, channels=1)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, digits):
    """One tiny ClimbQ run (gamma 10, W4A4, seed 0, 1 + 2 epochs) with stored models, and its Levene analysis."""
    root = tmp_path_factory.mktemp("climbq")
    cfg = resolve("climbq", "smoke", **TINY)
    mdir = root / "work" / "models"
    metrics = cq.run_climbq(cfg, "cpu", runs_root=root / "runs", models_dir=mdir)
    source = cq.ClimbQModels(json.loads(json.dumps(metrics)), mdir, "trained")
    lev = cq.run_levene(resolve("levene", "smoke"), source, device="cpu")
    return {"root": root, "cfg": cfg, "metrics": metrics, "models_dir": mdir, "source": source, "levene": lev}


# --------------------------------------------------------------------------------------------- data


def test_long_tail_splits_relabel_by_rank_and_hold_out_a_stratified_half(digits):
    train, test = digits
    sp = cq.make_long_tail_splits(train, test, 10, min_count=1)
    lt = long_tail_subset(train.y, 10, min_count=1)
    assert sp.counts == lt.counts == sp.train.class_counts()
    assert sp.order == lt.order and sp.classes == [str(c) for c in lt.order]
    np.testing.assert_array_equal(sp.train.y.numpy(), lt.labels)
    np.testing.assert_array_equal(sp.full_test.y.numpy(), lt.relabel(test.y.numpy()))
    # val and test are disjoint halves of the balanced test split, stratified per class
    v, t = sp.val.source_index.tolist(), sp.test.source_index.tolist()
    assert not set(v) & set(t) and sorted(v + t) == sorted(test.source_index.tolist())
    full = np.bincount(sp.full_test.y.numpy(), minlength=10)
    assert np.all(np.abs(np.bincount(sp.val.y.numpy(), minlength=10) - full / 2) <= 0.5)
    assert sp.selection_set is sp.val
    orig = cq.make_long_tail_splits(train, test, 10, min_count=1, selection="best_test")
    assert orig.val is None and orig.test is orig.full_test and orig.selection_set is orig.test


def test_long_tail_split_errors(digits):
    train, test = digits
    with pytest.raises(ValueError, match="selection='nope'.*best_test"):
        cq.make_long_tail_splits(train, test, 10, selection="nope")
    with pytest.raises(DataError, match="gamma=100.*0 training samples.*min_count=1"):
        cq.make_long_tail_splits(train, test, 100)  # the recursive floor empties the last class on this split
    with pytest.raises(ValueError, match=r"val_fraction=1.5 must be in \(0, 1\)"):
        cq.stratified_split([0, 0, 1, 1], 1.5)
    with pytest.raises(ValueError, match="class 1 has 1 test samples.*best_test"):
        cq.stratified_split([0, 0, 0, 1], 0.5)


def test_paper_preset_without_data_dir_names_the_missing_folder():
    cfg = resolve("climbq", "paper")
    with pytest.raises(DataError, match="needs data_dir.*cifar-10-batches-py"):
        cq.run_climbq(cfg, "cpu", data_dir="")
    with pytest.raises(DataError, match="syndigits.*needs data_dir.*train/<digit>/"):
        cq.run_climbq({**cfg, "dataset": "syndigits"}, "cpu", data_dir="")


def test_syndigits_folder_is_loaded_with_the_shipped_class_order(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 2)):
        for d in range(10):
            (tmp_path / split / str(d)).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(
                    tmp_path / split / str(d) / f"{d}_{i:05d}.png")
    cfg = {"dataset": "syndigits", "image_size": 28}
    train, test, order = cq.load_base_data(cfg, torch.device("cpu"), str(tmp_path))
    assert train.x.shape == (30, 3, 28, 28) and test.x.shape == (20, 3, 28, 28)
    assert [train.classes[c] for c in order] == list("9170586234")  # SYNDIGITS_LT_ORDER, label 0 = head


def test_check_config_rejects_bad_settings():
    cfg = resolve("climbq", "smoke")
    with pytest.raises(ValueError, match=r"bits=\[1\].*2..8"):
        cq.check_config({**cfg, "bits": [1]})
    with pytest.raises(ValueError, match="must be >= 1"):
        cq.check_config({**cfg, "gammas": [0.5]})
    with pytest.raises(ValueError, match="homovar_counts"):
        cq.check_config({**cfg, "homovar_counts": "x"})
    with pytest.raises(ValueError, match="unknown methods"):
        cq.run_climbq(cfg, "cpu", methods=["ClimbQ"])
    with pytest.raises(ValueError, match=r"qat_epochs=-1: epochs must be an int >= 0 \(fp_epochs=0: fine-tune"):
        cq.check_config({**cfg, "qat_epochs": -1})
    with pytest.raises(ValueError, match="fp_epochs=2.0: epochs must be an int >= 0"):
        cq.check_config({**cfg, "fp_epochs": 2.0})
    with pytest.raises(ValueError, match="fp_epochs=0 and qat_epochs=0: every model would stay"):
        cq.run_climbq(resolve("climbq", "smoke", fp_epochs=0, qat_epochs=0), "cpu")
    cq.check_config(resolve("climbq", "smoke", fp_epochs=0))  # a notebook's 0 is a value (resolve keeps it)
    cq.check_config(resolve("climbq", "smoke", qat_epochs=0))


def _splits(cfg, gamma=10):
    train, test, order = cq.load_base_data(cfg, torch.device("cpu"))
    return cq.make_long_tail_splits(train, test, gamma, mode=cfg["lt_mode"], min_count=cfg["lt_min_count"],
                                    selection=cfg["selection"], val_fraction=cfg["val_fraction"],
                                    split_seed=cfg["split_seed"], class_order=order)


def test_qat_epochs_0_evaluates_the_quantized_models_without_fine_tuning(tmp_path, monkeypatch):
    """Post-training quantization: no fit after the FP32 start, every method is the quantized FP32 net evaluated
    as is (ClimbQ+CE == ClimbQ+HomoVar), HomoVar's bounds measured on the training batches without an update."""
    fits = []
    monkeypatch.setattr(cq, "fit", lambda *a, **k: fits.append(a) or pytest.fail("fine-tuned despite qat_epochs=0"))
    cfg = resolve("climbq", "smoke", **{**TINY, "qat_epochs": 0})
    m = cq.run_climbq(cfg, "cpu", runs_root=tmp_path, models_dir=tmp_path / "models")
    rows = {r["method"]: r for r in m["per_seed"]}
    assert set(rows) == set(cq.METHODS) and not fits
    for method in cq.QUANT_METHODS:
        assert rows[method]["best_epoch"] == -1 and m["history"][f"10/W4A4/{method}/0"] == []
    for col in ("top1", "balanced_accuracy", "per_class_accuracy"):
        assert rows[cq.CLIMBQ_CE][col] == rows[cq.CLIMBQ_HV][col]
    # reference: the stored FP32 start quantized and evaluated directly
    fp_entry = next(e for e in m["models"]["entries"] if e["method"] == cq.FP32)
    fp = cq.load_model(fp_entry, cfg, tmp_path / "models")
    sp = _splits(cfg)
    for method in cq.QUANT_METHODS:
        ref = evaluate(cq.quantize_for_method(fp, method, 4, cfg), sp.test)
        assert rows[method]["top1"] == ref["top1"], method
    (hv,) = m["homovar"]
    assert hv["gamma"] == 10 and hv["bits"] == 4 and len(hv["n_lb"]) == len(hv["weights"]) == 10
    assert 0 <= hv["fraction_out"][0] <= 1 and m["sigma_max_deviation"] is None
    bounds = next(c for c in m["claims"] if c["id"].startswith("bounds-rarely-bind"))
    assert bounds["verdict"] == "undecidable" and "not recorded" in bounds["note"]  # no training steps to judge


def test_fp_epochs_0_fine_tunes_from_the_seeded_init(tmp_path, monkeypatch):
    monkeypatch.setattr(cq, "pretrained_fp32", lambda *a, **k: pytest.fail("pretrained despite fp_epochs=0"))
    cfg = resolve("climbq", "smoke", **{**TINY, "fp_epochs": 0, "qat_epochs": 1})
    m = cq.run_climbq(cfg, "cpu", runs_root=tmp_path, methods=[cq.FP32, cq.UNIFORM])
    rows = {r["method"]: r for r in m["per_seed"]}
    torch.manual_seed(0)
    init = create_model("resnet20", **cq.model_kwargs(cfg, 10, 1))
    sp = _splits(cfg)
    assert rows[cq.FP32]["top1"] == evaluate(init, sp.test)["top1"] and rows[cq.FP32]["best_epoch"] == -1
    assert len(m["history"][f"10/W4A4/{cq.UNIFORM}/0"]) == 1 and rows[cq.UNIFORM]["best_epoch"] == 0


# --------------------------------------------------------------------------------------------- models


def test_symmetric_uniform_activation_has_climbq_codes_and_a_clipped_ste():
    act = cq.SymmetricUniformActivation(4, act_range=2.0)
    x = torch.linspace(-3, 3, 601, requires_grad=True)
    y = act(x)
    levels = 2.0 * (2 * torch.arange(16) / 15 - 1)

    def code(v):  # index of the nearest level; every value must sit on a level
        d = (v.detach()[:, None] - levels).abs()
        assert float(d.min(1).values.max()) < 1e-6
        return set(d.argmin(1).tolist())

    assert code(y) == set(range(16))  # all 2^k codes used, no zero level
    assert float(act(torch.zeros(1))) == pytest.approx(2 / 15)  # 7.5 rounds half to even: +R/n, as ClimbQ
    assert code(quantize_activation(torch.linspace(-5, 5, 1001), 4)) == set(range(16))  # ClimbQ's code set
    y.sum().backward()
    inside = x.detach().abs() < 2
    assert torch.all(x.grad[inside] == 1) and torch.all(x.grad[x.detach().abs() > 2] == 0)
    assert cq.SymmetricUniformActivation(32)(x) is x
    with pytest.raises(ValueError, match="bits=1"):
        cq.SymmetricUniformActivation(1)


def test_quantize_for_method_keeps_the_last_layer_fp32_and_quantizes_the_first_conv():
    cfg = resolve("climbq", "smoke")
    fp = create_model("resnet20", **cq.model_kwargs(cfg, 10, 1))
    assert cq.model_kwargs(cfg, 10, 1)["shortcut"] == "B"
    q = cq.quantize_for_method(fp, cq.CLIMBQ_HV, 4, cfg)
    assert isinstance(q.conv0, QuantConv2d) and isinstance(q.conv0.weight_quantizer, ClimbQWeight)
    assert type(q.fc) is nn.Linear
    slots = [m for m in q.modules() if isinstance(m, ActSlot)]
    assert slots and all(isinstance(s.quantizer, ClimbQActivation) for s in slots)
    assert all(type(m) is nn.Conv2d for m in fp.modules() if isinstance(m, nn.Conv2d))  # the FP model is untouched
    u = cq.quantize_for_method(fp, cq.UNIFORM, 2, cfg)
    assert isinstance(u.conv0.weight_quantizer, DoReFaWeight)
    assert all(isinstance(m.quantizer, cq.SymmetricUniformActivation) for m in u.modules() if isinstance(m, ActSlot))
    clipped = cq.quantize_for_method(fp, cq.UNIFORM, 2, {**cfg, "uniform_act": "clipped"})
    assert type(next(m.quantizer for m in clipped.modules() if isinstance(m, ActSlot))).__name__ == "ClippedActivation"
    assert q.state_dict().keys() == fp.state_dict().keys()  # FP checkpoints load into the quantized model
    with pytest.raises(ValueError, match="uniform_act='x'"):
        cq.quantize_for_method(fp, cq.UNIFORM, 4, {**cfg, "uniform_act": "x"})
    with pytest.raises(ValueError, match="quantized methods"):
        cq.quantize_for_method(fp, cq.FP32, 4, cfg)


# --------------------------------------------------------------------------------------------- hooks


def _quantized_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = resolve("climbq", "smoke")
    return cq.quantize_for_method(create_model("resnet20", **cq.model_kwargs(cfg, 10, 1)), cq.CLIMBQ_CE, 4, cfg)


def test_sigma_scaling_sets_the_batch_sigma_on_every_activation_quantizer():
    net = _quantized_net()
    y = torch.tensor([0, 0, 0, 1, 2, 2, 9, 9])
    cb = cq.SigmaScaling(10)
    cb.before_batch(net, torch.zeros(8, 1, 8, 8), y)
    ref = batch_sigma(y, 10)
    acts = [m for m in net.modules() if isinstance(m, ClimbQActivation)]
    assert all(torch.equal(a.sigma, ref) for a in acts)
    assert cb.max_deviation == pytest.approx(float((ref - 2).abs().max()))
    cb.before_batch(net, torch.zeros(16, 1, 8, 8), torch.full((16,), 3))  # |sigma - 2| = 1/16 keeps the max
    assert cb.max_deviation == pytest.approx(float((ref - 2).abs().max()))


def test_homovar_criterion_is_homovar_loss_on_features_computed_once_and_logs_epoch_means():
    net = _quantized_net().train()
    counts = [137, 106, 82, 63, 48, 37, 28, 21, 16, 12]
    crit = cq.HomoVarCriterion(counts)
    torch.manual_seed(1)
    batches = [(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))) for _ in range(3)]
    steps = []
    for x, y in batches:
        loss = crit(net, x, y)
        with torch.no_grad():
            f = net.forward_features(x)
            ref = HomoVarLoss(counts)
            ref_loss = ref(net.fc(f), y, f)
        assert float(loss.detach()) == pytest.approx(float(ref_loss), rel=1e-6)
        steps.append(ref.last)
    stats = {}
    crit.on_epoch_end(0, stats)
    assert stats["homovar_fraction_out"] == pytest.approx(np.mean([float(s.fraction_out) for s in steps]))
    lb = np.nanmean(np.stack([s.n_lb.numpy() for s in steps]), axis=0)
    np.testing.assert_allclose(crit.last_epoch["n_lb"], lb, rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(crit.last_epoch["weights"],
                               np.mean(np.stack([s.weights.numpy() for s in steps]), axis=0), rtol=1e-12)


def test_select_best_restores_the_best_epoch_state(digits):
    train, test = digits
    net = create_model("resnet20", num_classes=10, in_channels=1)
    sel = cq.SelectBest(test.subset(slice(0, 64)))
    sel.on_train_start(net, None)
    states, tops = [], []
    for epoch in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.3)
        stats = {}
        sel.on_epoch_end(epoch, stats)
        states.append({k: v.clone() for k, v in net.state_dict().items()})
        tops.append(stats["select_top1"])
    best = int(np.argmax(tops))  # first maximum wins
    assert sel.restore(net) == best == sel.best_epoch
    assert all(torch.equal(v, states[best][k]) for k, v in net.state_dict().items())
    last = cq.SelectBest(None)
    last.on_epoch_end(4, {})
    assert last.restore(net) == 4


# --------------------------------------------------------------------------------------------- the driver


def test_tiny_run_metrics(tiny_run):
    m, cfg = tiny_run["metrics"], tiny_run["cfg"]
    check_json_native(m)
    assert m["methods"] == list(cq.METHODS) and m["gammas"] == [10] and m["bits"] == [4]
    per = pd.DataFrame(m["per_seed"])
    assert sorted(per["method"]) == sorted(cq.METHODS)
    for _, row in per.iterrows():
        acc = np.array(row["per_class_accuracy"])
        assert row["balanced_accuracy"] == pytest.approx(acc.mean())
        assert row["tail_accuracy"] == pytest.approx(acc[-3:].mean())
        assert 0 <= row["top1"] <= 1
    fp = per[per["method"] == cq.FP32].iloc[0]
    assert fp["bits"] == 32 and fp["best_epoch"] == cfg["fp_epochs"] - 1
    assert set(m["history"]) == {f"10/W4A4/{q}/0" for q in cq.QUANT_METHODS}
    hist = m["history"]["10/W4A4/ClimbQ+HomoVar/0"]
    assert len(hist) == 2 and {"select_top1", "homovar_fraction_out", "homovar_W"} <= set(hist[0])
    (hv,) = m["homovar"]
    assert hv["counts"] == m["splits"]["10"]["counts"] and len(hv["beta"]) == 10
    assert 0 < m["sigma_max_deviation"] < 0.5
    assert m["key_metric"]["value"] == pytest.approx(
        per[per["method"] == cq.CLIMBQ_HV]["balanced_accuracy"].iloc[0])
    table = cq.summary_table(m)
    assert list(table["method"]) == list(cq.METHODS) and list(table["W/A"]) == ["FP32", "W4A4", "W4A4", "W4A4"]
    assert m["paper_numbers"] is None and "could not be found" in m["paper_numbers_note"]
    assert m["splits"]["10"]["real_ratio"] == pytest.approx(137 / 12) and m["splits"]["10"]["tail_images"] == 12
    assert list(table["γ (real ratio)"]) == ["10 (real 11.4)"] * 4 and list(table["n (seeds)"]) == [1] * 4
    ids = [c["id"] for c in m["claims"]]  # one seed: every comparison is undecidable, none is dropped
    assert "homovar-balanced-g10" in ids and "gain-grows-with-imbalance" in ids
    assert all(c["verdict"] == "undecidable" for c in m["claims"] if c["direction"] != "descriptive")


def test_stored_models_reload_to_the_recorded_accuracy(tiny_run, digits):
    m, mdir = tiny_run["metrics"], tiny_run["models_dir"]
    entries = m["models"]["entries"]
    assert {e["method"] for e in entries} == set(cq.METHODS) and len(entries) == 4
    assert m["models"]["total_bytes"] == sum((mdir / e["file"]).stat().st_size for e in entries) < 6e6
    assert json.loads((mdir / "index.json").read_text())["entries"] == entries
    sp = cq.make_long_tail_splits(*digits, 10, min_count=1)
    per = pd.DataFrame(m["per_seed"]).set_index("method")
    for e in entries:
        model = tiny_run["source"].load(e)
        assert not model.training
        assert evaluate(model, sp.test)["top1"] == pytest.approx(per.loc[e["method"], "top1"])
    with pytest.raises(FileNotFoundError, match="rerun the climbq notebook"):
        cq.load_model({**entries[0], "file": "missing.pt"}, m["config"], mdir)


def test_paired_differences():
    metrics = {"per_seed": [
        {"gamma": 10, "bits": 4, "seed": s, "method": meth, "balanced_accuracy": v}
        for s, (a, b) in enumerate([(0.8, 0.7), (0.6, 0.65), (0.9, 0.7)])
        for meth, v in ((cq.CLIMBQ_HV, a), (cq.CLIMBQ_CE, b))]}
    d = cq.paired_differences(metrics, cq.CLIMBQ_HV, cq.CLIMBQ_CE).iloc[0]
    assert d["mean_diff"] == pytest.approx((0.1 - 0.05 + 0.2) / 3) and d["wins"] == 2 and d["seeds"] == 3


def test_runs_root_of():
    assert cq.runs_root_of("") is None
    assert cq.runs_root_of("/x/runs/climbq/.tmp-123").as_posix() == "/x/runs"


# --------------------------------------------------------------------------------------------- stored runs


def _fake_run(root, run_id, preset, finished, source_models=None, status="ok"):
    d = root / "climbq" / run_id
    (d / "models").mkdir(parents=True)
    write_json(d / "metrics.json", {"key_metric": {"name": "x", "value": 1.0}})
    write_json(d / "manifest.json", {"status": status, "parameters": {"preset": preset}, "finished_at": finished})
    if source_models is not None:
        shutil.rmtree(d / "models")
        shutil.copytree(source_models, d / "models")
    return d


def test_find_climbq_run_takes_the_latest_completed_run_of_the_preset(tmp_path):
    assert cq.find_climbq_run(tmp_path, "smoke") is None
    a = _fake_run(tmp_path, "a", "smoke", "2026-01-01T00:00:00")
    b = _fake_run(tmp_path, "b", "default", "2026-01-02T00:00:00")
    _fake_run(tmp_path, "c", "smoke", "2026-01-03T00:00:00", status="failed")
    assert cq.find_climbq_run(tmp_path, "smoke") == a
    assert cq.find_climbq_run(tmp_path, "default") == b
    assert cq.find_climbq_run(tmp_path) == b
    assert cq.find_climbq_run(tmp_path, "paper") is None


def test_climbq_models_reads_a_run_or_explains_what_is_missing(tmp_path, tiny_run):
    run = _fake_run(tmp_path, "r1", "smoke", "2026-01-01T00:00:00", source_models=tiny_run["models_dir"])
    write_json(run / "metrics.json", tiny_run["metrics"])
    got = cq.climbq_models("smoke", runs_root=tmp_path)
    assert got.source == "run" and got.run_dir == run and len(got.entries) == 4
    assert cq.climbq_models("x", source_run=str(run)).run_dir == run
    with pytest.raises(FileNotFoundError, match="not a completed climbq run"):
        cq.climbq_models("smoke", source_run=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="no completed climbq run at preset 'default'.*work_dir"):
        cq.climbq_models("default", runs_root=tmp_path)


# --------------------------------------------------------------------------------------------- Levene driver


def test_levene_tests_every_model_and_layer(tiny_run, digits):
    lev, source = tiny_run["levene"], tiny_run["source"]
    check_json_native(lev)
    tests = pd.DataFrame(lev["tests"])
    assert len(tests) == 4 * 3 and set(tests["layer"]) == {"blocks.6", "blocks.7", "penultimate"}
    assert set(tests[tests["layer"] == "blocks.6"]["dims"]) == {64}
    sp = cq.make_long_tail_splits(*digits, 10, min_count=1)
    entry = next(e for e in source.entries if e["method"] == cq.CLIMBQ_HV)
    model = source.load(entry)
    f, y = capture_features(model, [(sp.full_test.x, sp.full_test.y)])
    ref = levene_features(f, y)
    row = tests[(tests["method"] == cq.CLIMBQ_HV) & (tests["layer"] == "penultimate")].iloc[0]
    assert row["W"] == pytest.approx(ref.W) and row["p"] == pytest.approx(ref.p)
    assert row["n"] == len(sp.full_test) and row["homogeneous"] == (ref.W <= ref.F_star)
    assert lev["key_metric"]["value"] == pytest.approx(ref.W)
    table = cq.levene_table(lev)
    assert list(table["method"]) == list(cq.METHODS) and list(table["n (seeds)"]) == [1] * 4
    pc = pd.DataFrame(lev["per_class"])
    acc = evaluate(model, sp.full_test)["per_class_accuracy"]  # per-class numbers of the analysed models
    np.testing.assert_allclose(pc[pc["method"] == cq.CLIMBQ_HV].sort_values("class")["accuracy"], acc)
    assert {c["id"] for c in lev["claims"]} >= {"quantization-raises-W-g10", "homovar-lowers-W-g10"}
    assert cq.levene_layer_table(lev).shape == (3, 4)
    (disp,) = [d for d in lev["dispersion"] if d["method"] == cq.CLIMBQ_HV]
    np.testing.assert_allclose(disp["z"], ref.z, rtol=1e-4)


def test_levene_bounds_are_homovar_diagnostics_on_training_batches(tiny_run, digits):
    """The bounds figure's n_lb/n_ub: per batch exactly HomoVarLoss's diagnostics, then the median over batches."""
    lev, source = tiny_run["levene"], tiny_run["source"]
    sp = cq.make_long_tail_splits(*digits, 10, min_count=1)
    entry = next(e for e in source.entries if e["method"] == cq.CLIMBQ_HV)
    model = source.load(entry)
    with torch.no_grad():
        f = model.forward_features(sp.train.x)
    bs = tiny_run["cfg"]["batch_size"]
    got = cq.homovar_batch_bounds(f, sp.train.y, sp.counts, bs)
    order = torch.as_tensor(np.random.default_rng(0).permutation(len(sp.train)))
    n_batches = math.ceil(len(sp.train) / bs)
    assert got["per_batch"]["n_lb"].shape == (n_batches, 10)
    for i in range(n_batches):
        idx = order[i * bs:(i + 1) * bs]
        loss = HomoVarLoss(sp.counts)
        with torch.no_grad():
            loss(model.fc(f[idx]), sp.train.y[idx], f[idx])
        np.testing.assert_allclose(got["per_batch"]["n_lb"][i], loss.last.n_lb.numpy(), rtol=1e-9)
        np.testing.assert_allclose(got["per_batch"]["n_ub"][i], loss.last.n_ub.numpy(), rtol=1e-9)
        assert got["per_batch"]["out_of_bounds"][i].tolist() == loss.last.out_of_bounds.tolist()
    pc = pd.DataFrame(lev["per_class"])
    pc = pc[pc["method"] == cq.CLIMBQ_HV].sort_values("class")
    np.testing.assert_allclose(pc["n_lb"], got["n_lb"], rtol=1e-6)
    np.testing.assert_allclose(pc["out_fraction"], got["per_batch"]["out_of_bounds"].mean(0))
    np.testing.assert_allclose(pc["feasible_fraction"], (got["per_batch"]["C"] >= 0).mean(0))
    np.testing.assert_allclose(pc["nan_fraction"], np.isnan(got["per_batch"]["n_lb"]).mean(0))
    assert (pc["n_train"] == sp.counts).all()
    full = homogeneity_bounds(dispersion(f, sp.train.y, counts=sp.counts), sp.train.y, sp.counts)
    assert pc["full_feasible"].tolist() == (full.C >= 0).tolist()


def test_levene_rejects_other_data_and_bad_split(tiny_run):
    source = tiny_run["source"]
    with pytest.raises(ValueError, match="split='x'"):
        cq.run_levene({**resolve("levene", "smoke"), "split": "x"}, source, device="cpu")
    other = cq.ClimbQModels({**source.metrics, "data_fingerprint": "0" * 64}, source.models_dir, "run")
    with pytest.raises(DataError, match="fingerprint mismatch"):
        cq.run_levene(resolve("levene", "smoke"), other, device="cpu")


def test_block_layers():
    net = create_model("resnet20", num_classes=10, in_channels=1)
    assert cq.block_layers(net, 3) == ["blocks.6", "blocks.7", "penultimate"]
    assert cq.block_layers(net, 1) == ["penultimate"]
    assert cq.block_layers(nn.Linear(2, 2), 3) == ["penultimate"]


def test_finetune_nan_free_and_selection_modes(digits):
    """``selection='last'`` keeps the last epoch; ``'best_test'`` selects on the reported (full) test set."""
    cfg = resolve("climbq", "smoke", **TINY)
    train, test = digits
    sp = cq.make_long_tail_splits(train, test, 10, min_count=1, selection="best_test")
    torch.manual_seed(0)
    fp = create_model("resnet20", **cq.model_kwargs(cfg, 10, 1))
    _, out = cq.finetune(fp, cq.CLIMBQ_HV, 4, sp, {**cfg, "selection": "best_test"}, 0, torch.device("cpu"))
    tops = [h["select_top1"] for h in out["history"]]
    assert out["best_epoch"] == int(np.argmax(tops)) and out["top1"] == pytest.approx(max(tops))
    assert all(math.isfinite(h["train_loss"]) for h in out["history"])
    _, last = cq.finetune(fp, cq.UNIFORM, 4, sp, {**cfg, "selection": "last"}, 0, torch.device("cpu"))
    assert last["best_epoch"] == cfg["qat_epochs"] - 1 and "select_top1" not in last["history"][0]
