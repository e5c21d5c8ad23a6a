"""End to end: JupyterLab in a real (headless) Chromium runs a notebook and shows the status widgets.

JupyterLab is started on a free port with a private config/runtime/settings folder, serving a
temporary copy of the notebook; Playwright drives Debian's Chromium (``/usr/bin/chromium``,
installed by ``scripts/setup.sh``). The test runs all cells through the menus, checks that every
``%%dreamer_step``/``%%dreamer_train`` cell rendered its ipywidgets status card with the state
the core reported, then restarts the kernel, runs everything again and checks that everything is
now a hit. Screenshots go to ``tests/_artifacts/``; ``docs/screenshot.png`` (shown in the README) is
written when missing or when ``DREAMER_UPDATE_SCREENSHOT=1``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "tests" / "_artifacts"
SCREENSHOT = REPO / "docs" / "screenshot.png"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
NOTEBOOK = "quickstart.ipynb"
HIT_STATES = {"loaded from disk", "restored from backup"}
TIMEOUT_MS = 120_000

# JupyterLab user settings: no news/update toasts over the notebook, and every cell kept in the
# DOM (no virtual scrolling) so the whole notebook can be inspected.
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}

# Done when the kernel is idle and every code cell has an execution count; an error output ends
# the wait early (Run All stops at the first error, leaving later cells unexecuted).
DONE_JS = """() => {
  const errors = [...document.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')]
    .map(e => e.textContent).filter(t => /Traceback|Error/.test(t));
  if (errors.length) return 'error: ' + errors[0].slice(0, 2000);
  const indicator = document.querySelector('.jp-Notebook-ExecutionIndicator');
  if (!indicator || indicator.dataset.status !== 'idle') return false;
  const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')].map(e => e.textContent.trim());
  return prompts.length > 0 && prompts.every(p => /^\\[\\d+\\]:$/.test(p)) ? 'done' : false;
}"""

# A card is a live widget while its cell runs and static HTML once it finished (so that a saved
# notebook shows it without widget state): the state badge is found the same way in both.
STATES_JS = """() => [...document.querySelectorAll('.dreamer-status .dreamer-state')]
  .map(e => e.dataset.state)"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dreamer_cell_count(path: Path) -> int:
    nb = json.loads(path.read_text())
    return sum(
        1
        for c in nb["cells"]
        if c["cell_type"] == "code" and "".join(c["source"]).lstrip().startswith(("%%dreamer_step", "%%dreamer_train"))
    )


@pytest.fixture
def lab(tmp_path):
    """A private JupyterLab serving a copy of the notebook; yields (url, root, log path)."""
    root = tmp_path / "notebooks"
    root.mkdir()
    shutil.copy(REPO / "notebooks" / NOTEBOOK, root / NOTEBOOK)
    env = dict(os.environ)
    dirs = {}
    for name in ("config", "runtime", "data", "settings", "workspaces"):
        dirs[name] = tmp_path / f"jupyter-{name}"
        dirs[name].mkdir()
    for rel, value in LAB_SETTINGS.items():
        target = dirs["settings"] / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(value))
    env.update(
        JUPYTER_CONFIG_DIR=str(dirs["config"]),
        JUPYTER_RUNTIME_DIR=str(dirs["runtime"]),
        JUPYTER_DATA_DIR=str(dirs["data"]),
        JUPYTERLAB_SETTINGS_DIR=str(dirs["settings"]),
        JUPYTERLAB_WORKSPACES_DIR=str(dirs["workspaces"]),
        DREAMER_OUTPUT=str(tmp_path / "output"),
    )
    port, token = _free_port(), "dreamer-browser-test"
    log_path = tmp_path / "jupyterlab.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1",
                f"--port={port}", f"--ServerApp.token={token}", f"--ServerApp.root_dir={root}",
            ],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root,
        )
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not answer within 90 s:\n{log_path.read_text()[-4000:]}")
                time.sleep(0.3)
        yield f"http://127.0.0.1:{port}/lab/tree/{NOTEBOOK}?token={token}", root, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def browser_page(tmp_path):
    """A page in a fresh headless Chromium profile; fails (never skips) when Chromium cannot start."""
    from playwright.sync_api import Error, sync_playwright

    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: run `bash scripts/setup.sh` (installs Debian's chromium)")
    with sync_playwright() as p:
        try:
            context = p.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"),
                executable_path=CHROMIUM,
                headless=True,
                args=CHROMIUM_FLAGS,
                viewport={"width": 1280, "height": 900},
            )
        except Error as e:
            pytest.fail(f"Chromium ({CHROMIUM}) could not start: {e}")
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(30_000)  # clicks; the long waits pass their own timeout
            yield page
        finally:
            context.close()


