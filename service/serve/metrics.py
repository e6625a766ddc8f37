"""Maps the engine's stats records to Prometheus metrics through Ray's metrics pipeline (ray.serve.metrics).

Ray's pipeline rather than prometheus_client: every replica's series are tagged with application,
deployment and replica by Ray and exported on the node's one metrics port, so scaling to many
replicas and nodes needs no extra scrape targets.
"""
from __future__ import annotations

import time

from ray.serve.metrics import Counter, Gauge, Histogram

from ..engine.stats import GenerationStats, ScoreBatchStats, Stats

_LATENCY = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
_TOKENS = [16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536]


class Metrics:
    """Created once per replica; `record` is the engine's stats sink, `request` counts RPCs."""

    def __init__(self):
        self.requests = Counter(
            "polyglot_requests_total", description="RPCs answered, by method and gRPC status code.",
            tag_keys=("method", "code"),
        )
        self.request_latency = Histogram(
            "polyglot_request_latency_seconds", description="Time from RPC arrival at the replica to its answer.",
            boundaries=_LATENCY, tag_keys=("method",),
        )
        self.batch_pairs = Histogram(
            "polyglot_score_batch_pairs", description="Pairs per Score forward pass.", boundaries=_SIZES
        )
        self.batch_tokens = Histogram(
            "polyglot_score_batch_tokens", description="Padded tokens per Score forward pass.", boundaries=_TOKENS
        )
        self.queue_time = Histogram(
            "polyglot_score_queue_seconds", description="Wait of a Score batch's oldest pair before its forward pass.",
            boundaries=_LATENCY,
        )
        self.scored_tokens = Counter("polyglot_scored_tokens_total", description="Input tokens run through Score.")
        self.padded_tokens = Counter(
            "polyglot_score_padding_tokens_total", description="Padding tokens computed by Score (waste)."
        )
        self.generated_tokens = Counter("polyglot_generated_tokens_total", description="Tokens generated.")
        self.prompt_tokens = Counter("polyglot_prompt_tokens_total", description="Prompt tokens prefilled.")
        self.ttft = Histogram(
            "polyglot_time_to_first_token_seconds", description="Generate: request start to first token.",
            boundaries=_LATENCY,
        )
        self.itl = Histogram(
            "polyglot_inter_token_latency_seconds", description="Generate: time between consecutive tokens (a message of m tokens counts m gaps of its wait / m).",
            boundaries=_LATENCY,
        )

        self.gen_queue_time = Histogram(
            "polyglot_generation_queue_seconds",
            description="Generate: wait for a batch row (from joining the queue to admission), of requests that got one.",
            boundaries=_LATENCY,
        )
        self.refusals = Counter(
            "polyglot_refused_total",
            description="Requests refused with RESOURCE_EXHAUSTED by the replica's queues, by method and reason: "
                        "queue_full, expected_wait (its wait would pass its deadline), waited_too_long.",
            tag_keys=("method", "reason"),
        )

        self.gen_running = Gauge("polyglot_generation_running", description="Sequences in the decode batch.")
        self.gen_waiting = Gauge("polyglot_generation_waiting", description="Generate requests waiting to join the decode batch.")
        self.kv_slots = Gauge("polyglot_kv_cache_slots", description="Most sequences decoded together (batch rows).")
        self.kv_tokens = Gauge(
            "polyglot_kv_cache_tokens", description="KV-cache token positions: total, and used (reserved by running sequences).",
            tag_keys=("kind",),
        )
        self.memory = Gauge(
            "polyglot_memory_bytes", description="Replica memory: host_rss, and gpu_allocated / gpu_reserved on a GPU.",
            tag_keys=("kind",),
        )
        self._memory_at = 0.0

    def memory_bytes(self, read) -> None:
        """Refresh the memory gauge from `read()` at most once a second (it is called per request)."""
        now = time.monotonic()
        if now - self._memory_at >= 1.0:
            self._memory_at = now
            for kind, value in read().items():
                self.memory.set(value, tags={"kind": kind})

    def generation_load(self, running: int, waiting: int, slots: int, kv_used: int, kv_total: int) -> None:
        self.gen_running.set(running)
        self.gen_waiting.set(waiting)
        self.kv_slots.set(slots)
        self.kv_tokens.set(kv_used, tags={"kind": "used"})
        self.kv_tokens.set(kv_total, tags={"kind": "total"})

    def record(self, s: Stats) -> None:
        if isinstance(s, ScoreBatchStats):
            self.batch_pairs.observe(s.pairs)
            self.batch_tokens.observe(s.padded_tokens)
            self.queue_time.observe(s.queue_seconds)
            # Ray's Counter.inc rejects 0: count only what happened.
            self.scored_tokens.inc(s.tokens)
            if s.padded_tokens > s.tokens:
                self.padded_tokens.inc(s.padded_tokens - s.tokens)
        elif isinstance(s, GenerationStats):
            if s.generated_tokens:
                self.generated_tokens.inc(s.generated_tokens)
            if s.prompt_tokens:
                self.prompt_tokens.inc(s.prompt_tokens)
            self.ttft.observe(s.time_to_first_token_seconds)
            self.gen_queue_time.observe(s.queue_seconds)
            for gap in s.inter_token_seconds:
                self.itl.observe(gap)

    def refused(self, method: str, reason: str) -> None:
        self.refusals.inc(tags={"method": method, "reason": reason})

    def request(self, method: str, code: str, seconds: float) -> None:
        self.requests.inc(tags={"method": method, "code": code})
        self.request_latency.observe(seconds, tags={"method": method})
