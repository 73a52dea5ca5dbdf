"""paperlib: the methods of ClimbQ, LifeQuant, DGMS and CBP, with the data, models, training loop and
run records their companion notebooks use.

The one entry point for any model: ``paperlib.quantize_(model, config)`` with a config of
``UniformConfig``, ``LSQConfig``, ``ClimbQConfig``, ``LifeQuantConfig``, ``DGMSConfig`` or ``CBPConfig``
(see :mod:`paperlib.quant.config`), and ``paperlib.hooks(model, train_data, config)`` for the criterion and
callbacks ``fit`` trains it with. They are imported on first use, so ``import paperlib`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> the module that defines it (resolved on first access, PEP 562)
_LAZY = {
    "quantize_": "paperlib.quant.config",
    "hooks": "paperlib.quant.config",
    "Hooks": "paperlib.quant.config",
    "QuantConfig": "paperlib.quant.config",
    "UniformConfig": "paperlib.quant.uniform",
    "LSQConfig": "paperlib.quant.lsq",
    "ClimbQConfig": "paperlib.climbq_hooks",
    "LifeQuantConfig": "paperlib.lifequant.quant",
    "DGMSConfig": "paperlib.dgms",
    "CBPConfig": "paperlib.cbp",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'paperlib' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
