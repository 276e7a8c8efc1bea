"""The commands that read an app, not a bus (`agents`, `graph`), and the refusal of bad
arguments, run in the test process (`tests/e2e/_in_process.py`: what they print and their exit
status need no process of their own). Apart from `test_cli_commands.py` (whose tests share a
bus and a worker process)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from tests.e2e._in_process import Ran
from tests.e2e._support import cli_env, write_module
from tests.e2e.test_cli_commands import parse, rows, run

SHOP_APP = '''
    from pydantic import BaseModel

    from omnidaemon import App

    app = App("shop")


    class Order(BaseModel):
        sku: str
        qty: int


    class Checked(BaseModel):
        sku: str
        in_stock: bool


    @app.agent("order.placed", publishes="order.checked", max_retries=5, timeout=10)
    async def check(order: Order) -> Checked:
        """Checks the stock."""
        return Checked(sku=order.sku, in_stock=True)


    @app.agent("order.checked", concurrency=4)
    async def ship(checked: Checked) -> None:
        """Ships what is in stock."""
'''


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cwd = tmp_path_factory.mktemp("shop")
    write_module(cwd, "shop", SHOP_APP)
    return cwd


def test_agents_lists_the_apps_agents(shop: Path) -> None:
    env = cli_env()
    as_json, plain = (run(["agents", "shop:app", *extra], env, shop) for extra in (["--json"], []))

    check, ship = parse(as_json)
    assert check["name"] == "check"
    assert (check["topic"], check["publishes"]) == ("order.placed", "order.checked")
    assert (check["payload_type"], check["return_type"]) == ("Order", "Checked")
    assert (check["max_retries"], check["timeout"]) == (5, 10.0)
    assert check["description"] == "Checks the stock."
    assert check["handler"] == "shop.check"
    assert (ship["name"], ship["topic"], ship["concurrency"]) == ("ship", "order.checked", 4)
    assert ship["publishes"] is None

    assert plain.returncode == 0, plain.stderr
    table = rows(plain.stdout)
    assert table[0] == ["app", "shop:", "2", "agents:"]
    assert table[1] == [
        "AGENT", "TOPIC", "PAYLOAD", "RETURNS", "PUBLISHES", "RETRIES", "CONCURRENCY", "TIMEOUT",
    ]  # fmt: skip
    assert table[2] == [
        "check",
        "order.placed",
        "Order",
        "Checked",
        "order.checked",
        "5",
        "16",
        "10s",
    ]
    assert table[3] == ["ship", "order.checked", "Checked", "None", "-", "3", "4", "-"]


def test_graph_draws_the_event_flow(shop: Path) -> None:
    env = cli_env()
    mermaid, dot = (
        run(["graph", "shop", *extra], env, shop) for extra in ([], ["--format", "dot"])
    )

    assert mermaid.returncode == 0, mermaid.stderr
    lines = [line.strip() for line in mermaid.stdout.splitlines()]
    assert lines[0] == "flowchart LR"
    assert 't0(["order.placed"])' in lines
    assert "t0 -->|Order| a_check" in lines
    assert "a_check -->|Checked| t1" in lines
    assert 't1(["order.checked"])' in lines
    assert "t1 -->|Checked| a_ship" in lines

    assert dot.returncode == 0, dot.stderr
    lines = [line.strip() for line in dot.stdout.splitlines()]
    assert lines[0] == "digraph omnidaemon {"
    assert '"topic:order.placed" -> "agent:check" [label="Order"];' in lines
    assert '"agent:check" -> "topic:order.checked" [label="Checked"];' in lines
    assert '"topic:order.checked" -> "agent:ship" [label="Checked"];' in lines
    assert lines[-1] == "}"


# --- bad arguments ------------------------------------------------------------------------------

BAD_ARGUMENTS: list[tuple[str, list[str], str | None, str]] = [
    # (the command that complains, the arguments, standard input, a fragment of the message)
    ("worker", ["worker", "shop:app", "--concurrency", "0"], None, "'--concurrency' ('0')"),
    # Other bad app paths (a missing module or attribute) are in test_cli_loader.py.
    ("worker", ["worker", "not a path"], None, "cannot import 'not a path'"),
    ("publish", ["publish", "Bad Topic", "{}"], None, "invalid topic name 'Bad Topic'"),
    ("publish", ["publish", "t.x", "{not json"], None, "DATA is not valid JSON"),
    ("publish", ["publish", "t.x", "-"], "{not json", "standard input is not valid JSON"),
    (
        "publish",
        ["publish", "t.x", "@missing.json"],
        None,
        "Invalid value for DATA: cannot read missing.json",
    ),
    ("publish", ["publish", "t.x", "{}", "--wait", "--reply-to", "r.x"], None, "--reply-to"),
    ("result", ["result", "e", "--timeout", "0"], None, "'--timeout' ('0')"),
    ("agents", ["agents", "no_such_module_xyz"], None, "cannot import 'no_such_module_xyz'"),
    ("graph", ["graph", "shop:app", "--format", "svg"], None, "'--format' ('svg')"),
    ("metrics", ["metrics", "--bogus"], None, "No such option: --bogus"),
    ("metrics", ["metrics", "--broker", "ftp://x"], None, "unsupported broker URL scheme"),
    ("health", ["health", "--max-lag", "-1"], None, "'--max-lag' ('-1')"),
    ("bus list", ["bus", "list", "extra"], None, "extra argument"),
    ("bus inspect", ["bus", "inspect", "t.x", "-n", "0"], None, "'--limit' ('0')"),
    ("bus groups", ["bus", "groups"], None, "Missing argument 'TOPIC'"),
    ("bus stats", ["bus", "stats", "--bogus"], None, "No such option: --bogus"),
    ("bus dlq", ["bus", "dlq", "--limit", "abc"], None, "'--limit' ('abc')"),
    ("bus replay", ["bus", "replay", "t.x", "--agent", "a"], None, "--id"),
    (
        "bus replay",
        ["bus", "replay", "t.x", "--agent", "a", "--id", "e", "--all"],
        None,
        "not both",
    ),
    ("bus purge", ["bus", "purge", "t.x"], None, "--yes"),
    (
        "bus purge",
        ["bus", "purge", "t.x", "--agent", "a", "--yes"],
        None,
        "--agent goes with --dlq",
    ),
    ("bus stop", ["bus", "stop", "--timeout", "0"], None, "'--timeout' ('0')"),
    ("bus status", ["bus", "status", "--bogus"], None, "No such option: --bogus"),
    ("bus ps", ["bus", "ps", "extra"], None, "unexpected extra argument(s) (extra)"),
    ("bus stop", ["bus", "stop", "/tmp/" + "x" * 120], None, "shorter"),
    ("bus init", ["bus", "init", "/tmp/" + "x" * 120], None, "shorter"),
    ("bus", ["bus", "nothing"], None, "No such command 'nothing'"),
    ("", ["nothing"], None, "No such command 'nothing'"),
]


@pytest.fixture(scope="module")
def bad_runs(shop: Path) -> dict[int, Ran]:
    """Every row of BAD_ARGUMENTS run, by row: none may reach a bus."""
    home = Path(tempfile.mkdtemp(prefix="odb"))
    env = cli_env(OMNIDAEMON_HOME=str(home))  # memory://, and no embedded server to be found
    try:
        return {i: run(row[1], env, shop, row[2]) for i, row in enumerate(BAD_ARGUMENTS)}
    finally:
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.parametrize(
    "index",
    range(len(BAD_ARGUMENTS)),
    ids=[" ".join(row[1]) for row in BAD_ARGUMENTS],
)
def test_a_bad_argument_is_one_line_and_status_2(bad_runs: dict[int, Ran], index: int) -> None:
    command, _, _, fragment = BAD_ARGUMENTS[index]
    done = bad_runs[index]

    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == ""
    [line] = done.stderr.splitlines()
    prefix = f"omnidaemon {command}" if command else "omnidaemon"
    assert line.startswith(f"{prefix}: error: "), line
    assert fragment in line, line
