"""``python -m paperlib train``: every method builds and trains one epoch in one process (digits, ResNet-8), the
output folder holds JSON-native metrics and the model, bad input gets a clear error (exit status 2).

Thresholds: one epoch from scratch is short, so only sanity is asserted (finite losses, accuracy above chance
for the methods that learn in one epoch at their default lr); the distributed behaviour is tests/test_distributed.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
from pathlib import Path

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
    (["--method", "uniform", "--momentum", "nan"], "--momentum nan: SGD's momentum must be a finite number >= 0"),
    (["--method", "uniform", "--momentum", "1"], "--momentum 1.0"),
    (["--method", "uniform", "--image-size", "0"], "--image-size 0"),
    (["--method", "fp32", "--sync-bn", "--device", "cpu"], "--sync-bn needs CUDA"),
    (["--method", "uniform", "--lr", "inf"], "--lr inf"),
    (["--method", "uniform", "--weight-decay=-1e-4"], "--weight-decay -0.0001"),
    (["--method", "uniform", "--fp-epochs", "1", "--fp-lr", "nan"], "--fp-lr nan"),
    (["--method", "uniform", "--act-clip", "0"], "--act-clip 0.0"),
    (["--method", "lifequant", "--fp-epochs", "1", "--lam", "nan"], "--lam nan"),
    (["--method", "uniform", "--threads", "-1"], "--threads -1"),
    (["--method", "uniform", "--bits", "0"], "--bits 0"),
])
def test_bad_input_is_named(argv, needle, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err
    assert "learning rate" not in err or "--lr" in err or "--fp-lr" in err  # the flag at fault is the one named
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


# ---------------------------------------------------------------------------------------------- faults
# A cheap run for the fault tests: 4 x 4 px digits, 6 steps per epoch.


def _tiny(method: str, out, *extra: str) -> list[str]:
    return [*_args(method, out, "--image-size", "4", "--batch-size", "256"), *extra]


def _no_training(monkeypatch):
    import paperlib.train_cli as cli

    def fail(*a, **k):
        raise AssertionError("training started although --out cannot be written")

    monkeypatch.setattr(cli, "load_data", fail)


def test_out_that_is_a_file_is_refused_before_training(tmp_path, monkeypatch, capsys):
    _no_training(monkeypatch)
    out = tmp_path / "taken"
    out.write_text("a file")
    assert main(_tiny("fp32", out)) == 2
    err = capsys.readouterr().err
    assert f"--out {out} is a file, not a folder" in err and err.count("\n") == 1
    assert out.read_text() == "a file"


def test_out_that_cannot_be_written_is_refused_before_training(tmp_path, monkeypatch, capsys):
    """A read-only folder (simulated: the tests run as root, for whom chmod does not block writes)."""
    import errno
    import tempfile

    import paperlib.atomic as atomic

    _no_training(monkeypatch)
    out = tmp_path / "ro"
    out.mkdir()
    real = tempfile.mkstemp

    def read_only(*a, dir=None, **k):  # noqa: A002 (mkstemp's own keyword)
        if dir is not None and Path(dir) == out:
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real(*a, dir=dir, **k)

    monkeypatch.setattr(atomic.tempfile, "mkstemp", read_only)
    assert main(_tiny("fp32", out)) == 2
    err = capsys.readouterr().err
    assert f"--out {out} cannot be written: not writable" in err and err.count("\n") == 1
    assert list(out.iterdir()) == []


def _full_disk_at(monkeypatch, name: str, nth: int = 1) -> None:
    """torch.save into a temp file of ``name`` fails like torch's writer on a full disk, at its ``nth`` call."""
    real, seen = torch.save, []

    def target(f) -> str:  # atomic_write hands torch.save an os.fdopen file: its name is the descriptor
        fd = getattr(f, "name", None)
        return Path(os.readlink(f"/proc/self/fd/{fd}")).name if isinstance(fd, int) else ""

    def save(obj, f, *a, **k):
        if target(f).startswith(f".{name}."):
            seen.append(1)
            if len(seen) == nth:
                f.write(b"PK\x03\x04 partial")
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4160 vs 4096")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)


