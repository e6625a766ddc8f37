"""The benchmark: the service end to end (async gRPC client -> Ray Serve -> model) beside in-process baselines on the same model.

    python -m service.bench            # GPU: 5.8B-shape nf4 checkpoint (random weights unless --model is given)
    python -m service.bench --quick    # CPU: the tiny model, same code path, numbers meaningless

Writes one JSON file and prints one Markdown table: each service figure beside its baseline and the ratio.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import gc
import itertools
import json
import os
import platform
import random
import socket
import subprocess
import threading
import time
from pathlib import Path

import torch

HANGUL = [chr(c) for c in range(0xAC00, 0xD7A4)]


@dataclasses.dataclass
class BenchConfig:
    """Sizes of every workload; --quick shrinks them for a CPU."""

    quick: bool = False
    model: str = "/tmp/polyglot-ko-5.8b-random"
    """Checkpoint directory (built if missing and it is the default) or hub id."""
    out: str = "bench-results"
    pairs: int = 2048
    """Independent (context, continuation) pairs: contexts 50-1,000 tokens, continuations 1-30."""
    mc_questions: int = 256
    """Multiple-choice questions: one ~1,000-token context, 4 continuations of 15-25 tokens."""
    mc_context: int = 1000
    score_concurrency: int = 512
    """Score calls in flight at once from the client."""
    gen_tokens: int = 128
    gen_concurrency: tuple[int, ...] = (1, 8, 32, 64, 128)
    gen_prompt: int = 32
    score: bool = True
    """Run the Score workloads (--skip-score: Generate only)."""
    traffic_streams: int = 64
    """Streams of the real-traffic rows (sampled and greedy, prompts 100-1,000 tokens, 256 new); 0: skip them."""
    traffic_tokens: int = 256
    open_loop_rates: tuple[float, ...] = (4, 8, 16, 24, 32)
    """Open-loop Poisson arrival rates (requests/s) of sampled requests, prompts 200-800 tokens, 64-256 new."""
    open_loop_s: float = 20.0
    """Seconds of arrivals at each rate."""
    beside_streams: int = 32
    """Sampled streams run beside the Score flood of the independent pairs (0: skip that row)."""
    gen_timeout_s: float = 120.0
    """Deadline of each Generate stream; a level that cannot finish in time reports errors, not a hang."""
    hflm_batch: int = 64
    frontend: bool = False
    """Serve through the opt-in Frontend deployment (service/serve/frontend.py); False, as shipped: the proxy calls
    the model replicas directly (`--frontend-ab` also runs the Generate rows through it to price the extra hop)."""
    engine: dict = dataclasses.field(default_factory=dict)
    """Engine settings for the service under test, {section: {key: value}} (--engine section.key=value)."""

    @classmethod
    def quick_config(cls, model: str) -> "BenchConfig":
        return cls(quick=True, model=model, pairs=48, mc_questions=6, mc_context=200, score_concurrency=16,
                   gen_tokens=8, gen_concurrency=(1, 4), gen_prompt=8, gen_timeout_s=60, hflm_batch=16,
                   traffic_streams=4, open_loop_rates=(2,), open_loop_s=3.0, beside_streams=4)


# --- the model under test ---------------------------------------------------------------------------

_CUM = list(itertools.accumulate(1.0 / (i + 10) for i in range(len(HANGUL))))


def random_korean(rng: random.Random, n_chars: int) -> str:
    """Korean-looking text: words of 1-4 syllables drawn from a Zipf-like distribution."""
    syllables = rng.choices(HANGUL, cum_weights=_CUM, k=n_chars)
    out, i = [], 0
    while i < n_chars:
        k = rng.randint(1, 4)
        out.append("".join(syllables[i : i + k]))
        i += k
    return " ".join(out)


def build_checkpoint(path: Path, seed: int = 0) -> Path:
    """A checkpoint with polyglot-ko-5.8b's exact shape and random fp16 weights, plus a 30,080-entry byte-level
    BPE tokenizer: every kernel, byte and FLOP of the real model, none of its knowledge."""
    from safetensors.torch import save_file
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from .engine.tiny import EOT, PAD, train_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    tok = train_tokenizer([random_korean(rng, 2000) for _ in range(2000)], vocab_size=30080)
    tok.save_pretrained(path)
    cfg = GPTNeoXConfig(
        vocab_size=30080, hidden_size=4096, num_hidden_layers=28, num_attention_heads=16, intermediate_size=16384,
        rotary_pct=0.25, rotary_emb_base=10000, max_position_embeddings=2048, use_parallel_residual=True,
        tie_word_embeddings=False, bos_token_id=tok.convert_tokens_to_ids(EOT), eos_token_id=tok.convert_tokens_to_ids(EOT),
        pad_token_id=tok.convert_tokens_to_ids(PAD), dtype="float16",
    )
    cfg.save_pretrained(path)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in GPTNeoXForCausalLM(cfg).state_dict().items()}
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if name.endswith(("layernorm.weight", "layer_norm.weight")):
            t = torch.ones(shape, dtype=torch.float16)
        elif len(shape) == 1:
            t = torch.zeros(shape, dtype=torch.float16)
        else:
            t = (torch.randn(shape, generator=g, device=dev, dtype=torch.float16) * 0.02).cpu()
        state[name] = t.contiguous()
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "BUILD.json").write_text(json.dumps({"seed": seed, "kind": "random weights, polyglot-ko-5.8b shape"}))
    return path


# --- workloads --------------------------------------------------------------------------------------

@dataclasses.dataclass
class Workloads:
    pairs: list[tuple[str, str]]
    mc: list[tuple[str, list[str]]]
    gen_prompt: str
    pair_tokens: list[int]  # context + continuation tokens of each pair, as the engine encodes them
    mc_tokens: list[int]  # per question: sum over its pairs


def make_workloads(tokenizer, cfg: BenchConfig, seed: int = 1) -> Workloads:
    from .engine.text import encode, encode_pair

    rng = random.Random(seed)
    eot = tokenizer.eos_token_id
    corpus = encode(tokenizer, random_korean(rng, 200_000))

    def text_of(n: int) -> str:
        start = rng.randrange(0, len(corpus) - n - 1)
        return tokenizer.decode(corpus[start : start + n]).strip() or "가"

    scale = cfg.mc_context / 1000
    pairs = [(text_of(rng.randint(int(50 * scale) or 5, cfg.mc_context)), " " + text_of(rng.randint(1, 30)))
             for _ in range(cfg.pairs)]
    mc = [(text_of(cfg.mc_context), [" " + text_of(rng.randint(15, 25)) for _ in range(4)])
          for _ in range(cfg.mc_questions)]

    def n_tokens(c, x):
        p = encode_pair(tokenizer, c, x, eot)
        return len(p.context_ids) + len(p.continuation_ids)

    return Workloads(
        pairs=pairs,
        mc=mc,
        gen_prompt=text_of(cfg.gen_prompt),
        pair_tokens=[n_tokens(c, x) for c, x in pairs],
        mc_tokens=[sum(n_tokens(c, x) for x in xs) for c, xs in mc],
    )


# --- baselines (in-process, no serving layer) -------------------------------------------------------

def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.inference_mode()
def baseline_raw_forward(lm, w: Workloads, batch: int) -> dict:
    """Plain forward + log-softmax over the vocabulary at every position, length-sorted batches: the ceiling
    a serving layer can approach for Score."""
    from .engine.text import encode_pair

    tok, model, dev = lm.tokenizer, lm.model, lm.device
    seqs = []
    for c, x in w.pairs:
        p = encode_pair(tok, c, x, lm.eos_token_id)
        seqs.append((p.context_ids + p.continuation_ids, len(p.continuation_ids)))
    seqs.sort(key=lambda s: -len(s[0]))

    def run(chunk):
        width = max(len(s) - 1 for s, _ in chunk)
        ids = torch.full((len(chunk), width), tok.pad_token_id or 0, dtype=torch.long)  # [B, T]
        for i, (s, _) in enumerate(chunk):
            ids[i, : len(s) - 1] = torch.tensor(s[:-1])
        logp = torch.log_softmax(model(ids.to(dev)).logits.float(), -1)  # [B, T, V]
        return float(logp[:, -1].sum())

    run(seqs[:batch])  # warm-up
    _sync()
    t = time.perf_counter()
    for i in range(0, len(seqs), batch):
        run(seqs[i : i + batch])
    _sync()
    dt = time.perf_counter() - t
    return {"tokens": sum(w.pair_tokens), "seconds": dt, "tokens_per_s": sum(w.pair_tokens) / dt}


def baseline_hflm(lm, w: Workloads, batch: int) -> dict:
    """lm-evaluation-harness's HFLM `_loglikelihood_tokens` on the same pairs (what evaluation teams run today)."""
    from lm_eval.models.huggingface import HFLM

    from .engine.text import encode_pair

    hf = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=batch, max_length=lm.max_context,
              device=str(lm.device))

    def reqs(pairs):
        out = []
        for c, x in pairs:
            p = encode_pair(lm.tokenizer, c, x, lm.eos_token_id)
            out.append(((c, x), p.context_ids, p.continuation_ids))
        return out

    result = {}
    for name, pairs, tokens in (
        ("pairs", w.pairs, sum(w.pair_tokens)),
        ("mc", [(c, x) for c, xs in w.mc for x in xs], sum(w.mc_tokens)),
    ):
        r = reqs(pairs)
        hf._loglikelihood_tokens(r[:batch], disable_tqdm=True)  # warm-up
        _sync()
        t = time.perf_counter()
        hf._loglikelihood_tokens(r, disable_tqdm=True)
        _sync()
        dt = time.perf_counter() - t
        result[name] = {"tokens": tokens, "seconds": dt, "tokens_per_s": tokens / dt}
    return result


