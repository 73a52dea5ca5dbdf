"""Atomic file writes: a temp file next to the target, then ``os.replace``: never a half-written file.

Every file this project writes (metrics, manifests, models, checkpoints, figures, CSVs) goes through
:func:`atomic_write`. On any failure the temp file is removed and an :class:`OSError` whose message is one
line naming the path and the cause (no space left, not writable, ...) is raised; the target is either the
old file or the complete new one. Files are created with mode 0644 (``mkstemp``'s 0600 is widened), like
any file a user's tools should read.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

FILE_MODE = 0o644

_CAUSES = {
    errno.ENOSPC: "no space left on the device (free some space or choose another folder)",
    errno.EDQUOT: "disk quota exceeded (free some space or choose another folder)",
    errno.EACCES: "not writable (check its permissions or choose another folder)",
    errno.EPERM: "not writable (check its permissions or choose another folder)",
    errno.EROFS: "on a read-only file system (choose another folder)",
    errno.ENOTDIR: "a parent of it is a file, not a folder (choose another path)",
    errno.EISDIR: "it is a folder, not a file (choose another path)",
}


class WriteError(OSError):
    """A file could not be written; ``str()`` is one line naming the path and the cause."""


def describe_os_error(exc: BaseException) -> str:
    """The cause of an ``OSError`` in words (``errno`` first; torch's C++ writer only says it in its text)."""
    code = getattr(exc, "errno", None)
    if code in _CAUSES:
        return _CAUSES[code]
    text = str(exc)
    if "No space left" in text or "file write failed" in text or "unexpected pos" in text:
        return _CAUSES[errno.ENOSPC]
    if "Permission denied" in text:
        return _CAUSES[errno.EACCES]
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return first[:200]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any], *, mode: int = FILE_MODE) -> Path:
    """Call ``write(f)`` on a binary temp file beside ``path``, flush it, then rename it onto ``path``.

    Creates the parent folder. On failure (including ``KeyboardInterrupt``) the temp file is removed; an
    ``OSError`` (or torch's ``RuntimeError`` from a failed write) becomes a one-line :class:`WriteError`.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode & ~_umask())
        os.replace(tmp, path)
        tmp = None
    except (OSError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and not _is_write_failure(exc):
            raise
        raise WriteError(f"cannot write {path}: {describe_os_error(exc)}") from exc
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return path


def _is_write_failure(exc: RuntimeError) -> bool:
    text = str(exc)
    return any(s in text for s in ("inline_container", "file write failed", "No space left", "unexpected pos",
                                   "Permission denied"))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_torch_save(path: str | Path, obj: Any) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (:func:`atomic_write`)."""
    import torch  # heavy; only the model writers need it

    return atomic_write(path, lambda f: torch.save(obj, f))


def check_writable(folder: str | Path, what: str = "output folder") -> Path:
    """Make sure ``folder`` exists (created if missing) and a file can be written in it, before any work.

    Raises a one-line :class:`WriteError` naming the folder and the cause (it is a file, read-only, full)."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise WriteError(f"{what} {folder} is a file, not a folder: choose another path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".write-check.", suffix=".tmp")
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
            Path(tmp).unlink(missing_ok=True)
    except OSError as exc:
        raise WriteError(f"{what} {folder} cannot be written: {describe_os_error(exc)}") from exc
    return folder
