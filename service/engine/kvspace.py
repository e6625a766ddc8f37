"""Hands out contiguous ranges of the KV cache's token pool, one per running sequence, sized to what it can use.

A sequence can hold at most prompt + max_new_tokens positions, usually far fewer than the model's window:
reserving exactly that (instead of a full window per sequence) lets the same memory hold several times as
many sequences. A range is contiguous so that prefill attends over a plain slice of the cache.
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
