"""Several processes (``torchrun``): process group, collectives and the global statistics the methods need.

``torchrun --nproc_per_node=N -m paperlib train ...`` starts N processes with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment. :func:`init_distributed` reads them and
joins the process group (``gloo`` on CPU, ``nccl`` on CUDA, device from :func:`paperlib.device.resolve_device`,
one GPU per local rank); without them (a plain ``python`` process) nothing is initialised and every helper below
acts as the identity of a world of size 1, so single-process code runs unchanged.

:func:`paperlib.train.fit` wraps the model in ``DistributedDataParallel`` when a process group of more than one
process is up: every rank takes its contiguous shard of each *global* batch (the single-process batch), the
gradients are averaged with a per-rank weight ``n_rank * W / n_global`` so they equal the gradient of the
global-batch mean loss even for unequal shards. What the methods compute from a batch must then see the
global batch too:

- ClimbQ's per-sample sigma (batch class frequencies; original code: main.py) and HomoVar statistics (per-class
  sums, z, counts; original code: utils/lt_loss.py): ``SigmaScaling`` and ``HomoVarCriterion`` of
  :mod:`paperlib.climbq_experiment` gather the global batch's labels (and detached features and logits) with
  :func:`all_gather_cat`, which is the identity in a single process, and apply the result to the local shard;
- CBP's event rule reads the epoch's Lagrangian sum: :class:`SyncedCBP` all-reduces it, so every rank takes
  the same events and the same λ steps (λ itself only depends on the weights, which DDP keeps identical);
- LSQ's activation step is initialised from the first training batch: :func:`install_global_lsq_init` makes
  it the mean over the global batch (``fit`` installs it);
- per-class counts of a sharded dataset: :func:`global_class_counts` (LifeQuant/BaLL's counts come from the
  dataset, which every rank holds in memory, so they are global already);
- batch norm in train mode normalises with each rank's shard statistics, as in plain DDP; ``fit(...,
  sync_batchnorm=True)`` (CUDA only) trains with :func:`convert_sync_batchnorm`'s ``torch.nn.SyncBatchNorm``
  layers instead (global-batch statistics) and reverts them afterwards.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .callback import Callback
from .data.tensors import shard_bounds
from .device import DeviceLike, resolve_device

__all__ = [
    "DistInfo", "SyncedCBP", "all_gather_cat", "all_gather_object", "all_reduce", "barrier", "broadcast_buffers",
    "broadcast_object", "check_global_hooks", "convert_sync_batchnorm", "env_world_size", "global_class_counts",
    "group_up", "info", "init_distributed", "install_global_lsq_init", "is_distributed", "is_main", "lambda_digest",
    "local_only", "local_slice", "rank", "revert_sync_batchnorm", "session", "shard_bounds", "shutdown", "world_size",
]

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``, ``local_rank`` on its machine, the ``backend``
    (``None`` when single-process) and the training ``device``."""

    rank: int
    world_size: int
    local_rank: int
    backend: str | None
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when absent: a plain process)."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"WORLD_SIZE={raw!r} is not an integer; launch with torchrun --nproc_per_node=N") from None
    if n < 1:
        raise ValueError(f"WORLD_SIZE={n}: must be >= 1")
    return n


_local_depth = 0


def group_up() -> bool:
    """True when a process group of more than one process is initialised (whatever :func:`local_only` says)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_distributed() -> bool:
    """True when a process group of more than one process is initialised, outside :func:`local_only`."""
    return _local_depth == 0 and group_up()


@contextmanager
def local_only() -> Iterator[None]:
    """Within the block this process acts as a world of one (rank 0 of 1): every helper here, and the global
    ClimbQ/CBP/LSQ hooks, compute on local data without collectives. ``fit(distributed=False)`` inside a
    process group runs in it, so one rank can train alone while the others wait."""
    global _local_depth
    _local_depth += 1
    try:
        yield
    finally:
        _local_depth -= 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0 (or a single process): the one that writes runs/, figures/ and checkpoints."""
    return rank() == 0


def _device_for(device: DeviceLike, local_rank: int) -> torch.device:
    dev = resolve_device(device)
    if dev.type == "cuda":
        n = torch.cuda.device_count()
        if local_rank >= n:
            raise ValueError(f"LOCAL_RANK={local_rank} but this machine has {n} CUDA device(s): start at most "
                             f"{n} processes per node (torchrun --nproc_per_node={n}) or use --device cpu")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    return dev


def info(device: DeviceLike = None) -> DistInfo:
    """The :class:`DistInfo` of this process (does not initialise anything)."""
    local = int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0
    dev = resolve_device(device)
    if dev.type == "cuda" and is_distributed():
        dev = torch.device("cuda", local)
    backend = dist.get_backend() if is_distributed() else None
    return DistInfo(rank(), world_size(), local, backend, dev)


