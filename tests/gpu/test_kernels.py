"""The decode step's fast paths on the GPU against the paths they replace, on the same weights and inputs: the fused
Triton kernels against the torch code, the dequantized fp16 weights against bitsandbytes' 4-bit kernels."""
from __future__ import annotations

import pytest
import torch

from gpu_support import TIE, prompt_ids, pytestmark, record, shared_engine  # noqa: F401
from service.verify import TIE_INT8

REL = 1e-2
"""Largest ||a - b|| / ||b|| of two paths' logits: fp16 rounding in 28 layers (measured on an H200: 1.9e-3 fused
vs torch, 2.2e-3 dequantized vs 4-bit); a wrong kernel (rotary, cache index, mask) moves the logits by their own
size."""


@pytest.fixture(scope="module")
def engine():
    return shared_engine()


REL_INT8 = 5e-2
"""Largest relative logit error of an int8 KV cache against a float16 one (generation.kv_cache_dtype); a cache read
without its scales, or written at the wrong position, moves the logits by their own size."""


def _runner(engine, fused: bool, dense: bool, kv_dtype: str = "auto", slots: int = 4):
    from service.engine.neox import NeoxRunner

    return NeoxRunner(engine.lm.model, slots, engine.window, use_graphs=True, fused_decode=fused,
                      eos_id=engine.lm.eos_token_id, kv_tokens=slots * engine.window,
                      dense=engine.runner.dense if dense else None, kv_dtype=kv_dtype)


def _compare(a, b, steps: int = 24, rows: int = 4):
    """Prefill `rows` sequences (30-1,500 tokens, so decoding uses several length buckets) into both runners, then
    decode `steps` tokens on both, fed the same tokens (a's greedy choices): per-step relative error of b's
    logits against a's, and the largest gap below a's best of b's choice."""
    a.warm_up(rows)
    b.warm_up(rows)
    prompts = [prompt_ids(n, seed=n + i) for i in range(0, rows, 4) for n in (30, 250, 500, 1500)][:rows]
    bases = [i * a.max_len for i in range(rows)]
    la, lb = a.prefill_new(bases, prompts), b.prefill_new(bases, prompts)  # [rows, V]
    rel, gap = [float((lb - la).norm() / la.norm())], 0.0
    pos = [len(p) for p in prompts]
    for _ in range(steps):
        tok = la.argmax(-1).tolist()
        gap = max(gap, float((la.max(-1).values - la.gather(-1, lb.argmax(-1, keepdim=True))[:, 0]).max()))
        la, lb = a.decode(tok, pos, bases).clone(), b.decode(tok, pos, bases).clone()
        rel.append(float((lb - la).norm() / la.norm()))
        pos = [p + 1 for p in pos]
    return rel, gap


def test_fused_kernels_equal_the_torch_path(engine):
    fused, torch_path = _runner(engine, True, False), _runner(engine, False, False)
    assert fused.fused and fused.fused_problem() is None  # compiled here and passed the start-up check
    assert not torch_path.fused
    rel, gap = _compare(torch_path, fused)
    record("fused_vs_torch", max_rel=max(rel), mean_rel=sum(rel) / len(rel), max_choice_gap=gap)
    assert max(rel) <= REL and gap <= TIE


def test_packed_prefill_attention_equals_chunk_by_chunk(engine):
    """Prefill's one variable-length flash-attention call over all chunks of a step against SDPA chunk by chunk,
    on the same runner and cache: whole prompts, and a prompt cut by the step budget whose second chunk attends
    to its cached positions (the mask aligned to its last key)."""
    from service.engine.neox import _VARLEN_KW

    r = _runner(engine, True, True)
    if "num_splits" not in _VARLEN_KW:  # this torch's varlen attention would make a chunk's output batch-dependent
        assert not r._varlen_ok and "num_splits" in r.varlen_problem()
        record("packed_prefill_vs_chunked", varlen="off: no num_splits in this torch")
        return
    assert r._varlen_ok and r.varlen_problem() is None  # torch's varlen attention runs here and passed its check
    p = [prompt_ids(n, seed=n) for n in (30, 700, 1500)]
    b = [i * r.max_len for i in range(3)]
    steps = [[(b[0], p[0], 0), (b[1], p[1], 0), (b[2], p[2][:600], 0)], [(b[2], p[2][600:], 600)]]
    logits = {}
    for packed in (True, False):
        r._varlen_ok = packed
        logits[packed] = [r.prefill(c) for c in steps]  # [3, V], [1, V]
    rel = [float((a - c).norm() / c.norm()) for a, c in zip(logits[True], logits[False])]
    record("packed_prefill_vs_chunked", max_rel=max(rel))
    assert max(rel) <= REL
    del r
    torch.cuda.empty_cache()


