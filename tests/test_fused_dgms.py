"""The fast DGMS soft assignment: the native CPU kernel against a straightforward reference kept here
(the code's formula, linear space, plain autograd), float64 gradcheck, the reference vectors (docs/dgms.md)
through the kernel, thread-count independence, memory (nothing [K, #weights] saved), the fallback; and the paper
preset's parts (CIFAR-10 with ResNet-20 and VGG-Small beside ImageNet)."""

import math
import pickle

import numpy as np
import pytest
import torch
from helpers import random_mixture, sample_mixture
from torch import nn

from paperlib import dgms, dgms_native, presets
from paperlib.data.errors import DataError
from paperlib.dgms import DGMSWeight, quantize_dgms, soft_weights

NATIVE = dgms.native_status()["available"]
needs_native = pytest.mark.skipif(not NATIVE, reason=f"native kernel unavailable: {dgms.native_status()['error']}")
LOGITS = ["responsibility", "log_responsibility"]


# ---------------------------------------------------------------------------------------------- reference
def reference_soft(w, mu, sigma, pi, tau, logits="responsibility"):
    """The soft assignment (docs/dgms.md, 'Soft assignment') written out: r = pi~ N / (sum pi~ N + 1e-11),
    a = softmax(r / tau) (or of log(pi~ N) / tau), S = sum_k a_k mu_k with mu_0 = 0; pi~ = |pi| / sum |pi|, only
    |sigma| matters."""
    m = torch.cat([mu[:1].detach() * 0, mu[1:]])
    s = sigma.abs()
    p = pi.abs() / pi.abs().sum()
    x = w.reshape(1, -1)
    pdf = p[:, None] / torch.sqrt(2 * math.pi * s[:, None] ** 2) * torch.exp(-((x - m[:, None]) ** 2)
                                                                             / (2 * s[:, None] ** 2))
    r = pdf / (pdf.sum(0) + 1e-11)
    a = torch.softmax((r if logits == "responsibility" else torch.log(pdf)) / tau, 0)
    return (a * m[:, None]).sum(0).view_as(w)


def mixture(k, dtype=torch.float64, seed=0):
    return random_mixture(k, dtype, seed, sigma_floor=0.02)


def weights(mu, sigma, pi, n, seed=0):
    return sample_mixture(mu, sigma, pi, n, seed, spread=1.5).reshape(-1, 5)


def grads(fn, w, mu, sigma, pi, tau, dtype=None):
    """Output and gradients of sum(c * S) w.r.t. (w, mu, sigma, pi, tau), inputs cast to ``dtype``."""
    leaves = [t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in (w, mu, sigma, pi, tau)]
    out = fn(*leaves)
    c = torch.linspace(-1, 2, out.numel(), dtype=out.dtype).view_as(out)
    (out * c).sum().backward()
    return [out.detach()] + [t.grad for t in leaves]


def close(got, ref, rel):
    """max |got - ref| <= rel * max |ref| (float64 comparison)."""
    got, ref = got.double(), ref.double()
    scale = ref.abs().max().item()
    err = (got - ref).abs().max().item()
    assert err <= rel * scale + 1e-300, (err, scale)


def native(w, mu, sigma, pi, tau, logits="responsibility"):
    return soft_weights(w, mu, sigma, pi, tau, logits, impl="native")


# ------------------------------------------------------------------------------------------- exactness
@needs_native
@pytest.mark.parametrize("logits", LOGITS)
@pytest.mark.parametrize("k", [2, 5, 16])
@pytest.mark.parametrize("tau", [0.01, 0.3, 1.0])
def test_native_float64_matches_the_reference(logits, k, tau):
    mu, sigma, pi = mixture(k, seed=k)
    w = weights(mu, sigma, pi, 5000 + 5 * k)  # several chunks of 512 weights and a partial tile
    t = torch.tensor(tau, dtype=torch.float64)
    got = grads(lambda *a: native(*a, logits), w, mu, sigma, pi, t)
    ref = grads(lambda *a: reference_soft(*a, logits), w, mu, sigma, pi, t)
    close(got[0], ref[0], 1e-12)
    for name, g, r in zip(["w", "mu", "sigma", "pi", "tau"], got[1:], ref[1:], strict=True):
        close(g, r, 1e-8) if r.abs().max() > 0 else None
        assert torch.isfinite(g).all(), name
    assert got[2][0].item() == 0.0  # mu[0] gets no gradient


