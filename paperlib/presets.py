"""Presets: how big each notebook's experiment is.

- ``smoke``: seconds per notebook, used by the tests (all notebooks together <= 2 min on 2 cores).
- ``default``: the embedded digits data, >= 3 seeds (all notebooks together <= 15 min on 2 cores): the main job.
- ``paper``: the papers' datasets and schedules, for a GPU machine with the data (``data_dir`` required).

Each experiment module registers its table with :func:`register_presets`; a notebook resolves it with
:func:`resolve`, overriding single settings from its parameters cell.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

PRESET_NAMES = ("smoke", "default", "paper")
PRESETS: dict[str, dict[str, dict[str, Any]]] = {}
VALIDATORS: dict[str, Callable[[dict[str, Any]], None]] = {}


def register_presets(notebook: str, table: dict[str, dict[str, Any]],
                     validate: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Register ``{preset: settings}`` for ``notebook``; every preset must be given, with the same keys.

    ``validate(cfg)``, when given, checks the ranges of a resolved configuration and raises ``ValueError``
    naming the setting and its valid range; :func:`check_settings` calls it before any work starts.
    """
    missing = [p for p in PRESET_NAMES if p not in table]
    if missing:
        raise ValueError(f"presets of {notebook} lack {missing}")
    keys = {p: set(v) for p, v in table.items()}
    if len({frozenset(k) for k in keys.values()}) != 1:
        raise ValueError(f"presets of {notebook} must have the same settings: {keys}")
    PRESETS[notebook] = table
    if validate is not None:
        VALIDATORS[notebook] = validate


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


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number" if isinstance(value, float) else "int"
    if isinstance(value, str):
        return "str"
    if isinstance(value, list | tuple):
        return "list"
    if isinstance(value, dict):
        return "dict"
    return "any"


def _check_type(notebook: str, key: str, value: Any, like: Any) -> None:
    """``value`` must have the type of the preset's own value ``like`` (ints where ints, lists where lists)."""
    want, got = _kind(like), _kind(value)
    # a float where the preset has an int may be meaningful (gamma = 10.5); the range check decides
    ok = (want == "any" or got == want or (want in ("number", "int") and got in ("number", "int")))
    if not ok:
        raise ValueError(f"{notebook}: {key}={value!r:.60} must be {_WORDS[want]} like the preset's "
                         f"{like!r:.60}")
    if want == "list" and like and value:
        for item in value:
            _check_type(notebook, f"{key}[...]", item, like[0])


_WORDS = {"bool": "True or False", "int": "an integer", "number": "a number", "str": "a string",
          "list": "a list", "dict": "a dict", "any": "a value"}


def check_settings(notebook: str, preset: str, **overrides: Any) -> dict[str, Any]:
    """:func:`resolve`, then check every set override's type against the preset's own value and the
    notebook's registered range check; a ``ValueError`` names the setting. Returns the resolved settings."""
    cfg = resolve(notebook, preset, **overrides)
    table = PRESETS[notebook][preset]
    for key, value in overrides.items():
        if not is_unset(value):
            _check_type(notebook, key, value, table[key])
    if notebook in VALIDATORS:
        VALIDATORS[notebook](cfg)
    return cfg
