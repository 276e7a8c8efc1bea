"""The code samples of OmniDaemon's EDA documentation, run unchanged on `omnidaemon.compat`.

Each sample's body is copied as the seed shows it; only the names it leaves undefined
(`process_file`, `pdf_to_text`, ...) are stubbed around it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import anyio
import orjson
import pytest

from omnidaemon.compat import (
    AgentConfig,
    EventEnvelope,
    OmniDaemonSDK,
    PayloadBase,
    SubscriptionConfig,
)
from tests.http_receiver import Receiver

pytestmark = pytest.mark.anyio


async def eventually(check: Any, timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not check():
            await anyio.sleep(0.02)


async def test_publisher_sample_returns_a_task_id_and_the_event_is_on_the_bus(
    sdk: OmniDaemonSDK,
) -> None:
    # Service publishes event
    task_id = await sdk.publish_task(
        event_envelope=EventEnvelope(
            topic="file.uploaded",
            payload=PayloadBase(content={"filename": "doc.pdf", "size": 1024}),
        )
    )
    entries = await sdk.inspect_stream("file.uploaded", limit=5)
    assert [e["data"]["id"] for e in entries] == [task_id]
    assert entries[0]["data"]["payload"] == {"filename": "doc.pdf", "size": 1024}
    assert {"stream": "file.uploaded", "length": 1} in await sdk.list_streams()


async def test_subscriber_sample_with_subscription_config(sdk: OmniDaemonSDK) -> None:
    seen: list[dict[str, Any]] = []

    async def process_file(message: dict) -> dict:  # type: ignore[type-arg]
        seen.append(message)
        return {"processed": message["content"]["filename"]}

    await sdk.register_agent(
        agent_config=AgentConfig(
            topic="file.uploaded",
            callback=process_file,
            config=SubscriptionConfig(
                max_retries=3,  # Retry up to 3 times
                reclaim_idle_ms=300000,  # Reclaim after 5 min
                dlq_enabled=True,  # Enable DLQ
            ),
        )
    )
    spec = sdk.app.get_agent("process_file")
    assert spec.policy.max_retries == 3 and spec.reclaim_idle == 300.0 and spec.concurrency == 1
    await sdk.start()
    task_id = await sdk.publish_task(
        event_envelope=EventEnvelope(
            topic="file.uploaded",
            payload=PayloadBase(content={"filename": "doc.pdf", "size": 1024}),
            tenant_id="tenant-7",
            correlation_id="corr-1",
            source="upload-service",
        )
    )
    await eventually(lambda: seen)
    message = seen[0]
    assert message["content"] == {"filename": "doc.pdf", "size": 1024}
    assert message["task_id"] == task_id and message["topic"] == "file.uploaded"
    assert message["tenant_id"] == "tenant-7" and message["correlation_id"] == "corr-1"
    assert message["source"] == "upload-service" and message["agent"] == "process_file"
    assert message["delivery_attempts"] == 1 and isinstance(message["created_at"], float)
    assert message["reply_to"] is None and message["webhook"] is None
    with anyio.fail_after(5):
        while await sdk.get_result(task_id) is None:
            await anyio.sleep(0.02)
    assert await sdk.get_result(task_id) == {"processed": "doc.pdf"}
    listed = await sdk.list_results(limit=10)
    assert listed[0]["task_id"] == task_id and listed[0]["result"] == {"processed": "doc.pdf"}
    agents = await sdk.list_agents()
    assert agents["file.uploaded"][0]["name"] == "process_file"
    assert agents["file.uploaded"][0]["running"] is True


async def test_loose_coupling_sample_fans_out_to_every_agent(sdk: OmniDaemonSDK) -> None:
    got: dict[str, list[Any]] = {"report": [], "notify": [], "email": []}

    async def create_report(message: dict) -> None:  # type: ignore[type-arg]
        got["report"].append(message["content"])

    def notify_user(message: dict) -> None:  # type: ignore[type-arg]
        got["notify"].append(message["content"])  # a sync callback, run in a thread

    async def send_email(message: dict) -> None:  # type: ignore[type-arg]
        got["email"].append(message["content"])

    # Agent A publishes event
    await sdk.publish_task(
        event_envelope=EventEnvelope(
            topic="analysis.completed", payload=PayloadBase(content={"result": "..."})
        )
    )

    # Agent B subscribes (Agent A doesn't know about B!)
    await sdk.register_agent(
        agent_config=AgentConfig(
            topic="analysis.completed",
            callback=create_report,
        )
    )

    # Agent C also subscribes (Agent A doesn't know about C either!)
    await sdk.register_agent(
        agent_config=AgentConfig(
            topic="analysis.completed",
            callback=notify_user,
        )
    )
    await sdk.start()

    # New requirement: registered while the others run; it still gets the earlier event.
    await sdk.register_agent(
        agent_config=AgentConfig(
            topic="analysis.completed",  # Same topic
            callback=send_email,  # New agent
        )
    )
    await eventually(lambda: all(got.values()))
    assert got == {k: [{"result": "..."}] for k in got}
    groups = {g["name"] for g in await sdk.list_groups("omni-stream:analysis.completed")}
    assert groups == {"create_report", "notify_user", "send_email"}


async def test_request_reply_sample(sdk: OmniDaemonSDK) -> None:
    replies: list[dict[str, Any]] = []

    async def process(message: dict) -> dict:  # type: ignore[type-arg]
        return {"answer": message["content"]["data"] * 2}

    # Agent processes and replies
    async def analyze(message: dict):  # type: ignore[no-untyped-def,type-arg]
        result = await process(message)

        # Publish result to reply_to topic
        await sdk.publish_task(
            event_envelope=EventEnvelope(
                topic=message.get("reply_to"),
                payload=PayloadBase(
                    content=result,
                    correlation_id=message.get("correlation_id"),
                ),
            )
        )

    async def requester(message: dict) -> None:  # type: ignore[type-arg]
        replies.append(message)

    await sdk.register_agent(agent_config=AgentConfig(topic="analysis.request", callback=analyze))
    await sdk.register_agent(
        agent_config=AgentConfig(topic="analysis.response", callback=requester)
    )
    await sdk.start()

    # Publisher includes reply_to
    request_id = await sdk.publish_task(
        event_envelope=EventEnvelope(
            topic="analysis.request",
            payload=PayloadBase(
                content={"data": "..."},
                reply_to="analysis.response",  # Where to send result
                correlation_id="req-123",  # Track this request
            ),
            tenant_id="acme",
        )
    )
    await eventually(lambda: replies)
    await anyio.sleep(0.2)  # the engine must not send a second (empty) reply
    assert len(replies) == 1
    reply = replies[0]
    assert reply["content"] == {"answer": "......"}
    assert reply["correlation_id"] == "req-123" and reply["causation_id"] == request_id
    assert reply["tenant_id"] == "acme"


async def test_a_returned_value_is_sent_to_reply_to(sdk: OmniDaemonSDK) -> None:
    replies: list[Any] = []

    def double(message: dict) -> dict:  # type: ignore[type-arg]
        return {"n": message["content"]["n"] * 2}

    async def requester(message: dict) -> None:  # type: ignore[type-arg]
        replies.append((message["content"], message["tenant_id"]))

    await sdk.register_agent(agent_config=AgentConfig(topic="math.double", callback=double))
    await sdk.register_agent(agent_config=AgentConfig(topic="math.doubled", callback=requester))
    await sdk.start()
    await sdk.publish_task(
        event_envelope=EventEnvelope(
            topic="math.double",
            payload=PayloadBase(content={"n": 21}, reply_to="math.doubled"),
            tenant_id="t-1",
        )
    )
    await eventually(lambda: replies)
    assert replies == [({"n": 42}, "t-1")]


async def test_webhook_sample_posts_the_result(sdk: OmniDaemonSDK, receiver: Receiver) -> None:
    async def analyze(message: dict) -> dict:  # type: ignore[type-arg]
        return {"sentiment": "positive", "data": message["content"]["data"]}

    await sdk.register_agent(agent_config=AgentConfig(topic="analysis.request", callback=analyze))
    await sdk.start()
    # Publisher includes webhook URL
    task_id = await sdk.publish_task(
        event_envelope=EventEnvelope(
            topic="analysis.request",
            payload=PayloadBase(
                content={"data": "..."},
                webhook=receiver.url("/callback"),
            ),
        )
    )
    await eventually(lambda: receiver.requests)
    body = orjson.loads(receiver.requests[0].body)
    # The body the seed documents: task_id, status "success", result, timestamp.
    assert body["task_id"] == task_id and body["status"] == "success"
    assert body["result"] == {"sentiment": "positive", "data": "..."}
    assert datetime.fromisoformat(body["timestamp"]).tzinfo is not None
    # and omnidaemon's own fields beside them.
    assert body["event_id"] == task_id and body["agent"] == "analyze"


async def test_document_pipeline_sample(sdk: OmniDaemonSDK, tmp_path: Any) -> None:
    emails: list[dict[str, str]] = []

    class Upload:
        filename = "report.pdf"

    class current_user:  # the seed's name
        id = "u-1"

    file = Upload()

    def save_file(file: Upload) -> str:
        path = tmp_path / file.filename
        path.write_text("great results")
        return str(path)

    async def pdf_to_text(file_path: str) -> str:
        return str((tmp_path / file_path).read_text())

    async def ai_analyze_sentiment(text: str) -> str:
        return "positive" if "great" in text else "negative"

    async def send_email(to: str, subject: str, body: str) -> None:
        emails.append({"to": to, "subject": subject, "body": body})

    # ============================================
    # Document Upload Service (Publisher)
    # ============================================
    async def handle_upload(file):  # type: ignore[no-untyped-def]
        """User uploads document"""
        # Save file
        file_path = save_file(file)

        # Publish event (fire and forget!)
        await sdk.publish_task(
            event_envelope=EventEnvelope(
                topic="document.uploaded",
                payload=PayloadBase(
                    content={
                        "file_path": file_path,
                        "filename": file.filename,
                        "user_id": current_user.id,
                    }
                ),
            )
        )

        return {"status": "uploaded", "message": "Processing started"}

    # ============================================
    # Text Extraction Agent (Subscriber 1)
    # ============================================
    async def extract_text(message: dict):  # type: ignore[no-untyped-def,type-arg]
        """Extract text from document"""
        file_path = message["content"]["file_path"]
        text = await pdf_to_text(file_path)

        # Publish extracted text
        await sdk.publish_task(
            event_envelope=EventEnvelope(
                topic="text.extracted",
                payload=PayloadBase(
                    content={
                        "text": text,
                        "file_path": file_path,
                    }
                ),
            )
        )

    await sdk.register_agent(
        agent_config=AgentConfig(
            topic="document.uploaded",
            callback=extract_text,
        )
    )

    # ============================================
    # Analysis Agent (Subscriber 2)
    # ============================================
    async def analyze_sentiment(message: dict):  # type: ignore[no-untyped-def,type-arg]
        """Analyze sentiment of text"""
        text = message["content"]["text"]
        sentiment = await ai_analyze_sentiment(text)

        # Publish analysis result
        await sdk.publish_task(
            event_envelope=EventEnvelope(
                topic="analysis.completed",
                payload=PayloadBase(
                    content={
                        "sentiment": sentiment,
                        "file_path": message["content"]["file_path"],
                        # The seed's notifier reads user_email, which its analyser never sets.
                        "user_email": "user@example.com",
                    }
                ),
            )
        )

    await sdk.register_agent(
        agent_config=AgentConfig(
            topic="text.extracted",
            callback=analyze_sentiment,
        )
    )

    # ============================================
    # Notification Agent (Subscriber 3)
    # ============================================
    async def notify_user(message: dict):  # type: ignore[no-untyped-def,type-arg]
        """Notify user that analysis is complete"""
        result = message["content"]
        await send_email(
            to=result["user_email"],
            subject="Document Analysis Complete",
            body=f"Sentiment: {result['sentiment']}",
        )

    await sdk.register_agent(
        agent_config=AgentConfig(
            topic="analysis.completed",
            callback=notify_user,
        )
    )

    await sdk.start()
    assert await handle_upload(file) == {"status": "uploaded", "message": "Processing started"}  # type: ignore[no-untyped-call]
    await eventually(lambda: emails)
    assert emails == [
        {
            "to": "user@example.com",
            "subject": "Document Analysis Complete",
            "body": "Sentiment: positive",
        }
    ]
    agents = await sdk.list_agents()
    assert (await sdk.get_agent("text.extracted", "analyze_sentiment")) == agents["text.extracted"][
        0
    ]
    assert agents["text.extracted"][0]["description"] == ""
