"""The quickstart experiment: FP32 vs uniform (DoReFa-style) k-bit QAT of ResNet-20, over seeds.

It is the template the paper notebooks follow: a driver that returns JSON-native metrics, which the
notebook shows as a table and the figure functions draw.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

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
    "default": {"dataset": "digits", "image_size": 8, "seeds": [0, 1, 2], "fp_epochs": 15, "qat_epochs": 8,
                "batch_size": 128, "fp_lr": 0.1, "qat_lr": 0.02, "bits": [4, 2], "act_clip": 4.0, "augment": False,
                "threads": 1},
    "paper": {"dataset": "cifar10", "image_size": 32, "seeds": [0, 1, 2], "fp_epochs": 200, "qat_epochs": 100,
              "batch_size": 128, "fp_lr": 0.1, "qat_lr": 0.01, "bits": [4, 2], "act_clip": 4.0, "augment": True,
              "threads": 0},
})


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
    check_epochs(cfg)
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
                     "balanced_accuracy": report["balanced_accuracy"]})
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
                         "balanced_accuracy": final["balanced_accuracy"]})
            histories[f"{name}/seed{seed}"] = history
    per_seed = pd.DataFrame(rows)
    summary = summarize(per_seed, "method", ["top1", "balanced_accuracy"])
    fp = summary.loc[summary["method"] == "FP32", "top1_mean"].item()
    return {
        "dataset": cfg["dataset"],
        "num_classes": train.num_classes,
        "device": str(dev),
        "data_fingerprint": train.fingerprint(),
        "seeds": list(cfg["seeds"]),
        "config": cfg,
        "per_seed": per_seed.to_dict("records"),
        "summary": summary.to_dict("records"),
        "history": histories,
        "key_metric": {"name": "FP32 top-1", "value": fp},
    }


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


def check_expectations(metrics: dict[str, Any], tolerance: float = 0.02) -> pd.DataFrame:
    """What held and what did not, computed from the metrics: the usual QAT expectations on digits.

    1. uniform W4A4 stays within ``tolerance`` (top-1, absolute) of FP32;
    2. W2A2 is no better than W4A4 (fewer levels, less capacity);
    3. every quantized model beats chance (1 / number of classes) by a wide margin (x5).
    """
    s = {row["method"]: row["top1_mean"] for row in metrics["summary"]}
    fp, w4, w2 = s.get("FP32"), s.get("uniform W4A4"), s.get("uniform W2A2")
    chance = 1 / metrics["num_classes"]
    rows = []
    if fp is not None and w4 is not None:
        rows.append({"expectation": f"W4A4 within {100 * tolerance:.0f} points of FP32", "held": fp - w4 <= tolerance,
                     "measured": f"{100 * (w4 - fp):+.1f} points"})
    if w4 is not None and w2 is not None:
        rows.append({"expectation": "W2A2 no better than W4A4", "held": w2 <= w4,
                     "measured": f"{100 * (w2 - w4):+.1f} points"})
    quantized = {k: v for k, v in s.items() if k != "FP32"}
    if quantized:
        worst = min(quantized.values())
        rows.append({"expectation": "every quantized model far above chance (x5)", "held": worst >= 5 * chance,
                     "measured": f"worst {100 * worst:.1f} % vs chance {100 * chance:.0f} %"})
    return pd.DataFrame(rows)
