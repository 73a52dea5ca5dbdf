"""The quickstart experiment: FP32 vs uniform (DoReFa-style) k-bit QAT of ResNet-20, over seeds.

It is the template the paper notebooks follow: a driver that returns JSON-native metrics, which the
notebook shows as a table and the figure functions draw.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import claims
from .data.load import load_dataset
from .device import cpu_threads
from .models import create_model
from .presets import register_presets
from .pretrain import pretrained_fp32
from .quant import ClippedActivation, DoReFaWeight, quantize_model
from .stats import format_mean_ci, summarize
from .train import TrainConfig, evaluate, fit, resolve_device

register_presets("00_quickstart", {
    "smoke": {"dataset": "digits", "image_size": 8, "seeds": [0], "fp_epochs": 4, "qat_epochs": 2,
              "batch_size": 128, "fp_lr": 0.1, "qat_lr": 0.02, "bits": [4, 2], "act_clip": 4.0, "augment": False,
              "threads": 1},
    "default": {"dataset": "digits", "image_size": 8, "seeds": [0, 1, 2, 3, 4], "fp_epochs": 15, "qat_epochs": 8,
                "batch_size": 128, "fp_lr": 0.1, "qat_lr": 0.02, "bits": [4, 2], "act_clip": 4.0, "augment": False,
                "threads": 1},
    "paper": {"dataset": "cifar10", "image_size": 32, "seeds": [0, 1, 2], "fp_epochs": 200, "qat_epochs": 100,
              "batch_size": 128, "fp_lr": 0.1, "qat_lr": 0.01, "bits": [4, 2], "act_clip": 4.0, "augment": True,
              "threads": 0},
}, validate=lambda cfg: validate_settings(cfg))


def validate_settings(cfg: dict[str, Any]) -> None:
    """The quickstart's range checks (before any work): seeds, epochs, bits, learning rates, batch size."""
    seeds = cfg["seeds"]
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise ValueError(f"seeds={seeds!r}: a non-empty list of integers, e.g. [0, 1, 2, 3, 4]")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds={seeds!r}: repeated seeds would pair a run with itself")
    check_epochs(cfg)
    if not cfg["bits"] or any(isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 8 for b in cfg["bits"]):
        raise ValueError(f"bits={cfg['bits']!r}: a non-empty list of integers in 1..8")
    for key in ("fp_lr", "qat_lr", "act_clip"):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{key}={v!r}: a finite number > 0")
    if isinstance(cfg["batch_size"], bool) or not isinstance(cfg["batch_size"], int) or cfg["batch_size"] < 1:
        raise ValueError(f"batch_size={cfg['batch_size']!r}: an integer >= 1")


def uniform_qat(model: nn.Module, bits: int, act_clip: float = 1.0) -> nn.Module:
    """A quantized copy of ``model``: DoReFa weights and clipped activations at ``bits``, first/last FP."""
    q = copy.deepcopy(model)
    return quantize_model(q, weight=lambda _: DoReFaWeight(bits),
                          activation=lambda: ClippedActivation(bits, act_clip), skip="first_last")


def check_epochs(cfg: dict[str, Any]) -> None:
    """``fp_epochs`` and ``qat_epochs`` are ints >= 0, not both 0 (a clear error naming the setting otherwise).

    ``fp_epochs = 0``: no FP32 pretraining: the FP32 row is the seeded random initialisation and QAT starts
    from it (quantized training from scratch). ``qat_epochs = 0``: no fine-tuning: each W{b}A{b} model is the
    FP32 network quantized and evaluated as is (a post-training quantization baseline).
    """
    for key in ("fp_epochs", "qat_epochs"):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{key}={v!r}: epochs must be an int >= 0 (0: skip that stage; None in the notebook: "
                             "the preset's)")
    if cfg["fp_epochs"] == 0 and cfg["qat_epochs"] == 0:
        raise ValueError("fp_epochs=0 and qat_epochs=0: every network would stay at its random initialisation; "
                         "train at least one stage (fp_epochs >= 1 or qat_epochs >= 1)")


