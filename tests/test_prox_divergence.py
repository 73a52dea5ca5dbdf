"""LifeQuant's ProxQ penalty in ``python -m paperlib train``: λ = 100 used to diverge.

Cause: the CLI took ProxQ's importance ``F`` (eval mode, docs/lifequant.md, "ProxQ") from the freshly quantized FP32
net, whose BN running statistics are the FP32 net's. LifeQuant's quantizers standardise the weights, so with those
statistics the eval-mode net is at chance (top-1 ~0.1, BaLL loss ~4.5) and its squared gradients are ~1e4 too large
(max F 587 vs 0.08 with statistics of the quantized net, ResNet-20, 3 FP32 epochs). SGD then multiplies the most
important weights' distance to θ_old by ~|1 - lr·2λF| per step: lr·2λ·max F = 1170 (stable only below 2(1 +
momentum) = 3.8), so the penalty reached 1e14 within two epochs on ResNet-8 and inf on ResNet-20 (batch 8). The
original never meets this: its F comes from a quantized net already trained at its width. Fix: re-estimate the BN
statistics of the quantized start (no weight changes) before F; a λ whose curvature SGD cannot follow is refused
with the largest stable λ.

Thresholds measured (ResNet-8, digits, 1 FP32 epoch + 2 LifeQuant epochs, λ = 100, seed 0): test top-1 0.884,
penalty 0.020/0.047 per epoch, lr·2λ·max F = 0.098 (before the fix: top-1 0.20, penalty 2e8 and 1e14).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from paperlib.train_cli import CLIError, _finish_args, build_parser, main, prox_stability

BOUND = 3.8  # 2 (1 + momentum) at the CLI's momentum 0.9


def _args(out, *extra: str) -> list[str]:
    return ["--method", "lifequant", "--model", "resnet8", "--epochs", "2", "--fp-epochs", "1", "--batch-size", "128",
            "--threads", "1", "--device", "cpu", "--no-save-model", "--out", str(out), *extra]


def test_default_lambda_trains_to_a_sensible_accuracy(tmp_path):
    assert main(_args(tmp_path / "l")) == 0
    m = json.loads((tmp_path / "l" / "metrics.json").read_text())
    info = m["method_info"]
    assert info["lambda"] == 100.0 and info["prox_penalty"] is True  # the notebook's λ is the default
    from paperlib.data.load import load_dataset

    n_train = len(load_dataset("digits", size=8, channels=1)[0])
    assert info["bn_recalibrated_batches"] == math.ceil(n_train / 128)  # the whole training set, once
    assert 0 < info["prox_lr_curvature"] < 0.5 * BOUND  # measured 0.098
    for h in m["history"]:
        assert math.isfinite(h["train_loss"]) and 0 < h["penalty"] < 0.5, h  # measured 0.020, 0.047
        assert h["penalty"] < h["task_loss"]
    assert m["final"]["top1"] > 0.75, m["final"]  # measured 0.884 (chance 0.1; FP32 start 0.87)


def test_stale_bn_statistics_are_refused(tmp_path, capsys):
    """Without the BN re-estimate the CLI reproduces the old F, and the stability check names the cause."""
    assert main(_args(tmp_path / "s", "--no-bn-recalibrate")) == 2
    err = capsys.readouterr().err
    assert "--lam 100" in err and "2(1 + momentum) = 3.8" in err and "use --lam below" in err


def _reference_curvature(imp: dict[str, torch.Tensor], lam: float, lr: float, wd: float) -> float:
    return max(lr * (2 * lam * float(f.max()) + wd) for f in imp.values())


def test_prox_stability_bound():
    imp = {"a": torch.tensor([0.0, 0.5, 2.0]), "b": torch.tensor([[1.0]])}
    v = prox_stability(imp, lam=90.0, lr=0.01, momentum=0.9, weight_decay=1e-4)
    assert v == pytest.approx(_reference_curvature(imp, 90.0, 0.01, 1e-4)) and v == pytest.approx(3.600001)
    # lr (2 λ max F + wd) = 4.000001 >= 3.8; largest stable λ = (3.8 / 0.01 - 1e-4) / (2 * 2) = 94.999975
    with pytest.raises(CLIError, match=r"use --lam below 95 or a smaller --lr"):
        prox_stability(imp, lam=100.0, lr=0.01, momentum=0.9, weight_decay=1e-4)


def test_prox_stability_accepts_stable_lambda():
    imp = {"a": torch.tensor([0.0, 0.5, 2.0])}
    assert prox_stability(imp, lam=10.0, lr=0.01, momentum=0.9) == pytest.approx(0.4)
    assert prox_stability({"z": torch.zeros(3)}, lam=1e9, lr=0.1, momentum=0.0) == 0.0


@pytest.mark.parametrize("argv, needle", [
    (["--method", "lifequant", "--lam", "100"], "--fp-epochs N"),
    (["--method", "lifequant", "--lam", "-1", "--fp-epochs", "1"], "ProxQ lambda must be a finite number >= 0"),
    (["--method", "climbq", "--lam", "100", "--fp-epochs", "1"], "applies to --method lifequant"),
])
def test_bad_lambda_is_named(argv, needle, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "x")]) == 2
    assert needle in capsys.readouterr().err


def test_lambda_defaults():
    parse = build_parser().parse_args
    assert _finish_args(parse(["--method", "lifequant", "--fp-epochs", "2"])).lam == 100.0
    assert _finish_args(parse(["--method", "lifequant"])).lam == 0.0  # no FP32 start: nothing to anchor at
    assert _finish_args(parse(["--method", "lifequant", "--fp-epochs", "2", "--lam", "0"])).lam == 0.0
    assert _finish_args(parse(["--method", "cbp", "--fp-epochs", "2"])).lam == 0.0
