"""Configuration dataclasses of the engine, one per area, each field documented."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping


@dataclasses.dataclass
class ModelConfig:
    """Which model to load and how."""

    model: str = ".models/tiny"
    """Hub id (e.g. EleutherAI/polyglot-ko-5.8b) or local directory of a transformers checkpoint."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); None takes the default branch."""
    quantization: str = "nf4"
    """Weight quantization: "nf4" or "fp4" (bitsandbytes 4-bit) or "none". Ignored for a checkpoint
    saved already quantized, whose own quantization config wins."""
    double_quant: bool = False
    """bitsandbytes double quantization (quantizes the quantization constants: ~0.4 bit/param less)."""
    compute_dtype: str = "auto"
    """Matmul/activation dtype: "auto" (float16 on GPU, float32 on CPU), "float16", "bfloat16", "float32"."""
    device: str = "auto"
    """"auto" (cuda:0 when a GPU is visible, else cpu), "cpu", or "cuda:N"."""
    max_context: int = 0
    """Window in tokens; 0 takes the model's max_position_embeddings."""
    stall_s: float = 120.0
    """Health: one task of the model thread (an engine step, a Score batch) running longer than this reads as a
    wedged device, and health checks fail; the longest legal task is about a second."""
    cudnn_attention: bool = False
    """Let torch use cuDNN's fused attention on the GPU. Off by default: cuDNN builds a kernel for each new
    attention shape at its first use, which showed as slow first requests of each length (time to first
    token, cold multiple-choice runs); flash and memory-efficient attention have no such cost."""


@dataclasses.dataclass
class LimitsConfig:
    """Per-request limits; requests beyond them are rejected as invalid."""

    max_new_tokens: int = 1024
    """Most tokens one Generate may ask for."""
    default_new_tokens: int = 64
    """max_new_tokens when a request leaves it 0."""
    max_score_pairs: int = 256
    """Most pairs in one Score call."""
    max_stop_sequences: int = 8
    """Most stop sequences in one Generate."""
    max_top_logprobs: int = 20
    """Most alternatives per position in token details."""
    max_score_details: int = 65536
    """Most token-detail entries one Score call may return: continuation tokens x (1 + top_logprobs), summed over
    its pairs (each entry is a Python object built on the model thread and a string decoded for the client; 256
    long pairs with 20 alternatives were 2.7M entries, 34 MB and 38 s on 2 cores). Beyond it: INVALID_ARGUMENT."""
    max_text_chars: int = 200_000
    """Most characters in any one text field (a cheap guard before tokenizing)."""
    max_request_bytes: int = 4 << 20
    """Largest serialized request message; bigger ones are refused before any work (INVALID_ARGUMENT).
    The proxy's transport limit (RAY_SERVE_GRPC_MAX_MESSAGE_SIZE, set by the launcher) sits above it."""
    retry_after_ms: int = 1000
    """Back-off sent with RESOURCE_EXHAUSTED (queue full, out of GPU memory) in the standard
    `grpc-retry-pushback-ms` trailer, which gRPC clients with a retry policy obey."""


@dataclasses.dataclass
class BatchConfig:
    """Dynamic batching of Score requests."""

    max_batch_tokens: int = 0
    """Padded tokens per forward pass (rows x longest row); 0: 32768 on GPU, 4096 on CPU."""
    max_batch_pairs: int = 256
    """Most pairs per forward pass."""
    max_wait_ms: float = 2.0
    """How long a lone request waits for company before its batch starts anyway."""
    max_choice_prefix_tokens: int = 8192
    """Multiple choice: context tokens per forward pass (their keys and values are held for the choices)."""
    max_batch_tokens_while_generating: int = 2048
    """While Generate streams run, Score forward passes hold at most this many tokens (and multiple-choice
    passes this many context tokens): the model thread alternates engine steps and Score batches, so a batch's
    time is the streams' inter-token gap (32,768 tokens are ~0.8 s on an H200; 2,048 ~50 ms:
    measured, 32 streams beside a Score flood kept inter-token p99 at 129 ms, 3,072 at 167 ms). 0: no cap."""
    max_queue_pairs: int = 65536
    """Pairs waiting beyond this make new Score calls fail with "queue full" (RESOURCE_EXHAUSTED)."""
    max_queue_ms: int = 0
    """Longest a Score call's work waits to start: a call whose tokens, behind those queued, would not start in
    this time at the rate the queue drained over the last ~10 s is refused with RESOURCE_EXHAUSTED and the retry
    hint, and work still queued after it is refused then. The caller's deadline (metadata `polyglot-timeout-ms`)
    applies too: a call that would not be done within 90 % of it is refused at once. 0: only the caller's deadline
    (an evaluation pipeline that sends none waits as long as its work takes)."""


