"""The engine facade: async Score, Generate, Tokenize over one loaded model, all model work on one thread."""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import math
import os
import threading
import time
from typing import AsyncIterator

import torch

from . import loader
from .batching import ScoreBatcher
from .config import EngineConfig
from .errors import InvalidRequest, NotReady, QueueFull
from .generation import Chunk, GenerationParams, Sequence, merge
from .neox import NeoxForward, NeoxRunner, dequantized_bytes, dequantized_weights
from .scheduler import Scheduler
from .scoring import PairResult, Scorer, group_choices, layout
from .stats import GenerationStats, StatsSink, discard
from .text import BatchEncoder, encode, encode_pairs, rolling_windows

log = logging.getLogger(__name__)
HEAVY_WORK = 16_384
"""Tokenizer-thread work (characters or output entries) above which it runs on the heavy lane."""


@dataclasses.dataclass
class ScoreOptions:
    """Per-call Score options (see ScoreRequest in lm.proto)."""

    truncate: bool = False
    details: bool = False
    top_n: int = 0


def _deliver(items: list) -> None:
    """On a caller's event loop: hand each sequence its chunk (or the exception that ended it)."""
    for seq, item in items:
        seq.sink.put_nowait(item)


def _send(outputs: list) -> None:
    """From any thread: each (sequence, chunk or exception) to its caller's event loop, one call per loop."""
    by_loop: dict = {}
    for seq, item in outputs:
        by_loop.setdefault(seq.loop, []).append((seq, item))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_deliver, items)
        except RuntimeError:  # that event loop is closed: nobody is waiting for these chunks
            pass


