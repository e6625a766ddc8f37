"""Unit tests without a model: batch planning, request validation, sampling filters, config."""
from __future__ import annotations

import asyncio

import pytest
import torch

from service.api import validation
from service.api.pb import lm_pb2
from service.engine.batching import ScoreBatcher, plan_batches
from service.engine.config import BatchConfig, EngineConfig, LimitsConfig
from service.engine.errors import InvalidRequest, QueueFull
from service.engine.kvspace import KVSpace
from service.engine.sampling import RowSampling, SamplingParams, _filter, filters, sample
from service.engine.scoring import ScoreItem

LIMITS = LimitsConfig()


def test_plan_batches_respects_token_budget_and_sorts():
    lengths = [5, 100, 7, 98, 6, 50]
    batches = plan_batches(lengths, lambda x: x, max_tokens=200, max_rows=10)
    assert sorted(x for b in batches for x in b) == sorted(lengths)
    for b in batches:
        assert len(b) == 1 or len(b) * max(b) <= 200
    assert batches[0] == [100, 98]  # longest first, similar lengths together


def test_plan_batches_row_limit_and_oversized_item():
    batches = plan_batches([1] * 5 + [1000], lambda x: x, max_tokens=100, max_rows=2)
    assert batches[0] == [1000]
    assert all(len(b) <= 2 for b in batches)


def _item(n):
    return ScoreItem(input_ids=[1] * n, target_ids=[1], truncated_tokens=0)


def test_batcher_groups_concurrent_submissions():
    seen = []

    async def fake_run(items):
        seen.append(len(items))
        return [i.length for i in items]

    async def main():
        b = ScoreBatcher(fake_run, BatchConfig(max_wait_ms=20), 10_000, lambda s: None)
        return await asyncio.gather(*(b.submit([_item(n)]) for n in range(1, 9)))

    out = asyncio.run(main())
    assert out == [[n] for n in range(1, 9)]
    assert seen == [8]


def test_batcher_queue_limit_raises_queue_full():
    async def slow(items):
        await asyncio.sleep(0.2)
        return [0] * len(items)

    async def main():
        b = ScoreBatcher(slow, BatchConfig(max_queue_pairs=3, max_wait_ms=0), 10_000, lambda s: None)
        first = asyncio.ensure_future(b.submit([_item(1)] * 3))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await b.submit([_item(1)])
        await first

    asyncio.run(main())


def test_batcher_drops_cancelled_items():
    ran = []

    async def run(items):
        ran.extend(i.length for i in items)
        await asyncio.sleep(0.05)
        return [0] * len(items)

    async def main():
        b = ScoreBatcher(run, BatchConfig(max_wait_ms=10, max_batch_pairs=1), 10_000, lambda s: None)
        keep = asyncio.ensure_future(b.submit([_item(3)]))
        gone = asyncio.ensure_future(b.submit([_item(2)]))
        await asyncio.sleep(0)
        gone.cancel()
        await keep
        await asyncio.sleep(0.1)

    asyncio.run(main())
    assert ran == [3]


def _params(**kw):
    return lm_pb2.GenerationParameters(**kw)


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(max_new_tokens=5000), "max_new_tokens"),
        (dict(temperature=-1), "temperature"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=-0.1), "top_p"),
        (dict(top_k=-3), "top_k"),
        (dict(typical_p=2), "typical_p"),
        (dict(temperature=float("nan")), "finite"),
        (dict(top_logprobs=21), "top_logprobs"),
        (dict(stop=[""]), "stop"),
        (dict(max_new_tokens=4, min_new_tokens=5), "min_new_tokens"),
    ],
)
def test_generation_params_rejected(kw, msg):
    with pytest.raises(InvalidRequest, match=msg):
        validation.generation_params(_params(**kw), LIMITS)


