"""FP32 pretraining with a content-addressed cache, shared by the notebooks.

Several notebooks start from the same FP32 network (e.g. ResNet-20 on digits). ``pretrained_fp32`` trains
it once and stores the weights under ``runs/_cache/fp32-<key>.pt``; the key hashes the model name and
arguments, the training config, the data fingerprint and the torch version, so a change in any of them
retrains. ``use_cache=False`` always trains.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import paths
from .data.tensors import InMemoryData
from .models import create_model
from .train import TrainConfig, evaluate, fit, resolve_device, save_checkpoint

CACHE_VERSION = 2  # bump when the way a cached network is trained changes


#: TrainConfig fields added after the cache's first version, keyed only when they differ from these defaults
#: (so a new option leaves the existing caches valid), and execution options that train the same net (never keyed)
LATE_FIELDS: dict[str, Any] = {"crop": None}
UNKEYED_FIELDS = ("compile",)


def cache_key(model_name: str, model_kwargs: dict[str, Any], cfg: TrainConfig, train: InMemoryData) -> str:
    """Hash of the model, its kwargs, the training settings, the data fingerprint and the torch version."""
    settings = {k: v for k, v in asdict(cfg).items()
                if k not in UNKEYED_FIELDS and not (k in LATE_FIELDS and v == LATE_FIELDS[k])}
    blob = json.dumps({"version": CACHE_VERSION, "model": model_name, "kwargs": model_kwargs, "cfg": settings,
                       "data": train.fingerprint(), "torch": torch.__version__}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def pretrained_fp32(model_name: str, model_kwargs: dict[str, Any], train: InMemoryData, test: InMemoryData,
                    cfg: TrainConfig, device: str | torch.device | None = None, use_cache: bool = True,
                    cache_dir: str | Path | None = None, progress: bool | None = None) -> tuple[nn.Module, dict]:
    """``(model, test_report)`` of an FP32 ``create_model(model_name, **model_kwargs)`` trained with ``cfg``."""
    dev = resolve_device(device)
    torch.manual_seed(cfg.seed)  # the initial weights depend on the seed only, not on earlier RNG use
    model = create_model(model_name, **model_kwargs)
    path = Path(cache_dir or paths.runs_dir() / "_cache") / f"fp32-{cache_key(model_name, model_kwargs, cfg, train)}.pt"
    if use_cache and path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        model.to(dev)
    else:
        fit(model, train, test, cfg, device=dev, progress=progress)
        if use_cache:
            save_checkpoint(path, {k: v.detach().cpu() for k, v in model.state_dict().items()})
    return model, evaluate(model, test, device=dev, crop=cfg.crop)
