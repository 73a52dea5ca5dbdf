"""Training loop: learning on digits, exact resume after a crash, NaN detection, metrics, devices."""

import pytest
import torch
import torch.nn.functional as F

from paperlib.data.digits import load_digits
from paperlib.metrics import balanced_accuracy, classification_report, confusion_matrix
from paperlib.models import create_model
from paperlib.train import Callback, TrainConfig, TrainingDiverged, evaluate, fit, resolve_device


@pytest.fixture(scope="module")
def digits():
    return load_digits(size=8, channels=1, seed=0)


def _small_model():
    torch.manual_seed(0)
    return create_model("resnet20", num_classes=10, in_channels=1, width=8)


class Crash(Callback):
    def __init__(self, at_epoch: int) -> None:
        self.at_epoch = at_epoch

    def on_epoch_end(self, epoch, stats):
        if epoch == self.at_epoch:
            raise KeyboardInterrupt


def test_fit_learns_digits(digits):
    train, test = digits
    res = fit(_small_model(), train, test, TrainConfig(epochs=4, lr=0.1), device="cpu", progress=False)
    assert len(res.history) == 4
    assert res.final["top1"] > 0.85  # measured ~0.93 after 4 epochs at width 8
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]


def test_resume_after_crash_matches_uninterrupted_run(digits, tmp_path):
    train, test = digits
    cfg = TrainConfig(epochs=3, lr=0.05, augment=True, batch_size=64)
    full = fit(_small_model(), train, test, cfg, device="cpu", checkpoint=tmp_path / "a.pt", progress=False)
    ckpt = tmp_path / "b.pt"
    with pytest.raises(KeyboardInterrupt):
        # callbacks run before the epoch's checkpoint, so the crash at epoch 1 leaves epoch 0's checkpoint
        fit(_small_model(), train, test, cfg, device="cpu", checkpoint=ckpt, callbacks=[Crash(1)], progress=False)
    assert torch.load(ckpt, weights_only=False)["epoch"] == 0
    resumed = fit(_small_model(), train, test, cfg, device="cpu", checkpoint=ckpt, resume=True, progress=False)
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in full.history]
    assert resumed.final["top1"] == full.final["top1"]
    assert resumed.final["confusion"] == full.final["confusion"]
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temp files


def test_nan_loss_stops_with_epoch_and_batch(digits, tmp_path):
    train, test = digits

    calls = []

    def nan_at_batch_3(model, x, y):
        calls.append(1)
        loss = F.cross_entropy(model(x), y)
        return loss * float("nan") if len(calls) == 4 else loss

    with pytest.raises(TrainingDiverged, match=r"epoch 0, batch 3.*learning rate"):
        fit(_small_model(), train, test, TrainConfig(epochs=2), criterion=nan_at_batch_3, device="cpu",
            checkpoint=tmp_path / "c.pt", progress=False)
    assert not (tmp_path / "c.pt").exists()  # the diverged epoch is never checkpointed


def test_bad_config_and_device():
    with pytest.raises(ValueError, match="epochs=0"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="scheduler"):
        TrainConfig(scheduler="linear")
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="not a device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_metrics_against_hand_values():
    logits = torch.tensor([[3.0, 1, 0], [0, 2, 1], [0, 1, 2], [2, 0, 1], [0, 0, 1]])
    y = torch.tensor([0, 1, 1, 2, 2])
    conf = confusion_matrix(logits.argmax(1), y, 3)
    assert conf.tolist() == [[1, 0, 0], [0, 1, 1], [1, 0, 1]]
    assert balanced_accuracy(conf) == pytest.approx((1 + 0.5 + 0.5) / 3)
    rep = classification_report(logits, y, 3)
    assert rep["top1"] == pytest.approx(3 / 5) and "top5" not in rep
    big = torch.randn(50, 20)
    yy = torch.randint(0, 20, (50,))
    rep = classification_report(big, yy, 20)
    top5 = (big.topk(5, 1).indices == yy[:, None]).any(1).float().mean().item()
    assert rep["top5"] == pytest.approx(top5)
    assert sum(map(sum, rep["confusion"])) == 50


def test_evaluate_restores_training_mode(digits):
    train, test = digits
    m = _small_model().train()
    rep = evaluate(m, test)
    assert m.training and 0 <= rep["top1"] <= 1 and len(rep["per_class_accuracy"]) == 10


