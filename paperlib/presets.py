"""Presets: how big each notebook's experiment is.

- ``smoke``: seconds per notebook, used by the tests (all notebooks together <= 2 min on 2 cores).
- ``default``: the embedded digits data, >= 3 seeds (all notebooks together <= 15 min on 2 cores): the main job.
- ``paper``: the papers' datasets and schedules, for a GPU machine with the data (``data_dir`` required).

Each experiment module registers its table with :func:`register_presets`; a notebook resolves it with
:func:`resolve`, overriding single settings from its parameters cell.
"""

from __future__ import annotations

import copy
from typing import Any

PRESET_NAMES = ("smoke", "default", "paper")
PRESETS: dict[str, dict[str, dict[str, Any]]] = {}


def register_presets(notebook: str, table: dict[str, dict[str, Any]]) -> None:
    """Register ``{preset: settings}`` for ``notebook``; every preset must be given, with the same keys."""
    missing = [p for p in PRESET_NAMES if p not in table]
    if missing:
        raise ValueError(f"presets of {notebook} lack {missing}")
    keys = {p: set(v) for p, v in table.items()}
    if len({frozenset(k) for k in keys.values()}) != 1:
        raise ValueError(f"presets of {notebook} must have the same settings: {keys}")
    PRESETS[notebook] = table


def resolve(notebook: str, preset: str, **overrides: Any) -> dict[str, Any]:
    """The preset's settings for ``notebook`` with non-empty ``overrides`` applied.

    An override of ``None``, ``""``, ``0`` or ``[]`` means "use the preset's value", so a notebook's
    parameters cell can default every knob to empty.
    """
    if notebook not in PRESETS:
        raise ValueError(f"no presets for notebook {notebook!r}; known: {sorted(PRESETS)} "
                         "(import the notebook's experiment module first)")
    if preset not in PRESET_NAMES:
        raise ValueError(f"preset={preset!r}: use one of {', '.join(PRESET_NAMES)}")
    cfg = copy.deepcopy(PRESETS[notebook][preset])
    for key, value in overrides.items():
        if key not in cfg:
            raise ValueError(f"{key!r} is not a setting of {notebook}; settings: {sorted(cfg)}")
        if value is None or value == "" or value == [] or (value == 0 and not isinstance(value, bool)):
            continue
        cfg[key] = value
    cfg["preset"] = preset
    return cfg
