"""Fixtures of the browser tests: one headless Chromium for the session (its cookies cleared
before each test) and, per module, the whole stack it looks at (`tests/browser/stack.py`)."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.browser.stack import Stack, browser_missing, open_browser, running_stack

if TYPE_CHECKING:
    from selenium.webdriver.chrome.webdriver import WebDriver

_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Note a failed test body, so that `browser` shows where the page was."""
    report: pytest.TestReport = yield
    if report.when == "call" and report.failed:
        item.stash[_FAILED] = True
    return report


@pytest.fixture(scope="session")
def chromium() -> Iterator[WebDriver]:
    """A headless Chromium (1280x800) for the whole session."""
    missing = browser_missing()
    if missing is not None:
        pytest.fail(missing, pytrace=False)
    driver = open_browser()
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def browser(chromium: WebDriver, request: pytest.FixtureRequest) -> Iterator[WebDriver]:
    """The session's Chromium with no cookies (nobody signed in) on a blank page; prints the
    page it was on when the test failed."""
    chromium.execute_cdp_cmd("Network.clearBrowserCookies", {})
    chromium.get("about:blank")
    yield chromium
    if request.node.stash.get(_FAILED, False):
        body = chromium.execute_script("return document.body ? document.body.innerText : ''")
        print(f"browser was at {chromium.current_url}:\n{str(body)[:3000]}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """redis-server, a worker running the pipeline and `omnidaemon api`, for one module."""
    directory: Path = tmp_path_factory.mktemp("dashboard")
    with running_stack(directory) as running:
        yield running
