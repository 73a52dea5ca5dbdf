"""``python -m paperlib train``: train one method once, on one process or on several with ``torchrun``.

::

    python -m paperlib train --method climbq --bits 4 --epochs 10                # one process
    torchrun --nproc_per_node=2 -m paperlib train --method climbq --bits 4       # DDP, 2 processes

``--batch-size`` is the *global* batch: N processes each take 1/N of every batch of the same seeded permutation,
so a DDP run follows the single-process run (exactly, up to float summation order, for a model without
train-mode batch norm; BN statistics are per process, as with any DDP run without SyncBatchNorm). Each method is
built the way its notebook builds it (model topology, quantizers, criterion, callbacks), from paperlib's own
functions; the global statistics come from :mod:`paperlib.distributed`. Only rank 0 writes ``--out``
(``metrics.json``, ``model.pt``).

Methods: ``fp32`` (cross entropy), ``uniform`` (DoReFa weights + clipped activations, the quickstart's
baseline), ``lsq`` (LSQ weights and activations), ``climbq`` (Gaussian-CDF quantizers, per-sample sigma from the
batch class frequencies, HomoVar loss with the dataset counts; ``--climbq-loss ce`` for ClimbQ+CE), ``lifequant``
(LifeQuant quantizers, BaLL loss with the training-set class counts; with ``--fp-epochs`` > 0 ProxQ's penalty
``λ Σ F (θ - θ_old)²`` anchored at the quantized FP32 start, λ = ``--lam``, default the notebook's 100, importance
``F`` from the training set after the start's BN statistics are re-estimated for its quantizers), ``cbp``
(constrained backpropagation, ``--cbp-mode``), ``dgms`` (K = 2^bits Gaussian-mixture weight sharing, OneCycle).
``--fp-epochs N`` first trains the FP32 network N epochs (same data, same process group), then quantizes it:
the paper methods are fine-tuning methods.

``--checkpoint`` saves both stages every epoch under ``<out>/checkpoints/``; ``--resume --out DIR`` continues an
interrupted run from there (same arguments; checked against ``checkpoints/args.json``) and ends with the same
model as an uninterrupted run, on one process or under torchrun. ``--sync-bn`` trains with
``torch.nn.SyncBatchNorm`` under DDP (CUDA only; on a CPU it stops with an error).

Faults: every flag is checked before any work; ``--out`` is checked to be a writable folder before training and is
locked for the run (``<out>/.train.lock``, ``fcntl.flock``: a second run on the same folder stops at once, naming
the process that holds it). Every file (checkpoints, ``checkpoints/args.json``, ``model.pt``, ``metrics.json``) is
written atomically (:mod:`paperlib.atomic`), ``model.pt`` before ``metrics.json``: a folder with ``metrics.json``
holds a complete run. A full disk or a read-only folder stops the run with one line naming the file (exit status
1; the last checkpoint is kept); a damaged checkpoint or ``args.json`` stops ``--resume`` with one line naming the
file and the fix (exit status 2).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import errno
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .atomic import WriteError, atomic_torch_save, atomic_write_text, check_writable, describe_os_error

if TYPE_CHECKING:  # the heavy imports happen when a run starts, so `python -m paperlib --help` stays fast
    import torch
    from torch import Tensor, nn

    from .data.tensors import InMemoryData
    from .train import Callback, CheckpointError

METHODS = ("fp32", "uniform", "lsq", "climbq", "lifequant", "cbp", "dgms")
DATASETS = ("digits", "cifar10", "cifar100", "manifest")
#: the topology each method's notebook uses (act_position, shortcut)
TOPOLOGY: dict[str, dict[str, str]] = {
    "fp32": {"shortcut": "B", "act_position": "post_relu"},  # quickstart
    "uniform": {"shortcut": "B", "act_position": "post_relu"},  # quickstart
    "lsq": {"shortcut": "B", "act_position": "post_relu"},  # benchmarks
    "climbq": {"shortcut": "B", "act_position": "pre_relu"},  # climbq_experiment.model_kwargs
    "lifequant": {"shortcut": "A", "act_position": "pre_relu"},  # lifequant digits experiment
    "cbp": {"shortcut": "B", "act_position": "post_relu"},  # weights only
    "dgms": {"shortcut": "A", "act_position": "post_relu"},  # dgms.MODEL_KWARGS
}
#: defaults when the command line leaves them out: bits and weight decay of each method's notebook
DEFAULT_BITS = {"fp32": 32, "uniform": 4, "lsq": 4, "climbq": 4, "lifequant": 4, "cbp": 2, "dgms": 4}
DEFAULT_WD = {"fp32": 5e-4, "uniform": 5e-4, "lsq": 5e-4, "climbq": 1e-4, "lifequant": 1e-4, "cbp": 1e-4,
              "dgms": 5e-4}
CBP_MODE_OF_BITS = {1: "bin", 2: "ter"}


class CLIError(ValueError):
    """Bad command-line input (exit status 2)."""


@dataclass
class MethodSetup:
    """What :func:`fit` needs for one method, plus what to report afterwards."""

    model: nn.Module
    criterion: Callable[[nn.Module, Tensor, Tensor], Tensor] | None = None  # None: cross entropy
    callbacks: list[Callback] = field(default_factory=list)
    optimizer: torch.optim.Optimizer | None = None
    scheduler: str | None = None  # overrides TrainConfig.scheduler (e.g. "none" when a callback owns the lr)
    info: Callable[[], dict[str, Any]] = dict
    digest: Callable[[], list[float]] = list  # per-rank state to compare across ranks (e.g. CBP's λ)


# --------------------------------------------------------------------------------------------- data


def load_data(dataset: str, data_dir: str, image_size: int | None, device: torch.device) -> tuple[InMemoryData,
                                                                                                 InMemoryData]:
    """``(train, test)`` in memory: ``digits`` (embedded, 1 channel), ``cifar10``/``cifar100`` (torchvision
    folders under ``data_dir``) or ``manifest`` (``data_dir/train.csv`` and ``data_dir/test.csv`` with
    ``image,label`` rows, test normalised with the train statistics)."""
    if dataset == "manifest":
        from .data.manifest import load_manifest_tensors

        root = Path(data_dir) if data_dir else None
        if root is None or not (root / "train.csv").is_file() or not (root / "test.csv").is_file():
            raise CLIError(f"--dataset manifest needs --data-dir with train.csv and test.csv (image,label rows, "
                           f"image paths relative to it); got --data-dir {data_dir!r}")
        size = image_size or 32
        train = load_manifest_tensors(root / "train.csv", root, size, device=device)
        k = train.num_classes
        test = load_manifest_tensors(root / "test.csv", root, size, mean=train.mean, std=train.std, device=device,
                                     num_classes=k)
        return train, test
    from .data.load import load_dataset

    return load_dataset(dataset, data_dir or None, size=image_size, channels=1 if dataset == "digits" else 3,
                        device=device)


# --------------------------------------------------------------------------------------------- builders


def _build_model(args: argparse.Namespace, train: InMemoryData) -> nn.Module:
    import torch

    from .models import create_model

    kwargs = {"num_classes": train.num_classes, "in_channels": train.x.shape[1], **TOPOLOGY[args.method]}
    if not args.model.startswith("resnet") or args.model in ("resnet18", "resnet50"):
        kwargs.pop("shortcut")  # only the CIFAR ResNets take the shortcut option
    torch.manual_seed(args.seed)  # the initial weights depend on the seed only
    try:
        return create_model(args.model, **kwargs)
    except TypeError as e:
        raise CLIError(f"--model {args.model} cannot be built with {kwargs}: {e}; use a CIFAR ResNet "
                       "(resnet8/20/32/56)") from None


def _setup_fp32(model: nn.Module, args: argparse.Namespace, train: InMemoryData) -> MethodSetup:
    return MethodSetup(model)


def _setup_uniform(model: nn.Module, args: argparse.Namespace, train: InMemoryData) -> MethodSetup:
    from .quickstart import uniform_qat

    return MethodSetup(uniform_qat(model, args.bits, args.act_clip))


def _setup_lsq(model: nn.Module, args: argparse.Namespace, train: InMemoryData) -> MethodSetup:
    from .quant import LSQActivation, LSQWeight, quantize_model

    q = quantize_model(model, weight=lambda layer: LSQWeight(args.bits, layer.weight),
                       activation=lambda: LSQActivation(args.bits), skip="first_last")
    return MethodSetup(q)


def _setup_climbq(model: nn.Module, args: argparse.Namespace, train: InMemoryData) -> MethodSetup:
    from .climbq_experiment import _COMMON, CLIMBQ_CE, CLIMBQ_HV, HomoVarCriterion, SigmaScaling, quantize_for_method

    cfg = dict(_COMMON)
    q = quantize_for_method(model, CLIMBQ_HV if args.climbq_loss == "homovar" else CLIMBQ_CE, args.bits, cfg)
    sigma = SigmaScaling(train.num_classes, cfg["sigma_mode"])
    callbacks: list[Callback] = [sigma]
    criterion: Any = None
    hv = None
    if args.climbq_loss == "homovar":
        hv = HomoVarCriterion(train.class_counts(), cfg["alpha"], cfg["beta"], cfg["homovar_base"])
        criterion = hv
        callbacks.append(hv)

    def info() -> dict[str, Any]:
        out: dict[str, Any] = {"loss": args.climbq_loss, "sigma_max_deviation": sigma.max_deviation,
                               "class_counts": train.class_counts()}
        if hv is not None:
            out["homovar_last_epoch"] = hv.last_epoch
        return out

    return MethodSetup(q, criterion, callbacks, info=info)


def prox_stability(importance: dict[str, Tensor], lam: float, lr: float, momentum: float,
                   weight_decay: float = 0.0) -> float:
    """``lr · (2 λ max F + weight_decay)``: the largest step-size-times-curvature of ProxQ's penalty
    ``λ Σ F (θ - θ_old)²`` under SGD. Heavy-ball SGD on a quadratic is stable only below ``2 (1 + momentum)``;
    above it the penalty alone makes the most important weights oscillate with growing amplitude (the loss goes
    to inf within a few batches), so this raises :class:`CLIError` naming the largest stable ``--lam``."""
    f_max = max((float(f.max()) for f in importance.values() if f.numel()), default=0.0)
    value = lr * (2 * lam * f_max + weight_decay)
    bound = 2 * (1 + momentum)
    if value >= bound:
        lam_max = (bound / lr - weight_decay) / (2 * f_max)
        raise CLIError(f"--lam {lam:g}: ProxQ's penalty λ·F·(θ-θ_old)² has curvature 2·λ·max F = "
                       f"{2 * lam * f_max:.4g} (max F = {f_max:.4g}); SGD with --lr {lr:g} and --momentum "
                       f"{momentum:g} diverges on it when lr × curvature >= 2(1 + momentum) = {bound:g} (here "
                       f"{value:.4g}); use --lam below {lam_max:.4g} or a smaller --lr")
    return value


def _setup_lifequant(model: nn.Module, args: argparse.Namespace, train: InMemoryData) -> MethodSetup:
    import torch

    from .batchnorm import recalibrate_bn
    from .data.tensors import TensorLoader
    from .lifequant import LifelongCriterion, LifelongSchedule, LossMonitor, ball_scale, class_counts
    from .lifequant.ball import BaLLLoss
    from .lifequant.prox import method_importance, snapshot

    LifelongSchedule().quantize(model, args.bits, args.bits)
    counts = class_counts(train.y)  # the whole training set: every rank holds it, so these are global counts
    loss_fn = BaLLLoss(ball_scale(counts), "log")
    old = imp = None
    lam = 0.0
    recal_batches = 0
    curvature = 0.0
    if args.fp_epochs > 0 and args.lam > 0:  # ProxQ anchored at the pretrained start, as at a new task
        if args.bn_recalibrate:
            # F is taken in eval mode (original code: utils/lifelong.py): the running statistics must be those of
            # the quantized net, not the FP32 net's (the quantizers standardise the weights: stale statistics give a
            # chance-level net whose squared gradients are ~1e4 too large, and SGD diverges on λ F (θ - θ_old)², see
            # prox_stability)
            recal_batches = recalibrate_bn(model, train, batch_size=args.batch_size)
        loader = TensorLoader(train, args.batch_size, shuffle=True, seed=args.seed * 1000 + 99)
        gen = torch.Generator().manual_seed(args.seed * 1000 + 199)
        imp = method_importance("ours", model, [loader], loss_fn=loss_fn, generator=gen)
        old = snapshot(model)
        lam = args.lam
        curvature = prox_stability(imp, lam, args.lr, args.momentum, args.weight_decay)
    criterion = LifelongCriterion(loss_fn, old, imp, lam, bits=args.bits)

    def info() -> dict[str, Any]:
        return {"ball_scale": {str(k): v for k, v in ball_scale(counts).items()}, "lambda": lam,
                "prox_penalty": imp is not None, "bn_recalibrated_batches": recal_batches,
                "prox_lr_curvature": curvature}

    return MethodSetup(model, criterion, [LossMonitor(criterion)], info=info)


def _setup_cbp(model: nn.Module, args: argparse.Namespace, train: InMemoryData) -> MethodSetup:
    import torch

    from . import distributed as pdist
    from .cbp import CBP

    mode = args.cbp_mode or CBP_MODE_OF_BITS.get(args.bits)
    if mode is None:
        raise CLIError(f"--method cbp with --bits {args.bits}: CBP's sets are bin (1 bit), ter (2), 1bit, 2bit; "
                       "pass --cbp-mode {bin,ter,1bit,2bit} or --bits 1/2")
    cbp = CBP(model, mode)
    opt = torch.optim.SGD(cbp.param_groups(args.weight_decay), lr=args.lr, momentum=args.momentum)

    def info() -> dict[str, Any]:
        return {"mode": mode, "g": cbp.g, "events": cbp.events, **cbp.metrics()}

    def digest() -> list[float]:
        return [float(v) for v in pdist.lambda_digest(cbp)]

    return MethodSetup(model, cbp.criterion, [pdist.SyncedCBP(cbp)], optimizer=opt, scheduler="none",
                       info=info, digest=digest)


def _setup_dgms(model: nn.Module, args: argparse.Namespace, train: InMemoryData) -> MethodSetup:
    from . import distributed as pdist
    from .data.tensors import TensorLoader
    from .dgms import OneCycle, quantize_dgms

    k = 2 ** args.bits
    q = quantize_dgms(model, k, seed=args.seed)
    shard = (pdist.rank(), pdist.world_size()) if pdist.is_distributed() else None
    steps = len(TensorLoader(train, args.batch_size, shard=shard))
    return MethodSetup(q, callbacks=[OneCycle(args.lr, args.epochs * steps)], scheduler="none",
                       info=lambda: {"num_components": k})


BUILDERS: dict[str, Callable[[nn.Module, argparse.Namespace, InMemoryData], MethodSetup]] = {
    "fp32": _setup_fp32, "uniform": _setup_uniform, "lsq": _setup_lsq, "climbq": _setup_climbq,
    "lifequant": _setup_lifequant, "cbp": _setup_cbp, "dgms": _setup_dgms,
}


# --------------------------------------------------------------------------------------------- run


def _jsonable(v: Any) -> Any:
    from torch import Tensor

    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, Tensor):
        return _jsonable(v.detach().cpu().tolist())
    if isinstance(v, bool) or v is None or isinstance(v, str | int):
        return v
    if hasattr(v, "item"):
        return _jsonable(v.item())
    if isinstance(v, float):
        return v
    return str(v)


def state_digest(model: nn.Module) -> str:
    """sha256 (16 hex digits) of the model's state dict bytes: equal on every rank after DDP training."""
    import torch
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def default_out(method: str) -> Path:
    from . import paths

    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return paths.runs_dir() / "train" / f"{stamp}-{method}"


