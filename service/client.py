"""A Python client of the polyglot.v1.LanguageModel gRPC API.

    from service.client import Client
    with Client("localhost:9000") as c:
        print(c.generate("한국어로 된 문장", max_new_tokens=32).text)
        print(c.score([("서울은", " 한국의 수도이다.")]).scores[0].logprob)
"""
from __future__ import annotations

import dataclasses
import random
import re
import time
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .api.pb import lm_pb2, lm_pb2_grpc

T = TypeVar("T")

# Responses with per-token details of many pairs exceed gRPC's 4 MiB default; the server refuses
# requests above its own limit (ModelInfo.max_request_bytes) with a readable message.
_CHANNEL_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
_PUSHBACK_TEXT = re.compile(r"\(retry after (\d+) ms\)")


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Which failures a call retries, and how long it waits between attempts (always within its timeout).

    gRPC's own retry policy cannot work behind Ray's proxy, which commits every answer by sending
    headers first, so the client retries itself:
    - RESOURCE_EXHAUSTED (queue full) and UNAVAILABLE (no replica yet) were refused before any work:
      every call retries them, waiting the server's `grpc-retry-pushback-ms` when it sent one;
    - INTERNAL is how Ray's proxy reports a replica that died mid-call: only read-only calls
      (Score, ScoreRolling, Tokenize, Detokenize, ModelInfo) retry it, since they give the same answer;
    - a stream retries only until its first message.
    """

    attempts: int = 6
    backoff_s: float = 0.25
    max_backoff_s: float = 8.0

    def wait_s(self, attempt: int, err: grpc.RpcError) -> float:
        """Pause before attempt `attempt + 1`: the server's pushback, else jittered exponential backoff."""
        for key, value in err.trailing_metadata() or ():
            if key == "grpc-retry-pushback-ms":
                return int(value) / 1000
        m = _PUSHBACK_TEXT.search(err.details() or "")  # streams: Ray's proxy drops the trailer
        if m:
            return int(m.group(1)) / 1000
        return random.uniform(0.5, 1.0) * min(self.max_backoff_s, self.backoff_s * 2**attempt)

    @staticmethod
    def retryable(err: grpc.RpcError, read_only: bool) -> bool:
        code = err.code()
        return code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE) or (
            read_only and code == grpc.StatusCode.INTERNAL)


NO_RETRY = RetryPolicy(attempts=1)


class Client:
    """Blocking client; every call takes an optional timeout (seconds, covering its retries) and raises
    grpc.RpcError on failure. `retry` decides what is retried (RetryPolicy; NO_RETRY for none)."""

    def __init__(self, address: str = "localhost:9000", token: str | None = None, retry: RetryPolicy = RetryPolicy(),
                 tls: grpc.ChannelCredentials | None = None):
        """`tls`: e.g. grpc.ssl_channel_credentials(), for a service behind a TLS-terminating ingress."""
        if tls is None:
            self.channel = grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
        else:
            self.channel = grpc.secure_channel(address, tls, options=_CHANNEL_OPTIONS)
        self.stub = lm_pb2_grpc.LanguageModelStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.metadata = [("authorization", f"Bearer {token}")] if token else None
        self.retry = retry

    def _call(self, method: Callable[..., T], request, timeout: float | None, read_only: bool) -> T:
        deadline = None if timeout is None else time.monotonic() + timeout
        for attempt in range(self.retry.attempts):
            left = None if deadline is None else deadline - time.monotonic()
            md = self.metadata
            if left is not None:  # Ray's proxy does not pass the gRPC deadline on: say it (validation.TIMEOUT_HEADER)
                md = (md or []) + [("polyglot-timeout-ms", str(max(1, int(left * 1000))))]
            try:
                return method(request, timeout=left, metadata=md)
            except grpc.RpcError as err:
                wait = self.retry.wait_s(attempt, err)
                last = attempt == self.retry.attempts - 1
                if last or not self.retry.retryable(err, read_only) or (
                        deadline is not None and time.monotonic() + wait >= deadline):
                    raise
                time.sleep(wait)
        raise AssertionError("unreachable")

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    @staticmethod
    def request(prompt: str | Sequence[int], **params) -> lm_pb2.GenerateRequest:
        """GenerateRequest from a prompt (text or token ids) and GenerationParameters fields."""
        req = lm_pb2.GenerateRequest(parameters=lm_pb2.GenerationParameters(**params))
        if isinstance(prompt, str):
            req.text = prompt
        else:
            req.token_ids.extend(prompt)
        return req

    def generate(self, prompt: str | Sequence[int], timeout: float | None = None, **params) -> lm_pb2.GenerateResponse:
        return self._call(self.stub.Generate, self.request(prompt, **params), timeout, read_only=False)

    def generate_stream(
        self, prompt: str | Sequence[int], timeout: float | None = None, **params
    ) -> Iterator[lm_pb2.GenerateResponse]:
        request = self.request(prompt, **params)

        def first_message(req, timeout, metadata):
            stream = self.stub.GenerateStream(req, timeout=timeout, metadata=metadata)
            return stream, next(stream, None)

        # Retried only until the first message: later failures reach the caller mid-stream.
        stream, first = self._call(first_message, request, timeout, read_only=False)
        try:
            if first is not None:
                yield first
                yield from stream
        finally:
            stream.cancel()  # a caller that stops reading frees the server's slot at once

    def score(
        self,
        pairs: Iterable[tuple[str, str]],
        truncate: bool = False,
        token_details: bool = False,
        top_logprobs: int = 0,
        timeout: float | None = None,
    ) -> lm_pb2.ScoreResponse:
        req = lm_pb2.ScoreRequest(
            pairs=[lm_pb2.ScorePair(context=c, continuation=x) for c, x in pairs],
            truncate=truncate,
            token_details=token_details,
            top_logprobs=top_logprobs,
        )
        return self._call(self.stub.Score, req, timeout, read_only=True)

    def score_rolling(self, text: str, timeout: float | None = None) -> lm_pb2.ScoreRollingResponse:
        """Log-likelihood of a whole text of any length (perplexity)."""
        return self._call(self.stub.ScoreRolling, lm_pb2.ScoreRollingRequest(text=text), timeout, read_only=True)

    def tokenize(self, text: str, timeout: float | None = None) -> lm_pb2.TokenizeResponse:
        return self._call(self.stub.Tokenize, lm_pb2.TokenizeRequest(text=text), timeout, read_only=True)

    def detokenize(self, ids: Sequence[int], timeout: float | None = None) -> str:
        return self._call(self.stub.Detokenize, lm_pb2.DetokenizeRequest(ids=ids), timeout, read_only=True).text

    def model_info(self, timeout: float | None = None) -> lm_pb2.ModelInfoResponse:
        return self._call(self.stub.ModelInfo, lm_pb2.ModelInfoRequest(), timeout, read_only=True)

    def healthy(self, timeout: float = 5.0) -> bool:
        r = self.health.Check(health_pb2.HealthCheckRequest(), timeout=timeout, metadata=self.metadata)
        return r.status == health_pb2.HealthCheckResponse.SERVING
