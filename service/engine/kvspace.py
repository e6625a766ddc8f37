"""Hands out contiguous ranges of the KV cache's token pool, one per running sequence, sized to what it can use.

A sequence can hold at most prompt + max_new_tokens positions, usually far fewer than the model's window:
reserving exactly that (instead of a full window per sequence) lets the same memory hold several times as
many sequences. A range is contiguous so that prefill attends over a plain slice of the cache.

Admission is first come, first served with backfilling (EASY backfilling, as batch schedulers of clusters do):
while the head of the queue finds no range long enough, a later request may take a range now only if that does
not delay the earliest step at which the head would fit, given when each running sequence will have freed its
range at the latest (`earliest_fit`). Short requests then run in the gaps a long one leaves, and the long one
still starts no later than it would have.
"""
from __future__ import annotations

import bisect


class KVSpace:
    """First-fit allocation of [start, start + n) ranges in a pool of `size` token positions."""

    def __init__(self, size: int):
        self.size = size
        self._free: list[tuple[int, int]] = [(0, size)] if size > 0 else []  # (start, length), sorted, never adjacent
        self.used = 0

    def _first_fit(self, n: int) -> int | None:
        """Index in the free list of the first free range of at least n positions."""
        return next((i for i, (_, length) in enumerate(self._free) if length >= n), None)

    def fits(self, n: int) -> bool:
        """Whether alloc(n) would succeed now."""
        return self._first_fit(n) is not None

    def layout(self) -> tuple[tuple[int, int], ...]:
        """The free ranges as (start, length), in order: equal layouts admit the same requests."""
        return tuple(self._free)

    def copy(self) -> "KVSpace":
        other = KVSpace(0)
        other.size, other._free, other.used = self.size, list(self._free), self.used
        return other

    def at_fit(self, n: int, releases: list[tuple[float, int, int]]) -> tuple[float | None, "KVSpace"]:
        """(when, space): the earliest time at which a range of n positions is free if the ranges `releases` lists
        as (time, start, length) are freed by those times and nothing else changes (-inf: it fits now; None: it
        never does), and the space as it is then (every release up to that time done)."""
        later = self.copy()
        if later.fits(n):
            return float("-inf"), later
        ordered = sorted(releases)
        for k, (when, start, length) in enumerate(ordered):
            later.free(start, length)
            if later.fits(n):
                for same, s2, l2 in ordered[k + 1:]:
                    if same > when:
                        break
                    later.free(s2, l2)
                return when, later
        return None, later

    def take(self, start: int, n: int) -> bool:
        """Reserve the given range [start, start + n) if it is free (alloc picks the range itself)."""
        i = bisect.bisect_right(self._free, (start, self.size + 1)) - 1
        if i < 0 or sum(self._free[i]) < start + n:
            return False
        s0, length = self._free.pop(i)
        after = (start + n, s0 + length - start - n)
        for k, piece in enumerate(p for p in ((s0, start - s0), after) if p[1] > 0):
            self._free.insert(i + k, piece)
        self.used += n
        return True

    def alloc(self, n: int) -> int | None:
        """Start of a free range of n positions, or None while no free range is that long."""
        i = self._first_fit(n)
        if i is None:
            return None
        start, length = self._free[i]
        if length == n:
            del self._free[i]
        else:
            self._free[i] = (start + n, length - n)
        self.used += n
        return start

    def free(self, start: int, n: int) -> None:
        """Give back a range that alloc() returned; it merges with free neighbours."""
        self.used -= n
        i = bisect.bisect_left(self._free, (start, 0))
        if i < len(self._free) and self._free[i][0] < start + n or i and sum(self._free[i - 1]) > start:
            raise ValueError(f"range [{start}, {start + n}) is already free")
        if i < len(self._free) and self._free[i][0] == start + n:  # joins the range after it
            n += self._free.pop(i)[1]
        if i and sum(self._free[i - 1]) == start:  # and the one before it
            start, n = self._free[i - 1][0], self._free[i - 1][1] + n
            i -= 1
            del self._free[i]
        self._free.insert(i, (start, n))


class Backfill:
    """One admission round's backfilling behind a head of the queue that needs `head` positions and does not fit
    (see the module's docstring). `releases`: (time, start, length) of every running sequence's range, the time
    being the latest at which it will have been freed, in any unit (engine steps)."""

    def __init__(self, space: KVSpace, head: int, releases: list[tuple[float, int, int]]):
        self.space, self.head = space, head
        # When the head fits at the latest, and the space then: a range taken now must leave the head room in it.
        self.when, self.then = space.at_fit(head, releases)

    def alloc(self, n: int, until: float) -> int | None:
        """Start of a range of n positions for a request that frees it by `until` at the latest, or None (the space
        as it was) when no range is free or taking it would make the head wait longer."""
        start = self.space.alloc(n)
        if start is None or self.when is None or until <= self.when:  # gone before the head is due
            return start
        if self.then.take(start, n):
            if self.then.fits(self.head):
                return start
            self.then.free(start, n)
        self.space.free(start, n)
        return None
