import os

import pytest

os.environ.setdefault("CI", "1")  # no progress bars in test output

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest-xdist workers on a 2-core machine: one thread each (and in the kernels and
    # subprocesses they start), else spin-waiting OpenMP threads of one worker slow the other down
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def run_dirs(tmp_path):
    """Separate runs/ and figures/ roots so tests never touch the repository's outputs."""
    runs, figs = tmp_path / "runs", tmp_path / "figures"
    runs.mkdir()
    figs.mkdir()
    return runs, figs
