"""Delivery status of an outbound message: a lattice that only moves forward.

Receipts arrive duplicated and out of order (a `read` before its `delivered`, a late `sent`),
so the status is the join of everything received, not the last receipt:

    queued < sent < failed < delivered < read < played

- `read` implies `delivered`; a `sent` after `delivered` changes nothing.
- `failed` beats `queued`/`sent` (the provider gave up), but any delivery evidence beats
  `failed`: with multi-device accounts one device can fail while another receives the message,
  and the user having it is what matters. The failure is still kept in the receipt history.
- Provider words map onto these: Twilio `accepted`/`queued`/`sending` -> queued,
  `undelivered` -> failed, `receiving`/`received` are inbound and not receipts; WhatsApp
  `deleted` (the user deleted it) keeps the status and is only recorded.
"""

from __future__ import annotations

from enum import StrEnum


class DeliveryStatus(StrEnum):
    """Where an outbound message got to."""

    QUEUED = "queued"
    SENT = "sent"
    FAILED = "failed"
    DELIVERED = "delivered"
    READ = "read"
    PLAYED = "played"

    @property
    def rank(self) -> int:
        """Position in the lattice; higher wins."""
        return _RANK[self]


_RANK = {status: i for i, status in enumerate(DeliveryStatus)}

_PROVIDER_WORDS = {
    "accepted": DeliveryStatus.QUEUED,
    "scheduled": DeliveryStatus.QUEUED,
    "queued": DeliveryStatus.QUEUED,
    "sending": DeliveryStatus.QUEUED,
    "sent": DeliveryStatus.SENT,
    "failed": DeliveryStatus.FAILED,
    "undelivered": DeliveryStatus.FAILED,
    "delivered": DeliveryStatus.DELIVERED,
    "read": DeliveryStatus.READ,
    "played": DeliveryStatus.PLAYED,
}


def from_provider(word: str) -> DeliveryStatus | None:
    """The lattice status a provider's status word stands for; None if it is not a receipt."""
    return _PROVIDER_WORDS.get(word.strip().lower())


def advance(current: DeliveryStatus | None, incoming: DeliveryStatus) -> DeliveryStatus:
    """The status after a receipt: the higher of the two, so order and repeats do not matter."""
    if current is None or incoming.rank > current.rank:
        return incoming
    return current
