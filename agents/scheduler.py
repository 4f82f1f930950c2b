"""Scheduled actions: a Faust table (the worker's store) plus an in-memory timer wheel (the index),
both holding only the actions due within the time horizon.

The table "actions" is keyed by owner (the Kafka key of the conversation topic) and uses the
producer's partitioner, so Faust assigns each owner's entry with the owner's partition of the
topic; its value holds the owner's actions due within the horizon (a small map name -> token,
due). The wheel indexes (owner, name) pairs of the partitions this worker owns, and only those.

Postgres' scheduled_actions is the durable store: every arming and disarming is written there in
the transaction of the change that made it. So the table is written in memory only, never to its
changelog: after each assignment the worker loads its partitions' rows from Postgres (one
indexed query, see reconcile) and drops what it no longer owns. Replaying a changelog would
restore the same thing three times slower (Faust applies it record by record: 9 s vs 2.8 s for
100,000 actions here) and cost a produce per change on the hot path.

Time horizon (domain/horizon.py). Memory holds only the actions due before `loaded_until`, about
PARLEY_SCHEDULER_HORIZON (10 min) ahead; later ones stay in Postgres, indexed by (partition,
due_at), and `load_ahead` reads the next slice `[loaded_until, now + horizon)` of the owned
partitions (one range query) whenever only half a horizon is left. An arming goes to memory only
when due before the horizon (or the running load's target); a later one is in Postgres already and
comes in with its slice. So memory is bounded by what falls due within one horizon, whatever is
pending beyond it, and recovery after an assignment reads only that much. The Faust table stays
the store of the horizon's actions, co-partitioned with the topic: bounded by the horizon, it is
cheap; keeping it keeps one owner-keyed store the revocation and the firing loop read.

A due action is not acted on here: it becomes its firing event (streams/firings.py) on the
owner's partition, applied by the lifecycle agent in order with everything else. Firing twice is
harmless: the event id is the arming's identity, so the ledger drops a repeat. The engine knows
nothing about conversations; the firing builders do.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import faust
from aiokafka import AIOKafkaProducer

from domain.actions import CLOSE, Action, Arm, due_ms, last_per_action
from domain.horizon import Horizon, at
from domain.timer_wheel import TimerWheel
from streams.firings import firing
from streams.topics import partition_of

log = logging.getLogger(__name__)

Entries = dict[str, tuple[str, int]]  # name -> (token, due ms)
_SEP = b"\x00"  # between owner and name in a wheel key; ingress never lets NUL into a key


_ENTRY = struct.Struct(">BHq")  # name length, token length, due ms; then name, token


def pack(entries: Entries) -> bytes:
    """Encode an owner's pending actions (a table value): compact, exact-size bytes."""
    out = bytearray()
    for name, (token, due) in entries.items():
        n, t = name.encode(), token.encode()
        out += _ENTRY.pack(len(n), len(t), due)
        out += n
        out += t
    return bytes(out)


def unpack(value: bytes | None) -> Entries:
    """Decode a table value (empty for None)."""
    entries: Entries = {}
    at = 0
    while value and at < len(value):
        n, t, due = _ENTRY.unpack_from(value, at)
        at += _ENTRY.size
        name = value[at : at + n].decode()
        token = value[at + n : at + n + t].decode()
        at += n + t
        entries[name] = (token, due)
    return entries


def pack_entry(name: str, token: str, due: int) -> bytes:
    """One action as pack() encodes it: an owner's value is its actions' entries, concatenated."""
    n, t = name.encode(), token.encode()
    return _ENTRY.pack(len(n), len(t), due) + n + t


def entries_of(value: bytes) -> Iterator[tuple[str, int]]:
    """(name, due ms) of each action in a table value, without building the dict unpack() does."""
    at = 0
    while at < len(value):
        n, t, due = _ENTRY.unpack_from(value, at)
        at += _ENTRY.size
        yield value[at : at + n].decode(), due
        at += n + t


def collect(wanted: dict[bytes, bytes], owner: str, name: str, token: str, due: int) -> None:
    """Add one row a load read to `wanted` (owner -> its value, as the table holds it). The rows
    go straight into their final form: 1M actions built as dicts of tuples first cost the worker
    ~450 B each in memory it never gave back (bench/recovery.py, dense case)."""
    key = owner.encode()
    entry = pack_entry(name, token, due)
    held = wanted.get(key)
    wanted[key] = entry if held is None else held + entry


def wheel_key(owner: bytes, name: str) -> bytes:
    """The wheel's key of one action: owner NUL name, except for the close deadline (every
    conversation's, the most common by far), whose key is the owner itself, the very object the
    table is keyed by when the caller passes that one: 56 B an action less at 1M."""
    return owner if name == CLOSE else owner + _SEP + name.encode()


