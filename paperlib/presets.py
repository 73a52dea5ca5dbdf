"""Presets: how big each notebook's experiment is.

- ``smoke``: seconds per notebook, used by the tests (all notebooks together <= 2 min on 2 cores).
- ``default``: the embedded digits data, >= 3 seeds (all notebooks together <= 15 min on 2 cores): the main job.
- ``paper``: the papers' datasets and schedules, for a GPU machine with the data (``data_dir`` required).
"""

from __future__ import annotations

import copy
from typing import Any

PRESET_NAMES = ("smoke", "default", "paper")

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "00_quickstart": {
        "smoke": {"dataset": "digits", "image_size": 8, "seeds": [0], "fp_epochs": 4, "qat_epochs": 2,
                  "batch_size": 128, "fp_lr": 0.1, "qat_lr": 0.02, "bits": [4, 2], "act_clip": 4.0,
                  "augment": False},
        "default": {"dataset": "digits", "image_size": 8, "seeds": [0, 1, 2], "fp_epochs": 15, "qat_epochs": 8,
                    "batch_size": 128, "fp_lr": 0.1, "qat_lr": 0.02, "bits": [4, 2], "act_clip": 4.0,
                  "augment": False},
        "paper": {"dataset": "cifar10", "image_size": 32, "seeds": [0, 1, 2], "fp_epochs": 200, "qat_epochs": 100,
                  "batch_size": 128, "fp_lr": 0.1, "qat_lr": 0.01, "bits": [4, 2], "act_clip": 4.0,
                  "augment": True},
    },
}


def resolve(notebook: str, preset: str, **overrides: Any) -> dict[str, Any]:
    """The preset's settings for ``notebook`` with non-empty ``overrides`` applied.

    An override of ``None``, ``""``, ``0`` or ``[]`` means "use the preset's value", so a notebook's
    parameters cell can default every knob to empty.
    """
    if notebook not in PRESETS:
        raise ValueError(f"no presets for notebook {notebook!r}; known: {sorted(PRESETS)}")
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