def wait_for_kernel(page, log_path: Path) -> None:
    """Wait until the notebook's python3 kernel is started and idle.

    JupyterLab sometimes asks which kernel to use although the notebook names ``python3`` (when
    the kernelspecs arrive after the notebook opens): answer with the notebook's own kernel.
    """
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        dialog = page.locator(".jp-Dialog")
        if dialog.count() and "Select Kernel" in dialog.first.inner_text():
            dialog.locator("select").first.select_option(label="Python 3 (ipykernel)")
            dialog.locator(".jp-mod-accept").first.click()
        name = page.locator(".jp-KernelName")
        indicator = page.locator('.jp-Notebook-ExecutionIndicator[data-status="idle"]')
        if name.count() and "ipykernel" in name.first.inner_text() and indicator.count():
            return
        page.wait_for_timeout(250)
    fail_with_evidence(page, log_path, "the notebook's kernel did not start within 120 s")


def menu(page, title: str, command: str) -> None:
    """Click a main-menu entry, e.g. Run → Run All Cells (``runmenu:run-all``)."""
    page.locator(".lm-MenuBar-item", has_text=title).first.click()
    page.locator(f'.lm-Menu-item[data-command="{command}"]').first.click()


def wait_until_done(page, log_path: Path) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        result = page.wait_for_function(DONE_JS, timeout=TIMEOUT_MS, polling=250).json_value()
    except PlaywrightTimeout:
        fail_with_evidence(page, log_path, f"the notebook did not finish within {TIMEOUT_MS // 1000} s")
    if result != "done":
        fail_with_evidence(page, log_path, f"a cell failed in JupyterLab: {result}")


def fail_with_evidence(page, log_path: Path, message: str) -> None:
    """Fail with the kernel state, the cell prompts, a screenshot and the server log's tail."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "browser-failure.png"
    page.screenshot(path=str(shot))
    state = page.evaluate(
        """() => ({
          kernel: document.querySelector('.jp-Notebook-ExecutionIndicator')?.dataset.status,
          prompts: [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')].map(e => e.textContent.trim()),
          dialogs: [...document.querySelectorAll('.jp-Dialog')].map(e => e.textContent.slice(0, 300)),
        })"""
    )
    pytest.fail(f"{message}\nstate: {state}\nscreenshot: {shot}\n--- server log ---\n{log_path.read_text()[-3000:]}")


def widget_states(page, expected_count: int) -> list[str]:
    """The states shown by the status widgets, once all of them have rendered their final state."""
    page.wait_for_function(
        f"""() => {{
          const states = ({STATES_JS})();
          return states.length === {expected_count} && states.every(s => s !== 'running');
        }}""",
        timeout=TIMEOUT_MS,
        polling=250,
    )
    return page.evaluate(STATES_JS)


def screenshot(page, name: str, widget: int = 0) -> Path:
    """Scroll the cell of the ``widget``-th status card (and its heading) to the top; save a screenshot."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.locator(".dreamer-status").nth(widget).evaluate(
        """e => {
          const cell = e.closest('.jp-Cell');
          const above = cell.previousElementSibling;
          (above && above.classList.contains('jp-MarkdownCell') ? above : cell).scrollIntoView({block: 'start'});
        }"""
    )
    page.wait_for_timeout(300)
    path = ARTIFACTS / name
    page.locator(".jp-NotebookPanel").first.screenshot(path=str(path))
    return path


