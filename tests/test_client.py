"""The Python client's retry policy against an in-process gRPC server that fails on purpose (no Ray)."""
from __future__ import annotations

import time
from concurrent import futures

import grpc
import pytest

from service.api.pb import lm_pb2, lm_pb2_grpc
from service.client import NO_RETRY, Client, RetryPolicy


class Flaky(lm_pb2_grpc.LanguageModelServicer):
    """Fails the first `fails` calls of each method with `code`, then answers."""

    def __init__(self, code: grpc.StatusCode, fails: int, pushback_ms: int | None = None):
        self.code, self.fails, self.pushback_ms = code, fails, pushback_ms
        self.calls: dict[str, list[float]] = {}

    def _maybe_fail(self, name: str, ctx) -> None:
        seen = self.calls.setdefault(name, [])
        seen.append(time.monotonic())
        if len(seen) <= self.fails:
            if self.pushback_ms is not None:
                ctx.set_trailing_metadata([("grpc-retry-pushback-ms", str(self.pushback_ms))])
            ctx.abort(self.code, "refused on purpose")

    def Score(self, request, ctx):
        self._maybe_fail("Score", ctx)
        return lm_pb2.ScoreResponse(scores=[lm_pb2.PairScore(logprob=-1.5)])

    def Generate(self, request, ctx):
        self._maybe_fail("Generate", ctx)
        return lm_pb2.GenerateResponse(text="끝")

    def GenerateStream(self, request, ctx):
        self._maybe_fail("GenerateStream", ctx)
        yield lm_pb2.GenerateResponse(text="가")
        yield lm_pb2.GenerateResponse(text="나")


@pytest.fixture
def flaky():
    servers = []

    def start(*args, **kw) -> tuple[Flaky, str]:
        impl = Flaky(*args, **kw)
        server = grpc.server(futures.ThreadPoolExecutor(4))
        lm_pb2_grpc.add_LanguageModelServicer_to_server(impl, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return impl, f"127.0.0.1:{port}"

    yield start
    for s in servers:
        s.stop(None)


def test_resource_exhausted_waits_out_the_pushback_then_succeeds(flaky):
    impl, address = flaky(grpc.StatusCode.RESOURCE_EXHAUSTED, fails=2, pushback_ms=150)
    with Client(address) as c:
        assert c.score([("a", "b")], timeout=10).scores[0].logprob == -1.5
        assert c.generate("a").text == "끝"
        assert "".join(m.text for m in c.generate_stream("a")) == "가나"
    t = impl.calls["Score"]
    assert len(t) == 3 and min(t[1] - t[0], t[2] - t[1]) >= 0.14  # obeyed the server, not its own backoff
    assert len(impl.calls["Generate"]) == 3 and len(impl.calls["GenerateStream"]) == 3


def test_internal_is_retried_only_by_read_only_calls(flaky):
    impl, address = flaky(grpc.StatusCode.INTERNAL, fails=1)
    with Client(address, retry=RetryPolicy(backoff_s=0.01)) as c:
        assert c.score([("a", "b")]).scores[0].logprob == -1.5  # a replica that died mid-call: asked again
        with pytest.raises(grpc.RpcError) as err:
            c.generate("a")  # sampling may differ the second time: the caller decides
        assert err.value.code() == grpc.StatusCode.INTERNAL
    assert len(impl.calls["Score"]) == 2 and len(impl.calls["Generate"]) == 1


def test_invalid_argument_no_retry_policy_and_timeouts_are_final(flaky):
    impl, address = flaky(grpc.StatusCode.INVALID_ARGUMENT, fails=5)
    with Client(address) as c:
        with pytest.raises(grpc.RpcError):
            c.score([("a", "b")])
    assert len(impl.calls["Score"]) == 1
    impl, address = flaky(grpc.StatusCode.RESOURCE_EXHAUSTED, fails=5, pushback_ms=10_000)
    with Client(address) as c, Client(address, retry=NO_RETRY) as once:
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            c.score([("a", "b")], timeout=1.0)  # the pushback would outlive the deadline: fail now
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() - t0 < 0.5
        with pytest.raises(grpc.RpcError):
            once.generate("a")
    assert len(impl.calls["Score"]) == 1 and len(impl.calls["Generate"]) == 1