@needs_native
@pytest.mark.parametrize("logits", LOGITS)
def test_native_float32_is_as_accurate_as_the_torch_float32_path(logits):
    """float32: both paths against the float64 reference at the same (float32-representable) inputs. S within
    2e-6 of max |S|; each gradient within 1e-5 of its largest entry or no worse than twice the torch path's own
    float32 error. The tau gradient at tau = 0.01 is a sum of 1/tau-amplified, nearly cancelling terms: float32
    gets it to ~1e-4 on either path (1e-3 asked)."""
    mu, sigma, pi = (t.float().double() for t in mixture(16, seed=3))
    w = weights(mu, sigma, pi, 20000, seed=1).float().double()
    rel = lambda a, b: ((a.double() - b).abs().max() / b.abs().max()).item()  # noqa: E731
    for tau in (0.01, 0.3, 1.0):
        t = torch.tensor(tau).double()
        ref = grads(lambda *a: reference_soft(*a, logits), w, mu, sigma, pi, t)
        got = grads(lambda *a: native(*a, logits), w, mu, sigma, pi, t, dtype=torch.float32)
        tp = grads(lambda *a: soft_weights(*a, logits, impl="fused"), w, mu, sigma, pi, t, dtype=torch.float32)
        assert rel(got[0], ref[0]) <= 2e-6
        for name, g, q, r in zip(["S", "w", "mu", "sigma", "pi", "tau"], got, tp, ref, strict=True):
            assert g.dtype == torch.float32
            bound = 1e-3 if (name == "tau" and tau == 0.01) else max(1e-5, 2 * rel(q, r))
            assert rel(g, r) <= bound, (tau, name, rel(g, r), rel(q, r))


@needs_native
@pytest.mark.parametrize("logits", LOGITS)
def test_native_gradcheck_float64(logits):
    mu, sigma, pi = mixture(4, seed=1)
    w = weights(mu, sigma, pi, 40, seed=2).requires_grad_()
    rest, sigma, pi = mu[1:].clone().requires_grad_(), sigma.requires_grad_(), pi.requires_grad_()
    tau = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)

    def f(w, rest, sigma, pi, tau):
        return native(w, torch.cat([rest.new_zeros(1), rest]), sigma, pi, tau, logits)

    assert torch.autograd.gradcheck(f, (w, rest, sigma, pi, tau), eps=1e-6, atol=1e-7, rtol=1e-5)


@needs_native
def test_reference_vectors_through_the_native_kernel():
    mu = torch.tensor([0.0, -0.25, -0.1, 0.1, 0.25], requires_grad=True)
    sigma = torch.tensor([0.02, 0.05, 0.03, 0.03, 0.05])
    pi = torch.tensor([0.3, 0.15, 0.2, 0.2, 0.15])
    w0 = torch.tensor([-0.31, -0.12, -0.04, 0.0, 0.015, 0.06, 0.11, 0.27])
    hard = [-0.25, -0.1, 0.0, 0.0, 0.0, 0.1, 0.1, 0.25]
    idx = torch.arange(1, 9, dtype=torch.float32)
    # reference vector 1 (tau = 0.01)
    w = w0.clone().requires_grad_()
    s = native(w, mu, sigma, pi, 0.01)
    assert (s - torch.tensor(hard)).abs().max().item() < 1e-17
    (idx * s).sum().backward()
    assert mu.grad.tolist() == [0.0, 1.0, 2.0, 13.0, 8.0]
    assert w.grad.abs().max().item() < 1e-13
    # reference vector 2 (tau = 1), tolerances as in tests/test_dgms.py
    mu.grad = None
    w = w0.clone().requires_grad_()
    s = native(w, mu, sigma, pi, 1.0)
    ref_s = [-0.0639405, -0.0256496, -0.0056702, 0.0, 0.000152387, 0.0236526, 0.0256098, 0.0639405]
    torch.testing.assert_close(s, torch.tensor(ref_s), rtol=1e-5, atol=5e-9)
    (idx * s).sum().backward()
    ref_dw = [2.10044e-07, 0.0123748, 2.34088, 0.0227361, 0.106532, 2.10144, 0.0170286, 2.60203e-05]
    torch.testing.assert_close(w.grad, torch.tensor(ref_dw), rtol=1e-5, atol=2.5e-7)
    torch.testing.assert_close(mu.grad, torch.tensor([0.0, 5.65439, 5.119, 8.02962, 7.44294]), rtol=2e-6, atol=0)


@needs_native
def test_edge_cases_match_the_torch_path():
    """Weights far from every component (all responsibilities ~0: uniform a), a zero mixing weight under
    log-responsibility logits (log pi~ = -inf), tiny and large tau; float64 against impl='fused'."""
    mu, sigma, pi = mixture(6, seed=4)
    w = torch.cat([weights(mu, sigma, pi, 995).reshape(-1), torch.tensor([5.0, -3.0, 0.9, 1e-9, 0.0], dtype=mu.dtype)])
    for tau, logits, p in ((0.01, "responsibility", pi), (1e-4, "responsibility", pi), (50.0, "responsibility", pi),
                           (0.5, "log_responsibility", pi.clone().index_fill_(0, torch.tensor([2]), 0.0))):
        t = torch.tensor(tau, dtype=torch.float64)
        got = grads(lambda *a, lg=logits: native(*a, lg), w, mu, sigma, p, t)
        ref = grads(lambda *a, lg=logits: soft_weights(*a, lg, impl="fused"), w, mu, sigma, p, t)
        for g, r in zip(got, ref, strict=True):
            assert torch.isfinite(g).all()
            close(g, r, 1e-9)
    far = native(torch.tensor([5.0], dtype=torch.float64), mu, sigma, pi, 0.01)
    assert far.item() == pytest.approx(mu.sum().item() / 6, rel=1e-12)  # uniform a (module docstring)