def run_quickstart(cfg: dict[str, Any], device: str = "auto", data_dir: str = "",
                   progress: bool | None = None, *, runs_root: str | Path | None = None) -> dict[str, Any]:
    """Train FP32 then fine-tune uniform W{b}A{b} from it for each seed; return the metrics dict.

    ``fp_epochs = 0`` starts QAT from the random initialisation, ``qat_epochs = 0`` evaluates the quantized
    FP32 network without fine-tuning (see :func:`check_epochs`). ``runs_root`` locates the FP32 cache
    (``<runs_root>/_cache``, as the other drivers; None: the project's ``runs/_cache``); the notebook passes
    ``paperlib.runs.runs_root_of(output_dir)``, the runs root the harness writes to."""
    validate_settings(cfg)
    cache_dir = Path(runs_root) / "_cache" if runs_root else None
    with cpu_threads(cfg["threads"]):
        return _run_quickstart(cfg, device, data_dir, progress, cache_dir)


def _fp32_start(cfg: dict[str, Any], kwargs: dict[str, Any], train: Any, test: Any, seed: int, dev: Any,
                progress: bool | None, cache_dir: Path | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The FP32 network of ``seed``: trained (cached) for ``fp_epochs``, or its seeded initialisation at 0."""
    if cfg["fp_epochs"] == 0:
        torch.manual_seed(seed)  # the same initial weights pretrained_fp32 starts from
        model = create_model("resnet20", **kwargs).to(dev)
        return model, evaluate(model, test, device=dev)
    fp_cfg = TrainConfig(epochs=cfg["fp_epochs"], lr=cfg["fp_lr"], batch_size=cfg["batch_size"], seed=seed,
                         augment=cfg["augment"])
    return pretrained_fp32("resnet20", kwargs, train, test, fp_cfg, device=dev, cache_dir=cache_dir,
                           progress=progress)


def _run_quickstart(cfg: dict[str, Any], device: str, data_dir: str, progress: bool | None,
                    cache_dir: Path | None = None) -> dict[str, Any]:
    dev = resolve_device(device)
    train, test = load_dataset(cfg["dataset"], data_dir or None, size=cfg["image_size"],
                               channels=3 if cfg["dataset"] != "digits" else 1, device=dev)
    rows: list[dict[str, Any]] = []
    histories: dict[str, list] = {}
    for seed in cfg["seeds"]:
        kwargs = {"num_classes": train.num_classes, "in_channels": train.x.shape[1], "shortcut": "B",
                  "act_position": "post_relu"}
        model, report = _fp32_start(cfg, kwargs, train, test, seed, dev, progress, cache_dir)
        rows.append({"seed": seed, "method": "FP32", "bits": 32, "top1": report["top1"],
                     "balanced_accuracy": report["balanced_accuracy"],
                     "per_class_accuracy": report["per_class_accuracy"]})
        for bits in cfg["bits"]:
            q = uniform_qat(model, bits, cfg["act_clip"])
            history: list[dict[str, Any]] = []
            if cfg["qat_epochs"] > 0:
                q_cfg = TrainConfig(epochs=cfg["qat_epochs"], lr=cfg["qat_lr"], batch_size=cfg["batch_size"],
                                    seed=seed, augment=cfg["augment"])
                history = fit(q, train, test, q_cfg, device=dev, progress=progress).history
            final = evaluate(q, test)
            name = f"uniform W{bits}A{bits}"
            rows.append({"seed": seed, "method": name, "bits": bits, "top1": final["top1"],
                         "balanced_accuracy": final["balanced_accuracy"],
                         "per_class_accuracy": final["per_class_accuracy"]})
            histories[f"{name}/seed{seed}"] = history
    per_seed = pd.DataFrame(rows)
    summary = summarize(per_seed, "method", ["top1", "balanced_accuracy"])
    fp = summary.loc[summary["method"] == "FP32", "top1_mean"].item()
    metrics = {
        "dataset": cfg["dataset"],
        "num_classes": train.num_classes,
        "class_names": [str(c) for c in getattr(train, "classes", None) or range(train.num_classes)],
        "device": str(dev),
        "data_fingerprint": train.fingerprint(),
        "seeds": list(cfg["seeds"]),
        "config": cfg,
        "per_seed": per_seed.to_dict("records"),
        "summary": summary.to_dict("records"),
        "history": histories,
        "key_metric": {"name": "FP32 top-1", "value": fp},
    }
    metrics["claims"] = claims.as_records(check_claims(metrics))
    return metrics


def summary_table(metrics: dict[str, Any]) -> pd.DataFrame:
    """The notebook's table: method, top-1 and balanced accuracy as mean ± 95 % CI (%), seeds."""
    s = pd.DataFrame(metrics["summary"])
    return pd.DataFrame({
        "method": s["method"],
        "top-1 (%)": [format_mean_ci(m, c) for m, c in zip(s["top1_mean"], s["top1_ci"], strict=True)],
        "balanced acc. (%)": [format_mean_ci(m, c) for m, c in
                              zip(s["balanced_accuracy_mean"], s["balanced_accuracy_ci"], strict=True)],
        "seeds": s["n"],
    })


def _per_seed(metrics: dict[str, Any], method: str) -> list[float]:
    """Top-1 of ``method``, one value per seed in the order of ``metrics["seeds"]`` (pairs runs by seed)."""
    by_seed = {r["seed"]: r["top1"] for r in metrics["per_seed"] if r["method"] == method}
    return [by_seed[s] for s in metrics["seeds"] if s in by_seed]


SOURCE = "common QAT expectation (DoReFa-Net, Zhou et al. 2016, Sec. 4), not a paper claim reproduced here"


def check_claims(metrics: dict[str, Any], margin_points: float = 2.0) -> list[claims.Claim]:
    """The usual QAT expectations, judged by :mod:`paperlib.claims` on runs paired by seed.

    1. uniform W4A4 costs at most ``margin_points`` points of top-1 against FP32 (no-harm claim, margin);
    2. W2A2 is less accurate than W4A4 (fewer levels, less capacity);
    3. the worst quantized model is far above chance: top-1 > 5 x chance (1 / number of classes).
    """
    methods = {r["method"] for r in metrics["per_seed"]}
    out = []
    fp, w4, w2 = (_per_seed(metrics, m) for m in ("FP32", "uniform W4A4", "uniform W2A2"))
    c1 = ("1", f"uniform W4A4 stays within {margin_points:g} points of FP32", SOURCE, "increase",
          f"W4A4 - FP32 > -{margin_points:g} points")
    if fp and w4:
        out.append(claims.paired(*c1, w4, fp, scale=100, unit="points", label="W4A4 - FP32", margin=margin_points))
    else:
        out.append(claims.not_measured(*c1, "W4A4 or FP32 not run"))
    c2 = ("2", "W2A2 is less accurate than W4A4", SOURCE, "decrease", "W2A2 - W4A4 < 0")
    if w4 and w2:
        out.append(claims.paired(*c2, w2, w4, scale=100, unit="points", label="W2A2 - W4A4"))
    else:
        out.append(claims.not_measured(*c2, "W2A2 or W4A4 not run"))
    chance = 1 / metrics["num_classes"]
    quantized = sorted(m for m in methods if m != "FP32")
    c3 = ("3", "every quantized model is far above chance", SOURCE, "increase",
          f"top-1 of the worst quantized model > 5 x chance = {500 * chance:.0f} %")
    if quantized:
        worst = min(quantized, key=lambda m: float(np.mean(_per_seed(metrics, m))))
        out.append(claims.one_sample(*c3, _per_seed(metrics, worst), null=5 * chance, scale=100, unit="%",
                                     label=f"top-1 of {worst}", note=f"effect is the top-1 itself, against "
                                     f"{500 * chance:.0f} %"))
    else:
        out.append(claims.not_measured(*c3, "no quantized model run"))
    return out


def findings(metrics: dict[str, Any]) -> str:
    """The notebook's "What we found" paragraph, from the numbers (markdown)."""
    recs = claims.from_records(metrics["claims"])
    s = {r["method"]: r for r in metrics["summary"]}
    n = len(metrics["seeds"])
    fp = s["FP32"]["top1_mean"]
    parts = [f"On {metrics['dataset']} ({n} seed{'s' if n != 1 else ''}), FP32 ResNet-20 reaches "
             f"{100 * fp:.1f} % top-1."]
    for name, row in s.items():
        if name != "FP32":
            parts.append(f"{name} reaches {100 * row['top1_mean']:.1f} % ({100 * (row['top1_mean'] - fp):+.1f} "
                         "points against FP32).")
    parts.append(claims.summary_sentence(recs))
    bad = [c for c in recs if c.verdict == "not held"]
    if bad:
        parts.append("Not held: " + "; ".join(f"{c.id}. {c.claim} ({c.measured})" for c in bad) + ".")
    if n < 2:
        parts.append("With one seed there is no confidence interval, so every comparison is undecidable: run "
                     "the default preset (5 seeds) for verdicts.")
    return " ".join(parts)


def check_expectations(metrics: dict[str, Any], tolerance: float = 0.02) -> pd.DataFrame:
    """:func:`check_claims` as a table (one row per claim, :data:`paperlib.claims.COLUMNS`); ``tolerance`` is the
    W4A4 no-harm margin as a fraction of top-1 (0.02 = 2 points)."""
    return claims.claims_table(check_claims(metrics, margin_points=100 * tolerance))
