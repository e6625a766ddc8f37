"""Log-likelihood of continuations: one padded forward pass for a batch of pairs, softmax only where asked."""
from __future__ import annotations

import dataclasses

import torch

from .errors import InvalidRequest
from .neox import NeoxForward, right_pad
from .text import EncodedPair


class InputTooLong(InvalidRequest):
    """The pair does not fit the model window (and truncation is off, or the continuation alone is too long)."""


@dataclasses.dataclass
class ScoreItem:
    """One pair laid out for the forward pass."""

    input_ids: list[int]
    """(context + continuation)[-(window + 1):][:-1]: the model sees every token but the last."""
    target_ids: list[int]
    """The continuation tokens: predicted at the last len(target_ids) positions of input_ids."""
    truncated_tokens: int
    """Context tokens dropped on the left to fit the window."""
    details: bool = False
    """Return per-token logprobs of this pair."""
    top_n: int = 0
    """With details: this many alternatives per position."""

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def pairs(self) -> int:
        """Pairs this work item scores (the batcher counts them for its stats)."""
        return 1


@dataclasses.dataclass
class TokenScore:
    """Per-token detail of a continuation."""

    ids: list[int]
    logprobs: list[float]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]


@dataclasses.dataclass
class PairResult:
    logprob: float
    is_greedy: bool
    num_tokens: int
    truncated_tokens: int
    batch_pairs: int
    details: TokenScore | None = None


def layout(pair: EncodedPair, window: int, truncate: bool, details: bool = False, top_n: int = 0) -> ScoreItem:
    """Place a pair in the window exactly as lm-eval's HFLM `_loglikelihood_tokens` does."""
    n_cont = len(pair.continuation_ids)
    if n_cont == 0:
        raise InputTooLong("continuation encodes to zero tokens")
    if n_cont > window:
        raise InputTooLong(f"continuation is {n_cont} tokens; the window is {window}")
    whole = pair.context_ids + pair.continuation_ids
    dropped = max(0, len(whole) - (window + 1))
    if dropped and not truncate:
        raise InputTooLong(
            f"context + continuation is {len(whole)} tokens; the window is {window} "
            f"(at most {window + 1} including the last, unseen token); set truncate to drop the context's left part"
        )
    return ScoreItem(
        input_ids=whole[dropped:-1],
        target_ids=pair.continuation_ids,
        truncated_tokens=dropped,
        details=details,
        top_n=top_n if details else 0,
    )


@dataclasses.dataclass
class ChoiceGroup:
    """Continuations of one context, scored with a single pass over the context (multiple choice)."""

    prefix: list[int]
    """context[:-1]: run once, its keys and values shared by every choice."""
    suffixes: list[list[int]]
    """Per choice: [context[-1]] + continuation[:-1], the inputs that predict the continuation."""
    targets: list[list[int]]
    """Per choice: the continuation tokens."""

    @property
    def length(self) -> int:
        return len(self.prefix) + sum(map(len, self.suffixes))

    @property
    def pairs(self) -> int:
        return len(self.suffixes)


def group_choices(pairs: list[EncodedPair], window: int) -> ChoiceGroup | None:
    """A ChoiceGroup when the pairs share their context tokens and fit the window without truncation,
    else None (then the pairs are scored one row each). lm-eval encodes the context alone, so pairs
    with the same context text always share its tokens."""
    ctx = pairs[0].context_ids
    if len(pairs) < 2 or len(ctx) < 2 or any(p.context_ids != ctx for p in pairs):
        return None
    if any(not p.continuation_ids or len(ctx) + len(p.continuation_ids) - 1 > window for p in pairs):
        return None
    return ChoiceGroup(ctx[:-1], [[ctx[-1]] + p.continuation_ids[:-1] for p in pairs], [p.continuation_ids for p in pairs])


