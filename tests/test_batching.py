"""Continuous batching: requests share decode steps yet each gets exactly what it would get alone."""
from __future__ import annotations

import asyncio

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


def test_concurrent_generations_equal_solo_runs(engine_fp32):
    solo = [run(_collect(engine_fp32, p, _params(i))) for i, p in enumerate(PROMPTS)]

    async def together():
        return await asyncio.gather(*(_collect(engine_fp32, p, _params(i)) for i, p in enumerate(PROMPTS)))

    mixed = run(together())
    for a, b in zip(solo, mixed):
        assert _tokens(a) == _tokens(b)
        assert "".join(c.text for c in a) == "".join(c.text for c in b)
        for x, y in zip(a, b):
            assert x.logprobs == pytest.approx(y.logprobs, abs=1e-5)


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
        for _ in range(100):
            if engine_small.generation_load()[0] == 0:
                break
            await asyncio.sleep(0.01)
        return got

    assert len(run(main())) == 3
    assert engine_small.generation_load() == (0, 0, 2)
    assert run(_collect(engine_small, "나는", GenerationParams(max_new_tokens=4)))[-1].finish_reason


def test_queue_limit_raises_queue_full(engine_small):
    params = GenerationParams(max_new_tokens=30, ignore_eos=True)

    async def main():
        tasks = [asyncio.ensure_future(_collect(engine_small, "나는", params)) for _ in range(5)]
        await asyncio.sleep(0)  # 5 added: 2 can run, 3 may wait
        with pytest.raises(QueueFull):
            await _collect(engine_small, "나는", params)
        return await asyncio.gather(*tasks)

    results = run(main())
    assert all(r[-1].finish_reason == "length" for r in results)
