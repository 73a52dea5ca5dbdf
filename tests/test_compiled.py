"""``torch.compile`` of every method's train step (the GPU path): no graph breaks, no recompiles after
warm-up over batches with changing labels, and the compiled step's values and gradients equal the eager torch
path's (``native=False``: what a GPU runs eagerly).

Inductor compiles every kernel with the C++ compiler, about a second each on a 2-core machine, so the full
matrix costs minutes on a cold cache. By default every method runs on the ``aot_eager`` backend (dynamo and
AOTAutograd: where graph breaks and recompiles happen, and the traced forward and backward graphs) and ClimbQ,
the method with the most numerically sensitive chain (erf then rounding), on Inductor; set
``PAPERLIB_TEST_INDUCTOR=all`` to run every method on Inductor too.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

from paperlib.compiled import MODES, compile_available, compile_model, is_compiled, uncompile
from paperlib.quant import ActSlot, ClippedActivation, DoReFaWeight, LSQActivation, LSQWeight, quantize_model

BATCH, SIZE, CLASSES = 16, 8, 10
WARMUP, STEPS = 2, 6


class TinyNet(nn.Module):
    """Three convs (one residual add, one stride 2), BN, activation slots and a linear head: every layer kind
    the quantizers meet in ResNet-20, at a fraction of the compile time."""

    def __init__(self, pre_relu: bool = False, width: int = 8) -> None:
        super().__init__()
        self.pre = pre_relu
        self.conv0 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False)
        self.bn0, self.bn1, self.bn2 = (nn.BatchNorm2d(width) for _ in range(3))
        self.act0, self.act1, self.act2 = (ActSlot() for _ in range(3))
        self.fc = nn.Linear(width, CLASSES)

    def _unit(self, conv, bn, act, x, residual=None):
        h = bn(conv(x))
        if residual is not None:
            h = h + residual
        return F.relu(act(h)) if self.pre else act(F.relu(h))

    def forward(self, x):
        x = self._unit(self.conv0, self.bn0, self.act0, x)
        x = self._unit(self.conv1, self.bn1, self.act1, x, residual=x)
        x = self._unit(self.conv2, self.bn2, self.act2, x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


DEVICE = "cpu"  # build() and _batch() place models and batches here (the CUDA test sets it)


def _net(pre_relu: bool = False) -> TinyNet:
    torch.manual_seed(0)
    return TinyNet(pre_relu).to(DEVICE)


def _ce(model, x, y):
    out = model(x)
    return out, F.cross_entropy(out, y)


def build(method: str, eager: bool):
    """``(model, step_loss(model, x, y) -> (logits or None, loss))`` of ``method``, as benchmarks/run.py's
    ``step_cases`` builds it. The compiled copy keeps the default ``native=None`` (the compiled path must ignore
    the CPU kernels); the eager reference takes the torch path (``native=False``, as on a GPU)."""
    native = False if eager else None
    if method == "uniform":
        return quantize_model(_net(), weight=lambda _: DoReFaWeight(4), activation=lambda: ClippedActivation(4, 4.0),
                              skip="first_last").to(DEVICE), _ce
    if method == "lsq":
        return quantize_model(_net(), weight=lambda layer: LSQWeight(4, layer.weight),
                              activation=lambda: LSQActivation(4), skip="first_last").to(DEVICE), _ce
    if method == "climbq":
        from paperlib.climbq import ClimbQActivation, ClimbQWeight, batch_sigma, set_sigma

        m = quantize_model(_net(True), weight=lambda _: ClimbQWeight(4, native=native),
                           activation=lambda: ClimbQActivation(4, native=native), skip=[]).to(DEVICE)

        def climbq_loss(model, x, y):
            set_sigma(model, batch_sigma(y, CLASSES))
            return _ce(model, x, y)

        return m, climbq_loss
    if method == "lifequant":
        from paperlib.lifequant import prox_penalty, quantize_lifequant, snapshot

        m = quantize_lifequant(_net(True), 4, 4, native=native).to(DEVICE)
        old = snapshot(m)
        g = torch.Generator().manual_seed(1)
        imp = {k: torch.rand(v.shape, generator=g).to(v.device) for k, v in old.items()}

        def lifequant_loss(model, x, y):
            out, loss = _ce(model, x, y)
            return out, loss + prox_penalty(model, old, imp)

        return m, lifequant_loss
    if method == "cbp":
        from paperlib.cbp import CBP

        m = _net()
        ctl = CBP(m, "ter")
        return m, lambda model, x, y: (None, ctl.criterion(model, x, y))
    if method == "dgms":
        from paperlib.dgms import quantize_dgms

        return quantize_dgms(_net(), 16, impl="fused" if eager else "auto").to(DEVICE), _ce
    raise ValueError(method)


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(BATCH, 3, SIZE, SIZE, generator=g)
    y = torch.randint(0, CLASSES, (BATCH,), generator=g)
    if step % 3 == 2:  # a skewed batch: ClimbQ's per-sample sigma changes a lot
        y[: BATCH // 2] = 0
    return x.to(DEVICE), y.to(DEVICE)


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    """Within ``rtol`` relative to the tensor's scale (elementwise for the big entries)."""
    scale = expected.detach().abs().max().clamp_min(1e-12)
    err = (actual.detach() - expected.detach()).abs().max()
    assert err <= rtol * scale, f"{what}: max |compiled - eager| = {float(err):.3g}, scale {float(scale):.3g}"


