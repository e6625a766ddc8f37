"""Engine results -> protobuf response messages."""
from __future__ import annotations

from ..engine.generation import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, Chunk
from ..engine.scoring import PairResult
from .pb import lm_pb2

_FINISH = {
    None: lm_pb2.FINISH_REASON_UNSPECIFIED,
    FINISH_LENGTH: lm_pb2.FINISH_REASON_LENGTH,
    FINISH_EOS: lm_pb2.FINISH_REASON_EOS,
    FINISH_STOP: lm_pb2.FINISH_REASON_STOP_SEQUENCE,
}


def token_details(ids, logprobs, top_ids, top_logprobs, texts) -> lm_pb2.TokenDetails:
    """`texts(ids) -> strings`: every token text of the message is decoded in one call (one Rust call, not one per
    entry: a Score with 20 alternatives has 21 entries per position)."""
    flat = [i for row in top_ids for i in row]
    names = texts(list(ids) + flat)
    d = lm_pb2.TokenDetails(ids=ids, logprobs=logprobs, texts=names[: len(ids)])
    it = iter(names[len(ids):])
    for row_i, row_v in zip(top_ids, top_logprobs):
        d.top.extend(lm_pb2.TopToken(id=i, text=next(it), logprob=v) for i, v in zip(row_i, row_v))
    return d


class GenerateAccumulator:
    """Merges per-token chunks into stream messages or one unary response."""

    def __init__(self, prompt_tokens: int, want_details: bool, token_texts):
        self.prompt_tokens = prompt_tokens
        self.want_details = want_details
        self.token_texts = token_texts
        self.text: list[str] = []
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.top_ids: list[list[int]] = []
        self.top_lps: list[list[float]] = []
        self.finish = None
        self.generated = 0
        self.seed = 0

    def add(self, chunk: Chunk, seed: int) -> None:
        self.text.append(chunk.text)
        self.ids += chunk.token_ids
        self.logprobs += chunk.logprobs
        self.top_ids += chunk.top_ids
        self.top_lps += chunk.top_logprobs
        self.finish = chunk.finish_reason
        self.generated = chunk.generated_tokens
        self.seed = seed

    def response(self) -> lm_pb2.GenerateResponse:
        r = lm_pb2.GenerateResponse(
            text="".join(self.text),
            finish_reason=_FINISH[self.finish],
            prompt_tokens=self.prompt_tokens,
            generated_tokens=self.generated,
            seed=self.seed,
            token_ids=self.ids,
        )
        if self.want_details:
            r.details.CopyFrom(token_details(self.ids, self.logprobs, self.top_ids, self.top_lps, self.token_texts))
        return r

    def take(self) -> lm_pb2.GenerateResponse:
        """The response for what was added since the last take (streaming)."""
        r = self.response()
        self.text, self.ids, self.logprobs, self.top_ids, self.top_lps = [], [], [], [], []
        return r


def choice_length(continuation: str, delimiter: str = " ") -> int:
    """Characters of a choice's own text: lm-eval's acc_norm divides by len(choice), and the continuation it scores
    is target_delimiter + choice."""
    return len(continuation) - (len(delimiter) if delimiter and continuation.startswith(delimiter) else 0)


def score_response(pairs: list[tuple[str, str]], results: list[PairResult], token_texts,
                   delimiter: str = " ") -> lm_pb2.ScoreResponse:
    out = lm_pb2.ScoreResponse()
    for (ctx, cont), r in zip(pairs, results):
        # Normalizers count the continuation as scored: with the context's trailing whitespace.
        scored = ctx[len(ctx.rstrip()) :] + cont if ctx else cont
        s = out.scores.add(
            logprob=r.logprob,
            is_greedy=r.is_greedy,
            num_tokens=r.num_tokens,
            num_chars=len(scored),
            num_bytes=len(scored.encode("utf-8")),
            truncated_tokens=r.truncated_tokens,
            batch_pairs=r.batch_pairs,
        )
        if r.details is not None:
            d = r.details
            s.details.CopyFrom(token_details(d.ids, d.logprobs, d.top_ids, d.top_logprobs, token_texts))
    if len(pairs) > 1 and len({ctx for ctx, _ in pairs}) == 1:
        # lm-eval's multiple-choice metrics: acc takes the raw argmax (first on ties, as numpy's); acc_norm divides
        # by the length in characters of the choice text, without the delimiter in front of it.
        norm = [r.logprob / max(1, choice_length(c, delimiter)) for (_, c), r in zip(pairs, results)]
        out.choice = max(range(len(results)), key=lambda i: results[i].logprob)
        out.choice_normalized = max(range(len(results)), key=norm.__getitem__)
    return out
