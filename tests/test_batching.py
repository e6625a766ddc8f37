"""Continuous batching: requests share decode steps yet each gets exactly what it would get alone."""
from __future__ import annotations

import asyncio
import time

import pytest
import torch

from conftest import run
from service.engine.errors import QueueFull
from service.engine.generation import GenerationParams
from service.engine.sampling import SamplingParams
from service.engine.text import encode

PROMPTS = ["오늘은 날씨가", "서울의 봄은 벚꽃과 함께", "나는", "우리 가족은 주말마다 공원에서 산책을", "뷁"]


def _params(i: int) -> GenerationParams:
    if i % 2:
        return GenerationParams(max_new_tokens=6 + i, sampling=SamplingParams(temperature=1.3, top_p=0.9, seed=100 + i))
    return GenerationParams(max_new_tokens=6 + i, min_new_tokens=3, logprobs=True, top_logprobs=2)


async def _collect(engine, prompt, params):
    return [c async for c, _ in engine.generate(encode(engine.lm.tokenizer, prompt), params)]


def _tokens(chunks):
    return [t for c in chunks for t in c.token_ids]


async def _drained(engine) -> bool:
    """Whether no sequence runs or waits within a second (finished and cancelled ones leave at the next step)."""
    for _ in range(100):
        if engine.generation_load()[:2] == (0, 0):
            return True
        await asyncio.sleep(0.01)
    return False


def test_concurrent_generations_equal_solo_runs(engine_fp32):
    solo = [run(_collect(engine_fp32, p, _params(i))) for i, p in enumerate(PROMPTS)]

    async def together():
        return await asyncio.gather(*(_collect(engine_fp32, p, _params(i)) for i, p in enumerate(PROMPTS)))

    mixed = run(together())
    for a, b in zip(solo, mixed):
        assert _tokens(a) == _tokens(b)
        assert "".join(c.text for c in a) == "".join(c.text for c in b)
        # Flattened: how tokens are grouped into chunks depends on how fast the reader is.
        assert [x for c in a for x in c.logprobs] == pytest.approx([x for c in b for x in c.logprobs], abs=1e-5)