INDUCTOR_ALL = os.environ.get("PAPERLIB_TEST_INDUCTOR", "") == "all"
CASES = [(m, "aot_eager") for m in ("uniform", "lsq", "climbq", "lifequant", "cbp", "dgms")]
CASES += [(m, "inductor") for m in (("uniform", "lsq", "climbq", "lifequant", "cbp", "dgms") if INDUCTOR_ALL
                                    else ("climbq",))]


@pytest.mark.parametrize(("method", "backend"), CASES)
def test_compiled_step_matches_eager_without_breaks_or_recompiles(method, backend):
    _compiled_step_matches_eager(method, backend)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: Triton's kernels against CUDA eager")
@pytest.mark.parametrize("method", ["uniform", "lsq", "climbq", "lifequant", "cbp", "dgms"])
def test_compiled_step_matches_eager_on_cuda(method, monkeypatch):
    monkeypatch.setitem(globals(), "DEVICE", "cuda")
    _compiled_step_matches_eager(method, "inductor")


def _compiled_step_matches_eager(method: str, backend: str) -> None:
    if backend == "inductor":
        ok, why = compile_available(DEVICE)
        if not ok:
            pytest.skip(f"Inductor cannot build on this machine: {why}")
    torch._dynamo.reset()
    counters.clear()
    ref, ref_loss = build(method, eager=True)
    model, loss_fn = build(method, eager=False)
    ref.train()
    model.train()
    compile_model(model, inplace=True, backend=backend, fullgraph=True)  # fullgraph: a graph break raises
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rtol = 1e-5 if backend == "aot_eager" else 1e-4  # Inductor fuses and reorders the float ops
    graphs = None
    for step in range(STEPS):
        if step == WARMUP:
            graphs = counters["stats"]["unique_graphs"]
        x, y = _batch(step)
        # the eager reference at the compiled model's current weights and buffers, every step: a value the
        # graph took as a constant instead of an input (a new sigma, new weights) would show here
        ref.load_state_dict(model.state_dict())
        ref.zero_grad(set_to_none=True)
        opt.zero_grad(set_to_none=True)
        out_ref, l_ref = ref_loss(ref, x, y)
        with torch._dynamo.config.patch(error_on_recompile=step >= WARMUP):
            out, loss = loss_fn(model, x, y)
        l_ref.backward()
        loss.backward()
        if out is not None:
            _close(out, out_ref, 1e-5, f"{method} step {step} logits")
        _close(loss, l_ref, 1e-5, f"{method} step {step} loss")
        for (name, p), p_ref in zip(model.named_parameters(), ref.parameters(), strict=True):
            assert (p.grad is None) == (p_ref.grad is None), name
            if p.grad is not None:
                # DGMS's tau gradient at tau = 0.01 sums nearly cancelling 1/tau-amplified terms: float32
                # gets it to ~1e-4 on any path, summed in any order (tests/test_fused_dgms.py asks 1e-3)
                tol = 1e-3 if name.endswith("weight_quantizer.tau") else rtol
                _close(p.grad, p_ref.grad, tol, f"{method} step {step} grad of {name}")
        opt.step()
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == graphs, "recompiled after warm-up"
    assert graphs <= (2 if method in ("lsq", "cbp") else 1), graphs  # LSQ: init step; CBP: not started / started
    if backend == "aot_eager":  # eval mode (DGMS: hard weights, ClimbQ: the eval sigma) compiles one more graph
        ref.load_state_dict(model.state_dict())
        ref.eval()
        model.eval()
        x, _ = _batch(STEPS)
        with torch.no_grad():
            _close(model(x), ref(x), 1e-5, f"{method} eval logits")
        assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == graphs + 1


