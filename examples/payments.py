"""Idempotency keys and stored results: charge each payment once, and look the outcome up.

    python examples/payments.py

The same payment is published twice (a client retrying after a timeout, say). The handler runs
once; the duplicate gets the stored result. Each event's status and result are kept for a day
(`store_results=True`) and read back with `app.result(event_id, timeout=...)`.
"""

from __future__ import annotations

import anyio
from pydantic import BaseModel

from omnidaemon import App

app = App("payments")


class PaymentRequested(BaseModel):
    payment_id: str
    amount_cents: int


charges: list[str] = []


@app.agent(
    "payment.requested",
    idempotency_key=lambda event: event.payment_id,
    store_results=True,
)
async def charge(event: PaymentRequested) -> dict[str, str]:
    """Charge the card (here: record the charge) and return the receipt."""
    charges.append(event.payment_id)
    return {"receipt": f"rcpt-{event.payment_id}", "charged": str(event.amount_cents)}


async def main() -> None:
    async with app.running():
        payment = PaymentRequested(payment_id="pay-123", amount_cents=4200)
        first = await app.publish("payment.requested", payment)
        print("first:    ", (await app.result(first, timeout=10)).result)
        again = await app.publish("payment.requested", payment)  # the client retries
        print("duplicate:", (await app.result(again, timeout=10)).result)
    print(f"the card was charged {len(charges)} time(s)")
    await app.close()


if __name__ == "__main__":
    anyio.run(main)
