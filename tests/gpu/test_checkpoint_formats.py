"""A saved 4-bit checkpoint of the 5.8B shape as the published copy is saved (fp4, float32 compute stored): served at
float16 in every path, equal to the same weights quantized at load, as fast as nf4/float16; and how far fp4 and nf4
scores lie from the unquantized fp16 model's."""
from __future__ import annotations

import asyncio
import gc
import random
import time
from pathlib import Path

import pytest
import torch

from conftest import run
from gpu_support import TIE, greedy_gaps, model_dir, prompt_ids, pytestmark, record, tokens  # noqa: F401
from service.bench import random_korean
from service.engine.engine import ScoreOptions
from service.engine.generation import GenerationParams

FP4_F32 = Path("/tmp/polyglot-ko-5.8b-random-fp4-f32")


def _engine(model: str, quantization: str = "nf4"):
    from service.engine.config import EngineConfig, GenerationConfig, ModelConfig
    from service.engine.engine import Engine

    return Engine(EngineConfig(model=ModelConfig(model=model, quantization=quantization),
                               generation=GenerationConfig(max_slots=8, kv_cache_tokens=16384)))


def _release() -> None:
    """After an engine's last reference is gone: collect it and give its GPU memory back (the modules after this
    one need it)."""
    run(asyncio.sleep(0))  # the loop ends the closed engine's cancelled batcher tasks
    gc.collect()
    torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def fp4_checkpoint() -> str:
    """The random 5.8B-shape weights quantized by transformers' BitsAndBytesConfig with bitsandbytes' defaults (fp4,
    float32 compute), saved with save_pretrained: the published copy's format."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    if not (FP4_F32 / "config.json").exists():
        m = AutoModelForCausalLM.from_pretrained(model_dir(), dtype=torch.float16, device_map={"": "cuda:0"},
                                                 quantization_config=BitsAndBytesConfig(
                                                     load_in_4bit=True, bnb_4bit_quant_type="fp4",
                                                     bnb_4bit_compute_dtype=torch.float32))
        m.save_pretrained(FP4_F32)
        AutoTokenizer.from_pretrained(model_dir()).save_pretrained(FP4_F32)
        del m
        gc.collect()
        torch.cuda.empty_cache()
    return str(FP4_F32)


def _pairs():
    rng = random.Random(11)
    return [(random_korean(rng, rng.randint(300, 1200)), " " + random_korean(rng, rng.randint(5, 40))) for _ in range(48)]


def _score_rate(engine, pairs, reps: int = 3) -> tuple[list[float], float, list[int]]:
    """Log-likelihoods of pairs (all in one call, so the batches are the same in every engine: which pairs share a
    batch changes fp16 results by up to ~0.03) and the best of `reps` timed runs of one call per pair, all at once
    (as clients send them), in pair tokens (context + continuation) per second; and each continuation's tokens."""
    from service.engine.text import encode_pair

    async def once():
        import asyncio
        return await asyncio.gather(*(engine.score([p], ScoreOptions()) for p in pairs))

    res = run(once())  # warm-up
    tok, eot = engine.lm.tokenizer, engine.lm.eos_token_id
    n = sum(len(p.context_ids) + len(p.continuation_ids) for p in (encode_pair(tok, c, x, eot) for c, x in pairs))
    scores = [r.logprob for r in run(engine.score(pairs, ScoreOptions()))]
    best = 0.0
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        run(once())
        torch.cuda.synchronize()
        best = max(best, n / (time.perf_counter() - t))
    return scores, best, [r[0].num_tokens for r in res]


def test_fp4_float32_checkpoint_serves_at_float16_like_quantizing_at_load(fp4_checkpoint):
    pairs = _pairs()
    saved = _engine(fp4_checkpoint)
    lm = saved.lm
    assert (lm.quantization, str(lm.compute_dtype), lm.checkpoint_compute_dtype) == ("fp4", "torch.float16", "float32")
    layers = [m for m in lm.model.modules() if type(m).__name__ == "Linear4bit"]
    assert len(layers) == 4 * 28 and all(m.compute_dtype == torch.float16 for m in layers)
    assert saved.runner.use_graphs and saved.runner.fused and saved.runner.dense
    prompts = [prompt_ids(n, seed=n) for n in (200, 900)]
    params = GenerationParams(max_new_tokens=32, min_new_tokens=32)

    async def generate(engine):
        import asyncio
        async def one(p):
            return tokens([c async for c, _ in engine.generate(p, params)])
        return await asyncio.gather(*(one(p) for p in prompts))  # two rows: graphs, fused, dequantized decode

    gen_saved = run(generate(saved))
    for p, g in zip(prompts, gen_saved):
        assert max(greedy_gaps(lm.model, p, g, eos_id=lm.eos_token_id, min_new=32)) <= TIE
    scores_saved, rate_saved, n_tokens = _score_rate(saved, pairs)
    saved.close()
    del saved, lm, layers
    _release()

    at_load = _engine(model_dir(), "fp4")  # the same fp16 weights, quantized as fp4 while loading
    scores_load, rate_load, _ = _score_rate(at_load, pairs)
    gen_load = run(generate(at_load))
    # Each engine's tokens are its model's greedy choices, up to a near-tie (TIE): not compared token for token,
    # since whether the two prompts share a prefill step depends on their arrival, and the matmuls' fp16 rounding
    # on how many tokens a step holds, which is enough to flip a near-tie (seen: 8401 or 5486 at the 26th token).
    for p, g in zip(prompts, gen_load):
        assert max(greedy_gaps(at_load.lm.model, p, g, eos_id=at_load.lm.eos_token_id, min_new=32)) <= TIE
    at_load.close()
    del at_load
    _release()
    diff = max(abs(a - b) for a, b in zip(scores_saved, scores_load))
    assert diff <= 1e-4, f"saved fp4 checkpoint scores {diff} away from the same weights quantized at load"

    nf4 = _engine(model_dir(), "nf4")
    scores_nf4, rate_nf4, _ = _score_rate(nf4, pairs)
    nf4.close()
    del nf4
    _release()
    fp16 = _engine(model_dir(), "none")
    scores_fp16, rate_fp16, _ = _score_rate(fp16, pairs)
    fp16.close()
    del fp16
    _release()
    assert torch.cuda.memory_allocated() < 2 << 30, "an engine of this test is still alive"

    dev = {name: {"mean_abs": sum(abs(a - b) for a, b in zip(s, scores_fp16)) / len(s),
                  "max_abs": max(abs(a - b) for a, b in zip(s, scores_fp16)),
                  "mean_abs_per_token": sum(abs(a - b) / n for a, b, n in zip(s, scores_fp16, n_tokens)) / len(s)}
           for name, s in (("fp4", scores_saved), ("nf4", scores_nf4))}
    record("checkpoint_fp4_f32", saved_vs_at_load_max_diff=diff, score_tokens_per_s={
        "fp4 checkpoint (float32 stored) served at float16": rate_saved, "fp4 quantized at load": rate_load,
        "nf4 quantized at load": rate_nf4, "fp16 unquantized": rate_fp16}, deviation_from_fp16=dev,
        pairs=len(pairs), continuation_tokens=sum(n_tokens))
    assert rate_saved >= 0.9 * rate_nf4, f"fp4/float32 checkpoint {rate_saved:.0f} tokens/s vs nf4 {rate_nf4:.0f}"
