"""A Triton matmul of fp16 activations by 4-bit weights read in bitsandbytes' own packed layout (nf4 or fp4).

Why: a decode step of 64 rows spends 3.4 of its 8.0 ms (H200, 2026-12-03) reading the fp16 copies of the weights
(11.3 GB), and GPUs too small for those copies fall back to bitsandbytes' layers, which dequantize every weight on
every call. This kernel reads the packed 4-bit codes (a quarter of the bytes), turns each into its value through the
layer's own 16-entry code table and block scale, in fp32 then rounded to fp16 exactly as bitsandbytes'
dequantize_4bit does, and multiplies on tensor cores. Same weights, so the results differ from the dense copies'
only by the order of fp32 accumulation.

Status: checked against bitsandbytes' dequantization on the CPU (Triton's interpreter); not yet timed on a GPU nor
used by the engine (`python -m service.bench --profile-decode` times it beside the dense copies).
"""
from __future__ import annotations

import dataclasses

import torch

from . import fused

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

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
    def _gemm_4bit_kernel(x_ptr, codes_ptr, absmax_ptr, table_ptr, out_ptr, M, N, K, stride_xm, stride_om, stride_os,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          K_SPLIT: tl.constexpr):
        """Program (m, n, s): out[s, m-tile, n-tile] = x[m-tile, K range s] @ W[n-tile, K range s]^T in fp32, W
        dequantized block by block of BLOCK_K (= one scale per row) from its 4-bit codes."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_s = tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mm, nm = rm < M, rn < N
        half = tl.arange(0, BLOCK_K // 2)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for i in range(0, K_SPLIT, BLOCK_K):  # constant bounds (Triton's interpreter needs them)
            k0 = pid_s * K_SPLIT + i
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=mm[:, None], other=0.0)  # [BM, BK]
            b = tl.load(codes_ptr + rn[:, None] * (K // 2) + (k0 // 2 + half)[None, :], mask=nm[:, None],
                        other=0)  # [BN, BK/2] uint8
            idx = tl.reshape(tl.join((b >> 4).to(tl.int32), (b & 15).to(tl.int32)), (BLOCK_N, BLOCK_K))  # [BN, BK]
            scale = tl.load(absmax_ptr + rn * (K // BLOCK_K) + k0 // BLOCK_K, mask=nm, other=0.0)  # [BN]
            w = (tl.load(table_ptr + idx) * scale[:, None]).to(x.dtype)  # [BN, BK]
            acc += tl.dot(x, tl.trans(w))
        out = out_ptr + pid_s * stride_os + rm[:, None] * stride_om + rn[None, :]
        tl.store(out, acc, mask=mm[:, None] & nm[None, :])


def launch(M: int, N: int, K: int, device: torch.device) -> tuple[int, int, int]:
    """(rows per program, output features per program, splits of K): enough programs to cover the GPU's
    multiprocessors at small M (an untuned first choice; `--profile-decode` measures it)."""
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64
    block_n = 64
    programs = -(-M // block_m) * -(-N // block_n)
    sms = fused.multiprocessors(device) if device.type == "cuda" else 1
    split = 1
    while programs * split < sms and K % (2 * split * BLOCK) == 0 and K // (2 * split) >= 4 * BLOCK:
        split *= 2
    return block_m, block_n, split


def matmul(x: torch.Tensor, w: Packed4bit, bias: torch.Tensor | None = None, split: int | None = None,
           block_m: int | None = None, block_n: int | None = None, num_warps: int = 4) -> torch.Tensor:
    """x [..., K] (fp16 or bf16) @ W^T (+ bias) -> [..., N] in x's dtype. Splits of K write fp32 partial sums that
    are added in a fixed order afterwards (deterministic, unlike atomics)."""
    K, N = w.in_features, w.out_features
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K).contiguous()  # [M, K]
    M = x2.shape[0]
    auto = launch(M, N, K, x.device)
    block_m, block_n, split = block_m or auto[0], block_n or auto[1], split or auto[2]
    if K % (split * BLOCK):
        raise ValueError(f"{K} inputs do not split into {split} whole blocks of {BLOCK}")
    part = torch.empty((split, M, N), dtype=torch.float32, device=x.device)  # [S, M, N]
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n), split)
    _gemm_4bit_kernel[grid](x2, w.codes, w.absmax, w.table, part, M, N, K, x2.stride(0), part.stride(1),
                            part.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=BLOCK, K_SPLIT=K // split,
                            num_warps=num_warps)
    out = (part[0] if split == 1 else part.sum(0)).to(x.dtype)  # [M, N]
    if bias is not None:
        out += bias
    return out.reshape(*lead, N)