def test_full_disk_at_model_pt_leaves_no_metrics_and_no_temp(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _full_disk_at(monkeypatch, "model.pt")
    assert main(_tiny("uniform", out)) == 1
    err = capsys.readouterr().err
    assert err == f"error: cannot write {out / 'model.pt'}: no space left on the device (free some space or " \
                  "choose another folder)\n"
    # no metrics.json (model.pt comes first), no temp file, no lock file: the empty folder this run made is gone
    assert not out.exists()
    out.mkdir()
    _full_disk_at(monkeypatch, "model.pt")
    assert main(_tiny("uniform", out)) == 1  # a folder the user made stays, empty
    assert list(out.iterdir()) == []


def test_full_disk_at_a_checkpoint_keeps_the_last_one_and_resume_completes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _full_disk_at(monkeypatch, "uniform.pt", nth=2)
    assert main(_tiny("uniform", out, "--epochs", "3", "--checkpoint")) == 1
    err = capsys.readouterr().err
    assert f"cannot write {out / 'checkpoints' / 'uniform.pt'}: no space left" in err and err.count("\n") == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["args.json", "uniform.pt"]
    assert torch.load(out / "checkpoints" / "uniform.pt", weights_only=False)["epoch"] == 0
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints"]
    monkeypatch.undo()  # space freed
    assert main(_tiny("uniform", out, "--epochs", "3", "--resume")) == 0
    assert len(json.loads((out / "metrics.json").read_text())["history"]) == 3


@pytest.mark.parametrize("damage, needle", [
    (lambda p: p.write_bytes(p.read_bytes()[:1000]), "it is truncated or corrupt (1000 bytes; RuntimeError: "
                                                      "PytorchStreamReader failed reading zip archive: failed "
                                                      "finding central directory)"),
    (lambda p: p.write_bytes(b""), "it is empty"),
])
def test_damaged_checkpoint_on_resume_is_one_line(tmp_path, capsys, damage, needle):
    out = tmp_path / "run"
    assert main(_tiny("uniform", out, "--checkpoint")) == 0
    ck = out / "checkpoints" / "uniform.pt"
    damage(ck)
    capsys.readouterr()
    assert main(_tiny("uniform", out, "--resume")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --resume: cannot read checkpoint {ck}: {needle}") and err.count("\n") == 1, err
    assert f"delete {out / 'checkpoints'} to start the run over" in err


def test_garbage_args_json_on_resume_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_tiny("uniform", out, "--checkpoint")) == 0
    saved = out / "checkpoints" / "args.json"
    for garbage in ('{"method": "uniform", ', "[1, 2]", "\xff\xfe"):
        saved.write_bytes(garbage.encode("latin-1"))
        capsys.readouterr()
        assert main(_tiny("uniform", out, "--resume")) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --resume: cannot read {saved} (") and err.count("\n") == 1, err
        assert f"delete {out / 'checkpoints'} to start over" in err


def _hold_lock(out, locked, release) -> None:
    from paperlib.train_cli import _lock_out

    try:
        _lock_out(out)
        locked.set()
        release.wait(60)
    finally:
        os._exit(0)


def test_a_second_run_on_a_locked_out_stops_at_once_naming_the_holder(tmp_path, capsys):
    ctx = multiprocessing.get_context("fork")
    out = tmp_path / "run"
    out.mkdir()
    locked, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(out, locked, release))
    holder.start()
    try:
        assert locked.wait(60)
        assert main(_tiny("uniform", out, "--checkpoint")) == 2
    finally:
        release.set()
        holder.join(60)
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {out} is in use by another `paperlib train` run (pid {holder.pid} on ")
    assert err.count("\n") == 1 and not (out / "checkpoints").exists()


def _run_to_queue(argv, start, results) -> None:
    import contextlib
    import io

    try:
        buf = io.StringIO()
        start.wait(60)
        with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(io.StringIO()):
            rc = main(argv)
        results.put((rc, buf.getvalue()))
        results.close()
        results.join_thread()  # the queue's feeder thread must deliver before os._exit
    finally:
        os._exit(0)


def test_two_runs_started_at_once_on_one_out_one_is_refused(tmp_path):
    ctx = multiprocessing.get_context("fork")
    for attempt in range(3):
        out = tmp_path / f"run{attempt}"
        start, results = ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_run_to_queue, args=(_tiny("fp32", out, "--checkpoint"), start, results))
                 for _ in range(2)]
        for p in procs:
            p.start()
        start.set()
        got = sorted(results.get(timeout=300) for _ in procs)
        for p in procs:
            p.join(60)
        assert [rc for rc, _ in got] == [0, 2], got
        assert "is in use by another" in got[1][1] or "already holds checkpoints" in got[1][1], got
        assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "metrics.json", "model.pt"]


def test_interrupt_says_how_to_resume(tmp_path, monkeypatch, capsys):
    import paperlib.train as train_mod

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "fit", interrupted)
    out = tmp_path / "run"
    assert main(_tiny("fp32", out, "--checkpoint")) == 130
    assert "run the same command with --resume" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints"]  # args.json; the lock file is gone


def test_temp_files_of_a_killed_write_are_removed_by_the_next_run(tmp_path):
    """A SIGKILL during a write leaves the atomic writer's temp file (``.<name>.<random>.tmp``); the next run on the
    folder, holding its lock, removes them (and nothing else)."""
    out = tmp_path / "run"
    assert main(_tiny("uniform", out, "--checkpoint")) == 0
    stale = [out / ".model.pt.k1l2m3.tmp", out / "checkpoints" / ".uniform.pt.a1b2c3.tmp"]
    for p in stale:
        p.write_bytes(b"PK\x03\x04 cut short")
    (out / "notes.tmp").write_text("the user's own file")
    assert main(_tiny("uniform", out, "--resume")) == 0
    assert not any(p.exists() for p in stale) and (out / "notes.tmp").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["args.json", "uniform.pt"]
