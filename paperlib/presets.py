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
    """The preset's settings for ``notebook`` with the given ``overrides`` applied.

    Only an *unset* override means "use the preset's value": ``None``, and the empty containers ``""``,
    ``[]`` and ``{}`` (an empty string, list or dict is never a meaningful setting), so a notebook's parameters
    cell can default every knob to ``None`` (numbers) or empty (strings, lists, dicts). ``0``, ``0.0`` and
    ``False`` are values: ``lam=0.0`` asks for lambda = 0, ``qat_epochs=0`` for no fine-tuning; the experiment's
    driver then does exactly that or refuses it with an error naming the setting and its valid range.
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
        if is_unset(value):
            continue
        cfg[key] = value
    cfg["preset"] = preset
    return cfg


def is_unset(value: Any) -> bool:
    """Whether a notebook parameter means "the preset's value": ``None``, ``""``, ``[]``/``()`` or ``{}``.

    Numbers and booleans are never unset (0, 0.0 and False are values)."""
    if value is None:
        return True
    if isinstance(value, str | list | tuple | dict):
        return len(value) == 0
    return False