@torch.inference_mode()
def baseline_generate(lm, w: Workloads, cfg: BenchConfig) -> dict:
    """transformers `model.generate`, greedy, exactly gen_tokens new tokens, at batch 1 and each concurrency."""
    from .engine.text import encode

    ids = torch.tensor([encode(lm.tokenizer, w.gen_prompt)], device=lm.device)
    out = {}
    for b in sorted({1, *cfg.gen_concurrency}):
        batch = ids.expand(b, -1)
        kw = dict(max_new_tokens=cfg.gen_tokens, min_new_tokens=cfg.gen_tokens, do_sample=False,
                  pad_token_id=lm.tokenizer.pad_token_id, attention_mask=torch.ones_like(batch))
        lm.model.generate(batch, **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
        _sync()
        t = time.perf_counter()
        lm.model.generate(batch, **kw)
        _sync()
        dt = time.perf_counter() - t
        out[str(b)] = {"tokens": b * cfg.gen_tokens, "seconds": dt, "tokens_per_s": b * cfg.gen_tokens / dt}
    return out


# --- the service ------------------------------------------------------------------------------------

def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _lat(xs: list[float]) -> dict:
    return {"p50": _pct(xs, 0.5), "p99": _pct(xs, 0.99)}


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
        "latency_s": _lat(lat), "mean_batch_pairs": sum(batch_pairs) / max(1, len(batch_pairs)),
    }


async def drive_generate(stub, pb, prompt: str, n_streams: int, cfg: BenchConfig) -> dict:
    """n_streams identical greedy streams of the one short prompt, all started at once (the original workload)."""
    params = pb.GenerationParameters(max_new_tokens=cfg.gen_tokens, min_new_tokens=cfg.gen_tokens, ignore_eos=True)
    return await drive_streams(stub, [pb.GenerateRequest(text=prompt, parameters=params)] * n_streams, cfg)


