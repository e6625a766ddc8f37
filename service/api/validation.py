"""Checks request messages against the server limits and turns them into engine parameters."""
from __future__ import annotations

import math

from ..engine.config import LimitsConfig
from ..engine.engine import ScoreOptions
from ..engine.errors import InvalidRequest
from ..engine.generation import GenerationParams
from ..engine.sampling import SamplingParams


def _check_text(name: str, text: str, limits: LimitsConfig) -> None:
    if len(text) > limits.max_text_chars:
        raise InvalidRequest(f"{name} is {len(text)} characters; the limit is {limits.max_text_chars}")


def request_size(request, limits: LimitsConfig) -> None:
    """Refuse an oversized message before reading any of it (the proxy's own limit is far higher)."""
    size = request.ByteSize()
    if size > limits.max_request_bytes:
        raise InvalidRequest(f"the request is {size} bytes; the limit is {limits.max_request_bytes}")


def _finite(name: str, x: float) -> float:
    if not math.isfinite(x):
        raise InvalidRequest(f"{name} must be a finite number, not {x}")
    return x


def generation_params(p, limits: LimitsConfig) -> GenerationParams:
    """GenerationParameters message -> GenerationParams, defaults applied, every range checked."""
    max_new = p.max_new_tokens or limits.default_new_tokens
    if max_new > limits.max_new_tokens:
        raise InvalidRequest(f"max_new_tokens is {max_new}; the limit is {limits.max_new_tokens}")
    if p.min_new_tokens > max_new:
        raise InvalidRequest(f"min_new_tokens ({p.min_new_tokens}) exceeds max_new_tokens ({max_new})")
    temperature = _finite("temperature", p.temperature)
    if temperature < 0:
        raise InvalidRequest(f"temperature must be >= 0, not {temperature}")
    if p.top_k < 0:
        raise InvalidRequest(f"top_k must be >= 0, not {p.top_k}")
    top_p = _finite("top_p", p.top_p) or 1.0
    if not 0 < top_p <= 1:
        raise InvalidRequest(f"top_p must be in (0, 1], not {p.top_p}")
    typical_p = _finite("typical_p", p.typical_p) or 1.0
    if not 0 < typical_p <= 1:
        raise InvalidRequest(f"typical_p must be in (0, 1], not {p.typical_p}")
    rep = _finite("repetition_penalty", p.repetition_penalty) or 1.0
    if rep < 0:
        raise InvalidRequest(f"repetition_penalty must be > 0, not {p.repetition_penalty}")
    if len(p.stop) > limits.max_stop_sequences:
        raise InvalidRequest(f"{len(p.stop)} stop sequences; the limit is {limits.max_stop_sequences}")
    for s in p.stop:
        if not s:
            raise InvalidRequest("stop sequences must not be empty")
        _check_text("a stop sequence", s, limits)
    if p.top_logprobs > limits.max_top_logprobs:
        raise InvalidRequest(f"top_logprobs is {p.top_logprobs}; the limit is {limits.max_top_logprobs}")
    return GenerationParams(
        max_new_tokens=max_new,
        min_new_tokens=p.min_new_tokens,
        sampling=SamplingParams(
            temperature=temperature,
            top_k=p.top_k,
            top_p=top_p,
            typical_p=typical_p,
            repetition_penalty=rep,
            seed=p.seed if p.HasField("seed") else None,
        ),
        stop=tuple(p.stop),
        ignore_eos=p.ignore_eos,
        logprobs=p.logprobs,
        top_logprobs=p.top_logprobs if p.logprobs else 0,
        skip_special_tokens=p.skip_special_tokens,
    )


def generate_request(req, limits: LimitsConfig) -> tuple[str, list[int], GenerationParams]:
    """GenerateRequest -> (prompt text, prompt ids, params); exactly one of text / token_ids."""
    if req.text and req.token_ids:
        raise InvalidRequest("set either text or token_ids, not both")
    if not req.text and not req.token_ids:
        raise InvalidRequest("the prompt is empty: set text or token_ids")
    _check_text("the prompt", req.text, limits)
    return req.text, list(req.token_ids), generation_params(req.parameters, limits)


def score_request(req, limits: LimitsConfig) -> tuple[list[tuple[str, str]], ScoreOptions]:
    """ScoreRequest -> ([(context, continuation)], options)."""
    if not req.pairs:
        raise InvalidRequest("no pairs to score")
    if len(req.pairs) > limits.max_score_pairs:
        raise InvalidRequest(f"{len(req.pairs)} pairs; the limit per call is {limits.max_score_pairs}")
    if req.top_logprobs > limits.max_top_logprobs:
        raise InvalidRequest(f"top_logprobs is {req.top_logprobs}; the limit is {limits.max_top_logprobs}")
    pairs = []
    for i, p in enumerate(req.pairs):
        if not p.continuation:
            raise InvalidRequest(f"pair {i}: the continuation is empty")
        _check_text(f"pair {i}: the context", p.context, limits)
        _check_text(f"pair {i}: the continuation", p.continuation, limits)
        pairs.append((p.context, p.continuation))
    return pairs, ScoreOptions(truncate=req.truncate, details=req.token_details, top_n=req.top_logprobs)


def text_request(name: str, text: str, limits: LimitsConfig) -> str:
    _check_text(name, text, limits)
    return text


def rolling_request(req, limits: LimitsConfig) -> str:
    if not req.text:
        raise InvalidRequest("the text is empty")
    _check_text("the text", req.text, limits)
    return req.text


TIMEOUT_HEADER = "polyglot-timeout-ms"
"""Request metadata: the caller's deadline in milliseconds from sending. Ray's gRPC proxy does not pass the gRPC
deadline (grpc-timeout) on to replicas, so a client that wants its Generate refused early rather than after its
deadline passes in the queue says it here (the Python client does for every call with a timeout)."""


def timeout_s(metadata) -> float | None:
    """The caller's deadline from TIMEOUT_HEADER in seconds, None when absent."""
    for key, value in metadata or ():
        if key == TIMEOUT_HEADER:
            try:
                ms = int(value)
            except ValueError:
                raise InvalidRequest(f"{TIMEOUT_HEADER} must be a whole number of milliseconds, got {value!r}") from None
            if ms <= 0:
                raise InvalidRequest(f"{TIMEOUT_HEADER} must be positive, got {ms}")
            return ms / 1000
    return None
