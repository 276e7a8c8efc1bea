"""`omnidaemon cancel`, run in-process against Redis: an event or a run is recorded on the bus
as the workers read it, `--json` prints the record, and a command line that cannot mean
anything is one line on stderr with exit status 2."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import anyio
import pytest

from omnidaemon.brokers.redis import RedisBroker
from omnidaemon.cancellation import CancelRegistry
from omnidaemon.cli import main


def run_cli(*argv: str) -> int:
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    code = exited.value.code
    assert isinstance(code, int)
    return code


def known(url: str) -> CancelRegistry:
    async def load() -> CancelRegistry:
        async with RedisBroker(url) as broker:
            registry = CancelRegistry(broker)
            await registry.load()
            return registry

    return anyio.run(load)


def test_cancel_an_event_and_a_run(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    event_id, run = f"e-{uuid.uuid4().hex}", f"r-{uuid.uuid4().hex}"
    code = run_cli(
        "cancel", event_id, "--agent", "extract", "--reason", "wrong file", "--broker", redis_url
    )
    assert code == 0
    assert f"cancelled event {event_id} for extract" in capsys.readouterr().out
    assert run_cli("cancel", "--correlation-id", run, "--json", "--broker", redis_url) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["kind"] == "run" and record["target"] == run and record["agents"] is None
    registry = known(redis_url)
    created = datetime.now(UTC)
    found = registry.match(event_id, None, created, "extract")
    assert found is not None and found.reason == "wrong file"
    assert registry.match(event_id, None, created, "analyze") is None
    assert registry.match("another", run, created, "analyze") is not None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["cancel"], "one of the two"),
        (["cancel", "e1", "--correlation-id", "r1"], "one of the two"),
        (["cancel", "--correlation-id", "r1", "--agent", "a"], "every agent"),
    ],
)
def test_a_cancel_that_cannot_mean_anything_is_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(*argv, "--broker", "memory://") == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
