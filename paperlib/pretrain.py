"""FP32 pretraining with a content-addressed cache, shared by the notebooks.

Several notebooks start from the same FP32 network (e.g. ResNet-20 on digits). ``pretrained_fp32`` trains
it once and stores the weights under ``runs/_cache/fp32-<key>.pt``; the key hashes the model name and
arguments, the training config, the data fingerprint and the torch version, so a change in any of them
retrains. ``use_cache=False`` always trains.

Each entry holds the state dict and its SHA-256 (``_paperlib_sha256``), written through the atomic writer. An
entry is verified on load (readable, this model's tensors and shapes, the checksum where present); a bad one
(truncated by a full disk, corrupted) is named in one line and retrained and rewritten, never used.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import paths
from .atomic import WriteError, atomic_torch_save
from .data.tensors import InMemoryData
from .models import create_model
from .train import TrainConfig, evaluate, fit, resolve_device

CACHE_VERSION = 2  # bump when the way a cached network is trained changes


#: TrainConfig fields added after the cache's first version, keyed only when they differ from these defaults
#: (so a new option leaves the existing caches valid), and execution options that train the same net (never keyed)
LATE_FIELDS: dict[str, Any] = {"crop": None}
UNKEYED_FIELDS = ("compile",)
#: the key of a cache entry's checksum (entries written before it was added have none and are checked by shape)
DIGEST_KEY = "_paperlib_sha256"


def cache_key(model_name: str, model_kwargs: dict[str, Any], cfg: TrainConfig, train: InMemoryData) -> str:
    """Hash of the model, its kwargs, the training settings, the data fingerprint and the torch version."""
    settings = {k: v for k, v in asdict(cfg).items()
                if k not in UNKEYED_FIELDS and not (k in LATE_FIELDS and v == LATE_FIELDS[k])}
    blob = json.dumps({"version": CACHE_VERSION, "model": model_name, "kwargs": model_kwargs, "cfg": settings,
                       "data": train.fingerprint(), "torch": torch.__version__}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over a state dict's names, dtypes, shapes and bytes (in name order)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def load_cache_entry(path: Path, model: nn.Module) -> dict[str, torch.Tensor] | str:
    """The verified state dict stored at ``path`` for ``model``, or why it cannot be used (one line)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (truncated zip, empty file, unpickling error: all mean "corrupt")
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"unreadable: {first[:120]}"
    if not isinstance(state, dict):
        return f"holds a {type(state).__name__}, not a state dict"
    digest = state.pop(DIGEST_KEY, None)
    expected = model.state_dict()
    if set(state) != set(expected):
        return "its tensors are not this model's"
    for name, t in state.items():
        if not isinstance(t, torch.Tensor) or t.shape != expected[name].shape:
            return f"{name} is not a tensor of shape {tuple(expected[name].shape)}"
    if digest is not None and digest != state_digest(state):
        return "its checksum does not match its contents (the file is corrupt)"
    return state


def pretrained_fp32(model_name: str, model_kwargs: dict[str, Any], train: InMemoryData, test: InMemoryData,
                    cfg: TrainConfig, device: str | torch.device | None = None, use_cache: bool = True,
                    cache_dir: str | Path | None = None, progress: bool | None = None) -> tuple[nn.Module, dict]:
    """``(model, test_report)`` of an FP32 ``create_model(model_name, **model_kwargs)`` trained with ``cfg``."""
    dev = resolve_device(device)
    torch.manual_seed(cfg.seed)  # the initial weights depend on the seed only, not on earlier RNG use
    model = create_model(model_name, **model_kwargs)
    path = Path(cache_dir or paths.runs_dir() / "_cache") / f"fp32-{cache_key(model_name, model_kwargs, cfg, train)}.pt"
    state = load_cache_entry(path, model) if use_cache and path.is_file() else None
    if isinstance(state, dict):
        model.load_state_dict(state)
        model.to(dev)
        return model, evaluate(model, test, device=dev, crop=cfg.crop)
    if isinstance(state, str):
        print(f"FP32 cache entry {path} is {state}: retraining it", file=sys.stderr, flush=True)
    fit(model, train, test, cfg, device=dev, progress=progress)
    if use_cache:
        weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        try:
            atomic_torch_save(path, {**weights, DIGEST_KEY: state_digest(weights)})
        except WriteError as exc:  # the cache only saves time: the run goes on without it
            print(f"the FP32 network is not cached: {exc}", file=sys.stderr, flush=True)
    return model, evaluate(model, test, device=dev, crop=cfg.crop)