def test_generation_params_defaults():
    p = validation.generation_params(_params(), LIMITS)
    assert p.max_new_tokens == LIMITS.default_new_tokens
    assert p.sampling.greedy and p.sampling.top_p == 1.0 and p.sampling.seed is None
    assert validation.generation_params(_params(seed=0), LIMITS).sampling.seed == 0


def test_generate_request_needs_exactly_one_prompt():
    with pytest.raises(InvalidRequest, match="empty"):
        validation.generate_request(lm_pb2.GenerateRequest(), LIMITS)
    with pytest.raises(InvalidRequest, match="not both"):
        validation.generate_request(lm_pb2.GenerateRequest(text="a", token_ids=[1]), LIMITS)


def test_score_request_limits():
    pair = lm_pb2.ScorePair(context="a", continuation="b")
    with pytest.raises(InvalidRequest, match="no pairs"):
        validation.score_request(lm_pb2.ScoreRequest(), LIMITS)
    with pytest.raises(InvalidRequest, match="limit per call"):
        validation.score_request(lm_pb2.ScoreRequest(pairs=[pair] * 257), LIMITS)
    with pytest.raises(InvalidRequest, match="continuation is empty"):
        validation.score_request(lm_pb2.ScoreRequest(pairs=[lm_pb2.ScorePair(context="a")]), LIMITS)
    pairs, opts = validation.score_request(lm_pb2.ScoreRequest(pairs=[pair], truncate=True), LIMITS)
    assert pairs == [("a", "b")] and opts.truncate


def test_top_k_and_top_p_filters():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    kept = torch.isfinite(_filter(logits, SamplingParams(temperature=1.0, top_k=2)))
    assert kept.tolist() == [True, True, False, False]
    p = torch.softmax(logits, -1)  # [0.64, 0.24, 0.09, 0.03]
    kept = torch.isfinite(_filter(logits, SamplingParams(temperature=1.0, top_p=0.7)))
    assert kept.tolist() == [True, True, False, False]
    kept = torch.isfinite(_filter(logits, SamplingParams(temperature=1.0, top_p=float(p[0]) - 0.01)))
    assert kept.tolist() == [True, False, False, False]


def _rows(params, steps=None, no_eos=None):
    n = len(params)
    return RowSampling.of(params, [p.seed or 0 for p in params], steps or [0] * n, no_eos or [False] * n,
                          torch.device("cpu"))


def test_batched_filters_equal_the_one_row_reference():
    """Each row of the batched filters gets exactly _filter's result for its own parameters, whatever the others'."""
    g = torch.Generator().manual_seed(0)
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, typical_p=y)
              for t, k, p, y in [(1.0, 0, 1.0, 1.0), (0.7, 5, 1.0, 1.0), (1.3, 0, 0.8, 1.0), (1.0, 0, 1.0, 0.6),
                                 (0.9, 20, 0.9, 0.95), (2.0, 3, 0.5, 1.0)]]
    logits = torch.randn(len(params), 50, generator=g) * 3
    got = filters(logits, _rows(params))
    for i, p in enumerate(params):
        want = _filter(logits[i], p)
        assert torch.equal(torch.isfinite(got[i]), torch.isfinite(want)), p
        assert torch.allclose(got[i][torch.isfinite(want)], want[torch.isfinite(want)])


def test_seeded_sampling_is_reproducible_batch_independent_and_follows_distribution():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2]))[None].repeat(3000, 1)  # [3000, 3]: one request's 3000 steps
    p = SamplingParams(temperature=1.0, seed=7)
    rows = _rows([p] * 3000, steps=list(range(3000)))
    a = sample(logits, rows, None, eos_id=99)
    assert torch.equal(a, sample(logits, rows, None, eos_id=99))
    freq = torch.bincount(a, minlength=3).float() / len(a)
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.04)
    # A row's token depends on its seed, step and logits only: alone, or after other rows, the same.
    other = SamplingParams(temperature=1.5, top_k=2, seed=123)
    alone = sample(logits[:1], _rows([p], steps=[17]), None, eos_id=99)
    mixed = sample(logits[:3], _rows([other, SamplingParams(), p], steps=[4, 0, 17]), None, eos_id=99)
    assert mixed[2] == alone[0]
    assert sample(logits[:1], _rows([SamplingParams(temperature=1.0, seed=8)], steps=[17]), None, 99).shape == (1,)