class Engine:
    """One model replica. Call order: Engine(cfg) loads the model (blocking); then any number of
    concurrent score() / generate() / tokenize() calls from one asyncio loop; close() at the end."""

    def __init__(self, cfg: EngineConfig, on_stats: StatsSink = discard):
        self.cfg = cfg
        self.lm = loader.load(cfg.model)
        self.on_stats = on_stats
        self._encoder = BatchEncoder(self.lm.tokenizer)
        pad = self.lm.tokenizer.pad_token_id
        self.scorer = Scorer(self.lm.model, self.lm.device, self.lm.eos_token_id if pad is None else pad,
                             NeoxForward(self.lm.model, self.window))
        # One thread owns the model: forward passes never block the event loop and never overlap.
        self._model_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model")
        self._tokenizer_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenizer")
        self._heavy_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenizer-heavy")
        max_tokens = cfg.batch.max_batch_tokens or (32768 if self.lm.device.type == "cuda" else 4096)
        self._batcher: ScoreBatcher | None = None
        self._choice_batcher: ScoreBatcher | None = None
        self._max_batch_tokens = max_tokens
        self._closed = False
        # Work admitted and not yet queued (being tokenized): counted against the queue limits (event loop only).
        self._tokenizing_pairs = 0
        self._tokenizing_prompts = 0
        g = cfg.generation
        if self.lm.device.type == "cuda":
            self.scorer.warm_up(min(max_tokens, self.window * cfg.batch.max_batch_pairs), min(1024, self.window))
        dense = dequantized_weights(self.lm.model, self.lm.compute_dtype) if self._dequantize() else None
        if dense:  # Score's passes too (NeoxForward.dense). Its warm-up above, on the 4-bit layers, held each
            self.scorer.neox.dense = dense  # weight's dequantized temporary too: the memory left is not overstated
        rows, kv_tokens = self._plan_kv()  # after the dense copies: the KV cache gets what they leave
        self.runner = NeoxRunner(self.lm.model, rows, self.window, g.cuda_graphs, g.fused_decode,
                                 eos_id=self.lm.eos_token_id, kv_tokens=kv_tokens, dense=dense,
                                 choosable=self.lm.tokenizer_size, kv_dtype=g.kv_cache_dtype)
        if g.four_bit_matmul_rows:
            log.info("4-bit matmul kernel on %d linear layers, passes of up to %d rows",
                     self.runner.use_packed(g.four_bit_matmul_rows), g.four_bit_matmul_rows)
        self.scheduler = Scheduler(self.runner, self.lm.eos_token_id, g.max_waiting, g.prefill_chunk,
                                   g.backfill_lookahead)
        self.runner.warm_up(self.runner.max_slots)  # before the replica reports ready
        kv_gib = kv_tokens * self._kv_bytes_per_token() / 2**30
        log.info("KV cache: %d token positions (%.1f GiB, %s), up to %d sequences at once", kv_tokens, kv_gib,
                 g.kv_cache_dtype, rows)
        self._gen_running = False  # a generation step is queued or running on the model thread
        self._gen_lock = threading.Lock()
        self._busy_since: float | None = None  # when the model thread's task in progress started
        self._device_check: concurrent.futures.Future | None = None  # the health check queued on the model thread

    def _dequantize(self) -> bool:
        """Whether forward passes of several tokens run on dequantized copies of the 4-bit weights
        (GenerationConfig.dequantized_decode)."""
        mode = self.cfg.generation.dequantized_decode
        if mode not in ("auto", "on", "off"):
            raise ValueError(f'generation.dequantized_decode must be "auto", "on" or "off", not {mode!r}')
        need = dequantized_bytes(self.lm.model, self.lm.compute_dtype)
        if mode == "off" or not need:
            return False
        if mode == "on":
            return True
        if self.lm.device.type != "cuda":
            return False
        total = torch.cuda.get_device_properties(self.lm.device).total_memory
        return need <= total // 4

    def _plan_kv(self) -> tuple[int, int]:
        """(sequences decoded at once, KV-cache token positions): the configured numbers, else 128 sequences
        (8 on CPU) and what the free GPU memory holds (a full window per sequence on CPU). Each sequence
        reserves prompt + max_new_tokens positions, so short requests leave room for many more."""
        g = self.cfg.generation
        rows = g.max_slots or (128 if self.lm.device.type == "cuda" else 8)
        if g.kv_cache_tokens:
            return rows, max(g.kv_cache_tokens, self.window)
        if self.lm.device.type != "cuda":
            return rows, rows * self.window
        per_token = self._kv_bytes_per_token()
        # Measured after the Score warm-up: the allocator keeps that forward's activations cached, so
        # "free" here is what neither the weights nor the largest Score batch need. One more window is
        # allocated beyond the pool, as scratch for the padding rows of the decode graphs.
        free, _ = torch.cuda.mem_get_info(self.lm.device)
        tokens = int(free * g.kv_cache_memory_fraction) // per_token - self.window
        return rows, max(self.window, min(tokens, rows * self.window))

    def _kv_bytes_per_token(self) -> int:
        return NeoxRunner.kv_bytes_per_token(self.lm.model, self.lm.compute_dtype, self.cfg.generation.kv_cache_dtype)

    @property
    def window(self) -> int:
        return self.lm.max_context

    def _timed(self, fn, *args):
        """Run fn on the model thread, noting since when it is busy (the health check reads it)."""
        self._busy_since = time.monotonic()
        try:
            return fn(*args)
        finally:
            self._busy_since = None

    def _submit(self, fn, *args) -> concurrent.futures.Future:
        """Queue fn on the model thread: the only thread that touches the GPU once the engine has started."""
        return self._model_thread.submit(self._timed, fn, *args)

    async def _on_model_thread(self, fn, *args):
        return await asyncio.wrap_future(self._submit(fn, *args))

    async def on_tokenizer_thread(self, fn, *args, size: int = 0):
        """Off the event loop (a few-shot context or a text to score is thousands of characters), on one of two
        threads by the work's `size` (characters, or output entries): work up to HEAVY_WORK on one, larger work
        on the other, so that a 190,000-character Tokenize or a Score's token details (each ~0.5 s on 2 cores)
        never queue small calls behind them. Not more: the Rust backend already spreads a batch over the cores,
        and more such batches at once starve the model thread of the CPU it needs to launch kernels."""
        pool = self._heavy_thread if size > HEAVY_WORK else self._tokenizer_thread
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    # --- Score -------------------------------------------------------------------------------------

    def _score_deadlines(self, timeout_s: float | None) -> tuple[float | None, float | None]:
        """(start_by, finish_by) for a Score call's work (ScoreBatcher): BatchConfig.max_queue_ms to start, and 90 %
        of the caller's deadline to be done (refused while the caller can still hear why and retry elsewhere)."""
        now = time.monotonic()
        finish_by = None if timeout_s is None else now + 0.9 * timeout_s
        start_by = finish_by
        if self.cfg.batch.max_queue_ms:
            start_by = min(x for x in (finish_by, now + self.cfg.batch.max_queue_ms / 1000) if x is not None)
        return start_by, finish_by

    async def score(self, pairs: list[tuple[str, str]], opts: ScoreOptions,
                    timeout_s: float | None = None) -> list[PairResult]:
        """Log-likelihood of each continuation given its context (lm-eval `loglikelihood` rules). A call that
        the Score queue has no room for is refused before it is tokenized: under a flood, tokenizing what will be
        refused anyway would hold the tokenizer thread from the calls that will run. `timeout_s`: the caller's
        deadline, for admission by deadline (BatchConfig.max_queue_ms)."""
        deadlines = self._score_deadlines(timeout_s)
        queued = self.queued_score_pairs + self._tokenizing_pairs
        if queued + len(pairs) > self.cfg.batch.max_queue_pairs:
            raise QueueFull(f"score queue is full ({queued} pairs waiting); retry later")
        self._tokenizing_pairs += len(pairs)
        try:
            encoded = await self.on_tokenizer_thread(encode_pairs, self._encoder, pairs, self.lm.prefix_token_id,
                                                     size=sum(len(c) + len(x) for c, x in pairs))
        finally:
            self._tokenizing_pairs -= len(pairs)
        if opts.details:
            entries = sum(len(p.continuation_ids) for p in encoded) * (1 + opts.top_n)
            if entries > self.cfg.limits.max_score_details:
                raise InvalidRequest(
                    f"token details for {entries // (1 + opts.top_n)} continuation tokens x (1 + top_logprobs "
                    f"{opts.top_n}) = {entries} entries; the limit per call is {self.cfg.limits.max_score_details}: "
                    "split the pairs over several calls or ask fewer alternatives")
        group = None if opts.details else group_choices(encoded, self.window)
        if group is not None:
            # One context, several continuations: its forward pass is shared, not repeated per choice.
            if self._choice_batcher is None:
                self._choice_batcher = ScoreBatcher(
                    lambda groups: self._on_model_thread(self.scorer.forward_groups, groups),
                    self.cfg.batch,
                    lambda: self._score_budget(self.cfg.batch.max_choice_prefix_tokens),
                    self.on_stats,
                )
            return (await self._choice_batcher.submit([group], *deadlines))[0]
        items = []
        for i, p in enumerate(encoded):
            try:
                items.append(layout(p, self.window, opts.truncate, opts.details, opts.top_n))
            except InvalidRequest as e:
                raise InvalidRequest(f"pair {i}: {e}") from None
        return await self._submit_pairs(items, deadlines)

    async def score_rolling(self, text: str, timeout_s: float | None = None) -> tuple[float, int, int]:
        """(log-likelihood, tokens, windows) of a whole text, lm-eval `loglikelihood_rolling` rules; the
        windows go through the same batcher as Score pairs, admitted by the same deadlines."""
        deadlines = self._score_deadlines(timeout_s)
        (tokens,) = await self.on_tokenizer_thread(self._encoder, [text], size=len(text))
        if not tokens:
            raise InvalidRequest("text encodes to zero tokens")
        windows = rolling_windows(tokens, self.lm.prefix_token_id, self.window)
        items = [layout(w, self.window, truncate=False) for w in windows]
        results = await self._submit_pairs(items, deadlines)
        return sum(r.logprob for r in results), len(tokens), len(windows)

    async def _submit_pairs(self, items, deadlines: tuple[float | None, float | None]) -> list[PairResult]:
        if self._batcher is None:
            self._batcher = ScoreBatcher(
                lambda batch: self._on_model_thread(self.scorer.forward, batch),
                self.cfg.batch,
                lambda: self._score_budget(self._max_batch_tokens),
                self.on_stats,
            )
        return await self._batcher.submit(items, *deadlines)

    def _score_budget(self, tokens: int) -> int:
        """Tokens for the next Score forward pass: `tokens`, capped while Generate streams run or wait
        (BatchConfig.max_batch_tokens_while_generating), since each pass delays every stream's next token."""
        cap = self.cfg.batch.max_batch_tokens_while_generating
        return min(tokens, cap) if cap and self.scheduler.has_work() else tokens

    @property
    def queued_score_pairs(self) -> int:
        return self._batcher.queued_pairs if self._batcher else 0

    # --- Generate ----------------------------------------------------------------------------------

    def _check_ids(self, ids: list[int]) -> None:
        """Token ids must be the tokenizer's: the output layer's rows past it (padding) mean nothing."""
        bad = [t for t in ids if t >= self.lm.tokenizer_size]
        if bad:
            raise InvalidRequest(f"token id {bad[0]} is outside the vocabulary (the tokenizer has "
                                 f"{self.lm.tokenizer_size} tokens; the model's {self.lm.vocab_size} rows include padding)")

    def prompt_ids(self, text: str, token_ids: list[int]) -> list[int]:
        if token_ids:
            self._check_ids(token_ids)
            return list(token_ids)
        return encode(self.lm.tokenizer, text)

    async def prompt(self, text: str, token_ids: list[int]) -> list[int]:
        """A Generate prompt's ids, tokenized off the event loop, once the generation queue has room for it
        (counting the prompts being tokenized): a flood is refused before it costs tokenizer time."""
        self.scheduler.check_room(self._tokenizing_prompts)
        self._tokenizing_prompts += 1
        try:
            return await self.on_tokenizer_thread(self.prompt_ids, text, token_ids, size=len(text))
        finally:
            self._tokenizing_prompts -= 1

    def check_generation(self, prompt_ids: list[int], params: GenerationParams) -> None:
        if not prompt_ids:
            raise InvalidRequest("prompt encodes to zero tokens")
        total = len(prompt_ids) + params.max_new_tokens
        if total > self.window:
            raise InvalidRequest(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) = {total} "
                f"exceeds the model window of {self.window} tokens"
            )

    async def generate(self, prompt_ids: list[int], params: GenerationParams,
                       timeout_s: float | None = None) -> AsyncIterator[tuple[Chunk, int]]:
        """Yield (chunk, seed) until a chunk carries finish_reason: one token per chunk while the consumer keeps
        up and few sequences run, else every token produced since it last asked, and under load a few tokens
        per chunk (each stream message through Ray's proxy costs host time on this interpreter; merging keeps
        a slow reader or many streams from slowing the engine).
        The request joins the running batch at the next engine step; a consumer that stops iterating
        (client cancelled, deadline) leaves the batch at the step after and frees its KV-cache range.
        Inter-token gaps in the stats: a chunk of m tokens counts m gaps of (time since the last chunk) / m.
        It must get a batch row within GenerationConfig.max_queue_ms and `timeout_s` (the caller's deadline), or it
        is refused with QueueFull: at once when the queue's drain rate says it would not, else when it has waited
        that long."""
        self.check_generation(prompt_ids, params)
        seq = Sequence(prompt_ids, params, self.lm.tokenizer)
        seq.sink, seq.loop = asyncio.Queue(), asyncio.get_running_loop()
        # 90 % of the caller's deadline: refused while it can still hear why (RESOURCE_EXHAUSTED, not a bare
        # DEADLINE_EXCEEDED), with time left to retry elsewhere.
        caller = None if timeout_s is None else 0.9 * timeout_s
        limits = [x for x in (self.cfg.generation.max_queue_ms / 1000 or None, caller) if x is not None]
        if limits:
            seq.queue_deadline = time.monotonic() + min(limits)
        self.scheduler.add(seq)
        with self._gen_lock:
            start, self._gen_running = not self._gen_running, True
        if start:
            self._submit(self._generation_step)
        t0 = time.monotonic()
        last, gaps, ttft, reason = None, [], 0.0, "cancelled"
        try:
            while True:
                got = await self._next_message(seq, first=last is None)
                if isinstance(got[-1], BaseException):  # the engine step failed: chunks before it are moot
                    raise got[-1]
                chunk = merge(got)
                now = time.monotonic()
                if last is None:
                    ttft = now - t0
                else:
                    gaps.extend([(now - last) / len(got)] * len(got))
                last = now
                yield chunk, seq.seed
                if chunk.finish_reason is not None:
                    reason = chunk.finish_reason
                    return
        finally:
            if seq.finish_reason is None:
                self.scheduler.cancel(seq)
            if last is not None:
                queued = (seq.admitted_at or seq.queued_at) - seq.queued_at
                self.on_stats(GenerationStats(len(prompt_ids), len(seq.generated), ttft, gaps, reason, queued))

    async def _next_message(self, seq: Sequence, first: bool) -> list:
        """The chunks (one per token) for seq's next message: whatever is queued, waiting for more while the
        load asks for several tokens per message (GenerationConfig.stream_messages_per_step); ends early at the
        first token, the last one, or an exception from the engine step."""
        got = [await seq.sink.get()]
        while True:
            while not seq.sink.empty() and not isinstance(got[-1], BaseException):
                got.append(seq.sink.get_nowait())
            if first or isinstance(got[-1], BaseException) or got[-1].finish_reason is not None:
                return got
            per_step = self.cfg.generation.stream_messages_per_step
            if not per_step or len(got) >= math.ceil(len(self.scheduler.running) / per_step):
                return got
            got.append(await seq.sink.get())

    def _generation_step(self) -> None:
        """One engine step, on the model thread; while work remains it queues the next step itself, so steps
        follow each other without a round trip through the event loop (busy sending up to hundreds of
        stream messages per step), and Score batches queued meanwhile still run between two steps."""
        try:
            outputs = self.scheduler.step()
        except Exception as e:  # noqa: BLE001 - fail the requests in flight, keep the replica
            outputs = [(seq, e) for seq in self.scheduler.abort()]
        _send(outputs)
        with self._gen_lock:
            self._gen_running = self.scheduler.has_work() and not self._closed
            if not self._gen_running:
                return
        try:
            self._submit(self._generation_step)
        except RuntimeError:  # the executor was shut down (close())
            with self._gen_lock:
                self._gen_running = False

    def generation_load(self) -> tuple[int, int, int]:
        """(running sequences, waiting sequences, sequences that may run at once)."""
        running, waiting = self.scheduler.in_use()
        return running, waiting, self.runner.max_slots

    def kv_cache_use(self) -> tuple[int, int]:
        """(KV-cache token positions reserved by running sequences, positions in the cache)."""
        return self.scheduler.kv_in_use()

    def memory_bytes(self) -> dict[str, int]:
        """Memory held by this replica: host RSS always, the CUDA allocator's view on a GPU."""
        with open("/proc/self/statm") as f:
            out = {"host_rss": int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")}
        if self.lm.device.type == "cuda":
            out["gpu_allocated"] = torch.cuda.memory_allocated(self.lm.device)
            out["gpu_reserved"] = torch.cuda.memory_reserved(self.lm.device)
        return out

    # --- Tokenizer ---------------------------------------------------------------------------------

    def tokenize(self, text: str) -> tuple[list[int], list[str]]:
        """Ids and each token's text (blocking: callers on an event loop go through on_tokenizer_thread)."""
        (ids,) = self._encoder([text])
        return ids, self._encoder.token_texts(ids)

    def detokenize(self, ids: list[int]) -> str:
        self._check_ids(ids)
        return self.lm.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def token_texts(self, ids: list[int]) -> list[str]:
        return self._encoder.token_texts(ids)

    async def probe(self) -> None:
        """Health, touching the GPU from the model thread only (another thread's CUDA call can break a graph
        being replayed or captured): a model thread busy with one task for longer than ModelConfig.stall_s
        is unhealthy (a wedged device or kernel); busy for less, it is alive; idle, it reads a tensor back
        from the device. However many probes arrive, at most one such check waits on the model thread."""
        if self._closed:
            raise NotReady("engine is shut down")
        since = self._busy_since
        if since is not None:
            busy = time.monotonic() - since
            if busy > self.cfg.model.stall_s:
                raise RuntimeError(f"the model thread has been busy with one task for {busy:.0f} s")
            return
        check = self._device_check
        if check is None or check.done():
            check = self._device_check = self._submit(self._touch_device)
        await asyncio.wrap_future(check)

    def _touch_device(self) -> None:
        x = torch.ones(8, device=self.lm.device)
        if float(x.sum()) != 8.0:
            raise RuntimeError(f"device {self.lm.device} returned a wrong sum")

    def close(self) -> None:
        """Shut down: streams in flight and queued Score calls end with NotReady (UNAVAILABLE, so clients retry
        elsewhere), and the threads and batcher tasks stop, so nothing keeps the engine's GPU memory alive."""
        self._closed = True
        err = NotReady("the replica is shutting down")
        _send([(seq, err) for seq in self.scheduler.abort()])
        for b in (self._batcher, self._choice_batcher):
            if b is not None:
                b.close(err)
        self._model_thread.shutdown(wait=False, cancel_futures=True)
        self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)
        self._heavy_thread.shutdown(wait=False, cancel_futures=True)
