"""Load on the live service: a burst far beyond one replica's batch, mixed traffic for a fixed time, a cancel storm.
Nothing is lost, nothing comes back CANCELLED, memory stays flat, slots come back."""
from __future__ import annotations

import asyncio
import collections
import random
import time

import grpc
import pytest

from conftest import replica_pids
from service.api.pb import lm_pb2, lm_pb2_grpc
from service.client import Client
from test_integration import server  # noqa: F401 - the module-scoped Ray Serve fixture

pytestmark = pytest.mark.integration

STREAM = lm_pb2.GenerationParameters(max_new_tokens=16, min_new_tokens=16, ignore_eos=True)


def _score_request(i: int) -> lm_pb2.ScoreRequest:
    return lm_pb2.ScoreRequest(pairs=[lm_pb2.ScorePair(context=f"우리 가족은 주말마다 {i}",
                                                       continuation=" 공원에서 산책을 한다.")])


async def score(stub, i: int, codes: collections.Counter, refusals: list | None = None) -> None:
    call = stub.Score(_score_request(i), timeout=120)
    try:
        r = await call
        codes["OK"] += len(r.scores) == 1
    except grpc.aio.AioRpcError as e:
        codes[e.code().name] += 1
        if refusals is not None:
            refusals.append((e.details(), dict(await call.trailing_metadata() or ()).get("grpc-retry-pushback-ms")))


async def stream(stub, codes: collections.Counter, tokens: list[int] | None = None, refusals: list | None = None):
    call = stub.GenerateStream(lm_pb2.GenerateRequest(text="서울의 봄은", parameters=STREAM), timeout=120)
    try:
        last = None
        async for last in call:
            pass
        if tokens is not None:
            tokens.append(last.generated_tokens)
        codes["OK"] += 1
    except grpc.aio.AioRpcError as e:
        codes[e.code().name] += 1
        if refusals is not None:
            refusals.append((e.details(), None))  # Ray's proxy drops a failed stream's trailers


