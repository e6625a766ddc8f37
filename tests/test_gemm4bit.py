"""The 4-bit matmul kernel (engine/gemm4bit.py), run on the CPU by Triton's interpreter against bitsandbytes' own
dequantization: its weights equal dequantize_4bit's bit for bit, its products those weights' within fp32 summation."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

CHECK = textwrap.dedent("""
    import torch
    import bitsandbytes.functional as bnbf
    from service.engine import gemm4bit

    g = torch.Generator().manual_seed(0)
    # nf4 and fp4, double-quantized scales or not; rows and outputs that leave partial tiles; splits of K.
    for qt, nested, M, N, K in (("nf4", True, 5, 96, 256), ("fp4", False, 33, 64, 512), ("nf4", False, 1, 130, 128)):
        W = torch.randn(N, K, generator=g).half()
        p, st = bnbf.quantize_4bit(W, blocksize=64, quant_type=qt, compress_statistics=nested)
        packed = gemm4bit.pack(p, st)
        ref_w = bnbf.dequantize_4bit(p, st)  # [N, K] fp16
        assert torch.equal(packed.dequantize(torch.float16), ref_w), qt
        x = torch.randn(2, M, K, generator=g).half()
        bias = torch.randn(N, generator=g).half()
        want = x.float() @ ref_w.float().T + bias.float()  # [2, M, N]
        # one split (bias in the kernel) and two (partial sums); one or two scale blocks per loop step; the scale
        # applied to each weight or to each block's product; the next step's codes loaded ahead or not; codes read
        # as bytes or as words; the table looked up in memory or in registers
        for how in (gemm4bit.Launch(split=1), gemm4bit.Launch(split=2, block_n=32), gemm4bit.Launch(block_k=128),
                    gemm4bit.Launch(split=2, scale_after=True), gemm4bit.Launch(scale_after=True, block_m=32),
                    gemm4bit.Launch(prefetch=True, block_k=128), gemm4bit.Launch(prefetch=True, scale_after=True, split=2),
                    gemm4bit.Launch(words=True, block_k=128), gemm4bit.Launch(words=True, reg_table=True, split=2),
                    gemm4bit.Launch(words=True, reg_table=True, scale_after=True, prefetch=True, block_n=32)):
            got = gemm4bit.matmul(x, packed, bias, how)
            assert got.shape == (2, M, N) and got.dtype == torch.float16
            rel = ((got.float() - want).norm() / want.norm()).item()
            # fp16 output rounding and fp32 summation order: ~3e-4; a swapped nibble order gives 1.4
            assert rel < 2e-3, (qt, M, N, K, how, rel)
    assert gemm4bit.pack(p, type(st)(absmax=st.absmax, shape=st.shape, code=st.code, blocksize=128,
                                     quant_type=st.quant_type, dtype=st.dtype)) is None  # another block size
    print("ok")
""")


ROUTED = textwrap.dedent("""
    import sys
    import torch
    from service.engine import gemm4bit, loader
    from service.engine.config import ModelConfig
    from service.engine.neox import NeoxForward, _four_bit_linears, dequantized_weights

    lm = loader.load(ModelConfig(model=sys.argv[1], quantization="nf4", device="cpu"))
    dense = dequantized_weights(lm.model, lm.compute_dtype)
    packed = NeoxForward(lm.model, 64, dense)
    packed.packed, packed.packed_rows = gemm4bit.packed_weights(_four_bit_linears(lm.model)), 3
    assert len(packed.packed) == 4 * len(packed.layers)
    rows, kernel = [], gemm4bit.matmul
    gemm4bit.matmul = lambda x, *a: rows.append(x.numel() // x.shape[-1]) or kernel(x, *a)
    ids = torch.tensor([[5, 17, 99, 3, 42]])
    for n in (3, 5):  # 3 tokens: every linear layer on the kernel; 5: on the dense copies
        rows.clear()
        got = packed.hidden(ids[:, :n], [n])  # [1, n, D]
        want = NeoxForward(lm.model, 64, dense).hidden(ids[:, :n], [n])
        assert rows == ([3] * 4 * len(packed.layers) if n == 3 else []), (n, rows)
        rel = float((got - want).norm() / want.norm())
        assert (rel < 1e-2) if n == 3 else rel == 0.0, (n, rel)
    print("ok")
""")


def _interpreted(script: str, *args: str) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.getcwd())
    r = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-4000:]


def test_gemm4bit_equals_bitsandbytes_dequantized_weights():
    _interpreted(CHECK)


def test_passes_of_few_rows_run_on_the_kernel(tiny_dir):
    """NeoxForward.packed_rows (generation.four_bit_matmul_rows): a pass of at most that many rows multiplies every
    linear layer by the kernel and stays near the dense copies' result; a longer one uses the copies alone."""
    _interpreted(ROUTED, str(tiny_dir))


def test_the_kernel_compiles_for_sm90_without_a_gpu():
    """bench --gemm4bit-ptx: the K loop compiled for an H100/H200 by Triton here. Reading codes as words with the
    code table in registers takes warp shuffles instead of one memory lookup per weight, and fewer instructions
    (7.8 against 14.3 per weight at 16 rows, Triton 3.6: the figures the README quotes). In the machine code (SASS,
    nvdisasm from Triton's wheel) the memory table is two global loads per weight and the register table over two
    shared-memory or shuffle operations per weight (the lookup's shuffle, the tile's store on its way to the tensor
    cores, loads): the units that bound them, as the README says."""
    from service.bench.profiles import gemm4bit_loop
    from service.engine.gemm4bit import Launch

    memory = gemm4bit_loop(Launch(scale_after=True, prefetch=True, stages=1))
    registers = gemm4bit_loop(Launch(scale_after=True, prefetch=True, stages=1, words=True, reg_table=True))
    assert registers["loop_ops"].get("shfl.sync.idx.b32", 0) >= 32 and "shfl.sync.idx.b32" not in memory["loop_ops"]
    assert memory["loop_ops"].get("ld.global.b32", 0) >= 32 > registers["loop_ops"].get("ld.global.b32", 0)
    assert registers["instructions_per_weight"] < 0.75 * memory["instructions_per_weight"]
    assert memory["local_refs"] == registers["local_refs"] == 0  # no spills
    mem, reg = memory["sass"]["per_weight_by_unit"], registers["sass"]["per_weight_by_unit"]
    assert mem["global memory"] >= 2 > reg["global memory"]
    assert reg["shared memory and shuffles"] >= 2 > mem["shared memory and shuffles"]
    assert mem["tensor cores"] == reg["tensor cores"] > 0
