import os

import pytest

os.environ.setdefault("CI", "1")  # no progress bars in test output


@pytest.fixture
def run_dirs(tmp_path):
    """Separate runs/ and figures/ roots so tests never touch the repository's outputs."""
    runs, figs = tmp_path / "runs", tmp_path / "figures"
    runs.mkdir()
    figs.mkdir()
    return runs, figs
