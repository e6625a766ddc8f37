"""Admission under pressure, without Ray: queue limits apply before tokenizing, a cancelled waiter frees its place
at once, a failed Score round fails only its callers, and token-detail output has a per-call budget."""
from __future__ import annotations

import asyncio
import math
import threading
import time

import pytest

from conftest import run
from service.engine import batching
from service.engine.batching import ScoreBatcher
from service.engine.config import BatchConfig
from service.engine.engine import HEAVY_WORK, ScoreOptions
from service.engine.errors import InvalidRequest, QueueFull
from service.engine.generation import GenerationParams, Sequence
from service.engine.scheduler import Scheduler
from service.engine.scoring import ScoreItem


def _item(n):
    return ScoreItem(input_ids=[1] * n, target_ids=[1], truncated_tokens=0)


def test_cancelled_waiters_leave_the_queue_at_once(engine_small):
    """2 slots, 3 waiting: the queue is full; the waiters' clients go away; as many new requests fit at once,
    without a step having run (before, cancelled waiters counted until they reached the head of the queue)."""
    s = Scheduler(engine_small.runner, engine_small.lm.eos_token_id, max_waiting=3, prefill_chunk=3)
    tok = engine_small.lm.tokenizer

    def seq():
        return Sequence([5, 6, 7], GenerationParams(max_new_tokens=4), tok)

    first = [seq() for _ in range(5)]  # 2 take the free slots at the next step, 3 wait
    for q in first:
        s.add(q)
    with pytest.raises(QueueFull):
        s.add(seq())
    for q in first[2:]:
        s.cancel(q)
    for _ in range(3):
        s.add(seq())
    assert len(s.waiting) == 5 and not any(q.cancelled for q in s.waiting)
    with pytest.raises(QueueFull):
        s.check_room()


class _Gate:
    """Wraps a tokenizing function: counts its calls and holds them until opened."""

    def __init__(self, fn):
        self.fn, self.calls, self.open = fn, 0, threading.Event()

    def __call__(self, *a, **kw):
        self.calls += 1
        assert self.open.wait(30)
        return self.fn(*a, **kw)


async def _held_back(gate: _Gate, coros: list) -> tuple[list, list]:
    """Start the calls while the gate holds the tokenizer: (the calls already answered, every call's result)."""
    calls = [asyncio.ensure_future(c) for c in coros]
    await asyncio.sleep(0.2)
    refused = [c for c in calls if c.done()]
    gate.open.set()
    return refused, await asyncio.gather(*calls, return_exceptions=True)


