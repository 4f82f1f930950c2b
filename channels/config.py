"""What a channel is: the registration bodies of each provider, and the generic channel's
inbound message. Pydantic models for the API's boundary; the secrets they carry are sealed at
rest by streams.channel_secrets."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter

from channels.signatures import standard_webhook_key


class Record(BaseModel):
    """Immutable, strict about unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class GenericWebhook(Record):
    """The generic channel's inbound message body."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    message_id: str = Field(min_length=1, max_length=256)
    from_: str = Field(alias="from", min_length=1, max_length=256)
    text: str = Field(max_length=65536)
    timestamp: AwareDatetime | int


ChannelId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


def _decodable_secret(secret: str) -> str:
    # The webhook route decodes the secret with this same function: registering a secret it
    # cannot decode would make every webhook of the channel fail.
    standard_webhook_key(secret)
    return secret


class GenericChannelIn(Record):
    """A generic JSON channel signed per Standard Webhooks."""

    id: ChannelId
    provider: Literal["generic"]
    secret: Annotated[
        str, Field(pattern=r"^whsec_[A-Za-z0-9+/=]{16,}$", max_length=1024), AfterValidator(_decodable_secret)
    ]


class WhatsAppChannelIn(Record):
    """A WhatsApp Cloud API phone number."""

    id: ChannelId
    provider: Literal["whatsapp"]
    phone_number_id: str = Field(pattern=r"^[0-9]{1,32}$")
    app_secret: str = Field(min_length=8, max_length=256)
    verify_token: str = Field(min_length=8, max_length=256)
    # Sending (outbound messages): the Cloud API token (sealed, never returned), where the Graph
    # API is (tests and the sandbox point it at the simulator), and the number's limits.
    access_token: str | None = Field(None, min_length=8, max_length=2048)
    graph_base: str = Field("https://graph.facebook.com", pattern=r"^https?://[^\s]+$", max_length=2048)
    graph_version: str = Field("v21.0", pattern=r"^v[0-9]{1,3}\.[0-9]{1,3}$")
    throughput: float = Field(80.0, gt=0, le=10_000)  # messages per second for the number
    recipient_rate: float = Field(1 / 6, gt=0, le=1_000)  # per user: Meta's pair rate, ~1 per 6 s
    recipient_burst: int = Field(45, ge=1, le=1_000)  # ... with bursts of about 45


class TwilioChannelIn(Record):
    """A Twilio account (Programmable Messaging: WhatsApp or SMS)."""

    id: ChannelId
    provider: Literal["twilio"]
    account_sid: str = Field(pattern=r"^AC[0-9a-fA-F]{32}$")
    auth_token: str = Field(min_length=16, max_length=256)
    public_url: str = Field(pattern=r"^https?://", max_length=2048)
    # Sending: the sender (From, e.g. "whatsapp:+15551234567"), where the API is, its rate.
    sender: str | None = Field(None, min_length=3, max_length=64)
    api_base: str = Field("https://api.twilio.com", pattern=r"^https?://[^\s]+$", max_length=2048)
    throughput: float = Field(80.0, gt=0, le=10_000)  # messages per second for the sender


ChannelIn = Annotated[GenericChannelIn | WhatsAppChannelIn | TwilioChannelIn, Field(discriminator="provider")]
CHANNEL_IN: TypeAdapter[ChannelIn] = TypeAdapter(ChannelIn)


class ChannelOut(Record):
    """A channel as the API shows it: never with its secret."""

    id: str
    provider: str
    created_at: datetime
