"""The document pipeline: upload -> extract -> analyze -> notify, with one poison document.

Run its agents in a worker, and publish documents to them from another process:

    python -m omnidaemon worker examples.document_pipeline:app      # terminal 1
    python examples/document_pipeline.py                            # terminal 2

(`bash scripts/quickstart.sh` does both.) With no `OMNIDAEMON_BROKER_URL` both processes use
the embedded bus, which the first of them starts. Add `--in-process` to run the agents inside
the publisher instead, without a separate worker.

Three documents go through all four steps. `corrupt.pdf` makes the extractor fail every time:
it is retried twice with backoff and then parked in the dead-letter queue, with its error.
`notes.txt` is not a PDF: the extractor rejects it, and it goes to the dead-letter queue at once.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from functools import partial

import anyio
from pydantic import BaseModel

from omnidaemon import App, Context, DeadLetter, Reject

app = App("docs")


class Uploaded(BaseModel):
    file_path: str
    user_id: str


class Extracted(BaseModel):
    file_path: str
    user_id: str
    text: str


class Analysis(BaseModel):
    file_path: str
    user_id: str
    sentiment: str
    words: int


async def pdf_to_text(path: str) -> str:
    """Stand-in for a real PDF extractor (or an LLM call): slow, and sometimes it fails."""
    await anyio.sleep(0.05)
    if "corrupt" in path:
        raise ValueError(f"cannot parse {path}: broken xref table")
    return f"Quarterly report from {path}: revenue grew and customers are happy."


@app.agent("document.uploaded", publishes="text.extracted", max_retries=2, retry_backoff=0.2)
async def extract_text(event: Uploaded, ctx: Context) -> Extracted:
    """Extract the text of an uploaded PDF."""
    if not event.file_path.endswith(".pdf"):
        raise Reject(f"{event.file_path} is not a PDF")
    ctx.log.info("extracting", file_path=event.file_path)
    text = await pdf_to_text(event.file_path)
    return Extracted(file_path=event.file_path, user_id=event.user_id, text=text)


@app.agent("text.extracted", publishes="analysis.completed")
async def analyze(event: Extracted) -> Analysis:
    """Score the sentiment of extracted text."""
    await anyio.sleep(0.02)  # the LLM call
    sentiment = "positive" if "happy" in event.text else "neutral"
    return Analysis(
        file_path=event.file_path,
        user_id=event.user_id,
        sentiment=sentiment,
        words=len(event.text.split()),
    )


class Notified(BaseModel):
    user_id: str
    file_path: str
    sentiment: str


@app.agent("analysis.completed", publishes="user.notified")
def notify_user(event: Analysis, ctx: Context) -> Notified:
    """Tell the user their document is analysed (a plain function: it runs in a thread)."""
    ctx.log.info("user notified", user_id=event.user_id, sentiment=event.sentiment)
    return Notified(user_id=event.user_id, file_path=event.file_path, sentiment=event.sentiment)


DOCUMENTS = [
    Uploaded(file_path="reports/q1.pdf", user_id="ada"),
    Uploaded(file_path="reports/q2.pdf", user_id="grace"),
    Uploaded(file_path="reports/corrupt.pdf", user_id="alan"),
    Uploaded(file_path="notes.txt", user_id="barbara"),
    Uploaded(file_path="reports/q3.pdf", user_id="edsger"),
]


async def publish_and_report(*, in_process: bool = False, timeout: float = 60) -> int:
    """Publish the documents, wait until each one is notified or dead-lettered, and report.

    A second app on the same bus listens to `user.notified`, the pipeline's last step. Returns
    the process exit status: 0 when every document has an outcome.
    """
    watcher = App("docs-watcher")
    notified: list[Notified] = []
    ours: list[str] = []  # each document's event id: its run's id too

    @watcher.agent("user.notified", start="latest")
    async def collect(event: Notified, ctx: Context) -> None:
        if ctx.event.correlation_id in ours:
            notified.append(event)

    async with AsyncExitStack() as stack:
        await stack.enter_async_context(watcher.running())
        if in_process:
            await stack.enter_async_context(app.running())
        ours.extend([await app.publish("document.uploaded", d) for d in DOCUMENTS])
        print(f"published {len(DOCUMENTS)} documents; waiting for the pipeline...")
        dead: list[DeadLetter] = []
        with anyio.move_on_after(timeout) as waiting:
            while len(notified) + len(dead) < len(DOCUMENTS):
                await anyio.sleep(0.1)
                letters = await app.dead_letters("extract_text", limit=50)
                dead = [d for d in letters if d.event_id in ours]
    await app.close()
    if waiting.cancelled_caught:
        print(
            f"no outcome for every document after {timeout:g} s: is a worker running? "
            "start one with: python -m omnidaemon worker examples.document_pipeline:app"
        )
        return 1
    print("\nnotified:")
    for n in sorted(notified, key=lambda n: n.file_path):
        print(f"  {n.user_id:<8} {n.file_path:<22} {n.sentiment}")
    print("dead-lettered:")
    for letter in dead:
        print(
            f"  {letter.payload['file_path']:<22} after {letter.attempts} attempt(s): "
            f"{letter.error_type}: {letter.error_message}"
        )
    print(f"\nthe first document's whole run: python -m omnidaemon trace {ours[0]}")
    return 0


if __name__ == "__main__":
    import sys

    from omnidaemon.observability import configure_logging

    configure_logging("WARNING")
    sys.exit(anyio.run(partial(publish_and_report, in_process="--in-process" in sys.argv)))
