"""Channel secrets: sealed at rest with PARLEY_SECRETS_KEY, several active during a rotation.

A channel row keeps its lookup fields (phone_number_id, account_sid, public_url) in clear in
`config`, and its secrets in `sealed`: a Fernet token (AES-128-CBC + HMAC-SHA256) of
`{field: [{"value", "expires_at"}, ...]}`, primary first. PARLEY_SECRETS_KEY is a comma-separated
list of Fernet keys: the first encrypts, every one decrypts (MultiFernet), so a key is rotated by
putting a new one first, re-sealing (`parley rotate-secrets`) and then dropping the old one.

Rows written before sealing existed keep their secrets in `config` (`sealed` is NULL); they are
read as they are and sealed by `parley rotate-secrets` (which `parley run` runs at start).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import orjson
from cryptography.fernet import Fernet, InvalidToken, MultiFernet

# The fields of each provider's config that are secrets; everything else stays in clear.
SECRET_FIELDS: dict[str, tuple[str, ...]] = {
    "generic": ("secret",),
    "whatsapp": ("app_secret", "verify_token", "access_token"),
    "twilio": ("auth_token",),
}
# Bounds the work of a signature check: at most this many secrets are active per field.
MAX_ACTIVE = 4


_NO_KEY = "a channel's secrets do not open with any key in PARLEY_SECRETS_KEY"


class SecretsKeyError(ValueError):
    """PARLEY_SECRETS_KEY is missing or malformed, or does not open a stored secret."""


class Sealer:
    """Encrypts with the first key of PARLEY_SECRETS_KEY, decrypts with any of them."""

    def __init__(self, keys: str) -> None:
        parts = [k.strip() for k in keys.split(",") if k.strip()]
        if not parts:
            raise SecretsKeyError("PARLEY_SECRETS_KEY is empty (generate one with `parley gen-secrets-key`)")
        try:
            self._fernet = MultiFernet([Fernet(k) for k in parts])
        except ValueError as exc:
            raise SecretsKeyError(
                "PARLEY_SECRETS_KEY must be comma-separated Fernet keys (32 url-safe base64 bytes)"
            ) from exc

    @staticmethod
    def generate_key() -> str:
        """A new random key."""
        return Fernet.generate_key().decode()

    def seal(self, data: dict[str, Any]) -> str:
        """Encrypt under the first key."""
        return self._fernet.encrypt(orjson.dumps(data)).decode()

    def open(self, token: str) -> Any:
        """Decrypt with any key; SecretsKeyError if none fits."""
        try:
            return orjson.loads(self._fernet.decrypt(token.encode()))
        except InvalidToken as exc:
            raise SecretsKeyError(_NO_KEY) from exc

    def reseal(self, token: str) -> str:
        """The same secrets encrypted under the first key."""
        try:
            return self._fernet.rotate(token.encode()).decode()
        except InvalidToken as exc:
            raise SecretsKeyError(_NO_KEY) from exc


@dataclass(frozen=True)
class Secret:
    """One active value of a secret field; only a previous (non-primary) one expires."""

    value: str
    expires_at: datetime | None = None

    def active(self, now: datetime) -> bool:
        """Still accepted at now."""
        return self.expires_at is None or now < self.expires_at


Secrets = dict[str, tuple[Secret, ...]]


@dataclass(frozen=True)
class Channel:
    """A channel as stored: clear config plus its secrets (primary first per field)."""

    id: str
    provider: str
    created_at: datetime
    public: dict[str, Any]
    secrets: Secrets = field(default_factory=dict)

    def config(self, now: datetime) -> dict[str, Any]:
        """What handlers use: clear fields, `<field>` = primary secret, `<field>s` = every one active."""
        out = dict(self.public)
        for name, values in self.secrets.items():
            active = [s.value for s in values if s.active(now)]
            out[name] = values[0].value
            out[name + "s"] = active
        return out

    def summary(self, now: datetime) -> dict[str, Any]:
        """For the admin API: never a secret, only how many are active and until when."""
        return {
            "id": self.id,
            "provider": self.provider,
            "created_at": self.created_at.isoformat(),
            **{k: v for k, v in self.public.items()},
            "secrets": {
                name: {
                    "active": sum(1 for s in values if s.active(now)),
                    "previous_expire_at": [_iso(s.expires_at) for s in values[1:] if s.active(now)],
                }
                for name, values in self.secrets.items()
            },
        }


def _iso(at: datetime | None) -> str | None:
    return at.isoformat() if at else None


def _time(at: str | None) -> datetime | None:
    return datetime.fromisoformat(at) if at else None


def split(provider: str, config: dict[str, Any]) -> tuple[dict[str, Any], Secrets]:
    """(clear fields, secrets) of a channel's config as registered or as stored in clear."""
    names = SECRET_FIELDS.get(provider, ())
    public = {k: v for k, v in config.items() if k not in names}
    secrets: Secrets = {k: (Secret(str(config[k])),) for k in names if config.get(k) is not None}
    return public, secrets


def to_json(secrets: Secrets) -> dict[str, Any]:
    """The sealed payload."""
    return {
        name: [{"value": s.value, "expires_at": _iso(s.expires_at)} for s in vals]
        for name, vals in secrets.items()
    }


def from_json(data: dict[str, Any]) -> Secrets:
    """Inverse of to_json."""
    return {
        name: tuple(Secret(v["value"], _time(v["expires_at"])) for v in vals) for name, vals in data.items()
    }


def rotate(
    channel: Channel,
    new: dict[str, str],
    *,
    now: datetime,
    keep_previous_for: timedelta,
    revoke_previous: bool,
) -> Channel:
    """Make each new value its field's primary; the old primary stays accepted for keep_previous_for
    (0: dropped at once), older ones keep their own expiry; revoke_previous drops every non-primary."""
    secrets = dict(channel.secrets)
    for name, value in new.items():
        old = [s for s in secrets.get(name, ()) if s.active(now) and s.value != value]
        if old and old[0].expires_at is None and keep_previous_for > timedelta(0):
            old[0] = Secret(old[0].value, now + keep_previous_for)
        kept = [s for s in old if s.expires_at is not None]
        secrets[name] = (Secret(value), *kept[: MAX_ACTIVE - 1])
    for name, values in secrets.items():
        if revoke_previous:
            secrets[name] = values[:1]
        else:
            secrets[name] = (values[0], *(s for s in values[1:] if s.active(now)))
    return replace(channel, secrets=secrets)
