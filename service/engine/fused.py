"""Triton kernels that fuse the decode step's small operations: rotary embedding with the KV-cache write,
GPT-NeoX's two layer norms of the same input, and attention of one new token over its cache.

Why: at batch 1 a decode step's matmuls are ~110 kernels, but the glue between them (rotating q and k in
pieces, copying strided views, scattering k and v into the cache, two layer norms per layer) was ~25
more kernels per layer, each a few microseconds: about 1.3 ms of a 5.3 ms step on an H100. Inside a
CUDA graph these run back to back, so the only way to make them cheaper is to make fewer of them.
Attention for one query per sequence is a dot product and a weighted sum over the sequence's cached
keys, up to its own position only: one small kernel, where the library kernels (flash, memory-efficient,
cuDNN) are built for long queries and took 17 us per layer here (cuDNN).
Past a batch of one, that attention runs both of its products on tensor cores (the query as one row of a
16-row tile): the multiply-and-reduce on CUDA cores, not the cache's bytes, had bounded it (64 rows: 158 us per
layer against 187).
The torch code they replace stays the reference (NeoxForward._rope, nn.LayerNorm, scaled_dot_product_attention)
and the CPU path.
"""
from __future__ import annotations

import os

import torch

from . import kvcache

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the decode step keeps its torch code
    triton = None


