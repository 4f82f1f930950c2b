"""Outbound messages: <prefix>.sends -> the provider, in order per conversation, within its limits.

The lifecycle agent accepts a send in the conversation's order and queues it (outbound_sends,
with an outbox record to <prefix>.sends keyed by channel). So all sends of one business number
are consumed by one worker, whose token bucket is then exact for that number (agents/lanes.py
for the lanes): a lane is one conversation thread (channel, contact), its group the channel.

- Order: a lane sends its head only; the next goes once the head was accepted by the provider or
  failed for good.
- Limits: per number, a paced token bucket (burst 1, PARLEY_SEND_RATE_MARGIN of the number's
  throughput) when sends start, and a count of the requests as they leave (at most the
  throughput minus one in any 1 s window: domain/ratelimit.SendWindow); per recipient, Meta's
  pair rate (a bucket of ~45 refilled at 1 per 6 s). A recipient at its limit waits alone, on
  the timer wheel.
- Failures (channels/outbound.py classifies them): throughput/5xx/no connection: retried with
  capped exponential backoff and jitter, Retry-After honoured; pair rate: this recipient waits;
  invalid recipient, outside the window, bad template...: failed at once with the provider's
  code and title (a `message.failed` event and a dead letter); token refused: the channel is
  paused (a `channel.paused` event) until its token is updated.
- Never twice, never lost: `sending` is stored before a request leaves. An attempt whose answer
  never came (timeout, dropped connection, kill -9) is in doubt: the send waits
  PARLEY_SEND_IN_DOUBT_WAIT for the provider's status webhook (which carries Parley's message id
  and marks it sent), and is sent again only if none came.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import faust
import orjson

from agents.lanes import GroupCommit, LaneAgent, LaneEngine, LaneKey, retry_forever
from agents.webhook_client import WebhookSender
from channels import outbound
from domain.ratelimit import SendWindow, TokenBucket, number_window
from streams import sends_db as db
from streams.channel_secrets import Sealer
from streams.settings import Settings
from streams.store import Store

log = logging.getLogger(__name__)
Pool = Callable[[], Awaitable[asyncpg.Pool]]


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


@dataclass
class ChannelView:
    """What the sender needs of a channel: its config (with the primary secrets), its limits."""

    id: str
    provider: str
    config: dict[str, Any]
    paused: str | None  # why, when the provider refused its token
    bucket: TokenBucket
    window: SendWindow  # the number's requests as they leave (domain/ratelimit.py)
    recipient_rate: float
    recipient_burst: float
    recipients: dict[str, TokenBucket] = field(default_factory=dict)

    def recipient(self, contact_id: str) -> TokenBucket:
        bucket = self.recipients.get(contact_id)
        if bucket is None:
            bucket = self.recipients[contact_id] = TokenBucket(self.recipient_rate, self.recipient_burst)
        return bucket


class Channels:
    """Channel configs and pause states, reloaded when NOTIFY says a channel changed. The buckets
    survive a reload (a config change keeps the tokens already spent)."""

    def __init__(self, pool: Pool, secrets_key: str, margin: float) -> None:
        self.pool = pool
        self.secrets_key = secrets_key
        self.margin = margin
        self.views: dict[str, ChannelView] = {}
        self.stale = True
        # One reload at a time: two that overlap (the send loop's, and a NOTIFY's) could finish
        # out of order, and the older read (channel still paused) would overwrite the newer one
        # after the newer one had woken the channel's lanes, leaving them asleep for good.
        self._reloading = asyncio.Lock()

    def invalidate(self) -> None:
        self.stale = True

    async def current(self) -> dict[str, ChannelView]:
        async with self._reloading:
            if not self.stale:
                return self.views
            self.stale = False
            try:
                return await self._reload()
            except BaseException:
                self.stale = True  # the next call reads again
                raise

    async def _reload(self) -> dict[str, ChannelView]:
        pool = await self.pool()
        store = Store(pool, Sealer(self.secrets_key))
        now = datetime.now(UTC)
        async with pool.acquire() as conn:
            paused = await db.paused_channels(conn)
        channels, unopened = await store.channel_records()
        for channel_id, exc in unopened.items():  # a wrong PARLEY_SECRETS_KEY here: never send unsigned
            log.error("sender: channel %s cannot be used: %s", channel_id, exc)
        views: dict[str, ChannelView] = {}
        for channel in channels:
            channel_id = channel.id
            config = channel.config(now)
            throughput = float(config.get("throughput", 80.0))
            rate = throughput * self.margin
            window = number_window(throughput)
            old = self.views.get(channel_id)
            # A reload that leaves the limit as it was keeps what was spent of it.
            bucket = old.bucket if old and old.bucket.rate == rate else TokenBucket(rate, 1)
            if old and old.window.limit == window.limit:
                window = old.window
            views[channel_id] = ChannelView(
                channel_id,
                channel.provider,
                config,
                paused.get(channel_id),
                bucket,
                window,
                float(config.get("recipient_rate", 1e9)),
                float(config.get("recipient_burst", 1e9)),
                old.recipients if old else {},
            )
        self.views = views
        return views


class Sender(LaneEngine[db.Send]):
    """Sends the queued messages of this worker's partitions of <prefix>.sends."""

    def __init__(self, pool: Pool, channels: Channels, http: WebhookSender, settings: Settings) -> None:
        super().__init__()
        self.pool = pool
        self.channels = channels
        self.http = http
        self.settings = settings
        self.partitions = settings.topic_partitions
        self.concurrency = settings.send_concurrency
        self.in_doubt_wait = settings.send_in_doubt_wait.total_seconds()
        self.inflight: dict[str, int] = {}
        self.channel_wake: dict[str, float] = {}  # a channel with no token: when it has one
        self.leaving: GroupCommit[db.Leaving] = GroupCommit(self._write_leaving, "sender: attempts leaving")
        self.outcomes: GroupCommit[db.Outcome] = GroupCommit(self._write_outcomes, "sender: outcomes")
        self.park: Callable[[db.Send, str], Awaitable[None]] | None = None  # the dead-letter hook
        self._wake = asyncio.Event()
        self.sent = 0
        self.failed = 0
        self.retried = 0
        self.in_doubt = 0
        self.resends_in_doubt = 0
        self.taken_local = 0

    def add(self, sends: Iterable[db.Send]) -> None:
        """Take queued (or in-doubt) sends: new from the sends topic, or reloaded."""
        for s in sends:
            due: float | None = s.next_attempt_at.timestamp() if s.next_attempt_at else None
            if s.status == "sending" and s.sending_at is not None:  # in doubt: wait for a receipt
                # From now, not from when the attempt left: a status webhook that came while no
                # worker owned this send (kill -9, rebalance) is applied only once this worker's
                # lifecycle agent catches up, so the wait must start when the send is taken over.
                due = max(s.sending_at.timestamp(), time.time()) + self.in_doubt_wait
            self.lanes.add(
                (s.channel_id, s.contact_id), s.partition, s.seq, s.id, s, None if due is None else _ms(due)
            )
        self._wake.set()

    def take_local(self, sends: Iterable[db.Send]) -> None:
        """Sends the lifecycle agent of this process just queued (committed): those of partitions
        this worker holds start now, without waiting for their record to come back through the
        outbox relay and <prefix>.sends (that record still comes; its send is then known here,
        or finished, and changes nothing). Another worker's are left to it."""
        mine = [s for s in sends if s.partition in self.held]
        self.taken_local += len(mine)
        self.add(mine)

    def settled(self, key: LaneKey) -> None:
        """A status webhook settled this lane's head (in doubt): check it now, not at the timeout."""
        lane = self.lanes.lanes.get(key)
        if (
            lane is not None
            and lane.state == "waiting"
            and lane.queue
            and lane.queue[0][2].status == "sending"
        ):
            self.lanes.wheel.cancel(key)
            self.lanes.make_ready(key)
            self._wake.set()

    async def open_work(self, partitions: set[int]) -> list[db.Send]:
        """The queued and in-doubt sends of these partitions."""
        async with (await self.pool()).acquire() as conn:
            return await db.open_sends(conn, partitions)

    async def run(self) -> None:
        """Forever: due lanes become ready, each channel starts what its limits allow, wait."""
        writers = [asyncio.ensure_future(self.leaving.run()), asyncio.ensure_future(self.outcomes.run())]
        try:
            while True:
                now = time.time()
                self.lanes.due(_ms(now))
                if self.channels.stale:
                    try:
                        await self.channels.current()
                    except Exception as exc:  # noqa: BLE001 - Postgres away: the next round retries
                        self.channels.stale = True
                        log.warning("sender: reading channels failed (%s: %s)", type(exc).__name__, exc)
                self._start_ready(now)
                waits = [t for t in self.channel_wake.values() if t > now]
                nxt = self.lanes.next_due_ms()
                if nxt is not None:
                    waits.append(nxt / 1000)
                timeout = max(0.0, min([1.0, *[w - now for w in waits]]))
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except TimeoutError:
                    pass
        finally:
            for w in writers:
                w.cancel()

    def _start_ready(self, now: float) -> None:
        if self.paused:
            return
        views = self.channels.views
        for channel_id in self.lanes.groups():
            view = views.get(channel_id)
            if self.channel_wake.get(channel_id, 0) > now:
                continue  # no token yet for this number
            for key, send in self.lanes.take(channel_id):
                if view is None or view.paused:
                    self.lanes.sleep(key)  # until the channel exists / its token is updated
                    continue
                if send.status != "sending":  # an in-doubt check sends nothing by itself
                    wait = view.recipient(send.contact_id).wait(now)
                    if wait > 0:
                        self.lanes.wait(key, _ms(now + wait))  # this recipient only
                        continue
                    wait = view.bucket.wait(now)
                    if wait > 0 or self.inflight.get(channel_id, 0) >= self.concurrency:
                        self.lanes.make_ready_first(key)
                        self.channel_wake[channel_id] = now + wait
                        break
                    view.bucket.take(now)
                    view.recipient(send.contact_id).take(now)
                self.inflight[channel_id] = self.inflight.get(channel_id, 0) + 1
                self.busy[key] = asyncio.ensure_future(self._attempt(key, send, view))

    def _release(self, channel_id: str, slot: list[bool]) -> None:
        # The request is over: the channel's slot frees now; the lane stays busy until the
        # outcome is stored, so the conversation's order is unchanged (as in agents/webhooks.py).
        if slot[0]:
            slot[0] = False
            self.inflight[channel_id] -= 1
            self._wake.set()

    async def _attempt(self, key: LaneKey, s: db.Send, view: ChannelView) -> None:
        slot = [True]  # this attempt holds one of the channel's in-flight slots
        try:
            if s.status == "sending":  # in doubt: did the provider's status webhook settle it?
                if not await self._still_in_doubt(s.id):
                    self.lanes.finish_head(key)
                    return
                self.resends_in_doubt += 1
                log.warning(
                    "sender: %s still in doubt after %.0fs; sending again",
                    s.id,
                    self.in_doubt_wait,
                    extra={
                        "conversation_id": s.conversation_id,
                        "thread_key": f"{s.channel_id}/{s.contact_id}",
                    },
                )
                s = replace(s, status="queued")
            await self._send(key, s, view, slot)
        finally:
            self.busy.pop(key, None)
            self._release(view.id, slot)

    async def _send(self, key: LaneKey, s: db.Send, view: ChannelView, slot: list[bool]) -> None:
        attempt = s.attempts + 1
        left_at = datetime.now(UTC)
        await self.leaving.store(db.Leaving(s.id, attempt, left_at))
        s = replace(s, attempts=attempt, sending_at=left_at, status="sending")
        try:
            request = build_request(view, s)
        except ValueError as exc:  # no token / sender configured, or content the provider cannot take
            result = outbound.SendOutcome("failed", code="parley", title=str(exc))
        else:
            # The number's limit, counted as requests leave: a time to wait for, not an event
            # (checked again on waking, as another send of the number may have left meanwhile).
            while (wait := view.window.wait(time.monotonic())) > 0:  # noqa: ASYNC110
                await asyncio.sleep(wait)
            view.window.take(time.monotonic())
            answer = await self.http.post(request.url, request.body, request.headers)
            self._release(view.id, slot)
            classify = outbound.classify_whatsapp if view.provider == "whatsapp" else outbound.classify_twilio
            result = classify(
                answer.status,
                answer.body.encode(),
                answer.retry_after,
                timed_out_after_send=answer.status is None and answer.may_have_arrived,
            )
        await self._settle(key, s, view, result)

    async def _settle(self, key: LaneKey, s: db.Send, view: ChannelView, r: outbound.SendOutcome) -> None:
        now = datetime.now(UTC)
        done = db.Outcome(s, "queued", now, error_code=r.code, error_title=r.title)
        if r.kind == "sent":
            done = replace(done, status="sent", provider_message_id=r.provider_message_id)
        elif r.kind == "in_doubt":
            done = replace(done, status="sending")
        elif r.kind == "failed" or (
            r.kind == "retry" and s.attempts - s.retry_base >= self.settings.send_max_attempts
        ):
            title = r.title if r.kind == "failed" else f"gave up after {s.attempts} attempts: {r.title}"
            done = replace(done, status="failed", error_title=title)
        elif r.kind in ("retry", "recipient_wait"):
            delay = self._delay(s, r)
            done = replace(done, next_attempt_at=now + timedelta(seconds=delay))
        await self.outcomes.store(done)
        if r.kind == "sent":
            self.sent += 1
            self.lanes.finish_head(key)
        elif done.status == "failed":
            self.failed += 1
            log.error(
                "sender: %s to %s/%s failed: %s %s",
                s.id,
                s.channel_id,
                s.contact_id,
                r.code,
                done.error_title,
                extra={"conversation_id": s.conversation_id, "thread_key": f"{s.channel_id}/{s.contact_id}"},
            )
            if self.park is not None:
                await self.park(s, f"send failed: {r.code}: {done.error_title}")
            self.lanes.finish_head(key)
        elif r.kind == "in_doubt":
            self.in_doubt += 1
            self.lanes.replace_head(key, s)
            self.lanes.wait(key, _ms(now.timestamp() + self.in_doubt_wait))
        elif r.kind == "paused":
            await self._pause(view, f"{r.code}: {r.title}")
            self.lanes.replace_head(key, replace(s, status="queued"))
            self.lanes.sleep(key)
        else:
            self.retried += 1
            assert done.next_attempt_at is not None
            self.lanes.replace_head(key, replace(s, status="queued", next_attempt_at=done.next_attempt_at))
            self.lanes.wait(key, _ms(done.next_attempt_at.timestamp()))

    def _delay(self, s: db.Send, r: outbound.SendOutcome) -> float:
        if r.kind == "recipient_wait":  # Meta's pair rate: one message per 1 / rate seconds
            return max(r.retry_after or 0.0, 1 / self.channels.views[s.channel_id].recipient_rate)
        wait = outbound.backoff(
            s.attempts - s.retry_base,
            base=self.settings.send_backoff_base.total_seconds(),
            factor=3.0,
            cap=self.settings.send_backoff_cap.total_seconds(),
            jitter=random.random(),
        )
        return max(wait, r.retry_after or 0.0)

    async def _pause(self, view: ChannelView, reason: str) -> None:
        view.paused = reason

        async def pause() -> bool:
            async with (await self.pool()).acquire() as conn:
                return await db.pause_channel(conn, view.id, reason, datetime.now(UTC), self.partitions)

        if await retry_forever(pause, f"sender: pausing channel {view.id}"):
            log.error("sender: channel %s paused: %s (update its token to resume)", view.id, reason)

    async def _still_in_doubt(self, send_id: str) -> bool:
        async def check() -> bool:
            async with (await self.pool()).acquire() as conn:
                return await db.still_in_doubt(conn, send_id)

        return await retry_forever(check, f"sender: checking {send_id}")

    async def _write_leaving(self, items: list[db.Leaving]) -> None:
        async with (await self.pool()).acquire() as conn:
            await db.mark_leaving(conn, items)

    async def _write_outcomes(self, items: list[db.Outcome]) -> None:
        async with (await self.pool()).acquire() as conn:
            await db.record_outcomes(conn, items, self.partitions)

    def channels_changed(self) -> None:
        """A channel changed (token updated, limits): reload it; resumed channels' lanes go."""
        self.channels.invalidate()

        async def resume() -> None:
            views = await self.channels.current()
            for channel_id, view in views.items():
                if not view.paused:
                    self.lanes.wake_group(channel_id)
            self._wake.set()

        task = asyncio.ensure_future(resume())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())