def traffic_requests(pb, tokenizer, w: Workloads, n: int, sampled: bool, cfg: BenchConfig, seed: int = 5) -> list:
    """n streams as clients send them: prompts of 100-1,000 tokens drawn per request (scaled down in --quick), 256
    new tokens (ignore_eos, so every stream runs to its length), greedy or sampled with temperature 0.8 and top_p
    0.95, each with its own seed."""
    from .engine.text import encode

    rng = random.Random(seed)
    corpus = encode(tokenizer, random_korean(rng, 60_000))
    lo, hi, new = (10, 40, 16) if cfg.quick else (100, 1000, cfg.traffic_tokens)
    out = []
    for i in range(n):
        k = rng.randint(lo, hi)
        start = rng.randrange(0, len(corpus) - k)
        p = pb.GenerationParameters(max_new_tokens=new, min_new_tokens=new, ignore_eos=True)
        if sampled:
            p.temperature, p.top_p, p.seed = 0.8, 0.95, 1000 + i
        out.append(pb.GenerateRequest(token_ids=corpus[start : start + k], parameters=p))
    return out


def open_loop_requests(pb, tokenizer, n: int, cfg: BenchConfig, seed: int) -> list:
    """n sampled requests as an open-loop client population sends them: prompts of 200-800 tokens and 64-256 new
    tokens drawn per request (scaled down in --quick), temperature 0.8 / top_p 0.95, a seed each."""
    from .engine.text import encode

    rng = random.Random(seed)
    corpus = encode(tokenizer, random_korean(rng, 60_000))
    (lo, hi), (nlo, nhi) = ((10, 40), (4, 16)) if cfg.quick else ((200, 800), (64, 256))
    out = []
    for i in range(n):
        k, new = rng.randint(lo, hi), rng.randint(nlo, nhi)
        start = rng.randrange(0, len(corpus) - k)
        p = pb.GenerationParameters(max_new_tokens=new, min_new_tokens=new, ignore_eos=True, temperature=0.8,
                                    top_p=0.95, seed=seed * 100_000 + i)
        out.append(pb.GenerateRequest(token_ids=corpus[start : start + k], parameters=p))
    return out


class _Streams:
    """What a set of GenerateStream calls saw: TTFT, inter-token gaps, latencies, tokens, status codes, outputs."""

    def __init__(self):
        self.ttft, self.itl, self.lat, self.errors, self.tokens, self.outputs = [], [], [], {}, 0, []

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
            self.lat.append(time.perf_counter() - t)
            self.outputs.append((req, ids))
        except grpc.aio.AioRpcError as e:
            self.errors[e.code().name] = self.errors.get(e.code().name, 0) + 1
        self.tokens += n

    def report(self, n: int, seconds: float) -> dict:
        return {"streams": n, "completed": len(self.lat), "errors": self.errors, "seconds": seconds,
                "tokens": self.tokens, "tokens_per_s": self.tokens / seconds,
                "tokens_per_s_per_stream": self.tokens / seconds / n, "ttft_s": _lat(self.ttft),
                "itl_s": _lat(self.itl), "latency_s": _lat(self.lat)}


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_service(model: str, w: Workloads, cfg: BenchConfig, tokenizer) -> dict:
    import grpc
    import ray
    from ray import serve

    from .api.pb import lm_pb2, lm_pb2_grpc
    from .serve.launch import deploy, load_config, override, start_ray

    gpu = torch.cuda.is_available()
    start_ray(None, _free_port(), object_store_mb=1024 if gpu else 256)
    port = _free_port()
    serve_cfg = override(load_config(), model=model, num_gpus=1 if gpu else 0, grpc_port=port,
                         http_port=_free_port(), replicas=1, engine=cfg.engine)
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
                for kind in ("sampled", "greedy"):
                    reqs = traffic_requests(lm_pb2, tokenizer, w, cfg.traffic_streams, kind == "sampled", cfg)
                    res["traffic"][f"{kind} {cfg.traffic_streams}"] = await drive_streams(stub, reqs, cfg)
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
                for k, rate in enumerate(cfg.open_loop_rates):
                    n = max(1, round(rate * cfg.open_loop_s))
                    reqs = open_loop_requests(lm_pb2, tokenizer, n, cfg, seed=10 + k)
                    r = await drive_open_loop(stub, reqs, rate, cfg, seed=20 + k)
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


# --- self-check -------------------------------------------------------------------------------------

class WrongOutput(RuntimeError):
    """The service returned tokens the model does not compute: no figure of this run may be reported."""


def check_outputs(model: str, w: Workloads, service: dict, cfg: BenchConfig) -> dict:
    """The benchmark checks its own outputs before it reports: every completed stream carried exactly the tokens it
    asked for, and a sample of each level's greedy streams holds transformers' own choice at every position
    (service/verify.py; the model reloaded after the service has released the GPU). Raises WrongOutput."""
    from .engine import loader
    from .engine.config import ModelConfig
    from .engine.text import encode
    from .verify import TIE, greedy_gaps

    lm = loader.load(ModelConfig(model=model))
    prompt = encode(lm.tokenizer, w.gen_prompt)
    out: dict = {"tie": TIE, "checked_streams": 0, "max_gap": 0.0}
    problems = []
    levels = [(f"{k} streams", g) for k, g in service["generate"].items()]
    levels += list(service.get("traffic", {}).items())
    for level, g in levels:
        if g["short_streams"]:
            problems.append(f"{level}: {g['short_streams']} streams completed with fewer tokens than asked")
        for ids_in, ids in g["samples"]:
            gaps = greedy_gaps(lm.model, ids_in or prompt, ids, eos_id=lm.eos_token_id, min_new=len(ids))
            out["checked_streams"] += 1
            out["max_gap"] = max(out["max_gap"], max(gaps))
            # A text looping on one token would hide dropped tokens: say how much the checked texts move.
            out["min_distinct_tokens"] = min(out.get("min_distinct_tokens", len(ids)), len(set(ids)))
            if max(gaps) > TIE:
                i = gaps.index(max(gaps))
                problems.append(f"{level}: token {i} ({ids[i]}) is {gaps[i]:.3f} below transformers' choice")
    del lm
    gc.collect()
    out["problems"] = problems
    if problems:
        raise WrongOutput("; ".join(problems))
    return out


# --- report -----------------------------------------------------------------------------------------

def _versions() -> dict:
    import importlib.metadata as md

    v = {"python": platform.python_version(), "torch": torch.__version__}
    for p in ("transformers", "bitsandbytes", "ray", "grpcio", "lm_eval"):
        try:
            v[p] = md.version(p)
        except md.PackageNotFoundError:
            v[p] = None
    return v


