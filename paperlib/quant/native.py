"""Native CPU kernels of the standardising quantizers: ClimbQ's Gaussian-CDF weight and activation
quantizers and LifeQuant's "standardize" weight quantizer, from ``paperlib/quant_kernel.c``.

Why: on a CPU the torch path of these quantizers is a chain of small elementwise ops per layer (erf, round,
scalings) plus two per-layer reductions, and an autograd node per layer; at 8x8 inputs that chain costs as much
as the convolutions. The kernels do each pass in one sweep on torch's OpenMP threads and take all weight
tensors of a model in one call (``*_weights``), one autograd node for all of them.

What they compute: the same math as the torch paths, on the same per-tensor statistics: each weight tensor's mean
and unbiased std are torch's own ``w.mean()`` / ``w.std()`` (as the original code and the torch paths take them),
so LifeQuant's weights equal the torch path's bit for bit, also for tensors far from zero mean (e.g. weights +
3.7, where float64 sums rounded once would put a few values per million one level off). One difference remains,
below float resolution:
- ClimbQ's level ``round(n Phi(a))`` is exact: it counts the thresholds ``Phi^-1((i + 1/2) / n)`` (float64
  ``ndtri``, rounded up to the tensor's dtype) at or below ``a``. The torch path evaluates torch's ``erf``, whose
  CPU kernel is an approximation (absolute error up to ~1e-7), so the two can pick neighbouring levels for an
  ``a`` within about 1e-6 of a threshold; everywhere else the values are equal bit for bit.
Gradients are the analytic ones of the torch paths, with float64 accumulation of the per-tensor sums.

``PAPERLIB_QUANT_NATIVE=0`` disables the kernels; a failed build (no C compiler) falls back to the torch path
and :func:`native_status` says why.
"""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.special import ndtri
from torch import Tensor

from ..native import build_library, load_lazily, status
from .core import refuse_double_backward

DTYPES = (torch.float32, torch.float64)
_state: dict[str, Any] = {}


def _build() -> Any:
    lib = build_library("quant_kernel", ["quant_kernel.c", "native_math.h"])
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for sfx, ct in (("f32", ctypes.c_float), ("f64", ctypes.c_double)):
        sig = {
            "segment_mean_std": [i64, p, p, p, p, i32],
            "climbq_weights_forward": [i64, p, p, p, p, p, p, i32, i32],
            "lifequant_weights_forward": [i64, p, p, p, p, p, ct, i32, i32, i32],
            "standardized_weights_backward": [i64, p, p, p, p, p, p, i32, ct, i32],
            "climbq_act_forward": [i64, i64, p, p, p, p, i32, ct, ct, ct, i32],
            "climbq_act_backward": [i64, i64, p, p, p, ct, p, i32],
        }
        for name, args in sig.items():
            f = getattr(lib, f"{name}_{sfx}")
            f.argtypes, f.restype = args, i32
    return lib


def _lib() -> Any:
    """The loaded kernels, built on first use; None when disabled or unavailable (see :func:`native_status`)."""
    return load_lazily(_state, "PAPERLIB_QUANT_NATIVE", _build)


def native_status() -> dict[str, Any]:
    """``{"available": bool, "path": compiled library or None, "error": why not or None}`` (builds on first
    call)."""
    return status(_state, _lib())


def usable(*tensors: Tensor) -> bool:
    """Whether the kernels can take ``tensors``: CPU, float32/float64, one dtype, contiguous, kernels built."""
    t0 = tensors[0]
    return (all(t.device.type == "cpu" and t.dtype == t0.dtype and t.is_contiguous() for t in tensors)
            and t0.dtype in DTYPES and _lib() is not None)


def use_native(native: bool | None, *tensors: Tensor) -> bool:
    """``native=None``: the kernels when :func:`usable`; ``True``: the kernels or a clear error; ``False``: no."""
    if native is None:
        return usable(*tensors)
    if native and not usable(*tensors):
        why = native_status()["error"] or "it needs contiguous float32/float64 CPU tensors of one dtype"
        raise RuntimeError(f"native=True cannot run here ({why}); pass native=None to fall back to the torch path")
    return bool(native)


