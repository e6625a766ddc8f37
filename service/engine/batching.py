"""Dynamic batching of Score work: pairs (or multiple-choice groups) from concurrent calls, grouped by length into token-budgeted forward passes."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Awaitable, Callable

from .config import BatchConfig
from .drain import DrainRate
from .errors import QueueFull
from .scoring import ChoiceGroup, PairResult, ScoreItem
from .stats import ScoreBatchStats, StatsSink

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Pending:
    item: ScoreItem | ChoiceGroup  # anything with .length (tokens) and .pairs
    future: asyncio.Future
    enqueued: float
    start_by: float | None = None  # monotonic time after which it is refused rather than started


def plan_batches(items: list, length: Callable[[object], int], max_tokens: int, max_rows: int) -> list[list]:
    """Split items into batches of similar length: sorted longest first, each batch within
    max_rows rows and max_tokens padded tokens (rows x its longest row). An item longer than the
    budget still gets a batch of its own."""
    out: list[list] = []
    cur: list = []
    width = 0
    for it in sorted(items, key=length, reverse=True):
        w = width or length(it)
        if cur and (len(cur) + 1 > max_rows or (len(cur) + 1) * w > max_tokens):
            out.append(cur)
            cur, w = [], length(it)
        cur.append(it)
        width = w
    if cur:
        out.append(cur)
    return out


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


class ScoreBatcher:
    """Collects ScoreItems from many coroutines and runs them in batches, one batch at a time.

    Work arriving while a round of batches runs waits for the next round, so nothing starves;
    within a round, items are sorted by length so padding stays small. A caller that is
    cancelled leaves its items behind; they are dropped before their batch is formed.

    Admission by deadline: the batcher measures how many tokens it scores per second of time during which work
    was queued (engine/drain.py, so time the model thread gives Generate steps counts against it). A call whose
    tokens, behind the tokens already queued, would not be done by its `finish_by`, or would not start by its
    `start_by`, is refused at once with QueueFull ("expected_wait"); one still queued at its `start_by` is refused
    then ("waited_too_long") instead of being run for a caller that has given up.
    """

    def __init__(
        self,
        run: Callable[[list[ScoreItem]], Awaitable[list[PairResult]]],
        cfg: BatchConfig,
        max_batch_tokens: int | Callable[[], int],
        on_stats: StatsSink,
    ):
        self._run = run
        self._cfg = cfg
        # Tokens per forward pass, read before each batch (the engine lowers it while streams run).
        self._budget = max_batch_tokens if callable(max_batch_tokens) else lambda: max_batch_tokens
        self._on_stats = on_stats
        self._pending: list[_Pending] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.drain = DrainRate()
        self._backlog = 0  # tokens submitted and not yet done (scored, failed or cancelled)

    @property
    def queued_pairs(self) -> int:
        return len(self._pending)

    @property
    def backlog_tokens(self) -> int:
        return self._backlog

    def _check_deadline(self, tokens: int, start_by: float | None, finish_by: float | None, now: float) -> None:
        """QueueFull("expected_wait") when `tokens` queued behind the backlog would not start by `start_by` or be
        done by `finish_by`, at the measured drain rate; nothing is refused before a rate has been measured."""
        floor = self._budget()  # no batch done yet: as if a whole one would be done in the time stuck so far
        checks = [(start_by, self._backlog, "start"), (finish_by, self._backlog + tokens, "be done")]
        for limit, ahead, what in checks:
            if limit is None or not ahead:
                continue
            wait = self.drain.expected_wait(ahead, now, floor)
            if wait is not None and now + wait > limit:
                raise QueueFull(f"expected wait for {tokens} Score tokens to {what} {wait:.1f} s ({self._backlog} "
                                f"tokens queued ahead, scored at {self.drain.rate(now):.0f}/s) is beyond this "
                                f"request's limit of {max(0.0, limit - now):.1f} s", "expected_wait")

    def _done(self, p: _Pending, fut: asyncio.Future) -> None:
        """Every queued item ends here once: its tokens leave the backlog; scored ones count as drained."""
        self._backlog -= p.item.length
        scored = not fut.cancelled() and fut.exception() is None
        self.drain.tick(time.monotonic(), p.item.length if scored else 0, self._backlog > 0)

    async def submit(self, items: list[ScoreItem], start_by: float | None = None,
                     finish_by: float | None = None) -> list[PairResult]:
        """The items' results, in order, once their batches ran; `start_by` / `finish_by` (monotonic times): see
        the class's admission by deadline."""
        if self._task is None or self._task.done():
            # (Re)start on the caller's loop. Callers still queued on this loop are served by the new task; those
            # of an event loop that ended went with it.
            loop = asyncio.get_running_loop()
            self._pending = [p for p in self._pending if p.future.get_loop() is loop and not p.future.done()]
            self._backlog = sum(p.item.length for p in self._pending)  # the ended loop's items never finish
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._loop(), name="score-batcher")
            self._task.add_done_callback(self._stopped)
            if self._pending:
                self._wake.set()
        if len(self._pending) + len(items) > self._cfg.max_queue_pairs:
            raise QueueFull(f"score queue is full ({len(self._pending)} pairs waiting); retry later")
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        tokens = sum(it.length for it in items)
        self._check_deadline(tokens, start_by, finish_by, now)
        entries = [_Pending(it, loop.create_future(), now, start_by) for it in items]
        if not self._backlog:
            self.drain.tick(now, 0, True)  # queueing starts now, not at the last batch
        self._backlog += tokens
        for e in entries:
            e.future.add_done_callback(lambda f, e=e: self._done(e, f))
        self._pending.extend(entries)
        self._wake.set()
        try:
            return list(await asyncio.gather(*(e.future for e in entries)))
        except BaseException:  # cancelled, or one item failed: the call's other items are not run for nobody
            for e in entries:
                e.future.cancel()
            raise

    def close(self, exc: BaseException) -> None:
        """Fail every queued item with exc and stop the loop task (engine shutdown): a task left pending on its
        event loop would keep the batcher, and through it the engine and its GPU memory, alive."""
        task = self._task

        def stop():
            for p in self._pending:
                if not p.future.done():
                    p.future.set_exception(exc)
            self._pending = []
            if task is not None:
                task.cancel()

        if task is None or task.done():
            return
        loop = task.get_loop()
        if loop.is_running() and not _on_loop(loop):
            loop.call_soon_threadsafe(stop)
        else:
            stop()

    def _stopped(self, task: asyncio.Task) -> None:
        """The loop task ended (cancelled by close(), or a bug): nobody queued is left waiting forever."""
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            log.error("score batcher stopped", exc_info=exc)
            for p in self._pending:
                if not p.future.done():
                    p.future.set_exception(RuntimeError(f"the score batcher stopped: {exc!r}"))
            self._pending = []

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if len(self._pending) < self._cfg.max_batch_pairs and self._cfg.max_wait_ms > 0:
                # A lone request waits a moment for company; under load the GPU is the wait.
                await asyncio.sleep(self._cfg.max_wait_ms / 1000)
            todo = self._live(self._pending)
            self._pending = []
            try:
                length, rows = (lambda p: p.item.length), self._cfg.max_batch_pairs
                for planned in plan_batches(todo, length, self._budget(), rows):
                    # Re-cut to the budget of now: streams may have started while earlier batches ran.
                    for batch in plan_batches(planned, length, self._budget(), rows):
                        batch = self._live(batch)  # cancelled or expired while earlier batches ran
                        if batch:
                            await self._run_batch(batch)
            except Exception as e:  # noqa: BLE001 - a failed round fails its callers; the loop serves the next
                log.exception("score batch round failed")
                for p in todo:
                    if not p.future.done():
                        p.future.set_exception(e)

    @staticmethod
    def _live(entries: list[_Pending]) -> list[_Pending]:
        """The entries still to run: cancelled ones dropped, those past their start_by refused."""
        now = time.monotonic()
        live = []
        for p in entries:
            if p.future.done():
                continue
            if p.start_by is not None and now > p.start_by:
                p.future.set_exception(QueueFull(
                    f"waited {now - p.enqueued:.1f} s for a Score batch, until this request's limit", "waited_too_long"))
                continue
            live.append(p)
        return live

    async def _run_batch(self, batch: list[_Pending]) -> None:
        start = time.monotonic()
        try:
            results = await self._run([p.item for p in batch])
        except Exception as e:  # noqa: BLE001 - the failure belongs to the callers, not to the loop
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(e)
            return
        for p, r in zip(batch, results):
            if not p.future.done():
                p.future.set_result(r)
        width = max(p.item.length for p in batch)
        stats = ScoreBatchStats(
            pairs=sum(p.item.pairs for p in batch),
            tokens=sum(p.item.length for p in batch),
            padded_tokens=width * len(batch),
            queue_seconds=start - min(p.enqueued for p in batch),
            forward_seconds=time.monotonic() - start,
        )
        try:
            self._on_stats(stats)
        except Exception:  # noqa: BLE001 - a metrics failure must never stop the batcher
            log.exception("stats sink failed")