def test_one_pass_hook_is_off_under_compile(monkeypatch):
    """The one-pass stash is not used under compile: no group call, nothing left in the layers' __dict__."""
    import paperlib.quant.core as core

    calls = []
    monkeypatch.setattr(core, "quantize_weights_in_one_pass", lambda m: calls.append(m))
    torch._dynamo.reset()
    model, loss_fn = build("climbq", eager=False)
    assert core.one_pass_enabled(model)
    compile_model(model, inplace=True, backend="aot_eager", fullgraph=True)
    x, y = _batch(0)
    loss_fn(model, x, y)[1].backward()
    assert not calls
    assert not any(core._GROUPED in m.__dict__ for m in model.modules())


def test_compile_model_modes_wrapper_and_uncompile():
    model = _net()
    assert compile_model(model, "none") is model and not is_compiled(model)
    with pytest.raises(ValueError, match="compile mode 'fast' is unknown.*reduce-overhead"):
        compile_model(model, "fast")
    with pytest.raises(TypeError, match="nn.Module"):
        compile_model(lambda x: x)
    wrapped = compile_model(model, MODES[0], backend="aot_eager")
    assert is_compiled(wrapped) and wrapped is not model and uncompile(wrapped) is model
    with pytest.raises(ValueError, match="already torch.compile's wrapper"):
        compile_model(wrapped)
    same = compile_model(model, "reduce-overhead", inplace=True, backend="aot_eager")
    assert same is model and is_compiled(model)
    assert list(model.state_dict()) == list(_net().state_dict())  # in place: the keys do not change
    assert uncompile(model) is model and not is_compiled(model)


def _digits_subset():
    from paperlib.data.load import load_dataset

    train, test = load_dataset("digits", size=8, channels=3)
    return train.subset(torch.arange(256)), test.subset(torch.arange(128))


def test_fit_with_compile_trains_as_eager_and_hands_back_the_eager_module(monkeypatch):
    """``TrainConfig(compile=...)``: the same history as eager (to float rounding of the traced graphs), the
    model is eager again afterwards, also when training raises; a compiled model or an unknown mode is refused."""
    import paperlib.compiled as pc
    from paperlib.climbq import ClimbQActivation, ClimbQWeight
    from paperlib.train import TrainConfig, fit

    real = pc.compile_model
    calls = []

    def aot_eager(model, mode="default", **kw):  # dynamo + AOTAutograd, no C++ builds: seconds, not minutes
        calls.append(mode)
        return real(model, mode, **{**kw, "backend": "aot_eager"})

    monkeypatch.setattr(pc, "compile_model", aot_eager)
    train, test = _digits_subset()
    histories = []
    for mode in ("none", "reduce-overhead"):
        m = quantize_model(_net(True), weight=lambda _: ClimbQWeight(4, native=False),
                           activation=lambda: ClimbQActivation(4, native=False), skip=[])
        cfg = TrainConfig(epochs=2, batch_size=64, lr=0.05, compile=mode, seed=3)
        res = fit(m, train, test, cfg, device="cpu", progress=False)
        assert not is_compiled(m)
        histories.append(res.history)
    assert calls == ["reduce-overhead"]
    eager, compiled = histories
    for e, c in zip(eager, compiled, strict=True):
        assert c["train_loss"] == pytest.approx(e["train_loss"], rel=1e-4)
        assert c["test_loss"] == pytest.approx(e["test_loss"], rel=1e-4)

    def boom(model, x, y):
        raise RuntimeError("boom")

    m = _net()
    with pytest.raises(RuntimeError, match="boom"):
        fit(m, train, None, TrainConfig(epochs=1, compile="default"), criterion=boom, device="cpu", progress=False)
    assert not is_compiled(m)
    m.compile(backend="aot_eager")
    with pytest.raises(ValueError, match="pass the eager module"):
        fit(m, train, None, TrainConfig(epochs=1, compile="default"), device="cpu", progress=False)
    with pytest.raises(ValueError, match="compile='fast'.*reduce-overhead"):
        TrainConfig(compile="fast")


