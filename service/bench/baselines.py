"""The in-process baselines on the same model, no serving layer: a raw forward pass, lm-eval's HFLM, and transformers'
`generate` at the benchmark path's and the real-traffic rows' shapes."""
from __future__ import annotations

import time
import torch

from .workloads import BenchConfig, Workloads

def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.inference_mode()
def baseline_raw_forward(lm, w: Workloads, batch: int) -> dict:
    """Plain forward + log-softmax over the vocabulary at every position, length-sorted batches: the ceiling
    a serving layer can approach for Score."""
    from ..engine.text import encode_pair

    tok, model, dev = lm.tokenizer, lm.model, lm.device
    seqs = []
    for c, x in w.pairs:
        p = encode_pair(tok, c, x, lm.eos_token_id)
        seqs.append((p.context_ids + p.continuation_ids, len(p.continuation_ids)))
    seqs.sort(key=lambda s: -len(s[0]))

    def run(chunk):
        width = max(len(s) - 1 for s, _ in chunk)
        ids = torch.full((len(chunk), width), tok.pad_token_id or 0, dtype=torch.long)  # [B, T]
        for i, (s, _) in enumerate(chunk):
            ids[i, : len(s) - 1] = torch.tensor(s[:-1])
        logp = torch.log_softmax(model(ids.to(dev)).logits.float(), -1)  # [B, T, V]
        return float(logp[:, -1].sum())

    run(seqs[:batch])  # warm-up
    sync()
    t = time.perf_counter()
    for i in range(0, len(seqs), batch):
        run(seqs[i : i + batch])
    sync()
    dt = time.perf_counter() - t
    return {"tokens": sum(w.pair_tokens), "seconds": dt, "tokens_per_s": sum(w.pair_tokens) / dt}


def baseline_hflm(lm, w: Workloads, batch: int) -> dict:
    """lm-evaluation-harness's HFLM `_loglikelihood_tokens` on the same pairs (what evaluation teams run today)."""
    from lm_eval.models.huggingface import HFLM

    from ..engine.text import encode_pair

    hf = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=batch, max_length=lm.max_context,
              device=str(lm.device))

    def reqs(pairs):
        out = []
        for c, x in pairs:
            p = encode_pair(lm.tokenizer, c, x, lm.eos_token_id)
            out.append(((c, x), p.context_ids, p.continuation_ids))
        return out

    result = {}
    for name, pairs, tokens in (
        ("pairs", w.pairs, sum(w.pair_tokens)),
        ("mc", [(c, x) for c, xs in w.mc for x in xs], sum(w.mc_tokens)),
    ):
        r = reqs(pairs)
        hf._loglikelihood_tokens(r[:batch], disable_tqdm=True)  # warm-up
        sync()
        t = time.perf_counter()
        hf._loglikelihood_tokens(r, disable_tqdm=True)
        sync()
        dt = time.perf_counter() - t
        result[name] = {"tokens": tokens, "seconds": dt, "tokens_per_s": tokens / dt}
    return result


@torch.inference_mode()
def baseline_generate(lm, w: Workloads, cfg: BenchConfig) -> dict:
    """transformers `model.generate`, greedy, exactly gen_tokens new tokens, at batch 1 and each concurrency."""
    from ..engine.text import encode

    ids = torch.tensor([encode(lm.tokenizer, w.gen_prompt)], device=lm.device)
    out = {}
    for b in sorted({1, *cfg.gen_concurrency}):
        batch = ids.expand(b, -1)
        kw = dict(max_new_tokens=cfg.gen_tokens, min_new_tokens=cfg.gen_tokens, do_sample=False,
                  pad_token_id=lm.tokenizer.pad_token_id, attention_mask=torch.ones_like(batch))
        lm.model.generate(batch, **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
        sync()
        t = time.perf_counter()
        lm.model.generate(batch, **kw)
        sync()
        dt = time.perf_counter() - t
        out[str(b)] = {"tokens": b * cfg.gen_tokens, "seconds": dt, "tokens_per_s": b * cfg.gen_tokens / dt}
    return out


@torch.inference_mode()
def baseline_traffic(lm, requests: list, seed: int = 0) -> dict:
    """transformers `model.generate` on a real-traffic row's own requests (workloads.traffic_rows: their prompts,
    lengths and sampling): the requests of one sampling setting as one left-padded batch that runs to the longest
    output any of them asks, as a client of `generate` would send them; requests that ask for logprobs get
    `generate`'s scores too (output_scores). tokens: the ones the requests asked for."""
    pad = lm.tokenizer.pad_token_id or 0
    groups: dict = {}
    for r in requests:
        groups.setdefault((r.parameters.temperature, r.parameters.top_p), []).append(r)
    tokens, dt = 0, 0.0
    for (temperature, top_p), reqs in groups.items():
        prompts = [list(r.token_ids) for r in reqs]
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)  # [B, T], prompts right-aligned
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        new = max(r.parameters.max_new_tokens for r in reqs)
        ids, mask = ids.to(lm.device), mask.to(lm.device)
        kw = dict(pad_token_id=pad, do_sample=temperature > 0)
        if temperature > 0:
            kw.update(temperature=temperature, top_p=top_p)
        if any(r.parameters.logprobs for r in reqs):
            kw.update(output_scores=True, return_dict_in_generate=True)
        lm.model.generate(ids[:2], attention_mask=mask[:2], max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
        torch.manual_seed(seed)
        sync()
        t = time.perf_counter()
        out = lm.model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, **kw)
        sync()
        dt += time.perf_counter() - t
        if kw.get("return_dict_in_generate"):
            assert len(out.scores) == new
            out = out.sequences
        assert out.shape[1] - width == new, (out.shape, width, new)
        tokens += sum(r.parameters.max_new_tokens for r in reqs)
    return {"streams": len(requests), "tokens": tokens, "seconds": dt, "tokens_per_s": tokens / dt,
            "batches": len(groups)}
