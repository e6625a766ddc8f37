"""The KV cache's storage: every layer's keys and values over one pool of token positions, in the model's dtype or int8.

Why int8: it halves the cache's memory, so the same GPU holds twice the token positions (more long sequences at
once, or a smaller GPU). It does not make a step faster on an H200: a decode step of 64 real-traffic rows reads
~20 GB of keys and values, but the int8 attention kernel is bound by its arithmetic, not those bytes (172.6 us per
layer against 158 for float16 on tensor cores; bench --attention-sweep). Each (head, position) vector of keys or
values gets its own float32 scale (absolute maximum / 127, rounded to nearest): the error is at most half a step
of that vector's own range, whatever the other heads or tokens hold (GPU suite: logits within 3.4e-3 of the
float16 cache's, the same greedy choices). Writes go through store() (the torch prefill and decode paths) or, on the
GPU, fused.rope_store (prefill and decode alike), which quantizes the same way; reads through gather() or the fused
attention kernel.
"""
from __future__ import annotations

import torch

DTYPES = ("auto", "int8")
"""GenerationConfig.kv_cache_dtype: "auto" keeps the model's compute dtype."""


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, float32 scales) of x [..., hd] with one scale per vector along the last dim."""
    xf = x.float()
    scale = xf.abs().amax(-1).clamp(min=1e-8) / 127.0  # [...]
    return torch.floor(xf / scale[..., None] + 0.5).clamp(-127, 127).to(torch.int8), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Values [..., hd] in `dtype` of int8 q [..., hd] with scales [...]."""
    return (q.float() * scale[..., None]).to(dtype)


class KVCache:
    """Per layer: keys and values [H, P, hd] (P pool positions), and with int8 their scales [H, P] (float32)."""

    def __init__(self, layers: int, heads: int, positions: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, kind: str = "auto"):
        if kind not in DTYPES:
            raise ValueError(f'generation.kv_cache_dtype must be one of {", ".join(DTYPES)}, not {kind!r}')
        self.kind = kind
        self.int8 = kind == "int8"
        self.dtype = dtype  # what gather() returns: the activations' dtype
        store = torch.int8 if self.int8 else dtype
        shape = (heads, positions, head_dim)
        self.k = [torch.zeros(shape, dtype=store, device=device) for _ in range(layers)]  # L x [H, P, hd]
        self.v = [torch.zeros(shape, dtype=store, device=device) for _ in range(layers)]
        # Scale 1 where nothing was written: a zero vector, as in the other dtype.
        self.ks = [torch.ones(shape[:2], dtype=torch.float32, device=device) for _ in range(layers)] if self.int8 else None
        self.vs = [torch.ones(shape[:2], dtype=torch.float32, device=device) for _ in range(layers)] if self.int8 else None

    @staticmethod
    def bytes_per_token(layers: int, hidden: int, heads: int, dtype: torch.dtype, kind: str = "auto") -> int:
        """Memory one pool position takes over all layers (keys and values, and their scales with int8)."""
        if kind == "int8":
            return 2 * layers * (hidden + 4 * heads)
        return 2 * layers * hidden * torch.tensor([], dtype=dtype).element_size()

    @property
    def positions(self) -> int:
        return self.k[0].shape[1]

    def store(self, li: int, at: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Layer li's keys and values k, v [H, N, hd] of N tokens at pool positions at [N]."""
        if self.int8:
            self.k[li][:, at], self.ks[li][:, at] = quantize(k)
            self.v[li][:, at], self.vs[li][:, at] = quantize(v)
        else:
            self.k[li][:, at] = k
            self.v[li][:, at] = v

    def gather(self, li: int, index: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer li's keys and values [H, *index.shape, hd] (or [H, slice, hd]) at pool positions `index`."""
        k, v = self.k[li][:, index], self.v[li][:, index]
        if not self.int8:
            return k, v
        return (dequantize(k, self.ks[li][:, index], self.dtype), dequantize(v, self.vs[li][:, index], self.dtype))

    def kernel_args(self, li: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(keys, values, key scales, value scales) of layer li for engine/fused.py (scales None unless int8)."""
        return self.k[li], self.v[li], self.ks[li] if self.int8 else None, self.vs[li] if self.int8 else None
