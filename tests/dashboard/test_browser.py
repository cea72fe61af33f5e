"""The dashboard in a real browser: ``streamlit run`` on a free port, every page opened in headless Chromium.

Uses Debian's ``chromium`` and ``chromium-driver`` (``make system-deps`` installs them) through
Selenium; skips, saying why, only when they are not installed. Screenshots go to ``var/screenshots/``.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from pipelines import localstack
from pipelines.experiment import Experiment
from pipelines.state import OnlineState
from dashboard import abrun
from tests.dashboard.conftest import APP
from tests.dashboard.test_dashboard import seed_lake, seed_quality, seed_redis

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SCREENSHOTS = Path("var/screenshots")
CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1400,2600")

pytestmark = pytest.mark.skipif(
    not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
    reason=f"no headless browser: install Debian's chromium and chromium-driver (`make system-deps`); "
           f"looked for {CHROMIUM} and {CHROMEDRIVER}")

#: url path, title, texts that must render (the seeded data of test_dashboard), charts drawn
PAGES = [
    ("", "Overview", ["Champion", "v1", "Events (window)", "60", "≤ 15 ms", "Refused records", "Duplicates dropped"], 1),
    ("ab_test", "A/B test", ["champion CTR", "5.00 %", "8.00 %", "4.000", "5.000", "60.0 %", "not enough data"], 1),
    ("cold_start", "Cold start", ["From new users", "33.3 %", "New products", "60 min", "2.50 %"], 3),
    ("cache", "Cache", ["Hit rate", "30.0 %", "champion hit rate", "40.0 %", "Memory used"], 2),
    ("data_quality", "Data quality", ["Partitions failing", "2026-11-24-12:00", "1 partition(s) fail validation",
                                      "Failing expectations"], 0),
]


@pytest.fixture()
def streamlit_url(tmp_path):
    """``streamlit run`` of the dashboard on a free port (environment as set by the test), until the test ends."""
    port = localstack.free_port()
    cmd = [sys.executable, "-m", "streamlit", "run", APP, "--server.port", str(port), "--server.address",
           "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false",
           "--server.fileWatcherType", "none"]
    with localstack.running(cmd, port, tmp_path / "streamlit.log", timeout=60, health_path="/_stcore/health"):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture()
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in CHROME_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path / 'chrome-profile'}")
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def open_page(driver, url: str, title: str, expected: list[str], shot: str, timeout: float = 45,
              charts: int = 0) -> str:
    """Open ``url``, wait until the title, every expected text and ``charts`` drawn charts render, save a
    screenshot; returns the page text."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)

    def rendered(d):
        heads = [h.text for h in d.find_elements(By.TAG_NAME, "h1")]
        body = d.find_element(By.TAG_NAME, "body").text
        drawn = len(d.find_elements(By.CSS_SELECTOR, ".vega-embed canvas, .vega-embed svg.marks"))
        ok = title in heads and all(t in body for t in expected) and "Running..." not in body and drawn >= charts
        return body if ok else False

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    try:
        body = WebDriverWait(driver, timeout, poll_frequency=0.25).until(rendered)
    except TimeoutException:
        driver.save_screenshot(str(SCREENSHOTS / f"FAILED-{shot}.png"))
        body = driver.find_element(By.TAG_NAME, "body").text
        missing = [t for t in [title, *expected] if t not in body] or [f"{charts} charts"]
        raise AssertionError(f"{url}: {missing} did not render within {timeout}s; page text:\n{body[:3000]}") from None
    driver.save_screenshot(str(SCREENSHOTS / f"{shot}.png"))
    return body


def test_every_page_renders_in_chromium(dashboard_env, redis_client, redis_url, mlflow_with_champion, request):
    s = dashboard_env(redis_url, mlflow_with_champion, SHOPREC_DAGSTER_URL="http://dagster.example:3000")
    seed_redis(OnlineState(redis_client))
    seed_lake(s)
    seed_quality(s)
    url = request.getfixturevalue("streamlit_url")
    driver = request.getfixturevalue("browser")
    for path, title, expected, n_charts in PAGES:
        body = open_page(driver, f"{url}/{path}", title, expected, f"page-{path or 'overview'}", charts=n_charts)
        assert "Traceback" not in body
    for path, *_ in PAGES:
        assert (SCREENSHOTS / f"page-{path or 'overview'}.png").stat().st_size > 10_000


def test_pages_say_what_is_down_in_chromium(dashboard_env, request):
    dashboard_env("redis://127.0.0.1:1/0", "http://127.0.0.1:1")
    url = request.getfixturevalue("streamlit_url")
    driver = request.getfixturevalue("browser")
    open_page(driver, f"{url}/", "Overview", ["Redis is down", "MLflow is down"], "down-overview")
    open_page(driver, f"{url}/ab_test", "A/B test", ["Redis is down"], "down-ab_test")


@pytest.mark.slow
def test_simulated_ab_run_in_chromium(dashboard_env, redis_client, redis_url, request):
    """BPR against popularity on the closed-loop simulator, as the A/B page shows it (docs/ab_test.png)."""
    s = dashboard_env(redis_url, "http://127.0.0.1:1")
    sim, models = abrun.trained_world()
    fn = abrun.recommend_fn({"champion": models["popularity"], "challenger": models["bpr"]},
                            Experiment("default", "ab-screenshot", {"champion": 0.5, "challenger": 0.5}))
    now = int(time.time() * 1000)
    events = abrun.run_sessions(sim, fn, 30_000, start_ms=now - 6 * 3_600_000, end_ms=now - 60_000)
    abrun.record(OnlineState(redis_client), events, s.lake_dir)
    url = request.getfixturevalue("streamlit_url")
    driver = request.getfixturevalue("browser")
    body = open_page(driver, f"{url}/ab_test", "A/B test", ["winner: challenger", "challenger wins", "CTR lift"],
                     "ab_test-simulated", charts=1)
    assert "Sample-ratio mismatch" not in body
