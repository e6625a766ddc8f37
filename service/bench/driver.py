"""The benchmark's gRPC client side: a Serve app started on the model, Score floods, Generate streams all at once
and at open-loop Poisson arrivals, each measured as its clients see it (TTFT, inter-token gaps, goodput)."""
from __future__ import annotations

import asyncio
import itertools
import random
import socket
import subprocess
import threading
import time
import torch

from .workloads import BenchConfig, Workloads, open_loop_requests, traffic_requests, traffic_rows

def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def percentiles(xs: list[float]) -> dict:
    return {"p50": pct(xs, 0.5), "p99": pct(xs, 0.99)}


async def drive_score(stub, pb, requests: list[list[tuple[str, str]]], tokens: list[int], concurrency: int) -> dict:
    import grpc

    sem = asyncio.Semaphore(concurrency)
    lat, errors, batch_pairs = [], {}, []

    async def one(pairs):
        async with sem:
            t = time.perf_counter()
            try:
                r = await stub.Score(pb.ScoreRequest(pairs=[pb.ScorePair(context=c, continuation=x) for c, x in pairs]))
                lat.append(time.perf_counter() - t)
                batch_pairs.extend(s.batch_pairs for s in r.scores)
            except grpc.aio.AioRpcError as e:
                errors[e.code().name] = errors.get(e.code().name, 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(one(p) for p in requests))
    dt = time.perf_counter() - t0
    done = len(lat)
    return {
        "requests": len(requests), "completed": done, "errors": errors, "seconds": dt,
        "tokens_per_s": sum(tokens) / dt if not errors else sum(tokens) * done / len(requests) / dt,
        "latency_s": percentiles(lat), "mean_batch_pairs": sum(batch_pairs) / max(1, len(batch_pairs)),
    }


async def drive_generate(stub, pb, prompt: str, n_streams: int, cfg: BenchConfig) -> dict:
    """n_streams identical greedy streams of the one short prompt, all started at once (the original workload)."""
    params = pb.GenerationParameters(max_new_tokens=cfg.gen_tokens, min_new_tokens=cfg.gen_tokens, ignore_eos=True)
    return await drive_streams(stub, [pb.GenerateRequest(text=prompt, parameters=params)] * n_streams, cfg)


class _Streams:
    """What a set of GenerateStream calls saw: TTFT, inter-token gaps, latencies, tokens, status codes, outputs."""

    def __init__(self):
        self.ttft, self.itl, self.lat, self.errors, self.tokens, self.outputs = [], [], [], {}, 0, []
        self.logprobs = 0  # log-probabilities received (streams that asked for them: one per token)

    async def one(self, stub, req, timeout_s: float) -> None:
        import grpc

        t = time.perf_counter()
        last, n, ids = None, 0, []
        # The deadline as the replica sees it (Ray's proxy does not pass grpc-timeout on): admission by deadline.
        md = [("polyglot-timeout-ms", str(int(timeout_s * 1000)))]
        try:
            async for m in stub.GenerateStream(req, timeout=timeout_s, metadata=md):
                now = time.perf_counter()
                new = m.generated_tokens - n
                if last is None:
                    self.ttft.append(now - t)
                elif new > 0:
                    self.itl.extend([(now - last) / new] * new)
                last, n = now, m.generated_tokens
                ids += m.token_ids
                self.logprobs += len(m.details.logprobs)
            self.lat.append(time.perf_counter() - t)
            self.outputs.append((req, ids))
        except grpc.aio.AioRpcError as e:
            self.errors[e.code().name] = self.errors.get(e.code().name, 0) + 1
        self.tokens += n

    def report(self, n: int, seconds: float) -> dict:
        return {"streams": n, "completed": len(self.lat), "errors": self.errors, "seconds": seconds,
                "tokens": self.tokens, "logprobs": self.logprobs, "tokens_per_s": self.tokens / seconds,
                "tokens_per_s_per_stream": self.tokens / seconds / n, "ttft_s": percentiles(self.ttft),
                "itl_s": percentiles(self.itl), "latency_s": percentiles(self.lat)}


