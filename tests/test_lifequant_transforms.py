"""LifeQuant's data transforms (docs/lifequant.md, "Training protocol") and the crop feature of ``fit`` they need.

- CIFAR-100 (paper preset): ``Normalize((.4914, .4822, .4465), (.2023, .1994, .2010))``, the code's constants.
- Office-31 / ImageCLEF: decoded at 256 x 256, training ``RandomCrop(224)`` + flip, test ``CenterCrop(224)``,
  ImageNet normalisation; the class names are the folders' names.
- ``TrainConfig(crop=...)``: ``fit`` feeds crop-sized inputs to the model in training and evaluation (single
  process and DDP); ``crop=None`` keeps the CIFAR-style pad-4 crop.

Oracles kept here: a per-image loop of the crop/flip draws, torchvision's ``CenterCrop`` and its PIL pipeline
(``Resize((256, 256))`` -> ``CenterCrop`` -> ``ToTensor`` -> ``Normalize``).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torchvision.datasets.cifar as tv_cifar
from PIL import Image
from torch import nn
from torchvision import transforms

import paperlib.lifequant.pipeline as P
from paperlib import presets
from paperlib.data.augment import CenterCrop, RandomCropFlip, center_crop, random_crop_flip, train_augment
from paperlib.data.errors import DataError
from paperlib.data.tensors import InMemoryData
from paperlib.models import create_model
from paperlib.train import TrainConfig, evaluate, fit, predict

sys.path.insert(0, str(Path(__file__).parent))
from test_data import make_fake_cifar  # noqa: E402  (the shared CIFAR faker)

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
CODE_CIFAR = ([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010])
CIFAR100_OWN = ([0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762])


# ----------------------------------------------------------------------------------------------- oracles
def reference_crop_flip(x, generator, padding, flip, fill, size):
    """Per image: pad with ``fill``, take the window at the drawn offsets, flip when its bit is set (draw order
    of :func:`random_crop_flip`: row offsets, column offsets, flip bits)."""
    n, c, h, w = x.shape
    ph, pw = h + 2 * padding, w + 2 * padding
    oh, ow = (h, w) if size is None else (size, size)
    padded = torch.as_tensor(fill, dtype=x.dtype).view(1, c, 1, 1).expand(n, c, ph, pw).clone()
    padded[:, :, padding:padding + h, padding:padding + w] = x
    if oh < ph or ow < pw:
        dy = torch.randint(0, ph - oh + 1, (n,), generator=generator)
        dx = torch.randint(0, pw - ow + 1, (n,), generator=generator)
    else:
        dy = dx = torch.zeros(n, dtype=torch.int64)
    bits = torch.randint(0, 2, (n,), generator=generator) if flip else torch.zeros(n, dtype=torch.int64)
    out = []
    for i in range(n):
        win = padded[i, :, dy[i]:dy[i] + oh, dx[i]:dx[i] + ow]
        out.append(win.flip(2) if bits[i] else win)
    return torch.stack(out)


def make_fake_office(root: Path, size=(30, 26), classes=("back_pack", "bike", "mug"), per=(4, 2), seed=0) -> Path:
    """``root/office31/{webcam,dslr,amazon}/images/{train,test}/<class>/*.png`` with non-square random images."""
    rng = np.random.default_rng(seed)
    base = root / "office31"
    for dom in ("webcam", "dslr", "amazon"):
        for source, n in zip(("train", "test"), per, strict=True):
            for cls in classes:
                d = base / dom / "images" / source / cls
                d.mkdir(parents=True)
                for i in range(n):
                    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return base


def torchvision_pipeline(path: Path, resize: int, crop: int | None, mean, std) -> torch.Tensor:
    steps = [transforms.Resize((resize, resize))] + ([transforms.CenterCrop(crop)] if crop else [])
    tf = transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(mean, std)])
    with Image.open(path) as img:
        return tf(img.convert("RGB"))


class ShapeRecorder(nn.Module):
    """A tiny classifier that records the spatial size of every input it sees, by mode."""

    def __init__(self, channels: int = 3, classes: int = 3, bn: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4) if bn else nn.Identity()
        self.fc = nn.Linear(4, classes)
        self.seen: dict[str, set] = {"train": set(), "eval": set()}

    def forward(self, x):
        self.seen["train" if self.training else "eval"].add(tuple(x.shape[-2:]))
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def _data(n=24, size=12, channels=3, seed=0) -> InMemoryData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size, size, generator=g)
    y = torch.arange(n) % 3
    return InMemoryData(x, y, ["a", "b", "c"], (0.5,) * channels, (0.25,) * channels)


# ----------------------------------------------------------------------------------------------- augment
@pytest.mark.parametrize("padding,size,flip", [(4, None, True), (4, None, False), (0, None, True), (2, 9, True),
                                               (0, 8, True), (0, 8, False), (0, 12, True), (1, 14, True)])
def test_random_crop_flip_equals_the_per_image_reference(padding, size, flip):
    """``size=None`` is the CIFAR-style crop at the stored size (unchanged draws); ``size`` a square window."""
    x = _data(n=9, size=12).x
    fill = (0.1, -0.2, 0.3)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(3):
        got = random_crop_flip(x, g1, padding=padding, flip=flip, fill=fill, size=size)
        want = reference_crop_flip(x, g2, padding, flip, fill, size)
        assert torch.equal(got, want)
        assert got.data_ptr() != x.data_ptr()
    assert torch.equal(g1.get_state(), g2.get_state())  # the same number of draws


def test_random_crop_reaches_every_offset_without_padding():
    """``RandomCrop(8)`` of 12 x 12 images: offsets 0..4 in both directions, each window a window of the image."""
    x = torch.arange(12 * 12, dtype=torch.float32).view(1, 1, 12, 12).expand(400, 1, 12, 12).contiguous()
    out = random_crop_flip(x, torch.Generator().manual_seed(0), padding=0, flip=False, size=8)
    assert out.shape == (400, 1, 8, 8)
    tops, lefts = (out[:, 0, 0, 0] // 12).long(), (out[:, 0, 0, 0] % 12).long()
    assert set(tops.tolist()) == set(range(5)) and set(lefts.tolist()) == set(range(5))
    for i in range(400):
        assert torch.equal(out[i, 0], x[0, 0, tops[i]:tops[i] + 8, lefts[i]:lefts[i] + 8])


@pytest.mark.parametrize("hw,size", [((256, 256), 224), ((12, 12), 8), ((17, 20), 8), ((9, 10), 8), ((8, 8), 8)])
def test_center_crop_is_torchvisions(hw, size):
    x = torch.randn(2, 3, *hw)
    assert torch.equal(center_crop(x, size), transforms.functional.center_crop(x, [size, size]))
    assert CenterCrop(size)(x, None).shape == (2, 3, size, size)


def test_crop_bad_input():
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(DataError, match="larger than the padded images"):
        random_crop_flip(x, torch.Generator(), padding=0, size=9)
    with pytest.raises(DataError, match="cannot center-crop 8 x 8 images to 9 x 9"):
        center_crop(x, 9)
    with pytest.raises(DataError, match="size must be an int >= 1"):
        RandomCropFlip(size=0)
    with pytest.raises(DataError, match="crop must be an int >= 1"):
        train_augment(True, crop=2.5)
    with pytest.raises(ValueError, match="crop=0"):
        TrainConfig(crop=0)


def test_train_augment_choices():
    assert train_augment(False) is None
    aug = train_augment(True, fill=(1.0,))
    assert isinstance(aug, RandomCropFlip) and (aug.padding, aug.size, aug.fill) == (4, None, (1.0,))
    aug = train_augment(True, crop=224)
    assert isinstance(aug, RandomCropFlip) and (aug.padding, aug.size, aug.flip) == (0, 224, True)
    assert repr(aug) == "RandomCropFlip(padding=0, flip=True, fill=0.0, size=224)"
    assert repr(RandomCropFlip()) == "RandomCropFlip(padding=4, flip=True, fill=0.0)"  # unchanged
    assert isinstance(train_augment(False, crop=224), CenterCrop)


# ----------------------------------------------------------------------------------------------- fit with crop
@pytest.mark.parametrize("augment", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fit_feeds_crop_sized_inputs_in_training_and_evaluation(augment, channels_last):
    train, test = _data(size=12), _data(n=10, size=12, seed=1)
    torch.manual_seed(0)
    model = ShapeRecorder()
    cfg = TrainConfig(epochs=2, batch_size=8, crop=8, augment=augment, channels_last=channels_last, lr=0.01)
    res = fit(model, train, test, cfg, device="cpu")
    assert model.seen == {"train": {(8, 8)}, "eval": {(8, 8)}}
    assert len(res.history) == 2 and "test_top1" in res.history[-1]
    # evaluation = the model on the central 8 x 8 windows
    want = model.eval()(center_crop(test.x, 8).contiguous()).argmax(1)
    logits, _ = predict(model, test, crop=8)
    assert torch.equal(logits.argmax(1), want)
    assert evaluate(model, test, crop=8)["top1"] == res.final["top1"]
    cropped = InMemoryData(center_crop(test.x, 8).contiguous(), test.y, test.classes, test.mean, test.std)
    assert evaluate(model, cropped) == evaluate(model, test, crop=8)


def test_fit_without_augment_trains_on_the_central_window():
    """``augment=False, crop=8`` is ``fit`` on the center-cropped data, step for step."""
    train = _data(size=12)
    cropped = InMemoryData(center_crop(train.x, 8).contiguous(), train.y, train.classes, train.mean, train.std)
    params = []
    for data, crop in ((train, 8), (cropped, None)):
        torch.manual_seed(0)
        model = ShapeRecorder()
        fit(model, data, None, TrainConfig(epochs=2, batch_size=8, crop=crop, lr=0.05), device="cpu")
        params.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert torch.equal(params[0], params[1])


def test_fit_with_crop_needs_in_memory_training_data():
    batches = [(torch.randn(4, 3, 12, 12), torch.arange(4) % 3)]
    with pytest.raises(ValueError, match="crop=8.*own transforms"):
        fit(ShapeRecorder(), batches, None, TrainConfig(epochs=1, crop=8), device="cpu")


# ----------------------------------------------------------------------------------------------- DDP
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _crop_case(distributed: bool) -> dict:
    train, test = _data(n=30, size=12), _data(n=10, size=12, seed=1)
    torch.manual_seed(0)
    model = ShapeRecorder(bn=False)  # no BN: DDP's per-rank batch statistics would differ from one process
    cfg = TrainConfig(epochs=2, batch_size=10, crop=8, augment=True, seed=3, scheduler="none", lr=0.1)
    res = fit(model, train, test, cfg, device="cpu", distributed=distributed)
    return {"params": torch.cat([p.detach().reshape(-1) for p in model.parameters()]).tolist(),
            "seen": {k: sorted(v) for k, v in model.seen.items()}, "loss": res.history[-1]["train_loss"],
            "top1": res.final["top1"]}


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from paperlib import distributed as pdist

    with pdist.session("cpu"):
        report = {"ddp": _crop_case(True)}
        if rank == 0:
            report["single"] = _crop_case(False)
        pdist.barrier()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))


def test_ddp_with_crop_equals_one_process(tmp_path):
    """Under DDP every rank crops the same global batch with the same draws and keeps its shard: the run equals
    the single-process one (a model without BN, so that the per-rank batches do not matter)."""
    mp.start_processes(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True,
                       start_method="spawn")
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    for r in (r0["ddp"], r1["ddp"], r0["single"]):
        assert r["seen"] == {"train": [[8, 8]], "eval": [[8, 8]]}
    np.testing.assert_allclose(r0["ddp"]["params"], r0["single"]["params"], rtol=1e-5, atol=1e-6)
    assert r0["ddp"]["params"] == r1["ddp"]["params"]
    assert r0["ddp"]["loss"] == pytest.approx(r0["single"]["loss"], rel=1e-5)
    assert r0["ddp"]["top1"] == r0["single"]["top1"]


# ----------------------------------------------------------------------------------------------- Office / ImageCLEF
def test_office_decoded_at_resize_with_center_cropped_test_and_imagenet_stats(tmp_path):
    """The original transforms (docs/lifequant.md, "Training protocol") at a small scale (decode 12 for 256, crop 8 for
    224): train images are Resize((12, 12)) of the files, test images Resize((12, 12)) -> CenterCrop(8), both
    ImageNet-normalised, as torchvision computes them; class names are the folders'."""
    root = make_fake_office(tmp_path)
    train, test, trd, ted = P.load_domain_data(root, "office31", 8, resize=12, mean=IMAGENET[0], std=IMAGENET[1])
    assert train.x.shape == (36, 3, 12, 12) and test.x.shape == (18, 3, 8, 8) and test.x.is_contiguous()
    assert train.classes == test.classes == ["back_pack", "bike", "mug"]
    assert list(train.mean) == IMAGENET[0] and list(test.std) == IMAGENET[1]
    # rows in the generator's order: webcam, dslr, amazon; classes in sorted order, files in name order
    first_train = root / "webcam" / "images" / "train" / "back_pack" / "0.png"
    first_test = root / "webcam" / "images" / "test" / "back_pack" / "0.png"
    want_train = torchvision_pipeline(first_train, 12, None, *IMAGENET)
    want_test = torchvision_pipeline(first_test, 12, 8, *IMAGENET)
    torch.testing.assert_close(train.x[0], want_train, rtol=0, atol=1e-6)
    torch.testing.assert_close(test.x[0], want_test, rtol=0, atol=1e-6)
    # without resize/normalisation: today's loader (decoded at size, the train images' own statistics)
    tr0, te0, _, _ = P.load_domain_data(root, "office31", 8)
    assert tr0.x.shape[-1] == te0.x.shape[-1] == 8 and tr0.mean != train.mean and te0.mean == tr0.mean
    with pytest.raises(ValueError, match="resize=6 must be an int >= size=8"):
        P.load_domain_data(root, "office31", 8, resize=6)
    with pytest.raises(ValueError, match="both mean and std"):
        P.load_domain_data(root, "office31", 8, mean=IMAGENET[0])


def test_experiment_resize_sets_the_crop_and_every_model_input_is_crop_sized(tmp_path, monkeypatch):
    """An Office experiment with ``resize``: the schedule's crop is ``image_size``, and through task 0 (FP32 and
    8-bit), the lifelong tasks, the importance F on the replay data and every evaluation the network only ever
    sees ``image_size`` inputs."""
    make_fake_office(tmp_path, classes=("back_pack", "bike"))
    exp = {"name": "office", "dataset": "office31", "image_size": 8, "resize": 12, "normalize": "imagenet",
           "model": "resnet8", "replay_rate": 0.5, "channels": 3}
    P.check_experiment(exp)
    cfg = {"schedule": {"fp_epochs": 1, "q8_epochs": 1, "task_epochs": 1, "fp_milestones": [1], "milestones": [1],
                        "batch_size": 8, "augment": True}}
    schedule = P.experiment_schedule(cfg, exp)
    assert schedule.crop == 8 and schedule.train_config("task", 0).crop == 8
    train, test, split = P._load_experiment_data(exp, str(tmp_path), torch.device("cpu"), {})
    assert train.x.shape[-1] == 12 and test.x.shape[-1] == 8 and train.classes == ["back_pack", "bike"]
    seen: dict[str, set] = {"train": set(), "eval": set()}

    def record(module, args):
        seen["train" if module.training else "eval"].add(tuple(args[0].shape[-2:]))

    def recorded_model(name, **kwargs):  # task0_start builds its model here; the hook follows it (deep copies)
        model = create_model(name, **kwargs)
        model.register_forward_pre_hook(record)
        return model

    monkeypatch.setattr(P, "create_model", recorded_model)
    torch.manual_seed(0)
    weights = tmp_path / "start.pth"
    torch.save(create_model("resnet8", num_classes=2, in_channels=3).state_dict(), weights)
    start, report = P.task0_start("resnet8", {"num_classes": 2, "in_channels": 3}, train, test, split, schedule, 0,
                                  "cpu", init_weights=weights, progress=False)
    assert seen == {"train": {(8, 8)}, "eval": {(8, 8)}} and set(report["intermediate_top1"]) == {"8"}
    seen["train"].clear(), seen["eval"].clear()
    res = P.run_lifelong(start, train, test, split, "lifequant_paper", schedule, 0, "cpu", progress=False)
    assert res.diverged is None and len(res.acc) == 3
    assert seen == {"train": {(8, 8)}, "eval": {(8, 8)}}  # the F pass runs in eval mode on replay crops


def test_experiment_settings_are_checked():
    base = {"name": "e", "dataset": "office31", "image_size": 8, "model": "resnet8", "replay_rate": 0.5}
    P.check_experiment({**base, "resize": 8, "normalize": [[0.1, 0.2, 0.3], [1, 1, 1]]})
    with pytest.raises(ValueError, match="resize=6 must be an int >= image_size=8"):
        P.check_experiment({**base, "resize": 6})
    with pytest.raises(ValueError, match="normalize='imagenette' is unknown"):
        P.check_experiment({**base, "normalize": "imagenette"})
    with pytest.raises(ValueError, match=r"\[\[3 means\], \[3 stds > 0\]\]"):
        P.check_experiment({**base, "normalize": [[0.1, 0.2, 0.3], [1, 0, 1]]})
    with pytest.raises(ValueError, match=r"\[\[3 means\], \[3 stds > 0\]\]"):
        P.check_experiment({**base, "normalize": [0.5, 0.5]})
    cifar = {**base, "dataset": "cifar100", "num_tasks": 3, "drop_rate": 0.25}
    with pytest.raises(ValueError, match="resize applies to the image-folder datasets"):
        P.check_experiment({**cifar, "resize": 40})
    with pytest.raises(ValueError, match="digits are normalised with their train statistics"):
        P.check_experiment({**cifar, "dataset": "digits", "normalize": "imagenet"})
    with pytest.raises(ValueError, match="crop is set from each experiment"):
        P.experiment_schedule({"schedule": {"crop": 8}}, {**base, "resize": 12})


def test_paper_preset_transforms():
    cfg = presets.resolve("lifequant", "paper")
    by_data: dict = {}
    for exp in cfg["experiments"]:
        by_data.setdefault(exp["dataset"], []).append(exp)
        P.check_experiment(exp)
    for exp in by_data["cifar100"]:  # both CIFAR-100 variants: the code's constants, stored and fed at 32
        assert P.experiment_normalization(exp) == tuple(tuple(v) for v in CODE_CIFAR)
        assert exp.get("resize") is None and P.experiment_schedule(cfg, exp).crop is None
    for name in ("office31", "imageclef"):
        (exp,) = by_data[name]
        assert (exp["resize"], exp["image_size"]) == (256, 224)
        assert P.experiment_normalization(exp) == tuple(tuple(v) for v in IMAGENET)
        schedule = P.experiment_schedule(cfg, exp)
        assert schedule.crop == 224 and schedule.augment is True
        assert schedule.train_config("fp32", 0).crop == 224


# ----------------------------------------------------------------------------------------------- CIFAR-100
@pytest.fixture
def no_md5(monkeypatch):
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda path, md5=None: Path(path).is_file())


def test_cifar100_paper_experiment_uses_the_code_normalisation(no_md5, tmp_path):
    """The paper preset's CIFAR-100 experiment normalises with (.4914, .4822, .4465), (.2023, .1994, .2010) (original
    code: ``main.py``), not CIFAR-100's own statistics; without ``normalize`` the loader keeps CIFAR-100's."""
    raw = make_fake_cifar(tmp_path, "cifar100")
    exp = {**next(e for e in presets.resolve("lifequant", "paper")["experiments"] if e["dataset"] == "cifar100"),
           "num_tasks": 1, "drop_rate": 0.0}
    train, test, _ = P._load_experiment_data(exp, str(tmp_path), torch.device("cpu"), {})
    pixels = torch.from_numpy(raw["train"][0]).permute(0, 3, 1, 2).float() / 255
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in CODE_CIFAR)
    torch.testing.assert_close(train.x, (pixels - mean) / std, rtol=0, atol=1e-6)
    assert list(train.mean) == CODE_CIFAR[0] and list(test.std) == CODE_CIFAR[1]
    own, _, _ = P._load_experiment_data({k: v for k, v in exp.items() if k != "normalize"}, str(tmp_path),
                                        torch.device("cpu"), {})
    assert list(own.mean) == CIFAR100_OWN[0] and list(own.std) == CIFAR100_OWN[1]
