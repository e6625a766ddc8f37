"""Token selection for a batch of sequences, each with its own sampling parameters and seed."""
from __future__ import annotations

import dataclasses
import random

import torch


@dataclasses.dataclass
class SamplingParams:
    """Normalized sampling parameters of one request (defaults already applied)."""

    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def new_generator(seed: int | None, device: torch.device) -> tuple[torch.Generator, int]:
    """A per-request RNG: the same seed gives the same samples whatever else shares the batch."""
    if seed is None:
        seed = random.SystemRandom().randrange(2**63)
    # CPU generator: CUDA generators cannot be created for every device build, and the noise
    # tensor is tiny ([V]) next to the forward pass.
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g, seed


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty (as transformers): divide positive, multiply negative logits of seen tokens.
    logits [V] float32, seen [S] token ids."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits[seen]
    logits = logits.clone()
    logits[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def _filter(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p and typical-p on one row of logits [V] (float32)."""
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


def select(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator, seen: torch.Tensor
) -> int:
    """Pick the next token of one sequence. logits [V] float32 (raw model output), seen [S] ids."""
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(_filter(logits, params), -1).cpu()  # [V]
    # Exponential-race sampling: argmax(p / E) with E ~ Exp(1) draws from p, and needs only this
    # request's generator (torch.multinomial cannot take one generator per batch row).
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return int(torch.argmax(probs / noise))
