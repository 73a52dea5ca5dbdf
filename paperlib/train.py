"""The training and evaluation loop every notebook uses.

``fit`` trains a model on an in-memory dataset (tensors on the device, batched augmentation) or on any
iterable of ``(x, y)`` batches (a ``DataLoader`` for large image folders). Paper methods plug in through a
``criterion(model, x, y) -> loss`` and :class:`Callback` hooks (ClimbQ sets σ before a batch, CBP adds its
constraint term and acts at the end of an epoch). Every epoch is checkpointed atomically
(:mod:`paperlib.atomic`: a temp file renamed onto the target, so a crash, a ``kill -9`` or a full disk leaves the
previous checkpoint) with model, optimizer, scheduler, callback and RNG state, so ``resume=True`` ends with the
same model and metrics as an uninterrupted run. A checkpoint that cannot be read (truncated, empty, not a
checkpoint) stops ``resume`` with a one-line :class:`CheckpointError` naming the file.

Under ``torchrun`` (a process group of several processes, :mod:`paperlib.distributed`) ``fit`` trains with
``DistributedDataParallel``: each rank takes its contiguous shard of every global batch of the same seeded
permutation (``config.batch_size`` is the global batch, as in a single process), the gradients are averaged with
per-rank weights ``n_rank * W / n_global`` (= the gradient of the global-batch mean loss), BN buffers are
synchronised from rank 0 at every epoch end, the test set is evaluated in shards whose logits are all-gathered,
and only rank 0 writes the checkpoint (with every rank's RNG state; ``resume=True`` under DDP restores each rank's
own, so an interrupted DDP run continues exactly as the uninterrupted one). ``sync_batchnorm=True`` converts the BN
layers to ``torch.nn.SyncBatchNorm`` for the run (CUDA only: torch's SyncBatchNorm rejects CPU tensors).
"""

from __future__ import annotations

import math
import numbers
import os
import random
import sys
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .atomic import WriteError, atomic_torch_save, check_writable
from .callback import Callback, cross_entropy
from .data.tensors import InMemoryData, TensorLoader
from .device import resolve_device
from .metrics import classification_report

Criterion = Callable[[nn.Module, Tensor, Tensor], Tensor]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class CheckpointError(ValueError):
    """A checkpoint to resume from cannot be read (truncated, empty, or not a checkpoint of :func:`fit`);
    ``str()`` is one line naming the file, the cause and the fix; ``path`` and ``problem`` (the cause alone)
    let a caller word its own fix."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path, self.problem = Path(path), problem
        super().__init__(f"cannot resume from checkpoint {self.path}: {problem}; delete it to train from the start")


def seed_everything(seed: int, deterministic: bool = True, device: torch.device | None = None) -> None:
    """Seed python, numpy and torch; on CPU also ask torch for deterministic algorithms."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic and (device is None or device.type == "cpu"):
        torch.use_deterministic_algorithms(True, warn_only=True)


def show_progress() -> bool:
    """tqdm bars only on an interactive terminal and never under CI."""
    return sys.stderr.isatty() and not os.environ.get("CI")


