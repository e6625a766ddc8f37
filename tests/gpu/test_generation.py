"""Generation on the GPU returns what the model computes: greedy tokens are transformers' own choices across every
length and batch bucket, on the first use after start and after, alone and beside other streams; no step writes
outside its sequence's KV range; seeded sampling does not depend on what shares the batch."""
from __future__ import annotations

import asyncio

import pytest
import torch

from conftest import run
from gpu_support import (SAMPLE_TIE, TIE, first_divergence, greedy_gaps, prompt_ids, pytestmark, record,  # noqa: F401
                         reference_logits, sampled_tie, shared_engine, tokens)
from service.engine.generation import GenerationParams
from service.engine.sampling import SamplingParams

# (prompt tokens, new tokens): decoding crosses each length bucket (256, 512, 1024, 2048) of the decode graphs.
CROSSING = [(240, 40), (500, 40), (1000, 40), (2000, 40), (20, 40), (60, 24)]
GREEDY = GenerationParams(max_new_tokens=40, min_new_tokens=40)
PENALTY = GenerationParams(max_new_tokens=40, min_new_tokens=40, sampling=SamplingParams(repetition_penalty=1.3))


@pytest.fixture(scope="module")
def engine():
    return shared_engine()


def _params(base: GenerationParams, new: int) -> GenerationParams:
    return GenerationParams(max_new_tokens=new, min_new_tokens=new, sampling=base.sampling)


async def _one(engine, prompt, params):
    return tokens([c async for c, _ in engine.generate(prompt, params)])


def _solo(engine, prompt, params):
    return run(_one(engine, prompt, params))


def _together(engine, jobs):
    async def main():
        return await asyncio.gather(*(_one(engine, p, q) for p, q in jobs))

    return run(main())


def _check(engine, prompt, gen, params, what: str) -> list[float]:
    """Every token of gen is transformers' greedy choice or within TIE of it."""
    assert len(gen) == params.max_new_tokens, what
    gaps = greedy_gaps(engine.lm.model, prompt, gen, params.sampling.repetition_penalty, engine.lm.eos_token_id,
                       params.min_new_tokens)
    worst = max(range(len(gaps)), key=gaps.__getitem__)
    assert gaps[worst] <= TIE, f"{what}: token {worst} ({gen[worst]}) is {gaps[worst]:.3f} below transformers' choice"
    return gaps


def _variety(gens: list[list[int]]) -> float:
    """Share of tokens unlike the one before: a text looping on one token would hide dropped tokens, so each
    test asserts its texts move."""
    pairs = [(a, b) for g in gens for a, b in zip(g, g[1:])]
    v = sum(a != b for a, b in pairs) / len(pairs)
    assert v >= 0.25, f"greedy texts loop ({v:.2f} of tokens change): this check could not see dropped tokens"
    return v


def test_fast_paths_are_on_and_every_graph_is_captured_at_start(engine):
    """Otherwise this suite would test the slow paths: graphs, fused kernels and dequantized decode are the
    shipped defaults on this GPU, and every (batch, length) bucket exists before the first request."""
    r = engine.runner
    assert r.use_graphs and r.fused and r.dense
    want = sorted((b, t) for b in r.batch_buckets for t in r.len_buckets)
    assert r.graph_buckets() == want
    record("graphs", buckets=len(want), batch_buckets=r.batch_buckets, len_buckets=r.len_buckets)


def test_greedy_equals_transformers_on_first_use_and_after(engine):
    """The first generation after start (each decode graph's first replay), then the same requests again: each
    token is transformers' choice, and the second run repeats the first exactly (same shapes, same kernels)."""
    stats = {}
    for name, base in (("greedy", GREEDY), ("penalty", PENALTY)):
        first, gaps = [], []
        for i, (n, new) in enumerate(CROSSING):
            p, q = prompt_ids(n, seed=i), _params(base, new)
            first.append(_solo(engine, p, q))
            gaps += _check(engine, p, first[-1], q, f"{name} {n}+{new}, first use")
        for i, (n, new) in enumerate(CROSSING):
            again = _solo(engine, prompt_ids(n, seed=i), _params(base, new))
            assert again == first[i], f"{name} {n}+{new}: second run differs at {first_divergence(again, first[i])}"
        stats[name] = {"tokens": len(gaps), "disagreements": sum(g > 0 for g in gaps), "max_gap": max(gaps),
                       "variety": _variety(first)}
    record("greedy_first_use", **stats)


