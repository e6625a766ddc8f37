"""The model thread's rules, on the CPU: warm-ups touch only scratch, a failure fails only the work it was for,
health checks run on the model thread and never pile up."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from conftest import run
from service.engine.generation import GenerationParams
from service.engine.text import encode


def _tokens(chunks):
    return [t for c in chunks for t in c.token_ids]


async def _collect(engine, prompt, params):
    return [c async for c, _ in engine.generate(encode(engine.lm.tokenizer, prompt), params)]


def test_warm_up_steps_touch_only_the_scratch_window(engine_fp32):
    """What a graph capture runs first (two eager decode steps) must not write a live sequence's KV range or
    leave the step inputs advanced: the bug that made the first step after a capture two tokens ahead."""
    runner = engine_fp32.runner
    prompts = [encode(engine_fp32.lm.tokenizer, p) for p in ("오늘은 날씨가", "서울의 봄은 벚꽃과 함께")]
    bases = [0, 100]
    runner.prefill_new(bases, prompts)
    runner.decode([7, 9], [len(p) for p in prompts], bases)  # live rows: inputs now point into their ranges
    pool = runner.kv_tokens
    before_k = [k[:, :pool].clone() for k in runner.kv.k]
    before_v = [v[:, :pool].clone() for v in runner.kv.v]
    scratch = runner.kv.k[0][:, pool:].clone()
    inputs = [t.clone() for t in (runner._tok, runner._pos, runner._base, runner._no_eos)]
    runner._warm(4, runner.len_buckets[0])
    for a, k in zip(before_k, runner.kv.k):
        assert torch.equal(a, k[:, :pool])
    for a, v in zip(before_v, runner.kv.v):
        assert torch.equal(a, v[:, :pool])
    for a, t in zip(inputs, (runner._tok, runner._pos, runner._base, runner._no_eos)):
        assert torch.equal(a, t)
    assert not torch.equal(scratch, runner.kv.k[0][:, pool:])  # the warm-up steps did run, on scratch


def test_a_failed_prefill_fails_only_its_sequence(engine_fp32, monkeypatch):
    """A forward pass that raises fails the sequences it was for; streams already running finish with their
    solo tokens, and the next request is served."""
    runner = engine_fp32.runner
    bad = encode(engine_fp32.lm.tokenizer, "뷁뷁뷁")
    orig = runner.prefill

    def prefill(chunks):
        if any(ids == bad for _, ids, _ in chunks):
            raise RuntimeError("injected prefill failure")
        return orig(chunks)

    params = GenerationParams(max_new_tokens=20, min_new_tokens=20)
    solo = _tokens(run(_collect(engine_fp32, "서울의 봄은", params)))
    monkeypatch.setattr(runner, "prefill", prefill)

    async def main():
        good = asyncio.ensure_future(_collect(engine_fp32, "서울의 봄은", params))
        await asyncio.sleep(0.02)  # running when the failing newcomer arrives
        with pytest.raises(RuntimeError, match="injected"):
            await _collect(engine_fp32, "뷁뷁뷁", params)
        return await good

    assert _tokens(run(main())) == solo
    assert _tokens(run(_collect(engine_fp32, "서울의 봄은", params))) == solo


def test_a_failed_decode_step_fails_its_rows_not_the_queue(engine_small, monkeypatch):
    """engine_small has two rows: a decode step that raises fails the two running streams; the one waiting
    for a row was not part of it and is served afterwards."""
    runner = engine_small.runner
    orig, failed = runner.decode, []

    def decode(tokens, positions, bases):
        # Not-ready rows are fed token 0 (end-of-text here, never generated under min_new_tokens).
        if not failed and len(tokens) == 2 and all(tokens):
            failed.append(tokens)
            raise RuntimeError("injected decode failure")
        return orig(tokens, positions, bases)

    monkeypatch.setattr(runner, "decode", decode)
    params = GenerationParams(max_new_tokens=6, min_new_tokens=6)

    async def main():
        tasks = [asyncio.ensure_future(_collect(engine_small, p, params)) for p in ("나는", "오늘은", "서울의")]
        return await asyncio.gather(*tasks, return_exceptions=True)

    a, b, c = run(main())
    assert failed
    assert isinstance(a, RuntimeError) and isinstance(b, RuntimeError)
    assert not isinstance(c, BaseException) and len(_tokens(c)) == 6


def test_health_checks_run_on_the_model_thread_and_never_pile_up(engine_fp32, monkeypatch):
    seen = []
    orig = engine_fp32._touch_device

    def touch():
        seen.append(threading.current_thread().name)
        time.sleep(0.05)
        orig()

    monkeypatch.setattr(engine_fp32, "_touch_device", touch)

    async def many():
        await asyncio.gather(*(engine_fp32.probe() for _ in range(50)))

    run(many())
    assert len(seen) == 1 and seen[0].startswith("model")
    # A busy model thread is alive without a device check; busy with one task past stall_s, it is not.
    engine_fp32._busy_since = time.monotonic()
    run(engine_fp32.probe())
    assert len(seen) == 1
    engine_fp32._busy_since = time.monotonic() - engine_fp32.cfg.model.stall_s - 1
    with pytest.raises(RuntimeError, match="busy"):
        run(engine_fp32.probe())
    engine_fp32._busy_since = None
    run(engine_fp32.probe())
    assert len(seen) == 2


def test_close_ends_streams_and_queued_score_and_frees_the_engine(tiny_dir):
    """Shutting an engine down: a stream in flight ends with NotReady (UNAVAILABLE to the client), a Score call
    waiting in the batcher fails the same way, and nothing (a batcher task left pending on the event loop, a
    thread) keeps the engine, so its memory, alive."""
    import gc
    import weakref

    import bitsandbytes  # noqa: F401 - imported first inside an engine, it logs an exception whose traceback
    # (kept by pytest's log capture) holds the engine's __init__ frame

    from conftest import _engine
    from service.engine.engine import ScoreOptions
    from service.engine.errors import NotReady

    engine = _engine(tiny_dir, "none", {"max_slots": 2})
    run(engine.score([("가", " 나")], ScoreOptions()))  # the batcher's task now waits on the session loop
    engine.cfg.batch.max_wait_ms = 200.0  # the next Score call sits in the queue when close() comes

    async def main():
        stream = asyncio.ensure_future(_collect(engine, "오늘은", GenerationParams(max_new_tokens=500, ignore_eos=True)))
        score = asyncio.ensure_future(engine.score([("다", " 라")], ScoreOptions()))
        await asyncio.sleep(0.1)
        assert not stream.done() and not score.done()
        engine.close()
        return await asyncio.gather(stream, score, return_exceptions=True)

    stream, score = run(main())
    assert isinstance(stream, NotReady) and isinstance(score, NotReady)
    engine._model_thread.shutdown(wait=True)  # a step that was running when close() came holds the engine until it ends
    ref = weakref.ref(engine)
    del engine, stream, score  # (the exceptions' tracebacks hold the engine's frames)
    run(asyncio.sleep(0.05))  # the loop runs the cancelled batcher task to its end
    gc.collect()
    assert ref() is None, "something still holds the closed engine"