def test_more_requests_than_slots_and_chunked_prefill(engine_small, hf_fp32):
    """Two slots, five requests: they queue and all finish; a 3-token prefill chunk still gives
    transformers' own greedy tokens."""
    tok = engine_small.lm.tokenizer
    params = GenerationParams(max_new_tokens=8, min_new_tokens=8)

    async def main():
        return await asyncio.gather(*(_collect(engine_small, p, params) for p in PROMPTS))

    results = run(main())
    for p, chunks in zip(PROMPTS, results):
        ids = encode(tok, p)
        ref = hf_fp32.generate(torch.tensor([ids]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                               pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
        assert _tokens(chunks) == ref
    assert engine_small.generation_load() == (0, 0, 2)


def test_cancelled_stream_frees_its_slot(engine_small):
    async def main():
        gen = engine_small.generate(encode(engine_small.lm.tokenizer, "오늘은"), GenerationParams(max_new_tokens=50, ignore_eos=True))
        got = [await gen.__anext__() for _ in range(3)]
        assert engine_small.generation_load()[0] == 1
        await gen.aclose()  # what a client cancel does to the replica's generator
        assert await _drained(engine_small)
        return got

    assert len(run(main())) == 3
    assert engine_small.generation_load() == (0, 0, 2)
    assert run(_collect(engine_small, "나는", GenerationParams(max_new_tokens=4)))[-1].finish_reason


def test_queue_limit_raises_queue_full(engine_small):
    params = GenerationParams(max_new_tokens=30, ignore_eos=True)

    async def main():
        tasks = [asyncio.ensure_future(_collect(engine_small, "나는", params)) for _ in range(5)]
        # the queue full (2 running, 3 waiting) before the 6th: one yield was not always enough for the 5 to get
        # there first (a 6th that got in before them made one of them the one refused)
        deadline = time.monotonic() + 10
        while engine_small.generation_load()[1] < 3:
            assert time.monotonic() < deadline, engine_small.generation_load()
            await asyncio.sleep(0.001)
        with pytest.raises(QueueFull):
            await _collect(engine_small, "나는", params)
        return await asyncio.gather(*tasks)

    results = run(main())
    assert all(r[-1].finish_reason == "length" for r in results)


def test_pipelined_greedy_steps_equal_transformers(engine_fp32, hf_fp32, monkeypatch):
    """Plain greedy streams run ahead of the host (the next step is launched before this one's tokens are
    read back): the tokens must still be transformers' own, streams that end on end-of-text or a stop
    sequence mid-pipeline must end exactly there, and a stream arriving later must join cleanly."""
    tok = engine_fp32.lm.tokenizer
    runner = engine_fp32.runner
    calls = []
    orig = runner.decode_again
    monkeypatch.setattr(runner, "decode_again", lambda n, p: calls.append(n) or orig(n, p))
    prompts = ["오늘은 날씨가", "서울의 봄은 벚꽃과 함께", "나는", "우리 가족은 주말마다 공원에서 산책을"]
    limits = [40, 7, 25, 40]

    async def main():
        first = [asyncio.ensure_future(_collect(engine_fp32, p, GenerationParams(max_new_tokens=m)))
                 for p, m in zip(prompts[:3], limits)]
        await asyncio.sleep(0.05)  # the last one joins a batch already decoding
        last = await _collect(engine_fp32, prompts[3], GenerationParams(max_new_tokens=limits[3]))
        return await asyncio.gather(*first) + [last]

    results = run(main())
    assert calls, "no step ran ahead of the host"
    ended = set()
    for p, m, chunks in zip(prompts, limits, results):
        ids = encode(tok, p)
        ref = hf_fp32.generate(torch.tensor([ids]), max_new_tokens=m, do_sample=False,
                               pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
        assert _tokens(chunks) == ref
        assert "".join(c.text for c in chunks) == tok.decode([t for t in ref if t != tok.eos_token_id])
        ended.add(chunks[-1].finish_reason)
    assert ended == {"eos", "length"}  # both ways of ending happened while running ahead

    # A stop sequence found one token late still cuts at the same text and token count.
    solo = run(_collect(engine_fp32, prompts[0], GenerationParams(max_new_tokens=40, min_new_tokens=40)))
    text = "".join(c.text for c in solo)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = run(_collect(engine_fp32, prompts[0], GenerationParams(max_new_tokens=40, stop=(stop,))))
    assert cut[-1].finish_reason == "stop"
    assert "".join(c.text for c in cut) == text[: text.index(stop)]
    assert run(_drained(engine_fp32))


def test_logprobs_streams_stay_pipelined_and_equal_transformers(engine_fp32, hf_fp32, monkeypatch):
    """Streams that ask for logprobs (greedy with 3 alternatives, sampled with none) beside a plain greedy one:
    the batch still runs ahead of the host (the log-probabilities are computed on the device and read back behind
    the next step), and every reported log-probability is transformers' own at that position, before penalties
    and masks (a repetition penalty and min_new_tokens shape the choice, not the reported distribution)."""
    tok = engine_fp32.lm.tokenizer
    runner = engine_fp32.runner
    ahead, orig = [], runner.decode_again
    monkeypatch.setattr(runner, "decode_again", lambda n, p: ahead.append(n) or orig(n, p))
    cases = [("오늘은 날씨가", GenerationParams(max_new_tokens=24, logprobs=True, top_logprobs=3)),
             ("서울의 봄은", GenerationParams(max_new_tokens=24, min_new_tokens=24, logprobs=True,
                                           sampling=SamplingParams(temperature=1.1, top_p=0.9, seed=7,
                                                                   repetition_penalty=1.2))),
             ("나는", GenerationParams(max_new_tokens=24))]

    async def main():
        return await asyncio.gather(*(_collect(engine_fp32, p, params) for p, params in cases))

    results = run(main())
    assert ahead, "no step ran ahead of the host"
    for (prompt, params), chunks in zip(cases, results):
        gen, lps = _tokens(chunks), [x for c in chunks for x in c.logprobs]
        if not params.logprobs:
            assert not lps
            continue
        assert len(lps) == len(gen) == chunks[-1].generated_tokens
        ids = encode(tok, prompt)
        with torch.no_grad():
            logp = torch.log_softmax(hf_fp32(torch.tensor([ids + gen])).logits.float(), -1)[0]  # [T, V]
        want = [float(logp[len(ids) - 1 + k, t]) for k, t in enumerate(gen)]
        assert lps == pytest.approx(want, abs=1e-4)
        tops = [x for c in chunks for x in c.top_ids]
        if params.top_logprobs:
            best = logp[len(ids) - 1 : len(ids) - 1 + len(gen)].topk(3, -1)
            assert tops == best.indices.tolist()
            got = [v for c in chunks for row in c.top_logprobs for v in row]
            assert got == pytest.approx(best.values.flatten().tolist(), abs=1e-4)
            assert all(t[0] == g for t, g in zip(tops, gen))  # greedy picks the top token
        else:
            assert all(t == [] for t in tops)
    assert run(_drained(engine_fp32))


def test_slow_reader_gets_merged_chunks_with_the_same_tokens(engine_fp32):
    """A consumer slower than the engine receives several tokens per chunk, and exactly the same tokens, text,
    logprobs and ending as one that keeps up."""
    params = GenerationParams(max_new_tokens=30, min_new_tokens=30, logprobs=True, top_logprobs=2)
    fast = run(_collect(engine_fp32, "오늘은 날씨가", params))

    async def slow():
        out = []
        async for c, _ in engine_fp32.generate(encode(engine_fp32.lm.tokenizer, "오늘은 날씨가"), params):
            out.append(c)
            await asyncio.sleep(0.02)
        return out

    merged = run(slow())
    assert len(_tokens(fast)) == 30 and len(merged) < len(fast) / 2
    assert _tokens(merged) == _tokens(fast)
    assert "".join(c.text for c in merged) == "".join(c.text for c in fast)
    assert [x for c in merged for x in c.logprobs] == pytest.approx([x for c in fast for x in c.logprobs], abs=1e-5)
    assert [x for c in merged for x in c.top_ids] == [x for c in fast for x in c.top_ids]
    assert merged[-1].finish_reason == fast[-1].finish_reason == "length"
    assert [c.generated_tokens for c in merged] == sorted({c.generated_tokens for c in merged})
    assert merged[-1].generated_tokens == 30


def test_streams_carry_several_tokens_per_message_under_load(engine_fp32, monkeypatch):
    """With more sequences running than stream_messages_per_step, a stream's messages after the first carry
    several tokens: fewer messages, the same tokens, text and ending as one message per token."""
    params = GenerationParams(max_new_tokens=12, min_new_tokens=12)
    prompts = PROMPTS[:3]

    async def together():
        return await asyncio.gather(*(_collect(engine_fp32, p, params) for p in prompts))

    monkeypatch.setattr(engine_fp32.cfg.generation, "stream_messages_per_step", 0)
    per_token = run(together())
    monkeypatch.setattr(engine_fp32.cfg.generation, "stream_messages_per_step", 1)
    grouped = run(together())
    for a, b in zip(per_token, grouped):
        assert _tokens(a) == _tokens(b) and len(_tokens(b)) == 12
        assert "".join(c.text for c in a) == "".join(c.text for c in b)
        assert b[-1].finish_reason == a[-1].finish_reason == "length"
    # Three running, one message per step: about 1 + 11/3 messages per stream; per token it would be 12.
    assert sum(len(b) for b in grouped) <= 3 * (1 + 6)


def test_kv_cache_space_is_shared_by_what_requests_can_use(tiny_dir):
    """A cache of one window's positions: four short requests run at once (full-window slots would hold one),
    two requests that each need more than half of it run one after the other; all equal their solo runs."""
    from conftest import _engine

    engine = _engine(tiny_dir, "none", {"max_slots": 4, "kv_cache_tokens": 2048})
    assert engine.window == 2048 and engine.kv_cache_use() == (0, 2048)
    short = GenerationParams(max_new_tokens=8, min_new_tokens=8)
    long_prompt = [5 + i % 200 for i in range(1000)]
    long = GenerationParams(max_new_tokens=100, min_new_tokens=100)

    async def ids(prompt_ids, params):
        return _tokens([c async for c, _ in engine.generate(prompt_ids, params)])

    async def watched(jobs):
        peak = [0, 0]
        task = asyncio.gather(*jobs)
        while not task.done():
            (running, _, _), (used, size) = engine.generation_load(), engine.kv_cache_use()
            assert used <= size
            peak = [max(peak[0], running), max(peak[1], used)]
            await asyncio.sleep(0.001)
        return await task, peak

    prompts = [encode(engine.lm.tokenizer, p) for p in PROMPTS[:4]]
    solo = [run(ids(p, short)) for p in prompts]
    together, peak = run(watched([ids(p, short) for p in prompts]))
    assert together == solo and peak[0] == 4
    solo_long = run(ids(long_prompt, long))
    together, peak = run(watched([ids(long_prompt, long), ids(long_prompt, long)]))
    assert together == [solo_long, solo_long]
    assert peak == [1, 1100]
    assert run(_drained(engine)) and engine.kv_cache_use() == (0, 2048)
    engine.close()


def test_a_short_request_runs_in_the_gap_behind_a_blocked_long_one(tiny_dir):
    """A cache of 2,048 positions: A (1,100 positions, 100 new tokens) runs; B (1,200) cannot start until A ends;
    C (a few positions, 8 new tokens) arrives behind B. With backfilling C runs beside A and finishes before A
    does, with its solo tokens; D (300 new tokens, outlasting A) would sit where B needs to start when A ends, so
    it waits; B starts when A ends either way. With backfill_lookahead 0 C waits for B."""
    from conftest import _engine

    engine = _engine(tiny_dir, "none", {"max_slots": 4, "kv_cache_tokens": 2048, "backfill_lookahead": 4})
    tok = engine.lm.tokenizer
    a = ([5 + i % 200 for i in range(1000)], GenerationParams(max_new_tokens=100, min_new_tokens=100))
    b = ([7 + i % 150 for i in range(1100)], GenerationParams(max_new_tokens=100, min_new_tokens=100))
    c = (encode(tok, PROMPTS[0]), GenerationParams(max_new_tokens=8, min_new_tokens=8))
    d = (encode(tok, PROMPTS[1]), GenerationParams(max_new_tokens=300, min_new_tokens=300))

    async def arrivals():
        events, tokens = [], {}

        async def one(name, job):
            got = []
            async for chunk, _ in engine.generate(*job):
                if not got:
                    events.append((name, "first"))
                got.append(chunk)
            events.append((name, "last"))
            tokens[name] = _tokens(got)

        first = asyncio.ensure_future(one("A", a))
        while not events:  # A runs before the others arrive, which then queue in order B, C, D
            await asyncio.sleep(0.001)
        await asyncio.gather(first, *(one(name, job) for name, job in (("B", b), ("C", c), ("D", d))))
        return events.index, tokens

    solo_c = _tokens(run(_collect_ids(engine, *c)))
    at, tokens = run(arrivals())
    assert at(("C", "last")) < at(("A", "last")) and tokens["C"] == solo_c
    assert at(("A", "last")) < at(("D", "first")) and at(("A", "last")) < at(("B", "first"))
    assert [len(tokens[n]) for n in "ABCD"] == [100, 100, 8, 300]
    engine.scheduler.backfill_lookahead = 0
    at, tokens = run(arrivals())
    assert at(("A", "last")) < at(("C", "first")) and tokens["C"] == solo_c
    assert run(_drained(engine)) and engine.kv_cache_use() == (0, 2048)
    engine.close()


async def _collect_ids(engine, prompt_ids, params):
    return [c async for c, _ in engine.generate(prompt_ids, params)]


def test_dequantized_decode_gives_the_4bit_kernels_tokens(tiny_dir, engine_nf4):
    """dequantized_decode "on": decode steps of several rows and Score passes multiply by copies of the 4-bit
    weights that bitsandbytes dequantized once; concurrent greedy streams give the tokens (and nearly the
    logprobs) of the 4-bit kernels, Score pairs and multiple choice their scores, and the copies are really
    what those passes used."""
    from conftest import _engine
    from service.engine.engine import ScoreOptions

    class Counting(dict):
        used = 0

        def get(self, key, default=None):
            Counting.used += 1
            return super().get(key, default)

    engine = _engine(tiny_dir, "nf4", {"dequantized_decode": "on"})
    assert engine.runner.dense and not engine_nf4.runner.dense
    engine.runner.dense = engine.scorer.neox.dense = Counting(engine.runner.dense)
    pairs = [("서울의 봄은", " 벚꽃과 함께"), ("나는", " 학교에 간다")]
    choices = [("질문: 오늘 날씨는? 답:", " 맑음"), ("질문: 오늘 날씨는? 답:", " 흐림"), ("질문: 오늘 날씨는? 답:", " 비")]
    for batch in (pairs, choices):
        want = run(engine_nf4.score(batch, ScoreOptions()))
        Counting.used = 0
        got = run(engine.score(batch, ScoreOptions()))
        assert Counting.used > 0
        # bitsandbytes' CPU kernel computes in bf16 (below): seen 0.033 off -41.8 (a 4-token continuation) and
        # 0.013 off -9.78 (one token after a longer context); a wrong weight is off by whole units.
        assert [r.logprob for r in got] == pytest.approx([r.logprob for r in want], rel=3e-3, abs=2e-2)
    Counting.used = 0
    params = GenerationParams(max_new_tokens=10, min_new_tokens=10, logprobs=True)

    async def together(e):
        return await asyncio.gather(*(_collect(e, p, params) for p in PROMPTS[:3]))

    want, got = run(together(engine_nf4)), run(together(engine))
    assert Counting.used > 0
    for a, b in zip(want, got):
        assert _tokens(a) == _tokens(b)
        # bitsandbytes' 4-bit kernel on the CPU computes in bf16 (its AVX512-BF16 layout): 9e-3 off fp32 on one
        # layer's outputs of ~2.4 here; the dequantized copies multiply in fp32.
        assert [x for c in b for x in c.logprobs] == pytest.approx([x for c in a for x in c.logprobs], abs=1e-2)
    engine.close()


def test_sampled_and_penalized_streams_run_ahead_with_the_host_paths_tokens(engine_fp32, monkeypatch):
    """Sampled (temperature, top-k, top-p, min_new_tokens) and repetition-penalty streams beside a greedy one are
    pipelined too: the GPU samples each step's tokens and feeds them on. Their tokens equal those of the host
    path (every step read back before the next), since a token's noise depends on its seed and index only."""
    from service.engine.scheduler import Scheduler

    runner = engine_fp32.runner
    calls = []
    orig = runner.decode_again
    monkeypatch.setattr(runner, "decode_again", lambda n, p: calls.append(n) or orig(n, p))
    jobs = [(p, GenerationParams(max_new_tokens=16, min_new_tokens=6,
                                 sampling=SamplingParams(temperature=1.3, top_k=40, top_p=0.9, seed=i)))
            for i, p in enumerate(PROMPTS[:3])]
    jobs += [(PROMPTS[3], GenerationParams(max_new_tokens=16, sampling=SamplingParams(repetition_penalty=1.5))),
             (PROMPTS[4], GenerationParams(max_new_tokens=12))]

    async def together():
        return await asyncio.gather(*(_collect(engine_fp32, p, q) for p, q in jobs))

    piped = [_tokens(c) for c in run(together())]
    assert calls, "no step ran ahead of the host"
    monkeypatch.setattr(Scheduler, "_on_device", staticmethod(lambda seq, ahead: False))
    calls.clear()
    host = [_tokens(c) for c in run(together())]
    assert not calls
    assert piped == host
    assert all(len(t) >= 6 for t in piped[:3]) and len(set(piped[3])) == len(piped[3])  # the masks and penalty held
