"""Triton kernels that fuse the decode step's small operations: rotary embedding with the KV-cache write,
GPT-NeoX's two layer norms of the same input, and attention of one new token over its cache.

Why: at batch 1 a decode step's matmuls are ~110 kernels, but the glue between them (rotating q and k in
pieces, copying strided views, scattering k and v into the cache, two layer norms per layer) was ~25
more kernels per layer, each a few microseconds: about 1.3 ms of a 5.3 ms step on an H100. Inside a
CUDA graph these run back to back, so the only way to make them cheaper is to make fewer of them.
Attention for one query per sequence is a dot product and a weighted sum over the sequence's cached
keys, up to its own position only: one small kernel, where the library kernels (flash, memory-efficient,
cuDNN) are built for long queries and took 17 us per layer here (cuDNN).
The torch code they replace stays the reference (NeoxForward._rope, nn.LayerNorm, scaled_dot_product_attention)
and the CPU path.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the decode step keeps its torch code
    triton = None


if triton is not None:

    @triton.jit
    def _rope_store_kernel(
        qkv_ptr, cos_ptr, sin_ptr, start_ptr, pos_ptr, k_ptr, v_ptr, q_ptr,
        stride_qkv, stride_cs, stride_kh, stride_kt,
        H: tl.constexpr, HD: tl.constexpr, ROT: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """Program (b, h): rotate q and k of row b, head h at position pos[b]; q to q_ptr [B, H, HD],
        k and v to the cache at [h, start[b] + pos[b]]."""
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
        cache = h * stride_kh + (tl.load(start_ptr + b) + pos) * stride_kt
        tl.store(q_ptr + (b * H + h) * HD + i, (q * c + qp * s).to(q_ptr.dtype.element_ty), mask=m)
        tl.store(k_ptr + cache + i, (k * c + kp * s).to(k_ptr.dtype.element_ty), mask=m)
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
    def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, start_ptr, pos_ptr, o_ptr, m_ptr, l_ptr, scale,
                                 stride_kh, stride_kt,
                                 H: tl.constexpr, HD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
                                 SPLITS: tl.constexpr, CHUNK: tl.constexpr, EXACT_BOUND: tl.constexpr):
        """Program (b, h, s): softmax(q . K * scale) @ V over keys [s*CHUNK, (s+1)*CHUNK) ∩ [0, pos] of row b,
        head h (its keys start at start[b] in the cache), with an online softmax over blocks of BLOCK_T keys (fp32
        throughout). One split: the normalized output to o_ptr [B, H, HD]. Several: the unnormalized sum to
        o_ptr [B, H, SPLITS, HD] and its running max and denominator to m_ptr, l_ptr [B, H, SPLITS], for
        _combine_kernel. The loop stops after the block holding pos; where the bound cannot be a runtime value
        (Triton's CPU interpreter) it covers CHUNK keys, the rest masked."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        sp = tl.program_id(2)
        d = tl.arange(0, BLOCK_D)
        dm = d < HD
        q = tl.load(q_ptr + (b * H + h) * HD + d, mask=dm, other=0.0).to(tl.float32) * scale  # [BD]
        lo = sp * CHUNK
        hi = tl.minimum(tl.load(pos_ptr + b) + 1, lo + CHUNK)  # keys lo..hi-1 (none if hi <= lo)
        base = h * stride_kh + tl.load(start_ptr + b) * stride_kt
        m_i = tl.full((), float("-inf"), tl.float32)
        l_i = tl.full((), 0.0, tl.float32)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for i0 in range(0, hi - lo if EXACT_BOUND else CHUNK, BLOCK_T):
            t = lo + i0 + tl.arange(0, BLOCK_T)
            tm = t < hi
            off = base + t[:, None] * stride_kt + d[None, :]  # [BT, BD]
            k = tl.load(k_ptr + off, mask=tm[:, None] & dm[None, :], other=0.0).to(tl.float32)
            s = tl.where(tm, tl.sum(k * q[None, :], axis=1), float("-inf"))  # [BT]
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block with no key (interpreter): no NaN
            p = tl.exp(s - m_ref)
            alpha = tl.exp(m_i - m_ref)
            v = tl.load(v_ptr + off, mask=tm[:, None] & dm[None, :], other=0.0).to(tl.float32)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
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


def _sms(device: torch.device) -> int:
    if device.index not in _SMS:
        _SMS[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device.index]


def attention_launch(rows: int, tmax: int, device: torch.device) -> tuple[int, int, int]:
    """(splits, key block, warps) of the decode attention for `rows` (batch rows x heads) programs over at most
    tmax keys, from `python -m service.bench --attention-sweep` on an H200 (5.8B shape, 16 heads of 256, each
    call timed inside a CUDA graph as the engine runs it; deploy/bench/attention-sweep-h200.json):
    - fewer programs than multiprocessors (batch 1-8): each row's keys split 16 ways in blocks of 128, 4 warps
      (batch 1, 100-1,256 keys: 8.8 us per layer against 12.7 with 8 splits of 64; batch 8: 30.6 against 48.6
      with 2);
    - more (batch 16 up): 4 splits of blocks of 64, 2 warps (batch 64, real-traffic lengths: 186 us against 243
      with one split of 4 warps, 3.45 TB/s of keys and values; 128 rows: 397 against 472); rows of different
      lengths otherwise leave multiprocessors idle behind the longest.
    Each split keeps at least one block of keys."""
    if device.type != "cuda":
        return 1, 64, 4
    if rows < _sms(device):
        return max(1, min(16, tmax // 128)), 128, 4
    return max(1, min(4, tmax // 256)), 64, 2


def decode_attention(q: torch.Tensor, kcache: torch.Tensor, vcache: torch.Tensor, start: torch.Tensor,
                     pos: torch.Tensor, tmax: int, splits: int | None = None, block_t: int | None = None,
                     num_warps: int | None = None) -> torch.Tensor:
    """q [B, H, 1, hd] of the token at position pos[b] of row b's sequence, whose keys and values sit at
    kcache/vcache [H, P, hd][:, start[b] + 0..pos[b]]; tmax bounds pos + 1. Returns [B, H, 1, hd], scaled by
    1/sqrt(hd) like SDPA's default. A row's keys are split over `splits` programs (flash-decoding) of
    `num_warps` warps, each looping over blocks of `block_t` keys (defaults: attention_launch)."""
    B, H, _, hd = q.shape
    out = torch.empty_like(q)  # [B, H, 1, hd]
    auto = attention_launch(B * H, tmax, q.device)
    splits, block_t, num_warps = splits or auto[0], block_t or auto[1], num_warps or auto[2]
    chunk = -(-tmax // (splits * block_t)) * block_t  # keys per split, a whole number of blocks
    if splits == 1:  # the kernel writes the output directly; the partial-sum pointers are unused
        po, ml = out, (out, out)
    else:
        po = torch.empty((B, H, splits, hd), dtype=torch.float32, device=q.device)  # partial sums
        ml = torch.empty((2, B, H, splits), dtype=torch.float32, device=q.device)  # running max, denominator
    block_d = triton.next_power_of_2(hd)
    _decode_attention_kernel[(B, H, splits)](
        q.contiguous(), kcache, vcache, start, pos, po, ml[0], ml[1], hd ** -0.5, kcache.stride(0), kcache.stride(1),
        H=H, HD=hd, BLOCK_D=block_d, BLOCK_T=block_t, SPLITS=splits, CHUNK=chunk,
        EXACT_BOUND=os.environ.get("TRITON_INTERPRET") != "1", num_warps=num_warps,
    )
    if splits > 1:
        _combine_kernel[(B * H,)](po, ml[0], ml[1], out, HD=hd, BLOCK_D=block_d, SPLITS=splits,
                                  BLOCK_S=triton.next_power_of_2(splits))
    return out


def rope_store(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: torch.Tensor, pos: torch.Tensor,
               kcache: torch.Tensor, vcache: torch.Tensor, heads: int, head_dim: int, rot: int) -> torch.Tensor:
    """One decode token per row: qkv [B, H*3*hd] (GPT-NeoX's per-head [q|k|v] layout), cos/sin [L, rot], pos [B].
    Writes rotated k and v into kcache/vcache [H, P, hd] at [:, start[b] + pos[b]]; returns rotated q [B, H, 1, hd]."""
    B = qkv.shape[0]
    q = torch.empty((B, heads, 1, head_dim), dtype=qkv.dtype, device=qkv.device)  # [B, H, 1, hd]
    _rope_store_kernel[(B, heads)](
        qkv, cos, sin, start, pos, kcache, vcache, q,
        qkv.stride(0), cos.stride(0), kcache.stride(0), kcache.stride(1),
        H=heads, HD=head_dim, ROT=rot, BLOCK=triton.next_power_of_2(head_dim),
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
