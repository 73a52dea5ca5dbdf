"""Native CPU kernels: compile a C source of this package once per machine and CPU, cache the shared
library, load it with ctypes.

The sources sit beside this module (``dgms_kernel.c``, ``quant_kernel.c`` and the ``native_math.h`` they share)
and are built with the system C compiler (``-O3 -march=native -fopenmp``) into :func:`native_cache_dir`, keyed
by the sources, the flags, the compiler version and the CPU flags, so a changed source or another machine
builds anew and concurrent builders leave one complete file. Each kernel module keeps its own lazy state and
falls back to its torch path when the build fails (no compiler, no writable folder) or is disabled.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import paths

FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC")
HERE = Path(__file__).parent


def native_cache_dir() -> Path:
    """Where compiled kernels are kept: ``$PAPERLIB_CACHE``, else the project's ``build/native`` (ignored by
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


def build_library(stem: str, files: Sequence[str], flags: Sequence[str] = FLAGS) -> ctypes.CDLL:
    """Compile ``files`` (names in this package; the first is the C source, the others headers it includes)
    into ``<stem>_<key>.so`` in the cache folder unless it is there already, and load it. Raises
    ``RuntimeError`` saying why when it cannot (no compiler, compiler error, no writable folder)."""
    cc = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler (gcc/cc) on PATH")
    texts = {name: (HERE / name).read_text() for name in files}
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([*(f"{k}\0{v}" for k, v in texts.items()), *flags, platform.machine(),
                                    _cpu_signature(), version]).encode()).hexdigest()[:16]
    target = None
    for folder in (native_cache_dir(), Path(tempfile.gettempdir()) / f"paperlib-{os.getuid()}"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / f"{stem}_{key}.so"
            if target.is_file():
                break
            with tempfile.TemporaryDirectory(dir=folder) as tmp:
                for name, text in texts.items():
                    (Path(tmp) / name).write_text(text)
                out = Path(tmp) / f"{stem}.so"
                r = subprocess.run([cc, *flags, str(Path(tmp) / files[0]), "-o", str(out)], capture_output=True,
                                   text=True, timeout=300)
                if r.returncode != 0:
                    raise RuntimeError(f"{cc} failed: {r.stderr.strip()[-2000:]}")
                os.replace(out, target)  # atomic: concurrent builders leave one complete file
            break
        except OSError:
            target = None
    if target is None:
        raise RuntimeError(f"no writable cache folder for the kernel (tried {native_cache_dir()})")
    lib = ctypes.CDLL(str(target))
    lib.path = str(target)
    return lib


def load_lazily(state: dict[str, Any], env_var: str, build: Callable[[], ctypes.CDLL]) -> ctypes.CDLL | None:
    """``build()``'s library, built once and kept in ``state``; None when ``$env_var`` is ``0`` or the build
    failed (``state["error"]`` says why; any failure means: use the torch path)."""
    if "lib" not in state:
        lib = None
        if os.environ.get(env_var, "1") == "0":
            state["error"] = f"disabled by {env_var}=0"
        else:
            try:
                lib = build()
            except Exception as e:  # noqa: BLE001
                state["error"] = f"{type(e).__name__}: {e}"
        state["lib"] = lib
    return state["lib"]


def status(state: dict[str, Any], lib: ctypes.CDLL | None) -> dict[str, Any]:
    """``{"available": bool, "path": compiled library or None, "error": why not or None}``."""
    return {"available": lib is not None, "path": getattr(lib, "path", None), "error": state.get("error")}