def test_greedy_beside_other_streams_equals_solo_and_transformers(engine):
    """All the bucket-crossing requests at once, plain greedy (the pipelined path) beside repetition-penalty ones
    (the host path), lengths ending at different steps so the batch shrinks through its buckets."""
    jobs = [(prompt_ids(n, seed=i), _params(base, new))
            for base in (GREEDY, PENALTY) for i, (n, new) in enumerate(CROSSING)]
    solo = [_solo(engine, p, q) for p, q in jobs]
    together = _together(engine, jobs)
    same, gaps = 0, []
    for (p, q), a, b in zip(jobs, solo, together):
        gaps += _check(engine, p, b, q, f"{len(p)}+{q.max_new_tokens} penalty={q.sampling.repetition_penalty} in batch")
        same += a == b  # where they differ, _check has shown the batch's token is a near-tie, not an error
    record("greedy_beside_others", sequences=len(jobs), identical_to_solo=same, max_gap=max(gaps),
           disagreements=sum(g > 0 for g in gaps), tokens=len(gaps), variety=_variety(together))


@pytest.mark.parametrize("n", [2, 3, 5, 9, 17, 33, 65, 128])
def test_every_batch_bucket_gives_transformers_tokens(engine, n):
    """n concurrent greedy streams of mixed prompt lengths (one long, crossing a length bucket), new lengths
    8-32 so that the batch passes through the smaller buckets as streams finish."""
    jobs = []
    for i in range(n):
        length = 700 if i == 0 else 20 + (37 * i) % 280
        new = 32 if i == 0 else 8 + (11 * i) % 25
        jobs.append((prompt_ids(length, seed=1000 * n + i), _params(GREEDY, new)))
    results = _together(engine, jobs)
    worst = max(max(_check(engine, p, g, q, f"stream {i} of {n}")) for i, ((p, q), g) in enumerate(zip(jobs, results)))
    record(f"batch_{n}", streams=n, max_gap=worst, variety=_variety(results))


def test_no_step_writes_outside_its_sequence_range(engine, monkeypatch):
    """Canary values in the whole KV pool; after concurrent streams of every kind (greedy, penalty, sampled,
    ending on end-of-text), every position that no sequence owned, and every position of a sequence's range
    past the tokens it held, still holds the canary."""
    runner, sched = engine.runner, engine.scheduler
    pool = runner.kv_tokens
    canary = 1234.0
    for k, v in zip(runner.kv.k, runner.kv.v):
        k[:, :pool].fill_(canary)
        v[:, :pool].fill_(canary)
    owned = torch.zeros(pool, dtype=torch.bool, device=runner.device)
    tails = []
    orig = sched._remove

    def remove(seq):
        owned[seq.kv_base : seq.kv_base + seq.kv_size] = True
        # Written: the prompt and every fed token; the pipelined path may feed the last one (never beyond).
        tails.append((seq.kv_base + seq.length, seq.kv_base + seq.kv_size))
        orig(seq)

    monkeypatch.setattr(sched, "_remove", remove)
    sampled = SamplingParams(temperature=0.8, top_p=0.95, seed=7)
    jobs = [(prompt_ids(n, seed=50 + i), q) for i, (n, _) in enumerate(CROSSING)
            for q in (GenerationParams(max_new_tokens=30), GenerationParams(max_new_tokens=30, sampling=sampled),
                      GenerationParams(max_new_tokens=30, min_new_tokens=30, sampling=SamplingParams(repetition_penalty=1.3)))]
    _together(engine, jobs)
    for _ in range(100):  # finished sequences leave at the engine's next step
        if engine.generation_load()[:2] == (0, 0):
            break
        run(asyncio.sleep(0.01))
    assert len(tails) == len(jobs)
    touched = torch.zeros(pool, dtype=torch.bool, device=runner.device)
    for k, v in zip(runner.kv.k, runner.kv.v):
        touched |= (k[:, :pool] != canary).any(-1).any(0) | (v[:, :pool] != canary).any(-1).any(0)  # [pool]
    stray = (touched & ~owned).nonzero().flatten()
    assert stray.numel() == 0, f"{stray.numel()} positions outside every range were written, first {stray[:8].tolist()}"
    for start, end in tails:
        past = touched[start:end].nonzero().flatten()
        assert past.numel() == 0, f"range written past its sequence's tokens at {(start + past[:8]).tolist()}"
    record("kv_canary", sequences=len(jobs), positions_owned=int(owned.sum()), positions_written=int(touched.sum()))