def _ratio(a, b):
    return round(a / b, 2) if a and b else None


def table(r: dict) -> str:
    b, s = r["baselines"], r["service"]
    rows = [("Score, independent pairs (tokens/s)", s["score_pairs"]["tokens_per_s"], "HFLM batch 64",
             b["hflm"]["pairs"]["tokens_per_s"]),
            ("Score, independent pairs (tokens/s)", s["score_pairs"]["tokens_per_s"], "raw forward + log-softmax",
             b["raw_forward"]["tokens_per_s"]),
            ("Score, 4-way multiple choice (pair-tokens/s)", s["score_mc"]["tokens_per_s"], "HFLM batch 64",
             b["hflm"]["mc"]["tokens_per_s"])]
    for c, g in s["generate"].items():
        base = b["generate"].get(c)
        rows.append((f"Generate, {c} concurrent streams (tokens/s)", g["tokens_per_s"], f"`generate` batch {c}",
                     base["tokens_per_s"] if base else None))
    traffic = s.get("traffic", {})
    for name, g in traffic.items():  # no transformers baseline of these shapes yet
        rows.append((f"Generate, {name} streams, mixed prompt lengths (tokens/s)", g["tokens_per_s"], "–", None))
    lines = ["| workload | service | baseline | baseline value | ratio |", "|---|---:|---|---:|---:|"]
    for name, sv, bn, bv in rows:
        lines.append(f"| {name} | {sv:,.0f} | {bn} | {bv:,.0f} | {_ratio(sv, bv)} |" if bv else
                     f"| {name} | {sv:,.0f} | {bn} | – | – |")
    lines += ["", "| Generate streams | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | completed | errors |",
              "|---:|---:|---:|---:|---|"]
    ms = lambda x: f"{x * 1000:,.0f}" if x is not None else "–"  # noqa: E731
    for c, g in [*s["generate"].items(), *traffic.items()]:
        lines.append(f"| {c} | {ms(g['ttft_s']['p50'])} / {ms(g['ttft_s']['p99'])} | "
                     f"{ms(g['itl_s']['p50'])} / {ms(g['itl_s']['p99'])} | {g['completed']}/{g['streams']} | "
                     f"{g['errors'] or 0} |")
    sp, mc = s["score_pairs"], s["score_mc"]
    lines += ["", f"Score calls: independent {sp['completed']}/{sp['requests']} completed, errors {sp['errors'] or 0}, "
              f"latency p50/p99 {ms(sp['latency_s']['p50'])}/{ms(sp['latency_s']['p99'])} ms, "
              f"mean pairs per forward {sp['mean_batch_pairs']:.1f}; multiple choice {mc['completed']}/{mc['requests']}, "
              f"errors {mc['errors'] or 0}. Peak GPU memory {s.get('peak_gpu_memory_mib') or '–'} MiB. "
              f"Replica start {s['startup_s']:.0f} s.", "",
              f"Device: {r['device']}; {r['date']}; versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items())]
    return "\n".join(lines)


def traffic_table(s: dict) -> str:
    """Score beside Generate and the open-loop curve, with goodput (empty when neither ran)."""
    ms = lambda x: f"{x * 1000:,.0f}" if x is not None else "–"  # noqa: E731
    lines = []
    if "beside" in s:
        f, g = s["beside"]["score"], s["beside"]["streams"]
        lines += ["| Score flood + sampled streams at once | Score tokens/s (vs solo) | streams tokens/s | "
                  "stream TTFT p99 (ms) | inter-token p50 / p99 (ms) | completed | errors |",
                  "|---|---:|---:|---:|---:|---:|---|",
                  f"| {f['requests']} pairs + {g['streams']} streams | {f['tokens_per_s']:,.0f} "
                  f"({s['beside']['score_vs_solo']:.0%}) | {g['tokens_per_s']:,.0f} | {ms(g['ttft_s']['p99'])} | "
                  f"{ms(g['itl_s']['p50'])} / {ms(g['itl_s']['p99'])} | {f['completed']} + {g['completed']} | "
                  f"{({**f['errors'], **g['errors']}) or 0} |", ""]
    if "open_loop" in s:
        lines += ["| offered (requests/s) | completed/s | tokens/s | TTFT p50 / p99 (ms) | inter-token p50 / p99 (ms) "
                  "| completed | refused or failed | meets TTFT p99 ≤ 1 s, ITL p99 ≤ 100 ms |",
                  "|---:|---:|---:|---:|---:|---:|---|---|"]
        for rate, r in s["open_loop"].items():
            lines.append(f"| {float(rate):g} | {r['completed_per_s']:.1f} | {r['tokens_per_s']:,.0f} | "
                         f"{ms(r['ttft_s']['p50'])} / {ms(r['ttft_s']['p99'])} | {ms(r['itl_s']['p50'])} / "
                         f"{ms(r['itl_s']['p99'])} | {r['completed']}/{r['streams']} | {r['errors'] or 0} | "
                         f"{'yes' if r['meets_goal'] else 'no'} |")
        g = s.get("goodput_per_s")
        lines += ["", f"Goodput (sampled, prompts 200–800, 64–256 new): {g:g} requests/s" if g is not None else
                  "Goodput: no rate met the objective"]
    return "\n".join(lines)


def frontend_hop(front: dict, direct: dict) -> dict:
    """tokens/s of each Generate row through the Frontend and straight to the model replica, and their ratio."""
    rows = {f"{c} streams, benchmark path": (front["generate"][c], direct["generate"][c]) for c in direct["generate"]}
    rows.update({k: (front["traffic"][k], v) for k, v in direct.get("traffic", {}).items()})
    return {name: {"frontend": a["tokens_per_s"], "direct": b["tokens_per_s"],
                   "ratio": a["tokens_per_s"] / b["tokens_per_s"] if b["tokens_per_s"] else None}
            for name, (a, b) in rows.items()}


def hop_table(hop: dict) -> str:
    lines = ["| Generate row | through Frontend (tokens/s) | proxy → replica (tokens/s) | ratio |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {v['frontend']:,.0f} | {v['direct']:,.0f} | {v['ratio']:.3f} |" for k, v in hop.items()]
    return "\n".join(lines)


def _gpu_model(model: str | None) -> str:
    """The model to benchmark: the one asked for, else the 5.8B-shape random checkpoint, built if missing."""
    if model:
        return model
    model = BenchConfig.model
    if not (Path(model) / "BUILD.json").exists():
        print(f"building a 5.8B-shape random checkpoint at {model}", flush=True)
        build_checkpoint(Path(model))
    return model


def _engine_settings(items: list[str]) -> dict:
    """--engine SECTION.KEY=JSON items as {section: {key: value}}."""
    settings: dict = {}
    for item in items:
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        settings.setdefault(section, {})[name] = json.loads(value)
    return settings


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CPU, tiny model, small workloads (the code path, not numbers)")
    ap.add_argument("--model", help="checkpoint dir or hub id (default: the 5.8B-shape random checkpoint / tiny)")
    ap.add_argument("--out", default="bench-results")
    ap.add_argument("--skip-baselines", action="store_true")
    ap.add_argument("--skip-score", action="store_true", help="service: Generate workloads only")
    ap.add_argument("--traffic-streams", type=int, help="streams of the real-traffic rows (0: none)")
    ap.add_argument("--gen-concurrency", help="comma-separated stream counts (default 1,8,32,64,128)")
    ap.add_argument("--gen-tokens", type=int, help="new tokens of each benchmark-path stream (default 128)")
    ap.add_argument("--frontend-ab", action="store_true",
                    help="also run the Generate rows through the opt-in Frontend deployment: the extra hop's cost")
    ap.add_argument("--gen-timeout", type=float, help="deadline of each Generate stream, seconds")
    ap.add_argument("--open-loop-rates", help="comma-separated Poisson arrival rates, requests/s ('' : none)")
    ap.add_argument("--open-loop-s", type=float, help="seconds of arrivals at each open-loop rate")
    ap.add_argument("--beside-streams", type=int, help="sampled streams beside the Score flood (0: none)")
    ap.add_argument("--pairs", type=int, help="independent Score pairs")
    ap.add_argument("--mc-questions", type=int, help="multiple-choice questions")
    ap.add_argument("--engine", action="append", default=[], metavar="SECTION.KEY=JSON",
                    help="engine setting for the service under test, e.g. model.cudnn_attention=true (repeatable)")
    ap.add_argument("--profile-decode", action="store_true", help="GPU: time and profile the decode step only")
    ap.add_argument("--decode-prompt", type=int, default=32, help="--profile-decode: tokens in each row's cache")
    ap.add_argument("--attention-sweep", action="store_true",
                    help="GPU: the fused decode attention alone at the real-traffic shape, over its launch settings")
    ap.add_argument("--engine-traffic", action="store_true",
                    help="the real-traffic rows in-process on the Engine (no Ray, no gRPC), with step times and a "
                         "cProfile of the model thread")
    ap.add_argument("--autoscale", action="store_true", help="multi-GPU: scale up under load and back down")
    ap.add_argument("--profile-score", action="store_true", help="Score in-process: throughput, kernels, invariance")
    args = ap.parse_args(argv)
    if args.profile_score:
        if args.quick:
            from .engine.tiny import ensure
            return profile_score(args.model or str(ensure(Path(".models/tiny"))), Path(args.out),
                                 BenchConfig.quick_config(""))
        return profile_score(_gpu_model(args.model), Path(args.out))
    if args.autoscale:
        return autoscale_run(_gpu_model(args.model), Path(args.out), max_replicas=max(2, torch.cuda.device_count()))
    if args.profile_decode:
        return profile_decode(_gpu_model(args.model), Path(args.out), prompt_len=args.decode_prompt)
    if args.attention_sweep:
        return attention_sweep(Path(args.out))
    if args.engine_traffic:
        if args.quick:
            from .engine.tiny import ensure
            return engine_traffic(args.model or str(ensure(Path(".models/tiny"))), Path(args.out),
                                  BenchConfig.quick_config(""))
        return engine_traffic(_gpu_model(args.model), Path(args.out),
                              BenchConfig(model="", engine=_engine_settings(args.engine)))

    if args.quick:
        from .engine.tiny import ensure
        model = args.model or str(ensure(Path(".models/tiny")))
        cfg = BenchConfig.quick_config(model)
    else:
        cfg = BenchConfig()
        model = _gpu_model(args.model)
    cfg.out = args.out
    if args.gen_concurrency:
        cfg.gen_concurrency = tuple(int(x) for x in args.gen_concurrency.split(","))
    if args.gen_tokens:
        cfg.gen_tokens = args.gen_tokens
    if args.gen_timeout:
        cfg.gen_timeout_s = args.gen_timeout
    if args.skip_score:
        cfg.score = False
    if args.open_loop_rates is not None:
        cfg.open_loop_rates = tuple(float(x) for x in args.open_loop_rates.split(",") if x)
    if args.open_loop_s:
        cfg.open_loop_s = args.open_loop_s
    if args.beside_streams is not None:
        cfg.beside_streams = args.beside_streams
    if args.traffic_streams is not None:
        cfg.traffic_streams = args.traffic_streams
    if args.pairs:
        cfg.pairs = args.pairs
    if args.mc_questions:
        cfg.mc_questions = args.mc_questions
    cfg.engine = _engine_settings(args.engine)

    from .engine import loader
    from .engine.config import ModelConfig

    t = time.perf_counter()
    lm = loader.load(ModelConfig(model=model))
    print(f"baseline model loaded in {time.perf_counter() - t:.1f}s on {lm.device}", flush=True)
    w = make_workloads(lm.tokenizer, cfg)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    result = {"date": datetime.date.today().isoformat(), "device": device, "versions": _versions(),
              "config": dataclasses.asdict(cfg), "model": model, "quantization": lm.quantization,
              "compute_dtype": str(lm.compute_dtype)}
    if not args.skip_baselines:
        b = {}
        t = time.perf_counter()
        b["raw_forward"] = baseline_raw_forward(lm, w, cfg.hflm_batch)
        b["hflm"] = baseline_hflm(lm, w, cfg.hflm_batch)
        b["generate"] = baseline_generate(lm, w, cfg)
        print(f"baselines done in {time.perf_counter() - t:.0f}s", flush=True)
        result["baselines"] = b
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "baselines.json").write_text(json.dumps(result, indent=2))  # kept if the service fails
    tokenizer = lm.tokenizer
    del lm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    t = time.perf_counter()
    result["service"] = run_service(model, w, cfg, tokenizer)
    print(f"service done in {time.perf_counter() - t:.0f}s", flush=True)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.frontend_ab:
        front = dataclasses.replace(cfg, frontend=True, score=False, open_loop_rates=())
        result["service_frontend"] = run_service(model, w, front, tokenizer)
        result["frontend_hop"] = frontend_hop(result["service_frontend"], result["service"])
        (out / "frontend-hop.json").write_text(json.dumps(result["frontend_hop"], indent=2))
        print(hop_table(result["frontend_hop"]), flush=True)
    stem = f"bench-{'quick' if cfg.quick else 'gpu'}"
    try:
        result["check"] = check_outputs(model, w, result["service"], cfg)
    except WrongOutput as e:
        result["check"] = {"problems": str(e)}
        (out / f"{stem}-WRONG.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
        raise SystemExit(f"BENCHMARK FAILED ITS OUTPUT CHECK, no table: {e}") from None
    print(f"output check: {result['check']['checked_streams']} streams hold transformers' tokens "
          f"(largest gap {result['check']['max_gap']:.3f} <= {result['check']['tie']})", flush=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    md = "\n\n".join(x for x in (table(result) if "baselines" in result else "", traffic_table(result["service"])) if x)
    if md:
        (out / f"{stem}.md").write_text(md + "\n")
        print(md)
    return result



def profile_decode(model: str, out: Path, batches=(1, 8, 64), prompt_len: int = 32, steps: int = 50) -> dict:
    """Where a decode step's time goes, without the serving layer: step time eager, in a CUDA graph, and in
    graphs launched back to back as the pipelined scheduler does (decode_again), with the torch glue, with
    the fused Triton kernels (engine/fused.py), and with those plus dequantized weights for batches above one
    (GenerationConfig.dequantized_decode), at several batch sizes; and the top kernels of eager steps
    (torch.profiler: batch 1, and batch 64 with the dequantized weights)."""
    from torch.profiler import ProfilerActivity, profile

    from .engine import loader
    from .engine.config import ModelConfig
    from .engine.neox import NeoxRunner, dequantized_weights

    lm = loader.load(ModelConfig(model=model))
    res: dict = {"device": torch.cuda.get_device_name(0), "steps": {}}
    tables = []
    for fused, dense in ((False, False), (True, False), (True, True)):
        window = min(lm.max_context, 1024)
        name = ("fused" if fused else "torch") + (" dequantized" if dense else "")
        runner = NeoxRunner(lm.model, max(batches), window, use_graphs=True, fused_decode=fused,
                            dense=dequantized_weights(lm.model, lm.compute_dtype) if dense else None)
        assert runner.fused == fused, "fused kernels failed their start-up check (see the log)"
        for b in batches:
            bases = [i * window for i in range(b)]
            runner.prefill_new(bases, [[5 + i % 100] * prompt_len for i in range(b)])
            row = {}
            for mode in ("eager", "graph", "pipelined"):
                runner.use_graphs = mode != "eager"
                tokens, pos = [7] * b, [prompt_len] * b
                runner.decode(tokens, pos, bases)  # warm-up / capture
                _sync()
                t = time.perf_counter()
                for i in range(steps):
                    if mode == "pipelined":
                        runner.decode_again(b, prompt_len + 1 + i)
                    else:
                        runner.decode(tokens, pos, bases)
                _sync()
                row[f"{mode}_ms"] = (time.perf_counter() - t) / steps * 1000
            res["steps"][f"{name} b={b}"] = row
            print(name, b, row, flush=True)
        runner.use_graphs = False
        b = max(batches) if dense else 1
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                runner.decode([7] * b, [prompt_len] * b, [i * window for i in range(b)])
            _sync()
        tables.append(f"{name}: 5 eager batch-{b} steps\n"
                      + prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
        del runner
        torch.cuda.empty_cache()
    table = "\n\n".join(tables)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode-profile.txt").write_text(table)
    (out / "decode-profile.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    print(table)
    return res


def attention_sweep(out: Path, heads: int = 16, head_dim: int = 256, iters: int = 30) -> dict:
    """The fused decode attention alone (engine/fused.py) at serving shapes: rows x key counts drawn per row
    (1 to 128 rows; the real-traffic 100-1,256 keys in the 2,048-position bucket, 100-1,000 in the 1,024 one), for
    split counts, key blocks and warp counts: microseconds per layer and the bandwidth its key and
    value reads reach (what the kernel is bound by). Each case also times the launch settings the engine picks."""
    from .engine import fused

    dev = torch.device("cuda")
    window = 2048
    cases = [(1, 100, 1256, 2048), (8, 100, 1256, 2048), (64, 100, 1256, 2048), (64, 100, 1000, 1024),
             (128, 100, 1256, 2048), (64, 20, 160, 256)]
    res: dict = {"device": torch.cuda.get_device_name(0), "cases": []}
    kc, vc = (torch.randn(heads, 128 * window, head_dim, dtype=torch.float16, device=dev) for _ in range(2))

    def timed(*args, **kw) -> float:
        """GPU microseconds per call, `iters` calls replayed from one CUDA graph as the engine's decode step runs
        them (timed eagerly, small calls would measure Python's launch overhead instead)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fused.decode_attention(*args, **kw)  # compile outside the capture
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(iters):
                fused.decode_attention(*args, **kw)
        g.replay()
        _sync()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        _sync()
        return e0.elapsed_time(e1) / iters * 1000

    for rows, lo, hi, tmax in cases:
        rng = random.Random(rows)
        lens = [rng.randint(lo, hi) for _ in range(rows)]
        q = torch.randn(rows, heads, 1, head_dim, dtype=torch.float16, device=dev)
        start = torch.tensor([i * window for i in range(rows)], device=dev)
        pos = torch.tensor([n - 1 for n in lens], device=dev)
        read = sum(lens) * heads * head_dim * 2 * 2  # bytes of keys and values
        case = {"rows": rows, "keys": [lo, hi], "tmax": tmax, "runs": []}
        for splits in (1, 2, 4, 8, 16):
            for block_t in (64, 128):
                for warps in (2, 4):
                    us = timed(q, kc, vc, start, pos, tmax, splits=splits, block_t=block_t, num_warps=warps)
                    case["runs"].append({"splits": splits, "block_t": block_t, "warps": warps, "us": us,
                                         "tb_per_s": read / us / 1e6})
        us = timed(q, kc, vc, start, pos, tmax)
        splits, block_t, warps = fused.attention_launch(rows * heads, tmax, dev)
        case["engine_default"] = {"splits": splits, "block_t": block_t, "warps": warps, "us": us,
                                  "tb_per_s": read / us / 1e6}
        # The settings before this sweep: splits for the multiprocessors only, 4 warps.
        old = max(1, min(-(-fused._sms(dev) // (rows * heads)), tmax // 256, 32))
        us = timed(q, kc, vc, start, pos, tmax, splits=old, num_warps=4)
        case["before"] = {"splits": old, "warps": 4, "us": us, "tb_per_s": read / us / 1e6}
        case["best"] = min(case["runs"], key=lambda r: r["us"])
        res["cases"].append(case)
        print(json.dumps({k: case[k] for k in ("rows", "keys", "tmax", "best", "engine_default", "before")}), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention-sweep.json").write_text(json.dumps(res, indent=2))
    return res


def engine_traffic(model: str, out: Path, cfg: BenchConfig | None = None) -> dict:
    """The real-traffic rows (sampled and greedy streams, prompts of 100-1,000 tokens, 256 new, all at once) run
    in-process on the Engine with the shipped engine config, no Ray or gRPC: set beside the service's rows, the
    difference is the serving layer's. Records every engine step's wall time by kind (pipelined: launched on the
    device's own tokens; full: with prefill or host-chosen tokens), and a cProfile of the model thread during a
    second sampled run (where the host's time per step goes)."""
    import cProfile
    import io
    import pstats

    from .api.pb import lm_pb2
    from .api.validation import generation_params
    from .engine.config import EngineConfig
    from .engine.engine import Engine
    from .serve.app import split_args
    from .serve.launch import load_config, override

    cfg = cfg or BenchConfig(model=model)
    args, _, _ = split_args(override(load_config(), model=model, engine=cfg.engine)["applications"][0]["args"])
    engine = Engine(EngineConfig.from_dict(args))
    sched = engine.scheduler
    steps: list[tuple[str, float]] = []  # (kind, seconds)
    step = sched.step

    def timed_step():
        kind = "pipelined" if sched._pending is not None else "full"
        t = time.perf_counter()
        try:
            return step()
        finally:
            steps.append((kind, time.perf_counter() - t))

    sched.step = timed_step
    profiler = None
    gen_step = engine._generation_step

    def profiled_step():
        if profiler is None:
            return gen_step()
        profiler.enable()
        try:
            return gen_step()
        finally:
            profiler.disable()

    engine._generation_step = profiled_step

    async def run(reqs) -> dict:
        ttft, itl, tokens = [], [], 0

        async def one(r):
            nonlocal tokens
            t = last = time.perf_counter()
            first = True
            async for chunk, _ in engine.generate(list(r.token_ids), generation_params(r.parameters, engine.cfg.limits)):
                now = time.perf_counter()
                k = len(chunk.token_ids)
                if first:
                    ttft.append(now - t)
                    first = False
                elif k:
                    itl.extend([(now - last) / k] * k)
                last, tokens = now, tokens + k

        t0 = time.perf_counter()
        await asyncio.gather(*(one(r) for r in reqs))
        dt = time.perf_counter() - t0
        return {"streams": len(reqs), "seconds": dt, "tokens": tokens, "tokens_per_s": tokens / dt,
                "ttft_s": _lat(ttft), "itl_s": _lat(itl)}

    def by_kind() -> dict:
        res = {}
        for kind in ("pipelined", "full"):
            xs = [d for k, d in steps if k == kind]
            if xs:
                res[kind] = {"steps": len(xs), "mean_ms": 1000 * sum(xs) / len(xs), "p50_ms": 1000 * _pct(xs, 0.5),
                             "p99_ms": 1000 * _pct(xs, 0.99), "total_s": sum(xs)}
        return res

    n = cfg.traffic_streams or 64
    res: dict = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "rows": {}}
    tok = engine.lm.tokenizer
    try:
        asyncio.run(run(traffic_requests(lm_pb2, tok, None, 4, True, cfg, seed=9)))  # warm-up
        for kind in ("sampled", "greedy"):
            steps.clear()
            row = asyncio.run(run(traffic_requests(lm_pb2, tok, None, n, kind == "sampled", cfg)))
            row["engine_steps"] = by_kind()
            res["rows"][f"{kind} {n}"] = row
            print(f"engine {kind} {n}:", json.dumps(row), flush=True)
        profiler = cProfile.Profile()
        asyncio.run(run(traffic_requests(lm_pb2, tok, None, n, True, cfg)))
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
    finally:
        engine.close()
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine-traffic.json").write_text(json.dumps(res, indent=2))
    (out / "engine-traffic-profile.txt").write_text(text.getvalue())
    print(text.getvalue()[:6000])
    return res


def profile_score(model: str, out: Path, cfg: BenchConfig | None = None) -> dict:
    """Score without the serving layer: the engine's own throughput on the bench's pairs and multiple-choice
    questions (all submitted at once, as the batcher would see them), the top kernels of one batch of each
    kind, and the nf4 batch-invariance figure (each pair alone vs in a full batch)."""
    import asyncio

    from torch.profiler import ProfilerActivity, profile

    from .engine.config import EngineConfig, ModelConfig
    from .engine.engine import Engine, ScoreOptions
    from .engine.scoring import group_choices, layout
    from .engine.text import encode_pair

    cfg = cfg or BenchConfig()
    engine = Engine(EngineConfig(model=ModelConfig(model=model)))
    w = make_workloads(engine.lm.tokenizer, cfg)
    loop = asyncio.new_event_loop()
    opts = ScoreOptions()
    res: dict = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}

    def timed(calls: list[list[tuple[str, str]]], tokens: int) -> tuple[dict, list]:
        async def all_at_once():
            return await asyncio.gather(*(engine.score(c, opts) for c in calls))

        loop.run_until_complete(all_at_once())  # warm-up
        _sync()
        t = time.perf_counter()
        results = loop.run_until_complete(all_at_once())
        _sync()
        dt = time.perf_counter() - t
        return {"tokens": tokens, "seconds": dt, "tokens_per_s": tokens / dt}, results

    res["pairs"], together = timed([[p] for p in w.pairs], sum(w.pair_tokens))
    res["mc"], _ = timed([[(c, x) for x in xs] for c, xs in w.mc], sum(w.mc_tokens))

    # Batch invariance: the first 64 pairs one call at a time (batches of 1) vs inside the full run above.
    alone = [loop.run_until_complete(engine.score([p], opts))[0].logprob for p in w.pairs[:64]]
    diffs = [abs(a - r[0].logprob) for a, r in zip(alone, together[:64])]
    res["batch_invariance"] = {"pairs": 64, "max_abs_diff": max(diffs), "mean_abs_diff": sum(diffs) / len(diffs),
                               "max_rel_diff": max(d / max(abs(r[0].logprob), 1e-9) for d, r in zip(diffs, together))}

    print(json.dumps(res, indent=2), flush=True)
    tok, eot, window = engine.lm.tokenizer, engine.lm.eos_token_id, engine.window
    items = sorted((layout(encode_pair(tok, c, x, eot), window, False) for c, x in w.pairs), key=lambda it: it.length)
    budget = engine._max_batch_tokens  # one batch as the batcher would form it: mid-length pairs up to the budget
    mid = len(items) // 2
    longest = items[min(mid + 32, len(items) - 1)].length
    items = items[mid : mid + max(1, budget // longest)][:64]
    groups = [group_choices([encode_pair(tok, c, x, eot) for x in xs], window) for c, xs in w.mc[:8]]
    tables = {}
    for name, fn in (("pairs", lambda: engine.scorer.forward(items)),
                     ("mc", lambda: engine.scorer.forward_groups(groups))):
        fn()
        _sync()
        t = time.perf_counter()
        fn()
        _sync()
        res[f"{name}_one_batch_ms"] = (time.perf_counter() - t) * 1000
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            _sync()
        tables[name] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=20)
    out.mkdir(parents=True, exist_ok=True)
    (out / "score-profile.txt").write_text("\n\n".join(f"== {k} ==\n{v}" for k, v in tables.items()))
    (out / "score-profile.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    for k, v in tables.items():
        print(f"== {k} ==\n{v}")
    engine.close()
    return res


def autoscale_run(model: str, out: Path, streams: int = 96, load_s: float = 90, max_replicas: int = 2) -> dict:
    """Multi-GPU autoscaling: the Serve config's policy with short delays, one GPU per replica; `streams` looping
    Generate clients for `load_s`, then quiet. Records replicas and per-GPU memory over time."""
    import grpc
    import ray
    from ray import serve

    from .api.pb import lm_pb2, lm_pb2_grpc
    from .serve.launch import deploy, load_config, override, start_ray

    start_ray(None, _free_port(), object_store_mb=1024)
    port = _free_port()
    cfg = override(load_config(), model=model, num_gpus=1, grpc_port=port, http_port=_free_port())
    dep = cfg["applications"][0]["deployments"][0]
    dep["autoscaling_config"].update(min_replicas=1, initial_replicas=1, max_replicas=max_replicas,
                                     target_ongoing_requests=16, upscale_delay_s=5, downscale_delay_s=20)
    t0 = time.perf_counter()
    deploy(cfg, timeout_s=600)
    timeline, stop, done = [], threading.Event(), {"ok": 0, "errors": 0}

    def sample():
        while not stop.is_set():
            st = serve.status().applications["polyglot"].deployments["LanguageModel"]
            mem = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True).stdout.split("\n")
            timeline.append({"t": round(time.perf_counter() - t0, 1), "replicas": dict(st.replica_states),
                             "gpu_mem_mib": [int(x.split(",")[1]) for x in mem if x.strip()]})
            stop.wait(2)

    async def client_loop(deadline):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = lm_pb2_grpc.LanguageModelStub(ch)
            params = lm_pb2.GenerationParameters(max_new_tokens=128, min_new_tokens=128, ignore_eos=True)

            async def one():
                while time.perf_counter() < deadline:
                    try:
                        async for _ in stub.GenerateStream(lm_pb2.GenerateRequest(text="서울의 봄은", parameters=params),
                                                           timeout=120):
                            pass
                        done["ok"] += 1
                    except grpc.aio.AioRpcError:
                        done["errors"] += 1

            await asyncio.gather(*(one() for _ in range(streams)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        asyncio.run(client_loop(time.perf_counter() + load_s))
        quiet_end = time.perf_counter() + 90
        while time.perf_counter() < quiet_end:
            st = serve.status().applications["polyglot"].deployments["LanguageModel"].replica_states
            if st.get("RUNNING", 0) == 1 and len(timeline) > 3:
                break
            time.sleep(2)
        time.sleep(4)
    finally:
        stop.set()
        sampler.join(timeout=10)
        serve.shutdown()
        ray.shutdown()
    res = {"device": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(), "streams": streams,
           "load_s": load_s, "requests": done, "max_replicas_seen": max(e["replicas"].get("RUNNING", 0) for e in timeline),
           "final_replicas": timeline[-1]["replicas"] if timeline else None, "timeline": timeline}
    out.mkdir(parents=True, exist_ok=True)
    (out / "autoscale.json").write_text(json.dumps(res, indent=2))
    print(json.dumps({k: v for k, v in res.items() if k != "timeline"}, indent=2))
    for e in timeline[:: max(1, len(timeline) // 25)]:
        print(e)
    return res


if __name__ == "__main__":
    main()
