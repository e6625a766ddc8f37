"""The decode step's Triton kernels (engine/fused.py), run on the CPU by Triton's interpreter against the
torch code they replace: kernel outputs, then whole greedy decodes of the tiny model."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

CHECK = textwrap.dedent("""
    import sys
    import torch
    from transformers import AutoModelForCausalLM
    from service.engine.neox import NeoxRunner

    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
    runner = NeoxRunner(model, max_slots=2, max_len=64, use_graphs=False)
    assert runner.fused_problem(tol=1e-5) is None, runner.fused_problem(tol=1e-5)

    def greedy(fused, prompts, steps=12):
        runner.fused = fused
        logits = runner.prefill_new(bases, prompts)  # [2, V]
        toks, pos, out, all_logits = logits.argmax(-1).tolist(), [len(p) for p in prompts], [], []
        for _ in range(steps):
            logits = runner.decode(toks, pos, bases)  # [2, V]
            all_logits.append(logits.clone())
            toks, pos = logits.argmax(-1).tolist(), [p + 1 for p in pos]
            out.append(toks)
        return out, torch.stack(all_logits)

    from service.engine import fused
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(0)
    # Keys of a row split over several programs, then combined; with 16 splits (the GPU's choice for few rows) most
    # of a short row's splits hold no key at all.
    for B, splits, block in ((1, 1, 16), (1, 3, 16), (3, 2, 16), (3, 16, 16), (2, 4, 32)):
        H, hd, L = 2, 16, 96
        q = torch.randn(B, H, 1, hd, generator=g)
        kc, vc = torch.randn(H, B * L + 7, hd, generator=g), torch.randn(H, B * L + 7, hd, generator=g)
        base, pos = torch.arange(B) * L + 7, torch.tensor([90, 3, 40][:B])
        keys = base[:, None] + torch.arange(L)[None]
        mask = (torch.arange(L)[None] <= pos[:, None])[:, None, None]
        ref = F.scaled_dot_product_attention(q, kc[:, keys].transpose(0, 1), vc[:, keys].transpose(0, 1), attn_mask=mask)
        for dot in (False, True):  # CUDA-core and tensor-core kernels
            got = fused.decode_attention(q, kc, vc, base, pos, L, splits=splits, block_t=block, dot=dot)
            assert (got - ref).abs().max().item() < 1e-5, (B, splits, block, dot)

    # The same kernels over an int8 cache, against kvcache.gather's dequantized values.
    from service.engine.kvcache import KVCache
    for B, splits, block in ((3, 1, 16), (3, 16, 16), (2, 4, 32)):
        H, hd, L = 2, 16, 96
        cache = KVCache(1, H, B * L + 7, hd, torch.float32, torch.device("cpu"), "int8")
        cache.store(0, torch.arange(B * L + 7), torch.randn(H, B * L + 7, hd, generator=g) * 3,
                    torch.randn(H, B * L + 7, hd, generator=g))
        q = torch.randn(B, H, 1, hd, generator=g)
        base, pos = torch.arange(B) * L + 7, torch.tensor([90, 3, 40][:B])
        K, V = cache.gather(0, base[:, None] + torch.arange(L)[None])  # [H, B, L, hd]
        mask = (torch.arange(L)[None] <= pos[:, None])[:, None, None]
        # The tensor-core kernel's first product is int8 on int8: the query rounded as the cache rounds a key.
        kc, vc, ks, vs = cache.kernel_args(0)
        for dot, query in ((False, q), (True, fused.int8_rounded_query(q))):
            ref = F.scaled_dot_product_attention(query, K.transpose(0, 1), V.transpose(0, 1), attn_mask=mask)
            got = fused.decode_attention(q, kc, vc, base, pos, L, splits=splits, block_t=block, kscale=ks, vscale=vs,
                                         dot=dot)
            assert (got - ref).abs().max().item() < 1e-5, ("int8", B, splits, block, dot)
        # ... which moves it as little as the cache's own rounding does (a query without its scale would not).
        exact = F.scaled_dot_product_attention(q, K.transpose(0, 1), V.transpose(0, 1), attn_mask=mask)
        assert 1e-6 < ((got - exact).norm() / exact.norm()).item() < 2e-2

    prompts = [[5, 17, 99, 3, 250], [42, 7]]
    bases = [64, 0]  # row 0's cache range after row 1's
    ref, ref_logits = greedy(False, prompts)
    got, got_logits = greedy(True, prompts)
    assert got == ref, (got, ref)
    err = (got_logits - ref_logits).abs().max().item()
    assert err < 1e-4, err

    # An int8 cache: fused and torch paths quantize alike; both stay near the float32 cache, and differ from it
    # (a cache that kept float values would not).
    full_logits = ref_logits
    runner = NeoxRunner(model, max_slots=2, max_len=64, use_graphs=False, kv_dtype="int8")
    assert runner.kv.k[0].dtype == torch.int8
    assert runner.fused_problem(tol=1e-5) is None, runner.fused_problem(tol=1e-5)
    runner.fused = False
    ref8, ref8_logits = greedy(False, prompts)
    got8, got8_logits = greedy(True, prompts)
    err8 = (got8_logits - ref8_logits).abs().max().item()
    assert got8 == ref8 and err8 < 1e-3, (got8, ref8, err8)
    rel = ((ref8_logits - full_logits).norm() / full_logits.norm()).item()
    assert 1e-6 < rel < 0.05, rel
    print("ok", err, err8, rel)
""")


def test_fused_decode_equals_torch_decode_in_triton_interpreter(tiny_dir):
    env = dict(os.environ, TRITON_INTERPRET="1")  # read when the kernels are defined: a fresh process
    r = subprocess.run([sys.executable, "-c", CHECK, str(tiny_dir)], env=env, capture_output=True, text=True,
                       timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert r.stdout.startswith("ok")