def init_distributed(device: DeviceLike = None, backend: str | None = None, timeout_s: float = 600.0) -> DistInfo:
    """Join the process group described by torchrun's environment; a no-op for a plain process.

    ``device``: ``"auto"``/``None`` (CUDA when present), ``"cpu"``, ``"cuda"``; with CUDA each process takes
    ``cuda:LOCAL_RANK``. ``backend`` defaults to ``nccl`` on CUDA and ``gloo`` on CPU. Already initialised:
    returns the current :class:`DistInfo`.
    """
    n = env_world_size()
    if is_distributed() or n == 1:
        return info(device)
    missing = [k for k in _ENV if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={n} but {missing} are not set: launch with "
                           "`torchrun --nproc_per_node=N -m paperlib train ...`, which sets them all")
    local = int(os.environ["LOCAL_RANK"])
    dev = _device_for(device, local)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    import datetime

    kwargs: dict[str, Any] = {"backend": backend, "init_method": "env://",
                              "timeout": datetime.timedelta(seconds=timeout_s)}
    if dev.type == "cuda":
        kwargs["device_id"] = dev
    dist.init_process_group(**kwargs)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, backend, dev)


def shutdown() -> None:
    """Leave the process group (after a barrier, so no rank exits while another still communicates)."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


@contextmanager
def session(device: DeviceLike = None) -> Iterator[DistInfo]:
    """``with session(device) as d:`` = :func:`init_distributed`, then :func:`shutdown` (also on errors, when
    this call initialised the group; an error skips the barrier so the other ranks time out instead of
    hanging on it forever)."""
    owned = not (dist.is_available() and dist.is_initialized())
    d = init_distributed(device)
    try:
        yield d
    except BaseException:
        if owned and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        raise
    if owned:
        shutdown()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


# --------------------------------------------------------------------------------------------- collectives


def all_reduce(t: Tensor, op: str = "sum") -> Tensor:
    """In-place all-reduce of ``t`` (``"sum"``, ``"max"``, ``"min"``, ``"mean"``); returns ``t``."""
    if op not in ("sum", "max", "min", "mean"):
        raise ValueError(f"op={op!r}: use 'sum', 'max', 'min' or 'mean'")
    if not is_distributed():
        return t
    red = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
           "min": dist.ReduceOp.MIN}[op]
    dist.all_reduce(t, op=red)
    if op == "mean":
        t.div_(dist.get_world_size())
    return t


def all_gather_cat(t: Tensor) -> tuple[Tensor, list[int]]:
    """Concatenate every rank's ``t`` along dim 0 in rank order (sizes may differ); ``(gathered, sizes)``.

    The result is detached (``all_gather`` carries no gradient). Single process: ``(t, [len(t)])``.
    """
    if not is_distributed():
        return t, [t.shape[0]]
    w = dist.get_world_size()
    n = torch.tensor([t.shape[0]], device=t.device, dtype=torch.long)
    ns = [torch.zeros_like(n) for _ in range(w)]
    dist.all_gather(ns, n)
    sizes = [int(v) for v in ns]
    m = max(sizes)
    pad = t.detach()
    if t.shape[0] < m:
        pad = torch.cat([pad, pad.new_zeros((m - t.shape[0], *t.shape[1:]))])
    parts = [torch.empty_like(pad) for _ in range(w)]
    dist.all_gather(parts, pad.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)]), sizes


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's (picklable) ``obj``, in rank order; ``[obj]`` in a single process."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def broadcast_buffers(model: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BN running statistics, counters) to every rank.

    With DDP each rank updates its BN running statistics from its own shard; rank 0's are the ones DDP
    broadcasts before the next forward, so ``fit`` calls this at every epoch end to evaluate and checkpoint
    one model.
    """
    if not is_distributed():
        return
    for b in model.buffers():
        dist.broadcast(b, src=src)


def local_slice(sizes: Sequence[int]) -> slice:
    r = rank()
    start = sum(sizes[:r])
    return slice(start, start + sizes[r])


def global_class_counts(labels: Tensor, num_classes: int) -> Tensor:
    """Per-class counts over every rank's ``labels`` (all-reduced ``bincount``), int64 [num_classes]."""
    counts = torch.bincount(labels.long(), minlength=num_classes)
    return all_reduce(counts, "sum")


# --------------------------------------------------------------------------------------------- SyncBatchNorm


BNSwap = tuple[nn.Module, str, nn.Module]


def convert_sync_batchnorm(model: nn.Module, process_group: Any = None) -> list[BNSwap]:
    """Replace every BatchNorm layer of ``model`` (in place) by ``torch.nn.SyncBatchNorm`` sharing its parameters
    and buffers (``SyncBatchNorm.convert_sync_batchnorm`` per layer). Returns ``[(parent, name, original)]`` for
    :func:`revert_sync_batchnorm`. ``model`` itself must not be a BN layer (it could not be replaced in place).
    SyncBatchNorm normalises with the statistics of the global batch, on CUDA only (torch)."""
    if isinstance(model, nn.modules.batchnorm._BatchNorm):
        raise TypeError("convert_sync_batchnorm converts the BN layers inside a model; the model itself is a BN "
                        "layer, which cannot be replaced in place: call torch.nn.SyncBatchNorm."
                        "convert_sync_batchnorm(layer) and use the layer it returns")
    swaps: list[BNSwap] = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
                setattr(parent, name, nn.SyncBatchNorm.convert_sync_batchnorm(child, process_group))
                swaps.append((parent, name, child))
    return swaps


