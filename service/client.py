"""A Python client of the polyglot.v1.LanguageModel gRPC API.

    from service.client import Client
    with Client("localhost:9000") as c:
        print(c.generate("한국어로 된 문장", max_new_tokens=32).text)
        print(c.score([("서울은", " 한국의 수도이다.")]).scores[0].logprob)
"""
from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .api.pb import lm_pb2, lm_pb2_grpc

# Long Score calls and big batches of pairs exceed gRPC's 4 MiB default.
_CHANNEL_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


class Client:
    """Blocking client; every call takes an optional timeout (seconds) and raises grpc.RpcError on failure."""

    def __init__(self, address: str = "localhost:9000", token: str | None = None):
        self.channel = grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
        self.stub = lm_pb2_grpc.LanguageModelStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.metadata = [("authorization", f"Bearer {token}")] if token else None

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
        return self.stub.Generate(self.request(prompt, **params), timeout=timeout, metadata=self.metadata)

    def generate_stream(
        self, prompt: str | Sequence[int], timeout: float | None = None, **params
    ) -> Iterator[lm_pb2.GenerateResponse]:
        return self.stub.GenerateStream(self.request(prompt, **params), timeout=timeout, metadata=self.metadata)

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
        return self.stub.Score(req, timeout=timeout, metadata=self.metadata)

    def score_rolling(self, text: str, timeout: float | None = None) -> lm_pb2.ScoreRollingResponse:
        """Log-likelihood of a whole text of any length (perplexity)."""
        return self.stub.ScoreRolling(lm_pb2.ScoreRollingRequest(text=text), timeout=timeout, metadata=self.metadata)

    def tokenize(self, text: str, timeout: float | None = None) -> lm_pb2.TokenizeResponse:
        return self.stub.Tokenize(lm_pb2.TokenizeRequest(text=text), timeout=timeout, metadata=self.metadata)

    def detokenize(self, ids: Sequence[int], timeout: float | None = None) -> str:
        return self.stub.Detokenize(lm_pb2.DetokenizeRequest(ids=ids), timeout=timeout, metadata=self.metadata).text

    def model_info(self, timeout: float | None = None) -> lm_pb2.ModelInfoResponse:
        return self.stub.ModelInfo(lm_pb2.ModelInfoRequest(), timeout=timeout, metadata=self.metadata)

    def healthy(self, timeout: float = 5.0) -> bool:
        r = self.health.Check(health_pb2.HealthCheckRequest(), timeout=timeout, metadata=self.metadata)
        return r.status == health_pb2.HealthCheckResponse.SERVING
