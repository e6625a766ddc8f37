"""The benchmark checks its outputs before it reports: streams hold the tokens they asked for, and transformers' choices."""
from __future__ import annotations

import gc

from .workloads import BenchConfig, Workloads

class WrongOutput(RuntimeError):
    """The service returned tokens the model does not compute: no figure of this run may be reported."""


def check_outputs(model: str, w: Workloads, service: dict, cfg: BenchConfig) -> dict:
    """The benchmark checks its own outputs before it reports: every completed stream carried exactly the tokens it
    asked for, and a sample of each level's greedy streams holds transformers' own choice at every position
    (service/verify.py; the model reloaded after the service has released the GPU). Raises WrongOutput."""
    from ..engine import loader
    from ..engine.config import ModelConfig
    from ..engine.text import encode
    from ..verify import TIE, TIE_INT8, greedy_gaps

    lm = loader.load(ModelConfig(model=model))
    prompt = encode(lm.tokenizer, w.gen_prompt)
    tie = TIE_INT8 if cfg.engine.get("generation", {}).get("kv_cache_dtype") == "int8" else TIE
    out: dict = {"tie": tie, "checked_streams": 0, "max_gap": 0.0}
    problems = []
    levels = [(f"{k} streams", g) for k, g in service["generate"].items()]
    levels += list(service.get("traffic", {}).items())
    for level, g in levels:
        if g["short_streams"]:
            problems.append(f"{level}: {g['short_streams']} streams completed with fewer tokens than asked")
        for ids_in, ids in g["samples"]:
            gaps = greedy_gaps(lm.model, ids_in or prompt, ids, eos_id=lm.eos_token_id, min_new=len(ids))
            out["checked_streams"] += 1
            out["max_gap"] = max(out["max_gap"], max(gaps))
            # A text looping on one token would hide dropped tokens: say how much the checked texts move.
            out["min_distinct_tokens"] = min(out.get("min_distinct_tokens", len(ids)), len(set(ids)))
            if max(gaps) > tie:
                i = gaps.index(max(gaps))
                problems.append(f"{level}: token {i} ({ids[i]}) is {gaps[i]:.3f} below transformers' choice")
    del lm
    gc.collect()
    out["problems"] = problems
    if problems:
        raise WrongOutput("; ".join(problems))
    return out
