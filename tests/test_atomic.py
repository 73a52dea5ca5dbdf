"""The one atomic writer: complete file or the old one, no temp left, one-line errors, mode 0644."""

import errno
import os
import stat

import pytest
import torch

from paperlib.atomic import WriteError, atomic_torch_save, atomic_write, atomic_write_text, check_writable


def test_failed_write_keeps_old_file_removes_temp_and_names_path_and_cause(tmp_path):
    target = atomic_write_text(tmp_path / "metrics.json", "old")

    def full_disk(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WriteError) as e:
        atomic_write(target, full_disk)
    msg = str(e.value)
    assert "\n" not in msg and str(target) in msg and "no space left" in msg
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_interrupt_removes_temp(tmp_path):
    def interrupted(f):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "m.pt", interrupted)
    assert list(tmp_path.iterdir()) == []


def test_files_are_0644_and_torch_save_round_trips(tmp_path):
    old = os.umask(0o022)
    try:
        p = atomic_torch_save(tmp_path / "m.pt", {"w": torch.arange(3)})
    finally:
        os.umask(old)
    assert stat.S_IMODE(p.stat().st_mode) == 0o644
    assert torch.equal(torch.load(p)["w"], torch.arange(3))


def test_check_writable_refuses_a_file_and_a_read_only_folder(tmp_path, monkeypatch):
    f = tmp_path / "out"
    f.write_text("x")
    with pytest.raises(WriteError, match="is a file"):
        check_writable(f)
    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr("paperlib.atomic.tempfile.mkstemp", denied)  # root ignores chmod, so fake it
    with pytest.raises(WriteError, match="ro cannot be written: not writable"):
        check_writable(tmp_path / "ro")
    monkeypatch.undo()
    assert check_writable(tmp_path / "new" / "dir").is_dir()
