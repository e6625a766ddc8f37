"""Back-pressure on the live service: a burst beyond the queue limits is refused with RESOURCE_EXHAUSTED and gRPC's
retry pushback trailer, never CANCELLED; the client's retry policy obeys it and gets every call answered."""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import time

import grpc
import pytest

from conftest import serving
from service.api.pb import lm_pb2_grpc
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


