"""Speed and memory benchmarks, measured as ratios in one run.

``python -m benchmarks.run [--quick] [--device D]`` writes ``benchmarks/results.json`` and
``benchmarks/results.md``:

- train-step time of each quantized ResNet-20 divided by the FP32 step of the same net (batch 128, at 8x8 and
  32x32): uniform STE (DoReFa), LSQ, ClimbQ W4A4, LifeQuant W4A4 + prox penalty, CBP (constraint term), DGMS
  (K=16), and the peer PyTorch users would reach for: ``torch.ao`` eager/FX fake-quant QAT at 8 bits; ClimbQ and
  LifeQuant also on their PyTorch paths with one quantizer call per layer (what the native CPU kernels and the
  one-pass weight quantization buy; on CUDA the default is the PyTorch path);
- the HomoVar loss against the original's dense [B, K, D] formulation (time and peak memory);
- kernel launches: the ATen ops of one train step per method on the PyTorch paths (those a GPU runs), the
  measure a launch-bound GPU step follows, countable on a CPU;
- DGMS memory: the peak memory of one ResNet-18 train step at K=16 on a 224 px batch against FP32;
- the GPU path (only on CUDA): ``fit`` throughput of ResNet-20 at 32x32 in FP32 and with bf16 autocast +
  ``channels_last``, data resident on the GPU;
- end-to-end: wall time of ``reproduce`` per notebook at the smoke and default presets (``--e2e``).

Median of several repetitions after warm-up. The project's step-time targets (``TARGETS``, as multiples of the
FP32 step) are checked and reported, never asserted.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from paperlib.device import resolve_device
from paperlib.models import create_model
from paperlib.quant import ClippedActivation, DoReFaWeight, LSQActivation, LSQWeight, quantize_model
from paperlib.train import Callback

HERE = Path(__file__).resolve().parent
# DGMS uses the option-A (zero-pad) shortcut of its paper, so its ratio is against an FP32 net with that shortcut.
BASELINE = {"DGMS K=16": "FP32 (option-A shortcut)"}
TARGETS = {"ClimbQ W4A4": 1.25, "LifeQuant W4A4 + prox": 1.25, "CBP ter": 1.15, "DGMS K=16": 1.6}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _resnet(act_position: str = "post_relu", shortcut: str = "B") -> nn.Module:
    torch.manual_seed(0)
    return create_model("resnet20", num_classes=10, shortcut=shortcut, act_position=act_position)


def step_cases() -> dict[str, Callable[[], tuple[nn.Module, Callable[[nn.Module, torch.Tensor, torch.Tensor],
                                                                           torch.Tensor]]]]:
    """name -> builder of ``(model, loss_fn(model, x, y))``."""

    def ce(model, x, y):
        return F.cross_entropy(model(x), y)

    def fp32():
        return _resnet(), ce

    def fp32_a():
        return _resnet(shortcut="A"), ce

    def uniform():
        m = quantize_model(_resnet(), weight=lambda _: DoReFaWeight(4), activation=lambda: ClippedActivation(4, 4.0),
                           skip="first_last")
        return m, ce

    def lsq():
        m = quantize_model(_resnet(), weight=lambda layer: LSQWeight(4, layer.weight),
                           activation=lambda: LSQActivation(4), skip="first_last")
        return m, ce

    def climbq(native: bool | None = None, one_pass: bool = True):
        from paperlib.climbq import ClimbQActivation, ClimbQWeight, batch_sigma, set_sigma

        m = quantize_model(_resnet("pre_relu"), weight=lambda _: ClimbQWeight(4, native=native),
                           activation=lambda: ClimbQActivation(4, native=native), skip=[], one_pass=one_pass)

        def loss(model, x, y):
            set_sigma(model, batch_sigma(y, 10))
            return F.cross_entropy(model(x), y)

        return m, loss

    def lifequant(native: bool | None = None, one_pass: bool = True):
        from paperlib.lifequant import importance, prox_penalty, quantize_lifequant, snapshot
        from paperlib.quant.core import set_one_pass

        m = set_one_pass(quantize_lifequant(_resnet("pre_relu"), 4, 4, native=native), one_pass)
        old = snapshot(m)
        imp = {k: torch.rand_like(v) for k, v in old.items()}
        del importance

        def loss(model, x, y):
            if old[next(iter(old))].device != x.device:  # the snapshot was taken before the model moved
                for d in (old, imp):
                    d.update({k: v.to(x.device) for k, v in d.items()})
            return F.cross_entropy(model(x), y) + prox_penalty(model, old, imp)

        return m, loss

    def cbp():
        from paperlib.cbp import CBP

        m = _resnet()
        ctl = CBP(m, "ter")
        return m, ctl.criterion

    def dgms():
        from paperlib.dgms import quantize_dgms

        m = quantize_dgms(_resnet(shortcut="A"), 16)
        return m, ce

    def torch_ao():
        from torch.ao.quantization import get_default_qat_qconfig_mapping
        from torch.ao.quantization.quantize_fx import prepare_qat_fx

        m = _resnet().train()
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = prepare_qat_fx(m, get_default_qat_qconfig_mapping("x86"), (torch.randn(2, 3, 8, 8),))
        return m, ce

    return {"FP32": fp32, "FP32 (option-A shortcut)": fp32_a, "uniform STE W4A4": uniform, "LSQ W4A4": lsq,
            "ClimbQ W4A4": climbq, "ClimbQ W4A4 (PyTorch path, per layer)": lambda: climbq(False, False),
            "LifeQuant W4A4 + prox": lifequant,
            "LifeQuant W4A4 + prox (PyTorch path, per layer)": lambda: lifequant(False, False),
            "CBP ter": cbp, "DGMS K=16": dgms,
            "torch.ao QAT 8-bit (peer)": torch_ao}


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


#: cases not compiled (``--compile``): the peer is torch.ao's own graph, the per-layer variants equal the others
#: under compile (every layer then quantizes its own weight on the PyTorch path)
NOT_COMPILED = ("torch.ao QAT 8-bit (peer)", "ClimbQ W4A4 (PyTorch path, per layer)",
                "LifeQuant W4A4 + prox (PyTorch path, per layer)")


def compiled_name(name: str, mode: str) -> str:
    """Row name of ``name``'s compiled step (its baseline: FP32's compiled step, same mode)."""
    return f"{name} [compiled, {mode}]"


def _step_builds(compile_mode: str) -> dict[str, tuple[Callable[[], Any], str | None]]:
    """Row name -> (builder, compile mode or None): every case eager, then the compiled ones."""
    cases = step_cases()
    builds: dict[str, tuple[Callable[[], Any], str | None]] = {n: (b, None) for n, b in cases.items()}
    if compile_mode != "none":
        builds.update({compiled_name(n, compile_mode): (b, compile_mode) for n, b in cases.items()
                       if n not in NOT_COMPILED})
    return builds


def _baseline(name: str) -> str:
    """The row a case's ratio divides by: FP32 (DGMS: option-A FP32), compiled alike for a compiled case."""
    base, sep, tag = name.partition(" [compiled")
    return BASELINE.get(base, "FP32") + (sep + tag if sep else "")


