"""``python -m paperlib train --checkpoint`` killed with SIGKILL in the middle of an epoch, then ``--resume``: the
final ``model.pt`` is byte-identical to an uninterrupted run's and ``metrics.json`` equal (but for wall time and the
output folder), for every method.

The killed runs are real child processes that die by SIGKILL (``kill -9``: no Python cleanup, no ``finally``; the
lock file stays behind). In the parametrized test the child is forked from this process (no second interpreter to
start, so the eight cases stay cheap) and runs the CLI with an optimizer step hook that sends itself SIGKILL at a
chosen optimizer step after a chosen checkpoint file was written: the kill lands at the same place on every
machine. ``test_external_kill_9`` starts ``python -m paperlib train`` as a separate program and kills it from
outside as soon as its first checkpoint exists (wherever it then is: mid-epoch or mid-write). The uninterrupted run
and the resumes run in this process (``main``), on digits, ResNet-8 at 4 x 4 px, 6 steps per epoch, one thread.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from paperlib.train_cli import LOCK_NAME, METHODS, main

ROOT = Path(__file__).resolve().parents[1]


def _kill_myself_at(argv: list[str], armed_by: str, steps: int) -> None:
    """The forked child: the CLI, plus a step hook that sends SIGKILL to this process ``steps`` optimizer steps
    after the checkpoint file named ``armed_by`` was written."""
    try:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        import paperlib.train as tm

        armed: list[int] = []
        left = [steps]
        save = tm.save_checkpoint

        def save_then_arm(path, state):
            save(path, state)
            if Path(path).name == armed_by:
                armed.append(state["epoch"])

        def count(optimizer, args, kwargs):
            if armed:
                left[0] -= 1
                if left[0] == 0:
                    os.kill(os.getpid(), signal.SIGKILL)

        tm.save_checkpoint = save_then_arm
        register_optimizer_step_post_hook(count)
        main(argv)
    finally:
        os._exit(3)  # reached only when the kill did not happen: never run the rest of pytest in the child


def _args(method: str, out: Path, *extra: str) -> list[str]:
    return ["--method", method, "--model", "resnet8", "--image-size", "4", "--epochs", "2", "--batch-size", "256",
            "--threads", "1", "--device", "cpu", "--checkpoint", "--resume", "--out", str(out), *extra]


def _without_place_and_time(m: dict) -> dict:
    m = {k: v for k, v in m.items() if k not in ("wall_s", "out")}
    m["args"] = {k: v for k, v in m["args"].items() if k != "out"}
    return m


# (id, method, extra flags, checkpoint after which the child counts steps, steps until the kill)
CASES = [(m, m, ("--seed", "1") if m == "climbq" else (), f"{m}.pt", 3) for m in METHODS] + [
    # killed in the method's first epoch, when only the finished FP32 stage is checkpointed
    ("climbq-after-fp32", "climbq", ("--fp-epochs", "1", "--epochs", "1"), "fp32.pt", 2),
]
# climbq --seed 1: sigma's largest |sigma - 2| is 0.0240 in epoch 0 and 0.0200 in epoch 1 (batch labels of the seeded
# permutations), so a resume that lost the running maximum would report 0.0200


@pytest.mark.parametrize("method, extra, armed_by, steps", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_kill_9_mid_epoch_then_resume_equals_uninterrupted(method, extra, armed_by, steps, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(_args(method, full, *extra)) == 0
    child = multiprocessing.get_context("fork").Process(target=_kill_myself_at,
                                                        args=(_args(method, cut, *extra), armed_by, steps))
    child.start()
    child.join(timeout=300)
    assert child.exitcode == -signal.SIGKILL, child.exitcode
    left = sorted(p.name for p in cut.iterdir())
    assert left == sorted([LOCK_NAME, "checkpoints"]), left  # killed mid-epoch: no model.pt, no metrics.json
    assert (cut / "checkpoints" / armed_by).is_file()
    assert not list(cut.rglob("*.tmp"))  # no write was in flight
    assert main(_args(method, cut, *extra)) == 0  # the stale lock file does not block: the kernel released it
    assert (full / "model.pt").read_bytes() == (cut / "model.pt").read_bytes()
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (full, cut))
    assert _without_place_and_time(ma) == _without_place_and_time(mb)
    assert len(mb["history"]) == (1 if "--fp-epochs" in extra else 2)
    if method == "climbq":
        assert mb["method_info"]["sigma_max_deviation"] == ma["method_info"]["sigma_max_deviation"] > 0
    assert sorted(p.name for p in cut.iterdir()) == ["checkpoints", "metrics.json", "model.pt"]  # lock gone


def test_external_kill_9(tmp_path):
    """``python -m paperlib train --method dgms`` (the method whose resume once drifted) killed from outside with
    SIGKILL as soon as its first checkpoint exists, then resumed: same model.pt bytes as the uninterrupted run."""
    extra = ("--epochs", "4")
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(_args("dgms", full, *extra)) == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "paperlib", "train", *_args("dgms", cut, *extra)], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = cut / "checkpoints" / "dgms.pt"
    deadline = time.monotonic() + 240
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]  # killed, not finished: 4 epochs take longer
    assert first.is_file() and not (cut / "metrics.json").exists()
    assert main(_args("dgms", cut, *extra)) == 0
    assert (full / "model.pt").read_bytes() == (cut / "model.pt").read_bytes()
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (full, cut))
    assert _without_place_and_time(ma) == _without_place_and_time(mb)
    assert not list(cut.rglob("*.tmp"))  # a temp file of a write the kill cut short is removed by the resume
