"""Token selection for a batch of sequences on the model's device, each row with its own sampling parameters and seed.

One call chooses every row's token: repetition penalty, end-of-text mask (min_new_tokens), temperature, top-k,
typical-p and top-p as tensor operations over the batch, then greedy rows take the argmax and sampled rows the
Gumbel-max choice, argmax(z - log(-log u)), which draws from softmax(z). The uniform u of a row comes from a
counter-based hash of (the request's seed, how many tokens it has generated, the token id): no RNG state, so a
request's samples depend only on its seed and its own logits, never on what shares its batch or in which order
rows sit; and the whole choice runs on the device, with no copy of the vocabulary to the host.
"""
from __future__ import annotations

import dataclasses
import random

import torch


MIN_TEMPERATURE = 1e-3
"""Temperatures below this are greedy: dividing logits by a tinier one overflows float32 (1e-40 made every positive
logit +inf, so the "choice" was the first of them, not the best), and at 1e-3 a logit ahead by 0.02 already wins with
odds of e^20."""


@dataclasses.dataclass
class SamplingParams:
    """Normalized sampling parameters of one request (defaults already applied)."""

    temperature: float = 0.0  # below MIN_TEMPERATURE (0 included): greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


def seed_of(seed: int | None) -> int:
    """The request's seed, or a fresh random one (returned to the client, so any sample can be reproduced)."""
    return random.SystemRandom().randrange(2**63) if seed is None else int(seed)


@dataclasses.dataclass
class RowSampling:
    """Sampling parameters of n batch rows as device tensors, one entry per row, plus which filters any row uses
    (so a batch that needs none skips them)."""

    temperature: torch.Tensor  # [n] float32, 0 = greedy
    top_k: torch.Tensor  # [n] int64, 0 = off
    top_p: torch.Tensor  # [n] float32
    typical_p: torch.Tensor  # [n] float32
    penalty: torch.Tensor  # [n] float32
    seed_lo: torch.Tensor  # [n] int64: the seed's low and high 32 bits
    seed_hi: torch.Tensor  # [n] int64
    step: torch.Tensor  # [n] int64: tokens the row's request has generated before this one
    no_eos: torch.Tensor  # [n] bool: end-of-text not allowed yet (min_new_tokens)
    sampled: bool
    uses: frozenset  # of "top_k", "top_p", "typical_p", "penalty", "no_eos"

    @classmethod
    def of(cls, params: list[SamplingParams], seeds: list[int], steps: list[int], no_eos: list[bool],
           device: torch.device) -> "RowSampling":
        def t(xs, dtype):
            return torch.tensor(xs, dtype=dtype).to(device, non_blocking=True)

        uses = {name for name, on in (
            ("top_k", any(p.top_k > 0 and not p.greedy for p in params)),
            ("top_p", any(p.top_p < 1.0 and not p.greedy for p in params)),
            ("typical_p", any(p.typical_p < 1.0 and not p.greedy for p in params)),
            ("penalty", any(p.repetition_penalty != 1.0 for p in params)),
            ("no_eos", any(no_eos))) if on}
        return cls(
            temperature=t([0.0 if p.greedy else p.temperature for p in params], torch.float32),
            top_k=t([p.top_k for p in params], torch.long),
            top_p=t([p.top_p for p in params], torch.float32),
            typical_p=t([p.typical_p for p in params], torch.float32),
            penalty=t([p.repetition_penalty for p in params], torch.float32),
            seed_lo=t([s & 0xFFFFFFFF for s in seeds], torch.long),
            seed_hi=t([(s >> 32) & 0xFFFFFFFF for s in seeds], torch.long),
            step=t(steps, torch.long),
            no_eos=t(no_eos, torch.bool),
            sampled=any(not p.greedy for p in params),
            uses=frozenset(uses),
        )


