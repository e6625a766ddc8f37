"""Autoregressive generation of one sequence, one model step per call: prefill, then decode token by token."""
from __future__ import annotations

import dataclasses

import torch

from .sampling import SamplingParams, new_generator, select
from .text import IncrementalDecoder

FINISH_LENGTH, FINISH_EOS, FINISH_STOP = "length", "eos", "stop"


@dataclasses.dataclass
class GenerationParams:
    """Normalized generation parameters (defaults applied, limits checked by the caller)."""

    max_new_tokens: int = 64
    min_new_tokens: int = 0
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0


@dataclasses.dataclass
class Chunk:
    """What one decode step produced for the client."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]
    finish_reason: str | None
    generated_tokens: int


class StopMatcher:
    """Finds stop sequences in streamed text, holding back any tail that could still become one,
    so that a client never receives text that a later stop match would have cut."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.pending = ""

    def feed(self, piece: str, active: bool = True) -> tuple[str, bool]:
        """Add text; return (text safe to release, whether a stop sequence matched)."""
        self.pending += piece
        if not active or not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:k]):
                    hold = k
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Sequence:
    """State of one generation: KV cache, logits of the next position, decoded text so far."""

    def __init__(self, prompt_ids: list[int], params: GenerationParams, tokenizer, device: torch.device):
        self.prompt_ids = prompt_ids
        self.params = params
        self.generator, self.seed = new_generator(params.sampling.seed, device)
        self.decoder = IncrementalDecoder(tokenizer, prompt_ids)
        self.stops = StopMatcher(params.stop)
        self.seen = torch.tensor(prompt_ids, dtype=torch.long, device=device)  # [S] for repetition penalty
        self.generated: list[int] = []
        self.cache = None
        self.next_logits: torch.Tensor | None = None  # [V] float32
        self.finish_reason: str | None = None


class Generator:
    """Runs sequences on a causal LM. Call order: start() once, then advance() until the returned
    chunk has a finish_reason. Every call does one forward pass at most; call from one thread."""

    def __init__(self, model: torch.nn.Module, tokenizer, device: torch.device, eos_id: int):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.eos_id = eos_id

    @torch.inference_mode()
    def _forward(self, seq: Sequence, ids: list[int]) -> None:
        out = self.model(
            input_ids=torch.tensor([ids], device=self.device),  # [1, T]
            past_key_values=seq.cache,
            use_cache=True,
        )
        seq.cache = out.past_key_values
        seq.next_logits = out.logits[0, -1].float()  # [V]

    def start(self, prompt_ids: list[int], params: GenerationParams) -> Sequence:
        """Prefill: run the prompt through the model."""
        seq = Sequence(prompt_ids, params, self.tokenizer, self.device)
        self._forward(seq, prompt_ids)
        return seq

    @torch.inference_mode()
    def advance(self, seq: Sequence) -> Chunk:
        """Choose the next token, turn it into text, and (unless finished) run it through the model."""
        p = seq.params
        logits = seq.next_logits
        n = len(seq.generated)
        if n < p.min_new_tokens:
            logits = logits.clone()
            logits[self.eos_id] = float("-inf")
        tok = select(logits, p.sampling, seq.generator, seq.seen)
        seq.generated.append(tok)
        seq.seen = torch.cat([seq.seen, torch.tensor([tok], device=seq.seen.device)])
        n += 1

        lps, top_i, top_v = [], [], []
        if p.logprobs:
            logp = torch.log_softmax(seq.next_logits, -1)  # [V] model distribution, before processors
            lps = [float(logp[tok])]
            if p.top_logprobs:
                v, i = torch.topk(logp, p.top_logprobs)
                top_i, top_v = [i.tolist()], [v.tolist()]

        finish = None
        if tok == self.eos_id and not p.ignore_eos:
            finish = FINISH_EOS
            piece = ""
        else:
            piece = seq.decoder.push(tok)
        if finish is None and n >= p.max_new_tokens:
            finish = FINISH_LENGTH
        if finish is not None:
            piece += seq.decoder.flush()
        text, stopped = seq.stops.feed(piece, active=n >= p.min_new_tokens)
        if stopped:
            finish = FINISH_STOP
        elif finish is not None:
            text += seq.stops.flush()
        seq.finish_reason = finish
        if finish is None:
            self._forward(seq, [tok])
        else:
            seq.cache = None  # free the KV cache now, not when the caller drops the sequence
        return Chunk(text, [tok], lps, top_i, top_v, finish, n)
