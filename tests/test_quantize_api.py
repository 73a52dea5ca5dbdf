"""``paperlib.quantize_(model, config)``: the one entry point, its six configs, and the activation placement rule
on models this project did not write (torchvision's resnet18 and mobilenet_v2, a plain ``nn.Sequential``)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import paperlib
from paperlib import (
    CBPConfig,
    ClimbQConfig,
    DGMSConfig,
    LifeQuantConfig,
    LSQConfig,
    UniformConfig,
    quantize_,
)
from paperlib.models import create_model
from paperlib.quant import ActSlot, QuantConv2d, QuantLinear, activation_sites, quantized_layers

CONFIGS = {
    "uniform": lambda: UniformConfig(bits=4),
    "lsq": lambda: LSQConfig(bits=4),
    "climbq": lambda: ClimbQConfig(bits=4),
    "lifequant": lambda: LifeQuantConfig(bits=4),
    "dgms": lambda: DGMSConfig(num_components=16, n_init=1),
    "cbp": lambda: CBPConfig(mode="ter"),
}
WEIGHTS_ONLY = {"dgms", "cbp"}


def _sequential() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                         nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 2 * 2, 10))


FOREIGN = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 32, 32)),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), (2, 3, 32, 32)),
    "sequential": (_sequential, (2, 1, 8, 8)),
}


def _layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]


@pytest.mark.parametrize("arch", list(FOREIGN))
@pytest.mark.parametrize("method", list(CONFIGS))
def test_every_config_quantizes_a_foreign_model_and_trains(method: str, arch: str) -> None:
    make, shape = FOREIGN[arch]
    torch.manual_seed(0)
    model = make()
    names = _layers(model)
    config = CONFIGS[method]()
    assert quantize_(model, config) is model
    quantized = quantized_layers(model)
    assert set(quantized) == set(names) - set(config.skip_layers(make()))
    assert list(model.state_dict()).count(f"{names[1]}.weight") == 1  # the latent weight keeps its key
    sites = activation_sites(model)
    if method in WEIGHTS_ONLY:
        assert sites == {}
    else:  # the placement rule: one activation quantizer on the input of every quantized layer
        assert len(sites) == len(quantized) and all(n.endswith(".input_quantizer") for n in sites)
    x = torch.randn(*shape)
    model.train()
    model(x).square().mean().backward()
    latent = model.get_submodule(names[1]).weight
    assert latent.grad is not None
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_activation_quantizers_really_run_on_a_foreign_model() -> None:
    """The input of a quantized layer takes at most 2^bits values once the placement rule is applied (before it:
    thousands): the activations are quantized, not only the slots filled."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    seen: dict[str, torch.Tensor] = {}
    quantize_(model, UniformConfig(bits=2, act_clip=2.0))
    layer = model.layer1[0].conv2
    layer.register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0].detach()), prepend=False)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    values = torch.unique(seen["in"])
    assert len(values) <= 4 and values.min() >= 0 and values.max() <= 2.0


@pytest.mark.parametrize(("config", "reference"), [
    (lambda: UniformConfig(bits=3), "uniform"),
    (lambda: ClimbQConfig(bits=3), "climbq"),
    (lambda: LifeQuantConfig(bits=3), "lifequant"),
    (lambda: DGMSConfig(num_components=4, n_init=2), "dgms"),
    (lambda: CBPConfig(mode="bin"), "cbp"),
])
def test_on_this_projects_models_it_equals_the_notebooks_quantizers(config, reference) -> None:
    """On a model with ActSlots (this project's), ``quantize_`` fills the slots the papers quantize and gives the
    outputs of the path each notebook uses."""
    from paperlib.cbp import CBP
    from paperlib.climbq_experiment import CLIMBQ_CE, quantize_for_method
    from paperlib.dgms import quantize_dgms
    from paperlib.lifequant import quantize_lifequant
    from paperlib.quickstart import uniform_qat

    torch.manual_seed(0)
    fp = create_model("resnet8", num_classes=10, in_channels=1)
    x = torch.randn(4, 1, 8, 8)
    ours = quantize_(copy.deepcopy(fp), config())
    if reference == "uniform":
        theirs = uniform_qat(fp, 3)
    elif reference == "climbq":
        theirs = quantize_for_method(fp, CLIMBQ_CE, 3, {"act_range": 2.0, "eval_sigma": 2.0})
    elif reference == "lifequant":
        theirs = quantize_lifequant(copy.deepcopy(fp), 3, 3)
    elif reference == "dgms":
        theirs = quantize_dgms(copy.deepcopy(fp), 4, n_init=2)
    else:
        theirs = copy.deepcopy(fp)
        CBP(theirs, "bin")
    assert set(quantized_layers(ours)) == set(quantized_layers(theirs))
    slots = [m for m in ours.modules() if isinstance(m, ActSlot)]
    assert not any(hasattr(m, "input_quantizer") for m in ours.modules())  # the model's own slots, no extra
    assert len(activation_sites(ours)) == len(activation_sites(theirs)) == (
        0 if reference in ("dgms", "cbp") else len(slots))
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