def test_small_calls_never_wait_behind_heavy_tokenizer_work(engine_fp32):
    """While heavy work (a 190,000-character Tokenize, a Score's token details) holds its lane, small tokenizing
    work still runs: a small Score and one with a context of HEAVY_WORK characters both complete, and heavy work queued
    behind the held one waits (before, one tokenizer thread held every small call 0.6-0.7 s behind a big one)."""
    gate = _Gate(lambda: "heavy")

    async def go():
        held = asyncio.ensure_future(engine_fp32.on_tokenizer_thread(gate, size=HEAVY_WORK + 1))
        behind = asyncio.ensure_future(engine_fp32.on_tokenizer_thread(lambda: "behind", size=HEAVY_WORK + 1))
        while gate.calls == 0:
            await asyncio.sleep(0.01)
        small = await asyncio.wait_for(engine_fp32.score([("서울의 봄은", " 벚꽃")], ScoreOptions()), 30)
        long_context = "봄 " * (HEAVY_WORK // 2 - 8)  # the most a small call holds: HEAVY_WORK characters
        rolling = await asyncio.wait_for(engine_fp32.score([(long_context, " 벚꽃")], ScoreOptions(truncate=True)), 60)
        waiting = not held.done() and not behind.done()
        gate.open.set()
        return small, rolling, waiting, await held, await behind

    small, rolling, waiting, h, b = run(go())
    assert math.isfinite(small[0].logprob) and rolling[0].truncated_tokens > 0
    assert waiting and (h, b) == ("heavy", "behind")


def test_score_is_refused_before_it_is_tokenized(engine_fp32, monkeypatch):
    """A queue of 4 pairs: while the tokenizer holds the first calls, the rest are refused at once, untokenized."""
    monkeypatch.setattr(engine_fp32.cfg.batch, "max_queue_pairs", 4)
    gate = _Gate(engine_fp32._encoder)
    monkeypatch.setattr(engine_fp32, "_encoder", gate)

    refused, results = run(_held_back(gate, [engine_fp32.score([("서울의 봄은", f" 벚꽃 {i}")], ScoreOptions())
                                             for i in range(10)]))
    assert len(refused) == 6 and all(isinstance(c.exception(), QueueFull) for c in refused)
    assert sum(not isinstance(r, Exception) for r in results) == 4
    assert gate.calls == 4  # only the admitted calls reached the tokenizer (before: all 10)
    assert engine_fp32._tokenizing_pairs == 0


def test_generate_is_refused_before_its_prompt_is_tokenized(engine_small, monkeypatch):
    """2 slots + 3 waiting: 5 prompts may be on their way; the 6th and later are refused, untokenized."""
    gate = _Gate(engine_small.prompt_ids)
    monkeypatch.setattr(engine_small, "prompt_ids", gate)

    refused, results = run(_held_back(gate, [engine_small.prompt(f"서울의 봄은 {i}", []) for i in range(8)]))
    assert len(refused) == 3 and all(isinstance(c.exception(), QueueFull) for c in refused)
    assert sum(isinstance(r, list) for r in results) == 5 and gate.calls == 5
    assert engine_small._tokenizing_prompts == 0


def test_token_details_have_a_budget_per_call(engine_fp32, monkeypatch):
    monkeypatch.setattr(engine_fp32.cfg.limits, "max_score_details", 50)
    tok = engine_fp32.lm.tokenizer
    cont = " 맑고 바람이 시원하다. 오늘은"
    n = len(tok(("오늘은 날씨가" + cont), add_special_tokens=False)["input_ids"]) - \
        len(tok("오늘은 날씨가", add_special_tokens=False)["input_ids"])
    top = 50 // n - 1  # n x (1 + top) <= 50 < n x (2 + top)
    (r,) = run(engine_fp32.score([("오늘은 날씨가", cont)], ScoreOptions(details=True, top_n=top)))
    assert r.num_tokens == n and r.details is not None
    with pytest.raises(InvalidRequest, match=rf"{n} continuation tokens x \(1 \+ top_logprobs {top + 1}\) = "
                                             rf"{n * (top + 2)} entries; the limit per call is 50"):
        run(engine_fp32.score([("오늘은 날씨가", cont)], ScoreOptions(details=True, top_n=top + 1)))
    with pytest.raises(InvalidRequest, match="limit per call is 50"):  # summed over pairs
        run(engine_fp32.score([("오늘은 날씨가", cont)] * 2, ScoreOptions(details=True, top_n=top)))


def test_a_failed_batch_round_fails_its_callers_and_the_next_request_succeeds(monkeypatch):
    async def fine(items):
        return [i.length for i in items]

    real = batching.plan_batches
    calls = {"n": 0}

    def fails_once(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("planning failed")
        return real(*a, **kw)

    monkeypatch.setattr(batching, "plan_batches", fails_once)

    async def main():
        b = ScoreBatcher(fine, BatchConfig(max_wait_ms=5), 10_000, lambda s: None)
        first = await asyncio.gather(b.submit([_item(2)]), b.submit([_item(3)]), return_exceptions=True)
        then = await asyncio.wait_for(b.submit([_item(4)]), 5)
        return first, then

    first, then = asyncio.run(main())
    assert all(isinstance(e, RuntimeError) and "planning failed" in str(e) for e in first)
    assert then == [4]


def test_a_restarted_batcher_serves_the_callers_already_queued():
    """The batcher's task ended with callers queued (before: the restart dropped them, and they waited forever)."""
    async def fine(items):
        return [i.length for i in items]

    async def main():
        b = ScoreBatcher(fine, BatchConfig(max_wait_ms=50), 10_000, lambda s: None)
        queued = asyncio.ensure_future(b.submit([_item(2)]))
        await asyncio.sleep(0.01)  # queued; the loop waits out max_wait_ms for company
        b._task.cancel()
        await asyncio.sleep(0.01)
        later = await asyncio.wait_for(b.submit([_item(3)]), 5)
        return await asyncio.wait_for(queued, 5), later

    assert asyncio.run(main()) == ([2], [3])


def test_drain_rate_measures_only_time_with_waiters():
    from service.engine.drain import DrainRate

    d = DrainRate(horizon_s=1e9)  # no decay: exact arithmetic
    assert d.expected_wait(1, 0.0) is None
    d.tick(0.0, 0, waiting_after=False)
    d.tick(100.0, 0, waiting_after=True)  # idle 100 s with nobody waiting: not counted
    assert d.expected_wait(1, 100.0) is None  # queueing starts now: nothing measured yet
    d.tick(102.0, 1, waiting_after=True)
    d.tick(104.0, 3, waiting_after=True)  # 4 admitted in 4 s of queueing: 1 s per place
    assert d.expected_wait(1, 104.0) == pytest.approx(1.0) and d.expected_wait(5, 104.0) == pytest.approx(5.0)
    d.tick(114.0, 0, waiting_after=True)  # stuck 10 s: 14 s for 4 admissions
    assert d.expected_wait(2, 114.0) == pytest.approx(7.0)
    assert d.expected_wait(2, 118.0) == pytest.approx(9.0)  # still stuck, 4 s later: counted without a tick
    d.tick(118.0, 0, waiting_after=False)  # the waiters went away (cancelled)
    assert d.expected_wait(2, 1118.0) == pytest.approx(9.0)  # 1,000 s idle later: idle time is not queueing


def test_drain_rate_forgets_old_traffic():
    from service.engine.drain import DrainRate

    d = DrainRate(horizon_s=10.0)
    d.tick(0.0, 0, waiting_after=True)
    d.tick(10.0, 10, waiting_after=False)  # 1 per second
    assert d.expected_wait(3, 10.0) == pytest.approx(3.0)
    assert d.rate(40.0) == pytest.approx(1.0)  # idle decays both sides alike
    busy, admitted = d._at_time(40.0)
    assert admitted == pytest.approx(10 * math.exp(-3.0))


class _TimedForward:
    """A Score forward pass that takes 1 ms per token of its batch and records the lengths it was given."""

    def __init__(self):
        self.ran: list[int] = []

    async def __call__(self, items):
        self.ran.extend(i.length for i in items)
        await asyncio.sleep(1e-3 * sum(i.length for i in items))
        return [i.length for i in items]


def test_score_whose_work_would_not_be_done_by_its_deadline_is_refused_at_once():
    """Batches of 4 x 100 tokens at 1 ms per token (0.4 s each) behind a queue of 12 items: once one batch has run,
    a call that needs more than its 0.5 s to be done behind the 800 tokens still queued (at least 0.8 s) is refused
    at once, with the wait in its message; one with 30 s is admitted and scored; one whose queue limit (start_by)
    is below the expected start is refused too. Before any batch ran, nothing was measured, and a tight deadline is admitted."""
    run = _TimedForward()

    async def main():
        b = ScoreBatcher(run, BatchConfig(max_wait_ms=0, max_batch_pairs=4), 400, lambda s: None)
        flood = asyncio.ensure_future(asyncio.gather(*(b.submit([_item(100)]) for _ in range(12))))
        await asyncio.sleep(0)
        unmeasured = asyncio.ensure_future(b.submit([_item(7)], finish_by=time.monotonic() + 0.5))
        while not b.drain.admitted:  # until the first batch (0.4 s) is done
            await asyncio.sleep(0.01)
        assert 0 < b.drain.rate(time.monotonic()) <= 1000  # at most the fake's 1 ms per token
        t0 = time.monotonic()
        with pytest.raises(QueueFull) as late:
            await b.submit([_item(9)], finish_by=t0 + 0.5)
        with pytest.raises(QueueFull) as slow_start:
            await b.submit([_item(9)], start_by=t0 + 0.3, finish_by=t0 + 5)
        refused_in = time.monotonic() - t0
        ok = await asyncio.wait_for(b.submit([_item(11)], finish_by=time.monotonic() + 30), 30)
        await flood
        unmeasured_out = await asyncio.gather(unmeasured, return_exceptions=True)
        return late.value, slow_start.value, refused_in, ok, unmeasured_out, b.backlog_tokens

    late, slow_start, refused_in, ok, unmeasured_out, backlog = asyncio.run(main())
    assert late.reason == "expected_wait" and "to be done" in str(late) and "tokens queued ahead" in str(late)
    assert slow_start.reason == "expected_wait" and "to start" in str(slow_start)
    assert refused_in < 0.2  # at once, not after waiting
    assert ok == [11] and 9 not in run.ran  # the refused calls never reached the model
    assert unmeasured_out == [[7]]
    assert backlog == 0  # every item left the backlog (scored, refused or expired)


def test_score_work_still_queued_at_its_start_limit_is_refused_and_never_run():
    """Nothing measured yet (so admitted), behind a 0.3 s batch: a call with start_by 0.1 s away is refused with
    "waited_too_long" when its batch would form, and the model never sees its tokens; its neighbour with no limit
    is scored; a two-item call whose first item expires cancels its second."""
    run = _TimedForward()

    async def main():
        b = ScoreBatcher(run, BatchConfig(max_wait_ms=0, max_batch_pairs=1), 10_000, lambda s: None)
        first = asyncio.ensure_future(b.submit([_item(300)]))
        await asyncio.sleep(0.01)
        soon = time.monotonic() + 0.1
        gone = asyncio.ensure_future(b.submit([_item(5)], start_by=soon))
        pair = asyncio.ensure_future(b.submit([_item(6), _item(4)], start_by=soon))
        kept = asyncio.ensure_future(b.submit([_item(3)]))
        out = await asyncio.gather(first, gone, pair, kept, return_exceptions=True)
        return out, b.backlog_tokens

    (first, gone, pair, kept), backlog = asyncio.run(main())
    assert first == [300] and kept == [3]
    for e in (gone, pair):
        assert isinstance(e, QueueFull) and e.reason == "waited_too_long" and "Score batch" in str(e), e
    assert sorted(run.ran) == [3, 300] and backlog == 0


def test_score_deadlines_come_from_the_caller_and_the_queue_limit(engine_fp32, monkeypatch):
    """Engine.score hands its batcher finish_by at 90 % of the caller's timeout and start_by at the earlier of
    that and BatchConfig.max_queue_ms; without either, no limit."""
    seen = []

    class Recorder:
        queued_pairs = 0

        async def submit(self, items, start_by=None, finish_by=None):
            seen.append((start_by, finish_by))
            return [None] * len(items)

    e = engine_fp32
    monkeypatch.setattr(e, "_batcher", Recorder())

    def limits(timeout_s):
        t0 = time.monotonic()
        run(e.score([("오늘은 날씨가", " 맑다")], ScoreOptions(), timeout_s))
        start_by, finish_by = seen.pop()
        return tuple(None if x is None else round(x - t0, 1) for x in (start_by, finish_by))

    monkeypatch.setattr(e.cfg.batch, "max_queue_ms", 0)
    assert limits(None) == (None, None)
    assert limits(10.0) == (9.0, 9.0)
    monkeypatch.setattr(e.cfg.batch, "max_queue_ms", 2000)
    assert limits(10.0) == (2.0, 9.0)
    assert limits(1.0) == (0.9, 0.9)
    assert limits(None) == (2.0, None)


def test_cancelled_waiters_do_not_turn_idle_time_into_queueing(engine_small):
    """The regression seen in a full test run: a queue emptied by cancellation, then minutes idle, read as minutes
    of a stuck queue and refused every later request with a deadline."""
    import time

    s = Scheduler(engine_small.runner, engine_small.lm.eos_token_id, max_waiting=10, prefill_chunk=3)
    for _ in range(2):
        s.add(_seq(engine_small))
    s.step()  # both slots taken
    waiter = _seq(engine_small)
    s.add(waiter)
    s.cancel(waiter)
    later = time.monotonic() + 600.0  # ten idle minutes on
    assert (s.drain.expected_wait(1, later) or 0.0) < 1.0


def _seq(engine, n=4):
    return Sequence([5, 6, 7], GenerationParams(max_new_tokens=n), engine.lm.tokenizer)


def test_a_request_whose_expected_wait_passes_its_deadline_is_refused_at_once(engine_small):
    import time

    s = Scheduler(engine_small.runner, engine_small.lm.eos_token_id, max_waiting=10, prefill_chunk=3)
    for _ in range(2):  # take both slots at the next step
        s.add(_seq(engine_small))
    s.drain.busy_s, s.drain.admitted = 10.0, 5.0  # measured: 2 s per place in line
    late = _seq(engine_small)
    late.queue_deadline = time.monotonic() + 1.0  # first in line: expected 2 s
    with pytest.raises(QueueFull, match=r"expected wait for a batch row 2\.0 s \(1 in line") as err:
        s.add(late)
    assert err.value.reason == "expected_wait" and late not in s.waiting
    ok = _seq(engine_small)
    ok.queue_deadline = time.monotonic() + 3.0
    s.add(ok)
    nolimit = _seq(engine_small)
    s.add(nolimit)  # no deadline: waits as long as it takes
    assert list(s.waiting)[-2:] == [ok, nolimit]


def test_a_waiter_past_its_deadline_leaves_with_queue_full(engine_small):
    import time

    s = Scheduler(engine_small.runner, engine_small.lm.eos_token_id, max_waiting=10, prefill_chunk=3)
    running = [_seq(engine_small, 50) for _ in range(2)]
    for q in running:
        s.add(q)
    waiter = _seq(engine_small)
    waiter.queue_deadline = time.monotonic() + 0.05
    s.add(waiter)
    s.step()  # the two take the slots; the waiter is within its deadline
    assert list(s.waiting) == [waiter]
    time.sleep(0.1)
    out = s.step()
    refused = [(q, e) for q, e in out if q is waiter]
    assert len(refused) == 1 and isinstance(refused[0][1], QueueFull)
    assert refused[0][1].reason == "waited_too_long" and "for a batch row" in str(refused[0][1])
    assert not s.waiting and all(q.slot >= 0 for q in running)


def test_generate_is_refused_by_its_deadline_not_left_waiting(engine_small):
    """Both slots busy with long generations: a request with a 0.3 s deadline is refused with QueueFull after
    0.3 s, not served minutes later; once the drain rate is known, the next one is refused at once."""
    import time

    long = GenerationParams(max_new_tokens=400, ignore_eos=True)

    async def drain(params, timeout=None):
        n = 0
        async for chunk, _ in engine_small.generate([5, 6, 7], params, timeout):
            n = chunk.generated_tokens
        return n

    async def main():
        busy = [asyncio.ensure_future(drain(long)) for _ in range(2)]
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        with pytest.raises(QueueFull) as first:
            await drain(GenerationParams(max_new_tokens=4), timeout=0.33)  # 90 %: 0.3 s in the queue
        waited = time.monotonic() - t0
        engine_small.scheduler.drain.busy_s, engine_small.scheduler.drain.admitted = 60.0, 1.0
        t1 = time.monotonic()
        with pytest.raises(QueueFull) as second:
            await drain(GenerationParams(max_new_tokens=4), timeout=5.0)
        at_once = time.monotonic() - t1
        for b in busy:
            b.cancel()
        await asyncio.gather(*busy, return_exceptions=True)
        return first.value, waited, second.value, at_once

    from service.engine.drain import DrainRate

    engine_small.scheduler.drain = DrainRate()  # the fixture is shared: no drain history from other tests
    try:
        first, waited, second, at_once = run(main())
    finally:
        engine_small.scheduler.drain = DrainRate()  # the fixture is shared
    assert first.reason == "waited_too_long" and 0.25 < waited < 3.0
    assert second.reason == "expected_wait" and at_once < 0.5


def test_score_batches_are_cut_to_the_budget_of_the_moment():
    """A round planned with a large budget is re-cut when the budget drops between batches (Generate streams
    started): no forward pass after that holds more than the new budget."""
    sizes, budget = [], {"now": 10_000}

    async def record(items):
        sizes.append(sum(i.length for i in items))
        budget["now"] = 8  # streams started while the first batch ran
        return [i.length for i in items]

    async def main():
        b = ScoreBatcher(record, BatchConfig(max_wait_ms=20, max_batch_pairs=4), lambda: budget["now"], lambda s: None)
        return await asyncio.gather(*(b.submit([_item(3)]) for _ in range(12)))

    results = asyncio.run(main())
    assert results == [[3]] * 12
    assert sizes == [12, 6, 6, 6, 6], sizes  # 3 batches of 4 planned; the last two re-cut to 2 pairs each


def test_score_budget_is_capped_while_generation_runs(engine_fp32, monkeypatch):
    monkeypatch.setattr(engine_fp32.cfg.batch, "max_batch_tokens_while_generating", 512)
    assert engine_fp32._score_budget(4096) == 4096  # nothing generating
    monkeypatch.setattr(engine_fp32.scheduler, "has_work", lambda: True)
    assert engine_fp32._score_budget(4096) == 512 and engine_fp32._score_budget(256) == 256
    monkeypatch.setattr(engine_fp32.cfg.batch, "max_batch_tokens_while_generating", 0)
    assert engine_fp32._score_budget(4096) == 4096
