"""A bounded burst far beyond one replica's batch: every call is queued and answered, none CANCELLED or lost."""
from __future__ import annotations

import asyncio
import collections

import grpc
import pytest

from service.api.pb import lm_pb2, lm_pb2_grpc
from test_integration import server  # noqa: F401 - the module-scoped Ray Serve fixture

pytestmark = pytest.mark.integration


def test_burst_of_mixed_calls_completes_without_errors(server):  # noqa: F811
    n_score, n_gen = 600, 24  # the CPU replica batches ~16 pairs and decodes 8 streams at a time

    async def main():
        codes = collections.Counter()
        tokens = []
        async with grpc.aio.insecure_channel(server["address"]) as ch:
            stub = lm_pb2_grpc.LanguageModelStub(ch)

            async def score(i):
                try:
                    r = await stub.Score(lm_pb2.ScoreRequest(pairs=[lm_pb2.ScorePair(
                        context=f"우리 가족은 주말마다 {i}", continuation=" 공원에서 산책을 한다.")]), timeout=120)
                    codes["OK"] += len(r.scores) == 1
                except grpc.aio.AioRpcError as e:
                    codes[e.code().name] += 1

            async def generate():
                params = lm_pb2.GenerationParameters(max_new_tokens=16, min_new_tokens=16, ignore_eos=True)
                try:
                    last = None
                    async for last in stub.GenerateStream(lm_pb2.GenerateRequest(text="서울의 봄은", parameters=params),
                                                          timeout=120):
                        pass
                    tokens.append(last.generated_tokens)
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as e:
                    codes[e.code().name] += 1

            await asyncio.wait_for(asyncio.gather(*(score(i) for i in range(n_score)), *(generate() for _ in range(n_gen))),
                                   timeout=240)
        return codes, tokens

    codes, tokens = asyncio.run(main())
    assert codes == {"OK": n_score + n_gen}
    assert tokens == [16] * n_gen
