"""The ``paper`` presets of the LifeQuant and CBP notebooks end to end on tiny fake data in the papers' on-disk
layouts: CIFAR-100 (torchvision's ``cifar-100-python/``), Office-31 and ImageCLEF image folders with a
``resnet50-imagenet.pth`` (LifeQuant), an ImageNet folder with ``train.csv``/``val.csv`` and ``weights/`` (CBP).

Every preset setting is kept except the sizes (epochs, periods, seeds, image size), so the paper path's
datasets, loaders, splits, methods and per-architecture hyper-parameters all run in seconds on a CPU. The big
ImageNet-sized networks (ResNet-50, AlexNet-BN) are replaced by small stand-ins registered under their names
where a test says so (their own code is tested in test_models.py); the real ResNet-18/ResNet-20/MobileNetV2 run.
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar as tv_cifar
from PIL import Image

from paperlib import presets
from paperlib.device import cpu_threads
from paperlib.figures import render_figures
from paperlib.lifequant import pipeline as lq
from paperlib.runs import check_json_native, read_json, write_json

sys.path.insert(0, str(Path(__file__).parent))
from test_data import make_fake_cifar  # noqa: E402  (the shared CIFAR faker)

LQ_FIGURES = ["lifequant_accuracy_matrix", "lifequant_forgetting", "lifequant_per_class", "lifequant_task_curves",
              "lifequant_task_curves_baselines"]
CBP_FIGURES = ["cbp_accuracy", "cbp_constraint_function", "cbp_g_schedule", "cbp_lambda_cfs", "cbp_per_class",
               "cbp_weight_histograms"]
OFFICE_CLASSES = [
    "back_pack", "bike", "bike_helmet", "bookcase", "bottle", "calculator", "desk_chair", "desk_lamp",
    "desktop_computer", "file_cabinet", "headphones", "keyboard", "laptop_computer", "letter_tray", "mobile_phone",
    "monitor", "mouse", "mug", "paper_notebook", "pen", "phone", "printer", "projector", "punchers", "ring_binder",
    "ruler", "scissors", "speaker", "stapler", "tape_dispenser", "trash_can",
]


# ----------------------------------------------------------------------------------------------- fake data
def make_fake_cifar100(root: Path, train_per_class: int = 1, test_per_class: int = 1, seed: int = 0) -> None:
    """torchvision's ``cifar-100-python/`` (``make_fake_cifar``'s files), rewritten so that every one of the 100
    classes has ``*_per_class`` rows: the class-incremental split needs images of every class."""
    make_fake_cifar(root, "cifar100", seed=seed)
    rng = np.random.default_rng(seed)
    for split, per in (("train", train_per_class), ("test", test_per_class)):
        labels = np.tile(np.arange(100), per)
        data = rng.integers(0, 256, size=(labels.size, 3072), dtype=np.uint8)
        with open(root / "cifar-100-python" / split, "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels.tolist(), "batch_label": split}, f)


def make_fake_domains(root: Path, dataset: str, per_split: int = 1, size: int = 20, seed: int = 0) -> Path:
    """``root/<dataset>/`` in :data:`paperlib.lifequant.pipeline.DOMAIN_DATASETS`' layout: Office-31
    ``{domain}/images/{train,test}/{class}/*.jpg`` (the 31 real class names), ImageCLEF
    ``{domain}/{train,test}/{0..11}/*.jpg``. One image per domain is greyscale (Caltech has such images)."""
    spec = lq.DOMAIN_DATASETS[dataset]
    classes = OFFICE_CLASSES if dataset == "office31" else [str(c) for c in range(12)]
    rng = np.random.default_rng(seed)
    base = root / dataset
    for dom in spec["domains"]:
        for split in ("train", "test"):
            for ci, cls in enumerate(classes):
                folder = base.joinpath(*[p for p in (dom, spec["subdir"], split, cls) if p])
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(per_split):
                    shape = (size, size + 4) if ci == 0 and i == 0 else (size, size + 4, 3)
                    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / f"img{i}.jpg")
    return base


@pytest.fixture
def no_md5(monkeypatch):
    """The fakes fail torchvision's md5 checks; accept existing files (as tests/test_data.py does)."""
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda path, md5=None: Path(path).is_file())


def _roundtrip(m: dict, tmp_path: Path) -> dict:
    """``m`` as ``metrics.json`` holds it (NaN -> null), which ``python -m paperlib figures`` redraws from."""
    write_json(tmp_path / "metrics.json", m)
    return read_json(tmp_path / "metrics.json")


def _shrink_lifequant(cfg: dict) -> dict:
    """The paper preset with 1 epoch per stage (milestones at 1), the domain experiments decoded at 20 pixels and
    cropped to 16 (the preset: 256 -> 224) and the MobileNetV2 one at 8 pixels in one batch per epoch (its
    32-pixel forward costs ~1 s per batch on a CPU; at 8 pixels its last stages are 1x1, where a ragged 2-image
    batch makes every activation equal, and the batch standardisation of the MobileNetV2 code, which has no
    epsilon, divides 0 by 0). Everything else as the preset has it: datasets, splits, replay rates, methods,
    quantizer settings, normalisation, augmentation, init weights."""
    cfg["schedule"] = {**cfg["schedule"], "fp_epochs": 1, "q8_epochs": 1, "fp_milestones": [1], "milestones": [1]}
    for exp in cfg["experiments"]:
        if "schedule" in exp:
            exp["schedule"] = {**exp["schedule"], "fp_milestones": [1], "milestones": [1]}
        if exp["model"] == "mobilenetv2":
            exp["image_size"] = 8
            exp["schedule"]["batch_size"] = 128
        if exp["dataset"] in lq.DOMAIN_DATASETS:
            exp["image_size"], exp["resize"] = 16, 20
    return cfg


def _notebook_reads_lifequant(m: dict) -> None:
    """What the notebook's cells and tables read, on a metrics dict (cells 3-10)."""
    check_json_native(m)
    for key in ("device", "data_fingerprint", "seeds", "skipped_experiments", "pretrain", "summary", "method_labels",
                "experiments", "runs", "per_seed", "key_metric"):
        assert key in m, key
    assert lq.pretrain_table(m).shape[0] == len(m["experiments"])
    assert lq.summary_table(m).shape[0] == len(m["summary"])
    for exp in m["experiments"]:
        for k in ("classes", "rows", "name", "num_tasks"):
            assert k in exp
        assert set(exp["rows"]) >= {"train", "paper_training", "replay", "test"}
        assert not lq.class_count_table(m, exp["name"]).empty
        assert not lq.accuracy_matrix_table(m, exp["name"]).empty
    checks = lq.check_expectations(m)
    assert set(checks["holds"].map(type)) <= {bool, type(None)}
    for s in m["summary"]:
        assert m["method_labels"][s["method"]]
    # the claims records (one seed: every interval claim is undecidable, n reported) and "What we found"
    from paperlib.claims import from_records
    from paperlib.lifequant import verdicts

    recs = from_records(m["claims"])
    assert recs and all(c.verdict == "undecidable" for c in recs if c.direction != "descriptive")
    assert all(c.n <= 1 for c in recs if c.direction != "descriptive")
    assert lq.findings(m).startswith("**What we found**")
    assert verdicts.ft_bwt_agreement(m)[1] == len({(r["experiment"], r["method"]) for r in m["runs"]})


# ----------------------------------------------------------------------------------------------- LifeQuant
def test_lifequant_paper_cifar100_resnet20_driver(no_md5, tmp_path):
    """The paper's main experiment (CIFAR-100, 3 tasks, d = 0.25, ResNet-20 at 32 px) with the preset's batch
    size, augmentation and quantizer; Office/ImageCLEF are skipped (no folders). Three methods, one per kind of
    task-t training (code mode without replay; replay + BaLL; paper-mode LifeQuant with its F); the other three
    run in the Office/ImageCLEF test, MobileNetV2 in :func:`test_lifequant_notebook_paper_preset`."""
    make_fake_cifar100(tmp_path / "data")
    methods = ["original", "replay_ball", "lifequant_paper"]
    cfg = _shrink_lifequant(presets.resolve("lifequant", "paper", seeds=[0], task_epochs=1, methods=methods))
    cfg["experiments"] = [e for e in cfg["experiments"] if e["model"] != "mobilenetv2"]
    with cpu_threads(1):
        m = lq.run_lifequant(cfg, device="cpu", data_dir=str(tmp_path / "data"), cache_dir=tmp_path / "cache")
    _notebook_reads_lifequant(m)
    assert m["skipped_experiments"] == ["Office-31, 3 domains, ResNet-50", "ImageCLEF, 4 domains, ResNet-50"]
    assert m["dataset"] == "cifar100" and m["device"] == "cpu"
    (exp,) = m["experiments"]
    assert exp["model"] == "resnet20" and m["methods"] == methods and len(m["runs"]) == 3
    # docs/lifequant.md, 'Splits and replay': CIFAR-100, d = 0.25, T = 3 -> 66/66/68 classes (here one image
    # each), 20 % replay
    assert [len(c) for c in exp["classes"]] == [66, 66, 68]
    assert exp["rows"]["train"] == [66, 66, 68] and exp["rows"]["replay"] == [13, 13, 14]
    assert exp["rows"]["paper_training"] == [66, 66 + 13, 68 + 13 + 13]
    assert (exp["schedule"]["batch_size"], exp["schedule"]["augment"], exp["schedule"]["quantizer"]) == \
        (128, True, "standardize")
    # original code (main.py): it normalises CIFAR-100 with (.4914, .4822, .4465), (.2023, .1994, .2010), no crop
    assert exp["normalize"] == [[0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]] and exp["resize"] is None
    assert exp["schedule"]["crop"] is None
    for run in m["runs"]:
        assert run["diverged"] is None and len(run["acc"]) == 3 and [len(h) for h in run["history"]] == [1, 1, 1]
        assert run["acc_dropped_classes"] is not None  # 34 classes of task 0/1 are absent from task 2
    assert m["pretrain"][0]["identity_at_32_bits"] is True and set(m["pretrain"][0]["intermediate_top1"]) == {"8"}
    figs = render_figures("lifequant", _roundtrip(m, tmp_path), tmp_path / "figs")
    assert sorted(figs) == LQ_FIGURES
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == sorted(f"{f}.{e}" for f in LQ_FIGURES
                                                                            for e in ("png", "pdf"))


def test_lifequant_paper_office_imageclef_driver(tmp_path, monkeypatch):
    """The two domain-incremental experiments from their image folders and ``resnet50-imagenet.pth`` (ResNet-50
    replaced by a small stand-in under its name), with the preset's 50 % replay and batch 32, and the three
    methods the CIFAR test leaves out."""
    from paperlib.models import create_model

    _standin_resnet50(monkeypatch)
    data = tmp_path / "data"
    make_fake_domains(data, "office31")
    make_fake_domains(data, "imageclef")
    torch.save(create_model("resnet50", num_classes=1000).state_dict(), data / "resnet50-imagenet.pth")
    methods = ["replay_ce", "ewc", "lifequant_code"]
    cfg = _shrink_lifequant(presets.resolve("lifequant", "paper", seeds=[0], task_epochs=1, methods=methods))
    cfg["experiments"] = [e for e in cfg["experiments"] if e["dataset"] in lq.DOMAIN_DATASETS]
    with cpu_threads(1):
        m = lq.run_lifequant(cfg, device="cpu", data_dir=str(data), cache_dir=tmp_path / "cache")
    _notebook_reads_lifequant(m)
    assert m["skipped_experiments"] == [] and m["methods"] == methods and len(m["runs"]) == 6
    office, clef = m["experiments"]
    assert (office["num_tasks"], clef["num_tasks"]) == (3, 4)
    # the class folders' names, in label order (Office: sorted names; ImageCLEF: the numeric folders)
    assert office["class_names"] == OFFICE_CLASSES and clef["class_names"] == [str(c) for c in range(12)]
    # original code (Office main.py): ImageNet normalisation, decoded at `resize` (here 20 for 256), random/center
    # crops of 16 (224)
    for exp in (office, clef):
        assert exp["normalize"] == [[0.485, 0.456, 0.406], [0.229, 0.224, 0.225]] and exp["resize"] == 20
        assert exp["schedule"]["crop"] == 16 and exp["schedule"]["augment"] is True
    assert office["classes"] == [list(range(31))] * 3 and clef["classes"] == [list(range(12))] * 4
    assert office["rows"]["train"] == [31] * 3 and clef["rows"]["train"] == [12] * 4
    assert office["rows"]["replay"] == [16] * 3 and clef["rows"]["replay"] == [6] * 4  # 50 % replay
    assert office["schedule"]["batch_size"] == 32 and office["schedule"]["task_lr"] == 0.001
    assert set(m["data_fingerprints"]) == {office["name"], clef["name"]}
    for run in m["runs"]:  # domain-incremental: no class is dropped
        assert run["diverged"] is None and run["dropped_classes"] == [] and run["acc_dropped_classes"] is None
        assert len(run["acc"]) == (3 if run["experiment"] == office["name"] else 4)
    assert sorted(render_figures("lifequant", _roundtrip(m, tmp_path))) == LQ_FIGURES


def _no_training(monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("training started before every experiment's data and weights were checked")

    monkeypatch.setattr(lq, "task0_start", boom)


def test_lifequant_paper_checks_all_data_and_weights_before_training(no_md5, tmp_path, monkeypatch):
    """A missing/wrong ``resnet50-imagenet.pth`` or a malformed ImageCLEF folder must fail before the CIFAR
    experiments train (hours on a GPU), not after them."""
    data = tmp_path / "data"
    make_fake_cifar100(data)
    make_fake_domains(data, "office31")
    cfg = _shrink_lifequant(presets.resolve("lifequant", "paper", seeds=[0], task_epochs=1))
    _no_training(monkeypatch)
    with pytest.raises(lq.MissingData, match="Office-31.*resnet50-imagenet.pth"):
        lq.run_lifequant(cfg, device="cpu", data_dir=str(data), cache_dir=tmp_path / "cache")
    torch.save(torch.nn.Linear(3, 2).state_dict(), data / "resnet50-imagenet.pth")  # not a ResNet-50
    with pytest.raises(ValueError, match="resnet50-imagenet.pth does not fit resnet50.*conv1.weight"):
        lq.run_lifequant(cfg, device="cpu", data_dir=str(data), cache_dir=tmp_path / "cache")
    (data / "resnet50-imagenet.pth").unlink()
    (data / "imageclef" / "b" / "train" / "x").mkdir(parents=True)  # ImageCLEF classes are folders 0..11
    cfg["experiments"] = [e for e in cfg["experiments"] if e["dataset"] != "office31"]
    with pytest.raises(ValueError, match="numeric"):
        lq.run_lifequant(cfg, device="cpu", data_dir=str(data), cache_dir=tmp_path / "cache")


def test_torchvision_resnet50_weights_fit_the_office_model(tmp_path):
    """The file users save (torchvision's ResNet-50 state dict; the 2017 file has no ``num_batches_tracked``)
    loads into the Office/ImageCLEF model except its 31/12-class ``fc``."""
    import torchvision

    state = {k: v for k, v in torchvision.models.resnet50().state_dict().items()
             if not k.endswith("num_batches_tracked")}
    path = tmp_path / "resnet50-imagenet.pth"
    torch.save(state, path)
    missing = lq.check_init_weights("resnet50", {"num_classes": 31, "in_channels": 3}, path)
    assert sorted(k for k in missing if not k.endswith("num_batches_tracked")) == ["fc.bias", "fc.weight"]


def _standin_resnet50(monkeypatch) -> None:
    """ResNet-50 replaced by a ResNet-8 with the same builder signature (ResNet-50 itself: test_models.py)."""
    from paperlib import models

    monkeypatch.setitem(models.MODELS, "resnet50", lambda **kw: models.create_model("resnet8", **kw))


def test_lifequant_weights_path_follows_a_home_relative_data_dir(no_md5, tmp_path, monkeypatch):
    """``data_dir="~/data"``: the data are found (expanduser), so must ``resnet50-imagenet.pth`` be."""
    from paperlib.models import create_model

    monkeypatch.setenv("HOME", str(tmp_path))
    _standin_resnet50(monkeypatch)
    data = tmp_path / "data"
    make_fake_domains(data, "office31")
    torch.save(create_model("resnet50", num_classes=1000).state_dict(), data / "resnet50-imagenet.pth")
    cfg = presets.resolve("lifequant", "paper", seeds=[0])
    cfg["experiments"] = [dict(e, image_size=16) for e in cfg["experiments"] if e["dataset"] == "office31"]
    _no_training(monkeypatch)
    with pytest.raises(AssertionError, match="training started"):  # every check passed
        lq.run_lifequant(cfg, device="cpu", data_dir="~/data", cache_dir=tmp_path / "cache")


# ----------------------------------------------------------------------------------------------- CBP
CBP_ARCHS = ["resnet18", "resnet50", "alexnet_bn"]


def _standin_cbp_archs(monkeypatch) -> None:
    """The paper's three ImageNet networks replaced by a ResNet-8 under their names (the real ones run for
    minutes per period on a CPU; their code is tested in test_models.py, their weights' names below)."""
    from paperlib import models

    for arch in CBP_ARCHS:
        monkeypatch.setitem(models.MODELS, arch, lambda **kw: models.create_model("resnet8", **kw))


def make_fake_imagenet(root: Path, n_classes: int = 4, train_per_class: int = 64, val_per_class: int = 2,
                       seed: int = 0) -> Path:
    """An ImageNet folder as the cbp paper preset reads it: ``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG``,
    ``train.csv``/``val.csv`` (``image,label``) and the weights under ``weights/`` (written by the caller). 256
    training images: the paper's batch of 256 (ResNet-18, AlexNet) with ``drop_last`` needs at least that many."""
    rng = np.random.default_rng(seed)
    for split, per in (("train", train_per_class), ("val", val_per_class)):
        rows = []
        for c in range(n_classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.JPEG",
                                                                                      format="JPEG")
                rows.append(f"{split}/n{c:08d}/{i}.JPEG,{c}")
        (root / f"{split}.csv").write_text("image,label\n" + "\n".join(rows) + "\n")
    return root


def _write_cbp_weights(root: Path) -> None:
    from paperlib.cbp import PAPER_WEIGHTS
    from paperlib.models import create_model

    for arch in CBP_ARCHS:
        (root / PAPER_WEIGHTS[arch]).parent.mkdir(parents=True, exist_ok=True)
        torch.save(create_model(arch, num_classes=1000).state_dict(), root / PAPER_WEIGHTS[arch])


def _notebook_reads_cbp(m: dict) -> None:
    """What the CBP notebook's cells read, for every architecture."""
    from paperlib import claims
    from paperlib.cbp import ablation_table, accuracy_table, expectations_table, findings, recovery_table

    check_json_native(m)
    arch = m["archs"][0]
    assert m["fp"][arch]["top1"] is not None and m["dataset"] == "imagenet"
    rows = {(s["mode"], s["variant"]): s for s in m["summary"] if s["arch"] == arch}
    for mode in m["sets"]:
        c = rows[(mode, "cbp")]
        for k in ("top1_mean", "cfs_mean", "cfs_scale_free_mean", "events_mean", "near_level_frac_mean"):
            assert c[k] is not None, k
        assert m["projected"][arch][mode]["top1"] is not None and m["figure1"]
        assert m["projected"][arch][mode]["top1_bn"] is not None  # projection + BN re-estimation
    assert not ablation_table(m).empty and not accuracy_table(m).empty and not recovery_table(m).empty
    recs = claims.from_records(m["claims"])  # the paperlib.claims records, shown by show_claims
    assert len(expectations_table(m)) == len(recs) and m["expectations"] == m["claims"]
    assert claims.summary_sentence(recs) in findings(m)


def test_cbp_paper_preset_all_archs_driver(tmp_path, monkeypatch):
    """The paper preset's three architectures with the paper's per-architecture hyper-parameters
    (``hparams="paper"``: batch 256, 128 for ResNet-50; lr 1e-4 for shift sets on ResNet-50/AlexNet), the ablation
    on ResNet-18 binary only, loader workers and per-run checkpoints under runs/_cache. Extends
    tests/test_cbp.py::test_paper_preset_path_on_a_fake_imagenet (one ResNet-20, ``hparams="preset"``)."""
    import paperlib.data.manifest as manifest
    from paperlib.cbp import run_cbp_experiment

    _standin_cbp_archs(monkeypatch)
    data = make_fake_imagenet(tmp_path / "imagenet")
    _write_cbp_weights(data)
    monkeypatch.setenv("PAPERLIB_ROOT", str(tmp_path / "root"))
    calls = []
    real_loader = manifest.manifest_loader

    def recording_loader(*args, **kwargs):
        calls.append((kwargs.get("train"), args[2], kwargs.get("num_workers")))
        return real_loader(*args, **kwargs)

    monkeypatch.setattr(manifest, "manifest_loader", recording_loader)
    cfg = presets.resolve("cbp", "paper", seeds=[0], sets=["bin", "2bit"], periods=1)
    cfg.update(image_size=16, num_workers=1)  # the preset's 8 workers: any > 0 takes the worker path
    assert cfg["hparams"] == "paper" and cfg["archs"] == CBP_ARCHS and cfg["checkpoint"] is True
    with cpu_threads(1):
        m = run_cbp_experiment(cfg, device="cpu", data_dir=str(data))
    _notebook_reads_cbp(m)
    assert m["archs"] == CBP_ARCHS and set(m["fp"]) == set(m["projected"]) == set(CBP_ARCHS)
    runs = [(r["arch"], r["mode"], r["variant"]) for r in m["per_seed"]]
    assert runs == [("resnet18", "bin", "ste"), ("resnet18", "bin", "cbp"), ("resnet18", "bin", "no_window"),
                    ("resnet18", "2bit", "cbp"), ("resnet50", "bin", "cbp"), ("resnet50", "2bit", "cbp"),
                    ("alexnet_bn", "bin", "cbp"), ("alexnet_bn", "2bit", "cbp")]
    # one loader per set and architecture for re-estimating the projected net's BN statistics, then one per run,
    # each with the paper's batch for its architecture (+ the val loader, batch 256)
    projected, runs = [256] * 2 + [128] * 2 + [256] * 2, [256] * 4 + [128] * 2 + [256] * 2
    assert [b for train, b, _ in calls if train] == projected + runs
    assert [b for train, b, _ in calls if not train] == [256] and {w for *_, w in calls} == {1}
    lr = {k: h[0]["lr"] for k, h in m["history"].items()}
    assert lr == {"resnet18/bin/ste/seed0": 1e-3, "resnet18/bin/cbp/seed0": 1e-3, "resnet18/bin/no_window/seed0": 1e-3,
                  "resnet18/2bit/cbp/seed0": 1e-3, "resnet50/bin/cbp/seed0": 1e-3, "resnet50/2bit/cbp/seed0": 1e-4,
                  "alexnet_bn/bin/cbp/seed0": 1e-3, "alexnet_bn/2bit/cbp/seed0": 1e-4}
    assert all(len(h) == 1 and "test_top1" in h[0] for h in m["history"].values())  # eval_every = 1
    assert len(list((tmp_path / "root" / "runs" / "_cache").glob("cbp-*/*.pt"))) == 8
    assert set(m["histograms"]["after"]) == set(CBP_ARCHS)
    assert sorted(render_figures("cbp", m)) == sorted(render_figures("cbp", _roundtrip(m, tmp_path))) == CBP_FIGURES