def test_scheduler_none_keeps_lr_set_by_callbacks(digits):
    class Drop(Callback):
        def on_train_start(self, model, optimizer):
            self.opt = optimizer

        def on_epoch_end(self, epoch, stats):
            if epoch == 0:
                for g in self.opt.param_groups:
                    g["lr"] *= 0.1

    train, _ = digits
    res = fit(_small_model(), train.subset(slice(0, 256)), None, TrainConfig(epochs=3, lr=0.1, scheduler="none"),
              callbacks=[Drop()], device="cpu", progress=False)
    assert [h["lr"] for h in res.history] == pytest.approx([0.1, 0.01, 0.01])


def test_pretrained_fp32_cache_reuses_and_rekeys(digits, tmp_path):
    from paperlib.pretrain import pretrained_fp32

    train, test = digits
    small = train.subset(slice(0, 200))
    kw = {"num_classes": 10, "in_channels": 1, "width": 8}
    cfg = TrainConfig(epochs=1, lr=0.05)
    m1, r1 = pretrained_fp32("resnet20", kw, small, test, cfg, device="cpu", cache_dir=tmp_path)
    assert len(list(tmp_path.glob("fp32-*.pt"))) == 1
    m2, r2 = pretrained_fp32("resnet20", kw, small, test, cfg, device="cpu", cache_dir=tmp_path)
    assert r1["top1"] == r2["top1"]
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True))
    pretrained_fp32("resnet20", kw, small, test, TrainConfig(epochs=1, lr=0.02), device="cpu", cache_dir=tmp_path)
    assert len(list(tmp_path.glob("fp32-*.pt"))) == 2  # another config is another entry


def test_bf16_autocast_and_channels_last_train(digits):
    train, test = digits
    cfg = TrainConfig(epochs=2, lr=0.1, amp="bf16", channels_last=True)
    res = fit(_small_model(), train, test, cfg, device="cpu", progress=False)
    assert res.final["top1"] > 0.6  # learns under bf16 autocast (fp32 reaches ~0.8 after 2 epochs)
    with pytest.raises(ValueError, match="amp='fp16'"):
        TrainConfig(amp="fp16")


def test_fp32_cache_key_ignores_late_fields_at_their_defaults():
    """A TrainConfig field added later (``crop``) must not invalidate the FP32 caches made before it."""
    import dataclasses
    import hashlib
    import json

    from paperlib.data.load import load_dataset
    from paperlib.pretrain import CACHE_VERSION, cache_key

    train, _ = load_dataset("digits", size=8, channels=1)
    cfg = TrainConfig(epochs=2)
    old = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("crop", "compile")}  # before they existed
    blob = json.dumps({"version": CACHE_VERSION, "model": "resnet8", "kwargs": {}, "cfg": old,
                       "data": train.fingerprint(), "torch": torch.__version__}, sort_keys=True, default=str)
    assert cache_key("resnet8", {}, cfg, train) == hashlib.sha256(blob.encode()).hexdigest()[:20]
    assert cache_key("resnet8", {}, dataclasses.replace(cfg, crop=6), train) != cache_key("resnet8", {}, cfg, train)
    assert cache_key("resnet8", {}, dataclasses.replace(cfg, epochs=3), train) != cache_key("resnet8", {}, cfg, train)
    # compiling trains the same net: a compiled run reuses the eager run's cache
    assert cache_key("resnet8", {}, dataclasses.replace(cfg, compile="default"), train) == \
        cache_key("resnet8", {}, cfg, train)


@pytest.mark.parametrize("field, value", [
    ("lr", float("nan")), ("lr", float("inf")), ("lr", 0.0), ("momentum", float("nan")), ("momentum", -0.1),
    ("momentum", 1.0), ("weight_decay", -1e-4), ("weight_decay", float("nan")), ("lr_gamma", 0.0),
    ("lr_gamma", float("nan")), ("epochs", 2.5), ("epochs", True), ("batch_size", 0), ("eval_batch_size", 0),
    ("eval_every", 0), ("seed", 1.5), ("milestones", [0]), ("milestones", [2.5]), ("augment", "yes"),
])
def test_train_config_refuses_bad_numbers_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field}="):
        TrainConfig(**{field: value})


def test_train_config_accepts_numpy_numbers_and_edges():
    import numpy as np

    cfg = TrainConfig(epochs=np.int64(2), lr=np.float32(0.1), momentum=0.0, weight_decay=0, seed=-3,
                      milestones=[np.int64(1)])
    assert cfg.epochs == 2 and cfg.momentum == 0.0
    with pytest.raises(ValueError, match="nesterov"):
        TrainConfig(nesterov=True, momentum=0.0)


@pytest.mark.parametrize("kwargs, error, needle", [
    ({"num_classes": 0}, ValueError, "num_classes=0"), ({"num_classes": 2.0}, TypeError, "num_classes=2.0"),
    ({"num_classes": True}, TypeError, "num_classes=True"), ({"in_channels": 0}, ValueError, "in_channels=0"),
])
def test_create_model_refuses_zero_classes_or_channels(kwargs, error, needle):
    with pytest.raises(error, match=needle):
        create_model("resnet20", **{"num_classes": 10, "in_channels": 1, **kwargs})
    assert create_model("resnet8", num_classes=1, in_channels=1).fc.out_features == 1