@functools.lru_cache(maxsize=64)
def _thresholds(n: int, dtype: torch.dtype) -> Tensor:
    """``Phi^-1((i + 1/2) / n)``, i < n, each rounded *up* to ``dtype``: then ``a >= t_i`` in ``dtype`` is exactly
    ``a >= Phi^-1((i + 1/2)/n)`` (float32; float64 to ndtri's accuracy)."""
    t = ndtri((np.arange(n, dtype=np.float64) + 0.5) / n)
    if dtype == torch.float32:
        t32 = t.astype(np.float32)
        t32 = np.where(t32.astype(np.float64) < t, np.nextafter(t32, np.float32(np.inf)), t32)
        return torch.from_numpy(t32.astype(np.float32))
    return torch.from_numpy(t)


def _sfx(t: Tensor) -> str:
    return "f32" if t.dtype == torch.float32 else "f64"


def _ptrs(ts: Sequence[Tensor]) -> Tensor:
    """The tensors' data pointers as an int64 tensor; keep it referenced while the kernel runs."""
    return torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64)


def _no_double_backward() -> None:
    refuse_double_backward("native quantizer kernels")


def _check(err: int) -> None:
    if err:
        raise MemoryError("paperlib quant kernel: out of memory for its scratch buffers")


def mean_std(ws: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Mean and unbiased std of each tensor (float64 sums, rounded to the dtype), as two [len(ws)] tensors.

    Not what the weight kernels use (they take :func:`torch_mean_std`, the original's statistics); kept as a
    float64 reference of the statistics."""
    lib, sfx = _lib(), _sfx(ws[0])
    mean = torch.empty(len(ws), dtype=ws[0].dtype)
    std = torch.empty_like(mean)
    sizes, wp = torch.tensor([w.numel() for w in ws], dtype=torch.int64), _ptrs(ws)  # alive during the call
    _check(getattr(lib, f"segment_mean_std_{sfx}")(len(ws), wp.data_ptr(), sizes.data_ptr(), mean.data_ptr(),
                                                   std.data_ptr(), torch.get_num_threads()))
    return mean, std


def torch_mean_std(ws: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Each tensor's ``w.mean()`` and ``w.std()`` (unbiased) as torch computes them, as two [len(ws)] tensors:
    the statistics of the original code and of the torch paths (``native=False``), bit for bit."""
    ds = [w.detach() for w in ws]
    return torch.stack([w.mean() for w in ds]), torch.stack([w.std() for w in ds])


@dataclass(frozen=True)
class _WeightsSpec:
    """What a :class:`_WeightsKernel` runs: ``<kernel>_forward`` and ``standardized_weights_backward``, called
    with the tensors, each tensor's mean and ``1/std`` (``reciprocal``) or std, then ``fwd_extra`` /
    ``bwd_extra`` (the backward's ``cdf`` flag and ``std``)."""

    kernel: str
    reciprocal: bool
    fwd_extra: tuple
    bwd_extra: tuple
    keep: Tensor | None = None  # a tensor whose pointer is in fwd_extra (kept alive here)


class _WeightsKernel(torch.autograd.Function):
    """Many weight tensors in one forward and one backward kernel call: one autograd node for all of them."""

    @staticmethod
    def forward(ctx, spec: _WeightsSpec, *ws: Tensor) -> tuple[Tensor, ...]:  # noqa: D102
        mean, sd = torch_mean_std(ws)
        second = sd.reciprocal() if spec.reciprocal else sd
        outs = [torch.empty_like(w) for w in ws]
        sizes, wp, op = torch.tensor([w.numel() for w in ws], dtype=torch.int64), _ptrs(ws), _ptrs(outs)
        _check(getattr(_lib(), f"{spec.kernel}_forward_{_sfx(ws[0])}")(
            len(ws), wp.data_ptr(), sizes.data_ptr(), op.data_ptr(), mean.data_ptr(), second.data_ptr(),
            *spec.fwd_extra, torch.get_num_threads()))
        ctx.save_for_backward(*ws)
        ctx.stats, ctx.sizes, ctx.spec = (mean, second), sizes, spec
        ctx.set_materialize_grads(False)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:  # noqa: D102
        _no_double_backward()
        ws = ctx.saved_tensors
        mean, second = ctx.stats
        gs = [torch.zeros_like(w) if g is None else g.contiguous() for g, w in zip(grads, ws, strict=True)]
        gws = [torch.empty_like(w) for w in ws]
        wp, gp, gwp = _ptrs(ws), _ptrs(gs), _ptrs(gws)
        _check(getattr(_lib(), f"standardized_weights_backward_{_sfx(ws[0])}")(
            len(ws), wp.data_ptr(), gp.data_ptr(), ctx.sizes.data_ptr(), gwp.data_ptr(), mean.data_ptr(),
            second.data_ptr(), *ctx.spec.bwd_extra, torch.get_num_threads()))
        return (None, *(None if g is None else gw for g, gw in zip(grads, gws, strict=True)))


def _run_weights(spec: _WeightsSpec, ws: Sequence[Tensor]) -> list[Tensor]:
    if torch.is_grad_enabled() and any(w.requires_grad for w in ws):
        return list(_WeightsKernel.apply(spec, *ws))
    with torch.no_grad():
        return list(_WeightsKernel.forward(_NoCtx(), spec, *ws))


def climbq_weights(ws: Sequence[Tensor], bits: int) -> list[Tensor]:
    """ClimbQ's ``2 U_k(Phi((w - mean w) / std w)) - 1`` of each tensor in one call (module docstring)."""
    n = 2**bits - 1
    thr = _thresholds(n, ws[0].dtype)
    return _run_weights(_WeightsSpec("climbq_weights", True, (thr.data_ptr(), n), (1, 0.0), thr), ws)


def lifequant_weights(ws: Sequence[Tensor], bits: int, std: float) -> list[Tensor]:
    """LifeQuant's ``Q_k(std (w - mean w) / std(w))`` (k >= 2, no clip) of each tensor in one call."""
    merged = int(math.frexp(std)[0] == 0.5)  # std a power of two: z std n == z (std n) exactly
    std = float(std)
    return _run_weights(_WeightsSpec("lifequant_weights", False, (std, merged, 2**bits - 1), (0, std)), ws)


class _NoCtx:
    """Stands in for the autograd context when a forward runs without autograd (nothing is saved)."""

    def save_for_backward(self, *tensors: Tensor) -> None:
        pass

    def set_materialize_grads(self, value: bool) -> None:
        pass


def _act_args(x: Tensor, rec: Tensor) -> tuple[int, Tensor]:
    """(elements per per-sample ``rec`` value, or 0 for one value; ``rec`` flat and contiguous)."""
    r = rec.detach().reshape(-1).to(x.dtype).contiguous()
    if r.numel() == 1:
        return 0, r
    if x.ndim == 0 or r.numel() != x.shape[0]:
        raise ValueError(f"rec has {r.numel()} values for a batch of {x.shape[0] if x.ndim else 0}")
    return x.numel() // max(x.shape[0], 1), r


class _ClimbQAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, rec: Tensor, n: int, act_range: float) -> Tensor:  # noqa: D102
        inner, r = _act_args(x, rec)
        out = torch.empty_like(x)
        if math.frexp(act_range)[0] == 0.5 and 2.0**-30 <= act_range <= 2.0**30:  # as the torch path's tail
            div, sub, mul = n / (2 * act_range), act_range, 1.0
        else:
            div, sub, mul = n / 2, 1.0, act_range
        thr = _thresholds(n, x.dtype)
        _check(getattr(_lib(), f"climbq_act_forward_{_sfx(x)}")(
            x.numel(), inner, x.data_ptr(), r.data_ptr(), out.data_ptr(), thr.data_ptr(), n,
            div, sub, mul, torch.get_num_threads()))
        ctx.save_for_backward(x, r)
        ctx.inner, ctx.act_range = inner, act_range
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:  # noqa: D102
        _no_double_backward()
        x, r = ctx.saved_tensors
        g = grad.contiguous()
        gx = torch.empty_like(x)
        _check(getattr(_lib(), f"climbq_act_backward_{_sfx(x)}")(
            x.numel(), ctx.inner, x.data_ptr(), g.data_ptr(), r.data_ptr(), ctx.act_range, gx.data_ptr(),
            torch.get_num_threads()))
        return gx, None, None, None


def climbq_activation(x: Tensor, rec: Tensor, bits: int, act_range: float) -> Tensor:
    """ClimbQ's ``R (2 U_k(Phi(x rec)) - 1)`` with ``rec = 1/sigma`` one value or one per sample."""
    n = 2**bits - 1
    if torch.is_grad_enabled() and x.requires_grad:
        return _ClimbQAct.apply(x, rec, n, float(act_range))
    with torch.no_grad():
        return _ClimbQAct.forward(_NoCtx(), x, rec, n, float(act_range))
