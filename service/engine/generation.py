"""Per-request generation state and the token-by-token rules: choosing a token, detokenizing it, stopping."""
from __future__ import annotations

import dataclasses

from .sampling import SamplingParams, seed_of
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
    skip_special_tokens: bool = False
    """Leave special tokens (masks, separators, end-of-text under ignore_eos) out of the text."""


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


def merge(chunks: list[Chunk]) -> Chunk:
    """Consecutive chunks of one sequence as one (a stream whose reader fell behind the engine)."""
    if len(chunks) == 1:
        return chunks[0]
    return Chunk("".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids],
                 [x for c in chunks for x in c.logprobs], [x for c in chunks for x in c.top_ids],
                 [x for c in chunks for x in c.top_logprobs], chunks[-1].finish_reason, chunks[-1].generated_tokens)


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
    """One generation request: prompt, parameters, RNG, decoded text so far, and its place in the batch."""

    def __init__(self, prompt_ids: list[int], params: GenerationParams, tokenizer):
        self.prompt_ids = prompt_ids
        self.params = params
        self.seed = seed_of(params.sampling.seed)
        self.decoder = IncrementalDecoder(tokenizer, prompt_ids, params.skip_special_tokens)
        self.stops = StopMatcher(params.stop)
        self.generated: list[int] = []
        self.finish_reason: str | None = None
        self.prefilled = 0  # prompt tokens already in the KV cache
        self.slot = -1  # batch row while running
        self.kv_base = -1  # where its range of the KV cache starts while running
        self.kv_size = len(prompt_ids) + params.max_new_tokens  # positions it can ever fill
        self.cancelled = False
        self.queued_at = 0.0  # time.monotonic() when it joined the waiting queue
        self.queue_deadline: float | None = None  # time.monotonic() by which it must have a batch row
        self.admitted_at: float | None = None  # when it got one
        self.sink = None  # where the scheduler's caller delivers this sequence's chunks (an asyncio.Queue)
        self.loop = None  # the event loop that sink belongs to

    @property
    def length(self) -> int:
        """Tokens in the KV cache once the last generated token has been fed."""
        return len(self.prompt_ids) + len(self.generated)

    def needs_eos_mask(self, ahead: int = 0) -> bool:
        """Whether the token `ahead` tokens after those accepted may not be end-of-text (min_new_tokens)."""
        return len(self.generated) + ahead < self.params.min_new_tokens

    @property
    def simple_greedy(self) -> bool:
        """Its next token is the plain argmax of the logits (no sampling, no penalty)."""
        return self.params.sampling.greedy and self.params.sampling.repetition_penalty == 1.0


def accept(seq: Sequence, tok: int, eos_id: int, logprob: float | None = None, top_ids: list[int] | None = None,
           top_logprobs: list[float] | None = None) -> Chunk:
    """Append a chosen token: log-probabilities, text (UTF-8 safe), stop sequences, finish reason.
    logprob, top_ids, top_logprobs: the token's and the best alternatives' log-probabilities under the model's
    distribution at this step, when the request asked for them."""
    p = seq.params
    seq.generated.append(tok)
    n = len(seq.generated)
    lps, top_i, top_v = [], [], []
    if logprob is not None:
        lps = [logprob]
        if p.top_logprobs:
            top_i, top_v = [top_ids[: p.top_logprobs]], [top_logprobs[: p.top_logprobs]]

    finish = None
    if tok == eos_id and not p.ignore_eos:
        finish, piece = FINISH_EOS, ""
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
    return Chunk(text, [tok], lps, top_i, top_v, finish, n)