def revert_sync_batchnorm(swaps: Sequence[BNSwap]) -> None:
    """Undo :func:`convert_sync_batchnorm`: put the original BN modules back, holding the SyncBatchNorm layers'
    current parameters and buffers (the same tensors: moved by ``.to()`` and trained in place) and train/eval
    mode."""
    for parent, name, original in reversed(list(swaps)):
        sync = getattr(parent, name)
        for key in original._parameters:  # noqa: SLF001 (re-point, do not copy: exactly the trained tensors)
            original._parameters[key] = sync._parameters[key]  # noqa: SLF001
        for key in original._buffers:  # noqa: SLF001
            original._buffers[key] = sync._buffers[key]  # noqa: SLF001
        original.train(sync.training)
        setattr(parent, name, original)


# --------------------------------------------------------------------------------------------- CBP


class SyncedCBP(Callback):
    """A :class:`paperlib.cbp.CBP` controller as a ``fit`` callback whose event rule sees the global L_sum.

    ``CBP.criterion`` accumulates this rank's Lagrangian per batch; at the epoch end the sums are averaged
    over ranks (the mean of equal-shard batch means is the global batch mean), so every rank takes the same
    event decision, the same ``g`` and the same λ step. Use ``fit(..., criterion=cbp.criterion,
    callbacks=[SyncedCBP(cbp)])``; in a single process it is ``callbacks=[cbp]``.
    """

    def __init__(self, cbp: Any) -> None:
        self.cbp = cbp

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.cbp.on_train_start(model, optimizer)

    def before_batch(self, model: nn.Module, x: Tensor, y: Tensor) -> None:
        self.cbp.before_batch(model, x, y)

    def after_backward(self, model: nn.Module) -> None:
        self.cbp.after_backward(model)

    def after_step(self, model: nn.Module) -> None:
        self.cbp.after_step(model)

    def on_epoch_end(self, epoch: int, stats: dict[str, Any]) -> None:
        local = self.cbp.lagrangian_sum
        if is_distributed() and local is not None:
            self.cbp.set_lagrangian_sum(all_reduce(local.detach().clone(), "mean"))
        self.cbp.on_epoch_end(epoch, stats)

    def state_dict(self) -> dict[str, Any]:
        return self.cbp.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cbp.load_state_dict(state)


def lambda_digest(cbp: Any) -> Tensor:
    """``[sum λ, sum λ², max λ, g]`` of a CBP controller (float64), to compare ranks."""
    lam = torch.cat([v.detach().reshape(-1).double() for v in cbp.lambdas])
    g = torch.tensor(float(cbp.g), dtype=torch.float64, device=lam.device)
    return torch.stack([lam.sum(), (lam * lam).sum(), lam.max(), g])


# --------------------------------------------------------------------------------------------- LSQ


def install_global_lsq_init(model: nn.Module) -> int:
    """Make every uninitialised :class:`paperlib.quant.LSQActivation` take its step from the *global* first
    training batch: ``2 mean|x| / sqrt(Q_P)`` with the mean over all ranks' inputs (sum and count
    all-reduced), via a one-shot forward pre-hook. Returns the number of hooks installed (0 when not
    distributed: the quantizer's own per-batch init is then already global)."""
    from .quant.lsq import LSQActivation, lsq_init_step

    if not is_distributed():
        return 0
    n = 0
    for m in model.modules():
        if not isinstance(m, LSQActivation) or bool(m.initialized) or m.bits >= 32:
            continue
        handle: list[Any] = []

        def hook(mod: nn.Module, args: tuple[Tensor, ...], handle: list[Any] = handle) -> None:
            if not mod.training or bool(mod.initialized):
                return
            x = args[0].detach()
            s = torch.stack([x.abs().sum().double(), torch.tensor(float(x.numel()), device=x.device,
                                                                  dtype=torch.float64)])
            all_reduce(s, "sum")
            mean_abs = (s[0] / s[1]).to(x.dtype).reshape(1)
            with torch.no_grad():
                mod.step.copy_(lsq_init_step(mean_abs, mod.bits, mod.signed))
                mod.initialized.fill_(True)
            handle[0].remove()

        handle.append(m.register_forward_pre_hook(hook))
        n += 1
    return n


# --------------------------------------------------------------------------------------------- checks


def check_global_hooks(criterion: Any, callbacks: Sequence[Any]) -> None:
    """Under DDP, refuse a bare CBP controller as a callback (its event rule would see this rank's loss sum only),
    naming the replacement. ClimbQ's ``SigmaScaling`` and ``HomoVarCriterion`` gather the global batch themselves
    (:func:`all_gather_cat`), so they need no replacement."""
    if not is_distributed():
        return
    import sys

    cbp_mod = sys.modules.get("paperlib.cbp")
    if cbp_mod is not None:
        for h in callbacks:
            if isinstance(h, cbp_mod.CBP):
                raise ValueError("a bare CBP callback would take its event decisions from this rank's loss "
                                 "sum, so λ could differ across ranks; under DDP pass "
                                 "callbacks=[paperlib.distributed.SyncedCBP(cbp)]")