#: arguments that may differ between an interrupted run and its --resume (they do not change the computation)
RESUME_FREE_ARGS = ("out", "resume", "checkpoint", "progress", "threads", "save_model", "device", "command", "func")


def _checkpoint_dir(args: argparse.Namespace, out: Path, is_main: bool) -> Path | None:
    """``<out>/checkpoints`` when ``--checkpoint``/``--resume``, else None. Rank 0 writes ``args.json`` there
    (the arguments that shape the run) or, when resuming, compares it with this run's; every rank raises the
    same :class:`CLIError` on a mismatch."""
    if not (args.checkpoint or args.resume):
        return None
    from . import distributed as pdist

    ckdir = out / "checkpoints"
    mine = {k: v for k, v in sorted(vars(args).items())
            if k not in RESUME_FREE_ARGS and (v is None or isinstance(v, str | int | float))}
    problem = None
    if is_main:
        saved_file = ckdir / "args.json"
        if args.resume and saved_file.is_file():
            saved, problem = _read_saved_args(saved_file, ckdir)
            diff = [] if saved is None else sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
            if diff:
                shown = ", ".join(f"{k}: {saved.get(k)!r} -> {mine.get(k)!r}" for k in diff)
                problem = (f"--resume: the checkpoints in {ckdir} were made with other arguments ({shown}); "
                           "resume with the interrupted run's arguments, or use another --out")
        elif not args.resume and any(ckdir.glob("*.pt")):
            problem = (f"{ckdir} already holds checkpoints: pass --resume to continue that run, or use another "
                       "--out")
        if problem is None:
            try:
                atomic_write_text(saved_file, json.dumps(mine, indent=1, sort_keys=True))
            except WriteError as e:
                problem = str(e)
    problem = pdist.broadcast_object(problem)
    if problem is not None:
        raise CLIError(problem)
    return ckdir