def test_seeded_sampling_does_not_depend_on_the_batch(engine):
    """One seeded request alone (twice: identical), then inside batches of 3 and 9 other requests (sampled and
    greedy, other lengths): the same tokens, or a first difference at a near-tie of the Gumbel-max choice under
    transformers' distribution."""
    params = GenerationParams(max_new_tokens=48, min_new_tokens=48,
                              sampling=SamplingParams(temperature=0.8, top_p=0.95, seed=4242))
    prompt = prompt_ids(300, seed=77)
    alone = _solo(engine, prompt, params)
    assert _solo(engine, prompt, params) == alone
    assert len(set(alone)) > 10
    ties = []
    for others in (2, 8):
        jobs = [(prompt, params)] + [
            (prompt_ids(50 + 90 * j, seed=900 + j),
             GenerationParams(max_new_tokens=20 + 7 * j, sampling=SamplingParams(temperature=1.0, seed=j) if j % 2 else SamplingParams()))
            for j in range(others)]
        got = _together(engine, jobs)[0]
        i = first_divergence(alone, got)
        if i is not None:
            tie = sampled_tie(engine.lm.model, prompt, alone[:i], alone[i], got[i], params.sampling, 4242)
            assert tie <= SAMPLE_TIE, f"batch of {others + 1}: token {i} {got[i]} instead of {alone[i]} (score gap {tie:.3f})"
            ties.append((others + 1, i, tie))
        assert len(got) == len(alone)
    record("seeded_sampling", near_ties=ties)


def test_sampled_streams_run_ahead_on_the_gpu_with_the_host_paths_tokens(engine, monkeypatch):
    """Sampled (temperature, top-k, top-p, min_new_tokens) and penalized streams are pipelined: the GPU samples each
    step's tokens right after the step and feeds them on. Against the host path (every step read back first): the
    same tokens, or a first difference at a near-tie (the batches can form at other steps); greedy rows hold
    transformers' tokens either way."""
    from service.engine.scheduler import Scheduler

    runner = engine.runner
    calls = []
    orig = runner.decode_again
    monkeypatch.setattr(runner, "decode_again", lambda n, p: calls.append(n) or orig(n, p))
    sampled = [GenerationParams(max_new_tokens=48, min_new_tokens=8, sampling=SamplingParams(
        temperature=0.8, top_p=0.95, top_k=50 if i % 2 else 0, seed=i)) for i in range(6)]
    jobs = [(prompt_ids(150 + 120 * i, seed=600 + i), q) for i, q in enumerate(sampled)]
    jobs += [(prompt_ids(300, seed=700), _params(PENALTY, 40)), (prompt_ids(90, seed=701), _params(GREEDY, 40))]
    piped = _together(engine, jobs)
    assert calls, "no sampled step ran ahead of the host"
    monkeypatch.setattr(Scheduler, "_on_device", staticmethod(lambda seq, ahead: False))
    host = _together(engine, jobs)
    same, ties = 0, []
    for (p, q), a, b in zip(jobs, piped, host):
        assert len(a) == len(b) == q.max_new_tokens and max(a) < engine.lm.tokenizer_size
        if q.sampling.greedy:
            _check(engine, p, a, q, "pipelined")
            _check(engine, p, b, q, "host path")
        i = first_divergence(a, b)
        if i is None:
            same += 1
        elif not q.sampling.greedy:
            tie = sampled_tie(engine.lm.model, p, a[:i], a[i], b[i], q.sampling, q.sampling.seed)
            assert tie <= SAMPLE_TIE, f"seed {q.sampling.seed}: token {i} {a[i]} pipelined, {b[i]} on the host ({tie:.3f})"
            ties.append(tie)
    record("sampled_pipelined", streams=len(jobs), identical_to_host_path=same, near_ties=ties,
           pipelined_steps=len(calls))