def test_repetition_penalty_padding_and_end_of_text_masks():
    logits = torch.tensor([[2.0, 1.9, -1.0, 5.0, 9.0]])  # id 3: end-of-text; id 4: a padding row
    seen = torch.tensor([[True, False, False, False, False]])
    assert sample(logits, _rows([SamplingParams()]), None, eos_id=3, choosable=4).item() == 3
    assert sample(logits, _rows([SamplingParams()], no_eos=[True]), None, eos_id=3, choosable=4).item() == 0
    pen = _rows([SamplingParams(repetition_penalty=1.2)], no_eos=[True])
    assert sample(logits, pen, seen, eos_id=3, choosable=4).item() == 1  # 2.0 / 1.2 < 1.9
    hot = _rows([SamplingParams(temperature=5.0, seed=s) for s in range(200)])
    assert sample(logits.repeat(200, 1), hot, None, eos_id=3, choosable=4).max() < 4  # padding never sampled


def test_engine_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown model"):
        EngineConfig.from_dict({"model": {"modle": "x"}})
    assert EngineConfig.from_dict({"limits": {"max_score_pairs": 3}}).limits.max_score_pairs == 3


def test_batcher_survives_a_failing_stats_sink():
    """Regression: Ray's Counter.inc(0) raised inside the sink and killed the batch loop,
    leaving concurrent callers waiting forever."""

    async def run(items):
        return [i.length for i in items]

    def sink(_):
        raise ValueError("value must be >0, got 0")

    async def main():
        b = ScoreBatcher(run, BatchConfig(max_wait_ms=1), 10_000, sink)
        first = await b.submit([_item(1)])
        rest = await asyncio.wait_for(asyncio.gather(*(b.submit([_item(n)]) for n in range(2, 6))), timeout=5)
        return first, rest

    assert asyncio.run(main()) == ([1], [[2], [3], [4], [5]])


def test_kv_space_allocates_disjoint_ranges_and_reuses_freed_ones():
    """Random allocations and frees against a map of who owns each position: ranges never overlap, a request
    fails only when no free run is long enough, freed neighbours merge, accounting matches."""
    import random

    rng = random.Random(0)
    for _ in range(100):
        size = rng.randint(1, 300)
        space, held, owner = KVSpace(size), [], [False] * size
        for _ in range(200):
            if held and rng.random() < 0.5:
                start, n = held.pop(rng.randrange(len(held)))
                space.free(start, n)
                owner[start : start + n] = [False] * n
            else:
                n = rng.randint(1, 40)
                longest = max((len(r) for r in "".join("x" if o else "." for o in owner).split("x")), default=0)
                assert space.fits(n) == (longest >= n)
                start = space.alloc(n)
                if start is None:
                    assert longest < n
                else:
                    assert not any(owner[start : start + n]) and start + n <= size
                    owner[start : start + n] = [True] * n
                    held.append((start, n))
            assert space.used == sum(owner)
    space = KVSpace(10)
    a, b = space.alloc(4), space.alloc(6)
    space.free(a, 4)
    with pytest.raises(ValueError):
        space.free(a, 4)
    space.free(b, 6)
    assert space.alloc(10) == 0  # the two freed ranges merged into one