# ----------------------------------------------------------------------------------------------- notebooks
#: Imported by the notebook's kernel (via PYTHONPATH) before any cell runs: the notebooks' parameters cannot
#: shrink epochs, image sizes or architectures, so the test shrinks the registered ``paper`` preset itself, puts
#: small stand-ins under the big networks' names and accepts the fake CIFAR's md5 (as the ``no_md5`` fixture).
SITECUSTOMIZE = '''
import json, os
from pathlib import Path

spec = json.loads(os.environ["PAPER_PATHS_TEST_SPEC"])
import torchvision.datasets.cifar as tv_cifar

tv_cifar.check_integrity = lambda path, md5=None: Path(path).is_file()
import paperlib.cbp  # noqa: F401  (registers the presets)
import paperlib.lifequant.pipeline  # noqa: F401
from paperlib import models, presets

for name in spec["standins"]:
    models.MODELS[name] = lambda **kw: models.create_model("resnet8", **kw)
for notebook, paper in spec["paper"].items():
    presets.PRESETS[notebook]["paper"] = paper
'''


def _kernel_patches(monkeypatch, tmp_path: Path, standins: list[str], paper: dict) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    monkeypatch.setenv("PYTHONPATH", str(site))
    monkeypatch.setenv("PAPER_PATHS_TEST_SPEC", json.dumps({"standins": standins, "paper": paper}))