class Scorer:
    """Scores batches of ScoreItems with a causal LM. Call from one thread at a time."""

    def __init__(self, model: torch.nn.Module, device: torch.device, pad_id: int, neox: NeoxForward | None = None):
        """`neox`: our own GPT-NeoX forward (no rotary concatenations, no cache bookkeeping), which also
        makes multiple choice possible; without it pairs run through transformers' model."""
        self.model = model
        self.base = model.base_model  # the transformer without its output layer
        self.neox = neox
        self.head = model.get_output_embeddings()
        self.device = device
        self.pad_id = pad_id
        self.head_rows = 4096

    def _reduce(self, h, targets, seg, B: int, top_n: int, details: bool):
        """Per-token log-probabilities of targets [N] from final hidden states h [N, D], summed into B
        segments by seg [N]. The output layer runs in slices of positions: [N, V] fp32 logits for a
        32k-token batch would be 4 GB. Returns Python lists: sums, greedy misses, token logprobs, top-n."""
        tok_lp, greedy, top_v, top_i = [], [], [], []
        for a in range(0, h.shape[0], self.head_rows):
            logits = self.head(h[a : a + self.head_rows]).float()  # [n, V]
            logz = torch.logsumexp(logits, -1)  # [n]
            t = targets[a : a + self.head_rows]
            tok_lp.append(logits.gather(-1, t[:, None]).squeeze(-1) - logz)  # [n]
            greedy.append(logits.argmax(-1) == t)  # [n]
            if top_n > 0:
                v, i = torch.topk(logits, top_n, dim=-1)  # [n, top_n]
                top_v.append(v - logz[:, None])
                top_i.append(i)
        tok_lp, greedy = torch.cat(tok_lp), torch.cat(greedy)  # [N]
        sums = torch.zeros(B, dtype=torch.float64, device=self.device).index_add_(0, seg, tok_lp.double())  # [B]
        misses = torch.zeros(B, dtype=torch.long, device=self.device).index_add_(0, seg, (~greedy).long())  # [B]
        if top_n > 0:
            top_v, top_i = torch.cat(top_v).cpu().tolist(), torch.cat(top_i).cpu().tolist()
        return (sums.cpu().tolist(), misses.cpu().tolist(), tok_lp.cpu().tolist() if details else None,
                top_v, top_i)

    @torch.inference_mode()
    def forward_groups(self, groups: list[ChoiceGroup]) -> list[list[PairResult]]:
        """Score multiple-choice groups: each context once, all their continuations in one batch."""
        group_of = [gi for gi, g in enumerate(groups) for _ in g.suffixes]
        suffixes = [s for g in groups for s in g.suffixes]
        targets_l = [t for g in groups for t in g.targets]
        h = self.neox.shared_prefix_hidden([g.prefix for g in groups], group_of, suffixes)  # [R, S, D]
        R = len(suffixes)
        n = torch.tensor([len(t) for t in targets_l])  # [R]
        rows = torch.repeat_interleave(torch.arange(R), n)  # [N]
        cols = torch.arange(int(n.sum())) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)  # [N]
        targets = torch.tensor([t for ts in targets_l for t in ts], device=self.device)  # [N]
        seg = rows.to(self.device)
        sums, misses, _, _, _ = self._reduce(h[seg, cols.to(self.device)], targets, seg, R, 0, False)
        results = [PairResult(sums[r], misses[r] == 0, len(targets_l[r]), 0, R) for r in range(R)]
        out, k = [], 0
        for g in groups:
            out.append(results[k : k + len(g.suffixes)])
            k += len(g.suffixes)
        return out

    @torch.inference_mode()
    def warm_up(self, max_tokens: int, width: int = 1024) -> None:
        """One forward of the largest batch the batcher forms, so that the allocator holds its
        activations before the KV cache takes the rest of the GPU."""
        rows = max(1, max_tokens // width)
        item = ScoreItem(input_ids=[self.pad_id] * width, target_ids=[self.pad_id] * 32, truncated_tokens=0)
        self.forward([item] * rows)

    @torch.inference_mode()
    def forward(self, items: list[ScoreItem]) -> list[PairResult]:
        """Score a batch of pairs (any lengths) in one forward pass; results in item order."""
        B = len(items)
        details = any(it.details for it in items)
        top_n = max(it.top_n for it in items)
        lens = torch.tensor([it.length for it in items])  # [B]
        n_cont = torch.tensor([len(it.target_ids) for it in items])  # [B]
        ids = right_pad([it.input_ids for it in items], self.pad_id)  # [B, T]
        # Right padding with no attention mask is exact for a causal model: real tokens never
        # attend to the pad tokens after them, and the maskless path lets SDPA use its causal kernel.
        if self.neox is not None:
            hidden = self.neox.hidden(ids, [it.length for it in items])  # [B, T, D]
        else:
            hidden = self.base(input_ids=ids.to(self.device)).last_hidden_state  # [B, T, D]

        # Continuation positions only: the output layer and softmax never see the rest.
        rows = torch.repeat_interleave(torch.arange(B), n_cont)  # [N]
        seg_start = torch.cumsum(n_cont, 0) - n_cont  # [B]
        offs = torch.arange(int(n_cont.sum())) - torch.repeat_interleave(seg_start, n_cont)  # [N]
        cols = torch.repeat_interleave(lens - n_cont, n_cont) + offs  # [N]
        targets = torch.tensor([t for it in items for t in it.target_ids], device=self.device)  # [N]
        h = hidden[rows.to(self.device), cols.to(self.device)]  # [N, D]
        sums, misses, tok_lp, top_v, top_i = self._reduce(h, targets, rows.to(self.device), B, top_n, details)

        results = []
        for i, it in enumerate(items):  # per pair, not per token
            a, b = int(seg_start[i]), int(seg_start[i] + n_cont[i])
            det = None
            if it.details:
                det = TokenScore(
                    ids=list(it.target_ids),
                    logprobs=tok_lp[a:b],
                    top_ids=[row[: it.top_n] for row in top_i[a:b]] if it.top_n else [],
                    top_logprobs=[row[: it.top_n] for row in top_v[a:b]] if it.top_n else [],
                )
            results.append(
                PairResult(
                    logprob=sums[i],
                    is_greedy=misses[i] == 0,
                    num_tokens=len(it.target_ids),
                    truncated_tokens=it.truncated_tokens,
                    batch_pairs=B,
                    details=det,
                )
            )
        return results