if triton is not None:

    @triton.jit
    def _rope_store_kernel(
        qkv_ptr, cos_ptr, sin_ptr, start_ptr, pos_ptr, k_ptr, v_ptr, q_ptr, ks_ptr, vs_ptr,
        stride_qkv, stride_cs, stride_kh, stride_kt, stride_sh,
        H: tl.constexpr, HD: tl.constexpr, ROT: tl.constexpr, BLOCK: tl.constexpr, QUANT: tl.constexpr,
    ):
        """Program (b, h): rotate q and k of row b, head h at position pos[b]; q to q_ptr [B, H, HD],
        k and v to the cache at [h, start[b] + pos[b]]. QUANT: the cache is int8, each vector stored as
        round(x / scale) with scale = max|x| / 127 at ks_ptr/vs_ptr [h, start[b] + pos[b]] (engine/kvcache.py)."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        HALF: tl.constexpr = ROT // 2
        i = tl.arange(0, BLOCK)
        m = i < HD
        pos = tl.load(pos_ptr + b)
        # Rotate-half partner of dim i within the first ROT dims: (r1, r2) -> (r1 c - r2 s, r2 c + r1 s).
        partner = tl.where(i < HALF, i + HALF, tl.where(i < ROT, i - HALF, i))
        sign = tl.where(i < HALF, -1.0, 1.0)
        rm = i < ROT
        c = tl.load(cos_ptr + pos * stride_cs + i, mask=rm, other=1.0).to(tl.float32)
        s = tl.load(sin_ptr + pos * stride_cs + i, mask=rm, other=0.0).to(tl.float32)
        s = tl.where(rm, s * sign, 0.0)
        head = qkv_ptr + b * stride_qkv + h * 3 * HD  # this head's [q | k | v]
        q = tl.load(head + i, mask=m, other=0.0).to(tl.float32)
        qp = tl.load(head + partner, mask=m, other=0.0).to(tl.float32)
        k = tl.load(head + HD + i, mask=m, other=0.0).to(tl.float32)
        kp = tl.load(head + HD + partner, mask=m, other=0.0).to(tl.float32)
        v = tl.load(head + 2 * HD + i, mask=m, other=0.0)
        at = tl.load(start_ptr + b) + pos
        cache = h * stride_kh + at * stride_kt
        tl.store(q_ptr + (b * H + h) * HD + i, (q * c + qp * s).to(q_ptr.dtype.element_ty), mask=m)
        kr = k * c + kp * s
        if QUANT:
            vf = v.to(tl.float32)
            # Masked lanes hold 0: they never raise the maximum. Rounding as kvcache.quantize: floor(x + 0.5).
            k_sc = tl.maximum(tl.max(tl.abs(kr), axis=0), 1e-8) / 127.0
            v_sc = tl.maximum(tl.max(tl.abs(vf), axis=0), 1e-8) / 127.0
            kq = tl.minimum(tl.maximum(tl.floor(kr / k_sc + 0.5), -127.0), 127.0)
            vq = tl.minimum(tl.maximum(tl.floor(vf / v_sc + 0.5), -127.0), 127.0)
            tl.store(k_ptr + cache + i, kq.to(tl.int8), mask=m)
            tl.store(v_ptr + cache + i, vq.to(tl.int8), mask=m)
            tl.store(ks_ptr + h * stride_sh + at, k_sc)
            tl.store(vs_ptr + h * stride_sh + at, v_sc)
        else:
            tl.store(k_ptr + cache + i, kr.to(k_ptr.dtype.element_ty), mask=m)
            tl.store(v_ptr + cache + i, v, mask=m)

    @triton.jit
    def _dual_layernorm_kernel(x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, o1_ptr, o2_ptr, eps,
                               D: tl.constexpr, BLOCK: tl.constexpr):
        """Program r: one row's mean and variance, two affine outputs (fp32 statistics, as torch's layer_norm)."""
        r = tl.program_id(0)
        i = tl.arange(0, BLOCK)
        m = i < D
        x = tl.load(x_ptr + r * D + i, mask=m, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / D
        d = tl.where(m, x - mean, 0.0)
        y = d * tl.rsqrt(tl.sum(d * d, axis=0) / D + eps)
        w1 = tl.load(w1_ptr + i, mask=m, other=0.0).to(tl.float32)
        b1 = tl.load(b1_ptr + i, mask=m, other=0.0).to(tl.float32)
        w2 = tl.load(w2_ptr + i, mask=m, other=0.0).to(tl.float32)
        b2 = tl.load(b2_ptr + i, mask=m, other=0.0).to(tl.float32)
        tl.store(o1_ptr + r * D + i, (y * w1 + b1).to(o1_ptr.dtype.element_ty), mask=m)
        tl.store(o2_ptr + r * D + i, (y * w2 + b2).to(o2_ptr.dtype.element_ty), mask=m)


if triton is not None:

    @triton.jit
    def _int8_to_float16(x):
        """int8 -> float16 without the conversion unit: four bytes per 32-bit register each become the low byte of
        1024's float16 (0x64xx = 1024 + byte, the byte offset by 128 to make it unsigned) by two byte permutes, then
        1152 is subtracted from two halves at a time. A plain conversion is a quarter-rate instruction per value, and
        Triton moved it past the shared-memory load, which then read the tile a byte at a time. Not pure, so that
        Triton keeps it where it is written (on the tile as loaded, before it is laid out for the tensor cores)."""
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 t, c;
            xor.b32 t, $2, 0x80808080;
            mov.b32 c, 0x64806480;
            prmt.b32 $0, t, 0x64646464, 0x4140;
            prmt.b32 $1, t, 0x64646464, 0x4342;
            sub.f16x2 $0, $0, c;
            sub.f16x2 $1, $1, c;
            }""",
            constraints="=r,=r,r", args=[x], dtype=tl.float16, is_pure=False, pack=4)

    @triton.jit
    def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, start_ptr, pos_ptr, o_ptr, m_ptr, l_ptr, scale,
                                 stride_kh, stride_kt, stride_sh,
                                 H: tl.constexpr, HD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
                                 SPLITS: tl.constexpr, CHUNK: tl.constexpr, COMPILED: tl.constexpr,
                                 QUANT: tl.constexpr):
        """Program (b, h, s): softmax(q . K * scale) @ V over keys [s*CHUNK, (s+1)*CHUNK) ∩ [0, pos] of row b,
        head h (its keys start at start[b] in the cache), with an online softmax over blocks of BLOCK_T keys (fp32
        throughout). One split: the normalized output to o_ptr [B, H, HD]. Several: the unnormalized sum to
        o_ptr [B, H, SPLITS, HD] and its running max and denominator to m_ptr, l_ptr [B, H, SPLITS], for
        _combine_kernel. The loop stops after the block holding pos; not COMPILED (Triton's CPU interpreter, where the
        bound cannot be a runtime value) it covers CHUNK keys, the rest masked. QUANT: keys and values are int8 with one
        scale per key at ks_ptr/vs_ptr [h, start[b] + t]; the scales multiply the scores and the softmax weights,
        not the [BLOCK_T, HD] blocks."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        sp = tl.program_id(2)
        d = tl.arange(0, BLOCK_D)
        dm = d < HD
        q = tl.load(q_ptr + (b * H + h) * HD + d, mask=dm, other=0.0).to(tl.float32) * scale  # [BD]
        lo = sp * CHUNK
        hi = tl.minimum(tl.load(pos_ptr + b) + 1, lo + CHUNK)  # keys lo..hi-1 (none if hi <= lo)
        start = tl.load(start_ptr + b)
        base = h * stride_kh + start * stride_kt
        sbase = h * stride_sh + start
        m_i = tl.full((), float("-inf"), tl.float32)
        l_i = tl.full((), 0.0, tl.float32)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for i0 in range(0, hi - lo if COMPILED else CHUNK, BLOCK_T):
            t = lo + i0 + tl.arange(0, BLOCK_T)
            tm = t < hi
            off = base + t[:, None] * stride_kt + d[None, :]  # [BT, BD]
            k = tl.load(k_ptr + off, mask=tm[:, None] & dm[None, :], other=0.0).to(tl.float32)
            dot = tl.sum(k * q[None, :], axis=1)  # [BT]
            if QUANT:
                dot = dot * tl.load(ks_ptr + sbase + t, mask=tm, other=0.0)
            s = tl.where(tm, dot, float("-inf"))  # [BT]
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block with no key (interpreter): no NaN
            p = tl.exp(s - m_ref)
            alpha = tl.exp(m_i - m_ref)
            v = tl.load(v_ptr + off, mask=tm[:, None] & dm[None, :], other=0.0).to(tl.float32)
            if QUANT:
                pv = p * tl.load(vs_ptr + sbase + t, mask=tm, other=0.0)  # [BT]
            else:
                pv = p
            acc = acc * alpha + tl.sum(pv[:, None] * v, axis=0)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            m_i = m_new
        if SPLITS == 1:
            tl.store(o_ptr + (b * H + h) * HD + d, (acc / l_i).to(o_ptr.dtype.element_ty), mask=dm)
        else:
            row = (b * H + h) * SPLITS + sp
            tl.store(o_ptr + row * HD + d, acc, mask=dm)
            tl.store(m_ptr + row, m_i)
            tl.store(l_ptr + row, l_i)

    @triton.jit
    def _decode_attention_dot_kernel(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, start_ptr, pos_ptr, o_ptr, m_ptr, l_ptr,
                                     scale, stride_kh, stride_kt, stride_sh,
                                     H: tl.constexpr, HD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
                                     SPLITS: tl.constexpr, CHUNK: tl.constexpr, COMPILED: tl.constexpr,
                                     QUANT: tl.constexpr):
        """_decode_attention_kernel's work and outputs with both products on tensor cores (tl.dot): the query is
        row 0 of a [16, BLOCK_D] tile whose other rows are zero (tl.dot's smallest M), so each block of keys costs
        two small matrix products instead of the [BLOCK_T, BLOCK_D] multiply-and-reduce on the CUDA cores that
        bounds the other kernel. The softmax weights are rounded to the query's dtype for the second product, as
        flash attention does. QUANT (int8 cache): the first product is int8 on int8 (the query rounded to int8 with
        its own scale, max|q| / 127, as the cache rounds each key), so keys are never converted; values become
        float16 by _int8_to_float16. Converting both tiles in the plain way had made this kernel slower than the
        CUDA-core one for an int8 cache (H200, 2026-12-02)."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        sp = tl.program_id(2)
        d = tl.arange(0, BLOCK_D)
        dm = d < HD
        r = tl.arange(0, 16)
        q = tl.load(q_ptr + (b * H + h) * HD + d, mask=dm, other=0.0)  # [BD]
        qs = q.to(tl.float32) * scale  # [BD]
        if QUANT:
            q_sc = tl.maximum(tl.max(tl.abs(qs), axis=0), 1e-8) / 127.0  # kvcache.quantize's rounding
            q8 = tl.minimum(tl.maximum(tl.floor(qs / q_sc + 0.5), -127.0), 127.0)  # [BD] integers
            qt = tl.where(r[:, None] == 0, q8[None, :], 0.0).to(tl.int8)  # [16, BD]
        else:
            q_sc = 1.0
            qt = tl.where(r[:, None] == 0, qs[None, :], 0.0).to(q.dtype)  # [16, BD]
        lo = sp * CHUNK
        hi = tl.minimum(tl.load(pos_ptr + b) + 1, lo + CHUNK)
        start = tl.load(start_ptr + b)
        base = h * stride_kh + start * stride_kt
        sbase = h * stride_sh + start
        m_i = tl.full((16,), float("-inf"), tl.float32)
        l_i = tl.zeros((16,), dtype=tl.float32)
        acc = tl.zeros((16, BLOCK_D), dtype=tl.float32)
        for i0 in range(0, hi - lo if COMPILED else CHUNK, BLOCK_T):
            t = lo + i0 + tl.arange(0, BLOCK_T)
            tm = t < hi
            off = base + t[:, None] * stride_kt + d[None, :]  # [BT, BD]
            k = tl.load(k_ptr + off, mask=tm[:, None] & dm[None, :], other=0)
            if QUANT:
                sc = tl.dot(qt, tl.trans(k), out_dtype=tl.int32).to(tl.float32)  # [16, BT]
                sc = sc * (q_sc * tl.load(ks_ptr + sbase + t, mask=tm, other=0.0))[None, :]
            else:
                sc = tl.dot(qt, tl.trans(k))  # [16, BT] fp32
            sc = tl.where(tm[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, axis=1))  # [16]
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(sc - m_ref[:, None])  # [16, BT]
            alpha = tl.exp(m_i - m_ref)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if QUANT:
                p = p * tl.load(vs_ptr + sbase + t, mask=tm, other=0.0)[None, :]
            v = tl.load(v_ptr + off, mask=tm[:, None] & dm[None, :], other=0)
            if QUANT:
                v = _int8_to_float16(v) if COMPILED else v.to(q.dtype)  # the interpreter runs no inline assembly
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)  # [16, BD]
            m_i = m_new
        # Row 0 is the query's.
        acc0 = tl.sum(tl.where(r[:, None] == 0, acc, 0.0), axis=0)  # [BD]
        m0 = tl.max(tl.where(r == 0, m_i, float("-inf")), axis=0)
        l0 = tl.sum(tl.where(r == 0, l_i, 0.0), axis=0)
        if SPLITS == 1:
            tl.store(o_ptr + (b * H + h) * HD + d, (acc0 / l0).to(o_ptr.dtype.element_ty), mask=dm)
        else:
            row = (b * H + h) * SPLITS + sp
            tl.store(o_ptr + row * HD + d, acc0, mask=dm)
            tl.store(m_ptr + row, m0)
            tl.store(l_ptr + row, l0)

    @triton.jit
    def _combine_kernel(po_ptr, m_ptr, l_ptr, o_ptr, HD: tl.constexpr, BLOCK_D: tl.constexpr,
                        SPLITS: tl.constexpr, BLOCK_S: tl.constexpr):
        """Program r (= b * H + h): merge the SPLITS partial softmax sums of one row and head into its output."""
        r = tl.program_id(0)
        sp = tl.arange(0, BLOCK_S)
        sm = sp < SPLITS
        d = tl.arange(0, BLOCK_D)
        dm = d < HD
        m = tl.load(m_ptr + r * SPLITS + sp, mask=sm, other=float("-inf"))  # [BS]; split 0 holds key 0: finite max
        w = tl.where(m == float("-inf"), 0.0, tl.exp(m - tl.max(m, axis=0)))  # [BS]
        den = tl.sum(tl.load(l_ptr + r * SPLITS + sp, mask=sm, other=0.0) * w, axis=0)
        acc = tl.load(po_ptr + (r * SPLITS + sp[:, None]) * HD + d[None, :], mask=sm[:, None] & dm[None, :], other=0.0)
        tl.store(o_ptr + r * HD + d, (tl.sum(acc * w[:, None], axis=0) / den).to(o_ptr.dtype.element_ty), mask=dm)