def build_request(view: ChannelView, s: db.Send) -> outbound.ProviderRequest:
    """The provider request of one send; ValueError when the channel cannot send it."""
    content = outbound.OUTBOUND_CONTENT.validate_python(s.content)
    c = view.config
    if view.provider == "whatsapp":
        if not c.get("access_token"):
            raise ValueError("the channel has no access_token: PATCH /v1/channels/{id} with one")
        return outbound.whatsapp_request(
            graph_base=c["graph_base"],
            version=c["graph_version"],
            phone_number_id=c["phone_number_id"],
            access_token=c["access_token"],
            to=s.contact_id,
            content=content,
            message_id=s.id,
        )
    if view.provider == "twilio":
        if not c.get("sender"):
            raise ValueError("the channel has no sender (From)")
        return outbound.twilio_request(
            api_base=c["api_base"],
            account_sid=c["account_sid"],
            auth_token=c["auth_token"],
            sender=c["sender"],
            to=s.contact_id,
            content=content,
            message_id=s.id,
            status_callback=outbound.twilio_status_callback(c["public_url"], s.id),
        )
    raise ValueError(f"a {view.provider} channel cannot send messages")


class SendAgent(LaneAgent):
    """The consumer of <prefix>.sends around the sender (agents/lanes.LaneAgent)."""

    name = "sender"

    def __init__(
        self,
        app: faust.App,
        settings: Settings,
        topic: faust.TopicT,
        pool: Pool,
        on_fatal: Callable[[BaseException], None],
    ) -> None:
        self.pool = pool
        self.http = WebhookSender(
            allow_http=settings.outbound_allow_http,
            allow_private=settings.outbound_allow_private,
            timeout=settings.send_timeout.total_seconds(),
            retry_after_cap=settings.webhook_retry_after_cap.total_seconds(),
        )
        self.channels = Channels(pool, settings.secrets_key, settings.send_rate_margin)
        self.sender = Sender(pool, self.channels, self.http, settings)
        super().__init__(app, settings, topic, self.sender, self.http, on_fatal, linger=0)

    def listeners(self) -> dict[str, Callable[[str], None]]:
        return {"parley_channels": lambda _: self.sender.channels_changed(), db.SENDS_CHANNEL: self._notified}

    async def connected(self) -> None:
        self.sender.channels_changed()
        await super().connected()

    def _notified(self, text: str) -> None:
        if text.startswith("channel:"):
            self.sender.channels_changed()
        elif text.startswith("settled:"):  # a receipt settled a send in doubt: its lane goes on now
            channel_id, _, contact_id = text.removeprefix("settled:").partition("\n")
            self.sender.settled((channel_id, contact_id))
        else:
            self.reload_later(int(text))

    async def handle(self, batch: list[Any]) -> None:
        """Take the batch's sends in. A record only says which send to look at: its state is read
        from Postgres (the lifecycle agent queued it there), so a record seen twice, or one
        re-driven from the dead letters, can never send what is already sent or failed."""
        ids = []
        for message in batch:  # Faust Messages (agents/batching.py)
            try:
                ids.append(str(orjson.loads(bytes(message.value))["data"]["id"]))
            except Exception as exc:  # noqa: BLE001 - unreadable: the reload from Postgres has it
                log.error("sender: unreadable record at offset %d: %s", message.offset, exc)
        ids = [i for i in ids if i not in self.sender.lanes.known]  # handed over in-process already
        if not ids:
            return

        async def read() -> list[db.Send]:
            async with (await self.pool()).acquire() as conn:
                return await db.open_sends_by_id(conn, ids)

        self.sender.add(await retry_forever(read, f"sender: reading {len(ids)} sends"))