def _read_saved_args(saved_file: Path, ckdir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(arguments, None)`` from ``checkpoints/args.json``, or ``(None, problem)`` when it is not a JSON object."""
    try:
        saved = json.loads(saved_file.read_text(encoding="utf-8"))
        if not isinstance(saved, dict):
            raise ValueError(f"a JSON {type(saved).__name__}, not an object")
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        cause = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        return None, (f"--resume: cannot read {saved_file} ({cause}); it records the interrupted run's arguments: "
                      f"delete {ckdir} to start over, or use another --out")
    return saved, None


#: the lock file that marks an --out folder as in use by a run (removed when the run ends)
LOCK_NAME = ".train.lock"


def _lock_out(out: Path) -> int | None:
    """Take an exclusive ``fcntl.flock`` on ``<out>/.train.lock`` and write who holds it; returns the open file
    descriptor (the lock lasts until it is closed). Another run holding it: :class:`CLIError` naming it. A file
    system without locks: a warning, and None (the run goes on unlocked)."""
    import fcntl
    import socket

    path = out / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 300).decode("utf-8", "replace").strip() or "a process that is just starting"
            os.close(fd)
            raise CLIError(f"--out {out} is in use by another `paperlib train` run ({holder}): wait for it to "
                           "finish, or use another --out") from None
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
                raise
            print(f"warning: {out} cannot be locked ({e.strerror}); make sure no other run uses this --out",
                  file=sys.stderr)
            return None
        try:  # the file locked must still be the one at the path (a run that just ended removes it)
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    stamp = _dt.datetime.now().isoformat(timespec="seconds")
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {stamp}".encode())
    return fd


def _unlock_out(out: Path, fd: int | None) -> None:
    if fd is None:
        return
    try:
        (out / LOCK_NAME).unlink(missing_ok=True)  # while still holding the lock: see the check in _lock_out
    finally:
        os.close(fd)


def _remove_stale_temps(out: Path) -> list[Path]:
    """Remove the temp files (``.<name>.<random>.tmp``, :func:`paperlib.atomic.atomic_write`) that a run killed in
    the middle of a write left in ``out`` and ``out/checkpoints`` (call with the lock held: no other writer)."""
    stale = [p for d in (out, out / "checkpoints") if d.is_dir() for p in d.glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


@contextmanager
def claim_out(out: Path, is_main: bool) -> Iterator[None]:
    """Before any work: rank 0 makes sure ``out`` is a folder it can write (:func:`paperlib.atomic.check_writable`,
    created when missing) and locks it for the run (:func:`_lock_out`); every rank raises the same
    :class:`CLIError` when it cannot. Temp files of writes that a killed run left are removed. On leaving, the lock
    file goes, and a folder this run created is removed again when the run failed before writing anything into it.
    """
    from . import distributed as pdist

    problem, fd, created = None, None, False
    if is_main:
        created = not out.exists()
        try:
            check_writable(out, "--out")
            fd = _lock_out(out)
            _remove_stale_temps(out)
        except (WriteError, CLIError) as e:
            problem = str(e)
        except OSError as e:  # the lock file itself (a file system that refuses it)
            problem = f"--out {out} cannot be locked: {describe_os_error(e)}"
        if problem is not None and created:
            _remove_if_empty(out)
    problem = pdist.broadcast_object(problem)
    if problem is not None:
        raise CLIError(problem)
    finished = False
    try:
        yield
        finished = True
    finally:
        if is_main:
            _unlock_out(out, fd)
            if created and not finished:
                _remove_if_empty(out)


def _resume_problem(e: CheckpointError, ckdir: Path | None) -> CLIError:
    where = ckdir if ckdir is not None else e.path.parent
    return CLIError(f"--resume: cannot read checkpoint {e.path}: {e.problem}; delete {where} to start the run "
                    "over, or use another --out")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train ``args.method`` (in the process group when launched by torchrun); returns the metrics dict on
    every rank; rank 0 writes ``args.out``."""
    from . import distributed as pdist
    from .device import cpu_threads

    with pdist.session(args.device) as d, cpu_threads(args.threads):
        t0 = time.perf_counter()
        dev = d.device
        if args.sync_bn and dev.type != "cuda":
            raise CLIError(f"--sync-bn needs CUDA: torch.nn.SyncBatchNorm only runs on GPU tensors, and this run "
                           f"trains on {dev} ({d.backend or 'one process'}); use --device cuda with one GPU per "
                           "process, or leave out --sync-bn (BN then normalises with each process's own batch "
                           "statistics)")
        out = Path(pdist.broadcast_object(str(Path(args.out).expanduser() if args.out else default_out(args.method))))
        with claim_out(out, d.is_main):
            return _run_claimed(args, d, out, t0)


def _run_claimed(args: argparse.Namespace, d: Any, out: Path, t0: float) -> dict[str, Any]:
    """:func:`run` once ``out`` is checked and locked: train, then rank 0 writes ``model.pt`` and, last,
    ``metrics.json`` (atomically; a failed write stops every rank with the same one-line ``WriteError``)."""
    from . import distributed as pdist
    from .runs import write_json
    from .train import CheckpointError, TrainConfig, cross_entropy, fit

    dev = d.device
    ckdir = _checkpoint_dir(args, out, d.is_main)
    train, test = load_data(args.dataset, args.data_dir, args.image_size, dev)
    if args.batch_size < d.world_size:
        raise CLIError(f"--batch-size {args.batch_size} is the global batch: it must be >= the number of "
                       f"processes ({d.world_size})")
    model = _build_model(args, train)
    pre_history: list[dict[str, Any]] = []
    try:
        if args.fp_epochs > 0:
            fp_cfg = TrainConfig(epochs=args.fp_epochs, lr=args.fp_lr, batch_size=args.batch_size,
                                 seed=args.seed, augment=args.augment, momentum=args.momentum,
                                 weight_decay=DEFAULT_WD["fp32"], **_gpu_options(args))
            pre_history = fit(model, train, None, fp_cfg, device=dev, progress=args.progress,
                              checkpoint=None if ckdir is None else ckdir / "fp32.pt", resume=args.resume,
                              sync_batchnorm=args.sync_bn).history
        setup = BUILDERS[args.method](model, args, train)
        cfg = TrainConfig(epochs=args.epochs, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                          batch_size=args.batch_size, seed=args.seed, augment=args.augment,
                          scheduler=setup.scheduler or args.scheduler, **_gpu_options(args))
        res = fit(setup.model, train, test, cfg, criterion=setup.criterion or cross_entropy,
                  callbacks=setup.callbacks, optimizer=setup.optimizer, device=dev, progress=args.progress,
                  checkpoint=None if ckdir is None else ckdir / f"{args.method}.pt", resume=args.resume,
                  sync_batchnorm=args.sync_bn)
    except CheckpointError as e:
        raise _resume_problem(e, ckdir) from None
    digest = {"rank": d.rank, "state": state_digest(setup.model), "method_state": setup.digest()}
    digests = pdist.all_gather_object(digest)
    final = {k: res.final[k] for k in ("top1", "balanced_accuracy", "loss", "per_class_accuracy")}
    metrics = {
        "method": args.method, "dataset": args.dataset, "model": args.model, "bits": args.bits,
        "world_size": d.world_size, "backend": d.backend, "device": str(dev), "seed": args.seed,
        "global_batch_size": args.batch_size, "epochs": args.epochs, "fp_epochs": args.fp_epochs,
        "data_fingerprint": train.fingerprint(), "final": final,
        "key_metric": {"name": "test top-1", "value": final["top1"]},
        "history": res.history, "fp32_history": pre_history, "method_info": setup.info(),
        "ranks": digests,
        "consistent_across_ranks": {
            "state": len({r["state"] for r in digests}) == 1,
            "method_state": len({json.dumps(r["method_state"]) for r in digests}) == 1,
        },
        "args": vars(args), "wall_s": time.perf_counter() - t0,
    }
    metrics = _jsonable(metrics)
    problem = None
    if d.is_main:
        metrics["out"] = str(out)
        try:  # the model first: a folder with metrics.json holds a complete run
            if args.save_model:
                atomic_torch_save(out / "model.pt",
                                  {k: v.detach().cpu() for k, v in setup.model.state_dict().items()})
            write_json(out / "metrics.json", metrics)
        except WriteError as e:
            problem = str(e)
    problem = pdist.broadcast_object(problem)
    if problem is not None:
        raise WriteError(problem)
    return metrics


def _gpu_options(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig options of the GPU path (``--amp``, ``--channels-last``, ``--compile``)."""
    opts = {"amp": args.amp, "channels_last": args.channels_last}
    return opts if args.compile is None else {**opts, "compile": args.compile}  # None: $PAPERLIB_COMPILE


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    from .compiled import MODES as compile_modes

    p = parser or argparse.ArgumentParser(prog="python -m paperlib train", description=__doc__,
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--dataset", default="digits", choices=DATASETS)
    p.add_argument("--data-dir", default="", help="folder of cifar10/cifar100/manifest data (never downloaded)")
    p.add_argument("--image-size", type=int, default=None, help="resize images (digits: 8 default)")
    p.add_argument("--model", default="resnet20", help="resnet8/20/32/56 (the CIFAR ResNets)")
    p.add_argument("--bits", type=int, default=None, help="weight/activation bits (default per method)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128, help="the GLOBAL batch, split over the processes")
    p.add_argument("--lr", type=float, default=None, help="default 0.05 (lifequant 0.01, cbp 3e-3, dgms 2e-4)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=None, help="default per method (1e-4 or 5e-4)")
    p.add_argument("--scheduler", default="cosine", choices=["cosine", "none"])
    p.add_argument("--augment", action="store_true", help="random crop + flip")
    p.add_argument("--fp-epochs", type=int, default=0, help="FP32 pretraining epochs before quantizing")
    p.add_argument("--fp-lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per process (0: torch's default)")
    p.add_argument("--out", default="", help="output folder (default runs/train/<timestamp>-<method>)")
    p.add_argument("--no-save-model", dest="save_model", action="store_false", help="do not write model.pt")
    p.add_argument("--progress", action="store_true", help="tqdm bars on rank 0")
    p.add_argument("--act-clip", type=float, default=4.0, help="uniform: activation clip")
    p.add_argument("--climbq-loss", default="homovar", choices=["homovar", "ce"])
    p.add_argument("--lam", type=float, default=None,
                   help="lifequant: ProxQ's lambda, penalty anchored at the quantized --fp-epochs start (default: the "
                        "notebook's 100 with --fp-epochs > 0, else 0 = off)")
    p.add_argument("--no-bn-recalibrate", dest="bn_recalibrate", action="store_false",
                   help="lifequant with lambda > 0: keep the FP32 net's BN statistics when computing ProxQ's "
                        "importance (they do not fit the quantized net: F is then ~1e4 too large and SGD diverges)")
    p.add_argument("--checkpoint", action="store_true",
                   help="save both stages every epoch under <out>/checkpoints/ (for --resume)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted --checkpoint run from <out>/checkpoints/ (needs --out and the same "
                        "arguments; starts fresh when there is no checkpoint yet)")
    p.add_argument("--sync-bn", action="store_true",
                   help="under torchrun: torch.nn.SyncBatchNorm (global-batch BN statistics); CUDA only")
    p.add_argument("--cbp-mode", default=None, choices=["bin", "ter", "1bit", "2bit"])
    p.add_argument("--amp", default="none", choices=["none", "bf16"], help="autocast the training forward")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format (faster convolutions on GPUs)")
    p.add_argument("--compile", default=None, choices=["none", *compile_modes],
                   help="torch.compile the model (reduce-overhead: CUDA graphs on a GPU; on a CPU eager is as fast); "
                        "default: $PAPERLIB_COMPILE, else none")
    return p


#: the real-valued flags: (attribute, lowest value, whether the lowest is excluded, highest (excluded), meaning)
REAL_FLAGS = (
    ("lr", 0.0, True, None, "the learning rate"),
    ("fp_lr", 0.0, True, None, "the FP32 stage's learning rate"),
    ("momentum", 0.0, False, 1.0, "SGD's momentum"),
    ("weight_decay", 0.0, False, None, "the weight decay"),
    ("act_clip", 0.0, True, None, "the uniform method's activation clip"),
    ("lam", 0.0, False, None, "LifeQuant's ProxQ lambda"),
)


def _check_real_flag(args: argparse.Namespace, name: str, low: float, low_open: bool, high: float | None,
                     meaning: str) -> None:
    v = getattr(args, name)
    ok = math.isfinite(v) and (v > low if low_open else v >= low) and (high is None or v < high)
    if not ok:
        rng = f"{'>' if low_open else '>='} {low:g}" + ("" if high is None else f" and < {high:g}")
        raise CLIError(f"--{name.replace('_', '-')} {v!r}: {meaning} must be a finite number {rng}")


def _finish_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the per-method defaults and check every flag (name, range) before any work: :class:`CLIError`."""
    if args.bits is None:
        args.bits = DEFAULT_BITS[args.method]
    if args.lr is None:
        args.lr = {"dgms": 2e-4, "cbp": 3e-3, "lifequant": 0.01}.get(args.method, 0.05)
    if args.weight_decay is None:
        args.weight_decay = DEFAULT_WD[args.method]
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.fp_epochs < 0:
        raise CLIError(f"--fp-epochs must be >= 0, got {args.fp_epochs}")
    if args.image_size is not None and args.image_size < 1:
        raise CLIError(f"--image-size {args.image_size}: give the image side in pixels (>= 1), or leave it out for "
                       "the dataset's own size (digits 8, CIFAR 32)")
    if args.threads < 0:
        raise CLIError(f"--threads {args.threads}: give the torch CPU threads per process (>= 1), or 0 for torch's "
                       "default")
    if not 1 <= args.bits <= 32:
        raise CLIError(f"--bits {args.bits}: give 1 to 32 bits (32: full precision)")
    if args.lam is None:
        from .lifequant.prox import DEFAULT_LAMBDA

        args.lam = DEFAULT_LAMBDA if args.method == "lifequant" and args.fp_epochs > 0 else 0.0
    for flag in REAL_FLAGS:
        _check_real_flag(args, *flag)
    if args.lam > 0 and args.method != "lifequant":
        raise CLIError(f"--lam is LifeQuant's ProxQ lambda: it applies to --method lifequant, not {args.method}")
    if args.lam > 0 and args.fp_epochs == 0:
        raise CLIError("--lam > 0 anchors ProxQ's penalty at the FP32 start: pass --fp-epochs N (N > 0), or --lam 0")
    if args.resume and not args.out:
        raise CLIError("--resume continues the run in --out DIR (its checkpoints/ folder): pass the --out of the "
                       "interrupted run")
    if args.method == "fp32" and args.bits != 32:
        raise CLIError("--method fp32 trains full precision: leave out --bits (or pass 32)")
    if args.method == "cbp" and args.cbp_mode is None and args.bits not in CBP_MODE_OF_BITS:
        raise CLIError(f"--method cbp with --bits {args.bits}: CBP's sets are bin (1 bit), ter (2), 1bit, 2bit; "
                       "pass --cbp-mode {bin,ter,1bit,2bit} or --bits 1/2")
    from .models import MODELS

    if args.model not in MODELS:
        raise CLIError(f"--model {args.model}: unknown model; available: {sorted(MODELS)}")
    if args.dataset in ("cifar10", "cifar100") and not args.data_dir:
        raise CLIError(f"--dataset {args.dataset} needs --data-dir, the folder that holds the torchvision "
                       f"{'cifar-10-batches-py' if args.dataset == 'cifar10' else 'cifar-100-python'}/ folder")
    return args


def main(argv: Sequence[str] | None = None, args: argparse.Namespace | None = None) -> int:
    if args is None:
        args = build_parser().parse_args(argv)
    from .train import TrainingDiverged

    try:
        _finish_args(args)
        metrics = run(args)
    except (CLIError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (TrainingDiverged, WriteError) as e:  # WriteError: a full disk, a folder made read-only mid-run
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        again = ("; the last finished epoch is checkpointed: run the same command with --resume to continue"
                 if args.checkpoint or args.resume else "")
        print(f"interrupted{again}", file=sys.stderr)
        return 130
    if "out" in metrics:  # rank 0
        f = metrics["final"]
        print(f"{args.method}: test top-1 {100 * f['top1']:.2f} %, balanced {100 * f['balanced_accuracy']:.2f} %"
              f" ({metrics['world_size']} process(es), {metrics['wall_s']:.1f} s) -> {metrics['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
