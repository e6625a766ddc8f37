"""GPT-NeoX forward over a preallocated KV cache: packed prefill of prompt chunks and batched decode of many sequences.

The weights are the transformers model's own modules (so bitsandbytes' nf4 Linear4bit layers run as
loaded, or their dense copies for several tokens); only the attention bookkeeping is ours. Score, prefill and
decode (fused or not) run one layer implementation, NeoxForward._layer, each with its own attention; one method,
NeoxRunner._store, writes the cache. The cache is one pool
of token positions per layer; each sequence owns a contiguous range of it (engine/kvspace.py): prefill and decode
write it through the same kernel on the GPU, prefill then attends over each chunk's range, and a decode step over
batch rows 0..n-1 is told where each row's range starts. On CUDA that step is
captured once per (batch bucket, length bucket) in a CUDA graph: a batch-1 step is ~60 kernel launches
per layer, which cost more than the nf4 matmuls themselves. Every bucket is captured by warm_up() before
the replica serves; a capture's warm-up steps run on a scratch window, never on a live sequence's range.
"""
from __future__ import annotations

import inspect
import itertools
import logging

import torch
import torch.nn.functional as F

from . import fused, gemm4bit
from .kvcache import KVCache
from .sampling import logprobs

log = logging.getLogger(__name__)

try:  # flash attention over packed sequences of different lengths (torch >= 2.9, CUDA)
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn

    _params = inspect.signature(_varlen_attn).parameters
    # Causal masking is a flag up to torch 2.10, a (left, right) window after (the mask aligned to the last key).
    # One split of the keys: flash attention otherwise picks its split from the whole call's shape, so a chunk's
    # output (and a request's tokens) would depend on what else was prefilled in the same step.
    _VARLEN_KW = ({"is_causal": True} if "is_causal" in _params else {"window_size": (-1, 0)}) | (
        {"num_splits": 1} if "num_splits" in _params else {})
except ImportError:
    _varlen_attn, _VARLEN_KW = None, {}


def _buckets(limit: int, first: int) -> list[int]:
    out, b = [], first
    while b < limit:
        out.append(b)
        b *= 2
    return out + [limit]


def right_pad(seqs: list[list[int]], pad: int = 0) -> torch.Tensor:
    """Token id rows [n, T] (T the longest), each sequence left-aligned and followed by `pad`."""
    ids = torch.full((len(seqs), max(map(len, seqs))), pad, dtype=torch.long)  # [n, T]
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    return ids


def _four_bit_linears(model: torch.nn.Module):
    """(module, bitsandbytes QuantState) of each 4-bit linear layer of the transformer blocks."""
    for layer in model.gpt_neox.layers:
        for m in (layer.attention.query_key_value, layer.attention.dense, layer.mlp.dense_h_to_4h, layer.mlp.dense_4h_to_h):
            state = getattr(m.weight, "quant_state", None)
            if state is not None:
                yield m, state


def dequantized_weights(model: torch.nn.Module, dtype: torch.dtype) -> dict[torch.nn.Module, torch.Tensor]:
    """Copies [out, in] in `dtype` of the blocks' 4-bit weights, dequantized once by bitsandbytes' own
    dequantize_4bit (the values its kernels compute from the packed weights), keyed by module."""
    import bitsandbytes.functional as bnbf

    return {m: bnbf.dequantize_4bit(m.weight.data, st).to(dtype).reshape(st.shape) for m, st in _four_bit_linears(model)}


