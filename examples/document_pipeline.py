"""The document pipeline: upload -> extract -> analyze -> notify, with one poison document.

Run it as a demo (a worker and a publisher in one process):

    python examples/document_pipeline.py

or run its agents as a worker and publish to it from elsewhere:

    python -m omnidaemon worker examples.document_pipeline:app

Three documents go through all four steps. `corrupt.pdf` makes the extractor fail every time:
it is retried twice with backoff and then parked in the dead-letter queue, with its error.
`notes.txt` is not a PDF: the extractor rejects it, and it goes to the dead-letter queue at once.
"""

from __future__ import annotations

import anyio
from pydantic import BaseModel

from omnidaemon import App, Context, Reject

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


notified: list[Analysis] = []


@app.agent("analysis.completed")
def notify_user(event: Analysis, ctx: Context) -> None:
    """Tell the user their document is analysed (a plain function: it runs in a thread)."""
    notified.append(event)
    ctx.log.info("user notified", user_id=event.user_id, sentiment=event.sentiment)


DOCUMENTS = [
    Uploaded(file_path="reports/q1.pdf", user_id="ada"),
    Uploaded(file_path="reports/q2.pdf", user_id="grace"),
    Uploaded(file_path="reports/corrupt.pdf", user_id="alan"),
    Uploaded(file_path="notes.txt", user_id="barbara"),
    Uploaded(file_path="reports/q3.pdf", user_id="edsger"),
]


async def main() -> None:
    """Run the agents, publish the documents, wait for every outcome, and report."""
    async with app.running():
        for document in DOCUMENTS:
            await app.publish("document.uploaded", document)
        with anyio.fail_after(30):
            while True:
                dead = await app.dead_letters("extract_text")
                if len(notified) + len(dead) >= len(DOCUMENTS):
                    break
                await anyio.sleep(0.05)
    print("\nnotified:")
    for analysis in notified:
        print(f"  {analysis.user_id:<8} {analysis.file_path:<22} {analysis.sentiment}")
    print("dead-lettered:")
    for letter in dead:
        print(
            f"  {letter.payload['file_path']:<22} after {letter.attempts} attempt(s): "
            f"{letter.error_type}: {letter.error_message}"
        )


if __name__ == "__main__":
    from omnidaemon.observability import configure_logging

    configure_logging("INFO")
    anyio.run(main)