def _tiny_run(digits, tmp_path, epochs=2, **kw):
    train, _ = digits
    return fit(_small_model(), train.subset(slice(0, 128)), None, TrainConfig(epochs=epochs, batch_size=64),
               device="cpu", checkpoint=tmp_path / "c.pt", progress=False, **kw)


@pytest.mark.parametrize("damage, needle", [
    (lambda b: b[: len(b) // 2], "truncated or corrupt"),
    (lambda b: b"", "it is empty"),
    (lambda b: b"not a checkpoint at all" * 10, "truncated or corrupt"),
])
def test_damaged_checkpoint_stops_resume_with_one_line(digits, tmp_path, damage, needle):
    from paperlib.train import CheckpointError

    _tiny_run(digits, tmp_path, epochs=1)
    ck = tmp_path / "c.pt"
    ck.write_bytes(damage(ck.read_bytes()))
    with pytest.raises(CheckpointError) as info:
        _tiny_run(digits, tmp_path, resume=True)
    msg = str(info.value)
    assert "\n" not in msg and str(ck) in msg and needle in msg and "delete it" in msg
    assert info.value.path == ck


def test_checkpoint_of_something_else_is_refused(digits, tmp_path):
    from paperlib.train import CheckpointError

    torch.save({"model": {}}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=r"not a checkpoint of paperlib's fit \(missing \['epoch'"):
        _tiny_run(digits, tmp_path, resume=True)


def test_full_disk_keeps_the_last_checkpoint_and_leaves_no_temp_file(digits, tmp_path, monkeypatch):
    """torch's writer on a full disk raises ``RuntimeError: [enforce fail at inline_container.cc:...]`` after a
    partial write: fit stops with a one-line WriteError, the temp file is gone, epoch 0's checkpoint is intact."""
    from paperlib.atomic import WriteError

    real_save, calls = torch.save, []

    def full_at_second_write(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"PK\x03\x04 partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4160 vs 4096")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_at_second_write)
    with pytest.raises(WriteError) as info:
        _tiny_run(digits, tmp_path, epochs=3)
    assert "\n" not in str(info.value) and "c.pt" in str(info.value) and "no space left" in str(info.value)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]
    assert torch.load(tmp_path / "c.pt", weights_only=False)["epoch"] == 0


def test_onecycle_resume_takes_the_uninterrupted_lr_and_momentum(digits, tmp_path):
    """DGMS's per-batch OneCycle schedule also cycles SGD's momentum: a resume that rebuilt the scheduler restarted
    the momentum at step 0's 0.95 (and a different model followed); it must go on with the checkpointed values."""
    from paperlib.dgms import OneCycle

    data = digits[0].subset(slice(0, 256))
    cfg = TrainConfig(epochs=3, batch_size=64, scheduler="none")

    def run(checkpoint, *extra, resume=False):
        model, sched = _small_model(), OneCycle(0.05, 3 * 4)
        fit(model, data, None, cfg, callbacks=[sched, *extra], device="cpu", checkpoint=checkpoint, resume=resume,
            progress=False)
        return model.state_dict(), sched

    full, full_sched = run(tmp_path / "a.pt")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b.pt", Crash(1))
    saved = torch.load(tmp_path / "b.pt", weights_only=False)["callbacks"]["OneCycle#0"]
    resumed, sched = run(tmp_path / "b.pt", resume=True)
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert sched.sched.last_epoch == full_sched.sched.last_epoch == 12
    assert sched.sched.optimizer.param_groups[0]["momentum"] == full_sched.sched.optimizer.param_groups[0]["momentum"]
    assert saved["groups"][0]["momentum"] < 0.95  # 4 steps into the cycle: not step 0's value


def test_unwritable_checkpoint_folder_is_refused_before_the_first_step(digits, tmp_path):
    from paperlib.atomic import WriteError

    class CountSteps(Callback):
        steps = 0

        def after_step(self, model):
            CountSteps.steps += 1

    (tmp_path / "file").write_text("x")
    with pytest.raises(WriteError, match=r"^checkpoint folder .*file is a file, not a folder"):
        fit(_small_model(), digits[0].subset(slice(0, 64)), None, TrainConfig(epochs=1, batch_size=64),
            device="cpu", checkpoint=tmp_path / "file" / "c.pt", callbacks=[CountSteps()], progress=False)
    assert CountSteps.steps == 0
