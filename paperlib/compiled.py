"""``torch.compile`` for the quantized models of every paper (the GPU path).

On a GPU a batch-128 ResNet-20 train step is bound by kernel launches (``benchmarks/results-h100.md``), and the
quantizers add 3-4x FP32's op count. Compiled, Inductor fuses each quantizer's elementwise chain (and the
backward's) into a few kernels; ``mode="reduce-overhead"`` also replays the step as CUDA graphs.

What makes the quantizers compile without graph breaks or recompiles: under compile
(``torch.compiler.is_compiling()``) they take their plain torch-op paths, the same math as ``fused=False``: no
native CPU kernels (ctypes), no caches of tensors kept across calls (they become guards), no one-pass stash in
``layer.__dict__`` (every layer quantizes its own weight; Inductor fuses each). Eager calls are unchanged (same
values bit for bit, native kernels on CPU). ClimbQ's per-batch sigma (:func:`paperlib.climbq.set_sigma`) is a
tensor attribute that dynamo lifts as a graph input, so a new sigma every batch does not recompile.

Usage::

    model = compile_model(model.to(device), "default", inplace=True)  # call after moving the model
    loss = criterion(model, x, y)  # set_sigma, prox_penalty, CBP.criterion: unchanged

``inplace=True`` compiles the module's ``__call__`` (``nn.Module.compile``) and, where the model has one, its
``forward_features`` (the trunk a criterion such as ClimbQ's HomoVar calls itself): the same object, so criteria that
identify the model (``CBP.criterion``), use parameter names (``prox_penalty``) or walk its modules keep working,
and its ``state_dict`` keys do not change; :func:`uncompile` undoes it. ``inplace=False`` (default) returns
``torch.compile``'s wrapper (sharing the parameters; its ``state_dict`` keys start with ``_orig_mod.``).

Known costs: the first call compiles (seconds to a minute on a CPU); each new input shape, train/eval mode or
grad mode compiles once more (``dynamic=False``: shapes are specialised, the usual 2 per epoch: full and last
batch); LSQ's activation step initialises in the first training step and compiles the steady graph in the second.
Methods measured with zero graph breaks and zero recompiles after warm-up: FP32, uniform (DoReFa), LSQ, ClimbQ,
LifeQuant (model; the prox penalty runs eagerly beside it, or compiled inside a compiled loss), CBP, DGMS.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

MODES: tuple[str, ...] = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
NONE = "none"

__all__ = ["MODES", "compile_available", "compile_model", "is_compiled", "uncompile"]


def _check_mode(mode: object) -> str:
    if not isinstance(mode, str) or mode not in (NONE, *MODES):
        raise ValueError(f"compile mode {mode!r} is unknown: use 'none' (eager) or one of {list(MODES)} "
                         "(torch.compile's modes; 'reduce-overhead' adds CUDA graphs on a GPU)")
    return mode


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is ``torch.compile``'s wrapper or was compiled in place (``nn.Module.compile``)."""
    return isinstance(model, torch._dynamo.eval_frame.OptimizedModule) or (
        getattr(model, "_compiled_call_impl", None) is not None)


def _prepare(model: nn.Module) -> None:
    """Fill the module-level caches the quantizers read in their forward, for the model's dtype and device, so
    that the first compiled call does not fill them (dynamo guards on a cache's contents: filling it during the
    first call recompiles on the second): every weight quantizer with a ``prepare_compile(weight)`` method gets
    it called (today CBP's, which fills its factor constants)."""
    for m in model.modules():
        prepare = getattr(getattr(m, "weight_quantizer", None), "prepare_compile", None)
        w = getattr(m, "weight", None)
        if callable(prepare) and isinstance(w, torch.Tensor):
            prepare(w)


def compile_model(model: nn.Module, mode: str = "default", *, inplace: bool = False, dynamic: bool | None = False,
                  fullgraph: bool = False, backend: str = "inductor") -> nn.Module:
    """``model`` (any quantized model of this package, or a plain one) compiled with ``torch.compile``.

    ``mode``: ``"none"`` returns ``model`` unchanged (eager); ``"default"``, ``"reduce-overhead"`` (CUDA
    graphs on a GPU; on a CPU the same as ``"default"``), ``"max-autotune"``, ``"max-autotune-no-cudagraphs"``:
    ``torch.compile``'s modes. ``inplace``: compile ``model.__call__`` and return ``model`` itself (see the
    module docstring; :func:`uncompile` undoes it), else return ``torch.compile``'s wrapper. ``dynamic=False``
    specialises on input shapes (a partial last batch compiles once more; CUDA graphs want static shapes);
    ``None`` lets torch mark a changing dimension dynamic. ``fullgraph=True`` makes a graph break an error.
    Call it after the model is on its device and in its dtype. Compilation happens at the first call; if
    Inductor cannot build there (no C++ compiler, no Triton), that call raises torch's error.
    """
    mode = _check_mode(mode)
    if not isinstance(model, nn.Module):
        raise TypeError(f"compile_model needs an nn.Module, got {type(model).__name__}")
    if mode == NONE:
        return model
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise ValueError("model is already torch.compile's wrapper: pass the original module (wrapper._orig_mod)")
    _prepare(model)
    kwargs: dict[str, Any] = {"mode": mode, "dynamic": dynamic, "fullgraph": fullgraph, "backend": backend}
    if backend != "inductor":
        kwargs.pop("mode")  # modes are Inductor's
    if inplace:
        model.compile(**kwargs)
        features = getattr(model, "forward_features", None)
        if callable(features) and "forward_features" not in model.__dict__:
            # criteria that call the trunk themselves (ClimbQ's HomoVar: fc(forward_features(x))) get it compiled
            # too: an instance attribute shadowing the method, removed by uncompile
            model.__dict__["forward_features"] = torch.compile(features, **kwargs)
            model.__dict__[_FEATURES_MARK] = True
        return model
    return torch.compile(model, **kwargs)


_FEATURES_MARK = "_paperlib_compiled_forward_features"


def uncompile(model: nn.Module) -> nn.Module:
    """The eager module: the original of ``torch.compile``'s wrapper, or ``model`` with an in-place compile
    (``compile_model(..., inplace=True)``) removed. A module that is not compiled is returned as is."""
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        return model._orig_mod
    if getattr(model, "_compiled_call_impl", None) is not None:
        model._compiled_call_impl = None
    if model.__dict__.pop(_FEATURES_MARK, False):
        model.__dict__.pop("forward_features", None)
    return model


@functools.cache
def compile_available(device: str = "cpu") -> tuple[bool, str]:
    """``(True, "")`` when Inductor builds and runs a tiny compiled function with a backward on ``device``,
    else ``(False, why)`` (e.g. no C++ compiler for the CPU backend, no Triton for CUDA). Cached per device."""
    try:
        x = torch.ones(4, device=device, requires_grad=True)
        fn = torch.compile(lambda t: (torch.erf(t) * 2).sum(), backend="inductor", dynamic=False)
        fn(x).backward()
        return True, ""
    except Exception as e:  # noqa: BLE001 - any failure means: cannot compile here
        return False, f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