def test_kv_space_take_and_earliest_fit():
    """take reserves exactly the range asked for, or nothing; at_fit finds the first release time at which a
    range is long enough, with every release up to that time done in the space it returns."""
    space = KVSpace(10)
    assert space.take(3, 4) and space.used == 4 and space.layout() == ((0, 3), (7, 3))
    assert not space.take(2, 2) and not space.take(6, 2) and not space.take(8, 3) and space.used == 4
    assert space.alloc(3) == 0 and space.alloc(3) == 7 and space.layout() == ()
    space = KVSpace(10)
    a, b, c = space.alloc(3), space.alloc(3), space.alloc(3)  # [0, 3) [3, 6) [6, 9); [9, 10) free
    releases = [(5, a, 3), (2, b, 3), (8, c, 3)]
    assert space.at_fit(1, releases)[0] == float("-inf")
    when, then = space.at_fit(5, releases)  # b at 2 leaves [3, 6) and [9, 10); a at 5 joins [0, 6)
    assert when == 5 and then.layout() == ((0, 6), (9, 1)) and space.layout() == ((9, 1),)
    assert space.at_fit(10, releases)[0] == 8 and space.at_fit(11, releases)[0] is None
    when, then = space.at_fit(3, [(2, a, 3), (2, c, 3)])  # a alone fits it, but c leaves at the same time
    assert when == 2 and then.layout() == ((0, 3), (6, 4))


def test_backfill_admits_only_what_does_not_delay_the_head():
    """Pool 10: A [0, 4) ends at step 3, B [4, 8) at step 10, [8, 10) free. A head of 9 fits at step 10. A request
    of 2 that ends by then takes [8, 10); one that runs to step 20 would leave the head 8 positions then and is
    refused, the space as it was; without a head that fits later (a head of 6 fits in [0, 8) whatever is in
    [8, 10)) the long one is admitted."""
    from service.engine.kvspace import Backfill

    def pool():
        space = KVSpace(10)
        space.alloc(4), space.alloc(4)
        return space, [(3, 0, 4), (10, 4, 4)]

    space, releases = pool()
    behind = Backfill(space, 9, releases)
    assert behind.when == 10
    assert behind.alloc(2, until=20) is None and space.layout() == ((8, 2),)
    assert behind.alloc(2, until=10) == 8 and space.layout() == ()
    space, releases = pool()
    behind = Backfill(space, 9, releases)
    assert behind.alloc(3, until=5) is None  # no free range of 3 at all
    space, releases = pool()
    behind = Backfill(space, 6, releases)
    assert behind.alloc(2, until=20) == 8 and behind.then.layout() == ((0, 8),)
    assert behind.alloc(1, until=20) is None  # nothing left now


def test_choice_normalized_divides_by_the_choice_text_as_lm_eval_acc_norm():
    """lm-eval scores target_delimiter + choice and divides by len(choice): with " " in front, a one-character
    choice at -1.0 loses to a three-character one at -2.5 (-1.0 < -0.83), although dividing by the continuation's
    length would pick it (-0.5 > -0.625)."""
    from service.api.convert import score_response
    from service.engine.scoring import PairResult

    def result(lp):
        return PairResult(logprob=lp, is_greedy=False, num_tokens=1, truncated_tokens=0, details=None, batch_pairs=2)

    pairs = [("질문", " 가"), ("질문", " 나다라")]
    r = score_response(pairs, [result(-1.0), result(-2.5)], str)
    assert r.choice == 0 and r.choice_normalized == 1
    r = score_response([("질문", "\n가"), ("질문", "\n나다라")], [result(-1.0), result(-2.5)], str, delimiter="\n")
    assert r.choice_normalized == 1


def test_temperatures_below_the_floor_are_greedy():
    """temperature=1e-40 passed validation and made every positive logit +inf: the token was the first positive
    one, not the best. Below MIN_TEMPERATURE a request is greedy."""
    from service.engine.sampling import MIN_TEMPERATURE

    logits = torch.tensor([[0.5, 3.0, 1.0, -2.0]])
    for t in (1e-40, 1e-6, MIN_TEMPERATURE / 2):
        p = SamplingParams(temperature=t, seed=1)
        assert p.greedy and sample(logits, _rows([p]), None, eos_id=99).item() == 1
    assert not SamplingParams(temperature=MIN_TEMPERATURE).greedy