#: environment variable with the default of :attr:`TrainConfig.compile`
COMPILE_ENV = "PAPERLIB_COMPILE"


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`fit` (plain data; a notebook preset overrides them)."""

    epochs: int = 10
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    batch_size: int = 128
    eval_batch_size: int = 512
    scheduler: str = "cosine"  # "cosine" | "multistep" | "none"
    milestones: Sequence[int] = ()
    lr_gamma: float = 0.1
    seed: int = 0
    augment: bool = False
    eval_every: int = 1
    amp: str = "none"  # "none" | "bf16": autocast the training forward (GPU path; also works on CPU)
    channels_last: bool = False  # NHWC memory format for model and batches (faster convolutions on GPUs)
    #: network input side for images stored larger (e.g. decoded at 256, crop 224: LifeQuant Office/ImageCLEF):
    #: training takes a random ``crop x crop`` window + flip (``augment``; no padding) or the central one (no
    #: ``augment``), evaluation the central one (``CenterCrop``); None: the stored size (pad-4 crop if ``augment``)
    crop: int | None = None
    #: ``torch.compile`` the model for training (:mod:`paperlib.compiled`): "none" (eager), "default",
    #: "reduce-overhead" (CUDA graphs on a GPU), "max-autotune", "max-autotune-no-cudagraphs"; the default comes
    #: from ``$PAPERLIB_COMPILE`` (unset: "none"), so a whole ``reproduce --preset paper`` run can compile
    compile: str = field(default_factory=lambda: os.environ.get(COMPILE_ENV, "none") or "none")

    def __post_init__(self) -> None:
        _check_int("epochs", self.epochs, 1, "train for at least 1 epoch")
        _check_int("batch_size", self.batch_size, 1, "a batch holds at least 1 sample")
        _check_int("eval_batch_size", self.eval_batch_size, 1, "a batch holds at least 1 sample")
        _check_int("eval_every", self.eval_every, 1, "evaluate every N >= 1 epochs")
        _check_int("seed", self.seed, None, "seeds are integers")
        _check_real("lr", self.lr, "the learning rate must be a finite number > 0", low=0.0, low_open=True)
        _check_real("momentum", self.momentum, "SGD's momentum must be a finite number in [0, 1)", low=0.0,
                    high=1.0)
        _check_real("weight_decay", self.weight_decay, "the weight decay must be a finite number >= 0", low=0.0)
        _check_real("lr_gamma", self.lr_gamma, "the multistep lr factor must be a finite number > 0", low=0.0,
                    low_open=True)
        for name in ("nesterov", "augment", "channels_last"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r}: must be True or False")
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0 (Nesterov's step is a momentum step)")
        milestones = list(self.milestones)
        if any(isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 1 for m in milestones):
            raise ValueError(f"milestones={self.milestones!r}: give the epochs (ints >= 1) after which the "
                             "multistep scheduler multiplies the lr by lr_gamma")
        if self.scheduler not in ("cosine", "multistep", "none"):
            raise ValueError(f"scheduler={self.scheduler!r}: use 'cosine', 'multistep' or 'none'")
        if self.amp not in ("none", "bf16"):
            raise ValueError(f"amp={self.amp!r}: use 'none' or 'bf16'")
        from .compiled import MODES

        if self.compile not in ("none", *MODES):
            env = os.environ.get(COMPILE_ENV)
            where = f" (from ${COMPILE_ENV}={env!r})" if env == self.compile else ""
            raise ValueError(f"compile={self.compile!r}{where}: use 'none' (eager) or one of {list(MODES)} "
                             "(torch.compile's modes; 'reduce-overhead' adds CUDA graphs on a GPU)")
        if self.crop is not None and (isinstance(self.crop, bool) or not isinstance(self.crop, int) or self.crop < 1):
            raise ValueError(f"crop={self.crop!r}: give the network's input side (an int >= 1, e.g. 224 for images "
                             "stored at 256) or None (the stored size)")


def _check_int(name: str, value: Any, low: int | None, why: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (low is not None and value < low):
        rng = "an int" if low is None else f"an int >= {low}"
        raise ValueError(f"{name}={value!r}: must be {rng} ({why})")


def _check_real(name: str, value: Any, why: str, *, low: float | None = None, high: float | None = None,
                low_open: bool = False) -> None:
    """``value`` is a finite real number in ``[low, high)`` (``(low, high)`` with ``low_open``)."""
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high
    if not ok:
        raise ValueError(f"{name}={value!r}: {why}")


@dataclass
class TrainResult:
    """What :func:`fit` returns: per-epoch history and the final test report."""

    history: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)

    @property
    def best_top1(self) -> float:
        vals = [h["test_top1"] for h in self.history if "test_top1" in h]
        return max(vals) if vals else float("nan")


@torch.no_grad()
def predict(model: nn.Module, data: InMemoryData | Iterable, batch_size: int = 512,
            device: torch.device | None = None, *, crop: int | None = None) -> tuple[Tensor, Tensor]:
    """Logits and labels of ``model`` over ``data`` in eval mode (restores the previous mode). ``crop``: feed the
    central ``crop x crop`` window of larger images (``CenterCrop``; images already that size pass as they are)."""
    from .data.augment import center_crop

    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    batches = TensorLoader(data.to(device), batch_size) if isinstance(data, InMemoryData) else data
    logits, labels = [], []
    for x, y in batches:
        if crop is not None:
            x = center_crop(x, crop)
        logits.append(model(x.to(device, non_blocking=True)))
        labels.append(y.to(device, non_blocking=True))
    model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


def evaluate(model: nn.Module, data: InMemoryData | Iterable, num_classes: int | None = None,
             batch_size: int = 512, device: torch.device | None = None, *, crop: int | None = None) -> dict[str, Any]:
    """:func:`paperlib.metrics.classification_report` of ``model`` on ``data`` plus the mean CE loss (``crop``:
    as in :func:`predict`)."""
    logits, labels = predict(model, data, batch_size, device, crop=crop)
    return _report(logits, labels, num_classes or (data.num_classes if isinstance(data, InMemoryData)
                                                    else logits.shape[1]))


def _report(logits: Tensor, labels: Tensor, k: int) -> dict[str, Any]:
    report = classification_report(logits, labels, k)
    report["loss"] = float(F.cross_entropy(logits, labels))
    return report


def _evaluate_sharded(model: nn.Module, data: InMemoryData | Iterable, batch_size: int,
                      device: torch.device, crop: int | None = None) -> dict[str, Any]:
    """:func:`evaluate` under DDP: every rank predicts its contiguous shard of an :class:`InMemoryData`, the
    logits and labels are all-gathered in rank order, and every rank computes the same report (an iterable,
    or a test set smaller than the number of ranks, is evaluated whole on every rank)."""
    from . import distributed as pdist
    from .data.tensors import shard_bounds

    w = pdist.world_size()
    if not isinstance(data, InMemoryData) or len(data) < w:
        return evaluate(model, data, batch_size=batch_size, device=device, crop=crop)
    start, stop = shard_bounds(len(data), w, pdist.rank())
    logits, labels = predict(model, data.subset(slice(start, stop)), batch_size, device, crop=crop)
    logits, _ = pdist.all_gather_cat(logits)
    labels, _ = pdist.all_gather_cat(labels)
    return _report(logits, labels, data.num_classes)


class _CriterionModule(nn.Module):
    """``forward(x, y) = criterion(model, x, y)``: what DDP wraps, so every criterion (one that calls
    ``model.forward_features`` and ``model.fc`` too) runs inside DDP's forward and its gradients are reduced."""

    def __init__(self, model: nn.Module, criterion: Criterion) -> None:
        super().__init__()
        self.model = model
        object.__setattr__(self, "_criterion", criterion)  # not a submodule: its parameters are not the model's

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self._criterion(self.model, x, y)