def _paper_preset(notebook: str, shrink) -> dict:
    cfg = shrink(presets.resolve(notebook, "paper"))
    cfg.pop("preset")
    return cfg


@pytest.mark.notebooks
def test_lifequant_notebook_paper_preset(run_dirs, tmp_path, monkeypatch):
    """notebooks/lifequant.ipynb at ``preset="paper"`` through papermill: CIFAR-100 with MobileNetV2 and Office-31
    (ResNet-50 stand-in) from ``data_dir``, code-mode LifeQuant (MobileNetV2's BaLL form and quantization-noise
    term), one seed, one epoch per task; every cell and figure. (ResNet-20 and ImageCLEF: the driver tests.)"""
    from paperlib.models import create_model
    from paperlib.reproduce import reproduce

    runs, figs = run_dirs
    data = tmp_path / "data"
    make_fake_cifar100(data)
    make_fake_domains(data, "office31")
    make_fake_domains(data, "imageclef")
    _standin_resnet50(monkeypatch)
    torch.save(create_model("resnet50", num_classes=1000).state_dict(), data / "resnet50-imagenet.pth")
    paper = _paper_preset("lifequant", _shrink_lifequant)  # ResNet-20 and ImageCLEF: the driver tests above
    paper["experiments"] = [e for e in paper["experiments"] if e["model"] == "mobilenetv2"
                            or e["dataset"] == "office31"]
    _kernel_patches(monkeypatch, tmp_path, ["resnet50"], {"lifequant": paper})
    params = {"seeds": [0], "methods": ["lifequant_code"], "task_epochs": 1, "data_dir": str(data),
              "cache_dir": str(tmp_path / "cache"), "device": "cpu"}
    (res,) = reproduce("paper", only=["lifequant"], runs_root=runs, figures_root=figs,
                       extra_parameters={"lifequant": params})
    assert res.status == "ok", res.error
    m = read_json(res.run_dir / "metrics.json")
    assert m["config"]["preset"] == "paper" and m["config"]["schedule"]["fp_epochs"] == 1  # the shrunk preset
    assert m["skipped_experiments"] == [] and [e["model"] for e in m["experiments"]] == ["mobilenetv2", "resnet50"]
    mbv2 = next(r for r in m["runs"] if "MobileNetV2" in r["experiment"])["settings"]["method"]
    assert (mbv2["ball_form"], mbv2["prox_qnoise"]) == ("mult", True)
    assert all(r["diverged"] is None for r in m["runs"]) and res.key_value == m["key_metric"]["value"]
    nb = (res.run_dir / "lifequant.ipynb").read_text()
    assert "Table 4." in nb and "What we found" in nb and "run recorded in" in nb
    # the figures are published (redrawing from metrics.json is checked on the driver's metrics, above)
    assert {p.name for p in figs.iterdir()} == {f"{f}.{e}" for f in LQ_FIGURES for e in ("png", "pdf")}


