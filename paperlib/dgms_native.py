"""The DGMS soft assignment's native CPU kernel (docs/dgms.md, 'Implementation'): build, cache and load
``dgms_kernel.c``.

The C source beside this module is compiled once per machine and CPU with the system C compiler and loaded
through ctypes; :mod:`paperlib.dgms` calls it through ``_DGMSNative`` and falls back to its torch path when
:func:`native_status` says the kernel is unavailable.
"""

from __future__ import annotations

from typing import Any

import torch

from .native import build_library, load_lazily, native_cache_dir, status

__all__ = ["native_cache_dir", "native_status"]

# ----------------------------------------------------------------------------------------------------------
# native CPU kernel: the same S(w) and backward as _SoftWeights, one fused pass per tile of weights
# ----------------------------------------------------------------------------------------------------------
# A small C file compiled once per machine with the system C compiler (``-O3 -march=native -fopenmp``, cached
# under ``native_cache_dir()``) and called through ctypes (no host sync, no Python loop over weights). From a
# layer's raw parameters (mu_rest, sigma, pi, tau; the guards and their counters included) it computes, per
# tile of 32 weights held as SIMD lanes, the log-joint, the responsibilities (log-sum-exp form, EPS included),
# the softmax and S(w) in L1; backward recomputes the tile and forms the analytical gradients of _SoftWeights,
# then chains them through |sigma|, |pi|/sum|pi| and the clamps as autograd would. Nothing of size
# [K, #weights] exists in either pass. Chunks of 512 weights run on torch's OpenMP threads
# (``torch.get_num_threads()``; the kernel binds to the libgomp torch already loaded); per-chunk sums of the
# mixture gradients are kept in float64 and added in chunk order, so results do not depend on the thread
# count. Denormals are flushed while a chunk runs (products of responsibilities ~1e-38 made the backward 2x
# slower); exp is a branch-free polynomial (< 2 ulp; 0 below -87 in float32, -708 in float64). Values agree
# with the torch path to float rounding, not bit for bit (tests/test_fused_dgms.py: float64 to 1e-12 forward,
# 1e-8 gradients; float32 as accurate as the torch path). ``PAPERLIB_DGMS_NATIVE=0`` disables it; a failed build
# falls back to the torch path (``native_status`` says why).
_NATIVE_DTYPES = (torch.float32, torch.float64)
_NATIVE_MAX_K = 4096
_native: dict[str, Any] = {}


def _build_native() -> Any:
    import ctypes

    lib = build_library("dgms_kernel", ["dgms_kernel.c", "native_math.h"])
    for sfx, ct in (("f32", ctypes.c_float), ("f64", ctypes.c_double)):
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        fwd, bwd = getattr(lib, f"dgms_layer_forward_{sfx}"), getattr(lib, f"dgms_layer_backward_{sfx}")
        fwd.argtypes = [i64, i32, p, p, p, p, p, i32, i32, ct, p, p, i32]
        bwd.argtypes = [i64, i32, p, p, p, p, p, p, i32, i32, ct, p, p, p, p, p, i32]
        fwd.restype = bwd.restype = i32
    return lib


def _native_lib() -> Any:
    """The loaded kernel, building it on first use; None when disabled or unavailable (see native_status)."""
    return load_lazily(_native, "PAPERLIB_DGMS_NATIVE", _build_native)


def native_status() -> dict[str, Any]:
    """``{"available": bool, "path": compiled library or None, "error": why not or None}`` (builds on first
    call)."""
    return status(_native, _native_lib())
