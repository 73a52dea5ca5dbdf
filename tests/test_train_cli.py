"""``python -m paperlib train``: every method builds and trains one epoch in one process (digits, ResNet-8), the
output folder holds JSON-native metrics and the model, bad input gets a clear error (exit status 2).

Thresholds: one epoch from scratch is short, so only sanity is asserted (finite losses, accuracy above chance
for the methods that learn in one epoch at their default lr); the distributed behaviour is tests/test_distributed.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from paperlib.__main__ import main as paperlib_main
from paperlib.train_cli import METHODS, TOPOLOGY, main

# top-1 floors after one epoch from scratch (measured 0.78 fp32, 0.71 uniform, 0.76 lsq, 0.38 lifequant; climbq
# 0.16, cbp 0.26, dgms 0.13 are fine-tuning methods whose lr/loss barely move a random net in 12 steps: no floor)
MIN_TOP1 = {"fp32": 0.4, "uniform": 0.4, "lsq": 0.4, "lifequant": 0.2}


def _args(method: str, out, *extra: str) -> list[str]:
    return ["--method", method, "--model", "resnet8", "--epochs", "1", "--batch-size", "128", "--threads", "1",
            "--device", "cpu", "--out", str(out), *extra]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains(method, tmp_path):
    out = tmp_path / method
    assert main(_args(method, out)) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == method and m["world_size"] == 1 and m["backend"] is None
    assert len(m["history"]) == 1 and math.isfinite(m["history"][0]["train_loss"])
    assert m["consistent_across_ranks"] == {"state": True, "method_state": True}
    assert 0.0 <= m["final"]["top1"] <= 1.0 and len(m["final"]["per_class_accuracy"]) == 10
    assert m["final"]["top1"] > MIN_TOP1.get(method, 0.0), m["final"]  # chance is 0.1
    state = torch.load(out / "model.pt", weights_only=True)
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    assert TOPOLOGY[method]["act_position"] in ("pre_relu", "post_relu")


def test_method_specific_info(tmp_path):
    assert main(_args("climbq", tmp_path / "c", "--fp-epochs", "1")) == 0
    c = json.loads((tmp_path / "c" / "metrics.json").read_text())
    info = c["method_info"]
    assert info["loss"] == "homovar" and len(info["homovar_last_epoch"]["weights"]) == 10
    assert 0 < info["sigma_max_deviation"] < 0.1  # sigma = 2 - p~ stays close to 2 for B = 128
    assert len(c["fp32_history"]) == 1 and "homovar_fraction_out" in c["history"][0]
    assert c["final"]["top1"] > 0.5  # from the 1-epoch FP32 start (measured 0.82)
    assert main(_args("cbp", tmp_path / "b", "--bits", "1")) == 0
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert b["method_info"]["mode"] == "bin" and len(b["ranks"][0]["method_state"]) == 4
    assert main(_args("lifequant", tmp_path / "l", "--fp-epochs", "1", "--lam", "100", "--no-save-model")) == 0
    li = json.loads((tmp_path / "l" / "metrics.json").read_text())
    assert li["method_info"]["prox_penalty"] is True and "penalty" in li["history"][0]
    assert 0 < li["history"][0]["penalty"] < 1, li["history"]  # measured 0.02 (2e8 before the BN re-estimate)
    assert not (tmp_path / "l" / "model.pt").exists()


def test_subcommand_is_wired(tmp_path, capsys):
    assert paperlib_main(["train", *_args("fp32", tmp_path / "f")]) == 0
    assert "fp32: test top-1" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        paperlib_main(["train", "--method", "nope"])


@pytest.mark.parametrize("argv, needle", [
    (["--method", "fp32", "--dataset", "cifar10"], "--data-dir"),
    (["--method", "fp32", "--dataset", "manifest"], "train.csv"),
    (["--method", "fp32", "--bits", "4"], "full precision"),
    (["--method", "cbp", "--bits", "4"], "--cbp-mode"),
    (["--method", "uniform", "--epochs", "0"], "--epochs"),
    (["--method", "uniform", "--model", "nonet"], "unknown model"),
])
def test_bad_input_is_named(argv, needle, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "x")]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


class Interrupt(RuntimeError):
    pass


def test_resume_ends_like_an_uninterrupted_run(tmp_path, monkeypatch, capsys):
    """--checkpoint, a crash after the first LifeQuant epoch (the FP32 stage is complete), then --resume: same
    model (bit-identical state dict), same history, same ProxQ importance (from the restored FP32 start)."""
    import paperlib.train as train_mod

    extra = ("--fp-epochs", "1", "--epochs", "2", "--checkpoint")
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main([*_args("lifequant", full), *extra]) == 0
    save = train_mod.save_checkpoint

    def crash_after_first_epoch(path, state):
        save(path, state)
        if path.name == "lifequant.pt" and state["epoch"] == 0:
            raise Interrupt("simulated crash")

    monkeypatch.setattr(train_mod, "save_checkpoint", crash_after_first_epoch)
    with pytest.raises(Interrupt):
        main([*_args("lifequant", cut), *extra])
    monkeypatch.undo()
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["args.json", "fp32.pt", "lifequant.pt"]
    assert not (cut / "metrics.json").exists()
    assert main([*_args("lifequant", cut), "--fp-epochs", "1", "--epochs", "2", "--resume"]) == 0
    a, b = (torch.load(d / "model.pt", weights_only=True) for d in (full, cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (full, cut))
    assert ma["history"] == mb["history"] and ma["fp32_history"] == mb["fp32_history"] and len(mb["history"]) == 2
    assert ma["method_info"] == mb["method_info"] and ma["final"] == mb["final"]
    # a resume with other arguments, or a fresh run over existing checkpoints, is refused with the reason
    capsys.readouterr()
    assert main([*_args("lifequant", cut), "--fp-epochs", "1", "--epochs", "2", "--lr", "0.02", "--resume"]) == 2
    assert "lr: 0.01 -> 0.02" in capsys.readouterr().err
    assert main([*_args("lifequant", cut), *extra]) == 2
    assert "pass --resume" in capsys.readouterr().err


def test_resume_needs_out(capsys):
    assert main(["--method", "fp32", "--resume"]) == 2
    assert "--out" in capsys.readouterr().err


def test_gpu_path_options_reach_training(tmp_path, monkeypatch):
    """``--amp bf16 --channels-last --compile MODE``: the run trains with them (compile via the aot_eager backend
    here: no C++ builds) and records them; an unknown compile mode is a usage error."""
    import paperlib.compiled as pc

    real, modes = pc.compile_model, []

    def aot_eager(model, mode="default", **kw):
        modes.append(mode)
        return real(model, mode, **{**kw, "backend": "aot_eager"})

    monkeypatch.setattr(pc, "compile_model", aot_eager)
    out = tmp_path / "u"
    assert main(_args("uniform", out, "--amp", "bf16", "--channels-last", "--compile", "reduce-overhead")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert modes == ["reduce-overhead"] and math.isfinite(m["history"][0]["train_loss"])
    assert (m["args"]["amp"], m["args"]["channels_last"], m["args"]["compile"]) == ("bf16", True, "reduce-overhead")
    monkeypatch.setenv("PAPERLIB_COMPILE", "default")  # no --compile: the environment's default, as TrainConfig's
    assert main(_args("uniform", tmp_path / "env")) == 0 and modes == ["reduce-overhead", "default"]
    with pytest.raises(SystemExit):
        main(_args("uniform", out, "--compile", "fast"))
