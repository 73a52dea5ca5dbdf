"""Speed and memory benchmarks, measured as ratios in one run (issue 9).

``python -m benchmarks.run [--quick] [--device D]`` writes ``benchmarks/results.json`` and
``benchmarks/results.md``:

- train-step time of each quantized ResNet-20 divided by the FP32 step of the same net (batch 128, at 8x8 and
  32x32): uniform STE (DoReFa), LSQ, ClimbQ W4A4, LifeQuant W4A4 + prox penalty, CBP (constraint term), DGMS
  (K=16), and the peer PyTorch users would reach for: ``torch.ao`` eager/FX fake-quant QAT at 8 bits;
- the HomoVar loss against the original's dense [B, K, D] formulation (time and peak memory).

Median of several repetitions after warm-up. Targets from the issue are checked and reported, never asserted.
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

HERE = Path(__file__).resolve().parent
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

    def uniform():
        m = quantize_model(_resnet(), weight=lambda _: DoReFaWeight(4), activation=lambda: ClippedActivation(4, 4.0),
                           skip="first_last")
        return m, ce

    def lsq():
        m = quantize_model(_resnet(), weight=lambda layer: LSQWeight(4, layer.weight),
                           activation=lambda: LSQActivation(4), skip="first_last")
        return m, ce

    def climbq():
        from paperlib.climbq import ClimbQActivation, ClimbQWeight, batch_sigma, set_sigma

        m = quantize_model(_resnet("pre_relu"), weight=lambda _: ClimbQWeight(4),
                           activation=lambda: ClimbQActivation(4), skip=[])
        quantize_model(m, weight=None)

        def loss(model, x, y):
            set_sigma(model, batch_sigma(y, 10))
            return F.cross_entropy(model(x), y)

        return m, loss

    def lifequant():
        from paperlib.lifequant import importance, prox_penalty, quantize_lifequant, snapshot

        m = quantize_lifequant(_resnet("pre_relu"), 4, 4)
        old = snapshot(m)
        imp = {k: torch.rand_like(v) for k, v in old.items()}
        del importance

        def loss(model, x, y):
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

    return {"FP32": fp32, "uniform STE W4A4": uniform, "LSQ W4A4": lsq, "ClimbQ W4A4": climbq,
            "LifeQuant W4A4 + prox": lifequant, "CBP ter": cbp, "DGMS K=16": dgms,
            "torch.ao QAT 8-bit (peer)": torch_ao}


def bench_steps(device: torch.device, sizes: list[int], reps: int, batch: int = 128) -> list[dict[str, Any]]:
    rows = []
    for size in sizes:
        x = torch.randn(batch, 3, size, size, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        base = None
        for name, build in step_cases().items():
            try:
                model, loss_fn = build()
            except Exception as e:  # a method that cannot be built is reported, not fatal
                rows.append({"case": name, "size": size, "error": f"{type(e).__name__}: {e}"})
                continue
            model = model.to(device).train()
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

            def step(model=model, loss_fn=loss_fn, opt=opt, x=x, y=y):
                opt.zero_grad(set_to_none=True)
                loss_fn(model, x, y).backward()
                opt.step()

            t = median_time(step, device, reps)
            base = t if name == "FP32" else base
            ratio = t / base if base else float("nan")
            target = TARGETS.get(name)
            rows.append({"case": name, "size": size, "step_ms": round(1000 * t, 2), "ratio_vs_fp32": round(ratio, 3),
                         "images_per_s": round(batch / t, 1), "target": target,
                         "meets_target": None if target is None else bool(ratio <= target)})
            print(f"  {size:>3}px {name:<28} {1000 * t:8.1f} ms  x{ratio:.2f}", flush=True)
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
    """The original ``lt_loss.py`` formulation: a dense [B, K, D] mask tensor (spec §1.4), for comparison."""
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


def bench_homovar(device: torch.device, reps: int, quick: bool) -> list[dict[str, Any]]:
    from paperlib.climbq import homovar_loss

    cases = [("CIFAR-100-like", 128, 100, 64)] + ([] if quick else [("ImageNet-scale", 256, 1000, 2048)])
    rows = []
    for name, b, k, d in cases:
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(b, k, generator=g).to(device).requires_grad_()
        labels = torch.randint(0, k, (b,), generator=g).to(device)
        feats = torch.rand(b, d, generator=g).relu().to(device)
        counts = torch.randint(5, 1300, (k,), generator=g).tolist()
        row: dict[str, Any] = {"case": name, "B": b, "K": k, "D": d}
        for label, fn in (("ours", homovar_loss), ("dense", dense_homovar)):
            def call(fn=fn, logits=logits, labels=labels, feats=feats, counts=counts):
                loss = fn(logits, labels, feats, counts)
                loss.backward()
                return loss

            _, peak = _peak(call, device)  # first call: the memory high-water mark is measured before timing
            t = median_time(call, device, reps, warmup=1)
            row[f"{label}_ms"] = round(1000 * t, 2)
            row[f"{label}_peak_mb"] = None if peak is None else round(peak / 2**20, 1)
        row["speedup"] = round(row["dense_ms"] / row["ours_ms"], 1)
        row["meets_target"] = bool(row["speedup"] >= 20) if name == "ImageNet-scale" else None
        print(f"  HomoVar {name}: ours {row['ours_ms']} ms / dense {row['dense_ms']} ms (x{row['speedup']}), "
              f"peak {row['ours_peak_mb']} vs {row['dense_peak_mb']} MB", flush=True)
        rows.append(row)
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
             + (f" ({m['gpu']})" if "gpu" in m else "") + f"; median of {results['reps']} reps after warm-up.\n",
             "## Train step of ResNet-20 (batch 128) relative to FP32\n",
             "| input | method | ms/step | × FP32 | target | met |", "|---|---|---|---|---|---|"]
    for r in results["steps"]:
        if "error" in r:
            lines.append(f"| {r['size']}px | {r['case']} | error: {r['error']} | | | |")
            continue
        met = "" if r["meets_target"] is None else ("yes" if r["meets_target"] else "**no**")
        lines.append(f"| {r['size']}px | {r['case']} | {r['step_ms']} | {r['ratio_vs_fp32']} | "
                     f"{r['target'] or ''} | {met} |")
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
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    reps = args.reps or (3 if args.quick else 7)
    sizes = [8] if args.quick else [8, 32]
    print(f"benchmarks on {device} ({os.cpu_count()} CPUs)")
    results = {"machine": machine(device), "reps": reps, "steps": bench_steps(device, sizes, reps),
               "homovar": bench_homovar(device, reps, args.quick)}
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
