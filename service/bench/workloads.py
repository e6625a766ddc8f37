"""What the benchmark sends: its sizes (BenchConfig), the 5.8B-shape model under test, Score pairs and multiple choice,
the benchmark-path prompt, and real-traffic and open-loop Generate requests."""
from __future__ import annotations

import dataclasses
import itertools
import json
import random
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
    goodput_probes: int = 3
    """Open-loop runs after those rates, each at the midpoint between the highest rate that met the latency objective
    and the lowest above it that did not, until they are goodput_resolution apart: goodput to that resolution,
    not to the rates' spacing."""
    goodput_resolution: float = 1.0
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

    from ..engine.tiny import EOT, PAD, train_tokenizer

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


def gpu_model(model: str | None) -> str:
    """The model to benchmark: the one asked for, else the 5.8B-shape random checkpoint, built if missing."""
    if model:
        return model
    model = BenchConfig.model
    if not (Path(model) / "BUILD.json").exists():
        print(f"building a 5.8B-shape random checkpoint at {model}", flush=True)
        build_checkpoint(Path(model))
    return model


@dataclasses.dataclass
class Workloads:
    pairs: list[tuple[str, str]]
    mc: list[tuple[str, list[str]]]
    gen_prompt: str
    pair_tokens: list[int]  # context + continuation tokens of each pair, as the engine encodes them
    mc_tokens: list[int]  # per question: sum over its pairs


def make_workloads(tokenizer, cfg: BenchConfig, seed: int = 1) -> Workloads:
    from ..engine.text import encode, encode_pair

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


def traffic_requests(pb, tokenizer, w: Workloads, n: int, sampled: bool, cfg: BenchConfig, seed: int = 5,
                     top_logprobs: int | None = None) -> list:
    """n streams as clients send them: prompts of 100-1,000 tokens drawn per request (scaled down in --quick), 256
    new tokens (ignore_eos, so every stream runs to its length), greedy or sampled with temperature 0.8 and top_p
    0.95, each with its own seed; top_logprobs: each token's log-probability and that many alternatives asked."""
    from ..engine.text import encode

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
        if top_logprobs is not None:
            p.logprobs, p.top_logprobs = True, top_logprobs
        out.append(pb.GenerateRequest(token_ids=corpus[start : start + k], parameters=p))
    return out


def _drawn_requests(pb, tokenizer, n: int, prompt: tuple[int, int], new: tuple[int, int], seed: int,
                    corpus_chars: int, sampled, seed_base: int) -> list:
    """n requests, prompt and new-token counts drawn per request; request i sampled (temperature 0.8, top_p 0.95,
    seed seed_base + i) where sampled(i), else greedy; every one runs to its length (ignore_eos)."""
    from ..engine.text import encode

    rng = random.Random(seed)
    corpus = encode(tokenizer, random_korean(rng, corpus_chars))
    out = []
    for i in range(n):
        k, m = rng.randint(*prompt), rng.randint(*new)
        start = rng.randrange(0, len(corpus) - k)
        p = pb.GenerationParameters(max_new_tokens=m, min_new_tokens=m, ignore_eos=True)
        if sampled(i):
            p.temperature, p.top_p, p.seed = 0.8, 0.95, seed_base + i
        out.append(pb.GenerateRequest(token_ids=corpus[start : start + k], parameters=p))
    return out


def mixed_requests(pb, tokenizer, n: int, cfg: BenchConfig, seed: int = 7) -> list:
    """n streams of the widest mix clients send: prompts of 50-1,500 tokens and 16-512 new tokens drawn per request
    (scaled down in --quick), every other one sampled, the rest greedy."""
    prompt, new = ((10, 40), (4, 16)) if cfg.quick else ((50, 1500), (16, 512))
    return _drawn_requests(pb, tokenizer, n, prompt, new, seed, 80_000, lambda i: i % 2 == 1, 2000)


def traffic_rows(pb, tokenizer, w: Workloads, cfg: BenchConfig) -> dict[str, list]:
    """The real-traffic rows by name, each a list of requests started at once: sampled and greedy (prompts 100-1,000,
    256 new), the sampled ones again asking each token's logprobs and 5 alternatives, and the mixed one
    (mixed_requests); the service and the transformers baseline run the same ones."""
    n = cfg.traffic_streams
    return {f"sampled {n}": traffic_requests(pb, tokenizer, w, n, True, cfg),
            f"greedy {n}": traffic_requests(pb, tokenizer, w, n, False, cfg),
            f"logprobs {n}": traffic_requests(pb, tokenizer, w, n, True, cfg, top_logprobs=5),
            f"mixed {n}": mixed_requests(pb, tokenizer, n, cfg)}


def open_loop_requests(pb, tokenizer, n: int, cfg: BenchConfig, seed: int) -> list:
    """n sampled requests as an open-loop client population sends them: prompts of 200-800 tokens and 64-256 new
    tokens drawn per request (scaled down in --quick), temperature 0.8 / top_p 0.95, a seed each."""
    prompt, new = ((10, 40), (4, 16)) if cfg.quick else ((200, 800), (64, 256))
    return _drawn_requests(pb, tokenizer, n, prompt, new, seed, 60_000, lambda i: True, seed * 100_000)
