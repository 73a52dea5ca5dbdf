"""presets.resolve: only an unset override (None, "", [], {}) means "the preset's"; 0, 0.0 and False are values.
The notebooks' parameters cells default their numeric knobs to None, papermill declares and injects them, and the
quickstart driver does what 0 means (the other drivers are tested beside their own tests)."""

from __future__ import annotations

import ast
import json

import pytest

from paperlib import presets
from paperlib.presets import is_unset, resolve
from paperlib.reproduce import check_parameters, declared_parameters, list_notebooks

TABLE = {p: {"epochs": 3, "lam": 100.0, "flag": True, "name": "x", "items": [1, 2], "opts": {"a": 1}}
         for p in presets.PRESET_NAMES}


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(presets.PRESETS, "_toy", TABLE)
    return "_toy"


def test_zero_and_false_are_values(toy):
    cfg = resolve(toy, "smoke", epochs=0, lam=0.0, flag=False)
    assert cfg["epochs"] == 0 and isinstance(cfg["epochs"], int)
    assert cfg["lam"] == 0.0 and cfg["flag"] is False
    assert resolve(toy, "smoke", epochs=7, lam=-1.5)["epochs"] == 7  # any number is passed on (drivers validate)


def test_unset_overrides_keep_the_preset(toy):
    cfg = resolve(toy, "default", epochs=None, lam=None, flag=None, name="", items=[], opts={})
    assert {k: cfg[k] for k in TABLE["default"]} == TABLE["default"] and cfg["preset"] == "default"
    cfg = resolve(toy, "default", name="y", items=[0], opts={"b": 0})
    assert (cfg["name"], cfg["items"], cfg["opts"]) == ("y", [0], {"b": 0})


def test_resolve_returns_a_copy_and_names_bad_input(toy):
    resolve(toy, "smoke")["items"].append(3)
    assert TABLE["smoke"]["items"] == [1, 2]
    with pytest.raises(ValueError, match=r"'epoch' is not a setting of _toy; settings: \['epochs'"):
        resolve(toy, "smoke", epoch=0)
    with pytest.raises(ValueError, match="preset='fast': use one of smoke, default, paper"):
        resolve(toy, "fast")


@pytest.mark.parametrize("value, unset", [
    (None, True), ("", True), ([], True), ((), True), ({}, True),
    (0, False), (0.0, False), (False, False), (True, False), ("0", False), ([0], False), ({"a": None}, False),
])
def test_is_unset(value, unset):
    assert is_unset(value) is unset


