"""The DGMS soft assignment's native CPU kernel (issue 9): build, cache and load ``dgms_kernel.c``.

The C source beside this module is compiled once per machine and CPU with the system C compiler and loaded
through ctypes; :mod:`paperlib.dgms` calls it through ``_DGMSNative`` and falls back to its torch path when
:func:`native_status` says the kernel is unavailable.
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path
from typing import Any

import torch

from . import paths

# ----------------------------------------------------------------------------------------------------------
# native CPU kernel (issue 9): the same S(w) and backward as _SoftWeights, one fused pass per tile of weights
# ----------------------------------------------------------------------------------------------------------
# A small C file compiled once per machine with the system C compiler (``-O3 -march=native -fopenmp``, cached
# under ``native_cache_dir()``) and called through ctypes (no host sync, no Python loop over weights). From a
# layer's raw parameters (mu_rest, sigma, pi, tau; the §2 guards and their counters included) it computes, per
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
_NATIVE_SRC = (Path(__file__).with_name("dgms_kernel.c")).read_text()
_NATIVE_FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC")
_NATIVE_DTYPES = (torch.float32, torch.float64)
_NATIVE_MAX_K = 4096
_native: dict[str, Any] = {}


def native_cache_dir() -> Path:
    """Where the compiled kernel is kept: ``$PAPERLIB_CACHE``, else the project's ``build/native`` (ignored by
    git; a temp folder when that is not writable)."""
    env = os.environ.get("PAPERLIB_CACHE")
    if env:
        return Path(env).expanduser()
    return paths.project_root() / "build" / "native"


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _build_native() -> Any:
    import ctypes
    import shutil
    import subprocess
    import tempfile

    cc = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler (gcc/cc) on PATH")
    key = hashlib.sha256("\0".join([_NATIVE_SRC, *_NATIVE_FLAGS, platform.machine(), _cpu_signature(),
                                     subprocess.run([cc, "--version"], capture_output=True, text=True,
                                                    timeout=30).stdout]).encode()).hexdigest()[:16]
    target = None
    for folder in (native_cache_dir(), Path(tempfile.gettempdir()) / f"paperlib-{os.getuid()}"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / f"dgms_kernel_{key}.so"
            if target.is_file():
                break
            with tempfile.TemporaryDirectory(dir=folder) as tmp:
                src, out = Path(tmp) / "dgms_kernel.c", Path(tmp) / "dgms_kernel.so"
                src.write_text(_NATIVE_SRC)
                r = subprocess.run([cc, *_NATIVE_FLAGS, str(src), "-o", str(out)], capture_output=True, text=True,
                                   timeout=300)
                if r.returncode != 0:
                    raise RuntimeError(f"{cc} failed: {r.stderr.strip()[-2000:]}")
                os.replace(out, target)  # atomic: concurrent builders leave one complete file
            break
        except OSError:
            target = None
    if target is None:
        raise RuntimeError(f"no writable cache folder for the kernel (tried {native_cache_dir()})")
    lib = ctypes.CDLL(str(target))
    for sfx, ct in (("f32", ctypes.c_float), ("f64", ctypes.c_double)):
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        fwd, bwd = getattr(lib, f"dgms_layer_forward_{sfx}"), getattr(lib, f"dgms_layer_backward_{sfx}")
        fwd.argtypes = [i64, i32, p, p, p, p, p, i32, i32, ct, p, p, i32]
        bwd.argtypes = [i64, i32, p, p, p, p, p, p, i32, i32, ct, p, p, p, p, p, i32]
        fwd.restype = bwd.restype = i32
    lib.path = str(target)
    return lib


def _native_lib() -> Any:
    """The loaded kernel, building it on first use; None when disabled or unavailable (see native_status)."""
    if "lib" not in _native:
        lib = None
        if os.environ.get("PAPERLIB_DGMS_NATIVE", "1") == "0":
            _native["error"] = "disabled by PAPERLIB_DGMS_NATIVE=0"
        else:
            try:
                lib = _build_native()
            except Exception as e:  # noqa: BLE001 (any failure means: use the torch path)
                _native["error"] = f"{type(e).__name__}: {e}"
        _native["lib"] = lib
    return _native["lib"]


def native_status() -> dict[str, Any]:
    """``{"available": bool, "path": compiled library or None, "error": why not or None}`` (builds on first
    call)."""
    lib = _native_lib()
    return {"available": lib is not None, "path": getattr(lib, "path", None), "error": _native.get("error")}
