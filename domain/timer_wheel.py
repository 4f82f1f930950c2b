"""Hierarchical timer wheel: the per-partition in-memory index of close deadlines.

The authoritative timers live in the Faust table; this index only answers "what is due now"
and "when is the next one", and is rebuilt from the table on partition assignment.

Layout. Time is counted in ticks (``due_ms // tick_ms``). A tick number is read as six digits,
least significant first, of 8, 6, 6, 6, 6 and 6 bits; each digit is one level of the wheel,
with one bucket per digit value. With the default 1 ms tick:

=====  =======  ================  ===========
level  buckets  one bucket spans  level spans
=====  =======  ================  ===========
0      256      1 ms              256 ms
1      64       256 ms            16.4 s
2      64       16.4 s            17.5 min
3      64       17.5 min          18.6 h
4      64       18.6 h            49.7 days
5      64       49.7 days         8.7 years
=====  =======  ================  ===========

plus an overflow bucket (ticks that differ from the cursor above bit 38) and a ready bucket
(ticks at or before the cursor whose due ms has not come yet, or that were already past).

Placement: an entry of tick ``t`` after the cursor tick ``cur`` goes to the level of the highest
digit in which ``t`` and ``cur`` differ, into the bucket of ``t``'s digit there. That bucket is
untouched until the cursor reaches it; reaching it re-files ("cascades") its entries at least
one level down. So an entry is moved at most once per level (amortized O(1)), and a pop costs
O(due timers + entries cascaded) plus the buckets the cursor crossed (never more than 576,
however far it jumps); timers not yet due are never scanned.

Entries and truth. A bucket is a list of keys plus an ``array('q')`` of the due each entry was
filed under: 16 bytes an entry, no per-entry objects, and cascades need no dict lookup.
``_dues`` (key -> due ms) is the truth, consulted only when an entry's own due is reached:
a missing key means cancelled (the entry is dropped), a later due means the timer was pushed
back (the entry is re-filed under it). Hence the invariant: every pending key has an entry
filed under a due <= its real due, so nothing fires late or early, and:

- pushing a deadline later (the common "new message resets the idle timer") files nothing;
- moving it earlier files one more entry; cancel just drops the dict entry;
- a key fires once, as firing pops it from the dict (later duplicates find nothing).

Stale entries are bounded: when entries exceed twice the pending timers (plus a slack),
every bucket is re-filed from the dict, O(pending), amortized O(1) per cancel/reschedule.

Pauses: entering a new bucket at level L re-files that whole bucket in one pop_due, at ~0.3 us
an entry. With 48 h deadlines that is ~40% of all timers every 18.6 h (level 4) and all of
them every 49.7 days (level 5); bench/bench_timer_wheel.py measures both, and compaction.
"""

from __future__ import annotations

from array import array
from collections.abc import Hashable, Iterable
from operator import itemgetter
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

_LEVEL_BITS = (8, 6, 6, 6, 6, 6)
_SHIFTS = tuple(sum(_LEVEL_BITS[:i]) for i in range(len(_LEVEL_BITS)))
_SIZES = tuple(1 << b for b in _LEVEL_BITS)
_OFFSETS = tuple(sum(_SIZES[:i]) for i in range(len(_SIZES)))
_TOTAL_BITS = sum(_LEVEL_BITS)
_OVERFLOW = sum(_SIZES)  # bucket index of the overflow bucket
_READY = _OVERFLOW + 1  # bucket index of the ready bucket
_L0_BITS = _LEVEL_BITS[0]
_L0_MASK = _SIZES[0] - 1
_NBUCKETS = _READY + 1


def _level_of_bit(pos: int) -> int:
    return max(i for i, s in enumerate(_SHIFTS) if s <= pos)


# Indexed by (t ^ cur).bit_length(), i.e. 1 + the highest differing bit: where that level's
# buckets start, how far to shift t, and which bits of it are the digit.
_B_OFF = (0, *(_OFFSETS[_level_of_bit(b - 1)] for b in range(1, _TOTAL_BITS + 1)))
_B_SHIFT = (0, *(_SHIFTS[_level_of_bit(b - 1)] for b in range(1, _TOTAL_BITS + 1)))
_B_MASK = (0, *(_SIZES[_level_of_bit(b - 1)] - 1 for b in range(1, _TOTAL_BITS + 1)))

_BY_DUE = itemgetter(1)
_MIN_DUE = -(2**63)  # entries keep their due in an array('q')
_MAX_DUE = 2**63 - 1