def split_wheel_key(key: bytes) -> tuple[bytes, str]:
    """Inverse of wheel_key."""
    owner, sep, name = key.partition(_SEP)
    return (owner, name.decode()) if sep else (owner, CLOSE)


def owned_partitions(app: faust.App, topic: faust.TopicT) -> set[int]:
    """Partitions of `topic` assigned to this worker's consumer now (none before it started)."""
    name = topic.get_topic_name()
    try:
        assignment = app.consumer.assignment()
    except Exception:  # noqa: BLE001 - consumer not started yet: nothing is ours
        return set()
    return {tp.partition for tp in assignment if tp.topic == name}


# Rows carried over by a migration have no partition yet (SQL has no murmur2): filled in first,
# so the range queries below, which go through the (partition, due_at) index, see them.
_UNFILLED = "SELECT owner, name FROM scheduled_actions WHERE partition IS NULL"
_FILL_PARTITION = """
UPDATE scheduled_actions a SET partition = f.p
FROM unnest($1::text[], $2::text[], $3::int[]) AS f(owner, name, p)
WHERE a.owner = f.owner AND a.name = f.name AND a.partition IS NULL
"""
# After an assignment: the owned partitions' rows due before the horizon.
_UP_TO = """
SELECT owner, name, token, due_at FROM scheduled_actions
WHERE partition = ANY($1::int[]) AND due_at < $2
"""
# Advancing the horizon: the next slice of the owned partitions.
_WINDOW = """
SELECT owner, name, token, due_at FROM scheduled_actions
WHERE partition = ANY($1::int[]) AND due_at >= $2 AND due_at < $3
"""


def _now_ms() -> int:
    return int(time.time() * 1000)


class FiringProducer:
    """The scheduler's own aiokafka producer (acks=all, idempotent) for firing events.

    Faust's `topic.send` took 0.7-1 ms a record in the worker under load: firing 100 due actions
    took 70-120 ms (measured in the schedules bench), and every action due meanwhile waited for
    the next pop. aiokafka's own `send` only appends to its batch (tens of us). The producer
    keys records as Faust's does (murmur2 of the owner), so a firing lands on its owner's
    partition. After a failed send or ack it is dropped, and the next firing starts a fresh one:
    an idempotent producer that lost a record refuses every later one of that partition."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()

    async def send(self, *, key: bytes, value: bytes) -> asyncio.Future[Any]:
        """Append one record; the future resolves on the broker's ack (acks=all)."""
        producer = self._producer
        if producer is None:
            async with self._lock:
                if self._producer is None:
                    started = AIOKafkaProducer(
                        bootstrap_servers=self.bootstrap, acks="all", enable_idempotence=True, linger_ms=1
                    )
                    await started.start()
                    self._producer = started
                producer = self._producer
        try:
            future: asyncio.Future[Any] = await producer.send(self.topic, value=value, key=key)
        except BaseException:
            await self.drop()
            raise
        return future

    async def drop(self) -> None:
        """Stop the producer (a failure, or the worker's shutdown); the next send starts anew."""
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()