def dequantized_bytes(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Memory that dequantized_weights would take (0 for a model without 4-bit layers)."""
    size = torch.tensor([], dtype=dtype).element_size()
    return sum(torch.Size(st.shape).numel() * size for _, st in _four_bit_linears(model))


class NeoxForward:
    """GPT-NeoX forward passes over the model's own modules without a KV cache: whole sequences (Score)
    and shared prefixes (multiple choice).

    dense: dequantized copies of the 4-bit weights (dequantized_weights), empty for none. Where a copy exists, a
    linear layer applied to more than one token multiplies by it: bitsandbytes' 4-bit layers dequantize the whole
    weight on every such call (2.5 bytes per parameter of extra traffic, ~4 ms per forward pass of polyglot-ko-5.8b
    on an H200) and then run the same GEMM. A single token keeps bitsandbytes' 4-bit GEMV, which reads a quarter
    of the bytes."""

    def __init__(self, model: torch.nn.Module, max_len: int, dense: dict[torch.nn.Module, torch.Tensor] | None = None):
        cfg = model.config
        if cfg.model_type != "gpt_neox":
            raise ValueError(f"the generation engine runs GPT-NeoX models, not {cfg.model_type}")
        neox = model.gpt_neox
        self.model = model
        self.layers = neox.layers
        self.embed = neox.embed_in
        self.final_ln = neox.final_layer_norm
        self.head = model.get_output_embeddings()
        self.parallel = cfg.use_parallel_residual
        self.H = cfg.num_attention_heads
        self.hd = cfg.hidden_size // self.H
        self.max_len = max_len
        self.dense = dense or {}
        self.fused = False  # engine/fused.py's kernels for the layer norms and the cache (NeoxRunner turns them on)
        # engine/gemm4bit.py's form of the 4-bit weights and the most rows it multiplies (use_packed)
        self.packed: dict[torch.nn.Module, gemm4bit.Packed4bit] = {}
        self.packed_rows = 0
        dev = self.embed.weight.device
        self.device = dev
        # One activation dtype for every path: the model's own (the loader puts every tensor, and every 4-bit
        # layer's compute dtype, in the engine's compute dtype).
        self.dtype = self.embed.weight.dtype

        inv_freq = neox.rotary_emb.inv_freq.float().to(dev)  # [rot/2]
        self.rot = inv_freq.numel() * 2
        t = torch.arange(max_len, device=dev, dtype=torch.float32)
        emb = torch.cat([torch.outer(t, inv_freq)] * 2, dim=-1)  # [max_len, rot]
        self.cos, self.sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def use_packed(self, max_rows: int) -> int:
        """Multiply passes of at most max_rows rows by engine/gemm4bit.py's kernel, with the launch tune() measured
        fastest for each weight shape here (GPU with Triton; before any CUDA graph is captured). Returns the
        number of layers it covers (0 where the kernel cannot run or read these weights)."""
        if max_rows <= 0 or self.device.type != "cuda" or gemm4bit.triton is None:
            return 0
        self.packed = gemm4bit.packed_weights(_four_bit_linears(self.model))
        if self.packed:
            gemm4bit.tune(list(self.packed.values()), max_rows, self.dtype)
            self.packed_rows = max_rows
        return len(self.packed)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotary embedding on the first `rot` dims (rotate-half form, as transformers' GPT-NeoX), written
        into a copy of x without the concatenations of the textbook form. x [B, H, T, hd]."""
        half = self.rot // 2
        out = x.contiguous() if not x.is_contiguous() else x.clone()  # [B, H, T, hd]
        r1, r2 = x[..., :half], x[..., half : self.rot]
        c, s = cos[..., :half], sin[..., :half]  # the two halves of cos/sin are equal
        out[..., :half] = r1 * c - r2 * s
        out[..., half : self.rot] = r2 * c + r1 * s
        return out

    def _linear(self, m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One of the layers' linear modules on x [..., in]: up to packed_rows rows by engine/gemm4bit.py's kernel
        on its packed 4-bit codes, else by its dense copy for more than one token, else bitsandbytes' layer."""
        rows = x.numel() // x.shape[-1]
        if rows <= self.packed_rows and m in self.packed:
            return gemm4bit.matmul(x, self.packed[m], m.bias)
        w = self.dense.get(m) if rows > 1 else None
        return m(x) if w is None else F.linear(x, w, m.bias)

    def _layer(self, li: int, x: torch.Tensor, attention) -> torch.Tensor:
        """Layer li on tokens x [N, D]: the one layer every pass runs (Score, prefill, decode, fused or not), with
        its attention as an argument: attention(li, qkv [N, 3D]) -> [N, H, hd] rotates q and k of the projected
        tokens, stores k and v where that pass keeps them (the KV cache: _store) and attends."""
        layer = self.layers[li]
        h, h_mlp = self._norms(layer, x)
        a = attention(li, self._linear(layer.attention.query_key_value, h))  # [N, H, hd]
        a = self._linear(layer.attention.dense, a.reshape(x.shape[0], -1))  # [N, D]
        return self._residual(li, x, a, h_mlp)

    def _block(self, li: int, x: torch.Tensor, attend) -> torch.Tensor:
        """_layer on rows of tokens x [B, T, D], with attend(q, k, v) over [B, H, T, hd] tensors -> [B, H, T, hd]."""
        B, T, D = x.shape

        def attention(li, qkv):
            q, k, v = qkv.view(B, T, self.H, 3 * self.hd).transpose(1, 2).chunk(3, dim=-1)  # 3 x [B, H, T, hd]
            return attend(q, k, v).transpose(1, 2).reshape(B * T, self.H, self.hd)  # [B*T, H, hd]

        return self._layer(li, x.reshape(B * T, D), attention).view(B, T, D)

    def _norms(self, layer: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(input_layernorm(x), post_attention_layernorm(x) or None) of tokens x [N, D]: both in one fused kernel
        where they share their input (parallel residual), else the first only (_residual computes the second)."""
        if self.fused and self.parallel:
            return fused.dual_layernorm(x, layer.input_layernorm, layer.post_attention_layernorm)  # 2 x [N, D]
        return layer.input_layernorm(x), None

    def _residual(self, li: int, x: torch.Tensor, a: torch.Tensor, mlp_in: torch.Tensor | None = None) -> torch.Tensor:
        """The rest of layer li after attention output a: the MLP and the residual sums (any leading shape).
        mlp_in: post_attention_layernorm(x) when already computed (parallel residual only)."""
        layer = self.layers[li]
        if self.parallel:
            return x + a + self._mlp(layer.mlp, layer.post_attention_layernorm(x) if mlp_in is None else mlp_in)
        x = x + a
        return x + self._mlp(layer.mlp, layer.post_attention_layernorm(x))

    def _mlp(self, mlp: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
        return self._linear(mlp.dense_4h_to_h, mlp.act(self._linear(mlp.dense_h_to_4h, h)))

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.final_ln(h)).float()

    @torch.inference_mode()
    def hidden(self, ids: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """Final hidden states [B, T, D] (after the last layer norm) of right-padded rows ids [B, T] whose real
        lengths are `lengths`; hidden states at pad positions are zero.

        Unpadded: the layer norms, projections and MLP (nearly all the FLOPs) run on the N real tokens only;
        just attention sees the padded [B, T] layout, through one buffer whose pad rows stay zero. Padding
        then costs attention and two copies per layer, not whole matmul rows."""
        B, T = ids.shape
        dev, D = self.device, self.H * self.hd
        real = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]  # [B, T]
        flat = real.reshape(-1).nonzero().squeeze(1).to(dev)  # [N] positions in B*T
        x = self.embed(ids.reshape(-1).to(dev)[flat]).to(self.dtype)  # [N, D]
        cos, sin = self.cos[:T], self.sin[:T]  # [T, rot]
        padded = torch.zeros((B * T, 3 * D), dtype=self.dtype, device=dev)  # [B*T, 3D], reused by every layer

        def attention(li, qkv):
            padded[flat] = qkv  # [N, 3D] into the rows
            q, k, v = padded.view(B, T, self.H, 3 * self.hd).transpose(1, 2).chunk(3, dim=-1)  # 3 x [B, H, T, hd]
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            # Right padding with causal attention is exact: real tokens never attend to the pads after them.
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, hd]
            return a.transpose(1, 2).reshape(B * T, self.H, self.hd)[flat]  # [N, H, hd]

        for li in range(len(self.layers)):
            x = self._layer(li, x, attention)
        out = torch.zeros((B * T, D), dtype=self.dtype, device=dev)
        out[flat] = self.final_ln(x)
        return out.view(B, T, D)

    @torch.inference_mode()
    def shared_prefix_hidden(self, prefixes: list[list[int]], group: list[int], suffixes: list[list[int]]) -> torch.Tensor:
        """Final hidden states [R, S, D] of suffix rows, row r continuing prefix group[r]: each prefix runs
        through the model once, however many suffixes share it (multiple-choice scoring).

        The C suffixes of a group run as one row of C blocks of S tokens that attend to the group's prefix
        and, causally, to their own block; each layer's keys and values live in one buffer per group
        (prefix, then the blocks), so nothing is gathered or concatenated per suffix."""
        G, P = len(prefixes), max(map(len, prefixes))
        S = max(map(len, suffixes))
        member = [0] * len(suffixes)  # row r is choice member[r] of its group
        counts = [0] * G
        for r, g in enumerate(group):
            member[r], counts[g] = counts[g], counts[g] + 1
        C = max(counts)
        L = P + C * S
        dev = self.device
        ids = right_pad(prefixes)  # [G, P]
        kb = [torch.empty((G, self.H, L, self.hd), dtype=self.dtype, device=dev) for _ in self.layers]  # L x [G, H, L, hd]
        vb = [torch.empty_like(k) for k in kb]
        x = self.embed(ids.to(dev)).to(self.dtype)  # [G, P, D]
        for li in range(len(self.layers)):
            def attend(q, k, v, li=li):
                q, k = self._rope(q, self.cos[:P], self.sin[:P]), self._rope(k, self.cos[:P], self.sin[:P])
                kb[li][:, :, :P] = k
                vb[li][:, :, :P] = v
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

            x = self._block(li, x, attend)
        del x

        plen = torch.tensor([len(p) for p in prefixes], device=dev)  # [G]
        ids = torch.zeros((G, C * S), dtype=torch.long)  # [G, C*S]: block c holds the group's choice c
        for r, t in enumerate(suffixes):
            ids[group[r], member[r] * S : member[r] * S + len(t)] = torch.tensor(t)
        i = torch.arange(C * S, device=dev)  # query index within the row
        pos = plen[:, None] + (i % S)[None, :]  # [G, C*S]
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]  # [G, 1, C*S, rot]
        j = torch.arange(L, device=dev)  # key index: prefix slots 0..P-1, then the C blocks
        jj = (j - P).clamp(min=0)
        mask = torch.where(
            j[None, None, :] < P,
            j[None, None, :] < plen[:, None, None],  # the group's own prefix, not its padding
            ((jj // S)[None, :] == (i // S)[:, None]) & ((jj % S)[None, :] <= (i % S)[:, None]),  # own block, causal
        )[:, None]  # [G, 1, C*S, L]
        x = self.embed(ids.to(dev)).to(self.dtype)  # [G, C*S, D]
        for li in range(len(self.layers)):
            def attend(q, k, v, li=li):
                q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
                kb[li][:, :, P:] = k
                vb[li][:, :, P:] = v
                return F.scaled_dot_product_attention(q, kb[li], vb[li], attn_mask=mask)

            x = self._block(li, x, attend)
        h = self.final_ln(x)  # [G, C*S, D]
        rows = torch.tensor(group, device=dev)[:, None]  # [R, 1]
        cols = (torch.tensor(member, device=dev) * S)[:, None] + torch.arange(S, device=dev)[None, :]  # [R, S]
        return h[rows, cols]  # [R, S, D]


class NeoxRunner(NeoxForward):
    """Call order: prefill(base, ids, start) for each chunk of a new sequence whose cache range starts at pool
    position `base`, then decode(tokens, positions, bases) for all n running sequences at once (batch rows
    0..n-1, up to max_slots), then decode_again() while the same rows go on greedily.
    kv_tokens: positions in the pool (default: a full window per row). choosable: ids the GPU's greedy choice may
    take (the tokenizer's; the output layer's rows past it are padding), default all. kv_dtype: the cache's
    storage, "auto" (the model's dtype) or "int8" (engine/kvcache.py)."""

    def __init__(self, model: torch.nn.Module, max_slots: int, max_len: int, use_graphs: bool, fused_decode: bool = True,
                 eos_id: int | None = None, kv_tokens: int | None = None,
                 dense: dict[torch.nn.Module, torch.Tensor] | None = None, choosable: int | None = None,
                 kv_dtype: str = "auto"):
        super().__init__(model, max_len, dense)
        dev = self.device
        self.choosable = choosable or self.head.weight.shape[0]
        self.eos_id = eos_id
        self.max_slots = max_slots
        self.kv_tokens = kv_tokens or max_slots * max_len
        # Batch rows beyond the running ones (graph buckets are padded) write into a window of their own after the pool.
        self._scratch = self.kv_tokens
        self.kv = KVCache(len(self.layers), self.H, self.kv_tokens + max_len, self.hd, self.dtype, dev, kv_dtype)
        self.fused = False
        if fused_decode and dev.type == "cuda":
            problem = self.fused_problem()
            if problem:
                log.warning("fused decode kernels off, the decode step runs its torch code: %s", problem)
            self.fused = problem is None

        self._varlen_ok = False
        if dev.type == "cuda":
            problem = self.varlen_problem()
            if problem:
                log.warning("prefill attends chunk by chunk: %s", problem)
            self._varlen_ok = problem is None

        self.use_graphs = use_graphs and dev.type == "cuda"
        self.batch_buckets = _buckets(max_slots, 1)
        self.len_buckets = _buckets(max_len, 256)
        self._tok = torch.zeros(max_slots, dtype=torch.long, device=dev)  # static graph inputs
        self._pos = torch.zeros(max_slots, dtype=torch.long, device=dev)
        self._base = torch.zeros(max_slots, dtype=torch.long, device=dev)  # where each row's cache range starts
        self._no_eos = torch.zeros(max_slots, dtype=torch.bool, device=dev)  # rows whose next choice may not be eos
        self._no_eos_host: list[bool] = []
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._fetch_bufs = [torch.empty(max_slots, dtype=torch.long, pin_memory=True) for _ in range(2)] if dev.type == "cuda" else []
        self._logprob_bufs: list[tuple[torch.Tensor, torch.Tensor]] = []  # next_logprobs' pinned pairs, made at first use
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None

    @staticmethod
    def kv_bytes_per_token(model: torch.nn.Module, dtype: torch.dtype, kv_dtype: str = "auto") -> int:
        c = model.config
        return KVCache.bytes_per_token(c.num_hidden_layers, c.hidden_size, c.num_attention_heads, dtype, kv_dtype)

    @torch.inference_mode()
    def prefill(self, chunks: list[tuple[int, list[int], int]]) -> torch.Tensor:
        """Prompt chunks of several sequences in one forward pass, packed end to end without padding: chunk
        (base, ids, start) runs ids at positions start.. of the sequence whose cache range starts at `base`,
        attending to its cached positions < start and causally to itself. The linear layers and MLPs see one
        [N, D] block of all N tokens (no pad tokens computed, however different the lengths), on the dense weight
        copies where there are any. Each layer's keys and values go into the cache first, by the decode step's
        own kernel where it runs (fused.rope_store: one place writes the cache), and every chunk attends to what
        the cache then holds, all chunks in one variable-length flash-attention call where torch has it (on an
        H200, a 2,048-token step of 100-1,000-token prompts spent ~14 of its 44 ms of GPU time outside the
        matmuls, rotating, scattering and attending chunk by chunk). Returns each chunk's last-token logits
        [n, V] (float32)."""
        dev = self.device
        lens = [len(ids) for _, ids, _ in chunks]
        x = self.embed(torch.tensor([t for _, ids, _ in chunks for t in ids], device=dev)).to(self.dtype)  # [N, D]
        pos = torch.tensor([s + t for (_, ids, s) in chunks for t in range(len(ids))], device=dev)  # [N]
        base = torch.tensor([b for (b, ids, _) in chunks for _ in ids], device=dev)  # [N]
        # The keys each chunk attends to, packed chunk after chunk: its sequence's cached positions, then its own.
        keys = torch.tensor([b + t for (b, ids, s) in chunks for t in range(s + len(ids))], device=dev)  # [Nk]
        attend = self._packed_attention([s for _, _, s in chunks], lens, self._varlen_ok)

        def attention(li, qkv):
            q = self._store(li, qkv, base, pos)  # [N, H, hd]
            K, V = self.kv.gather(li, keys)  # [H, Nk, hd] each
            return attend(q, K.transpose(0, 1), V.transpose(0, 1))  # [N, H, hd]

        for li in range(len(self.layers)):
            x = self._layer(li, x, attention)
        last = torch.tensor(list(itertools.accumulate(lens)), device=dev) - 1
        return self._logits(x[last])  # [n, V]

    def _store(self, li: int, qkv: torch.Tensor, base: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The one place that writes the KV cache: tokens qkv [N, 3D] (GPT-NeoX's per-head [q|k|v]) at positions
        pos [N] of the ranges starting at base [N] have q and k rotated, k and v stored in layer li's cache (by
        fused.rope_store where the fused kernels run, else by torch); returns the rotated q [N, H, hd]."""
        if self.fused:
            kc, vc, ks, vs = self.kv.kernel_args(li)
            return fused.rope_store(qkv, self.cos, self.sin, base, pos, kc, vc, self.H, self.hd, self.rot,
                                    ks, vs)[:, :, 0]  # [N, H, hd]
        N = qkv.shape[0]
        q, k, v = qkv.view(N, self.H, 3 * self.hd).transpose(0, 1)[None].chunk(3, dim=-1)  # 3 x [1, H, N, hd]
        cos, sin = self.cos[pos], self.sin[pos]  # [N, rot]
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        self.kv.store(li, base + pos, k[0], v[0])
        return q[0].transpose(0, 1)  # [N, H, hd]

    def _packed_attention(self, starts: list[int], lens: list[int], varlen: bool):
        """attend(q [N, H, hd], k [Nk, H, hd], v [Nk, H, hd]) -> [N, H, hd] for packed chunks: chunk i's lens[i]
        queries sit at positions starts[i].. of their sequence, and its starts[i] + lens[i] keys follow the
        previous chunk's; each query sees its sequence's keys up to its own position (causal, aligned to the
        last key). varlen: in one torch.nn.attention.varlen call, else SDPA chunk by chunk."""
        klens = [s + n for s, n in zip(starts, lens)]
        if varlen:
            cu_q, cu_k = (torch.tensor([0, *itertools.accumulate(n)], dtype=torch.int32, device=self.device)
                          for n in (lens, klens))
            return lambda q, k, v: _varlen_attn(q, k, v, cu_q, cu_k, max(lens), max(klens), **_VARLEN_KW)
        qe, ke = list(itertools.accumulate(lens)), list(itertools.accumulate(klens))

        def per_chunk(q, k, v):
            out = torch.empty_like(q)  # [N, H, hd]
            for s, n, e, f in zip(starts, lens, qe, ke):
                qi, ki, vi = (t.transpose(0, 1)[None] for t in (q[e - n : e], k[f - s - n : f], v[f - s - n : f]))
                # A chunk after cached positions attends to all of them plus the causal part of itself.
                mask = None if s == 0 else (
                    torch.arange(s + n, device=q.device)[None, :] <= torch.arange(s, s + n, device=q.device)[:, None])
                out[e - n : e] = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, is_causal=s == 0)[0].transpose(0, 1)
            return out

        return per_chunk

    def prefill_new(self, bases: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """Whole prompts of new sequences (cache ranges starting at `bases`): prefill() from position 0."""
        return self.prefill([(b, p, 0) for b, p in zip(bases, prompts)])

    def _decode_eager(self, B: int, T: int) -> torch.Tensor:
        """One token for each of batch rows 0..B-1 (the static inputs' tokens [B] at their positions [B] of ranges
        starting at their bases [B]), attending to its cache positions < T: logits [B, V]."""
        tok, pos, base = self._tok[:B], self._pos[:B], self._base[:B]
        x = self.embed(tok).to(self.dtype)  # [B, D]
        if self.fused:
            def attention(li, qkv):
                # attention over the cache up to each row's position (< T) in one kernel
                kc, vc, ks, vs = self.kv.kernel_args(li)
                q = self._store(li, qkv, base, pos)[:, :, None]  # [B, H, 1, hd]
                return fused.decode_attention(q, kc, vc, base, pos, T, kscale=ks, vscale=vs)[:, :, 0]  # [B, H, hd]
        else:
            keys, mask = self._decode_tables(base, pos, T, self.kv.positions)

            def attention(li, qkv):
                q = self._store(li, qkv, base, pos)[:, :, None]  # [B, H, 1, hd]
                K, V = self.kv.gather(li, keys)  # [H, B, T, hd]
                return F.scaled_dot_product_attention(q, K.transpose(0, 1), V.transpose(0, 1),
                                                      attn_mask=mask)[:, :, 0]  # [B, H, hd]

        for li in range(len(self.layers)):
            x = self._layer(li, x, attention)
        logits = self._logits(x)  # [B, V]
        # Leave the greedy choice and the next position as the next step's inputs (see decode_again);
        # the clamp keeps idle padding rows, which advance too, inside the cache. Rows under min_new_tokens
        # choose without end-of-text; the logits returned stay the model's own.
        ids = logits[:, : self.choosable]  # [B, choosable]: never a padding row
        if self.eos_id is not None:
            eos = logits[:, self.eos_id].clone()  # [B]
            logits[:, self.eos_id] = torch.where(self._no_eos[:B], float("-inf"), eos)
            self._tok[:B] = ids.argmax(-1)
            logits[:, self.eos_id] = eos
        else:
            self._tok[:B] = ids.argmax(-1)
        self._pos[:B] = (pos + 1).clamp(max=self.max_len - 1)
        return logits

    def _decode_tables(self, base: torch.Tensor, pos: torch.Tensor, T: int, pool: int):
        """For one token per row at positions pos [B] of cache ranges starting at base [B] in a pool of `pool`
        positions, over T positions: the pool index of each row's keys [B, T] (past a range's end they point at
        whatever follows, masked), and the attention mask [B, 1, 1, T] (keys up to the row's own position)."""
        t = torch.arange(T, device=self.device)
        keys = (base[:, None] + t[None, :]).clamp(max=pool - 1)  # [B, T]
        mask = (t[None, :] <= pos[:, None])[:, None, None]
        return keys, mask

    def fused_problem(self, tol: float = 1e-2) -> str | None:
        """Why the fused decode kernels must not be used here (no Triton, no compiler, results unlike the torch
        code), or None: run once at start on random inputs against the torch code they replace."""
        if fused.triton is None:
            return "Triton is not installed"
        try:
            g = torch.Generator(device="cpu").manual_seed(0)
            B, L, D = 2, 64, self.H * self.hd
            pos = torch.tensor([3, 60], device=self.device)
            base = torch.tensor([L, 0], device=self.device)  # row 0's range after row 1's: not in row order
            qkv = torch.randn(B, 3 * D, generator=g).to(self.device, self.dtype)  # [B, 3D]
            cache = KVCache(1, self.H, B * L, self.hd, self.dtype, self.device, self.kv.kind)
            kc, vc, ks, vs = cache.kernel_args(0)
            q = fused.rope_store(qkv, self.cos, self.sin, base, pos, kc, vc, self.H, self.hd, self.rot, ks, vs)
            rq, rk, rv = qkv.view(B, 1, self.H, 3 * self.hd).transpose(1, 2).chunk(3, dim=-1)  # 3 x [B, H, 1, hd]
            keys, mask = self._decode_tables(base, pos, L, B * L)
            cos, sin = self.cos[pos][:, None, None], self.sin[pos][:, None, None]  # [B, 1, 1, rot]
            pairs = [(q, self._rope(rq, cos, sin))]
            stored_k, stored_v = cache.gather(0, base + pos)  # [H, B, hd] each
            for got, want, sc in ((stored_k, self._rope(rk, cos, sin)[:, :, 0], ks), (stored_v, rv[:, :, 0], vs)):
                want = want.transpose(0, 1)  # [H, B, hd]
                if cache.int8:  # rounding to int8 is off by at most half a step of the vector's scale
                    slack = sc[:, base + pos][..., None] / 2  # [H, B, 1]
                    want = want.float() + ((got.float() - want.float()).clamp(-slack, slack))
                pairs.append((got, want))
            layer = self.layers[0]
            x = torch.randn(B, D, generator=g).to(self.device, self.dtype)
            pairs += zip(fused.dual_layernorm(x, layer.input_layernorm, layer.post_attention_layernorm),
                         (layer.input_layernorm(x), layer.post_attention_layernorm(x)))
            every = torch.arange(B * L, device=self.device)
            cache.store(0, every, *(torch.randn((self.H, B * L, self.hd), generator=g).to(self.device, self.dtype)
                                    for _ in range(2)))
            K, V = cache.gather(0, keys)  # [H, B, L, hd] each: what the cache holds, dequantized
            # [B, H, 1, hd]; over an int8 cache the tensor-core kernel rounds the query to int8 too
            ref = {dot: F.scaled_dot_product_attention(fused.int8_rounded_query(q) if dot and cache.int8 else q,
                                                       K.transpose(0, 1), V.transpose(0, 1), attn_mask=mask)
                   for dot in (False, True)}
            # One program per row and head, and the keys split over two of 32 (the second row spans both).
            pairs += [(fused.decode_attention(q, kc, vc, base, pos, L, splits=n, block_t=b, kscale=ks, vscale=vs,
                                              dot=dot), ref[dot]) for n, b in ((1, 64), (2, 32)) for dot in (False, True)]
            # NaN counts as infinitely wrong (Python's max would let it through).
            err = max((a.float() - b.float()).abs().max().nan_to_num(float("inf")).item() for a, b in pairs)
            if not err <= tol:
                return f"fused kernels differ from the torch code by {err:.2e}"
        except Exception as e:  # noqa: BLE001 - e.g. Triton cannot compile on this host
            return f"{type(e).__name__}: {e}"
        return None

    def varlen_problem(self, tol: float = 1e-2) -> str | None:
        """Why prefill must not attend through torch's variable-length flash attention (absent, failing, or
        unlike the chunk-by-chunk SDPA it replaces: a whole prompt and a chunk after cached positions, whose
        causal mask must align to its last key), or None."""
        if _varlen_attn is None:
            return "torch has no torch.nn.attention.varlen"
        if "num_splits" not in _VARLEN_KW:
            return "this torch's varlen_attn cannot fix its key splits (num_splits), so its results would depend on the batch"
        if self.dtype not in (torch.float16, torch.bfloat16):
            return f"flash attention does not run in {self.dtype}"
        try:
            g = torch.Generator(device="cpu").manual_seed(0)
            starts, lens = [0, 7], [5, 4]
            q = torch.randn(sum(lens), self.H, self.hd, generator=g).to(self.device, self.dtype)  # [N, H, hd]
            k, v = (torch.randn(sum(lens) + sum(starts), self.H, self.hd, generator=g).to(self.device, self.dtype)
                    for _ in range(2))  # [Nk, H, hd]
            want = self._packed_attention(starts, lens, varlen=False)(q, k, v)
            got = self._packed_attention(starts, lens, varlen=True)(q, k, v)
            err = (got.float() - want.float()).abs().max().nan_to_num(float("inf")).item()
            if not err <= tol:
                return f"varlen attention differs from SDPA by {err:.2e}"
        except Exception as e:  # noqa: BLE001 - e.g. no flash kernel for this GPU or head size
            return f"{type(e).__name__}: {e}"
        return None

    def _batch(self, n: int) -> int:
        return next(b for b in self.batch_buckets if b >= n) if self.use_graphs else n

    @torch.inference_mode()
    def decode(self, tokens: list[int], positions: list[int], bases: list[int]) -> torch.Tensor:
        """Next-token logits [n, V] (float32) for n sequences in batch rows 0..n-1, fed `tokens` at `positions`
        of their cache ranges, which start at `bases`."""
        n, B = len(tokens), self._batch(len(tokens))
        self._tok[:n] = torch.tensor(tokens)
        self._pos[:n] = torch.tensor(positions)
        self._base[:n] = torch.tensor(bases)
        if B > n:  # padding rows of the graph's bucket: their own scratch range
            self._tok[n:B] = 0
            self._pos[n:B] = 0
            self._base[n:B] = self._scratch
        return self._step(n, max(positions))

    @torch.inference_mode()
    def decode_again(self, n: int, max_position: int) -> torch.Tensor:
        """The step after a decode() or decode_again() of the same n sequences, each fed the argmax token that
        step chose, at the next position, without the host reading it first (so the host's work on one
        token overlaps the GPU's next step). max_position: the largest position fed now. Logits [n, V]."""
        return self._step(n, max_position)

    def feed(self, tokens: torch.Tensor) -> None:
        """The next step's input tokens [n] for rows 0..n-1, chosen on the device (sampling) in place of the
        argmax the last step left there."""
        self._tok[: tokens.numel()] = tokens

    def forbid_eos(self, rows: list[bool]) -> None:
        """Which of the n running rows' next greedy choice (left by the GPU for decode_again) must not be
        end-of-text (min_new_tokens). Copied to the GPU only when it changes."""
        if rows != self._no_eos_host:
            self._no_eos[: len(rows)] = torch.tensor(rows)
            self._no_eos_host = list(rows)

    def next_tokens(self, n: int) -> "HostFetch":
        """The argmax tokens [n] the last step left for the next one, copied to the host without blocking (wait()
        gives [tokens]). Two pinned buffers in turn: a fetch is always waited on before the one after next is made."""
        pinned = None
        if self._tok.is_cuda:
            self._fetch_bufs.reverse()
            pinned = [self._fetch_bufs[0][:n]]
        return HostFetch([self._tok[:n]], pinned)

    def next_logprobs(self, logits: torch.Tensor, n: int, k: int) -> "HostFetch":
        """Log-probabilities under logits [n, V] of the tokens the last step left for the next one (the argmax, or
        what feed() put there), and of the k most likely (engine/sampling.py's logprobs), copied to the host
        without blocking, like next_tokens (two pinned buffer sets in turn): wait() gives [logprobs [n], top
        values [n][k], top ids [n][k]]."""
        lp, top_v, top_i = logprobs(logits[:n], self._tok[:n], k)
        pinned = None
        if self._tok.is_cuda:
            m = self.max_slots * (1 + max(k, 20))
            if not self._logprob_bufs or self._logprob_bufs[0][0].numel() < m:  # made at first use, grown for a larger k
                self._logprob_bufs = [(torch.empty(m, pin_memory=True), torch.empty(m, dtype=torch.long, pin_memory=True))
                                      for _ in range(2)]
            self._logprob_bufs.reverse()
            values, ids = self._logprob_bufs[0]  # flat: logprobs in [0, n), the top values after them
            pinned = [values[:n], values[n : n + n * k].view(n, k), ids[: n * k].view(n, k)]
        return HostFetch([lp, top_v, top_i], pinned)

    def _step(self, n: int, max_position: int) -> torch.Tensor:
        B = self._batch(n)
        T = next(t for t in self.len_buckets if t > max_position)
        graph = self._graphs.get((B, T))
        if graph is None:
            # Every bucket is captured by warm_up(): capturing here, while serving, would race other threads'
            # GPU work and needs warm-up steps. Without graphs (CPU, or graphs off) the step runs eagerly.
            if self.use_graphs:
                raise RuntimeError(f"no CUDA graph for batch {B} x {T} positions (warm_up() captures them all)")
            return self._decode_eager(B, T)
        g, out = graph
        g.replay()
        return out[:n]

    def _on_scratch(self, B: int, fn):
        """Run fn() with batch rows 0..B-1 fed token 0 at position 0 of the scratch window after the pool, then
        put every step input back: warm-up steps write K/V and advance the inputs like real ones, so they must
        never see a live row's range or leave the next real step fed their tokens and positions."""
        saved = [t.clone() for t in (self._tok, self._pos, self._base, self._no_eos)]
        try:
            self._tok[:B] = 0
            self._pos[:B] = 0
            self._base[:B] = self._scratch
            self._no_eos[:B] = False
            return fn()
        finally:
            for t, v in zip((self._tok, self._pos, self._base, self._no_eos), saved):
                t.copy_(v)

    def _warm(self, B: int, T: int, times: int = 2) -> None:
        """Eager decode steps on the scratch window (lazy inits, Triton autotuning, allocator) before a capture."""
        def steps():
            for _ in range(times):
                self._decode_eager(B, T)

        self._on_scratch(B, steps)

    def _capture(self, B: int, T: int):
        """The decode step of rows 0..B-1 over T positions as a CUDA graph; reads and writes only scratch while
        capturing. "thread_local" capture mode: CUDA calls of other threads meanwhile do not invalidate the capture
        (warm_up runs before the replica serves, and no other thread uses the GPU, but a stray one must not
        turn into a failed capture)."""
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            self._warm(B, T)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()

        def capture():
            with torch.cuda.graph(g, pool=self._pool, capture_error_mode="thread_local"):
                return self._decode_eager(B, T)

        out = self._on_scratch(B, capture)
        torch.cuda.synchronize()
        return g, out

    @torch.inference_mode()
    def warm_up(self, max_batch: int, max_position: int | None = None) -> None:
        """Capture the decode graph of every (batch bucket, length bucket) before the replica reports ready, so
        that no graph is ever captured while serving (max_position: only the length buckets up to the one that
        holds it, for profiles)."""
        if self.use_graphs:
            top = self.max_len if max_position is None else next(t for t in self.len_buckets if t > max_position)
            for T in [t for t in self.len_buckets if t <= top]:
                for B in self.batch_buckets:
                    if B <= max_batch:
                        self._graphs[(B, T)] = self._capture(B, T)

    def graph_buckets(self) -> list[tuple[int, int]]:
        """The (batch rows, key positions) buckets captured as CUDA graphs."""
        return sorted(self._graphs)


class HostFetch:
    """Device-to-host copies in flight of a few small tensors, each into its pinned view (pinned None: read at once,
    as on the CPU): wait() returns them as lists once the GPU has produced them."""

    def __init__(self, tensors: list[torch.Tensor], pinned: list[torch.Tensor] | None):
        if pinned is None:
            self._ready = [t.tolist() for t in tensors]
            return
        self._ready = None
        self._bufs = pinned
        for buf, t in zip(pinned, tensors):
            buf.copy_(t, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()

    def wait(self) -> list[list]:
        if self._ready is None:
            self._event.synchronize()
            self._ready = [b.tolist() for b in self._bufs]
        return self._ready
