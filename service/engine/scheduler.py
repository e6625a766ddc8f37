"""Continuous batching of generation: sequences join between decode steps and leave the moment they finish."""
from __future__ import annotations

import collections
import itertools
import logging
import threading
import time

import torch

from .drain import DrainRate
from .errors import QueueFull
from .generation import Chunk, Sequence, accept
from .kvspace import Backfill, KVSpace
from .neox import HostFetch, NeoxRunner
from .sampling import RowSampling, logprobs, sample

log = logging.getLogger(__name__)
Output = tuple[Sequence, "Chunk | BaseException"]


def _failed(seqs: list[Sequence], e: BaseException) -> list[Output]:
    """The sequences a forward pass or token choice that raised was for: each gets the exception, and leaves the
    batch at the next step; sequences that were not part of that work go on."""
    log.error("generation work of %d sequence(s) failed: %s: %s", len(seqs), type(e).__name__, e)
    for s in seqs:
        s.cancelled = True
    return [(s, e) for s in seqs]


class Scheduler:
    """Owns the batch rows, the KV cache's space and the running batch.

    Call order: add(seq) / cancel(seq) from any thread; step() repeatedly on the model thread while
    has_work(). Each step admits waiting sequences, in order of arrival, while a batch row is free and the
    cache has a free range of prompt + max_new_tokens positions for the next one (and behind one that has none,
    those that fit without delaying it: engine/kvspace.py's backfilling); runs at most `prefill_chunk`
    prompt tokens of prefill in one packed forward pass (so a long newcomer delays running streams by one chunk,
    not by its whole prompt; short newcomers are prefilled several per step), then one batched decode step for
    every running sequence, and returns the chunks produced, in the form [(sequence, chunk)]. A forward pass
    or token choice that raises fails the sequences it was for, as (sequence, exception), and no others.

    Pipelining: while the batch stays the same and no sequence asks for logprobs, a step launches the next
    decode step on the GPU, fed the tokens the GPU already chose (the graph's argmax, or for sampled and penalized
    rows engine/sampling.py's choice made on the device right after the step), before it reads its own tokens
    back and detokenizes them, so host work hides behind the GPU. A sequence that ends on a token (end-of-text,
    stop sequence) has one wasted row in the step already launched, which is discarded. A token's sampling noise
    depends on its request's seed and its index only, so it is the same whichever path chose it.
    """

    def __init__(self, runner: NeoxRunner, eos_id: int, max_waiting: int, prefill_chunk: int,
                 backfill_lookahead: int = 0):
        self.runner = runner
        self.eos_id = eos_id
        self.max_waiting = max_waiting
        self.prefill_chunk = prefill_chunk
        self.backfill_lookahead = backfill_lookahead
        self._no_backfill: tuple | None = None  # the state in which _admissible last found nobody to backfill
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # running[i] is batch row i
        self.kv = KVSpace(runner.kv_tokens)
        # a launched step not yet read back: its sequences, their tokens, and their logprobs where any asks
        self._pending: tuple[list[Sequence], HostFetch, HostFetch | None] | None = None
        self._rows: RowSampling | None = None  # the pipelined batch's sampling, when any row is not plain greedy
        self._lock = threading.Lock()
        self.drain = DrainRate()
        # Per batch row: which token ids its sequence has seen (prompt and output), for the repetition penalty.
        self.seen = torch.zeros((runner.max_slots, runner.head.weight.shape[0]), dtype=torch.bool, device=runner.device)

    @property
    def slots(self) -> int:
        """Sequences that may run at once (batch rows)."""
        return self.runner.max_slots

    def _check_room(self, extra: int) -> None:
        # Slots free now will take the first waiters at the next step: they are not queued.
        queued = len(self.waiting) + extra - max(0, self.slots - len(self.running))
        if queued >= self.max_waiting:
            raise QueueFull(f"generation queue is full ({queued} waiting for a slot); retry later")

    def check_room(self, extra: int = 0) -> None:
        """QueueFull unless one more sequence (beyond `extra` on their way) may wait."""
        with self._lock:
            self._check_room(extra)

    def add(self, seq: Sequence) -> None:
        """Queue seq, or QueueFull: the queue is at max_waiting, or seq's expected wait for a row would pass its
        queue_deadline (refused now rather than after waiting that long)."""
        with self._lock:
            self._check_room(0)
            now = time.monotonic()
            seq.queued_at = now
            position = len(self.waiting) + 1 - max(0, self.slots - len(self.running))
            if seq.queue_deadline is not None and position > 0:
                wait = self.drain.expected_wait(position, now)
                if wait is not None and now + wait > seq.queue_deadline:
                    raise QueueFull(f"expected wait for a batch row {wait:.1f} s ({position} in line, the queue "
                                    f"drains {self.drain.rate(now):.1f}/s) is beyond this request's queueing limit "
                                    f"of {seq.queue_deadline - now:.1f} s", "expected_wait")
            if not self.waiting:
                self.drain.tick(now, 0, True)  # the queue starts waiting now, not at the last engine step
            self.waiting.append(seq)

    def cancel(self, seq: Sequence) -> None:
        """The client went away: a waiting sequence leaves the queue now (its place is free for the next
        request); a running one leaves at the next step, which frees its slot and KV range."""
        seq.cancelled = True
        with self._lock:
            try:
                self.waiting.remove(seq)
            except ValueError:  # running, finished, or already admitted
                return
            if not self.waiting:  # nobody waits any more: the time from here on is not queueing
                self.drain.tick(time.monotonic(), 0, False)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def in_use(self) -> tuple[int, int]:
        """(running sequences, waiting sequences)."""
        return len(self.running), len(self.waiting)

    def kv_in_use(self) -> tuple[int, int]:
        """(KV-cache positions reserved by running sequences, positions in the cache)."""
        return self.kv.used, self.kv.size

    def abort(self) -> list[Sequence]:
        """Drop every sequence (after a failed step); returns them so their callers can be told."""
        with self._lock:
            dropped = self.running + list(self.waiting)
            self.running, self.waiting = [], collections.deque()
            self.drain.tick(time.monotonic(), 0, False)
            self.kv = KVSpace(self.runner.kv_tokens)
            self._pending = None
        return dropped

    def _remove(self, seq: Sequence) -> None:
        """Free seq's cache range and batch row; the last running sequence takes the row (rows stay 0..n-1)."""
        i = seq.slot
        last = self.running.pop()
        if last is not seq:
            if last.params.sampling.repetition_penalty != 1.0:
                self.seen[i] = self.seen[last.slot]
            last.slot = i
            self.running[i] = last
        self.kv.free(seq.kv_base, seq.kv_size)
        seq.slot = seq.kv_base = -1

    @torch.inference_mode()
    def step(self) -> list[Output]:
        if self._pending is not None:
            return self._step_pipelined()
        out: list[Output] = []
        for seq in [s for s in self.running if s.cancelled or s.finish_reason]:
            self._remove(seq)
        with self._lock:
            out.extend(self._expire())
            admitted = self._admit()
            self.drain.tick(time.monotonic(), admitted, bool(self.waiting))

        # Prefill: up to `prefill_chunk` prompt tokens per step, newcomers in order of arrival, all in one packed
        # forward pass (no padding: prompts of 100 and 1,000 tokens cost 1,100 tokens of compute). A prompt that
        # does not fit what is left of the budget is cut, and goes on at the next step. A sequence whose prompt is
        # complete chooses its first token right away.
        budget = self.prefill_chunk
        chunks, prefilling = [], []
        for seq in self.running:
            if budget <= 0:
                break
            if seq.prefilled >= len(seq.prompt_ids) or seq.cancelled:
                continue
            a = seq.prefilled
            b = min(len(seq.prompt_ids), a + budget)
            budget -= b - a
            chunks.append((seq.kv_base, seq.prompt_ids[a:b], a))
            prefilling.append(seq)
        if chunks:
            try:
                logits = self.runner.prefill(chunks)  # [n, V]
            except Exception as e:  # noqa: BLE001 - these newcomers fail, the batch goes on
                out.extend(_failed(prefilling, e))
            else:
                done = []
                for i, (seq, (_, ids, a)) in enumerate(zip(prefilling, chunks)):
                    seq.prefilled = a + len(ids)
                    if seq.prefilled == len(seq.prompt_ids):
                        done.append(i)
                if done:
                    out.extend(self._next_batch([prefilling[i] for i in done], logits[done]))

        # Decode: one batched step over slots 0..n-1. Rows whose sequence is not ready (mid-prefill,
        # finished, cancelled) are fed a dummy token at a position their next prefill chunk overwrites
        # or that is never read again; their logits are ignored. Cheaper than reordering KV slots.
        ready = [s.prefilled == len(s.prompt_ids) and bool(s.generated) and not s.finish_reason and not s.cancelled
                 for s in self.running]
        if not any(ready):
            return out
        rows = [i for i, r in enumerate(ready) if r]
        tokens = [s.generated[-1] if r else 0 for s, r in zip(self.running, ready)]
        positions = [s.length - 1 if r else min(s.prefilled, s.length - 1) for s, r in zip(self.running, ready)]
        try:
            self.runner.forbid_eos([r and s.needs_eos_mask() for s, r in zip(self.running, ready)])
            logits = self.runner.decode(tokens, positions, [s.kv_base for s in self.running])  # [n, V]
            if all(ready) and all(self._on_device(s, 0) for s in self.running):
                seqs = list(self.running)
                self._rows = self._device_rows(seqs)
                self._choose_on_device(logits)
                self._pending = (seqs, self.runner.next_tokens(len(seqs)), self._logprobs_on_device(seqs, logits))
                return out
        except Exception as e:  # noqa: BLE001 - the decoded rows fail; mid-prefill newcomers go on
            return out + _failed([self.running[i] for i in rows], e)
        out.extend(self._next_batch([self.running[i] for i in rows], logits[rows]))
        return out

    def _steps_left(self, seq: Sequence) -> int:
        """The most engine steps seq can still hold its KV range: its prompt's remaining prefill chunks and new
        tokens (an estimate for prefill, whose budget newcomers share; an end-of-text ends it sooner)."""
        return -(-(len(seq.prompt_ids) - seq.prefilled) // self.prefill_chunk) + seq.params.max_new_tokens - len(
            seq.generated)

    def _backfill(self, head: Sequence) -> Backfill:
        return Backfill(self.kv, head.kv_size, [(self._steps_left(s), s.kv_base, s.kv_size) for s in self.running])

    def _admissible(self) -> bool:
        """Whether _admit would take some waiting sequence now (under the lock), without taking it. Remembers a
        no for the cache's layout and the queue's head as they are: with time alone backfilling only gets harder
        (the head's earliest fit comes closer, a waiter's span does not shrink)."""
        if not self.waiting or len(self.running) >= self.slots:
            return False
        head = self.waiting[0]
        if self.kv.fits(head.kv_size):
            return True
        if not self.backfill_lookahead:
            return False
        window = tuple(itertools.islice(self.waiting, 0, 1 + self.backfill_lookahead))
        key = (self.kv.layout(), tuple(map(id, window)))
        if key == self._no_backfill:
            return False
        behind = self._backfill(head)
        for seq in window[1:]:
            base = behind.alloc(seq.kv_size, self._steps_left(seq))
            if base is not None:
                self.kv.free(base, seq.kv_size)
                return True
        self._no_backfill = key
        return False

    def _admit(self) -> int:
        """Waiting sequences to batch rows, in order of arrival while each finds a KV range (under the lock); once
        one does not, up to backfill_lookahead behind it that fit without delaying it (engine/kvspace.py)."""
        admitted, behind, tried = 0, None, 0
        for seq in list(self.waiting):
            if len(self.running) >= self.slots or behind is not None and tried >= self.backfill_lookahead:
                break
            if seq.cancelled:
                self.waiting.remove(seq)
                continue
            if behind is None:
                base = self.kv.alloc(seq.kv_size)
            else:
                tried += 1
                base = behind.alloc(seq.kv_size, self._steps_left(seq))
            if base is None:
                if behind is None:  # the head waits for space; later ones only where they do not delay it
                    if not self.backfill_lookahead:
                        break
                    behind = self._backfill(seq)
                continue
            self.waiting.remove(seq)
            seq.kv_base, seq.slot = base, len(self.running)
            seq.admitted_at = time.monotonic()
            admitted += 1
            self.running.append(seq)
            if seq.params.sampling.repetition_penalty != 1.0:
                self.seen[seq.slot] = False
                self.seen[seq.slot, torch.tensor(seq.prompt_ids, device=self.seen.device)] = True
        return admitted

    def _expire(self) -> list[Output]:
        """Waiters past their queue_deadline leave with QueueFull (under the lock)."""
        if not self.waiting:
            return []
        now = time.monotonic()
        late = [s for s in self.waiting if s.queue_deadline is not None and now > s.queue_deadline]
        for s in late:
            self.waiting.remove(s)
            s.cancelled = True
        return [(s, QueueFull(f"waited {now - s.queued_at:.1f} s for a batch row, this request's queueing limit; "
                              "the replica is saturated", "waited_too_long")) for s in late]

    @staticmethod
    def _on_device(seq: Sequence, ahead: int) -> bool:
        """Whether seq's token `ahead` tokens after those accepted may be chosen and fed on by the GPU without the
        host: within max_new_tokens (greedy or sampled, penalties, the end-of-text mask and logprobs all run on the
        device)."""
        n, p = len(seq.generated) + ahead, seq.params
        return n < p.max_new_tokens and not seq.cancelled and not seq.finish_reason

    @staticmethod
    def _alternatives(seqs: list[Sequence]) -> int:
        """How many top alternatives the rows asking for logprobs want at most (-1: no row asks for logprobs)."""
        return max((s.params.top_logprobs for s in seqs if s.params.logprobs), default=-1)

    def _logprobs_on_device(self, seqs: list[Sequence], logits: torch.Tensor) -> HostFetch | None:
        """For a pipelined step whose rows (some) ask for logprobs: those of the tokens just chosen on the device
        under the step's logits [n, V], read back behind the next step like the tokens; None when no row asks."""
        k = self._alternatives(seqs)
        return None if k < 0 else self.runner.next_logprobs(logits, len(seqs), k)

    def _device_rows(self, seqs: list[Sequence]) -> RowSampling | None:
        """The sampling of a batch about to be pipelined (batch rows 0..n-1), None when every row is plain greedy
        (the graph's own argmax is then the choice). Its end-of-text mask is the runner's (forbid_eos), its step
        counters advance on the device with every launched step."""
        if all(s.simple_greedy for s in seqs):
            return None
        rows = self._rows_of(seqs)
        rows.no_eos = self.runner._no_eos[: len(seqs)]
        return rows

    def _rows_of(self, seqs: list[Sequence]) -> RowSampling:
        """The sampling of seqs' next tokens (one row each) as device tensors."""
        return RowSampling.of([s.params.sampling for s in seqs], [s.seed for s in seqs],
                              [len(s.generated) for s in seqs], [s.needs_eos_mask() for s in seqs], self.runner.device)

    def _choose(self, logits: torch.Tensor, rows: RowSampling, slots: torch.Tensor) -> torch.Tensor:
        """Each row's token [n] from logits [n, V] on the device; the batch rows `slots` [n] its sequences hold
        remember it for the repetition penalty."""
        penalty = "penalty" in rows.uses
        toks = sample(logits, rows, self.seen[slots] if penalty else None, self.eos_id, self.runner.choosable)  # [n]
        if penalty:
            self.seen[slots, toks] = True
        return toks

    def _choose_on_device(self, logits: torch.Tensor) -> None:
        """For a pipelined batch with sampled or penalized rows: sample every row's token from the step's logits
        [n, V] on the device and leave it as the next step's input, where the graph left its argmax."""
        if self._rows is not None:
            self.runner.feed(self._choose(logits, self._rows, torch.arange(logits.shape[0], device=logits.device)))

    def _step_pipelined(self) -> list[Output]:
        """Launch the next step if the batch is unchanged (its tokens chosen on the device), then read back and
        accept the pending one."""
        seqs, fetch, lp_fetch = self._pending
        self._pending = None
        with self._lock:
            expired = self._expire()
            self.drain.tick(time.monotonic(), 0, bool(self.waiting))
            admit = self._admissible()
        # Each sequence's pending token sits at position s.length, the one after its accepted tokens.
        last = max(s.length for s in seqs)
        try:
            if not admit and self.running == seqs and all(self._on_device(s, 1) for s in seqs) and last < self.runner.max_len:
                self.runner.forbid_eos([s.needs_eos_mask(1) for s in seqs])
                logits = self.runner.decode_again(len(seqs), last)
                if self._rows is not None:
                    self._rows.step += 1
                    self._choose_on_device(logits)
                self._pending = (seqs, self.runner.next_tokens(len(seqs)), self._logprobs_on_device(seqs, logits))
            (tokens,) = fetch.wait()
            lp, top_v, top_i = lp_fetch.wait() if lp_fetch is not None else (None, None, None)
        except Exception as e:  # noqa: BLE001
            self._pending = None
            return expired + _failed([s for s in seqs if not (s.cancelled or s.finish_reason)], e)
        out = expired
        for i, (s, tok) in enumerate(zip(seqs, tokens)):
            if s.cancelled or s.finish_reason:
                continue
            if s.params.logprobs:
                out.append((s, accept(s, tok, self.eos_id, lp[i], top_i[i], top_v[i])))
            else:
                out.append((s, accept(s, tok, self.eos_id, None)))
        return out

    def _next_batch(self, seqs: list[Sequence], logits: torch.Tensor) -> list[Output]:
        """Choose one token per sequence from logits [n, V] in one batched call on the device (engine/sampling.py:
        greedy and sampled rows, penalties, masks), read back with one copy; then accept them on the host."""
        try:
            toks = self._choose(logits, self._rows_of(seqs), torch.tensor([s.slot for s in seqs], device=logits.device))
            # Logprobs describe the model's own distribution: before penalties and masks.
            k = self._alternatives(seqs)
            if k >= 0:
                lp, top_v, top_i = (x.tolist() for x in logprobs(logits, toks, k))
            toks = toks.tolist()
        except Exception as e:  # noqa: BLE001 - the rows of this choice fail; others go on
            return _failed(seqs, e)
        out = []
        for i, s in enumerate(seqs):
            try:
                if s.params.logprobs:
                    out.append((s, accept(s, toks[i], self.eos_id, lp[i], top_i[i], top_v[i])))
                else:
                    out.append((s, accept(s, toks[i], self.eos_id)))
            except Exception as e:  # noqa: BLE001
                out.extend(_failed([s], e))
        return out
