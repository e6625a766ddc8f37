"""A Triton matmul of fp16 activations by 4-bit weights read in bitsandbytes' own packed layout (nf4 or fp4).

Why: a decode step of 64 rows spends 3.4 of its 8.0 ms (H200, 2026-12-03) reading the fp16 copies of the weights
(11.3 GB), and GPUs too small for those copies fall back to bitsandbytes' layers, which dequantize every weight on
every call. This kernel reads the packed 4-bit codes (a quarter of the bytes), turns each into its value through the
layer's own 16-entry code table and block scale, and multiplies on tensor cores: the same weights, so its results
differ from the dense copies' by fp16 rounding of the weights and the order of fp32 accumulation (3.7e-4 relative
on the 5.8B layers).

Status (H200, 2026-12-04, `python -m service.bench --gemm4bit-sweep`): correct, and slower than both paths it would
replace. A decode step's matmuls took 8.3 ms at 1 row and 17.6 ms at 64 rows with codes read as bytes and the table
in memory; the `words` + `reg_table` launches (each word of codes read once, values looked up in registers by warp
shuffles, `prefetch`: the next step's codes loaded ahead) brought that to 5.8 / 7.8 ms, against 3.1 / 3.2 ms on the
dense copies and 2.8 / 9.7 ms in bitsandbytes (0.54 TB/s of packed bytes at best). Their machine code
(`python -m service.bench --gemm4bit-ptx`, SASS by nvdisasm) puts 2.4-2.8 shared-memory or shuffle operations on
each weight (the shuffle of its lookup, the dequantized tile's store on its way to the tensor cores, loads), work
for the one such unit per multiprocessor, and the loop's chain (codes, lookup, store, barrier, tensor-core load)
is not overlapped. A faster kernel needs lookups on the arithmetic units (byte permutes over a table held in
registers) and weights dequantized straight into the tensor cores' operand layout, as Marlin and FLUTE do. So the
engine uses this kernel only where generation.four_bit_matmul_rows asks (off by default).
"""
from __future__ import annotations

import dataclasses
import logging

import torch

from . import fused

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

log = logging.getLogger(__name__)

BLOCK = 64
"""bitsandbytes' quantization block (elements per scale) this kernel reads; one key block of the kernel spans one."""