async def drive_streams(stub, requests: list, cfg: BenchConfig) -> dict:
    """Every request as a GenerateStream, all started at once: throughput, TTFT, inter-token gaps, and the outputs
    of a sample of the streams for the output check."""
    rec, starts = _Streams(), []

    async def one(req):
        starts.append(time.perf_counter() - t0)
        await rec.one(stub, req, cfg.gen_timeout_s)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(r) for r in requests))
    dt = time.perf_counter() - t0
    greedy = [(r, ids) for r, ids in rec.outputs if r.parameters.temperature == 0]
    return {
        **rec.report(len(requests), dt), "last_start_s": max(starts),
        # Greedy streams' outputs (with their prompt ids; None: the text prompt) for check_outputs.
        "samples": [(list(r.token_ids) or None, ids) for r, ids in greedy[:: max(1, len(greedy) // 4)][:4]],
        "short_streams": sum(len(ids) != r.parameters.max_new_tokens for r, ids in rec.outputs),
    }


TTFT_GOAL_S, ITL_GOAL_S = 1.0, 0.1
"""Goodput's latency objective (issue 14): TTFT p99 <= 1 s and inter-token p99 <= 100 ms."""


async def drive_open_loop(stub, requests: list, rate: float, cfg: BenchConfig, seed: int) -> dict:
    """The requests at Poisson arrival times of `rate` per second, each a stream with a deadline: what a client
    population sees at that offered load. A rate meets the objective when every request completed (none refused)
    with TTFT p99 and inter-token p99 within TTFT_GOAL_S / ITL_GOAL_S."""
    rng = random.Random(seed)
    rec, tasks = _Streams(), []
    t0 = time.perf_counter()
    at = 0.0
    for req in requests:
        at += rng.expovariate(rate)
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(rec.one(stub, req, cfg.gen_timeout_s)))
    arrivals_s = time.perf_counter() - t0
    await asyncio.gather(*tasks)
    dt = time.perf_counter() - t0
    r = rec.report(len(requests), dt)
    r.update(offered_rate=rate, arrivals_s=arrivals_s, completed_per_s=len(rec.lat) / dt,
             tokens_per_s=rec.tokens / dt, requested_tokens=sum(q.parameters.max_new_tokens for q in requests))
    r["meets_goal"] = (not rec.errors and r["ttft_s"]["p99"] is not None and r["ttft_s"]["p99"] <= TTFT_GOAL_S
                       and (r["itl_s"]["p99"] or 0.0) <= ITL_GOAL_S)
    return r


def goodput(open_loop: dict) -> float | None:
    """The highest offered rate whose run met the objective (None: none did)."""
    ok = [r["offered_rate"] for r in open_loop.values() if r["meets_goal"]]
    return max(ok) if ok else None


def next_probe(open_loop: dict, resolution: float) -> float | None:
    """The rate to run next to pin goodput down: the midpoint, rounded to `resolution`, of the highest rate that met
    the objective and the lowest rate above it that did not; None when no such pair exists or they are within
    `resolution` of each other."""
    best = goodput(open_loop)
    above = [r["offered_rate"] for r in open_loop.values() if not r["meets_goal"] and best is not None
             and r["offered_rate"] > best]
    if best is None or not above or min(above) - best <= resolution:
        return None
    mid = round((best + min(above)) / 2 / resolution) * resolution
    return mid if best < mid < min(above) else None


class GpuMemorySampler:
    """Peak GPU memory in use (nvidia-smi, whole device) while the service runs."""

    def __init__(self):
        self.peak_mib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                      "-i", "0"], capture_output=True, text=True, timeout=5).stdout
                self.peak_mib = max(self.peak_mib, int(out.split()[0]))
            except Exception:  # noqa: BLE001 - no GPU or no nvidia-smi: no figure
                return
            self._stop.wait(0.5)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_service(model: str, w: Workloads, cfg: BenchConfig, tokenizer) -> dict:
    import grpc
    import ray
    from ray import serve

    from ..api.pb import lm_pb2, lm_pb2_grpc
    from ..serve.launch import deploy, load_config, override, start_ray

    gpu = torch.cuda.is_available()
    start_ray(None, free_port(), object_store_mb=1024 if gpu else 256)
    port = free_port()
    serve_cfg = override(load_config(), model=model, num_gpus=1 if gpu else 0, grpc_port=port,
                         http_port=free_port(), replicas=1, engine=cfg.engine)
    serve_cfg["applications"][0]["args"]["frontend"] = cfg.frontend
    t = time.perf_counter()
    deploy(serve_cfg, timeout_s=900)
    startup = time.perf_counter() - t

    async def main():
        opts = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=opts) as ch:
            stub = lm_pb2_grpc.LanguageModelStub(ch)
            await stub.Score(lm_pb2.ScoreRequest(pairs=[lm_pb2.ScorePair(context=w.pairs[0][0], continuation=" 가")]))
            res = {"startup_s": startup}
            if cfg.score:
                res["score_pairs"] = await drive_score(stub, lm_pb2, [[p] for p in w.pairs], w.pair_tokens,
                                                       cfg.score_concurrency)
                res["score_mc"] = await drive_score(stub, lm_pb2, [[(c, x) for x in xs] for c, xs in w.mc],
                                                    w.mc_tokens, max(1, cfg.score_concurrency // 4))
            res["generate"] = {}
            for c in cfg.gen_concurrency:
                res["generate"][str(c)] = await drive_generate(stub, lm_pb2, w.gen_prompt, c, cfg)
            if cfg.traffic_streams:
                res["traffic"] = {}
                for name, reqs in traffic_rows(lm_pb2, tokenizer, w, cfg).items():
                    res["traffic"][name] = await drive_streams(stub, reqs, cfg)
            if cfg.score and cfg.beside_streams:
                # Score beside Generate: the independent-pairs flood again, with sampled streams started with it.
                reqs = traffic_requests(lm_pb2, tokenizer, w, cfg.beside_streams, True, cfg, seed=6)
                flood, streams = await asyncio.gather(
                    drive_score(stub, lm_pb2, [[p] for p in w.pairs], w.pair_tokens, cfg.score_concurrency),
                    drive_streams(stub, reqs, cfg))
                res["beside"] = {"score": flood, "streams": streams,
                                 "score_vs_solo": flood["tokens_per_s"] / res["score_pairs"]["tokens_per_s"]}
            if cfg.open_loop_rates:
                res["open_loop"] = {}
                rates = list(cfg.open_loop_rates)
                for k in itertools.count():
                    if k >= len(rates):  # the grid is done: probe between its passing and failing rates
                        probe = next_probe(res["open_loop"], cfg.goodput_resolution)
                        if probe is None or k >= len(cfg.open_loop_rates) + cfg.goodput_probes:
                            break
                        rates.append(probe)
                    rate = rates[k]
                    n = max(1, round(rate * cfg.open_loop_s))
                    reqs = open_loop_requests(lm_pb2, tokenizer, n, cfg, seed=10 + k)
                    r = await drive_open_loop(stub, reqs, rate, cfg, seed=20 + k)
                    r["probe"] = k >= len(cfg.open_loop_rates)
                    res["open_loop"][str(rate)] = r
                    print(f"open loop {rate}/s: TTFT p99 {r['ttft_s']['p99']}, ITL p99 {r['itl_s']['p99']}, "
                          f"{r['completed']}/{n} completed, errors {r['errors']}", flush=True)
                res["goodput_per_s"] = goodput(res["open_loop"])
            return res

    try:
        with GpuMemorySampler() as mem:
            res = asyncio.run(main())
        res["peak_gpu_memory_mib"] = mem.peak_mib or None
    finally:
        serve.shutdown()
        ray.shutdown()
    return res
