"""Checks generated tokens against transformers' own computation on the same weights: the benchmark's self-check
and the GPU suite's reference.

fp16 paths (CUDA graphs, fused kernels, dequantized weights, matmul kernels that depend on the batch size) round
differently from transformers' forward, and random weights leave many near-ties between the two best tokens. So a
generated token is held against transformers' logits at its own position, given the engine's own earlier tokens
(teacher forcing: one forward pass per sequence): it must be transformers' choice or lie within TIE of it. A
dropped, repeated or shifted token, or a step fed the wrong position, lands a token that is typically several
logits below the best.
"""
from __future__ import annotations

import torch

TIE = 0.08
"""Largest logit gap below transformers' best token accepted as an fp16 near-tie (greedy decoding). Measured on an
H200 (2026-12-01, 5.8B-shape nf4, ~10,000 tokens of the GPU suite): at most 0.012; the CUDA-graph capture bug of
commit 477265c put a token 2.9 below."""
TIE_INT8 = 0.5
"""The same with an int8 KV cache (generation.kv_cache_dtype): its rounding, half a step of each vector's own range,
moves near-ties further than fp16 rounding does; a cache read without its scales put tokens 2.9 below (tiny model)."""


@torch.inference_mode()
def reference_logits(model, prompt: list[int], gen: list[int]) -> torch.Tensor:
    """transformers' logits [n, V] (float32) at each generated position: row i follows prompt + gen[:i]."""
    dev = model.get_output_embeddings().weight.device
    ids = torch.tensor([prompt + gen[:-1]], device=dev)  # [1, P + n - 1]
    return model(ids).logits[0, len(prompt) - 1 :].float()  # [n, V]


def greedy_gaps(model, prompt: list[int], gen: list[int], penalty: float = 1.0, eos_id: int | None = None,
                min_new: int = 0, choosable: int | None = None) -> list[float]:
    """For each generated token, how far its logit lies below transformers' best at that position (0 where they
    agree), after the request's repetition penalty (over prompt and earlier tokens) and min_new_tokens mask, among
    the first `choosable` ids (the tokenizer's: the output layer's rows past it are padding)."""
    from .engine.sampling import apply_repetition_penalty

    if not gen:
        return []
    logits = reference_logits(model, prompt, gen)[:, :choosable]  # [n, choosable]
    gaps = []
    for i, t in enumerate(gen):
        row = logits[i]
        if penalty != 1.0:
            row = apply_repetition_penalty(row, torch.tensor(prompt + gen[:i], device=row.device), penalty)
        if i < min_new and eos_id is not None:
            row = row.clone()
            row[eos_id] = float("-inf")
        gaps.append(float("inf") if t >= row.numel() else float(row.max() - row[t]))  # a padding id: never right
    return gaps
