"""The e2e tier: real processes and services (`ray start` + `ray job submit`, the `ray-retina` CLI killed
and resumed, an `mlflow server` and a browser, a two-node cluster). Each module starts what it needs and
stops it; nothing is shared with the other tiers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from _ray_utils import local_ray


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray cluster for the module, as `ray_session` of the integration tier: 4 logical CPUs on the
    2 cores (train workers + data tasks)."""
    with local_ray(num_cpus=4) as ray:
        yield ray


# The MLflow UI screenshots: headless Debian chromium driven by Playwright (no browser is downloaded). They go to
# tmp_path; `make docs` sets RAY_RETINA_DOCS_DIR=docs to refresh docs/*.png on purpose.
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DOCS_ENV = "RAY_RETINA_DOCS_DIR"


@pytest.fixture
def shot_dir(tmp_path) -> Path:
    """Where a test writes its screenshot: $RAY_RETINA_DOCS_DIR when set, else the test's tmp_path (never
    the repository by default)."""
    d = Path(os.environ.get(DOCS_ENV) or tmp_path).resolve()
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture
def browser_page():
    """A 1600x1000 page in headless chromium. Skipped without chromium, except under `make docs`: a
    screenshot asked for is made or the test fails."""
    if not Path(CHROMIUM).exists() and not os.environ.get(DOCS_ENV):
        pytest.skip("needs Debian chromium (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            yield browser.new_page(viewport={"width": 1600, "height": 1000})
        finally:
            browser.close()


@pytest.fixture
def open_mlflow_page(browser_page):
    """`open_mlflow_page(url, ready_text) -> page`: open an MLflow UI page, wait for `ready_text`, then close
    the side panels that would cover it (the navigation sidebar and, when it opens by itself, the MLflow
    Assistant)."""

    def open_page(url: str, ready_text: str):
        page = browser_page
        # "load", not "networkidle": the UI keeps polling, so the network may never stay quiet for 500 ms
        # (it timed out once in CI); the wait on the page's text is the readiness check.
        page.goto(url, wait_until="load", timeout=60_000)
        page.get_by_text(ready_text).first.wait_for(timeout=60_000)
        close = page.locator("[data-component-id='mlflow.assistant.chat_panel.close']")
        if close.count():
            close.first.click()
        page.get_by_role("button", name="Toggle sidebar").click()
        return page

    return open_page