def test_gemm4bit_equals_the_dense_copies(engine):
    """engine/gemm4bit.py's 4-bit matmul, compiled on the GPU, on layer 0's four linear layers of the 5.8B shape
    against F.linear on the dense copies (the same weights): batch sizes of decode and prefill, with K split."""
    import torch.nn.functional as F

    from service.engine import gemm4bit

    layer = engine.lm.model.gpt_neox.layers[0]
    g = torch.Generator(device="cpu").manual_seed(0)
    worst = 0.0
    for m in (layer.attention.query_key_value, layer.attention.dense, layer.mlp.dense_h_to_4h, layer.mlp.dense_4h_to_h):
        w = gemm4bit.pack(m.weight.data, m.weight.quant_state)
        assert w is not None and torch.equal(w.dequantize(torch.float16), engine.runner.dense[m])
        for rows in (1, 8, 64, 200):
            x = torch.randn(rows, w.in_features, generator=g).to(engine.lm.device, torch.float16)
            ref = F.linear(x, engine.runner.dense[m], m.bias).float()
            bm = gemm4bit.block_m(rows)
            for how in (None, gemm4bit.Launch(block_m=bm, split=1), gemm4bit.Launch(block_m=bm, split=4, block_k=128),
                        gemm4bit.Launch(block_m=bm, split=2, block_n=128, scale_after=True),
                        gemm4bit.Launch(block_m=bm, split=2, scale_after=True, prefetch=True, stages=1),
                        gemm4bit.Launch(block_m=bm, split=2, words=True, reg_table=True),
                        gemm4bit.Launch(block_m=bm, scale_after=True, prefetch=True, words=True, reg_table=True)):
                got = gemm4bit.matmul(x, w, m.bias, how).float()
                worst = max(worst, float((got - ref).norm() / ref.norm()))
    record("gemm4bit_vs_dense", max_rel=worst)
    assert worst <= 1e-3  # fp32 sums in another order, then fp16: ~3e-4 on the CPU interpreter


def test_decode_on_the_4bit_matmul_equals_the_dense_copies(engine, monkeypatch):
    """generation.four_bit_matmul_rows: the decode step (fused kernels, CUDA graphs) with its linear layers on
    engine/gemm4bit.py's tuned launches against the same step on the dense copies, batch 4, fed the same tokens."""
    from service.engine import gemm4bit

    packed, dense = _runner(engine, True, True), _runner(engine, True, True)
    assert packed.use_packed(4) == 4 * len(packed.layers) and packed.packed_rows == 4
    rows, kernel = [], gemm4bit.matmul
    monkeypatch.setattr(gemm4bit, "matmul", lambda x, *a: rows.append(x.numel() // x.shape[-1]) or kernel(x, *a))
    rel, gap = _compare(dense, packed)
    assert rows and max(rows) <= 4  # the packed runner's decode steps (and only they) ran the kernel
    record("gemm4bit_decode_vs_dense", max_rel=max(rel), mean_rel=sum(rel) / len(rel), max_choice_gap=gap)
    assert max(rel) <= REL and gap <= TIE
    del packed, dense
    torch.cuda.empty_cache()


def test_dequantized_decode_equals_the_4bit_kernels(engine):
    """Batch 4 (dequantized weights are used above one row), fused kernels in both."""
    four_bit, dense = _runner(engine, True, False), _runner(engine, True, True)
    assert dense.dense and not four_bit.dense
    rel, gap = _compare(four_bit, dense)
    record("dequantized_vs_4bit", max_rel=max(rel), mean_rel=sum(rel) / len(rel), max_choice_gap=gap)
    assert max(rel) <= REL and gap <= TIE
    del four_bit, dense
    torch.cuda.empty_cache()


def test_int8_kv_cache_stays_near_the_float16_cache(engine):
    """generation.kv_cache_dtype int8 against the shipped float16 cache: fused kernels, CUDA graphs and dense
    weights in both, fed the same tokens."""
    from service.engine import fused

    seen = {}
    # 4 rows x 16 heads run the CUDA-core kernel (fewer programs than multiprocessors); 12 rows the tensor-core one,
    # whose first product is int8 on int8 (the query rounded too).
    for rows in (4, 12):
        half = _runner(engine, True, True, slots=rows)
        int8 = _runner(engine, True, True, kv_dtype="int8", slots=rows)
        assert int8.fused and int8.kv.int8 and int8.fused_problem() is None
        dot = fused.attention_launch(rows * half.H, engine.window, half.device, int8=True)[3]
        assert dot == (rows == 12)
        rel, gap = _compare(half, int8, rows=rows)
        seen[f"{rows}_rows"] = {"max_rel": max(rel), "mean_rel": sum(rel) / len(rel), "max_choice_gap": gap,
                                "tensor_cores": dot}
        del half, int8
        torch.cuda.empty_cache()
    record("int8_vs_float16_cache", **seen)
    for r in seen.values():
        assert r["max_rel"] <= REL_INT8 and r["max_choice_gap"] <= TIE_INT8, seen