def test_forward_features_is_compiled_for_criteria_that_call_the_trunk():
    """ClimbQ's HomoVar criterion calls ``fc(forward_features(x))`` itself, bypassing ``model(x)``: in-place
    compile covers that trunk too (same values, no graph break), ``model(x)`` still works through it, and
    ``uncompile`` restores the method."""
    from paperlib.climbq import ClimbQActivation, ClimbQWeight, HomoVarLoss, batch_sigma, set_sigma
    from paperlib.models import create_model

    def make():
        torch.manual_seed(0)
        net = create_model("resnet8", num_classes=CLASSES, in_channels=3, act_position="pre_relu")
        return quantize_model(net, weight=lambda _: ClimbQWeight(4, native=False),
                              activation=lambda: ClimbQActivation(4, native=False), skip=[]).train()

    ref, model = make(), make()
    torch._dynamo.reset()
    counters.clear()
    compile_model(model, inplace=True, backend="aot_eager", fullgraph=True)
    assert "forward_features" in model.__dict__
    hv = HomoVarLoss([40] * CLASSES)
    for step in range(3):
        x, y = _batch(step)
        for m in (ref, model):
            set_sigma(m, batch_sigma(y, CLASSES))
        f_ref, f = ref.forward_features(x), model.forward_features(x)
        _close(f, f_ref, 1e-5, "features")
        _close(hv(model.fc(f), y, f), hv(ref.fc(f_ref), y, f_ref), 1e-5, "HomoVar loss")
        _close(model(x), ref(x), 1e-5, "logits")
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 1
    uncompile(model)
    assert "forward_features" not in model.__dict__ and not is_compiled(model)
    x, _ = _batch(0)
    _close(model.forward_features(x), ref.forward_features(x), 0.0, "eager again")


def test_compile_default_comes_from_the_environment(monkeypatch):
    from paperlib.train import COMPILE_ENV, TrainConfig

    monkeypatch.delenv(COMPILE_ENV, raising=False)
    assert TrainConfig().compile == "none"
    monkeypatch.setenv(COMPILE_ENV, "reduce-overhead")
    assert TrainConfig().compile == "reduce-overhead" and TrainConfig(compile="none").compile == "none"
    monkeypatch.setenv(COMPILE_ENV, "turbo")
    with pytest.raises(ValueError, match=r"compile='turbo' \(from \$PAPERLIB_COMPILE='turbo'\)"):
        TrainConfig()


def test_fit_after_fit_keeps_compiling(monkeypatch):
    """A notebook trains model after model in one process; without releasing the graphs after each ``fit``, the
    shared forward code reaches dynamo's recompile limit (8) and later models silently train eagerly."""
    import paperlib.compiled as pc
    from paperlib.train import TrainConfig, fit

    real, traced = pc.compile_model, []

    def counting_backend(gm, example_inputs):
        traced[-1] += 1
        return gm.forward

    monkeypatch.setattr(pc, "compile_model", lambda m, mode="default", **kw: real(m, mode, **{**kw,
                                                                                          "backend": counting_backend}))
    train, test = _digits_subset()
    for seed in range(5):
        traced.append(0)
        torch.manual_seed(seed)
        fit(TinyNet(), train.subset(torch.arange(96)), test.subset(torch.arange(40)),
            TrainConfig(epochs=1, batch_size=64, eval_batch_size=32, compile="default"), device="cpu", progress=False)
    assert all(n >= 2 for n in traced), traced  # train graph(s) and eval graph(s) compiled in every fit
