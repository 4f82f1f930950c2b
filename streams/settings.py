"""Parley's settings: one object, built once at each entry point, every field an env var."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from domain.policy import LifecyclePolicy, parse_duration


def _timeout(value: object) -> timedelta:
    # Lifecycle deadlines: the domain's parser, with its one-second floor.
    return value if isinstance(value, timedelta) else parse_duration(value)  # type: ignore[arg-type]


def _duration(value: object) -> timedelta:
    # Technical intervals (batch windows, grace, retention): seconds may be fractional or 0.
    if isinstance(value, timedelta):
        return value
    try:
        return timedelta(seconds=float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return parse_duration(value)  # type: ignore[arg-type]


Timeout = Annotated[timedelta, BeforeValidator(_timeout)]
Duration = Annotated[timedelta, BeforeValidator(_duration)]


class Settings(BaseSettings):
    """Everything configurable; see the env var table in README.md."""

    model_config = SettingsConfigDict(env_prefix="PARLEY_", extra="ignore", frozen=True)

    # External services. Empty means "start the embedded one" (only `parley run` does that).
    kafka_bootstrap_servers: str = Field("", validation_alias="KAFKA_BOOTSTRAP_SERVERS")
    database_url: str = Field("", validation_alias="DATABASE_URL", repr=False)

    data_dir: Path = Path(".parley")
    kafka_port: int = 9092
    postgres_port: int = 5433

    topic_prefix: str = "parley"
    topic_partitions: int = Field(8, ge=1)
    topic_replication: int = Field(1, ge=1)
    # Source topics keep a week of events so Postgres can be rebuilt by replay.
    topic_retention: Duration = timedelta(days=7)

    sandbox_port: int = 8090  # `parley sandbox`: the provider simulator
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    # `parley api`: this many aiohttp processes serve one port (SO_REUSEPORT) under one parent.
    api_processes: int = Field(1, ge=1, le=64)
    admin_token: str = Field("", repr=False)
    # Comma-separated Fernet keys sealing channel secrets at rest: the first encrypts, all decrypt.
    secrets_key: str = Field("", repr=False)
    # How long a channel's previous secret stays valid after PATCH /v1/channels/{id} replaces it.
    secret_rotation_grace: Duration = timedelta(hours=24)
    max_body_bytes: int = Field(1024 * 1024, ge=1024)
    webhook_tolerance: Duration = timedelta(minutes=5)

    produce_timeout: Duration = timedelta(seconds=5)
    # A crashed worker's partitions move to a live one after this long.
    kafka_session_timeout: Duration = timedelta(seconds=10)

    app_id: str = "parley"
    worker_metrics_port: int = 9464
    worker_batch_size: int = Field(1000, ge=1)
    # Batches of disjoint partitions the lifecycle agent applies at once (agents/batching.py
    # SplitIntake): one batch's Postgres round trips overlap another's CPU work.
    worker_writers: int = Field(2, ge=1, le=64)
    worker_linger: Duration = timedelta(milliseconds=10)
    worker_retries: int = Field(5, ge=0)
    db_pool_size: int = Field(8, ge=1)

    timeout_idle: Timeout = timedelta(hours=48)
    timeout_processing: Timeout = timedelta(hours=24)
    timeout_awaiting_confirmation: Timeout = timedelta(minutes=10)
    timeout_waiting_close: Timeout = timedelta(minutes=3)
    close_grace: Duration = timedelta(seconds=30)
    reopen_window: Duration = timedelta(0)
    sweep_interval: Duration = timedelta(minutes=1)  # 0: no sweep
    # A worker holds in memory only the actions due within this much of now; later ones stay in
    # Postgres until the horizon reaches them (read in every half horizon).
    scheduler_horizon: Duration = Field(timedelta(minutes=10), ge=timedelta(seconds=1))
    sweep_max_refires: int = Field(10_000, ge=1)
    # processed_events rows are kept for the topic's retention plus this margin (a redelivery or a
    # replay can only bring back events still in the topic), pruned every ledger_prune_interval.
    ledger_prune_margin: Duration = timedelta(days=1)
    ledger_prune_interval: Duration = timedelta(hours=1)
    # Closed conversations (with their messages, receipts, audit rows, finished sends) are deleted
    # this many days after closing, in the same periodic round; None (the default): kept forever.
    retention_days: int | None = Field(None, ge=1)

    # Outgoing webhooks (api/webhook_endpoints.py, agents/webhooks.py)
    outbound_allow_http: bool = False  # endpoints must be https unless this is true
    outbound_allow_private: bool = False  # loopback/private/link-local targets (demos, tests)
    # seconds before attempt 1, 2, ... (Standard Webhooks / Svix: now, 5 s, 5 min, 30 min, 2 h,
    # 5 h, 10 h, 10 h); each delay gets up to +10% jitter; after the last the delivery is parked
    webhook_retry_schedule: str = "0,5,300,1800,7200,18000,36000,36000"
    webhook_timeout: Duration = timedelta(seconds=10)  # connect + read, per attempt
    webhook_retry_after_cap: Duration = timedelta(hours=1)  # a longer Retry-After is cut to this
    webhook_concurrency: int = Field(16, ge=1)  # requests in flight per endpoint per worker
    webhook_disable_after: Duration = timedelta(days=5)  # failing every attempt this long: disabled
    webhook_secret_overlap: Duration = timedelta(hours=24)  # a rotated-out secret keeps signing
    # Outbound messages (agents/sender.py)
    send_concurrency: int = Field(64, ge=1)  # requests in flight per business number
    send_timeout: Duration = timedelta(seconds=10)  # connect + read, per attempt
    send_max_attempts: int = Field(6, ge=1)  # retryable failures before a send fails for good
    send_backoff_base: Duration = timedelta(seconds=2)  # 2, 6, 18, 54, 162 s (x3), capped
    send_backoff_cap: Duration = timedelta(minutes=5)
    send_in_doubt_wait: Duration = timedelta(seconds=60)  # wait for a status webhook before resending
    send_rate_margin: float = Field(0.98, gt=0, le=1)  # pace a number at this share of its limit

    log_level: str = "INFO"
    # text: "time LEVEL logger: message"; json: one object per line (parley/logs.py)
    log_format: Literal["text", "json"] = "text"

    def retry_schedule(self) -> tuple[float, ...]:
        """PARLEY_WEBHOOK_RETRY_SCHEDULE as seconds; ValueError if malformed or empty."""
        delays = tuple(float(part) for part in self.webhook_retry_schedule.split(",") if part.strip())
        if not delays or any(d < 0 for d in delays):
            raise ValueError("PARLEY_WEBHOOK_RETRY_SCHEDULE: comma-separated seconds >= 0, at least one")
        return delays

    def policy(self) -> LifecyclePolicy:
        """The domain's lifecycle policy built from these settings."""
        return LifecyclePolicy(
            idle_timeout=self.timeout_idle,
            processing_timeout=self.timeout_processing,
            awaiting_confirmation_timeout=self.timeout_awaiting_confirmation,
            waiting_close_timeout=self.timeout_waiting_close,
            close_grace=self.close_grace,
            reopen_window=self.reopen_window,
        )