@needs_native
def test_results_do_not_depend_on_the_thread_count():
    mu, sigma, pi = mixture(16, dtype=torch.float32, seed=5)
    w = weights(mu, sigma, pi, 40000, seed=5)
    t = torch.tensor(0.3)
    old = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(grads(native, w, mu, sigma, pi, t))
    finally:
        torch.set_num_threads(old)
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other, strict=True))


# ---------------------------------------------------------------------------------------- memory, fallback
@needs_native
def test_native_saves_no_k_by_n_tensor_for_backward():
    mu, sigma, pi = mixture(16, dtype=torch.float32)
    w = nn.Parameter(torch.randn(4000) * 0.1)
    mu.requires_grad_()
    saved: list[tuple[int, int]] = []

    def pack(t):
        saved.append((t.numel(), t.data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        native(w, mu, sigma, pi, 1.0).sum().backward()
    big = [s for s in saved if s[0] > 16]
    assert big == [(4000, w.data_ptr())]  # the parameter itself, no copy; nothing of size K x #weights


def test_dgms_weight_uses_the_native_kernel_by_default_and_falls_back(monkeypatch):
    mu, sigma, pi = mixture(5, dtype=torch.float32)
    w = weights(mu, sigma, pi, 600).float()
    q = DGMSWeight(mu, sigma, pi, tau=0.5)
    assert q.impl == "auto" and "impl='auto'" in repr(q)
    calls = []
    orig = dgms._DGMSNative.apply
    monkeypatch.setattr(dgms._DGMSNative, "apply", lambda *a: calls.append(1) or orig(*a))
    out = q(w)
    assert len(calls) == (1 if NATIVE else 0)
    fused = DGMSWeight(mu, sigma, pi, tau=0.5, impl="fused")(w)
    close(out, fused, 1e-6)
    # without the kernel, "auto" is the torch path, bit for bit, and "native" says why it cannot run
    monkeypatch.setattr(dgms_native, "_native", {"lib": None, "error": "disabled for this test"})
    assert dgms.native_status() == {"available": False, "path": None, "error": "disabled for this test"}
    assert torch.equal(q(w), fused)
    with pytest.raises(RuntimeError, match="disabled for this test"):
        DGMSWeight(mu, sigma, pi, impl="native")(w)
    with pytest.raises(ValueError, match="impl"):
        DGMSWeight(mu, sigma, pi, impl="cuda")


def _train_step_grads(impl, dtype):
    from paperlib.models import create_model

    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    y = torch.arange(16) % 10
    torch.manual_seed(0)
    m = quantize_dgms(create_model("resnet8", num_classes=10), 16, n_init=1, tau=0.05, impl=impl).to(dtype).train()
    loss = nn.functional.cross_entropy(m(x), y)
    loss.backward()
    return loss.item(), {n: p.grad.double() for n, p in m.named_parameters() if p.grad is not None}


@needs_native
def test_train_step_gradients_native_vs_torch_path():
    """A whole ResNet-8 train step (K = 16, guards on, tau = 0.05). float64: both paths give the same loss and
    gradients to 1e-9. float32, against that float64 step: the native path is as accurate as the torch path
    (the tau gradient is a sum of nearly cancelling 1/tau-amplified terms: a few % off in float32 either way)."""
    loss64, ref = _train_step_grads("fused", torch.float64)
    loss, nat = _train_step_grads("native", torch.float64)
    assert loss == pytest.approx(loss64, rel=1e-12) and nat.keys() == ref.keys()
    for name, g in nat.items():
        close(g, ref[name], 1e-9)
    loss32n, nat32 = _train_step_grads("native", torch.float32)
    loss32f, fused32 = _train_step_grads("fused", torch.float32)
    assert loss32n == pytest.approx(loss64, rel=1e-6) and loss32f == pytest.approx(loss64, rel=1e-6)
    for name, r in ref.items():
        scale = r.abs().max().item()
        if scale == 0:
            continue
        en, ef = ((nat32[name] - r).abs().max().item() / scale, (fused32[name] - r).abs().max().item() / scale)
        assert en <= (3 * ef + 1e-3 if name.endswith("tau") else 2 * ef + 2e-5), (name, en, ef)


# ------------------------------------------------------------------------------------ paper preset
def test_paper_preset_offers_vgg_small_beside_resnet20_on_cifar10():
    cfg = presets.resolve("dgms", "paper")
    parts = {q["part"]: q for q in dgms.experiment_parts(cfg)}
    assert list(parts) == ["imagenet", "CIFAR-10"]
    c = parts["CIFAR-10"]
    assert c["dataset"] == "cifar10" and c["models"] == ["resnet20", "vgg_small"]
    # the original code's CIFAR-10 set-up (tools/train_cifar.sh; docs/dgms.md, 'Training protocol')
    assert (c["num_components"], c["init"], c["epochs"], c["batch_size"], c["lr"], c["momentum"],
            c["weight_decay"], c["schedule"], c["selection"]) == ([4], "empirical", 350, 128, 2e-5, 0.9, 5e-4,
                                                                 "onecycle", "best_test")
    i = parts["imagenet"]
    assert (i["models"], i["num_components"], i["init"], i["epochs"], i["batch_size"]) == (
        ["resnet18", "resnet50"], [16], "kmeans", 60, 256)
    from paperlib.models import create_model

    assert set(dgms.MODEL_KWARGS.get("vgg_small", {})) <= {"num_classes", "in_channels"}
    vgg = create_model("vgg_small", num_classes=10, in_channels=3)
    assert dgms.dgms_skip(vgg) == ["features.0", "fc"] and len(dgms.shared_layer_names(vgg)) == 5
    with pytest.raises(DataError, match="needs data_dir.*train.csv.*cifar-10-batches-py"):
        dgms.run_dgms(cfg, device="cpu")
    with pytest.raises(ValueError, match="num_threads"):
        dgms.experiment_parts({**cfg, "parts": [{"name": "x", "num_threads": 2}]})
    assert presets.resolve("dgms", "smoke")["impl"] == "auto"
    with pytest.raises(ValueError, match="impl"):
        dgms.run_dgms({**presets.resolve("dgms", "smoke"), "impl": "gpu"}, device="cpu")


def test_paper_parts_refuse_a_model_in_two_parts_that_would_run(tmp_path):
    cfg = {**presets.resolve("dgms", "paper"), "num_threads": 1}
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "train.csv").write_text("image,label\n")
    (tmp_path / "val.csv").write_text("image,label\n")
    with pytest.raises(ValueError, match="two parts"):  # checked before any data is read
        dgms.run_dgms({**cfg, "parts": [{**dgms.CIFAR10_PART, "models": ["resnet18"]}]}, "cpu", str(tmp_path))


def _fake_cifar10(root, rows=6, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (rows, 3072), dtype=np.uint8),
                         "labels": (np.arange(rows) % 2).tolist()}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)


