"""The example document pipeline, end to end through TestApp."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from omnidaemon.testing import TestApp

ROOT = Path(__file__).resolve().parent.parent


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "document_pipeline_example", ROOT / "examples" / "document_pipeline.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.anyio
async def test_pipeline_notifies_good_documents_and_dead_letters_the_poison_one() -> None:
    example = load_example()
    async with TestApp(example.app) as bus:
        for document in example.DOCUMENTS:
            await bus.publish("document.uploaded", document)
        await bus.drain()

        analyses = sorted(bus.published("analysis.completed"), key=lambda e: e.payload["user_id"])
        assert [(e.payload["user_id"], e.payload["sentiment"]) for e in analyses] == [
            ("ada", "positive"),
            ("edsger", "positive"),
            ("grace", "positive"),
        ]
        notified = bus.published("user.notified")
        assert sorted(e.payload["user_id"] for e in notified) == ["ada", "edsger", "grace"]

        letters = {d.payload["file_path"]: d for d in bus.dead_letters("extract_text")}
        assert set(letters) == {"reports/corrupt.pdf", "notes.txt"}
        corrupt = letters["reports/corrupt.pdf"]
        assert (corrupt.error_type, corrupt.attempts) == ("ValueError", 3)
        assert "broken xref table" in corrupt.error_message
        assert (letters["notes.txt"].error_type, letters["notes.txt"].attempts) == ("Reject", 1)
        assert bus.dead_letters("analyze") == bus.dead_letters("notify_user") == []

        # Every step of one document shares its correlation id and names its cause.
        [q1_upload] = [e for e in bus.published("document.uploaded") if "q1" in str(e.payload)]
        chain = [e for e in bus.published() if e.correlation_id == q1_upload.id]
        assert [e.topic for e in chain] == [
            "document.uploaded",
            "text.extracted",
            "analysis.completed",
            "user.notified",
        ]
        assert [e.causation_id for e in chain[1:]] == [e.id for e in chain[:-1]]


def check_report(stdout: str) -> None:
    assert "ada" in stdout and "edsger" in stdout and "grace" in stdout
    assert "reports/corrupt.pdf" in stdout and "after 3 attempt(s)" in stdout
    assert "notes.txt" in stdout and "Reject" in stdout
    assert "the first document's whole run: python -m omnidaemon trace " in stdout


@pytest.mark.slow
def test_worker_and_publisher_processes_on_the_embedded_bus(embedded_home: Path) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OMNIDAEMON_")},
        "OMNIDAEMON_HOME": str(embedded_home),
        "OMNIDAEMON_LOG_FORMAT": "json",
    }
    worker = subprocess.Popen(
        [sys.executable, "-m", "omnidaemon", "worker", "examples.document_pipeline:app"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        result = subprocess.run(
            [sys.executable, "examples/document_pipeline.py"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
        )
    finally:
        worker.send_signal(signal.SIGTERM)
        _, worker_log = worker.communicate(timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    check_report(result.stdout)
    assert worker.returncode == 0, worker_log.decode(errors="replace")
    # The first document's whole run, as the report says to look at it: four events, one per
    # agent of the pipeline and the watcher's, each handled once.
    first = result.stdout.rsplit("omnidaemon trace ", 1)[1].strip()
    shown = subprocess.run(
        [sys.executable, "-m", "omnidaemon", "trace", first, "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    trace = json.loads(shown.stdout)
    assert (trace["status"], trace["event_count"], trace["attempt_count"]) == ("succeeded", 4, 4)
    assert (embedded_home / "valkey.sock").exists()  # one server, shared by both processes


@pytest.mark.slow
def test_example_runs_in_one_process(embedded_home: Path) -> None:
    env = {**os.environ, "OMNIDAEMON_HOME": str(embedded_home)}
    env.pop("OMNIDAEMON_BROKER_URL", None)
    result = subprocess.run(
        [sys.executable, "examples/document_pipeline.py", "--in-process"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    check_report(result.stdout)