def _use_ddp(distributed: bool | None) -> bool:
    import torch.distributed as dist

    up = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if up:  # not within paperlib.distributed.local_only()
        from .distributed import is_distributed

        up = is_distributed()
    if distributed is None:
        return up
    if distributed and not up:
        raise RuntimeError("fit(distributed=True) needs a process group of more than one process: launch with "
                           "`torchrun --nproc_per_node=N ...` and call paperlib.distributed.init_distributed() "
                           "first (or leave distributed=None)")
    return bool(distributed)


def _rng_state(loader: Any) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if hasattr(loader, "state_dict"):
        state["loader"] = loader.state_dict()
    return state


def _set_rng_state(state: dict[str, Any], loader: Any) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "loader" in state and hasattr(loader, "load_state_dict"):
        loader.load_state_dict(state["loader"])


def _callback_keys(callbacks: Sequence[Callback]) -> list[str]:
    seen: dict[str, int] = {}
    keys = []
    for cb in callbacks:
        name = type(cb).__name__
        keys.append(f"{name}#{seen.get(name, 0)}")
        seen[name] = seen.get(name, 0) + 1
    return keys


def _callback_states(callbacks: Sequence[Callback]) -> dict[str, dict[str, Any]]:
    """Non-empty callback states keyed by ``<class>#<occurrence>``."""
    states = {k: cb.state_dict() for k, cb in zip(_callback_keys(callbacks), callbacks, strict=True)}
    return {k: v for k, v in states.items() if v}


