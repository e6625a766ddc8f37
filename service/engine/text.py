"""Tokenization rules of the service: lm-evaluation-harness pair encoding and UTF-8-safe incremental decoding."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class EncodedPair:
    """A (context, continuation) pair as token ids, split the way lm-evaluation-harness splits it."""

    context_ids: list[int]
    continuation_ids: list[int]
    continuation_text: str
    """The continuation as scored: with the context's trailing whitespace moved in front of it."""


def encode(tokenizer, text: str) -> list[int]:
    # No BOS/EOS: lm-eval's HFLM encodes causal-LM text without special tokens.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class BatchEncoder:
    """Encodes many texts at once with the tokenizer's Rust backend (parallel, outside the GIL), with the
    same result as `encode` on each. A private copy of the backend with truncation and padding off, as
    transformers sets them for a plain call, so concurrent callers never contend for its settings."""

    def __init__(self, tokenizer):
        from tokenizers import Tokenizer

        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._fast = None
        if backend is not None:
            self._fast = Tokenizer.from_str(backend.to_str())
            self._fast.no_truncation()
            self._fast.no_padding()

    def __call__(self, texts: list[str]) -> list[list[int]]:
        if self._fast is None:  # a slow (Python) tokenizer
            return [encode(self.tokenizer, t) for t in texts]
        return [e.ids for e in self._fast.encode_batch(texts, add_special_tokens=False)]

    def token_texts(self, ids: list[int]) -> list[str]:
        """Each token's own text (a piece of a character decodes with U+FFFD), in one call to the Rust backend:
        a text of 190,000 characters has ~100,000 tokens, and a Python loop over them held the GIL for a second."""
        if self._fast is None:
            return [self.tokenizer.decode([i]) for i in ids]
        return self._fast.decode_batch([[i] for i in ids], skip_special_tokens=False)


def encode_pairs(encoder: BatchEncoder, pairs: list[tuple[str, str]], eot_id: int) -> list[EncodedPair]:
    """`encode_pair` of every pair in one batch; each distinct text is encoded once, so the K choices of a
    question cost K + 1 encodings, not 2K."""
    # None marks an empty context: its continuation is encoded alone after the end-of-text token.
    split = [(None, x) if c == "" else _lm_eval_split(c, x) for c, x in pairs]
    texts = list(dict.fromkeys(t for c, x in split for t in ((x,) if c is None else (c, c + x))))
    ids = dict(zip(texts, encoder(texts)))
    out = []
    for c, x in split:
        if c is None:
            out.append(EncodedPair([eot_id], ids[x], x))
        else:
            out.append(EncodedPair(ids[c], ids[c + x][len(ids[c]) :], x))
    return out


def _lm_eval_split(context: str, continuation: str) -> tuple[str, str]:
    """Trailing whitespace of the context moves to the continuation (lm-eval `_encode_pair`)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        return context[:-n_spaces], context[-n_spaces:] + continuation
    return context, continuation


def encode_pair(tokenizer, context: str, continuation: str, eot_id: int) -> EncodedPair:
    """lm-eval `loglikelihood` rules (HFLM `_encode_pair`): empty context -> end-of-text token as the whole
    context; trailing whitespace of the context moves to the continuation; the context is encoded alone, and the
    continuation is the encoding of context + continuation past the context's length. Where BPE merges across
    the seam, that pair of token lists is not the encoding of the joined text; lm-eval scores it so, and so do we."""
    if context == "":
        return EncodedPair([eot_id], encode(tokenizer, continuation), continuation)
    context, continuation = _lm_eval_split(context, continuation)
    ctx = encode(tokenizer, context)
    return EncodedPair(ctx, encode(tokenizer, context + continuation)[len(ctx) :], continuation)


class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces that never end inside a UTF-8 character.

    Byte-level BPE tokens can end in the middle of a multi-byte character (a Hangul syllable is 3
    bytes); decoding such a prefix yields U+FFFD. We hold text back while the decoded tail is a
    replacement character and release it once the following token completes the character.
    Decoding from a few tokens before the emitted point keeps this O(1) per token.
    """

    def __init__(self, tokenizer, prompt_ids: list[int] | None = None, skip_special: bool = False):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        # A fast tokenizer's own decode is what transformers' decode calls (without the clean-up, which is off
        # here), less its Python wrapping: two calls per generated token on the model thread, 7.6 -> 3.2 us per
        # token on the CPU machine (tests/test_text.py holds the two equal).
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._rust = getattr(backend, "decode", None) if type(backend).__module__.startswith("tokenizers") else None
        self.ids: list[int] = []
        # Start decoding a little before the first new token so that tokenizers which depend on
        # the previous token (leading spaces, byte fallback) decode the seam right.
        self._prefix = list(prompt_ids[-4:]) if prompt_ids else []
        self._read = 0  # ids[:_read] have been released as text

    def _decode(self, ids: list[int]) -> str:
        if self._rust is not None:
            return self._rust(ids, skip_special_tokens=self.skip_special)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special, clean_up_tokenization_spaces=False)

    def _pending_text(self) -> str:
        """Text of the ids not yet released, decoded in the context of a few released ones."""
        prefix = self._prefix if self._read == 0 else self.ids[max(0, self._read - 4) : self._read]
        base = self._decode(prefix)
        full = self._decode(prefix + self.ids[self._read :])
        return full[len(base) :] if full.startswith(base) else full

    def push(self, token_id: int) -> str:
        """Add one token; return the newly complete text (possibly empty)."""
        self.ids.append(token_id)
        text = self._pending_text()
        # A UTF-8 character has at most 4 bytes and every token at least one, so a tail still
        # broken after 4 held tokens is invalid output, not an incomplete character.
        if text.endswith("\ufffd") and len(self.ids) - self._read < 4:
            return ""  # incomplete character: hold it until the next token completes it
        self._read = len(self.ids)
        return text

    def flush(self) -> str:
        """Text still held back at the end (an incomplete character decodes with U+FFFD)."""
        if self._read == len(self.ids):
            return ""
        text = self._pending_text()
        self._read = len(self.ids)
        return text


def rolling_windows(tokens: list[int], prefix_token: int, window: int) -> list[EncodedPair]:
    """lm-eval's `loglikelihood_rolling` split (get_rolling_token_windows with context_len 1, then
    make_disjoint_window): every token is predicted exactly once; the first window conditions on the
    prefix token, each later one on up to `window` - (its own length) tokens before it."""
    out: list[EncodedPair] = []
    if not tokens:
        return out
    first = min(window, len(tokens))
    out.append(EncodedPair([prefix_token], tokens[:first], ""))
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, window)
        end = done + n
        ctx = tokens[max(0, end - window - 1) : end - 1]
        out.append(EncodedPair(ctx[: len(ctx) - (n - 1)], tokens[end - n : end], ""))
        done = end
    return out
