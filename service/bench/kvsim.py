"""What contiguous KV-cache ranges cost under mixed lengths: the scheduler's admission replayed on the engine's own
allocator (engine/kvspace.py) against a paged one, step by step, without a model (`python -m service.bench
--kv-fragmentation`).

Issue 14 asks to page the cache if contiguous ranges fragment under mixed lengths, and to measure it first. The
engine admits waiting requests in arrival order while a batch row is free and the allocator has a free range of
prompt + max_new_tokens positions (first fit); a paged cache would admit whenever that many positions are free in
any blocks. Replaying the same arrivals through both shows how long requests wait only because the free positions
are split. Backfilling (engine/kvspace.py: a later request takes a free range behind a head that finds none, if
that does not delay the head) is replayed beside strict arrival order, on the engine's own `Backfill`. Time is
counted in engine steps: every running sequence gains one token per step (prefill is taken as
done in the step that admits it, which favours neither allocator).
"""
from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

from ..engine.kvspace import Backfill, KVSpace


@dataclasses.dataclass
class Request:
    arrival: int  # engine step at which it joins the queue
    size: int  # positions it reserves: prompt + max_new_tokens
    steps: int  # decode steps it runs once admitted (its new tokens)


class PagedSpace:
    """A paged pool of the same size: any `block`-position blocks, so a request fits whenever enough are free."""

    def __init__(self, size: int, block: int = 16):
        self.blocks, self.block, self.used_blocks = size // block, block, 0

    def _need(self, n: int) -> int:
        return -(-n // self.block)

    def alloc(self, n: int) -> int | None:
        if self.used_blocks + self._need(n) > self.blocks:
            return None
        self.used_blocks += self._need(n)
        return 0

    def free(self, start: int, n: int) -> None:
        self.used_blocks -= self._need(n)

    def fits(self, n: int) -> bool:
        return self.used_blocks + self._need(n) <= self.blocks

    def take(self, start: int, n: int) -> bool:
        return self.alloc(n) is not None

    def at_fit(self, n: int, releases: list[tuple[float, int, int]]) -> tuple[float | None, "PagedSpace"]:
        later = PagedSpace(self.blocks * self.block, self.block)
        later.used_blocks = self.used_blocks
        if later.fits(n):
            return float("-inf"), later
        for when, start, length in sorted(releases):
            later.free(start, length)
            if later.fits(n):
                return when, later
        return None, later


def replay(requests: list[Request], pool: int, rows: int, paged: bool, block: int = 16,
           backfilling: bool = True, lookahead: int = 16) -> dict:
    """Admit `requests` (sorted by arrival) first come, first served as the scheduler does, with at most `rows`
    running, and (`backfilling`) later ones among the next `lookahead` waiters in the gaps that do not delay the
    head (engine/kvspace.py's backfill); returns each request's wait in steps and the steps at which the head of
    the queue waited although the free positions would have held it (fragmentation)."""
    space = PagedSpace(pool, block) if paged else KVSpace(pool)
    waiting: list[int] = []  # indices into requests, in arrival order
    running: list[tuple[int, int, int]] = []  # (index, start, end step)
    wait = [0] * len(requests)
    nxt, step, fragmented, tokens, busy_rows = 0, 0, 0, 0, 0
    while nxt < len(requests) or waiting or running:
        for r in [r for r in running if r[2] <= step]:
            running.remove(r)
            space.free(r[1], requests[r[0]].size)
        while nxt < len(requests) and requests[nxt].arrival <= step:
            waiting.append(nxt)
            nxt += 1
        behind, tried = None, 0  # a Backfill once the head does not fit; waiters tried behind it
        for i in list(waiting):
            if len(running) >= rows or behind is not None and (not backfilling or tried >= lookahead):
                break
            if behind is None:
                start = space.alloc(requests[i].size)
            else:
                tried += 1
                start = behind.alloc(requests[i].size, step + requests[i].steps)
            if start is None:
                if behind is None:
                    free = pool - (space.used_blocks * block if paged else space.used)
                    fragmented += int(not paged and free >= requests[i].size)
                    behind = Backfill(space, requests[i].size,
                                      [(end, r_start, requests[r].size) for r, r_start, end in running])
                continue
            waiting.remove(i)
            wait[i] = step - requests[i].arrival
            running.append((i, start, step + requests[i].steps))
        tokens += len(running)
        busy_rows += len(running)
        step += 1
    waits = sorted(wait)
    return {"steps": step, "tokens_per_step": tokens / step, "mean_running": busy_rows / step,
            "wait_steps": {"mean": sum(waits) / len(waits), "p50": waits[len(waits) // 2],
                           "p99": waits[min(len(waits) - 1, int(0.99 * len(waits)))], "max": waits[-1]},
            "fragmented_steps": fragmented, "waits": wait}


def arrivals(n: int, per_step: float, prompt: tuple[int, int], new: tuple[int, int], seed: int) -> list[Request]:
    """n requests at Poisson arrivals of `per_step` per engine step, prompt and new-token counts drawn per request."""
    rng = random.Random(seed)
    out, t = [], 0.0
    for _ in range(n):
        t += rng.expovariate(per_step)
        p, k = rng.randint(*prompt), rng.randint(*new)
        out.append(Request(int(t), p + k, k))
    return out


# (name, paged, backfilling): the engine's admission before and with backfilling, and a paged cache's.
POLICIES = (("contiguous", False, False), ("contiguous_backfill", False, True), ("paged_backfill", True, True))


def kv_fragmentation(out: Path, step_ms: float = 10.0, n: int = 4000) -> dict:
    """Contiguous admission in strict order, with backfilling, and paged admission for the benchmark's two request mixes, pools from a small GPU's to an
    H200's, at arrival rates around each pool's saturation; rates are converted at `step_ms` per engine step (the
    H200's decode step at 64 real-traffic rows is ~9-10 ms)."""
    mixes = {"open loop (prompts 200-800, 64-256 new)": ((200, 800), (64, 256)),
             "mixed (prompts 50-1,500, 16-512 new)": ((50, 1500), (16, 512))}
    # Token positions: 16k and 32k take 7.3 and 14.7 GB in fp16 (int8: half), what a 24 GB GPU has left for the
    # cache; 131k (60 GB) is still below an H200's pool beside the dense weight copies.
    pools = (16_384, 32_768, 131_072)
    res: dict = {"step_ms": step_ms, "requests_per_run": n, "rows": 128, "page_block": 16, "runs": []}
    for mix, (prompt, new) in mixes.items():
        mean_size = sum(prompt) / 2 + sum(new) / 2
        mean_steps = sum(new) / 2
        for pool in pools:
            # Requests/step at which the pool (or the 128 rows) would be full on average: reserved positions
            # per request x how long each is held.
            capacity = min(pool / mean_size, 128) / mean_steps
            for load in (0.7, 0.9, 1.0):
                reqs = arrivals(n, capacity * load, prompt, new, seed=pool + int(load * 100))
                row = {"mix": mix, "pool": pool, "load": load,
                       "offered_per_s": round(capacity * load * 1000 / step_ms, 2)}
                for name, paged, backfilling in POLICIES:
                    r = replay(reqs, pool, 128, paged, backfilling=backfilling)
                    r.pop("waits")
                    r["wait_ms"] = {k: v * step_ms for k, v in r.pop("wait_steps").items()}
                    row[name] = r
                res["runs"].append(row)
                print(f"{mix}, pool {pool}, load {load}: wait p99 / mean running "
                      + ", ".join(f"{name} {row[name]['wait_ms']['p99']:.0f} ms / {row[name]['mean_running']:.1f}"
                                  for name, _, _ in POLICIES), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv-fragmentation.json").write_text(json.dumps(res, indent=2))
    return res
