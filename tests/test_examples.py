"""Every pattern example runs as documented, on the embedded bus and on NATS JetStream."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.parametrize(
    ("example", "expected"),
    [
        ("delayed_reminders.py", ["right away", "at a fixed time", "in 2 seconds"]),
        ("webhooks.py", ["dead_lettered  signature ok: True", "succeeded      signature ok: True"]),
        ("sync_publish.py", ["welcomed: user0@example.com"]),
        ("scheduled_report.py", ["report for the period ending"]),
        ("request_reply.py", ["quote: A1 x4 = 10.00", "failed: Reject: unknown sku ZZ"]),
        ("payments.py", ["the card was charged 1 time(s)", "duplicate: {'receipt'"]),
        (
            "chat_debounce.py",
            [
                "alice: 3 message(s): hi / I have a question / about my invoice",
                "bob: 3 message(s): bob hi / bob I have a question / bob about my invoice",
                "alice: 1 message(s): are you there?",
            ],
        ),
        (
            "llm_budget.py",
            ["acme: 3 research run(s)", "globex: 1 research run(s)", "translated 4 summaries"],
        ),
        (
            "streaming_llm.py",
            [
                "status: succeeded",
                "streamed 14 tokens over HTTP",
                "a late reader got all 14 tokens; result: Event buses keep work durable:",
            ],
        ),
    ],
)
@pytest.mark.parametrize("bus", ["embedded", "nats"])
def test_example_runs(
    request: pytest.FixtureRequest, bus: str, example: str, expected: list[str]
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNIDAEMON_")}
    if bus == "nats":
        env["OMNIDAEMON_BROKER_URL"] = request.getfixturevalue("nats_server").url
    else:
        env["OMNIDAEMON_HOME"] = str(request.getfixturevalue("embedded_home"))
    result = subprocess.run(
        [sys.executable, f"examples/{example}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for fragment in expected:
        assert any(fragment in line for line in lines), result.stdout
    if example == "delayed_reminders.py":
        assert [line.split(": ", 1)[1] for line in lines if line.startswith("after")] == [
            "right away",
            "at a fixed time, 1 second from now",
            "in 2 seconds",
        ]
    if example == "streaming_llm.py":
        # The tokens came as the model made them (50 ms apart), not all at the end.
        [timing] = [line for line in lines if line.startswith("streamed 14 tokens")]
        first, total = (float(part.split()[-2]) for part in timing.split(": ")[1].split(", "))
        assert total - first >= 0.5, timing
    if example == "llm_budget.py":
        # acme's three requests, published at once, start 2 s apart (30/m for that tenant);
        # globex's starts at once, not behind them.
        starts = {
            line.split(":")[0]: [float(t) for t in line.split("after ")[1][:-2].split(", ")]
            for line in lines
            if "research run(s), started after" in line
        }
        acme, globex = starts["acme"], starts["globex"]
        assert all(b - a >= 1.8 for a, b in itertools.pairwise(acme)), acme
        assert globex[0] < acme[1], starts
