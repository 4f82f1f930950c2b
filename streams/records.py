"""Pydantic records for everything that crosses a boundary (HTTP, Kafka)."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter

from domain.lifecycle import CloseReason
from streams.topics import thread_key

# Conversation ids are uuid5 of the event that opened them, so replay recreates the same ids.
CONVERSATION_NAMESPACE = uuid.UUID("6f1d4b52-8f7e-4c39-9a51-0c3f2a7d9e10")


_NAMESPACE_BYTES = CONVERSATION_NAMESPACE.bytes


def conversation_id_for(event_id: str) -> str:
    """The deterministic id of a conversation opened by this event: uuid5(CONVERSATION_NAMESPACE,
    event_id) as text, computed without building UUID objects (once per inbound message)."""
    digest = bytearray(
        hashlib.sha1(_NAMESPACE_BYTES + event_id.encode(), usedforsecurity=False).digest()[:16]
    )
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class Record(BaseModel):
    """Base for wire records: immutable, strict about unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class InboundMessage(Record):
    """A user's message as accepted by a provider webhook."""

    kind: Literal["message.inbound"] = "message.inbound"
    event_id: str
    channel_id: str
    contact_id: str
    provider: str
    provider_message_id: str
    type: str = "text"
    text: str | None = None
    payload: dict[str, Any] = Field(default_factory=dict)
    sent_at: AwareDatetime
    received_at: AwareDatetime


class CloseCommand(Record):
    """An agent or admin asks to close the thread's open conversation."""

    kind: Literal["command.close"] = "command.close"
    event_id: str
    channel_id: str
    contact_id: str
    conversation_id: str
    reason: CloseReason = CloseReason.AGENT_CLOSED
    by: str | None = None
    issued_at: AwareDatetime


class AcceptCommand(Record):
    """An agent takes the conversation."""

    kind: Literal["command.accept"] = "command.accept"
    event_id: str
    channel_id: str
    contact_id: str
    conversation_id: str
    agent_id: str
    issued_at: AwareDatetime


class TimerFiredRecord(Record):
    """A conversation deadline came due (from the timer table or the backup sweep)."""

    kind: Literal["timer.fired"] = "timer.fired"
    event_id: str
    channel_id: str
    contact_id: str
    conversation_id: str
    version: int
    due_at: AwareDatetime
    fired_at: AwareDatetime
    source: Literal["timer", "sweep"] = "timer"


class OutboundMessage(Record):
    """A message the business sent to the user through the provider, recorded in Parley."""

    kind: Literal["message.outbound"] = "message.outbound"
    event_id: str
    channel_id: str
    contact_id: str
    conversation_id: str
    provider_message_id: str
    type: str = "text"
    text: str | None = None
    payload: dict[str, Any] = Field(default_factory=dict)
    sent_at: AwareDatetime


class SendRequested(Record):
    """The business asks Parley to send a message (api/messages.py); the lifecycle agent queues it
    in the conversation's order (outbound_sends) and agents/sender.py sends it."""

    kind: Literal["message.send"] = "message.send"
    event_id: str
    message_id: str  # a uuid: Parley's id of the message, the provider echoes it in receipts
    channel_id: str
    contact_id: str
    conversation_id: str | None  # None: business-initiated, joins or opens the thread's conversation
    content: dict[str, Any]  # channels.outbound content, validated by the API
    body_hash: str
    requested_at: AwareDatetime


class StatusReceipt(Record):
    """A provider's delivery receipt for an outbound message (sent, delivered, read, failed...)."""

    kind: Literal["status.receipt"] = "status.receipt"
    event_id: str
    channel_id: str
    contact_id: str
    provider: str
    provider_message_id: str
    provider_status: str
    provider_at: AwareDatetime
    errors: list[dict[str, Any]] = Field(default_factory=list)
    payload: dict[str, Any] = Field(default_factory=dict)
    received_at: AwareDatetime
    message_id: str | None = None  # Parley's id, when Parley sent it (the provider echoes it)


class SchedulePut(Record):
    """PUT /v1/schedules/{key}: create or reschedule (run_at resolved by the API; delay_ms kept
    when the client gave a delay, so the same delay again is the same body)."""

    kind: Literal["schedule.put"] = "schedule.put"
    event_id: str
    key: str
    run_at: AwareDatetime
    delay_ms: int | None = None
    event_type: str
    payload: dict[str, Any] = Field(default_factory=dict)
    max_attempts: int = 1
    backoff_ms: int = 2000
    issued_at: AwareDatetime


class ScheduleCommand(Record):
    """DELETE (cancel), POST .../retry and POST .../result on a schedule."""

    kind: Literal["schedule.cancel", "schedule.retry", "schedule.result"]
    event_id: str
    key: str
    ok: bool | None = None  # result only
    error: str | None = None  # result only
    version: int | None = None  # result only: the version the result is for, if the caller says
    issued_at: AwareDatetime


class ScheduleDue(Record):
    """A schedule's arming came due (timer or sweep); id `schedule:<key>:<token>:<due ms>`."""

    kind: Literal["schedule.due"] = "schedule.due"
    event_id: str
    key: str
    token: str
    due_at: AwareDatetime
    fired_at: AwareDatetime
    source: Literal["timer", "sweep"] = "timer"


class SchedulePuts(Record):
    """POST /v1/schedules:batch: the puts of one request whose owner keys share a partition, as
    one record keyed by the first one's owner key (so it lands on that partition): one Kafka
    record per partition and request, not one per schedule. A consumer reads it as its puts, in
    order (`events_of`); each keeps its own event id, ledger entry and answer."""

    kind: Literal["schedule.puts"] = "schedule.puts"
    puts: list[SchedulePut] = Field(min_length=1)