@dataclasses.dataclass
class Packed4bit:
    """One 4-bit linear layer as the kernel reads it. codes [N, K/2] uint8: row n's elements 2j (high nibble) and
    2j+1 (low nibble) in byte j, bitsandbytes' layout; absmax [N, K/64] float32: each block's scale (double
    quantization undone); table [16] float32: the code values (nf4 or fp4)."""

    codes: torch.Tensor
    absmax: torch.Tensor
    table: torch.Tensor
    out_features: int
    in_features: int

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The weights [N, K] in `dtype`, computed as the kernel computes them (the reference for tests)."""
        N, K = self.out_features, self.in_features
        idx = torch.stack([(self.codes >> 4).long(), (self.codes & 15).long()], -1).view(N, K)  # [N, K]
        return (self.table[idx] * self.absmax.repeat_interleave(BLOCK, 1)).to(dtype)


def pack(weight: torch.Tensor, state) -> Packed4bit | None:
    """The kernel's form of a bitsandbytes 4-bit weight (Params4bit data and its QuantState), or None where this
    kernel cannot read it (another block size, an input width that is no whole number of blocks)."""
    import bitsandbytes.functional as bnbf

    N, K = state.shape
    if state.blocksize != BLOCK or K % (2 * BLOCK) or state.code is None:
        return None
    absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested else state.absmax
    return Packed4bit(codes=weight.reshape(N, K // 2), absmax=absmax.float().reshape(N, K // BLOCK).contiguous(),
                      table=state.code.float().to(weight.device), out_features=N, in_features=K)


if triton is not None:

    @triton.jit
    def _gemm_4bit_kernel(x_ptr, codes_ptr, absmax_ptr, table_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_om,
                          stride_os, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          K_SPLIT: tl.constexpr, SCALE_AFTER: tl.constexpr, HAS_BIAS: tl.constexpr,
                          FINAL: tl.constexpr, QBLOCK: tl.constexpr, PREFETCH: tl.constexpr, WORDS: tl.constexpr,
                          REG_TABLE: tl.constexpr):
        """Program (m, n, s): x[m-tile, K range s] @ W[n-tile, K range s]^T accumulated in fp32; FINAL (one split)
        adds the bias and stores x's dtype, else it stores fp32 partial sums out[s]. The weight tile's codes
        [BLOCK_K, BLOCK_N] come straight from the packed bytes (no shuffle of nibbles into place): each byte read by
        the lanes of its two nibbles, or (WORDS, codes_ptr then int32) each 4-byte word read once and split into its
        8 nibbles by shifts. Their values come from the code table in memory, one indexed load each, or (REG_TABLE)
        from the table held in registers, by warp shuffles (tl.gather). SCALE_AFTER: multiply the code values (fp16)
        first and each output by its block's scale afterwards, one dot per 64-input block (no per-element scale
        load; the weights then differ from dequantize_4bit's by its fp16 rounding); else each weight is table *
        scale in fp32 rounded to fp16, as dequantize_4bit computes it. PREFETCH: each step loads the next step's
        codes before it looks up its own (Triton's pipeliner stages the table lookups, whose addresses come from the
        codes, but not the codes themselves: without it every step waits for a round trip to memory; read in the
        PTX, 2026-12-04)."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_s = tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        mm, nm = rm < M, rn < N
        if WORDS:
            r8 = tl.arange(0, 8)
            shift = (8 * (r8 // 2) + 4 * (1 - r8 % 2))[None, :, None]  # [1, 8, 1]: nibble e of a little-endian word
            codes = codes_ptr + rn[None, :] * (K // 8) + tl.arange(0, BLOCK_K // 8)[:, None]  # [BK/8, BN] words
            per = 8
        else:
            shift = ((1 - rk % 2) * 4)[:, None].to(tl.uint8)  # [BK, 1]: element 2j is byte j's high nibble
            codes = codes_ptr + rn[None, :] * (K // 2) + (rk // 2)[:, None]  # [BK, BN] bytes
            per = 2
        table = tl.load(table_ptr + tl.arange(0, 16))  # [16] float32
        if SCALE_AFTER:
            table = table.to(x_ptr.dtype.element_ty)
        table = tl.broadcast_to(table[:, None], (16, BLOCK_N))  # [16, BN] for tl.gather along the codes
        start = pid_s * K_SPLIT
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        c_next = tl.load(codes + start // per, mask=nm[None, :], other=0)
        for i in range(0, K_SPLIT, BLOCK_K):  # constant bounds (Triton's interpreter needs them)
            k0 = start + i
            if PREFETCH:
                c = c_next
                # the last step reloads its own codes: in range, and unused
                c_next = tl.load(codes + (start + tl.minimum(i + BLOCK_K, K_SPLIT - BLOCK_K)) // per,
                                 mask=nm[None, :], other=0)
            else:
                c = tl.load(codes + k0 // per, mask=nm[None, :], other=0)
            if WORDS:
                idx = tl.reshape((c[:, None, :] >> shift) & 15, (BLOCK_K, BLOCK_N))  # [BK, BN]
            else:
                idx = ((c >> shift) & 15).to(tl.int32)  # [BK, BN]
            if REG_TABLE:
                t = tl.gather(table, idx, 0)  # [BK, BN] code values
            else:
                t = tl.load(table_ptr + idx)  # [BK, BN] code values
            x = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :], mask=mm[:, None], other=0.0)  # [BM, BK]
            if SCALE_AFTER:
                s = tl.load(absmax_ptr + rn * (K // QBLOCK) + k0 // QBLOCK, mask=nm, other=0.0)  # [BN]
                acc += tl.dot(x, t.to(x.dtype)) * s[None, :]
            else:
                s = tl.load(absmax_ptr + rn[None, :] * (K // QBLOCK) + ((k0 + rk) // QBLOCK)[:, None],
                            mask=nm[None, :], other=0.0)  # [BK, BN]
                acc = tl.dot(x, (t * s).to(x.dtype), acc)
        if FINAL:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + rn, mask=nm, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=mm[:, None] & nm[None, :])
        else:
            tl.store(out_ptr + pid_s * stride_os + rm[:, None] * stride_om + rn[None, :], acc,
                     mask=mm[:, None] & nm[None, :])


@dataclasses.dataclass(frozen=True)
class Launch:
    """One way to run the kernel: rows and output features per program, splits of K, inputs per loop step,
    scale applied after the dot, the next step's codes loaded ahead, codes read as words, the code table in
    registers (see the kernel), warps and software-pipeline stages."""

    block_m: int = 16
    block_n: int = 64
    split: int = 1
    block_k: int = 64
    scale_after: bool = False
    prefetch: bool = False
    words: bool = False
    reg_table: bool = False
    warps: int = 4
    stages: int = 3


def block_m(M: int) -> int:
    """Rows per program for M rows (tl.dot's tile is at least 16 high)."""
    return 16 if M <= 16 else 32 if M <= 32 else 64


_tuned: dict[tuple[int, int, int, int], Launch] = {}
"""(N, K, block_m, device index) -> the fastest launch that tune() measured."""

CANDIDATES = tuple(Launch(block_n=bn, split=sp, scale_after=True, prefetch=pf, stages=st, words=wr, reg_table=wr)
                   for bn in (32, 64) for sp in (1, 2, 4)
                   for pf, st, wr in ((False, 3, False), (True, 1, True), (True, 3, True)))
"""Launches tune() times: codes as bytes with the table in memory, and the word/register kind with and without
prefetch, which won every shape and height on the H200 sweep of 2026-12-04. Triton compiles each once per tile
height and input width, so the first start with the kernel on spends minutes here; later starts read Triton's
cache."""


def launch(M: int, N: int, K: int, device: torch.device) -> Launch:
    """A launch for x [M, K] @ W [N, K]^T: the one tune() measured fastest for this shape and tile height, else
    enough programs to cover the GPU's multiprocessors at small M."""
    bm = block_m(M)
    found = _tuned.get((N, K, bm, device.index or 0))
    if found is not None:
        return found
    block_n = 64
    programs = -(-M // bm) * -(-N // block_n)
    sms = fused.multiprocessors(device) if device.type == "cuda" else 1
    split = 1
    while programs * split < sms and K % (2 * split * BLOCK) == 0 and K // (2 * split) >= 4 * BLOCK:
        split *= 2
    return Launch(block_m=bm, block_n=block_n, split=split)


def graph_us(fn, iters: int = 20) -> float:
    """GPU microseconds per call of fn(), `iters` calls replayed from one CUDA graph (as the decode step runs
    them; timed eagerly, a call of a few microseconds would measure Python's launch overhead instead)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # compile and allocate outside the capture
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(iters):
            fn()
    g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    g.replay()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / iters * 1000


def tune(weights: list[Packed4bit], max_rows: int, dtype: torch.dtype = torch.float16,
         candidates: tuple[Launch, ...] = CANDIDATES) -> dict[tuple[int, int, int, int], Launch]:
    """Time every candidate launch on each distinct weight shape at each tile height up to max_rows (at that
    height's largest row count) and keep the fastest for launch(); returns what it chose. GPU only; a few
    seconds per shape and height (Triton compiles each candidate once per height)."""
    shapes = {(w.out_features, w.in_features): w for w in weights}
    heights = sorted({block_m(m) for m in range(1, max_rows + 1)})
    chosen = {}
    for (N, K), w in shapes.items():
        dev = w.codes.device
        for bm in heights:
            M = min(max_rows, bm)
            x = torch.randn(M, K, device=dev, dtype=dtype)
            best = None
            for how in candidates:
                how = dataclasses.replace(how, block_m=bm)
                if K % (how.split * how.block_k):
                    continue
                try:
                    us = graph_us(lambda: matmul(x, w, None, how))
                except (triton.runtime.errors.OutOfResources, triton.compiler.errors.CompilationError) as e:
                    log.info("gemm4bit launch %s skipped: %s", how, str(e).splitlines()[0][:200])  # e.g. shared memory
                    continue
                if best is None or us < best[0]:
                    best = (us, how)
            if best is not None:  # else launch() keeps its untuned choice for this shape and height
                chosen[(N, K, bm, dev.index or 0)] = best[1]
    _tuned.update(chosen)
    return chosen


def packed_weights(linears) -> dict[torch.nn.Module, Packed4bit]:
    """The kernel's form of each (module, QuantState) of `linears` that it can read (no copy of the codes)."""
    found = {m: pack(m.weight.data, st) for m, st in linears}
    return {m: p for m, p in found.items() if p is not None}


def constants(how: Launch, K: int, has_bias: bool) -> dict:
    """The kernel's compile-time arguments for this launch and input width (matmul's, and the bench's PTX reading)."""
    return {"BLOCK_M": how.block_m, "BLOCK_N": how.block_n, "BLOCK_K": how.block_k, "K_SPLIT": K // how.split,
            "SCALE_AFTER": how.scale_after, "HAS_BIAS": has_bias, "FINAL": how.split == 1, "QBLOCK": BLOCK,
            "PREFETCH": how.prefetch, "WORDS": how.words, "REG_TABLE": how.reg_table}


def matmul(x: torch.Tensor, w: Packed4bit, bias: torch.Tensor | None = None, how: Launch | None = None) -> torch.Tensor:
    """x [..., K] (fp16 or bf16) @ W^T (+ bias) -> [..., N] in x's dtype. Several splits of K write fp32 partial
    sums that are added in a fixed order afterwards (deterministic, unlike atomics); one split adds the bias and
    writes the result in the kernel."""
    K, N = w.in_features, w.out_features
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K).contiguous()  # [M, K]
    M = x2.shape[0]
    how = how or launch(M, N, K, x.device)
    if K % (how.split * how.block_k) or how.block_k % BLOCK or (how.scale_after and how.block_k != BLOCK):
        raise ValueError(f"{K} inputs do not split into {how.split} whole steps of {how.block_k} ({how})")
    grid = (triton.cdiv(M, how.block_m), triton.cdiv(N, how.block_n), how.split)
    final = how.split == 1
    out = torch.empty((M, N) if final else (how.split, M, N), dtype=x.dtype if final else torch.float32,
                      device=x.device)  # [M, N] or [S, M, N]
    codes = w.codes.view(torch.int32) if how.words else w.codes  # [N, K/8] words or [N, K/2] bytes
    _gemm_4bit_kernel[grid](x2, codes, w.absmax, w.table, bias if bias is not None else w.absmax, out, M, N, K,
                            x2.stride(0), out.stride(-2), out.stride(0), **constants(how, K, bias is not None),
                            num_warps=how.warps, num_stages=how.stages)
    if not final:
        out = out.sum(0).to(x.dtype)  # [M, N]
        if bias is not None:
            out += bias
    return out.reshape(*lead, N)