def test_logprobs_streams_run_ahead_with_the_host_paths_logprobs(engine, monkeypatch):
    """Streams that ask for logprobs (greedy with 5 alternatives, sampled with none) beside plain greedy ones are
    pipelined: their log-probabilities are computed on the GPU from each step's logits and read back behind the
    next step. Each path's log-probabilities and alternatives are transformers' own for the tokens that path chose
    (up to fp16 noise); the two paths' tokens are the same or first differ at a near-tie (the batches form at
    other steps), and greedy tokens are transformers' own within TIE."""
    from service.engine.scheduler import Scheduler

    async def details(prompt, params):
        chunks = [c async for c, _ in engine.generate(prompt, params)]
        return (tokens(chunks), [x for c in chunks for x in c.logprobs], [x for c in chunks for x in c.top_ids],
                [x for c in chunks for x in c.top_logprobs])

    def together(jobs):
        async def main():
            return await asyncio.gather(*(details(p, q) for p, q in jobs))

        return run(main())

    runner = engine.runner
    calls = []
    orig = runner.decode_again
    monkeypatch.setattr(runner, "decode_again", lambda n, p: calls.append(n) or orig(n, p))
    jobs = [(prompt_ids(400, seed=800), GenerationParams(max_new_tokens=40, min_new_tokens=40, logprobs=True,
                                                         top_logprobs=5)),
            (prompt_ids(200, seed=801), GenerationParams(max_new_tokens=40, min_new_tokens=40, logprobs=True,
                                                         sampling=SamplingParams(temperature=0.8, top_p=0.95, seed=3))),
            (prompt_ids(90, seed=802), _params(GREEDY, 40)), (prompt_ids(700, seed=803), _params(GREEDY, 40))]
    piped = together(jobs)
    assert calls, "no step with logprobs rows ran ahead of the host"
    monkeypatch.setattr(Scheduler, "_on_device", staticmethod(lambda seq, ahead: False))
    host = together(jobs)
    worst, ties = {"pipelined": 0.0, "host": 0.0}, []
    for (p, q), got_a, got_b in zip(jobs, piped, host):
        a, b = got_a[0], got_b[0]
        assert len(a) == len(b) == q.max_new_tokens
        for what, (toks, lp, top_i, top_v) in (("pipelined", got_a), ("host", got_b)):
            if q.sampling.greedy:
                _check(engine, p, toks, q, what)
            if not q.logprobs:
                assert not lp and not top_i, what
                continue
            ref = torch.log_softmax(reference_logits(engine.lm.model, p, toks), -1)  # [n, V]
            assert len(lp) == len(toks), what
            chosen = ref.gather(1, torch.tensor(toks, device=ref.device)[:, None])[:, 0]  # [n]
            gap = torch.tensor(lp, device=ref.device) - chosen
            worst[what] = max(worst[what], float(gap.abs().max()))
            if q.top_logprobs:
                assert len(top_i) == len(top_v) == len(toks) and all(len(t) == q.top_logprobs for t in top_i), what
                # The alternatives' own reference logprobs are the reference's k best (near-ties may swap order).
                ids = torch.tensor(top_i, device=ref.device)  # [n, k]
                best = torch.topk(ref, q.top_logprobs, -1).values  # [n, k]
                mine = ref.gather(1, ids).sort(-1, descending=True).values
                worst[what] = max(worst[what], float((mine - best).abs().max()),
                                  float((torch.tensor(top_v, device=ref.device) - ref.gather(1, ids)).abs().max()))
        i = first_divergence(a, b)
        if i is not None and not q.sampling.greedy:
            tie = sampled_tie(engine.lm.model, p, a[:i], a[i], b[i], q.sampling, q.sampling.seed)
            assert tie <= SAMPLE_TIE, f"token {i}: {a[i]} pipelined, {b[i]} on the host ({tie:.3f})"
            ties.append(tie)
    record("logprobs_pipelined", pipelined_steps=len(calls), max_abs_logprob_diff_vs_transformers=worst,
           sampled_near_ties=ties)
    # fp16 logits against transformers' (the greedy tests' TIE); a logprob of the wrong step or token is off by units
    assert max(worst.values()) <= TIE