@pytest.mark.timeout(300)
def test_notebook_in_jupyterlab_shows_status_widgets(lab, browser_page):
    url, root, log_path = lab
    page = browser_page
    expected = dreamer_cell_count(root / NOTEBOOK)
    assert expected >= 2

    page.goto(url)
    wait_for_kernel(page, log_path)
    # the file browser takes space in the screenshots; close the left sidebar
    current_tab = page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current")
    if current_tab.count():
        current_tab.first.click()

    # First run: computes. Each step cell shows a widget; the first one ran.
    menu(page, "Run", "runmenu:run-all")
    wait_until_done(page, log_path)
    first = widget_states(page, expected)
    assert first[0] == "ran", first
    assert set(first) <= {"ran"} | HIT_STATES, first
    if "%%dreamer_train" in (root / NOTEBOOK).read_text():
        # a trainer card draws its loss curve (an inline SVG) and lists its checkpoints
        assert page.locator(".dreamer-status .dreamer-loss-svg").count() >= 1
        assert page.locator(".dreamer-status .dreamer-checkpoint").count() >= 1
    # no card is left as a widget that a reopened notebook could not draw
    assert page.locator(".jp-OutputArea-output", has_text="Error displaying widget").count() == 0
    screenshot(page, "browser-first-run.png")
    # for the README: the trainer's card (progress, loss curve, checkpoints), else the first card
    best = page.evaluate(
        """() => [...document.querySelectorAll('.dreamer-status')].findIndex(
             e => e.querySelector('.dreamer-kind')?.textContent.trim() === 'trainer')"""
    )
    shot = screenshot(page, "browser-first-run-trainer.png", max(best, 0))

    # Second run in a fresh kernel: everything loads from disk or comes back from a backup.
    menu(page, "Kernel", "kernelmenu:restart-and-clear")
    page.locator(".jp-Dialog .jp-mod-accept").first.click()
    page.wait_for_function("() => document.querySelectorAll('.dreamer-status').length === 0", timeout=TIMEOUT_MS)
    wait_for_kernel(page, log_path)
    menu(page, "Run", "runmenu:run-all")
    wait_until_done(page, log_path)
    second = widget_states(page, expected)
    assert set(second) <= HIT_STATES, second
    assert "loaded from disk" in second, second
    screenshot(page, "browser-second-run.png")

    if not SCREENSHOT.exists() or os.environ.get("DREAMER_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, SCREENSHOT)


@pytest.mark.timeout(400)
def test_exported_html_of_a_headless_run_shows_the_cards(tmp_path, browser_page):
    """``jupyter nbconvert --execute --to html`` (nbclient, then the HTMLExporter), opened from
    disk in Chromium with no network: every card shows its final state, none is blank."""
    import nbformat
    from nbclient import NotebookClient
    from nbconvert import HTMLExporter

    work = tmp_path / "run"
    work.mkdir()
    shutil.copy(REPO / "notebooks" / NOTEBOOK, work / NOTEBOOK)
    nb = nbformat.read(work / NOTEBOOK, as_version=4)
    old = os.environ.get("DREAMER_OUTPUT")
    os.environ["DREAMER_OUTPUT"] = str(tmp_path / "output")
    try:
        NotebookClient(nb, kernel_name="python3", timeout=240, startup_timeout=120,
                       resources={"metadata": {"path": str(work)}}).execute()
    finally:
        if old is None:
            os.environ.pop("DREAMER_OUTPUT", None)
        else:
            os.environ["DREAMER_OUTPUT"] = old
    html, _ = HTMLExporter().from_notebook_node(nb)
    page_path = tmp_path / "quickstart.html"
    page_path.write_text(html, encoding="utf-8")

    page = browser_page
    page.goto(page_path.as_uri())
    page.wait_for_selector(".dreamer-status .dreamer-state")
    expected = dreamer_cell_count(work / NOTEBOOK)
    states = page.evaluate(STATES_JS)
    assert len(states) == expected and set(states) <= {"ran"} | HIT_STATES, states
    visible = page.locator(".dreamer-status").evaluate_all("els => els.map(e => e.getBoundingClientRect().height)")
    assert len(visible) == expected and all(h > 20 for h in visible), visible  # drawn, not a blank space
    if "%%dreamer_train" in (work / NOTEBOOK).read_text():
        assert page.locator(".dreamer-status .dreamer-loss-svg").count() >= 1
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    best = page.evaluate(
        """() => [...document.querySelectorAll('.dreamer-status')].findIndex(e => e.dataset.kind === 'trainer')"""
    )
    card = page.locator(".dreamer-status").nth(max(best, 0))
    card.scroll_into_view_if_needed()
    card.evaluate("e => e.closest('.jp-Cell').scrollIntoView({block: 'start'})")
    page.wait_for_timeout(200)
    page.screenshot(path=str(ARTIFACTS / "exported-html.png"))
