"""Back-pressure on the live service: a burst beyond the queue limits is refused with RESOURCE_EXHAUSTED and gRPC's
retry pushback trailer, never CANCELLED; the client's retry policy obeys it and gets every call answered."""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import time
import urllib.request

import grpc
import pytest

from conftest import serving
from service.api.pb import lm_pb2, lm_pb2_grpc
from service.client import Client
from test_load import score, stream

pytestmark = pytest.mark.integration


def test_burst_beyond_the_queues_is_refused_with_a_retry_hint(tiny_dir):
    """Two KV slots, two waiting requests, eight queued pairs: a burst gets RESOURCE_EXHAUSTED with the retry hint
    (never CANCELLED), and the Python client, obeying the hint, gets every call answered."""
    engine = {"generation": {"max_slots": 2, "max_waiting": 2}, "batch": {"max_queue_pairs": 8},
              "limits": {"retry_after_ms": 300}}
    with serving(tiny_dir, engine=engine) as s:

        async def burst():
            codes, streams, scores = collections.Counter(), [], []
            async with grpc.aio.insecure_channel(s["address"], options=[("grpc.enable_retries", 0)]) as ch:
                stub = lm_pb2_grpc.LanguageModelStub(ch)
                await asyncio.gather(*(stream(stub, codes, refusals=streams) for _ in range(16)),
                                     *(score(stub, i, codes, refusals=scores) for i in range(200)))
            return codes, streams, scores

        codes, streams, scores = asyncio.run(burst())
        assert set(codes) == {"OK", "RESOURCE_EXHAUSTED"} and codes["OK"] >= 4, codes
        assert streams and scores
        assert all(d.endswith("(retry after 300 ms)") for d, _ in streams + scores), streams + scores
        assert {pushback for _, pushback in scores} == {"300"}  # the standard trailer, on unary calls

        with Client(s["address"]) as c:
            t0 = time.monotonic()
            params = dict(max_new_tokens=16, min_new_tokens=16, ignore_eos=True, timeout=60)

            def call(i: int) -> int:
                if i % 2:
                    return c.generate("서울의 봄은", **params).generated_tokens
                return [m for m in c.generate_stream("서울의 봄은", **params)][-1].generated_tokens

            # 12 Generates at once against 2 slots + 2 waiting: 8 are refused, wait out the hint, retry.
            with concurrent.futures.ThreadPoolExecutor(12) as ex:
                assert list(ex.map(call, range(12))) == [16] * 12
            assert time.monotonic() - t0 >= 0.3  # somebody waited out the pushback




def test_a_deadline_that_the_queue_cannot_meet_is_refused_before_it_passes(tiny_dir):
    """Both slots held by long streams: a Generate whose client deadline is 2 s gets RESOURCE_EXHAUSTED (the
    queue limit is 90 % of the deadline the Python client sends as polyglot-timeout-ms) before its deadline, not
    DEADLINE_EXCEEDED; the next one, with a 1 s deadline, is refused at once, since the queue has not moved; a malformed header is
    INVALID_ARGUMENT. The refusals are counted by reason in /metrics."""
    engine = {"generation": {"max_slots": 2}, "limits": {"max_new_tokens": 2030}}
    with serving(tiny_dir, engine=engine) as s, Client(s["address"]) as c:
        long = dict(max_new_tokens=2030, min_new_tokens=2030, ignore_eos=True)
        ch = grpc.insecure_channel(s["address"])
        held = [lm_pb2_grpc.LanguageModelStub(ch).GenerateStream(Client.request("서울의 봄은", **long), timeout=120)
                for _ in range(2)]
        for h in held:
            next(h)  # both running
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as waited:
            c.generate("서울의 봄은", max_new_tokens=4, timeout=2.0)
        t1 = time.monotonic()
        with pytest.raises(grpc.RpcError) as at_once:  # the queue has not moved in 1.8 s: 0.9 s is not enough
            c.generate("서울의 봄은", max_new_tokens=4, timeout=1.0)
        t2 = time.monotonic()
        with grpc.insecure_channel(s["address"]) as ch:
            with pytest.raises(grpc.RpcError) as bad:
                lm_pb2_grpc.LanguageModelStub(ch).Generate(Client.request("안녕", max_new_tokens=2), timeout=30,
                                                           metadata=[("polyglot-timeout-ms", "soon")])
            with pytest.raises(grpc.RpcError) as bad_score:  # Score reads the header too (its deadline admission)
                lm_pb2_grpc.LanguageModelStub(ch).Score(
                    lm_pb2.ScoreRequest(pairs=[lm_pb2.ScorePair(context="안녕", continuation="하세요")]), timeout=30,
                    metadata=[("polyglot-timeout-ms", "0")])
        still = [h.running() for h in held]
        for h in held:
            h.cancel()
        ch.close()
        assert still == [True, True]  # the slots were held throughout
        assert waited.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, waited.value
        assert "waited" in waited.value.details() and 1.5 < t1 - t0 < 2.0
        assert at_once.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, at_once.value
        assert "expected wait" in at_once.value.details() and t2 - t1 < 0.5
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "polyglot-timeout-ms" in bad.value.details()
        assert bad_score.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad_score.value
        assert "polyglot-timeout-ms must be positive" in bad_score.value.details()
        deadline = time.monotonic() + 60
        while True:  # Ray exports replica metrics every few seconds
            lines = urllib.request.urlopen(s["metrics"], timeout=10).read().decode().splitlines()
            missing = [r for r in ("waited_too_long", "expected_wait")
                       if not any(x.startswith("ray_polyglot_refused_total") and f'reason="{r}"' in x for x in lines)]
            if not missing:
                break
            assert time.monotonic() < deadline, f"refusal reasons not counted: {missing}"
            time.sleep(2)