# ------------------------------------------------------------------------------------ the notebooks' parameters
def _parameters_cell(path) -> str:
    nb = json.loads(path.read_text())
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"{path.name}: one cell tagged 'parameters'"
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    assert all(not c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code"), f"{path.name} has outputs"
    src = cells[0]["source"]
    return "".join(src) if isinstance(src, list) else src


def _assignments(src: str) -> dict[str, object]:
    out = {}
    for node in ast.parse(src).body:
        assert isinstance(node, ast.Assign) and len(node.targets) == 1, ast.unparse(node)
        out[node.targets[0].id] = ast.literal_eval(node.value)
    return out


@pytest.mark.parametrize("name", list(list_notebooks()))
def test_no_numeric_zero_means_the_preset(name):
    path = list_notebooks()[name]
    src = _parameters_cell(path)
    values = _assignments(src)
    zeros = [k for k, v in values.items() if not isinstance(v, bool) and isinstance(v, int | float) and v == 0]
    assert not zeros, f"{name}: {zeros} default to 0; a numeric knob that means 'the preset's' defaults to None"
    assert "0: the preset" not in src
    for line in src.splitlines():
        key = line.split("=")[0].strip()
        if values.get(key, "") is None:
            assert "None: the preset's" in line, f"{name}: document None on {line!r}"
    # papermill skips a line with two '=' (e.g. '>=' in a comment): every assigned name must be declared, or the
    # strict harness would reject it
    assert set(declared_parameters(path)) == set(values), name


def test_the_harness_accepts_numbers_for_none_defaults_and_injects_zero(tmp_path):
    import papermill as pm

    nbs = list_notebooks()
    check_parameters(nbs["00_quickstart"], {"fp_epochs": 3, "qat_epochs": 0})
    check_parameters(nbs["lifequant"], {"lam": 0.0, "task_epochs": 2})
    check_parameters(nbs["cbp"], {"periods": 1, "workers": 1})
    check_parameters(nbs["dgms"], {"epochs": 0, "overrides": {"num_threads": 0}})
    check_parameters(nbs["climbq"], {"fp_epochs": 0, "qat_epochs": None})
    out = tmp_path / "prepared.ipynb"
    pm.execute_notebook(str(nbs["lifequant"]), str(out), parameters={"lam": 0.0, "task_epochs": 0},
                        prepare_only=True, progress_bar=False)
    nb = json.loads(out.read_text())
    injected = next(c for c in nb["cells"] if "injected-parameters" in c["metadata"].get("tags", []))
    assert _assignments("".join(injected["source"])) == {"lam": 0.0, "task_epochs": 0}


# ------------------------------------------------------------------------------------ the quickstart driver
def _quickstart_cfg(**over):
    from paperlib import quickstart  # noqa: F401  (registers the presets)

    return resolve("00_quickstart", "smoke", **{"bits": [4], "seeds": [0], **over})


@pytest.mark.parametrize("over, match", [
    ({"qat_epochs": -1}, r"qat_epochs=-1: epochs must be an int >= 0 \(0: skip that stage"),
    ({"fp_epochs": 1.5}, r"fp_epochs=1.5: epochs must be an int >= 0"),
    ({"fp_epochs": True}, r"fp_epochs=True: epochs must be an int"),
    ({"fp_epochs": 0, "qat_epochs": 0}, "fp_epochs=0 and qat_epochs=0: every network would stay"),
])
def test_quickstart_refuses_bad_epochs_before_loading_data(over, match, monkeypatch):
    from paperlib import quickstart

    monkeypatch.setattr(quickstart, "load_dataset", lambda *a, **k: pytest.fail("loaded data despite bad input"))
    with pytest.raises(ValueError, match=match):
        quickstart.run_quickstart(_quickstart_cfg(**over), device="cpu")


@pytest.fixture
def tmp_runs(monkeypatch, tmp_path):
    from paperlib import paths

    monkeypatch.setattr(paths, "runs_dir", lambda: tmp_path)  # the FP32 cache goes to tmp_path/_cache


def _spy(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def test_quickstart_qat_epochs_0_is_post_training_quantization(monkeypatch, tmp_runs):
    import torch

    from paperlib import quickstart
    from paperlib.data.load import load_dataset
    from paperlib.train import evaluate

    fits = _spy(monkeypatch, quickstart, "fit")
    m = quickstart.run_quickstart(_quickstart_cfg(fp_epochs=1, qat_epochs=0), device="cpu")
    assert fits == [] and m["history"] == {"uniform W4A4/seed0": []}  # the FP32 net came from pretrained_fp32
    # reference: the same FP32 network (cached), quantized, evaluated with nothing in between
    train, test = load_dataset("digits", size=8, channels=1)
    kwargs = {"num_classes": 10, "in_channels": 1, "shortcut": "B", "act_position": "post_relu"}
    fp, rep = quickstart._fp32_start(m["config"], kwargs, train, test, 0, torch.device("cpu"), False)
    ref = evaluate(quickstart.uniform_qat(fp, 4, m["config"]["act_clip"]), test)
    rows = {r["method"]: r for r in m["per_seed"]}
    assert rows["FP32"]["top1"] == rep["top1"]
    assert rows["uniform W4A4"]["top1"] == ref["top1"] and rows["uniform W4A4"]["balanced_accuracy"] == \
        ref["balanced_accuracy"]


def test_quickstart_fp_epochs_0_trains_quantized_from_the_seeded_init(monkeypatch, tmp_runs):
    import torch

    from paperlib import quickstart
    from paperlib.data.load import load_dataset
    from paperlib.models import create_model
    from paperlib.train import evaluate

    monkeypatch.setattr(quickstart, "pretrained_fp32", lambda *a, **k: pytest.fail("pretrained despite fp_epochs=0"))
    fits = _spy(monkeypatch, quickstart, "fit")
    m = quickstart.run_quickstart(_quickstart_cfg(fp_epochs=0, qat_epochs=1), device="cpu")
    assert len(fits) == 1 and len(m["history"]["uniform W4A4/seed0"]) == 1
    _, test = load_dataset("digits", size=8, channels=1)
    torch.manual_seed(0)
    init = create_model("resnet20", num_classes=10, in_channels=1, shortcut="B", act_position="post_relu")
    assert m["per_seed"][0]["method"] == "FP32" and m["per_seed"][0]["top1"] == evaluate(init, test)["top1"]


@pytest.mark.notebooks
def test_quickstart_notebook_runs_with_qat_epochs_0(run_dirs):
    """End to end through papermill: the injected 0 reaches the driver as 0 (no fine-tuning), not the preset's 2."""
    from paperlib.reproduce import reproduce
    from paperlib.runs import read_json

    runs, figs = run_dirs
    (res,) = reproduce("smoke", only=["00_quickstart"], runs_root=runs, figures_root=figs,
                       extra_parameters={"00_quickstart": {"qat_epochs": 0}})
    assert res.status == "ok", res.error
    m = read_json(res.run_dir / "metrics.json")
    assert m["config"]["qat_epochs"] == 0 and m["config"]["fp_epochs"] == 4  # None: the preset's
    assert all(h == [] for h in m["history"].values()) and len(m["history"]) == 2
    assert read_json(res.run_dir / "manifest.json")["parameters"]["qat_epochs"] == 0


def test_check_settings_types_and_registered_ranges():
    from paperlib import presets

    def ranges(cfg):
        if any(g < 1 for g in cfg["gammas"]):
            raise ValueError(f"gammas={cfg['gammas']}: every imbalance ratio must be >= 1")

    presets.register_presets("_t", {p: {"seeds": [0, 1], "gammas": [10.0], "lr": 0.1, "name": "x"}
                                    for p in presets.PRESET_NAMES}, validate=ranges)
    try:
        assert presets.check_settings("_t", "smoke", seeds=[3], lr=1)["lr"] == 1
        with pytest.raises(ValueError, match=r"seeds\[...\]='abc' must be an integer"):
            presets.check_settings("_t", "smoke", seeds=["abc"])
        with pytest.raises(ValueError, match="gammas=5 must be a list"):
            presets.check_settings("_t", "smoke", gammas=5)
        with pytest.raises(ValueError, match="must be >= 1"):
            presets.check_settings("_t", "smoke", gammas=[0.5])
        with pytest.raises(ValueError, match="True or False|integer"):
            presets.check_settings("_t", "smoke", seeds=[True])
    finally:
        presets.PRESETS.pop("_t")
        presets.VALIDATORS.pop("_t")