@dataclasses.dataclass
class GenerationConfig:
    """Continuous batching of Generate requests over a static KV cache."""

    max_slots: int = 0
    """Sequences decoded together (batch rows); 0: 128 on GPU, 8 on CPU."""
    kv_cache_tokens: int = 0
    """Token positions in the KV cache, shared by the running sequences (each reserves prompt +
    max_new_tokens); 0: what kv_cache_memory_fraction of the free GPU memory holds, at most a full
    window per sequence (on CPU: a full window per sequence)."""
    kv_cache_memory_fraction: float = 0.8
    """Share of the GPU memory free after loading and a Score warm-up given to the KV cache (the rest
    is headroom for CUDA graphs, prefill and sampling)."""
    prefill_chunk: int = 2048
    """Prompt tokens prefilled per engine step: bounds how long a newcomer stalls running streams. 2048 was
    measured against 512 on an H100 (64 streams +9 % tokens/s, TTFT p99 373 -> 227 ms; inter-token p99 at 32
    streams 27 -> 41 ms, the price of longer stalls)."""
    max_waiting: int = 1024
    """Requests waiting for a slot beyond this make Generate fail with "queue full" (RESOURCE_EXHAUSTED)."""
    backfill_lookahead: int = 16
    """While the request at the head of the queue finds no free KV-cache range long enough, up to this many
    requests behind it may take a free range instead, each only if it does not delay the earliest step at which the
    head fits (engine/kvspace.py's backfilling; the head's wait is bounded by when the running sequences finish at
    the latest). Replayed on mixed lengths where the pool is the limit (a 24 GB GPU), it cut the p99 wait 2.3-3.5x
    (README, Performance); 0: strict arrival order."""
    max_queue_ms: int = 30_000
    """Longest a Generate waits for a batch row: one whose expected wait (queue position / how fast the queue
    drained over the last ~10 s) is longer, or that has waited this long, is refused with RESOURCE_EXHAUSTED and
    the retry hint, not left waiting minutes. A request's own deadline (metadata `polyglot-timeout-ms`, which the
    Python client sends with every timeout) lowers it; 0: no limit besides max_waiting."""
    cuda_graphs: bool = True
    """Capture the decode step in CUDA graphs (GPU only)."""
    fused_decode: bool = True
    """Run the decode step's rotary embedding, cache write, layer norms and attention as the Triton kernels
    of engine/fused.py (GPU with Triton; checked against the torch code at start, which runs otherwise)."""
    dequantized_decode: str = "auto"
    """"on": every forward pass of more than one token (Score, prefill, decode steps of two or more sequences)
    multiplies by fp16 copies of the 4-bit weights, dequantized once at start by bitsandbytes (2 bytes per
    parameter more GPU memory: 11.3 GB for polyglot-ko-5.8b), instead of bitsandbytes' 4-bit layers (built for
    few rows; for more they dequantize each weight on every call, then run the same GEMM); batch-1 decode keeps
    the 4-bit GEMV. "auto": on where the copies take at most a quarter of the GPU's memory (an 80 GB GPU, not a
    24 GB one). "off": never."""
    four_bit_matmul_rows: int = 0
    """Forward passes of at most this many rows (decode steps of that many sequences) multiply by
    engine/gemm4bit.py's Triton kernel on the packed 4-bit weights (a quarter of the fp16 copies' bytes), with the
    launch measured fastest per weight shape at start (GPU with Triton); more rows use the dense copies
    (dequantized_decode) or bitsandbytes. 0: off."""
    kv_cache_dtype: str = "auto"
    """The KV cache's storage: "auto", the model's compute dtype; "int8", one byte per value with a float32 scale
    per (head, token) vector (engine/kvcache.py): half the memory, so twice the positions in the same space; no
    faster per step on an H200 (its attention kernel is bound by arithmetic). Generated tokens may then differ from
    the model's own computation where two candidates are nearly tied; Score never reads this cache."""
    stream_messages_per_step: int = 16
    """While at most this many sequences run, every generated token is its own stream message; above it,
    each message carries ceil(running / this) tokens (the first token always goes alone), so a replica
    sends about this many stream messages per decode step whatever the load: each one costs host time in
    Ray Serve's replica and proxy. 0: one message per token always."""


@dataclasses.dataclass
class EngineConfig:
    """Everything the engine needs, as one object (the Ray Serve app builds it from its args)."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    limits: LimitsConfig = dataclasses.field(default_factory=LimitsConfig)
    batch: BatchConfig = dataclasses.field(default_factory=BatchConfig)
    generation: GenerationConfig = dataclasses.field(default_factory=GenerationConfig)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "EngineConfig":
        """Build from a nested mapping such as the Serve config's `args`; unknown keys are an error."""
        d = dict(d or {})
        parts = {}
        for f in dataclasses.fields(cls):
            sub = d.pop(f.name, None) or {}
            klass = f.default_factory  # type: ignore[misc]
            names = {x.name for x in dataclasses.fields(klass)}
            unknown = set(sub) - names
            if unknown:
                raise ValueError(f"unknown {f.name} settings: {sorted(unknown)}")
            parts[f.name] = klass(**sub)
        if d:
            raise ValueError(f"unknown config sections: {sorted(d)}")
        return cls(**parts)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