def _replica_rss_mb() -> float:
    (pid,) = replica_pids()
    with open(f"/proc/{pid}/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 1024


def test_burst_of_mixed_calls_completes_without_errors(server):  # noqa: F811
    n_score, n_gen = 600, 24  # the CPU replica batches ~16 pairs and decodes 8 streams at a time

    async def main():
        codes, tokens = collections.Counter(), []
        async with grpc.aio.insecure_channel(server["address"]) as ch:
            stub = lm_pb2_grpc.LanguageModelStub(ch)
            await asyncio.wait_for(asyncio.gather(*(score(stub, i, codes) for i in range(n_score)),
                                                  *(stream(stub, codes, tokens) for _ in range(n_gen))), timeout=240)
        return codes, tokens

    codes, tokens = asyncio.run(main())
    assert codes == {"OK": n_score + n_gen}
    assert tokens == [16] * n_gen


def test_mixed_clients_for_a_fixed_time_lose_nothing_and_memory_stays_flat(server):  # noqa: F811
    """24 Score clients and 6 streaming clients loop for four 6-second windows; the replica's RSS after the
    second window (warm) and after the fourth may differ by allocator noise only."""
    rss = []

    async def main():
        codes, sent = collections.Counter(), collections.Counter()
        async with grpc.aio.insecure_channel(server["address"]) as ch:
            stub = lm_pb2_grpc.LanguageModelStub(ch)
            end = time.monotonic()

            async def scorer(k):
                i = 0
                while time.monotonic() < end:
                    sent["score"] += 1
                    i += 1
                    await score(stub, k * 100_000 + i, codes)

            async def streamer():
                while time.monotonic() < end:
                    sent["stream"] += 1
                    await stream(stub, codes)

            for _ in range(4):
                end = time.monotonic() + 6
                await asyncio.gather(*(scorer(k) for k in range(24)), *(streamer() for _ in range(6)))
                rss.append(_replica_rss_mb())
        return codes, sent

    codes, sent = asyncio.run(main())
    assert codes == {"OK": sent["score"] + sent["stream"]}, (codes, sent)
    assert sent["score"] > 100 and sent["stream"] > 10
    assert rss[3] - rss[1] < 40, f"replica RSS by window (MB): {rss}"


def test_cancel_storm_leaves_no_stuck_slots(server):  # noqa: F811
    """48 streams cancelled by their clients at random points (before the first token, mid-stream): afterwards the
    replica reports no running and no waiting sequences, and serves."""

    async def storm():
        async with grpc.aio.insecure_channel(server["address"]) as ch:
            stub = lm_pb2_grpc.LanguageModelStub(ch)
            rng = random.Random(7)
            params = lm_pb2.GenerationParameters(max_new_tokens=200, ignore_eos=True)

            async def cancelled_stream():
                call = stub.GenerateStream(lm_pb2.GenerateRequest(text="서울의 봄은", parameters=params), timeout=120)
                n = rng.randrange(4)
                try:
                    async for _ in call:
                        n -= 1
                        if n <= 0:
                            break
                finally:
                    call.cancel()

            tasks = [asyncio.create_task(cancelled_stream()) for _ in range(48)]
            await asyncio.sleep(0.05)
            for t in tasks[::3]:  # a third are cancelled from outside, most before their first token
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(storm())
    with Client(server["address"]) as c:
        deadline = time.monotonic() + 30
        while True:
            info = c.model_info()
            if info.running_sequences == 0 and info.waiting_requests == 0:
                break
            assert time.monotonic() < deadline, (info.running_sequences, info.waiting_requests)
            time.sleep(0.5)


def _details_pairs(client: Client, budget: int, top: int) -> list[tuple[str, str]]:
    """Pairs whose token details come as close to `budget` entries as whole pairs allow (continuation tokens x
    (1 + top) summed), within the tiny model's window."""
    cont = " 우리 가족은 주말마다 공원에서 산책을 한다." * 20
    n = len(client.tokenize("맥락" + cont).ids) - len(client.tokenize("맥락").ids)
    per_pair = n * (1 + top)
    return [("맥락", cont)] * (budget // per_pair)


def test_heavy_legal_requests_leave_a_small_score_fast(server):  # noqa: F811
    """The heaviest calls the limits allow, one after another from a second client: Score with token details at
    the per-call budget (limits.max_score_details, 20 alternatives), Tokenize of 190,000 characters, and the
    largest Generate prompt. A small Score probe beside them stays fast (before: a 256-pair details Score held the
    replica 38 s, a huge Tokenize 1.5 s). That small calls never queue behind heavy tokenizer work is tested
    without timing in test_admission; here the bounds are wide enough not to depend on the machine."""
    import threading

    from service.bench import random_korean

    with Client(server["address"]) as c:
        pairs = _details_pairs(c, 65536, 20)
        big = random_korean(random.Random(1), 140_000)[:190_000]
        window_prompt = c.tokenize(big).ids[:2048 - 16]
    done, heavy_ok, lat = threading.Event(), [], []

    took = {"Score": [], "Tokenize": [], "Generate": []}

    def timed(name, call):
        t0 = time.perf_counter()
        out = call()
        took[name].append(time.perf_counter() - t0)
        return out

    def heavy(c):
        r = timed("Score", lambda: c.score(pairs, token_details=True, top_logprobs=20, timeout=120))
        heavy_ok.append(sum(len(s.details.ids) * 21 for s in r.scores))
        heavy_ok.append(len(timed("Tokenize", lambda: c.tokenize(big, timeout=120)).ids))
        heavy_ok.append(timed("Generate", lambda: c.generate(window_prompt, max_new_tokens=16, timeout=120))
                        .generated_tokens)

    def rounds():
        try:
            with Client(server["address"]) as c:
                for _ in range(3):
                    heavy(c)
        finally:
            done.set()

    with Client(server["address"]) as probe:
        with Client(server["address"]) as c:
            heavy(c)  # warm: the steady state is measured, not the first call of each shape
        heavy_ok.clear()
        probe.score([("서울의 봄은", " 벚꽃")])
        t = threading.Thread(target=rounds)
        t.start()
        while not done.is_set():
            t0 = time.perf_counter()
            probe.score([("서울의 봄은", " 벚꽃")], timeout=60)
            lat.append(time.perf_counter() - t0)
        t.join()
    assert len(heavy_ok) == 9 and 60_000 < heavy_ok[0] <= 65536 and heavy_ok[1] > 150_000, heavy_ok
    assert heavy_ok[2] == 16
    lat.sort()
    p50, p90 = lat[len(lat) // 2], lat[int(0.9 * (len(lat) - 1))]
    # The bulk of the probes is fast, and none waits as long as the stalls before the fix (the probe loop is
    # sequential, so a stall is one long probe). The tail between is Ray's one proxy and this process
    # (de)serializing megabyte responses beside the probe on 2 cores: slowest 0.22-0.38 s here and in CI.
    assert len(lat) >= 30 and p50 <= 0.15 and p90 <= 0.4 and lat[-1] <= 1.2, \
        f"{len(lat)} probes, p50 {p50:.3f} s, p90 {p90:.3f} s, slowest {lat[-5:]}; heavy calls took {took}"
