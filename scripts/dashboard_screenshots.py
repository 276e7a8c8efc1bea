"""Screenshots of the web dashboard for the docs: `docs/images/dashboard-<page>.png`.

Starts the stack the browser tests use (`tests/browser/stack.py`: a redis-server, a worker
running a small document pipeline, and `omnidaemon api`), drives the pipeline a little
(documents that go through, two that are dead-lettered, finished runs), signs in with
headless Chromium and photographs the overview, the graph, a topic, the dead letters, the
runs and one run's timeline at 1280x800, and the overview at phone size (390x844).

    .venv/bin/python scripts/dashboard_screenshots.py [--out docs/images]

Needs Debian's `chromium` and `chromium-driver` (scripts/test.sh installs them) and
redis-server; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the stack lives in the tests package

from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from tests.browser.stack import (  # noqa: E402
    ADMIN_TOKEN,
    AGENTS,
    UPLOADED,
    Stack,
    browser_missing,
    open_browser,
    running_stack,
)
from tests.e2e._support import wait_for  # noqa: E402

DESKTOP = (1280, 800)
PHONE = (390, 844)


def drive(stack: Stack) -> str:
    """Put some life on the bus: batches of documents a second or so apart (the overview's
    rate charts fill), two dead letters, and finished runs. Returns one finished run's id."""
    first = stack.publish_document("q1-report")
    for batch in range(4):
        for n in range(3):
            stack.publish_document(f"batch{batch}-{n}")
        if batch == 1:
            for name in ("corrupt", "scan-0042"):
                stack.wait_dead_lettered(stack.publish_document(name, poison="never"))
        time.sleep(1.2)  # spread over time, so the rates are charts rather than one spike

    def finished() -> bool:
        answer = stack.http.get(f"/v1/traces/{first}")
        return answer.status_code == 200 and answer.json()["status"] == "succeeded"

    wait_for(finished, 20, "the first document's run to finish")
    return first


def sign_in(browser: WebDriver, stack: Stack) -> None:
    """Sign in through the form with the admin token."""
    browser.get(f"{stack.url}/ui/login")
    field = browser.find_element(By.ID, "token")
    field.send_keys(ADMIN_TOKEN)
    field.submit()
    WebDriverWait(browser, 10).until(lambda d: d.current_url.endswith("/ui/"))


def shoot(browser: WebDriver, url: str, path: Path, size: tuple[int, int], ready: str) -> None:
    """Load `url` in a viewport of `size`, wait for the element `ready`, save a PNG."""
    width, height = size
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600},
    )
    browser.get(url)
    try:
        WebDriverWait(browser, 10).until(lambda d: d.find_element(By.CSS_SELECTOR, ready))
    except TimeoutException:
        raise SystemExit(f"{url} never showed {ready!r} (is the page built?)") from None
    browser.save_screenshot(str(path))
    print(f"saved {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args()
    missing = browser_missing()
    if missing is not None:
        print(missing, file=sys.stderr)
        return 1
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="od-shots") as tmp, running_stack(Path(tmp)) as stack:
        browser = open_browser(*DESKTOP)
        try:
            sign_in(browser, stack)  # admin: the pages show their actions
            run_id = drive(stack)
            dead = f"/ui/dead-letters/{quote(UPLOADED, safe='')}"
            pages = [
                ("overview", "/ui/", f'tr[data-agent="{AGENTS[-1]}"]', DESKTOP),
                ("graph", "/ui/graph", 'svg[data-testid="graph"]', DESKTOP),
                ("topic", f"/ui/topics/{quote(UPLOADED, safe='')}", "main h1", DESKTOP),
                ("dead-letters", dead, '[data-testid="dead-letter-row"]', DESKTOP),
                ("runs", "/ui/runs", "main h1", DESKTOP),
                ("run", f"/ui/runs/{quote(run_id, safe='')}", "main h1", DESKTOP),
                ("overview-phone", "/ui/", f'tr[data-agent="{AGENTS[-1]}"]', PHONE),
            ]
            for name, page, ready, size in pages:
                shoot(browser, stack.url + page, out / f"dashboard-{name}.png", size, ready)
        finally:
            browser.quit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