@pytest.mark.parametrize(("make", "error", "needle"), [
    (lambda: UniformConfig(bits=0), ValueError, "bits=0"),
    (lambda: UniformConfig(bits=4.0), TypeError, "bits must be an int"),
    (lambda: LSQConfig(bits=1), ValueError, "bits=1"),
    (lambda: ClimbQConfig(bits=1), ValueError, "bits=1 is degenerate"),
    (lambda: ClimbQConfig(act_range=0), ValueError, "act_range=0"),
    (lambda: LifeQuantConfig(quantizer="median"), ValueError, "quantizer"),
    (lambda: DGMSConfig(num_components=1), ValueError, "num_components"),
    (lambda: DGMSConfig(activation="inputs"), ValueError, "weights only"),
    (lambda: CBPConfig(mode="quad"), ValueError, "quad"),
    (lambda: UniformConfig(activation="everywhere"), ValueError, "activation='everywhere'"),
    (lambda: UniformConfig(skip="middle"), ValueError, "skip='middle'"),
])
def test_configs_are_validated_at_construction(make, error, needle) -> None:
    with pytest.raises(error, match=needle):
        make()


def test_activation_bits_without_a_place_is_an_error_never_a_silent_no_op() -> None:
    model = _sequential()
    with pytest.raises(ValueError, match="activation='slots' but Sequential has no ActSlot"):
        quantize_(model, UniformConfig(bits=4, activation="slots"))
    with pytest.raises(ValueError, match="every weight layer of Sequential is skipped"):
        quantize_(_sequential(), UniformConfig(bits=4, skip=tuple(_layers(_sequential()))))
    with pytest.raises(ValueError, match="no Conv2d or Linear"):
        quantize_(nn.Sequential(nn.ReLU()), UniformConfig())
    with pytest.raises(TypeError, match="needs a quantization config"):
        quantize_(_sequential(), {"bits": 4})
    with pytest.raises(TypeError, match="needs an nn.Module"):
        quantize_("resnet18", UniformConfig())
    weights_only = quantize_(_sequential(), UniformConfig(bits=4, activation="none"))
    assert activation_sites(weights_only) == {} and len(quantized_layers(weights_only)) == 2


def test_quantize_again_refills_the_same_places() -> None:
    model = quantize_(_sequential(), UniformConfig(bits=4))
    quantize_(model, UniformConfig(bits=2))
    sites = activation_sites(model)
    assert len(sites) == 2 and {q.bits for q in sites.values()} == {2}
    layer = model[3]
    assert isinstance(layer, QuantConv2d) and len(layer._forward_pre_hooks) == 1
    assert isinstance(model[8], nn.Linear) and not isinstance(model[8], QuantLinear)