_M32 = 0xFFFFFFFF


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finalizer on int64 tensors holding 32-bit values (products wrap, the low 32 bits are kept)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def uniform(seed_lo: torch.Tensor, seed_hi: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """u [n, V] in (0, 1): a hash of (seed, step, token id), the same on every device for the same inputs."""
    key = _mix32(seed_lo ^ _mix32(seed_hi ^ _mix32((step * 0x9E3779B9) & _M32)))  # [n]
    v = torch.arange(vocab, device=seed_lo.device, dtype=torch.long)  # [V]
    h = _mix32(_mix32(key[:, None] ^ ((v[None, :] * 0x27D4EB2F) & _M32)) ^ key[:, None])  # [n, V]
    return ((h >> 8).to(torch.float32) + 0.5) / 2**24  # 24 bits: exact in float32


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty (as transformers): divide positive, multiply negative logits of seen tokens.
    logits [V] float32, seen [S] token ids. (One row; the batched form is in sample().)"""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits[seen]
    logits = logits.clone()
    logits[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def _filter(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p and typical-p on one row of logits [V] (float32): the reference that the batched
    filters() is tested against."""
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.typical_p < 1.0:
        logp = torch.log_softmax(logits, -1)
        ent = -(logp.exp() * logp).nansum()
        dev = (-logp - ent).abs()  # [V]
        order = torch.argsort(dev)
        cum = logp[order].exp().cumsum(-1)
        keep = int((cum < p.typical_p).sum()) + 1
        mask = torch.ones_like(logits, dtype=torch.bool)
        mask[order[:keep]] = False
        logits = logits.masked_fill(mask, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = cum - torch.softmax(sorted_logits, -1) >= p.top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def filters(z: torch.Tensor, rows: RowSampling) -> torch.Tensor:
    """Temperature, then top-k, typical-p and top-p (in _filter's order), each row with its own values, on logits
    z [n, V] (float32); returns the scaled logits with filtered-out tokens at -inf."""
    inf = float("-inf")
    z = z / torch.where(rows.temperature > 0, rows.temperature, 1.0)[:, None]  # [n, V]
    V = z.shape[-1]
    if "top_k" in rows.uses:
        k = rows.top_k.clamp(1, V)  # [n]
        kth = z.sort(-1, descending=True).values.gather(1, (k - 1)[:, None])  # [n, 1]
        z = z.masked_fill(((rows.top_k > 0) & (rows.top_k < V))[:, None] & (z < kth), inf)
    if "typical_p" in rows.uses:
        logp = torch.log_softmax(z, -1)  # [n, V]
        ent = -(logp.exp() * logp).nansum(-1, keepdim=True)  # [n, 1]
        order = (-logp - ent).abs().argsort(-1)  # [n, V]: most typical first
        cum = logp.gather(1, order).exp().cumsum(-1)
        keep = (cum < rows.typical_p[:, None]).sum(-1, keepdim=True) + 1  # [n, 1]
        drop = torch.arange(V, device=z.device)[None, :] >= keep  # [n, V] in typical order
        drop &= (rows.typical_p < 1.0)[:, None]
        z = z.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), inf)
    if "top_p" in rows.uses:
        sorted_z, order = z.sort(-1, descending=True)  # [n, V]
        probs = torch.softmax(sorted_z, -1)
        drop = (probs.cumsum(-1) - probs >= rows.top_p[:, None]) & (rows.top_p < 1.0)[:, None]
        z = z.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), inf)
    return z


def sample(logits: torch.Tensor, rows: RowSampling, seen: torch.Tensor | None, eos_id: int,
           choosable: int | None = None) -> torch.Tensor:
    """Each row's next token [n] (on the logits' device) from raw logits [n, V] float32 (not modified). seen [n, V]
    bool: the tokens of each row's prompt and output (repetition penalty). choosable: ids that may be chosen (the
    tokenizer's; rows of the output layer past it are padding)."""
    inf = float("-inf")
    z = logits.clone()
    if choosable is not None and choosable < z.shape[-1]:
        z[:, choosable:] = inf
    if "penalty" in rows.uses and seen is not None:
        pen = rows.penalty[:, None]
        z = torch.where(seen, torch.where(z > 0, z / pen, z * pen), z)
    if "no_eos" in rows.uses:
        z[:, eos_id] = torch.where(rows.no_eos, inf, z[:, eos_id])
    greedy = z.argmax(-1)  # [n]
    if not rows.sampled:
        return greedy
    z = filters(z, rows)
    gumbel = -torch.log(-torch.log(uniform(rows.seed_lo, rows.seed_hi, rows.step, z.shape[-1])))  # [n, V]
    return torch.where(rows.temperature > 0, (z + gumbel).argmax(-1), greedy)


def logprobs(logits: torch.Tensor, toks: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities under the model's own distribution (logits [n, V], before penalties and masks) of the
    chosen tokens toks [n] -> [n], and the k most likely tokens' -> values [n, k], ids [n, k]. One function for the
    host path and the pipelined one, so both report the same numbers."""
    logp = torch.log_softmax(logits.float(), -1)  # [n, V]
    lp = logp.gather(1, toks[:, None])[:, 0]  # [n]
    if not k:
        return lp, logp.new_empty(len(toks), 0), toks.new_empty(len(toks), 0)
    top_v, top_i = torch.topk(logp, k, -1)  # [n, k] each
    return lp, top_v, top_i