def bench_steps(device: torch.device, sizes: list[int], reps: int, batch: int = 128,
                compile_mode: str = "none") -> list[dict[str, Any]]:
    """Every case's step is timed once per round, round after round (interleaved), so a slow spell of the
    machine hits every method alike; each time is the median over ``reps`` rounds after the warm-up steps.
    ``compile_mode`` (not "none"): each method's step also runs ``torch.compile``d
    (:func:`paperlib.compiled.compile_model`, in place) and is divided by the compiled FP32 step; the targets
    apply to those rows too (on a GPU, the compiled step is the fast one)."""
    from paperlib.compiled import compile_model

    # every case compiles the same ResNet forward code: dynamo's per-code-object limit (8 graphs) would make the
    # later cases fall back to eager
    with torch._dynamo.config.patch(recompile_limit=256, accumulated_recompile_limit=4096):
        return _bench_steps(device, sizes, reps, batch, compile_mode, compile_model)


def _bench_steps(device: torch.device, sizes: list[int], reps: int, batch: int, compile_mode: str,
                 compile_model: Callable[..., nn.Module]) -> list[dict[str, Any]]:
    rows = []
    for size in sizes:
        x = torch.randn(batch, 3, size, size, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        steps: dict[str, Callable[[], None]] = {}
        for name, (build, mode) in _step_builds(compile_mode).items():
            try:
                model, loss_fn = build()
                model = model.to(device).train()
                if mode is not None:
                    compile_model(model, mode, inplace=True)
            except Exception as e:  # a method that cannot be built is reported, not fatal
                rows.append({"case": name, "size": size, "error": f"{type(e).__name__}: {e}"})
                continue
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

            def step(model=model, loss_fn=loss_fn, opt=opt, x=x, y=y):
                opt.zero_grad(set_to_none=True)
                loss_fn(model, x, y).backward()
                opt.step()

            try:
                for _ in range(2 if mode is None else 4):  # compiled: LSQ/CBP settle into their steady graph
                    step()
            except Exception as e:  # e.g. Inductor cannot build here: reported, not fatal
                rows.append({"case": name, "size": size, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                continue
            steps[name] = step
        samples: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(reps):
            for name, step in steps.items():
                samples[name].append(_timed(step, device))
        times = {name: statistics.median(v) for name, v in samples.items()}
        for name, t in times.items():
            base = times.get(_baseline(name))
            ratio = t / base if base else float("nan")
            target = TARGETS.get(name.partition(" [compiled")[0])
            rows.append({"case": name, "size": size, "baseline": _baseline(name),
                         "step_ms": round(1000 * t, 2), "ratio_vs_fp32": round(ratio, 3),
                         "images_per_s": round(batch / t, 1), "target": target,
                         "meets_target": None if target is None else bool(ratio <= target)})
            print(f"  {size:>3}px {name:<28} {1000 * t:8.1f} ms  x{ratio:.2f}", flush=True)
    return rows


_NO_KERNEL = {"aten.empty.memory_format", "aten.empty_strided.default", "aten.empty_like.default"}


def count_ops(fn: Callable[[], Any]) -> int:
    """How many ATen ops that compute ``fn`` dispatches: about one GPU kernel launch each. Views (``view``,
    ``detach``, ``split``...) and allocations launch nothing and are not counted."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and str(func) not in _NO_KERNEL:
                _Count.n += 1
            return func(*args, **(kwargs or {}))

    with _Count():
        fn()
    return _Count.n


def bench_ops(batch: int = 16) -> list[dict[str, Any]]:
    """ATen ops of one train step (forward, backward, SGD step) of every case on the PyTorch paths: the native
    CPU kernels off, as on a GPU, where a batch-128 ResNet-20 step is bound by kernel launches and the step-time
    ratios follow these counts (``results-h100.md``). Measured on CPU, so it tracks the GPU path without one."""
    from paperlib import dgms_native
    from paperlib.quant import native

    states = (native._state, dgms_native._native)
    saved = [dict(st) for st in states]
    for st in states:
        st.clear()
        st.update(lib=None, error="off for the op count (a GPU takes the PyTorch paths)")
    rows = []
    try:
        x, y = torch.randn(batch, 3, 8, 8), torch.arange(batch) % 10
        for name, build in step_cases().items():
            model, loss_fn = build()
            model.train()
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)

            def step(model=model, loss_fn=loss_fn, opt=opt):
                opt.zero_grad(set_to_none=True)
                loss_fn(model, x, y).backward()
                opt.step()

            step()
            rows.append({"case": name, "ops": count_ops(step)})
    finally:
        for st, kept in zip(states, saved, strict=True):
            st.clear()
            st.update(kept)
    base = {r["case"]: r["ops"] for r in rows}
    for r in rows:
        r["ratio_vs_fp32"] = round(r["ops"] / base[BASELINE.get(r["case"], "FP32")], 2)
    return rows


def _high_water_bytes() -> int | None:
    """Peak resident set size of this process (Linux ``VmHWM``), or None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _peak(fn: Callable[[], Any], device: torch.device) -> tuple[Any, int | None]:
    """Extra peak memory of one call: CUDA's allocator peak, or the growth of the process's peak RSS on CPU
    (a lower bound when an earlier call already raised the high-water mark; run the smaller case first)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        return out, int(torch.cuda.max_memory_allocated(device) - base)
    before = _high_water_bytes()
    out = fn()
    after = _high_water_bytes()
    return out, None if before is None or after is None else max(after - before, 0)


def dense_homovar(logits, labels, features, counts, alpha=0.05, beta=0.999):
    """The original ``lt_loss.py`` formulation: a dense [B, K, D] mask tensor, for comparison."""
    from scipy import stats

    b, k = logits.shape
    onehot = F.one_hot(labels, k).to(features.dtype)  # [B, K]
    n = torch.as_tensor(counts, dtype=features.dtype, device=features.device)
    masked = onehot[:, :, None] * features[:, None, :]  # [B, K, D]: the original's big tensor
    m = masked.sum(0) / n[:, None]
    dev = (masked - onehot[:, :, None] * m[None]).abs() * (masked != 0)
    z = dev.sum(2).sum(1)
    s = onehot.T @ z
    zbar_k = s / n
    zbar = zbar_k.mean()
    big_n = n.sum()
    fstar = float(stats.f.ppf(1 - alpha, k - 1, float(big_n) - k))
    ssw = (((z - zbar_k[labels]) ** 2) * (z != 0)).sum() / (big_n - k)
    sb = n * (zbar_k - zbar) ** 2
    c = fstar * (k - 1) * ssw - (sb.sum() - sb)
    a = zbar**2
    bb = -(2 * zbar * s + c)
    disc = (bb**2 - 4 * a * s**2).sqrt()
    lb, ub = ((-bb - disc) / (2 * a)).abs(), ((-bb + disc) / (2 * a)).abs()
    betas = torch.where(n < lb, beta ** (1 / (lb - n)), torch.where(n > ub, beta ** (1 / (n - ub)),
                                                                     torch.full_like(n, beta)))
    w = (1 - betas) / (1 - betas**n)
    w = (w * k / w.sum()).detach()
    p = logits.softmax(1)
    bce = F.binary_cross_entropy(p, F.one_hot(labels, k).to(p.dtype), reduction="none")
    return (w[labels][:, None] * bce).mean()


def _homovar_case(label: str, b: int, k: int, d: int, device: torch.device, reps: int) -> dict[str, Any]:
    from paperlib.climbq import homovar_loss

    fn = homovar_loss if label == "ours" else dense_homovar
    g = torch.Generator().manual_seed(0)
    tiny = torch.randn(8, 4, generator=g, device="cpu").to(device).requires_grad_()  # lazy inits off the peak
    fn(tiny, torch.arange(8).to(device) % 4, torch.rand(8, 4, generator=g).to(device), [5, 5, 5, 5]).backward()
    logits = torch.randn(b, k, generator=g).to(device).requires_grad_()
    labels = torch.randint(0, k, (b,), generator=g).to(device)
    feats = torch.rand(b, d, generator=g).relu().to(device)
    counts = torch.randint(5, 1300, (k,), generator=g).tolist()

    def call():
        loss = fn(logits, labels, feats, counts)
        loss.backward()
        return loss

    _, peak = _peak(call, device)  # first call: the memory high-water mark is measured before timing
    t = median_time(call, device, reps, warmup=1)
    return {"ms": round(1000 * t, 2), "peak_mb": None if peak is None else round(peak / 2**20, 1)}


def _in_child(queue: Any, target: Callable[..., dict[str, Any]], args: tuple) -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    queue.put(target(*args))


def _isolated(target: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run ``target(*args)`` in a fresh process on CPU, so its peak-RSS growth is its own (not a lower bound)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_in_child, args=(queue, target, args))
    proc.start()
    out = queue.get()
    proc.join()
    return out


def bench_homovar(device: torch.device, reps: int, quick: bool) -> list[dict[str, Any]]:
    cases = [("CIFAR-100-like", 128, 100, 64)] + ([] if quick else [("ImageNet-scale", 256, 1000, 2048)])
    rows = []
    for name, b, k, d in cases:
        row: dict[str, Any] = {"case": name, "B": b, "K": k, "D": d}
        for label in ("ours", "dense"):
            args = (label, b, k, d, device, reps)
            r = _isolated(_homovar_case, *args) if device.type == "cpu" else _homovar_case(*args)
            row[f"{label}_ms"], row[f"{label}_peak_mb"] = r["ms"], r["peak_mb"]
        row["speedup"] = round(row["dense_ms"] / row["ours_ms"], 1)
        row["meets_target"] = bool(row["speedup"] >= 20) if name == "ImageNet-scale" else None
        print(f"  HomoVar {name}: ours {row['ours_ms']} ms / dense {row['dense_ms']} ms (x{row['speedup']}), "
              f"peak {row['ours_peak_mb']} vs {row['dense_peak_mb']} MB", flush=True)
        rows.append(row)
    return rows


def _resnet18_step(name: str, device: torch.device, batch: int, reps: int) -> dict[str, Any]:
    from paperlib.dgms import dgms_layers, quantize_dgms

    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=1000)
    if name != "FP32":
        model = quantize_dgms(model, 16)
    model = model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    _, peak = _peak(step, device)
    t = median_time(step, device, reps, warmup=1)
    shared = 0 if name == "FP32" else sum(q.weight.numel() for q in dgms_layers(model).values())
    return {"case": name, "batch": batch, "step_ms": round(1000 * t, 1),
            "peak_mb": None if peak is None else round(peak / 2**20, 1),
            "one_Kxw_mb": round(16 * shared * 4 / 2**20, 1) if shared else None}


def bench_dgms_memory(device: torch.device, batch: int, reps: int) -> list[dict[str, Any]]:
    """Peak memory and time of one ResNet-18 (1000 classes) train step at 224 px: FP32 vs DGMS K=16.

    The peak is the memory a step needs above what model, optimizer and batch already hold: the CUDA
    allocator's peak, or on CPU the growth of the peak RSS of a fresh process per case. DGMS keeps at most one
    [K, #w] tensor per layer for backward; ``one_Kxw_mb`` is that tensor's size summed over the shared layers
    (float32), the bound the extra peak is compared with.
    """
    rows = []
    for name in ("FP32", "DGMS K=16"):
        if device.type == "cpu":
            row = _isolated(_resnet18_step, name, device, batch, reps)
        else:
            row = _resnet18_step(name, device, batch, reps)
            torch.cuda.empty_cache()
        rows.append(row)
        print(f"  ResNet-18 224px b={batch} {name}: {row['step_ms']:.0f} ms, peak {row['peak_mb']} MB", flush=True)
    return rows


class EpochClock(Callback):
    """Records the (synchronised) wall time at the end of every epoch."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times = device, []

    def on_epoch_end(self, epoch: int, stats: dict[str, Any]) -> None:
        _sync(self.device)
        self.times.append(time.perf_counter())


def bench_gpu_fit(device: torch.device, epochs: int = 2, n: int = 8192) -> list[dict[str, Any]]:
    """``fit`` throughput (images/s, last epoch) of ResNet-20 at 32x32 on GPU-resident data, FP32 vs bf16+NHWC."""
    from paperlib.data.tensors import InMemoryData
    from paperlib.train import TrainConfig, fit

    g = torch.Generator().manual_seed(0)
    data = InMemoryData(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g),
                        [str(i) for i in range(10)], (0.0,) * 3, (1.0,) * 3)
    rows = []
    for label, kw in (("FP32", {}), ("bf16 + channels_last", {"amp": "bf16", "channels_last": True})):
        cfg = TrainConfig(epochs=epochs, batch_size=128, augment=True, **kw)
        clock = EpochClock(device)
        fit(_resnet(), data, None, cfg, callbacks=[clock], device=device, progress=False)
        times = clock.times
        rate = n / (times[-1] - times[-2]) if len(times) > 1 else float("nan")
        rows.append({"case": label, "images_per_s": round(rate, 1)})
        print(f"  fit ResNet-20 32px {label}: {rate:.0f} images/s", flush=True)
    return rows


def bench_e2e(presets: list[str]) -> list[dict[str, Any]]:
    """Wall time of ``reproduce`` per notebook (papermill, fresh kernel) into a temporary runs folder."""
    import tempfile

    from paperlib.reproduce import list_notebooks, reproduce

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in presets:
            for name in list_notebooks():
                res = reproduce(preset, only=[name], runs_root=Path(tmp) / "runs", figures_root=Path(tmp) / "fig")
                wall = sum(r.wall_time_s for r in res)
                ok = all(r.status == "ok" for r in res)
                rows.append({"preset": preset, "notebook": name, "wall_s": round(wall, 1), "ok": ok})
                print(f"  reproduce {preset:<8} {name:<14} {wall:7.1f} s {'ok' if ok else 'FAILED'}", flush=True)
    return rows


def machine(device: torch.device) -> dict[str, Any]:
    info = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "device": str(device), "machine": platform.machine()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def to_markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [f"# Benchmarks\n\nMachine: {m['cpus']} CPUs, torch {m['torch']}, device {m['device']}"
             + (f" ({m['gpu']})" if "gpu" in m else "") + f"; median of {results['reps']} reps after warm-up"
             + (f" ({results['reps_steps']} interleaved rounds for the train steps)" if "reps_steps" in results else "")
             + ".\n",
             "## Train step of ResNet-20 (batch 128) relative to FP32\n",
             "| input | method | ms/step | × FP32 | target | met |", "|---|---|---|---|---|---|"]
    for r in results["steps"]:
        if "error" in r:
            lines.append(f"| {r['size']}px | {r['case']} | error: {r['error']} | | | |")
            continue
        met = "" if r["meets_target"] is None else ("yes" if r["meets_target"] else "**no**")
        lines.append(f"| {r['size']}px | {r['case']} | {r['step_ms']} | {r['ratio_vs_fp32']} | "
                     f"{r['target'] or ''} | {met} |")
    if any(r.get("baseline", "FP32") != "FP32" for r in results["steps"]):
        lines.append("\nEach ratio is against FP32 ResNet-20 with the option-B shortcut, except DGMS's: against FP32 "
                     "with the option-A (zero-pad) shortcut its paper uses. A `[compiled, mode]` row is "
                     "`torch.compile`d (`paperlib.compiled.compile_model`) and divided by FP32's compiled step.")
    if results.get("dgms_memory"):
        lines += ["", "## DGMS memory: one ResNet-18 train step at 224 px (1000 classes)\n",
                  "| method | batch | ms/step | peak MB | one [K, #w] tensor MB |", "|---|---|---|---|---|"]
        for r in results["dgms_memory"]:
            lines.append(f"| {r['case']} | {r['batch']} | {r['step_ms']} | {r['peak_mb']} | {r['one_Kxw_mb'] or ''} |")
        if results["machine"]["device"] == "cpu":
            lines.append("\nOn CPU the peak is the growth of the peak RSS of a fresh process per case during one step; "
                         "on CUDA it is the allocator's peak above the memory already allocated.")
    if results.get("gpu_fit"):
        lines += ["", "## GPU path: `fit` throughput, ResNet-20 32x32, batch 128, data on the GPU\n",
                  "| variant | images/s |", "|---|---|"]
        lines += [f"| {r['case']} | {r['images_per_s']} |" for r in results["gpu_fit"]]
    if results.get("ops"):
        lines += ["", "## Kernel launches: ATen ops of one train step on the PyTorch paths (the GPU's)\n",
                  "| method | ops | × FP32 |", "|---|---|---|"]
        lines += [f"| {r['case']} | {r['ops']} | {r['ratio_vs_fp32']} |" for r in results["ops"]]
        lines.append("\nCounted on CPU with the native kernels off (views and allocations excluded): a GPU runs "
                     "these paths, about one kernel launch per op. On one H100 (`results-h100.md`, per-layer code) "
                     "a batch-128 ResNet-20 step was launch-bound and the quantized steps took 2-3.6x the FP32 "
                     "step (DGMS 7x).")
    if results.get("e2e"):
        lines += ["", "## End-to-end: `reproduce` wall time per notebook\n", "| preset | notebook | wall s | ok |",
                  "|---|---|---|---|"]
        lines += [f"| {r['preset']} | {r['notebook']} | {r['wall_s']} | {'yes' if r['ok'] else '**no**'} |"
                  for r in results["e2e"]]
    lines += ["", "## HomoVar loss (forward + backward) vs the original dense [B, K, D] form\n",
              "| case | B | K | D | ours ms | dense ms | speed-up | ours peak MB | dense peak MB |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results["homovar"]:
        lines.append(f"| {r['case']} | {r['B']} | {r['K']} | {r['D']} | {r['ours_ms']} | {r['dense_ms']} | "
                     f"{r['speedup']} | {r['ours_peak_mb']} | {r['dense_peak_mb']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="8x8 only, fewer reps, small HomoVar case")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--out", default=str(HERE))
    p.add_argument("--e2e", default=None, help="comma-separated presets to time end to end (default: smoke,default; "
                   "'none' to skip; --quick skips)")
    p.add_argument("--dgms-batch", type=int, default=None, help="224 px batch of the DGMS memory case "
                   "(default 64 on CUDA, 8 on CPU; 0 skips)")
    p.add_argument("--compile", default="auto", help="also time every step torch.compile'd in this mode: "
                   "default, reduce-overhead (CUDA graphs), max-autotune; 'none'; auto (default): reduce-overhead on "
                   "CUDA, none on CPU (there eager with the native kernels is as fast)")
    p.add_argument("--only", default="", help="comma-separated sections: steps,homovar,ops,dgms_memory,gpu_fit,e2e")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    reps = args.reps or (3 if args.quick else 7)
    sizes = [8] if args.quick else [8, 32]
    print(f"benchmarks on {device} ({os.cpu_count()} CPUs)")
    only = {s for s in args.only.split(",") if s}
    want = (lambda section: not only or section in only)  # noqa: E731
    e2e = [] if args.quick else [p for p in (args.e2e or "smoke,default").split(",") if p and p != "none"]
    dgms_batch = args.dgms_batch if args.dgms_batch is not None else (64 if device.type == "cuda" else 8)
    results: dict[str, Any] = {"machine": machine(device), "reps": reps}
    compile_mode = args.compile if args.compile != "auto" else ("reduce-overhead" if device.type == "cuda" else "none")
    if compile_mode != "none":
        from paperlib.compiled import MODES

        if compile_mode not in MODES:
            p.error(f"--compile {compile_mode!r}: use auto, none or one of {list(MODES)}")
    results["compile"] = compile_mode
    results["steps"] = bench_steps(device, sizes, reps, compile_mode=compile_mode) if want("steps") else []
    results["homovar"] = bench_homovar(device, reps, args.quick) if want("homovar") else []
    if want("ops"):
        results["ops"] = bench_ops()
    if want("dgms_memory") and dgms_batch and not args.quick:
        results["dgms_memory"] = bench_dgms_memory(device, dgms_batch, max(1, reps // 3))
    if want("gpu_fit") and device.type == "cuda":
        results["gpu_fit"] = bench_gpu_fit(device)
    if want("e2e") and e2e:
        results["e2e"] = bench_e2e(e2e)
    out = Path(args.out)
    from paperlib.runs import write_json

    write_json(out / "results.json", results)
    tmp = out / ".results.md.tmp"
    tmp.write_text(to_markdown(results))
    tmp.replace(out / "results.md")
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