class TimerWheel(Generic[K]):
    """At most one pending deadline (integer ms since epoch) per key; pops them in due order."""

    __slots__ = ("_cur", "_dues", "_entries", "_keys", "_tick", "_when")

    # Stale entries tolerated beyond the pending count before everything is re-filed.
    _COMPACT_SLACK = 65_536
    # next_due_ms() takes the exact min of a bucket only up to this many entries.
    _SCAN_LIMIT = 4_096

    def __init__(self, start_ms: int, tick_ms: int = 1) -> None:
        """Create an empty wheel whose cursor sits at ``start_ms``."""
        if tick_ms < 1:
            raise ValueError("tick_ms must be >= 1")
        if start_ms < 0:
            raise ValueError("start_ms must be >= 0 (ms since epoch)")
        self._tick = tick_ms
        # Every tick <= _cur has been swept: its timers fired or sit in the ready bucket.
        self._cur = start_ms // tick_ms
        self._dues: dict[K, int] = {}
        self._keys: list[list[K]] = [[] for _ in range(_NBUCKETS)]
        self._when: list[array[int]] = [array("q") for _ in range(_NBUCKETS)]
        self._entries = 0  # entries in all buckets, stale ones included

    @classmethod
    def build(cls, items: Iterable[tuple[K, int]], start_ms: int, tick_ms: int = 1) -> TimerWheel[K]:
        """Bulk rebuild from ``(key, due_ms)`` pairs; a repeated key keeps its last due."""
        wheel = cls(start_ms, tick_ms)
        # The outer dict() re-sizes a dict grown by insertion to fit (or clones it when it
        # already fits): up to half the index memory for a one-off ~30 ms copy at 1M.
        wheel._dues = dict(dict(items))
        wheel._refile_all()
        return wheel

    def __len__(self) -> int:
        """Number of pending timers."""
        return len(self._dues)

    def due_of(self, key: K) -> int | None:
        """The pending due of ``key``, or None."""
        return self._dues.get(key)

    def schedule(self, key: K, due_ms: int) -> None:
        """Set or replace the single timer of ``key``; a due in the past fires on next pop."""
        if not _MIN_DUE <= due_ms <= _MAX_DUE:
            raise ValueError(f"due_ms out of the int64 range: {due_ms}")
        dues = self._dues
        old = dues.get(key)
        dues[key] = due_ms
        if old is not None and due_ms >= old:
            return  # the entry filed for old (<= old) is reached first and re-files the key
        t = due_ms // self._tick
        cur = self._cur
        if t <= cur:
            idx = _READY
        else:
            b = (t ^ cur).bit_length()
            idx = _OVERFLOW if b > _TOTAL_BITS else _B_OFF[b] + ((t >> _B_SHIFT[b]) & _B_MASK[b])
        self._keys[idx].append(key)
        self._when[idx].append(due_ms)
        self._entries += 1
        if self._entries > 2 * len(dues) + self._COMPACT_SLACK:
            self._compact()

    def cancel(self, key: K) -> bool:
        """Drop the timer of ``key``; True if one was pending."""
        if self._dues.pop(key, None) is None:
            return False
        if self._entries > 2 * len(self._dues) + self._COMPACT_SLACK:
            self._compact()
        return True

    def pop_due(self, now_ms: int) -> list[tuple[K, int]]:
        """Remove and return every timer with due <= now_ms, in due order; advance the cursor.

        Equal dues come out in no particular order. A ``now_ms`` earlier than a previous one
        leaves the cursor where it is and fires only what is due by ``now_ms``.
        """
        tick = self._tick
        old = self._cur
        new = now_ms // tick
        keys_b = self._keys
        when_b = self._when

        # Detach every bucket the cursor reaches before re-filing anything, so re-filed
        # entries never land in a bucket that is still to be swept.
        swept: list[tuple[list[K], array[int]]] = []
        if keys_b[_READY]:
            swept.append((keys_b[_READY], when_b[_READY]))
            keys_b[_READY] = []
            when_b[_READY] = array("q")
        if new > old and new >> _L0_BITS == old >> _L0_BITS:
            # Common case (a pop every few ms): no level-0 carry, so nothing to cascade.
            for idx in range((old & _L0_MASK) + 1, (new & _L0_MASK) + 1):
                if keys_b[idx]:
                    swept.append((keys_b[idx], when_b[idx]))
                    keys_b[idx] = []
                    when_b[idx] = array("q")
            self._cur = new
        elif new > old:
            for shift, size, off in zip(_SHIFTS, _SIZES, _OFFSETS, strict=True):
                lo = (old >> shift) + 1
                hi = new >> shift
                if hi < lo:
                    break  # the cursor stayed in this level's bucket, so in all above it
                mask = size - 1
                # Only digits after the cursor's, under the cursor's parent, hold entries.
                for slot in range(lo, min(hi, (old >> shift) | mask) + 1):
                    idx = off + (slot & mask)
                    if keys_b[idx]:
                        swept.append((keys_b[idx], when_b[idx]))
                        keys_b[idx] = []
                        when_b[idx] = array("q")
            if (new >> _TOTAL_BITS) > (old >> _TOTAL_BITS) and keys_b[_OVERFLOW]:
                swept.append((keys_b[_OVERFLOW], when_b[_OVERFLOW]))
                keys_b[_OVERFLOW] = []
                when_b[_OVERFLOW] = array("q")
            self._cur = new
        else:
            new = old  # the cursor never moves back; re-file relative to where it stays

        fired: list[tuple[K, int]] = []
        if not swept:
            return fired
        dues = self._dues
        get = dues.get
        b_off, b_shift, b_mask = _B_OFF, _B_SHIFT, _B_MASK
        gone = 0
        for keys, whens in swept:
            for key, due in zip(keys, whens, strict=True):
                t = due // tick
                if t <= new:
                    # This entry's own due is reached: now, and only now, ask the truth.
                    real = get(key)
                    if real is None:
                        gone += 1  # cancelled, or fired through a duplicate entry
                        continue
                    if real <= now_ms:
                        del dues[key]
                        fired.append((key, real))
                        gone += 1
                        continue
                    due = real  # pushed back (or not yet due within this tick): re-file
                    t = due // tick
                    if t <= new:
                        keys_b[_READY].append(key)
                        when_b[_READY].append(due)
                        continue
                b = (t ^ new).bit_length()
                idx = _OVERFLOW if b > _TOTAL_BITS else b_off[b] + ((t >> b_shift[b]) & b_mask[b])
                keys_b[idx].append(key)
                when_b[idx].append(due)
        self._entries -= gone
        fired.sort(key=_BY_DUE)
        return fired

    def next_due_ms(self) -> int | None:
        """Earliest pending due, or None when empty; never later than the true earliest.

        Exact unless (a) the earliest entry belongs to a timer since cancelled or pushed
        later: then it is that stale entry's due; or (b) the earliest bucket holds more than
        ``_SCAN_LIMIT`` entries: then it is that bucket's start (a min over 400k entries would
        cost ~10 ms). Either way ``pop_due`` at that time does the drop/re-file/cascade that
        is due then anyway, so a caller looping ``pop_due(next_due_ms())`` fires each timer
        at its exact ms.
        """
        if not self._dues:
            return None
        when_b = self._when
        if when_b[_READY]:
            return min(when_b[_READY])  # due now or already past; any size is worth it
        cur = self._cur
        limit = self._SCAN_LIMIT
        for shift, size, off in zip(_SHIFTS, _SIZES, _OFFSETS, strict=True):
            # Buckets in time order: digits after the cursor's, lowest level first.
            digit = (cur >> shift) & (size - 1)
            for j in range(digit + 1, size):
                whens = when_b[off + j]
                if whens:
                    if len(whens) <= limit:
                        return min(whens)
                    return (((cur >> shift) + j - digit) << shift) * self._tick
        whens = when_b[_OVERFLOW]
        if whens:
            if len(whens) <= limit:
                return min(whens)
            return (((cur >> _TOTAL_BITS) + 1) << _TOTAL_BITS) * self._tick
        return min(self._dues.values())  # unreachable while the invariant holds

    def _compact(self) -> None:
        """Drop stale entries, and the dict's deleted slots (a dict never shrinks)."""
        self._dues = dict(self._dues)
        self._refile_all()

    def _refile_all(self) -> None:
        """Rebuild every bucket from the dict: exactly one entry per pending key."""
        keys_b: list[list[K]] = [[] for _ in range(_NBUCKETS)]
        when_b: list[array[int]] = [array("q") for _ in range(_NBUCKETS)]
        cur = self._cur
        tick = self._tick
        b_off, b_shift, b_mask = _B_OFF, _B_SHIFT, _B_MASK
        for key, due in self._dues.items():
            t = due // tick
            if t <= cur:
                idx = _READY
            else:
                b = (t ^ cur).bit_length()
                idx = _OVERFLOW if b > _TOTAL_BITS else b_off[b] + ((t >> b_shift[b]) & b_mask[b])
            keys_b[idx].append(key)
            when_b[idx].append(due)
        self._keys = keys_b
        self._when = when_b
        self._entries = len(self._dues)