ScheduleRecord = SchedulePut | ScheduleCommand | ScheduleDue
SCHEDULE_RECORDS = (SchedulePut, ScheduleCommand, ScheduleDue)

_EVENTS = (
    InboundMessage
    | CloseCommand
    | AcceptCommand
    | TimerFiredRecord
    | OutboundMessage
    | SendRequested
    | StatusReceipt
    | SchedulePut
    | ScheduleCommand
    | ScheduleDue
)
ConversationEvent = Annotated[_EVENTS, Field(discriminator="kind")]
LifecycleEvent = InboundMessage | CloseCommand | AcceptCommand | TimerFiredRecord | SendRequested
CONVERSATION_EVENT: TypeAdapter[ConversationEvent] = TypeAdapter(ConversationEvent)
# What a record of the conversation-events topic holds: one event, or a bundle of schedule puts.
LOG_RECORD: TypeAdapter[ConversationEvent | SchedulePuts] = TypeAdapter(
    Annotated[_EVENTS | SchedulePuts, Field(discriminator="kind")]
)


def events_of(raw: bytes) -> list[ConversationEvent]:
    """The events of one conversation-events record, in order (a bundle is its puts); raises
    pydantic's ValidationError for a record that is not one."""
    record = LOG_RECORD.validate_json(raw)
    if isinstance(record, SchedulePuts):
        return list(record.puts)
    return [record]


def bundle_puts(
    puts: Sequence[SchedulePut], partition_of: Callable[[str], int], limit: int
) -> list[tuple[bytes, bytes]]:
    """(key, value) records carrying these puts: one SchedulePuts per partition of the topic
    (`partition_of` an owner key, as the producer will place it), in the puts' order, split where a
    record would pass `limit` bytes (key + value). A put alone over the limit goes alone, for the
    caller's size check to refuse."""
    groups: dict[int, list[tuple[bytes, bytes]]] = {}
    for put in puts:
        owner = f"schedule:{put.key}"
        groups.setdefault(partition_of(owner), []).append((owner.encode(), put.model_dump_json().encode()))
    out: list[tuple[bytes, bytes]] = []
    head, tail = b'{"kind":"schedule.puts","puts":[', b"]}"
    values: list[bytes]
    for items in groups.values():
        key, values, size = items[0][0], [], len(head) + len(tail)
        for item_key, value in items:
            if values and len(key) + size + len(value) + 1 > limit:
                out.append((key, head + b",".join(values) + tail))
                key, values, size = item_key, [], len(head) + len(tail)
            values.append(value)
            size += len(value) + 1
        out.append((key, head + b",".join(values) + tail))
    return out


def keyed(event: ConversationEvent) -> tuple[bytes, bytes]:
    """(thread key, JSON value) of a conversation event, ready to produce (a schedule's events are
    keyed by its owner key `schedule:<key>`)."""
    if isinstance(event, SchedulePut | ScheduleCommand | ScheduleDue):
        return f"schedule:{event.key}".encode(), event.model_dump_json().encode()
    return thread_key(event.channel_id, event.contact_id), event.model_dump_json().encode()


def occurred_at(event: ConversationEvent) -> datetime:
    """The event's own time: transitions use it as `now`, so replay is deterministic."""
    if isinstance(event, InboundMessage | StatusReceipt):
        return event.received_at
    if isinstance(event, TimerFiredRecord | ScheduleDue):
        return event.fired_at
    if isinstance(event, OutboundMessage):
        return event.sent_at
    if isinstance(event, SendRequested):
        return event.requested_at
    return event.issued_at


# A letter must fit in one Kafka record (Faust's producer refuses past 1,000,000 bytes) even
# when every character of the raw value is escaped to six (`\u0000`): 100,000 characters of
# value and 4,000 of error stay under 650 KB. The source topic/partition/offset fetch the rest.
LETTER_VALUE_CHARS = 100_000
LETTER_ERROR_CHARS = 4_000


class DeadLetter(Record):
    """An event parked because it could not be processed, with its error and raw bytes.

    Build it with `bounded`: the value is truncated to LETTER_VALUE_CHARS (value_bytes keeps the
    original size), so a letter always fits in one record and parking it cannot fail for size.
    """

    source_topic: str
    partition: int
    offset: int
    key: str | None
    value: str
    error: str
    attempts: int
    failed_at: AwareDatetime
    value_bytes: int = -1  # size of the original raw value; -1 in letters written before this
    truncated: bool = False

    @classmethod
    def bounded(
        cls,
        *,
        source_topic: str,
        partition: int,
        offset: int,
        key: str | None,
        raw: bytes,
        error: str,
        attempts: int,
        failed_at: datetime,
    ) -> DeadLetter:
        """A letter for raw bytes that always fits in one Kafka record."""
        text = raw[: LETTER_VALUE_CHARS * 4 + 4].decode(errors="replace")
        value = text[:LETTER_VALUE_CHARS]
        return cls(
            source_topic=source_topic,
            partition=partition,
            offset=offset,
            key=None if key is None else key[:1024],
            value=value,
            error=error[:LETTER_ERROR_CHARS],
            attempts=attempts,
            failed_at=failed_at,
            value_bytes=len(raw),
            truncated=len(text) > LETTER_VALUE_CHARS or len(raw) > LETTER_VALUE_CHARS * 4 + 4,
        )
