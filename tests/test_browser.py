"""JupyterLab in a real browser: notebooks opened in headless Chromium, run at the smoke preset.

By default two notebooks run in the browser: the quickstart (the template every notebook follows) and the Levene
notebook (the paper notebook that reads another's runs); every notebook is executed headless at the smoke preset by
its own papermill test, on the same kernel. ``PAPERLIB_BROWSER_NOTEBOOKS=all`` (or a comma-separated list of
names) runs others in the browser too.

The test installs Debian's ``chromium`` when it is missing (root + apt-get), starts JupyterLab from the
project's venv on a free localhost port with a token, opens each notebook (a copy with ``preset="smoke"``
injected by papermill), runs all cells from the Run menu, saves, and asserts that no cell shows an error and
that a table and a figure are rendered. A screenshot per notebook goes to ``runs/browser/`` for review.
Skipped (with the reason) where no browser can be installed.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from paperlib import paths
from paperlib.reproduce import list_notebooks

pytestmark = [pytest.mark.browser, pytest.mark.notebooks]
CHROMIUM = "/usr/bin/chromium"
RUN_TIMEOUT_S = int(os.environ.get("BROWSER_RUN_TIMEOUT_S", "600"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def _ensure_chromium() -> str:
    if Path(CHROMIUM).exists():
        return CHROMIUM
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium is not installed and cannot be installed here (needs root and apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            pytest.skip(f"could not install chromium: {' '.join(cmd)} failed: {res.stderr[-300:]}")
    return CHROMIUM


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server over smoke-preset copies of the notebooks; yields (url, token, notebook dir)."""
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
    import papermill as pm

    chromium = _ensure_chromium()
    root = tmp_path_factory.mktemp("labroot")
    nb_dir = root / "notebooks"
    nb_dir.mkdir()
    for name, path in list_notebooks().items():
        if name not in browser_notebooks():
            continue
        pm.execute_notebook(str(path), str(nb_dir / f"{name}.ipynb"), parameters={"preset": "smoke"},
                            prepare_only=True, kernel_name="python3", progress_bar=False)
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, PAPERLIB_ROOT=str(root), JUPYTER_PATH=str(Path(sys.prefix) / "share" / "jupyter"))
    log = open(root / "lab.log", "w")  # noqa: SIM115 (closed at teardown)
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--notebook-dir={nb_dir}", "--LabApp.news_url=None"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"JupyterLab exited: {(root / 'lab.log').read_text()[-2000:]}")
                time.sleep(0.5)
        else:
            pytest.fail("JupyterLab did not answer within 120 s")
        yield {"url": url, "token": token, "notebooks": nb_dir, "chromium": chromium}
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _wait_until_executed(page, path: Path):
    """Save the notebook every few seconds until every code cell has run (or one raised); None on timeout.

    Read from the saved file rather than the DOM: JupyterLab renders long notebooks in a virtual window.
    """
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        page.keyboard.press("Control+s")
        time.sleep(2)
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        raised = any(o.output_type == "error" for c in code for o in c.get("outputs", []))
        if raised or all(c.get("execution_count") for c in code):
            return nb
        time.sleep(3)
    return None


def _accept_kernel_dialog(page, wait_ms: int = 3000) -> None:
    """Accept JupyterLab's "Select Kernel" dialog (the notebook's python3 kernel) when it shows up."""
    try:
        page.wait_for_selector(".jp-Dialog button.jp-mod-accept", timeout=wait_ms)
    except Exception:
        return
    page.click(".jp-Dialog button.jp-mod-accept")


DEFAULT_BROWSER_NOTEBOOKS = ("00_quickstart", "levene")


def browser_notebooks() -> list[str]:
    """The notebooks to run in the browser: ``PAPERLIB_BROWSER_NOTEBOOKS`` ("all" or names), else the default."""
    every = list(list_notebooks())
    want = os.environ.get("PAPERLIB_BROWSER_NOTEBOOKS", "").strip()
    if want == "all":
        return every
    names = [n.strip() for n in want.split(",") if n.strip()] or list(DEFAULT_BROWSER_NOTEBOOKS)
    unknown = sorted(set(names) - set(every))
    if unknown:
        raise ValueError(f"PAPERLIB_BROWSER_NOTEBOOKS names {unknown}, not notebooks; use 'all' or some of {every}")
    return names


@pytest.mark.parametrize("name", browser_notebooks())
def test_notebook_runs_in_jupyterlab(lab, name):
    from playwright.sync_api import sync_playwright

    shots = paths.runs_dir() / "browser"
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=lab["chromium"], args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{lab['url']}/lab/tree/{name}.ipynb?token={lab['token']}")
            page.wait_for_selector(".jp-Notebook .jp-Cell", state="attached", timeout=120_000)
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
            _accept_kernel_dialog(page)
            page.click("li.lm-MenuBar-item:has-text('Run')")
            page.click("li.lm-Menu-item[data-command='runmenu:run-all']")
            _accept_kernel_dialog(page)
            nb = _wait_until_executed(page, lab["notebooks"] / f"{name}.ipynb")
            if nb is None:
                page.screenshot(path=str(shots / f"{name}-timeout.png"))
                pytest.fail(f"{name}: cells did not finish within {RUN_TIMEOUT_S} s")
            page.screenshot(path=str(shots / f"{name}.png"))
            dom_errors = page.query_selector_all("[data-mime-type='application/vnd.jupyter.error']")
        finally:
            browser.close()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    errors = [f"{o.ename}: {o.evalue}" for o in outputs if o.output_type == "error"]
    assert not errors and not dom_errors, f"{name}: cells raised {errors}"
    data = [o.get("data", {}) for o in outputs if o.output_type in ("display_data", "execute_result")]
    assert any("<table" in d.get("text/html", "") for d in data), f"{name}: no table rendered"
    assert any("image/png" in d for d in data), f"{name}: no figure rendered"
