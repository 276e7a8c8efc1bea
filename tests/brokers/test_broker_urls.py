"""Broker URLs are shown with their credentials masked, whatever the broker: `redact_url`,
`Broker.url`, what the CLI prints (`bus stats`, `health`), and the supervisor's logs.

The NATS cases run against the session's nats-server, which has no authorization set up: it
accepts a connection that brings credentials, so the CLI really reaches the bus here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from omnidaemon.brokers import open_broker, redact_url
from tests.servers import free_port

SECRETS = ("hunter2", "s3cret-token")


def test_redact_url_masks_nats_passwords_tokens_and_secret_options() -> None:
    assert redact_url("nats://bob:hunter2@h:4222") == "nats://bob:***@h:4222"
    assert redact_url("nats://s3cret-token@h1:4222,h2:4223") == "nats://***@h1:4222,h2:4223"
    assert redact_url("tls://bob:hunter2@h:4222?tls_ca=/ca.pem") == (
        "tls://bob:***@h:4222?tls_ca=/ca.pem"
    )
    assert redact_url("NATS://s3cret-token@h") == "NATS://***@h"
    assert redact_url("nats://h:4222") == "nats://h:4222"
    # The other schemes keep the Redis broker's masking.
    assert redact_url("redis://:hunter2@h:6379/0") == "redis://:***@h:6379/0"
    assert redact_url("memory://bus") == "memory://bus"


def test_redact_url_masks_nats_urls_without_the_nats_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "omnidaemon.brokers.nats", None)  # import fails
    assert redact_url("nats://bob:hunter2@h:4222") == "nats://***@h:4222"
    assert redact_url("tls://s3cret-token@h:4222?creds=/x") == "tls://***@h:4222?***"
    assert redact_url("nats://h:4222") == "nats://h:4222"


def test_a_nats_brokers_url_is_masked() -> None:
    assert open_broker("nats://bob:hunter2@h:4222").url == "nats://bob:***@h:4222"
    assert open_broker("nats://s3cret-token@h:4222").url == "nats://***@h:4222"


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run `omnidaemon ARGS` in this process: its status and everything it printed."""
    from omnidaemon.cli import main

    with pytest.raises(SystemExit) as done:
        main(args)
    out, err = capsys.readouterr()
    code = done.value.code
    return (code if isinstance(code, int) else -1), out + err


@pytest.mark.parametrize(
    ("credentials", "masked"),
    [("bob:hunter2", "bob:***"), ("s3cret-token", "***")],
    ids=["password", "token"],
)
def test_the_cli_never_shows_nats_credentials(
    nats_url: str,
    credentials: str,
    masked: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.delenv("OMNIDAEMON_BROKER_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    url = nats_url.replace("nats://", f"nats://{credentials}@")
    shown = nats_url.replace("nats://", f"nats://{masked}@")
    for args in (["bus", "stats"], ["bus", "stats", "--json"], ["health", "--json"]):
        status, printed = cli([*args, "--broker", url], capsys)
        assert status in (0, 1), printed  # healthy or degraded, never down
        assert shown in printed, printed
        assert not [s for s in SECRETS if s in printed], printed
    # A bus that does not answer: the error names it, masked.
    dead = f"nats://{credentials}@127.0.0.1:{free_port()}"
    status, printed = cli(["health", "--timeout", "1", "--broker", dead], capsys)
    assert status == 2, printed
    assert f"nats://{masked}@127.0.0.1" in printed, printed
    assert not [s for s in SECRETS if s in printed], printed