def _shrink_cbp(cfg: dict) -> dict:
    cfg.update(image_size=16, num_workers=0)
    return cfg


@pytest.mark.notebooks
def test_cbp_notebook_paper_preset(run_dirs, tmp_path, monkeypatch):
    """notebooks/cbp.ipynb at ``preset="paper"`` through papermill: the ImageNet folder, the three architectures
    (stand-ins) with their weights under ``weights/``, the paper hyper-parameters, the binary set (the ablation
    on ResNet-18, CBP alone on the others), one period."""
    from paperlib.reproduce import reproduce

    runs, figs = run_dirs
    data = make_fake_imagenet(tmp_path / "imagenet")
    _standin_cbp_archs(monkeypatch)
    _write_cbp_weights(data)
    monkeypatch.setenv("PAPERLIB_ROOT", str(tmp_path / "root"))
    _kernel_patches(monkeypatch, tmp_path, CBP_ARCHS, {"cbp": _paper_preset("cbp", _shrink_cbp)})
    params = {"seeds": [0], "sets": ["bin"], "periods": 1, "data_dir": str(data), "device": "cpu"}
    (res,) = reproduce("paper", only=["cbp"], runs_root=runs, figures_root=figs, extra_parameters={"cbp": params},
                       notebooks_dir=Path(__file__).parents[1] / "notebooks")  # PAPERLIB_ROOT moved the default
    assert res.status == "ok", res.error
    m = read_json(res.run_dir / "metrics.json")
    assert m["config"]["image_size"] == 16 and m["config"]["hparams"] == "paper" and m["archs"] == CBP_ARCHS
    assert len(m["per_seed"]) == 5 and res.key_value == m["key_metric"]["value"]  # 3 variants on ResNet-18
    nb = (res.run_dir / "cbp.ipynb").read_text()
    assert "What we found" in nb and "run recorded in" in nb
    assert {p.name for p in figs.iterdir()} == {f"{f}.{e}" for f in CBP_FIGURES for e in ("png", "pdf")}


def test_cbp_paper_checkpoints_are_not_reused_for_other_data(tmp_path, monkeypatch):
    """E.g. a trial run on an ImageNet subset, then the full set with the same settings: the second run must
    train, not report the subset's networks under the full set's data fingerprint."""
    from paperlib.cbp import run_cbp_experiment

    _standin_cbp_archs(monkeypatch)
    monkeypatch.setenv("PAPERLIB_ROOT", str(tmp_path / "root"))
    cfg = presets.resolve("cbp", "paper", seeds=[0], sets=["bin"], periods=1)
    cfg.update(archs=["resnet18"], variants=["cbp"], image_size=16, num_workers=0, hparams="preset", batch_size=4)
    metrics = []
    for name, per_class in (("subset", 2), ("full", 3)):
        data = make_fake_imagenet(tmp_path / name, train_per_class=per_class, seed=per_class)
        _write_cbp_weights(data)
        with cpu_threads(1):
            metrics.append(run_cbp_experiment(cfg, device="cpu", data_dir=str(data)))
    subset, full = metrics
    assert subset["data_fingerprint"] != full["data_fingerprint"]
    assert full["history"] != subset["history"]  # fails today: the full run loaded the subset's checkpoint
