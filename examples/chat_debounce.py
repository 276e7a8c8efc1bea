"""Debounce: answer a burst of chat messages once, with all of them.

    python examples/chat_debounce.py

Two conversations send messages in bursts. The agent waits until a conversation has been quiet
for a second (or, at the latest, 3 seconds after the burst's first message) and then answers
the whole burst in one call. The windows live on the bus: a worker that crashes mid-burst
loses no message.
"""

from __future__ import annotations

from datetime import timedelta

import anyio
from pydantic import BaseModel

from omnidaemon import App, Context

app = App("chat")


class Message(BaseModel):
    conversation_id: str
    text: str


answered: list[str] = []
done = anyio.Event()


@app.agent(
    "chat.message",
    debounce=timedelta(seconds=1),
    debounce_key=lambda m: m.conversation_id,
    debounce_max_wait=timedelta(seconds=3),
)
async def answer(messages: list[Message], ctx: Context) -> None:
    """Answer a conversation's burst of messages in one model call (here: print them)."""
    texts = " / ".join(m.text for m in messages)
    answered.append(f"{messages[0].conversation_id}: {len(messages)} message(s): {texts}")
    if len(answered) == 3:
        done.set()


async def say(conversation: str, text: str) -> None:
    await app.publish("chat.message", Message(conversation_id=conversation, text=text))


async def main() -> None:
    async with app.running():
        # Interleaved bursts of two conversations, then, after a pause, one more message.
        for text in ("hi", "I have a question", "about my invoice"):
            await say("alice", text)
            await say("bob", f"bob {text}")
            await anyio.sleep(0.2)
        await anyio.sleep(2)
        await say("alice", "are you there?")
        with anyio.fail_after(30):
            await done.wait()
    for line in answered:
        print(line)
    await app.close()


if __name__ == "__main__":
    anyio.run(main)