_SMS: dict[int, int] = {}


def multiprocessors(device: torch.device) -> int:
    """The CUDA device's multiprocessor count (asked once per device)."""
    if device.index not in _SMS:
        _SMS[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device.index]


def attention_launch(rows: int, tmax: int, device: torch.device, int8: bool = False) -> tuple[int, int, int, bool]:
    """(splits, key block, warps, tensor cores) of the decode attention for `rows` (batch rows x heads) programs over
    at most tmax keys, from `python -m service.bench --attention-sweep` on an H200 (5.8B shape, 16 heads of 256,
    rows of 100-1,256 keys unless said, each call timed inside a CUDA graph as the engine runs it), in microseconds
    per layer, float16 cache (2026-12-02, deploy/bench/attention-sweep-tensor-core-h200.json) / int8 cache
    (2026-12-04, deploy/bench/attention-sweep-int8-h200.json):
    - batch 1: the CUDA-core kernel, 16 splits of 128-key blocks, 4 warps (9.3 / 9.3; tensor cores 10.0 / 11.8);
    - float16 below one program per multiprocessor: the tensor-core kernel, 8 splits of 32 keys, 4 warps (batch 8:
      23.9 against 30.5). int8 there stays on the CUDA-core kernel (batch 8: 25.8): the tensor-core one measured
      21.1 but has not run through the GPU suite split over 8 programs;
    - above one program per multiprocessor: the tensor-core kernel, one split of 64-key blocks, 4 warps (batch 64:
      158 / 129 against 187 / 172 on CUDA cores; 100-1,000 keys: 136.5 / 110 against 167 / 151; 128 rows: 344 / 257
      against 401 / 339), of 32 keys for the 256-key bucket (batch 64, 20-160 keys: 30.0 / 26.9 against
      38.0 / 37.2). The best int8 settings there were within 4 % of these.
    Each split keeps at least one block of keys."""
    if device.type != "cuda":
        return 1, 64, 4, False
    few = rows < multiprocessors(device)
    if rows <= 16 or int8 and few:
        return max(1, min(16, tmax // 128)), 128, 4, False
    if few:
        return max(1, min(8, tmax // 32)), 32, 4, True
    return 1, 32 if tmax <= 256 else 64, 4, True


def decode_attention(q: torch.Tensor, kcache: torch.Tensor, vcache: torch.Tensor, start: torch.Tensor,
                     pos: torch.Tensor, tmax: int, splits: int | None = None, block_t: int | None = None,
                     num_warps: int | None = None, kscale: torch.Tensor | None = None,
                     vscale: torch.Tensor | None = None, dot: bool | None = None,
                     num_stages: int | None = None) -> torch.Tensor:
    """q [B, H, 1, hd] of the token at position pos[b] of row b's sequence, whose keys and values sit at
    kcache/vcache [H, P, hd][:, start[b] + 0..pos[b]]; tmax bounds pos + 1. Returns [B, H, 1, hd], scaled by
    1/sqrt(hd) like SDPA's default. A row's keys are split over `splits` programs (flash-decoding) of
    `num_warps` warps, each looping over blocks of `block_t` keys, on tensor cores if `dot` (defaults:
    attention_launch; num_stages: Triton's). An int8 cache comes with its scales kscale/vscale [H, P]
    (engine/kvcache.py)."""
    B, H, _, hd = q.shape
    out = torch.empty_like(q)  # [B, H, 1, hd]
    quant = kscale is not None
    auto = attention_launch(B * H, tmax, q.device, int8=quant)
    splits, block_t, num_warps = splits or auto[0], block_t or auto[1], num_warps or auto[2]
    dot = auto[3] if dot is None else dot
    chunk = -(-tmax // (splits * block_t)) * block_t  # keys per split, a whole number of blocks
    if splits == 1:  # the kernel writes the output directly; the partial-sum pointers are unused
        po, ml = out, (out, out)
    else:
        po = torch.empty((B, H, splits, hd), dtype=torch.float32, device=q.device)  # partial sums
        ml = torch.empty((2, B, H, splits), dtype=torch.float32, device=q.device)  # running max, denominator
    block_d = triton.next_power_of_2(hd)
    ks, vs = (kscale, vscale) if quant else (ml[0], ml[1])  # unread without QUANT
    kernel = _decode_attention_dot_kernel if dot else _decode_attention_kernel
    kernel[(B, H, splits)](
        q.contiguous(), kcache, vcache, ks, vs, start, pos, po, ml[0], ml[1], hd ** -0.5, kcache.stride(0),
        kcache.stride(1), ks.stride(0) if quant else 0,
        H=H, HD=hd, BLOCK_D=block_d, BLOCK_T=block_t, SPLITS=splits, CHUNK=chunk,
        COMPILED=os.environ.get("TRITON_INTERPRET") != "1", QUANT=quant, num_warps=num_warps,
        **({"num_stages": num_stages} if num_stages else {}),
    )
    if splits > 1:
        _combine_kernel[(B * H,)](po, ml[0], ml[1], out, HD=hd, BLOCK_D=block_d, SPLITS=splits,
                                  BLOCK_S=triton.next_power_of_2(splits))
    return out


def int8_rounded_query(q: torch.Tensor) -> torch.Tensor:
    """q [..., hd] as the tensor-core kernel multiplies it by an int8 cache's keys: each vector of q / sqrt(hd)
    rounded to int8 as the cache rounds a key (kvcache.quantize), then back (the torch reference of that kernel)."""
    scale = q.shape[-1] ** -0.5
    return (kvcache.dequantize(*kvcache.quantize(q.float() * scale), torch.float32) / scale).to(q.dtype)


def rope_store(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: torch.Tensor, pos: torch.Tensor,
               kcache: torch.Tensor, vcache: torch.Tensor, heads: int, head_dim: int, rot: int,
               kscale: torch.Tensor | None = None, vscale: torch.Tensor | None = None) -> torch.Tensor:
    """One decode token per row: qkv [B, H*3*hd] (GPT-NeoX's per-head [q|k|v] layout), cos/sin [L, rot], pos [B].
    Writes rotated k and v into kcache/vcache [H, P, hd] at [:, start[b] + pos[b]] (int8 caches: quantized, their
    scales into kscale/vscale [H, P]); returns rotated q [B, H, 1, hd]."""
    B = qkv.shape[0]
    q = torch.empty((B, heads, 1, head_dim), dtype=qkv.dtype, device=qkv.device)  # [B, H, 1, hd]
    quant = kscale is not None
    ks, vs = (kscale, vscale) if quant else (q, q)  # unread without QUANT
    _rope_store_kernel[(B, heads)](
        qkv, cos, sin, start, pos, kcache, vcache, q, ks, vs,
        qkv.stride(0), cos.stride(0), kcache.stride(0), kcache.stride(1), ks.stride(0) if quant else 0,
        H=heads, HD=head_dim, ROT=rot, BLOCK=triton.next_power_of_2(head_dim), QUANT=quant,
    )
    return q


def dual_layernorm(x: torch.Tensor, ln1: torch.nn.LayerNorm, ln2: torch.nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(ln1(x), ln2(x)) for x [R, D] in one pass (both norms share eps, as in GPT-NeoX)."""
    R, D = x.shape
    x = x.contiguous()
    o1, o2 = torch.empty_like(x), torch.empty_like(x)  # [R, D] each
    _dual_layernorm_kernel[(R,)](x, ln1.weight, ln1.bias, ln2.weight, ln2.bias, o1, o2, ln1.eps,
                                 D=D, BLOCK=triton.next_power_of_2(D))
    return o1, o2