def test_top_level_names_are_lazy_and_complete() -> None:
    for name in ("quantize_", "UniformConfig", "LSQConfig", "ClimbQConfig", "LifeQuantConfig", "DGMSConfig",
                 "CBPConfig"):
        assert name in dir(paperlib) and getattr(paperlib, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'quantise_'"):
        paperlib.quantise_  # noqa: B018


def test_homovar_takes_the_penultimate_features_of_a_model_without_forward_features() -> None:
    """ClimbQ's HomoVar criterion on torchvision's resnet18 (no ``forward_features``): the features are the input
    of the last ``nn.Linear`` (512 per image), the logits the model's own; on this project's ResNet the result
    equals ``fc(forward_features(x))``."""
    from paperlib.climbq_experiment import HomoVarCriterion
    from paperlib.models.features import logits_and_features

    torch.manual_seed(0)
    counts = [40, 20, 10, 5]
    x, y = torch.randn(16, 3, 32, 32), torch.arange(16) % 4
    tv = quantize_(torchvision.models.resnet18(num_classes=4), ClimbQConfig(bits=4)).train()
    logits, feats = logits_and_features(tv, x)
    assert feats.shape == (16, 512) and logits.shape == (16, 4)
    tv.fc.weight.grad = None
    loss = HomoVarCriterion(counts)(tv, x, y)
    loss.backward()
    assert torch.isfinite(loss) and tv.fc.weight.grad is not None and tv.layer1[0].conv1.weight.grad is not None
    ours = create_model("resnet8", num_classes=4, in_channels=3).eval()
    with torch.no_grad():
        got = logits_and_features(ours, x)
        torch.testing.assert_close(got[0], ours(x), rtol=0, atol=0)
        torch.testing.assert_close(got[1], ours.forward_features(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="no nn.Linear classifier"):
        logits_and_features(nn.Sequential(nn.Conv2d(1, 2, 3)), torch.randn(1, 1, 4, 4))


@pytest.mark.parametrize("method", list(CONFIGS))
def test_hooks_give_what_fit_needs_and_training_runs(method: str) -> None:
    """``criterion, callbacks = paperlib.hooks(model, train, config)`` then ``fit``: one epoch on 256 digits
    images, on a plain ``nn.Sequential`` (no ``forward_features``, no ActSlot); each method's state moves."""
    from paperlib.data.digits import load_digits
    from paperlib.train import TrainConfig, fit

    train, _ = load_digits(size=8, channels=1, seed=0)
    train = train.subset(slice(0, 256))
    torch.manual_seed(0)
    model = quantize_(_sequential(), CONFIGS[method]())
    criterion, callbacks = paperlib.hooks(model, train, CONFIGS[method]())
    res = fit(model, train, None, TrainConfig(epochs=1, batch_size=64, lr=0.01), criterion=criterion,
              callbacks=callbacks, device="cpu", progress=False)
    assert math.isfinite(res.history[-1]["train_loss"])
    if method == "climbq":
        sigma, hv = callbacks
        assert 0 < sigma.max_deviation < 1 and len(hv.last_epoch["weights"]) == 10
        assert "homovar_W" in res.history[-1]
    elif method == "cbp":
        cbp = callbacks[0].cbp
        assert cbp.epochs == 1 and cbp.started
    else:
        assert callbacks == []


def test_climbq_config_with_cross_entropy_keeps_the_sigma_scaling() -> None:
    from paperlib.climbq_hooks import SigmaScaling
    from paperlib.data.digits import load_digits

    train, _ = load_digits(size=8, channels=1, seed=0)
    criterion, callbacks = paperlib.hooks(_sequential(), train, ClimbQConfig(bits=4, loss="ce"))
    assert criterion.__name__ == "cross_entropy" and [type(c) for c in callbacks] == [SigmaScaling]
    with pytest.raises(ValueError, match="loss='focal'"):
        ClimbQConfig(loss="focal")
    with pytest.raises(ValueError, match="alpha=1.5"):
        ClimbQConfig(alpha=1.5)
    with pytest.raises(TypeError, match="needs a quantization config"):
        paperlib.hooks(_sequential(), train, "climbq")
    with pytest.raises(TypeError, match="class counts: pass an InMemoryData"):
        paperlib.hooks(_sequential(), [(torch.zeros(1, 1, 8, 8), torch.zeros(1))], ClimbQConfig())
    assert ClimbQConfig(bits=4).activation_bits() == 4 and ClimbQConfig(bits=4, act_bits=3).activation_bits() == 3
    assert DGMSConfig(num_components=4).activation_quantizer() is None


def _readme_blocks(section: str) -> list[str]:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return [b.split("```", 1)[0] for b in body.split("```python\n")[1:]]


def test_the_readme_use_it_on_your_own_model_code_runs() -> None:
    """The README's two snippets, as written (the training one with 1 epoch instead of 10)."""
    first, second = _readme_blocks("Use it on your own model")
    scope: dict = {}
    exec(first, scope)  # noqa: S102
    assert len(quantized_layers(scope["model"])) == 19 and len(activation_sites(scope["model"])) == 19
    assert "TrainConfig(epochs=10)" in second
    exec(second.replace("TrainConfig(epochs=10)", "TrainConfig(epochs=1)"), scope)  # noqa: S102
    sigma, hv = scope["callbacks"]
    assert 0 < sigma.max_deviation < 1 and len(hv.last_epoch["weights"]) == 10
