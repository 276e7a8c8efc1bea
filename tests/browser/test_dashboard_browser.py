"""The dashboard in a real browser (headless Chromium): signing in, the overview updating
itself, reading and replaying a dead letter, a read-only token refused an action, and the
graph leading to the agents. The stack behind it is real: redis-server, a worker process
running a document pipeline, and `omnidaemon api` (`tests/browser/stack.py`)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import pytest
from selenium.common.exceptions import (
    NoAlertPresentException,
    NoSuchElementException,
    StaleElementReferenceException,
)
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

import omnidaemon.api  # noqa: F401  (first: omnidaemon.dashboard alone is a circular import)
from omnidaemon.dashboard.session import csrf_token
from tests.browser.stack import ADMIN_TOKEN, AGENTS, READ_TOKEN, TOPICS, UPLOADED, Stack

if TYPE_CHECKING:
    from selenium.webdriver.chrome.webdriver import WebDriver
    from selenium.webdriver.remote.webelement import WebElement

pytestmark = pytest.mark.slow

_FLAKY_DOM = (NoSuchElementException, StaleElementReferenceException)
DEAD_LETTERS = f"/ui/dead-letters/{quote(UPLOADED)}"


def wait(browser: WebDriver, timeout: float = 10) -> WebDriverWait[WebDriver]:
    """A wait that retries while the live part swaps the element it reads."""
    return WebDriverWait(browser, timeout, poll_frequency=0.1, ignored_exceptions=_FLAKY_DOM)


def path_of(browser: WebDriver) -> str:
    return urlsplit(browser.current_url).path


def sign_in(browser: WebDriver, stack: Stack, token: str, page: str = "/ui/") -> None:
    """Open `page`, be sent to the sign-in form, sign in with `token` and land on `page`."""
    browser.get(f"{stack.url}{page}")
    field = wait(browser).until(lambda b: b.find_element(By.ID, "token"))
    assert path_of(browser) == "/ui/login"
    field.send_keys(token)
    browser.find_element(By.CSS_SELECTOR, "form[action='/ui/login'] button[type=submit]").click()
    wait(browser).until(lambda b: path_of(b) == page)


def count(browser: WebDriver, agent: str, kind: str = "succeeded") -> int:
    """An agent's count on the overview, as shown."""
    cell = browser.find_element(
        By.CSS_SELECTOR, f'tr[data-agent="{agent}"] td[data-count="{kind}"]'
    )
    return int(cell.text)


def row_of(browser: WebDriver, event_id: str) -> WebElement:
    return browser.find_element(
        By.CSS_SELECTOR, f'[data-testid="dead-letter-row"][data-event-id="{event_id}"]'
    )


def accept_confirm(browser: WebDriver) -> None:
    """Accept the page's "are you sure?" if it asks one."""
    with contextlib.suppress(NoAlertPresentException):
        browser.switch_to.alert.accept()


def test_signing_in_shows_the_pipeline(browser: WebDriver, stack: Stack) -> None:
    sign_in(browser, stack, ADMIN_TOKEN)
    assert "ops" in browser.find_element(By.CSS_SELECTOR, "header .who").text
    for agent, topic in zip(AGENTS, TOPICS, strict=True):
        row = browser.find_element(By.CSS_SELECTOR, f'tr[data-agent="{agent}"]')
        assert agent in row.text and topic in row.text
    wait(browser).until(
        lambda b: b.find_element(By.CSS_SELECTOR, '[data-testid="worker-count"]').text == "1"
    )


def test_the_overview_counts_without_reloading(browser: WebDriver, stack: Stack) -> None:
    sign_in(browser, stack, READ_TOKEN)
    before = {agent: count(browser, agent) for agent in AGENTS}
    browser.execute_script("window.sameDocument = true;")  # gone if the page reloads
    for n in range(3):
        stack.publish_document(f"q{n}")
    wait(browser, 15).until(lambda b: all(count(b, a) == before[a] + 3 for a in AGENTS))
    assert browser.execute_script("return window.sameDocument === true;")
    assert count(browser, "extract_text", "received") >= before["extract_text"] + 3


