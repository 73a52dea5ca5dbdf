"""Where the project's folders are: resolved from the package, never from the caller's cwd.

The root is ``$PAPERLIB_ROOT`` when set, else the repository that holds this package (editable install).
"""

from __future__ import annotations

import os
from pathlib import Path


def project_root() -> Path:
    env = os.environ.get("PAPERLIB_ROOT")
    if env:
        return Path(env).resolve()
    return Path(__file__).resolve().parents[1]


def notebooks_dir() -> Path:
    return project_root() / "notebooks"


def runs_dir() -> Path:
    return project_root() / "runs"


def figures_dir() -> Path:
    return project_root() / "figures"