def _load_callback_states(callbacks: Sequence[Callback], states: dict[str, dict[str, Any]]) -> None:
    keys = _callback_keys(callbacks)
    missing = sorted(set(states) - set(keys))
    if missing:
        raise ValueError(f"the checkpoint holds state of callbacks {missing} that this run does not have; "
                         "resume with the same callbacks as the interrupted run")
    for key, cb in zip(keys, callbacks, strict=True):
        if key in states:
            cb.load_state_dict(states[key])


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` with ``torch.save`` atomically (:func:`paperlib.atomic.atomic_torch_save`): never a
    half-written file; a failed write (full disk, read-only folder) removes its temp file and raises a one-line
    :class:`paperlib.atomic.WriteError` naming the path and the cause, and the previous file stays."""
    atomic_torch_save(path, state)


#: what every checkpoint of :func:`fit` holds
CHECKPOINT_KEYS = ("epoch", "model", "optimizer", "scheduler", "callbacks", "rng", "history")


def load_checkpoint(path: str | Path, device: torch.device | str | None = None) -> dict[str, Any]:
    """Read a checkpoint written by :func:`fit`; a file that cannot be read (truncated, empty, garbage, or a
    ``torch.save`` of something else) raises a one-line :class:`CheckpointError` naming it."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, ... on a damaged file
        text = str(exc).strip().splitlines()
        cause = f"{type(exc).__name__}: {text[0].split('. ')[0][:160]}" if text else type(exc).__name__
        size = path.stat().st_size if path.is_file() else 0
        what = "it is empty" if size == 0 else f"it is truncated or corrupt ({size} bytes; {cause})"
        raise CheckpointError(path, what) from None
    missing = [k for k in CHECKPOINT_KEYS if k not in state] if isinstance(state, dict) else list(CHECKPOINT_KEYS)
    if missing:
        raise CheckpointError(path, f"it is not a checkpoint of paperlib's fit (missing {missing})")
    return state


def _checkpoint_exists(checkpoint: str | Path, ddp: bool) -> bool:
    """Whether ``checkpoint`` exists; under DDP every rank must see the same answer (rank 0 wrote the file, the
    others read it too), else a clear error on every rank instead of ranks resuming from different epochs."""
    exists = Path(checkpoint).exists()
    if not ddp:
        return exists
    from . import distributed as pdist

    seen = pdist.all_gather_object(exists)
    if len(set(seen)) > 1:
        have = [r for r, e in enumerate(seen) if e]
        lack = [r for r, e in enumerate(seen) if not e]
        raise RuntimeError(f"resume: the checkpoint {checkpoint} exists for rank(s) {have} but not for rank(s) "
                           f"{lack}; rank 0 writes it and every rank reads it, so put it on a file system all "
                           "processes share (or copy it to the same path on every machine)")
    return exists


def _load_on_every_rank(checkpoint: str | Path, dev: torch.device, ddp: bool) -> dict[str, Any]:
    """:func:`load_checkpoint` on this rank; under DDP the ranks then compare notes, so a file one rank cannot
    read stops every rank with the same error (instead of the others waiting in the first collective)."""
    try:
        state, problem = load_checkpoint(checkpoint, dev), None
    except CheckpointError as exc:
        state, problem = None, exc.problem
    if ddp:
        from . import distributed as pdist

        seen = pdist.all_gather_object(problem)
        bad = [(r, p) for r, p in enumerate(seen) if p is not None]
        if bad and problem is None:
            problem = f"rank {bad[0][0]} cannot read it: {bad[0][1]}"
    if problem is not None:
        raise CheckpointError(checkpoint, problem)
    assert state is not None
    return state


def _check_checkpoint_folder(checkpoint: str | Path, rank: int, ddp: bool) -> None:
    """Rank 0 (the writer) checks that the checkpoint's folder can be written; under DDP every rank raises the
    same one-line :class:`paperlib.atomic.WriteError`."""
    problem = None
    if rank == 0:
        try:
            check_writable(Path(checkpoint).parent, "checkpoint folder")
        except WriteError as exc:
            problem = str(exc)
    if ddp:
        from . import distributed as pdist

        problem = pdist.broadcast_object(problem)
    if problem is not None:
        raise WriteError(problem)


def _save_from_rank0(checkpoint: str | Path, state: dict[str, Any] | None, ddp: bool) -> None:
    """Rank 0 writes ``state``; under DDP its outcome is broadcast, so a failed write (full disk) stops every
    rank with the same one-line :class:`paperlib.atomic.WriteError`."""
    problem: BaseException | None = None
    if state is not None:
        try:
            save_checkpoint(checkpoint, state)
        except Exception as exc:  # noqa: BLE001 (re-raised below, after the other ranks were told)
            problem = exc
    if ddp:
        from . import distributed as pdist

        msg = pdist.broadcast_object(None if problem is None else str(problem))
        if msg is not None and problem is None:
            raise WriteError(msg)
    if problem is not None:
        raise problem


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Stepped once per epoch; ``"none"`` gives no scheduler, so callbacks may change the lr themselves."""
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    if cfg.scheduler == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, list(cfg.milestones), gamma=cfg.lr_gamma)
    return None


def fit(
    model: nn.Module,
    train: InMemoryData | Iterable,
    test: InMemoryData | Iterable | None = None,
    config: TrainConfig | None = None,
    *,
    criterion: Criterion = cross_entropy,
    callbacks: Sequence[Callback] = (),
    optimizer: torch.optim.Optimizer | None = None,
    device: str | torch.device | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    progress: bool | None = None,
    distributed: bool | None = None,
    find_unused_parameters: bool = False,
    sync_batchnorm: bool = False,
) -> TrainResult:
    """Train ``model`` and evaluate it on ``test`` after every ``eval_every`` epochs.

    ``train`` is an :class:`InMemoryData` (moved to the device, shuffled by a seeded generator, augmented
    with random crop + flip when ``config.augment``) or any iterable of batches. ``config.crop``: images stored
    larger than the network's input (an :class:`InMemoryData` ``train``) are cropped to ``crop x crop`` for
    training (:func:`paperlib.data.augment.train_augment`) and center-cropped for every evaluation. With
    ``checkpoint`` the state is saved after every epoch (atomically; its folder is checked to be writable before
    the first step, and a failed write raises a one-line :class:`paperlib.atomic.WriteError`, keeping the previous
    checkpoint); ``resume=True`` continues from it (a file that cannot be read raises :class:`CheckpointError`).
    A NaN/inf loss raises :class:`TrainingDiverged` naming the epoch and batch, before the epoch is checkpointed.

    ``distributed``: ``None`` (default) trains with ``DistributedDataParallel`` exactly when a process group
    of more than one process is up (see the module docstring; an :class:`InMemoryData` is sharded per global
    batch, an iterable ``train`` must already yield this rank's batches, e.g. with a ``DistributedSampler``);
    ``False`` trains this process alone. ``find_unused_parameters`` is DDP's option, for models with
    parameters that get no gradient in some steps. Callbacks receive the unwrapped model and this rank's
    ``x, y``; the ClimbQ/CBP hooks need their global versions (:mod:`paperlib.distributed`).

    Under DDP every rank reads ``checkpoint`` when resuming (rank 0 wrote it: the path must be visible to every
    process, e.g. a shared file system; the ranks check that they agree on whether it exists), and each rank
    gets back its own RNG state when the world size is the same.

    ``config.compile`` (not "none"): the model is compiled in place for the run
    (:func:`paperlib.compiled.compile_model`; lazy, at the first step; train and eval graphs compile once each,
    and once more for a partial last batch) and handed back eager when ``fit`` returns or raises, when the
    process's compiled graphs are released (``torch.compiler.reset()``: other compiled functions recompile at
    their next call). A criterion that calls ``model.forward_features`` itself (ClimbQ's HomoVar) gets that
    trunk compiled too; other submodules it calls directly (``model.fc``) run eagerly.

    ``sync_batchnorm``: under DDP, train with every BN layer converted to ``torch.nn.SyncBatchNorm`` (batch
    statistics of the global batch, as in one process); the model gets its own BN modules back, holding the
    trained parameters and statistics, when ``fit`` returns. CUDA only (torch's SyncBatchNorm has no CPU path):
    on another device it raises ``ValueError``. Without DDP it changes nothing (one process already normalises
    with the statistics of the whole batch).
    """
    ddp = _use_ddp(distributed)
    if not isinstance(sync_batchnorm, bool):
        raise TypeError(f"sync_batchnorm={sync_batchnorm!r} must be True or False")
    mode = (config or TrainConfig()).compile
    if mode == "none":
        return _fit_ddp_modes(model, train, test, config, criterion, callbacks, optimizer, device, checkpoint,
                              resume, progress, ddp, find_unused_parameters, sync_batchnorm)
    from .compiled import compile_model, is_compiled, uncompile

    if is_compiled(model):
        raise ValueError("TrainConfig(compile=...) compiles the model itself: pass the eager module (not "
                         "torch.compile's wrapper, not one compiled in place), or leave compile='none'")
    compile_model(model.to(resolve_device(device)), mode, inplace=True)  # lazy: compiles at the first step
    try:
        return _fit_ddp_modes(model, train, test, config, criterion, callbacks, optimizer, device, checkpoint,
                              resume, progress, ddp, find_unused_parameters, sync_batchnorm)
    finally:
        uncompile(model)  # the caller gets the eager module back, also when training raised
        # and the compiled graphs go: a process that trains model after model (a notebook's methods x seeds) would
        # otherwise pile up graphs on the same forward code until dynamo's recompile limit makes it run eagerly
        torch.compiler.reset()


def _fit_ddp_modes(model: nn.Module, train: InMemoryData | Iterable, test: InMemoryData | Iterable | None,
                   config: TrainConfig | None, criterion: Criterion, callbacks: Sequence[Callback],
                   optimizer: torch.optim.Optimizer | None, device: str | torch.device | None,
                   checkpoint: str | Path | None, resume: bool, progress: bool | None, ddp: bool,
                   find_unused_parameters: bool, sync_batchnorm: bool) -> TrainResult:
    kwargs = dict(criterion=criterion, callbacks=callbacks, optimizer=optimizer, device=device, checkpoint=checkpoint,
                  resume=resume, progress=progress, ddp=ddp, find_unused_parameters=find_unused_parameters)
    if not ddp and _use_ddp(None):  # one rank trains alone inside a process group: no collectives anywhere
        from .distributed import local_only

        with local_only():
            return _fit(model, train, test, config, **kwargs)
    if not (ddp and sync_batchnorm):
        return _fit(model, train, test, config, **kwargs)
    from . import distributed as pdist

    dev = resolve_device(device)
    if dev.type != "cuda":
        raise ValueError(f"sync_batchnorm=True needs CUDA: torch.nn.SyncBatchNorm only runs on GPU tensors (its "
                         f"forward raises on {dev.type} tensors), and this DDP run trains on {dev}; train on CUDA "
                         "(--device cuda, backend nccl) or leave sync_batchnorm off (no --sync-bn): BN then normalises "
                         "with each process's own batch statistics")
    swaps = pdist.convert_sync_batchnorm(model)
    try:
        return _fit(model, train, test, config, **kwargs)
    finally:
        pdist.revert_sync_batchnorm(swaps)


def _fit(model: nn.Module, train: InMemoryData | Iterable, test: InMemoryData | Iterable | None,
         config: TrainConfig | None, *, criterion: Criterion, callbacks: Sequence[Callback],
         optimizer: torch.optim.Optimizer | None, device: str | torch.device | None, checkpoint: str | Path | None,
         resume: bool, progress: bool | None, ddp: bool, find_unused_parameters: bool) -> TrainResult:
    from .data.augment import train_augment

    cfg = config or TrainConfig()
    dev = resolve_device(device)
    rank, world = 0, 1
    if ddp:
        from . import distributed as pdist

        pdist.check_global_hooks(criterion, callbacks)
        rank, world = pdist.rank(), pdist.world_size()
    if checkpoint is not None:
        _check_checkpoint_folder(checkpoint, rank, ddp)  # before the first step, not after the first epoch
    seed_everything(cfg.seed, device=dev)
    memory_format = torch.channels_last if cfg.channels_last else torch.preserve_format
    model.to(dev, memory_format=memory_format)
    autocast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if cfg.amp == "bf16" else nullcontext
    if isinstance(train, InMemoryData):
        if len(train) == 0:
            raise ValueError("the training set is empty: check the data split or subset")
        loader: Any = TensorLoader(train.to(dev), cfg.batch_size, shuffle=True, seed=cfg.seed,
                                   augment=train_augment(cfg.augment, cfg.crop, fill=train.normalized_value(0.0)),
                                   shard=(rank, world) if ddp else None)
    elif cfg.crop is not None:
        raise ValueError(f"TrainConfig(crop={cfg.crop}) crops an InMemoryData training set; a loader of batches "
                         f"({type(train).__name__}) must crop in its own transforms (e.g. torchvision RandomCrop), "
                         "so leave crop=None for it")
    else:
        loader = train
    test_data = test.to(dev) if isinstance(test, InMemoryData) else test
    opt = optimizer or make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg)
    result = TrainResult()
    start_epoch = 0
    if resume and checkpoint is not None and _checkpoint_exists(checkpoint, ddp):
        state = _load_on_every_rank(checkpoint, dev, ddp)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if sched is not None:
            sched.load_state_dict(state["scheduler"])
        _load_callback_states(callbacks, state["callbacks"])
        ranks_rng = state.get("rng_ranks")
        own = ranks_rng is not None and len(ranks_rng) == world
        _set_rng_state(ranks_rng[rank] if own else state["rng"], loader)
        result.history = state["history"]
        start_epoch = state["epoch"] + 1
    for cb in callbacks:
        cb.on_train_start(model, opt)
    step_module: nn.Module | None = None
    if ddp:
        from torch.nn.parallel import DistributedDataParallel

        pdist.install_global_lsq_init(model)
        step_module = DistributedDataParallel(_CriterionModule(model, criterion),
                                              device_ids=[dev.index] if dev.type == "cuda" else None,
                                              find_unused_parameters=find_unused_parameters)
    sharded = isinstance(loader, TensorLoader) and loader.shard is not None
    show = (show_progress() if progress is None else progress) and rank == 0
    from tqdm import tqdm

    epochs = tqdm(range(start_epoch, cfg.epochs), desc="epochs", disable=not show, leave=False)
    for epoch in epochs:
        model.train()
        loss_sum = torch.zeros((), device=dev, dtype=torch.float64)
        n_seen = 0
        first_bad = torch.full((), -1, device=dev, dtype=torch.long)
        for i, (x, y) in enumerate(tqdm(loader, desc=f"epoch {epoch}", disable=not show, leave=False)):
            x = x.to(dev, non_blocking=True, memory_format=memory_format)
            y = y.to(dev, non_blocking=True)
            for cb in callbacks:
                cb.before_batch(model, x, y)
            if step_module is None:
                with autocast():
                    loss = criterion(model, x, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
            else:
                with autocast():
                    loss = step_module(x, y)
                opt.zero_grad(set_to_none=True)
                n_glob: Any = loader.global_batch_size(i) if sharded else pdist.all_reduce(
                    torch.tensor(float(y.shape[0]), device=dev), "sum")
                (loss * (y.shape[0] * world / n_glob)).backward()  # DDP averages: size-weighted mean
            for cb in callbacks:
                cb.after_backward(model)
            opt.step()
            for cb in callbacks:
                cb.after_step(model)
            d = loss.detach()
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(d), i, first_bad)
            loss_sum += d.double() * y.shape[0]
            n_seen += y.shape[0]
        if ddp:
            big = torch.iinfo(torch.long).max
            red = torch.stack([loss_sum, torch.tensor(float(n_seen), device=dev, dtype=torch.float64)])
            pdist.all_reduce(red, "sum")
            loss_sum, n_seen = red[0], int(red[1])
            first_bad = pdist.all_reduce(torch.where(first_bad < 0, big, first_bad), "min")
            first_bad = torch.where(first_bad == big, -1, first_bad)
            pdist.broadcast_buffers(model)  # one model on every rank: rank 0's BN running statistics
        bad = int(first_bad)
        if bad >= 0:
            raise TrainingDiverged(
                f"loss became NaN/inf at epoch {epoch}, batch {bad}: the learning rate "
                f"(now {opt.param_groups[0]['lr']:g}) may be too high, the inputs may hold NaN, or a "
                "quantizer/loss divided by zero (e.g. a class with zero samples); lower lr or check the data. "
                "The last good checkpoint is kept."
            )
        stats: dict[str, Any] = {"epoch": epoch, "lr": opt.param_groups[0]["lr"],
                                 "train_loss_sum": float(loss_sum), "train_loss": float(loss_sum) / max(n_seen, 1)}
        if sched is not None:
            sched.step()
        for cb in callbacks:
            cb.on_epoch_end(epoch, stats)
        if test_data is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            rep = (_evaluate_sharded(model, test_data, cfg.eval_batch_size, dev, cfg.crop) if ddp else
                   evaluate(model, test_data, batch_size=cfg.eval_batch_size, device=dev, crop=cfg.crop))
            stats.update(test_top1=rep["top1"], test_balanced_accuracy=rep["balanced_accuracy"],
                         test_loss=rep["loss"])
            if not math.isfinite(rep["loss"]):
                stats["test_loss"] = None
        result.history.append(stats)
        if checkpoint is not None:
            rng = _rng_state(loader)
            rng_ranks = pdist.all_gather_object(rng) if ddp else None  # every rank's own RNG, kept by rank 0
            state = None
            if rank == 0:
                state = {
                    "epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": None if sched is None else sched.state_dict(),
                    "callbacks": _callback_states(callbacks), "rng": rng, "history": result.history,
                    "config": asdict(cfg), "world_size": world,
                }
                if rng_ranks is not None:
                    state["rng_ranks"] = rng_ranks
            _save_from_rank0(checkpoint, state, ddp)
    if test_data is not None:
        result.final = (_evaluate_sharded(model, test_data, cfg.eval_batch_size, dev, cfg.crop) if ddp else
                        evaluate(model, test_data, batch_size=cfg.eval_batch_size, device=dev, crop=cfg.crop))
    del step_module  # releases DDP's gradient hooks on the model's parameters
    return result