def test_a_dead_letter_is_read_and_replayed(browser: WebDriver, stack: Stack) -> None:
    event_id = stack.publish_document("corrupt", poison="replay")
    stack.wait_dead_lettered(event_id)
    sign_in(browser, stack, ADMIN_TOKEN)
    succeeded = count(browser, "extract_text")

    browser.get(f"{stack.url}{DEAD_LETTERS}")
    row = wait(browser).until(lambda b: row_of(b, event_id))
    assert "ValueError" in row.text and "broken xref table" in row.text  # the error, at a glance
    details = row.find_element(By.CSS_SELECTOR, 'details[data-testid="traceback"]')
    traceback = details.find_element(By.TAG_NAME, "pre")
    assert not traceback.is_displayed()
    details.find_element(By.TAG_NAME, "summary").click()
    wait(browser).until(lambda b: traceback.is_displayed())
    shown = traceback.text
    assert shown.startswith("Traceback"), shown
    assert "ValueError: cannot parse reports/corrupt.pdf: broken xref table" in shown

    stack.heal("replay")
    row.find_element(By.CSS_SELECTOR, '[data-testid="replay-one"]').click()
    accept_confirm(browser)
    flash = wait(browser).until(lambda b: b.find_element(By.CSS_SELECTOR, '[data-testid="flash"]'))
    assert path_of(browser) == DEAD_LETTERS and flash.text == "replayed 1"
    assert not browser.find_elements(
        By.CSS_SELECTOR, f'[data-testid="dead-letter-row"][data-event-id="{event_id}"]'
    )
    assert event_id not in stack.dead_letter_ids()

    browser.get(f"{stack.url}/ui/")
    wait(browser, 15).until(lambda b: count(b, "extract_text") == succeeded + 1)


def test_a_read_token_sees_no_replay_and_is_refused_one(browser: WebDriver, stack: Stack) -> None:
    event_id = stack.publish_document("broken", poison="forged")
    stack.wait_dead_lettered(event_id)
    # The replay form an admin is shown: where it posts and what it sends.
    sign_in(browser, stack, ADMIN_TOKEN, DEAD_LETTERS)
    button = wait(browser).until(
        lambda b: row_of(b, event_id).find_element(By.CSS_SELECTOR, '[data-testid="replay-one"]')
    )
    form: dict[str, Any] = browser.execute_script(
        """const button = arguments[0], form = button.form;
        const fields = [...new FormData(form).entries()];
        if (button.name) fields.push([button.name, button.value]);
        return {action: form.action, fields};""",
        button,
    )

    browser.execute_cdp_cmd("Network.clearBrowserCookies", {})
    sign_in(browser, stack, READ_TOKEN, DEAD_LETTERS)
    assert row_of(browser, event_id).is_displayed()
    assert "read only" in browser.find_element(By.CSS_SELECTOR, "header .who").text
    assert not browser.find_elements(By.CSS_SELECTOR, '[data-testid="replay-one"]')
    assert not browser.find_elements(By.CSS_SELECTOR, "form[method=post] [name=csrf]")

    # Forged from the read session's own page: its cookie, its origin, its valid CSRF token.
    fields = [
        [name, csrf_token(READ_TOKEN) if name == "csrf" else value]
        for name, value in form["fields"]
    ]
    answer: dict[str, Any] = browser.execute_async_script(
        """const [action, fields, done] = arguments;
        fetch(action, {method: "POST", body: new URLSearchParams(fields),
                       credentials: "same-origin", redirect: "manual"})
          .then(async (r) => done({status: r.status, text: await r.text()}))
          .catch((e) => done({status: -1, text: String(e)}));""",
        form["action"],
        fields,
    )
    assert answer["status"] == 403, answer
    assert "may look but not act" in answer["text"]
    assert event_id in stack.dead_letter_ids()


def test_the_graph_shows_the_pipeline_and_leads_to_its_agents(
    browser: WebDriver, stack: Stack
) -> None:
    sign_in(browser, stack, READ_TOKEN, "/ui/graph")
    graph = wait(browser).until(
        lambda b: b.find_element(By.CSS_SELECTOR, 'svg[data-testid="graph"]')
    )
    for agent in AGENTS:
        assert graph.find_element(By.CSS_SELECTOR, f'[data-node="agent:{agent}"]').is_displayed()
    for topic in TOPICS:
        assert graph.find_element(By.CSS_SELECTOR, f'[data-node="topic:{topic}"]').is_displayed()
    graph.find_element(By.CSS_SELECTOR, '[data-node="agent:analyze"]').click()
    wait(browser).until(lambda b: path_of(b) == "/ui/agents/analyze")
    assert "analyze" in browser.find_element(By.TAG_NAME, "h1").text