def test_paper_parts_run_the_part_whose_data_is_present(tmp_path, monkeypatch):
    """A fake CIFAR-10 folder and no ImageNet manifests: the CIFAR-10 part runs (both models, tiny settings),
    the ImageNet part is skipped and recorded."""
    import torchvision.datasets.cifar as tv_cifar

    from paperlib import paths

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda path, md5=None: True)
    monkeypatch.setattr(paths, "runs_dir", lambda: tmp_path / "runs")  # FP32 cache of pretrained_fp32
    _fake_cifar10(tmp_path / "data")
    tiny = dict(fp_epochs=1, fp_batch_size=10, epochs=1, batch_size=10, eval_batch_size=30, baselines=["kmeans"],
                init_probes=["empirical"], n_init=1, probe_samples=4, hist_layers=1, hist_bins=10, curve_points=20,
                traj_points_per_epoch=1, fp32_control=False)
    cfg = presets.resolve("dgms", "paper")
    cfg.update(num_threads=1, parts=[{**dgms.CIFAR10_PART, **tiny, "models": ["resnet8", "vgg_small"]}])
    with pytest.raises(DataError, match="holds the data of no part"):
        dgms.run_dgms(cfg, device="cpu", data_dir=str(tmp_path))
    m = dgms.run_dgms(cfg, device="cpu", data_dir=str(tmp_path / "data"))
    assert [p["name"] for p in m["parts"]] == ["CIFAR-10"] and m["dataset"] == "cifar10"
    assert [s["name"] for s in m["skipped_parts"]] == ["imagenet"] and "train.csv" in m["skipped_parts"][0]["needs"]
    rows = [r for r in m["per_seed"] if r["kind"] == "dgms"]
    assert {r["model"] for r in rows} == {"resnet8", "vgg_small"} and all(r["K"] == 4 for r in rows)
    assert all(r["invariant_ok"] for r in rows) and all(r["best_epoch"] == 0 for r in rows)
    assert m["key_metric"]["name"].startswith("DGMS τ=0.01 K=4") and m["claims"]