class Scheduler:
    """The actions table, its wheel, and the loop that turns due actions into events."""

    def __init__(
        self,
        app: faust.App,
        source: faust.TopicT,
        partitions: int,
        horizon: timedelta = timedelta(minutes=10),
        *,
        bootstrap: str,
    ) -> None:
        self.app = app
        self.source = source
        self.producer = FiringProducer(bootstrap, source.get_topic_name())
        self.partitions = partitions
        self.table = app.Table(
            "actions",
            key_type=bytes,  # bytes -> the raw codec for the table and its changelog
            value_type=bytes,
            partitions=partitions,
            use_partitioner=True,
            help="pending scheduled actions per owner (conversation thread or schedule key)",
        )
        self.wheel: TimerWheel[bytes] = TimerWheel(_now_ms())
        self.horizon = Horizon(int(horizon / timedelta(milliseconds=1)))
        self._loading = asyncio.Lock()  # one load (reconcile or advance) at a time
        self.pool: Callable[[], Awaitable[asyncpg.Pool]] | None = None  # set by attach_postgres
        self.reconcile_timeout = 600.0  # 1M actions load in tens of seconds
        self._wake = asyncio.Event()
        self._ready = asyncio.Event()
        self._confirming: set[asyncio.Future[None]] = set()
        self._touched: set[bytes] | None = None  # wheel keys apply() changed while a load reads
        self._retry: asyncio.Task[None] | None = None
        self.fired = 0
        self.repaired = 0  # actions put back (or removed) from Postgres after an assignment
        self.dropped = 0  # owners of partitions that moved to another worker
        self.loaded = 0  # actions read in by advancing the horizon
        self.lateness_ms: list[float] = []  # a bounded sample, for the metrics endpoint
        self.table.on_recover(self.rebuild)
        app.on_partitions_revoked.connect(self._on_revoked)  # type: ignore[arg-type]  # mode types it loosely

        async def stop_producer(sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
            await self.producer.drop()

        app.on_before_shutdown.connect(stop_producer)  # type: ignore[arg-type]  # mode types it loosely

    def attach_postgres(self, pool: Callable[[], Awaitable[asyncpg.Pool]]) -> None:
        """Where reconcile reads the durable actions from (the lifecycle agent's pool)."""
        self.pool = pool

    def owned(self) -> set[int]:
        """Partitions of the topic this worker is assigned now."""
        return owned_partitions(self.app, self.source)

    async def _on_revoked(self, sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
        # Stop firing what another worker may own in a moment; the store keeps its entries until
        # the new assignment is known (Faust does not re-read the changelog of a kept partition).
        topic = self.source.get_topic_name()
        revoked: Iterable[Any] = args[0] if args else kwargs.get("revoked", ())
        gone = {tp.partition for tp in revoked if tp.topic == topic}
        if gone:
            self._reindex(lambda p: p not in gone)

    def _reindex(self, keep: Callable[[int], bool]) -> None:
        n = self.partitions
        items = (
            (wheel_key(owner, name), due)
            for owner, value in self.table.data.items()
            if keep(partition_of(owner, n))
            for name, (_, due) in unpack(value).items()
        )
        self.wheel = TimerWheel.build(items, _now_ms())
        self._wake.set()

    async def rebuild(self) -> None:
        """After assignment/recovery: keep only the owned partitions' actions, re-index them,
        and make them match Postgres (Faust awaits this before it resumes the partitions, so the
        lifecycle agent consumes only afterwards)."""
        started = time.perf_counter()
        owned = self.owned()
        store = self.table.data
        gone = [owner for owner in store if partition_of(owner, self.partitions) not in owned]
        for owner in gone:
            del store[owner]  # memory only: the changelog belongs to the new owner now
        self.dropped += len(gone)
        self._reindex(lambda p: p in owned)
        repaired: int | str = "not checked"
        if self.pool is not None:
            try:
                repaired = await asyncio.wait_for(self.reconcile(), self.reconcile_timeout)
            except Exception as exc:  # noqa: BLE001 - Postgres unreachable: retry in the background
                log.warning("scheduler: reconcile with Postgres failed (%s); retrying in the background", exc)
                self._retry_later()
        self._ready.set()
        self._wake.set()
        log.info(
            "scheduler: index rebuilt for partitions %s with %d actions due before %s (%d owners of"
            " other partitions dropped, %s repaired from Postgres) in %.0f ms",
            sorted(owned),
            len(self.wheel),
            at(self.horizon.loaded_until).isoformat() if self.horizon.loaded else "(not loaded)",
            len(gone),
            repaired,
            1000 * (time.perf_counter() - started),
        )

    def _retry_later(self) -> None:
        if self._retry is not None and not self._retry.done():
            return

        async def retry() -> None:
            delay = 1.0
            while True:
                await asyncio.sleep(delay)  # backoff while Postgres is unreachable
                try:
                    n = await self.reconcile()
                    log.info("scheduler: reconcile with Postgres done: %d repaired", n)
                    return
                except Exception as exc:  # noqa: BLE001 - keep trying; the sweep covers meanwhile
                    log.warning("scheduler: reconcile with Postgres failed again (%s)", exc)
                    delay = min(delay * 2, 30.0)

        self._retry = asyncio.ensure_future(retry())

    async def reconcile(self) -> int:
        """Make the owned partitions' actions in memory equal Postgres' scheduled_actions due
        before the horizon (now + horizon); returns how many owners changed.

        Postgres is the truth: every arming and disarming is stored there in the transaction of
        the change that made it, so a crash between that commit and the table write leaves it
        only there (a redelivered batch is a ledger duplicate and derives nothing). An action
        the lifecycle agent changes while this reads is left alone: the agent applies effects
        after their commit, so its state is at least as new as the row read here.
        """
        assert self.pool is not None
        pool = await self.pool()
        async with self._loading, pool.acquire() as conn:
            await self._fill_partitions(conn)
            owned = self.owned()
            _, hi = self.horizon.begin(_now_ms())
            wanted: dict[bytes, bytes] = {}
            self._touched = set()
            try:
                async with conn.transaction(readonly=True):
                    async for r in conn.cursor(_UP_TO, sorted(owned), at(hi), prefetch=5000):
                        collect(wanted, r["owner"], r["name"], r["token"], due_ms(r["due_at"]))
                touched = self._touched
            except BaseException:
                self.horizon.failed()
                raise
            finally:
                self._touched = None
            now_owned = self.owned()  # a rebalance meanwhile: touch only what is still ours
            changed = self._merge(wanted, touched, owned & now_owned, full=True, filtered=owned <= now_owned)
            self.horizon.done()
        self.repaired += changed
        return changed

    async def _fill_partitions(self, conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy) -> None:
        unfilled = [
            (r["owner"], r["name"], partition_of(r["owner"].encode(), self.partitions))
            for r in await conn.fetch(_UNFILLED)
        ]
        if unfilled:
            await conn.execute(_FILL_PARTITION, *map(list, zip(*unfilled, strict=True)))

    async def advance(self) -> int:
        """Read the next slice `[loaded_until, now + horizon)` of the owned partitions into
        memory (one indexed range query); returns how many actions it read. Nothing before the
        first reconcile: that one loads everything up to its horizon."""
        assert self.pool is not None
        pool = await self.pool()
        async with self._loading:
            if not self.horizon.loaded:
                return 0
            owned = self.owned()
            lo, hi = self.horizon.begin(_now_ms())
            self._touched = set()
            try:
                rows = await pool.fetch(_WINDOW, sorted(owned), at(lo), at(hi))
                touched = self._touched
            except BaseException:
                self.horizon.failed()
                raise
            finally:
                self._touched = None
            now_owned = self.owned()
            wanted: dict[bytes, bytes] = {}
            for r in rows:
                collect(wanted, r["owner"], r["name"], r["token"], due_ms(r["due_at"]))
            self._merge(wanted, touched, owned & now_owned, full=False, filtered=owned <= now_owned)
            self.horizon.done()
        self.loaded += len(rows)
        return len(rows)

    def _merge(
        self,
        wanted: dict[bytes, bytes],
        touched: set[bytes],
        owned: set[int],
        *,
        full: bool,
        filtered: bool = False,
    ) -> int:
        """Put what a load read into the table and the wheel; returns how many owners changed.

        full: `wanted` is everything due before the horizon, so what memory holds beyond it goes
        (an action moved later, or disarmed, by a change the worker never applied). Otherwise
        `wanted` is one slice, added to what memory holds. Either way an action in `touched` keeps
        the lifecycle agent's state: it changed it after the rows were read. filtered: every owner
        in `wanted` is of `owned` (the query asked for those partitions and none went meanwhile),
        so no key needs hashing (murmur2 in Python: ~5 us a key, 5 s for 1M).
        """
        n = self.partitions
        store = self.table.data
        changed = 0
        for owner, value in wanted.items():
            if not filtered and partition_of(owner, n) not in owned:
                continue
            held = store.get(owner)
            if held is None and not touched:
                # The common case of a load (a worker starting, a new slice): straight in.
                store[owner] = value
                for name, due in entries_of(value):
                    self.wheel.schedule(wheel_key(owner, name), due)
                changed += 1
            elif held != value:
                changed += self._merge_owner(owner, unpack(held), unpack(value), touched, full)
        if full:
            left = [o for o in store if o not in wanted and partition_of(o, n) in owned]
            for owner in left:
                changed += self._merge_owner(owner, unpack(store[owner]), {}, touched, full)
        if changed:
            self._wake.set()
        return changed

    def _merge_owner(
        self, owner: bytes, have: Entries, want: Entries, touched: set[bytes], full: bool
    ) -> int:
        """One owner's merge (see _merge); 1 if what memory holds for it changed."""
        if not touched:  # nothing changed meanwhile, no key to build
            new = dict(want) if full else {**have, **want}
        else:
            kept = {k: v for k, v in have.items() if wheel_key(owner, k) in touched}
            new = kept if full else dict(have)
            for name, entry in want.items():
                if wheel_key(owner, name) not in touched:
                    new[name] = entry
        if new == have:
            return 0
        for name in have.keys() - new.keys():
            self.wheel.cancel(wheel_key(owner, name))
        for name, (token, due) in new.items():
            if have.get(name, (token, None))[1] != due:
                self.wheel.schedule(wheel_key(owner, name), due)
        if new:
            self.table.data[owner] = pack(new)
        else:
            del self.table.data[owner]
        return 1

    async def load_ahead(self) -> None:
        """Advance the horizon whenever only half of it is left ahead, forever; a failed load is
        logged and retried with backoff (the horizon stays; the sweep covers what comes due)."""
        await self._ready.wait()
        backoff = 1.0
        while True:
            nxt = self.horizon.next_load_ms()
            now = _now_ms()
            if nxt is None or now < nxt:
                # Not due yet (or the first reconcile is still being retried): a reconcile meanwhile
                # only moves the horizon later, so waking early just checks again.
                await asyncio.sleep(1.0 if nxt is None else (nxt - now) / 1000)
                continue
            try:
                await self.advance()
                backoff = 1.0
            except Exception as exc:  # noqa: BLE001 - Postgres trouble: keep trying
                log.warning("scheduler: advancing the horizon failed (%s); retrying in %.0f s", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)

    def apply(self, actions: Iterable[Action]) -> None:
        """Carry out the action decisions of a committed batch (the last per owner and name):
        an arming due within the horizon goes to memory; a later one only drops what memory held
        for that action (Postgres has it, and the horizon's advance brings it back in time)."""
        last = last_per_action(list(actions))
        owners: dict[bytes, list[Action]] = {}
        for (owner_id, _), action in last.items():
            owners.setdefault(owner_id.encode(), []).append(action)
        touched = self._touched
        bound = at(self.horizon.bound())
        earliest = self.wheel.next_due_ms()
        store = self.table.data
        for owner, changes in owners.items():
            entries = unpack(store.get(owner))
            for action in changes:
                key = wheel_key(owner, action.name)
                if touched is not None:
                    touched.add(key)
                if isinstance(action, Arm) and action.due_at < bound:
                    due = due_ms(action.due_at)
                    entries[action.name] = (action.token, due)
                    self.wheel.schedule(key, due)
                    if earliest is None or due < earliest:
                        earliest = due
                        self._wake.set()
                elif entries.pop(action.name, None) is not None:
                    self.wheel.cancel(key)
            if entries:
                store[owner] = pack(entries)
            else:
                store.pop(owner, None)

    async def run(self) -> None:
        """Sleep until the next due action (or a wake-up), fire what is due, repeat."""
        await self._ready.wait()
        while True:
            now = _now_ms()
            due = self.wheel.pop_due(now)
            if due:
                # Hand the records to the producer and move on: waiting for the acks here would
                # make every action due meanwhile late by a broker round trip.
                futures = await self._fire(due, now)
                task = asyncio.ensure_future(self._confirm(due, futures))
                self._confirming.add(task)
                task.add_done_callback(self._confirming.discard)
                continue
            nxt = self.wheel.next_due_ms()
            timeout = 1.0 if nxt is None else max(0.0, min(1.0, (nxt - now) / 1000))
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass

    async def _confirm(self, due: list[tuple[bytes, int]], futures: list[Any]) -> None:
        """Wait for the acks; if Kafka failed, put the actions back so they fire again."""
        try:
            for fut in futures:
                await fut  # acks=all: a due action is either on its partition or re-armed here
            self.fired += len(futures)
        except Exception as exc:  # noqa: BLE001 - Kafka trouble: keep the actions, retry
            log.warning("scheduler: firing %d actions failed (%s); re-arming them", len(due), exc)
            await self.producer.drop()
            retry_at = _now_ms() + 1000
            for key, due_at in due:
                if self.wheel.due_of(key) is None:
                    self.wheel.schedule(key, max(due_at, retry_at))
            self._wake.set()

    async def _fire(self, due: list[tuple[bytes, int]], now: int) -> list[Any]:
        fired_at = datetime.fromtimestamp(now / 1000, UTC)
        futures: list[Any] = []
        for key, due_at in due:
            owner, name = split_wheel_key(key)
            entry = unpack(self.table.get(owner)).get(name)
            if entry is None or entry[1] > due_at:
                continue  # disarmed, or re-armed for a later time (the wheel holds that one)
            # The action's own due, not the wheel's: a firing retried after a failed produce
            # (the wheel then holds now + 1 s) is the same event, with the same id.
            record = firing(owner.decode(), name, entry[0], entry[1], fired_at, "timer")
            try:
                futures.append(await self.producer.send(key=owner, value=record.model_dump_json().encode()))
            except Exception as exc:  # noqa: BLE001 - the producer refused: re-arm, try again soon
                log.warning("scheduler: producing a firing failed (%s); re-arming", exc)
                self.wheel.schedule(key, _now_ms() + 1000)
                continue
            self._observe(now - entry[1])
        return futures

    def _observe(self, lateness: float) -> None:
        if len(self.lateness_ms) >= 10_000:
            del self.lateness_ms[:5_000]
        self.lateness_ms.append(lateness)
