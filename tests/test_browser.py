"""End to end in a real browser: ``streamlit run app.py`` driven by headless Chromium.

Loads the demo model (SmolLM2-135M; ``GQAPRUNE_BROWSER_MODEL=tiny`` for a fast local check),
computes layer importance, moves a rate slider and checks that the chart changes, runs a small
pruning job and waits for its results table. Screenshots of every page go to
``tests/artifacts/`` (git-ignored). Needs Debian's ``chromium`` and the playwright package;
skips with the reason otherwise.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]



def _missing() -> str:
    """Why the test cannot run here ('' when it can)."""
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium)"
    if importlib.util.find_spec("playwright") is None:
        return "the playwright package is not installed (pip install playwright)"
    return ""


pytestmark = [pytest.mark.browser, pytest.mark.skipif(bool(_missing()), reason=_missing())]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, server: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"streamlit exited early with code {server.returncode}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        time.sleep(0.5)
    raise TimeoutError(f"streamlit did not answer on {url} within {timeout:.0f} s")


@pytest.fixture
def app_url(tmp_path):
    """A streamlit server on a free local port, stopped afterwards."""
    port = _free_port()
    env = os.environ | {"GQAPRUNE_APP_QUICK": "1",
                        "GQAPRUNE_APP_MODEL": os.environ.get("GQAPRUNE_BROWSER_MODEL", "demo")}
    log = (tmp_path / "streamlit.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
         "--server.address", "127.0.0.1", "--server.port", str(port),
         "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, server)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def _browser(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def _open_page(page, title: str) -> None:
    page.get_by_test_id("stSidebarNav").get_by_text(title, exact=True).click()
    page.get_by_role("heading", name=title, exact=True).first.wait_for(timeout=60_000)


BUSY = ", ".join(f"[data-testid={name}]" for name in (
    "stSkeleton", "stSkeletonElement", "stAppSkeleton", "stStatusWidgetRunningIcon",
    "stStatusWidgetRunningManIcon", "stProgress", "stSpinner", "stExpanderIconSpinner"))


def _wait_idle(page, timeout: float = 240.0) -> None:
    """Until no script runs, no job is in progress and every element has loaded, for 1 s."""
    deadline, quiet = time.monotonic() + timeout, 0
    while quiet < 4:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the app stayed busy for {timeout:.0f} s")
        busy = page.evaluate(f"() => document.querySelectorAll({BUSY!r}).length")
        quiet = 0 if busy else quiet + 1
        page.wait_for_timeout(250)


def _shot(page, name: str) -> None:
    """A screenshot of the whole page: the viewport grows to the height of the main area,
    which scrolls on its own (a full-page screenshot would stop at the window)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    height = page.evaluate(
        "() => Math.max(document.body.scrollHeight, ...[...document.querySelectorAll("
        "'[data-testid=stMain], [data-testid=stMainBlockContainer]')].map(e => e.scrollHeight))")
    size = page.viewport_size
    page.set_viewport_size({"width": size["width"], "height": min(max(size["height"], height), 5000)})
    page.wait_for_timeout(1000)  # Plotly and the data grids redraw at the new size
    _wait_idle(page)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))
    page.set_viewport_size(size)


def _choose(page, label: str, option: str) -> None:
    """Pick ``option`` (its visible text starts so) in the selectbox labelled ``label``."""
    page.get_by_test_id("stSelectbox").filter(
        has=page.get_by_text(label, exact=True)).locator("input").click()
    page.get_by_role("option").filter(has_text=option).first.click()


def _rate_bars(page) -> list[float]:
    """The y values of the planned-rate bars of the rate chart."""
    return page.evaluate(
        "() => { const plots = [...document.querySelectorAll('.js-plotly-plot')];"
        " for (const p of plots) { const bars = (p.data || []).find("
        "   t => t.type === 'bar' && String(t.name).startsWith('planned rate'));"
        "   if (bars) return Array.from(bars.y); } return null; }")


def test_app_end_to_end(app_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = _browser(playwright)
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        try:
            page.set_default_timeout(60_000)
            page.goto(app_url)
            page.get_by_role("heading", name="gqaprune").wait_for()
            _shot(page, "0_home")

            _open_page(page, "Model")
            page.get_by_role("button", name="Load model").click()
            page.get_by_text("Architecture of").wait_for(timeout=180_000)
            _wait_idle(page)
            _shot(page, "1_model")

            _open_page(page, "GQA structure")
            page.locator(".js-plotly-plot").first.wait_for()
            _wait_idle(page)
            _shot(page, "2_gqa_structure")

            _open_page(page, "Layer importance")
            _choose(page, "Method", "activation")  # one forward pass: quick on a CPU
            page.get_by_role("button", name="Compute layer importance").click()
            page.get_by_text("Higher = more important").wait_for(timeout=240_000)
            _wait_idle(page)
            _shot(page, "3_layer_importance")

            _open_page(page, "Rate tuning")
            page.get_by_text("What each layer would keep").wait_for()
            _wait_idle(page)
            before = _rate_bars(page)
            assert before, "the rate chart shows no planned-rate bars"
            slider = page.get_by_test_id("stSlider").filter(has_text="Target pruning ratio")
            slider.get_by_role("slider").focus()
            for _ in range(10):
                page.keyboard.press("ArrowRight")
            deadline = time.monotonic() + 30
            after = before
            while after == before and time.monotonic() < deadline:
                page.wait_for_timeout(500)
                after = _rate_bars(page)
            assert after != before, "moving the target slider did not change the rate chart"
            assert sum(after) > sum(before), (before, after)
            _shot(page, "4_rate_tuning")

            _open_page(page, "Prune & evaluate")
            _choose(page, "Mode", "one-shot")  # one backward pass scores every layer
            page.get_by_role("button", name="Prune a copy of the model").click()
            page.get_by_text("Per layer, before and after").wait_for(timeout=600_000)
            _wait_idle(page)
            table = page.get_by_test_id("stDataFrame").first
            assert table.is_visible()
            _shot(page, "5_prune")

            _open_page(page, "Export")
            page.get_by_role("button", name="Plan (JSON)").wait_for()
            _shot(page, "6_export")
        except BaseException:
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "failure.png"))
            raise
        finally:
            browser.close()
