"""What the GPU suite shares: the 5.8B-shape checkpoint, one engine at a time, and transformers' own greedy and
sampling choices to hold the engine's tokens against (service/verify.py says why a near-tie tolerance)."""
from __future__ import annotations

import gc
import json
import os
import random
from pathlib import Path

import pytest
import torch

try:  # imported here, not first inside an engine: its import-time log records (kept by pytest's log capture)
    import bitsandbytes  # noqa: F401 - would otherwise hold an engine's frames, and its GPU memory, alive
except ImportError:  # CPU-only machines without it: the suite is skipped there anyway
    pass

from service.verify import TIE, greedy_gaps, reference_logits  # noqa: F401 - the suite's reference

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytestmark = [pytest.mark.gpu, needs_gpu]

SAMPLE_TIE = 0.08
"""Largest difference of Gumbel-max scores between two tokens accepted as a near-tie when a seeded sampled sequence
differs between two runs."""

_ENGINE = None


def model_dir() -> str:
    """The checkpoint under test: $POLYGLOT_GPU_MODEL, else the benchmark's 5.8B-shape random one (built if missing)."""
    from service.bench import gpu_model

    return gpu_model(os.environ.get("POLYGLOT_GPU_MODEL") or None)


def shared_engine(**generation):
    """One Engine with the shipped defaults (nf4, float16, CUDA graphs, fused kernels, dequantized decode where
    it fits), shared by the modules that run in-process; release_engine() frees its GPU memory."""
    global _ENGINE
    if _ENGINE is None:
        from service.engine.config import EngineConfig, GenerationConfig, ModelConfig
        from service.engine.engine import Engine

        _ENGINE = Engine(EngineConfig(model=ModelConfig(model=model_dir()), generation=GenerationConfig(**generation)))
    return _ENGINE


def release_engine() -> None:
    global _ENGINE
    if _ENGINE is not None:
        _ENGINE.close()
        _ENGINE = None
        from conftest import run

        run(__import__("asyncio").sleep(0))  # the loop ends the closed engine's cancelled batcher tasks
        gc.collect()
        torch.cuda.empty_cache()


def record(name: str, **data) -> None:
    """Add measured figures to the report file named by $POLYGLOT_GPU_REPORT (if set), and print them."""
    print(name, json.dumps(data), flush=True)
    path = os.environ.get("POLYGLOT_GPU_REPORT")
    if not path:
        return
    p = Path(path)
    report = json.loads(p.read_text()) if p.exists() else {}
    report[name] = data
    p.write_text(json.dumps(report, indent=2))


def prompt_ids(n: int, seed: int, vocab: int = 30000) -> list[int]:
    """n random token ids of the tokenizer's ordinary range (no special tokens), the same for a given seed."""
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


def tokens(chunks) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def sampled_tie(model, prompt: list[int], prefix: list[int], a: int, b: int, params, seed: int) -> float:
    """At the first token where two runs of one seeded request differ (same prefix, so the same noise), how close
    tokens a and b are under transformers' distribution: |score(a) - score(b)| with score = z + Gumbel noise, the
    choice engine/sampling.py makes (z: the filtered, temperature-scaled logits; the noise: its hash of seed and
    token index)."""
    from service.engine.sampling import RowSampling, _filter, apply_repetition_penalty, uniform

    row = reference_logits(model, prompt, prefix + [a])[-1]  # [V] after prompt + prefix
    row = apply_repetition_penalty(row, torch.tensor(prompt + prefix, device=row.device), params.repetition_penalty)
    z = _filter(row, params)
    rows = RowSampling.of([params], [seed], [len(prefix)], [False], row.device)
    score = z - torch.log(-torch.log(uniform(rows.seed_lo, rows.seed_hi, rows.step, z.shape[-1])[0]))
    return float((score[a] - score[b]).abs())


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token of two token lists (None if one is a prefix of the other)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
