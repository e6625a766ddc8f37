"""Unit tests of tokenization rules: lm-eval pair encoding and UTF-8-safe incremental decoding."""
from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from service.engine.generation import StopMatcher
from service.engine.text import IncrementalDecoder, encode, encode_pair


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


def test_empty_context_uses_end_of_text(tok):
    p = encode_pair(tok, "", "안녕하세요", tok.eos_token_id)
    assert p.context_ids == [tok.eos_token_id]
    assert p.continuation_ids == encode(tok, "안녕하세요")


def test_trailing_space_moves_to_continuation(tok):
    p = encode_pair(tok, "오늘은 날씨가 ", "맑다", tok.eos_token_id)
    q = encode_pair(tok, "오늘은 날씨가", " 맑다", tok.eos_token_id)
    assert p == q
    assert p.continuation_text == " 맑다"
    assert tok.decode(p.continuation_ids) == " 맑다"


def test_pair_is_encoded_whole_then_split(tok):
    ctx, cont = "오늘은 날씨가", " 맑고 바람이"
    p = encode_pair(tok, ctx, cont, tok.eos_token_id)
    assert p.context_ids + p.continuation_ids == encode(tok, ctx + cont)
    assert p.context_ids == encode(tok, ctx)


def test_a_merge_across_the_seam_is_split_as_lm_eval_splits_it(tok, tiny_dir):
    """"오늘은 날" + "씨가 맑다": the tiny BPE merges bytes of 날 and 씨 across the seam. lm-eval's HFLM keeps the
    context encoded alone and takes the joint encoding past the context's length as the continuation; the
    pair lists are then not the joint encoding (and the service scores them as lm-eval does)."""
    from lm_eval.models.huggingface import HFLM
    from transformers import GPTNeoXForCausalLM

    from service.engine.text import BatchEncoder, encode_pairs

    ctx, cont = "오늘은 날", "씨가 맑다"
    p = encode_pair(tok, ctx, cont, tok.eos_token_id)
    assert p.context_ids + p.continuation_ids != encode(tok, ctx + cont)  # the seam case is really here
    hf = HFLM(pretrained=GPTNeoXForCausalLM.from_pretrained(tiny_dir), tokenizer=tok, batch_size=1, device="cpu")
    want_ctx, want_cont = hf._encode_pair(ctx, cont)
    assert (p.context_ids, p.continuation_ids) == (want_ctx, want_cont)
    (q,) = encode_pairs(BatchEncoder(tok), [(ctx, cont)], tok.eos_token_id)
    assert q == p


def _split_syllable_ids(tok):
    """Token ids of a text in which some token ends inside a Hangul syllable (3 UTF-8 bytes)."""
    text = "뷁궯쭯 햏 오늘은 날씨가 맑다"  # rare syllables: not merges of the tiny BPE
    ids = encode(tok, text)
    broken = [i for i in range(1, len(ids)) if "\ufffd" in tok.decode(ids[:i])]
    assert broken, "test text must contain a token boundary inside a character"
    return text, ids


def test_incremental_decoder_never_emits_partial_characters(tok):
    text, ids = _split_syllable_ids(tok)
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # at least one token was held back


def test_incremental_decoder_with_prompt_prefix(tok):
    prompt = encode(tok, "서울의 봄은")
    cont = encode(tok, " 벚꽃과 함께 뷁")
    dec = IncrementalDecoder(tok, prompt)
    out = "".join(dec.push(i) for i in cont) + dec.flush()
    assert out == tok.decode(prompt + cont)[len(tok.decode(prompt)):]


def test_incremental_decoder_on_the_rust_decode_equals_transformers_decode(tok):
    """The decoder calls the fast tokenizer's own decode; transformers' decode (what it called before) must give
    the same pieces: random ids over the whole vocabulary, special tokens included, with and without skipping."""
    import random

    rng = random.Random(0)
    ids = [rng.randrange(len(tok)) for _ in range(2000)] + [tok.eos_token_id, 30, tok.eos_token_id]
    for skip in (False, True):
        rust, slow = IncrementalDecoder(tok, ids[:5], skip), IncrementalDecoder(tok, ids[:5], skip)
        slow._rust = None
        assert rust._rust is not None
        assert [rust.push(i) for i in ids] == [slow.push(i) for i in ids]
        assert rust.flush() == slow.flush()


def test_stop_matcher_holds_back_possible_prefix():
    m = StopMatcher(("다.",))
    assert m.feed("맑") == ("맑", False)
    assert m.feed("다") == ("", False)  # could be the start of "다."
    assert m.feed(".") == ("", True)


def test_stop_matcher_releases_when_prefix_breaks():
    m = StopMatcher(("###",))
    assert m.feed("a#") == ("a", False)
    assert m.feed("#b") == ("##b", False)
    assert m.feed("x###y") == ("x", True)


def test_stop_matcher_earliest_of_several():
    m = StopMatcher(("bc", "ab"))
    assert m.feed("zabc") == ("z", True)


def test_rolling_windows_predict_every_token_once():
    from service.engine.text import rolling_windows

    tokens = list(range(100, 125))
    ws = rolling_windows(tokens, 0, 10)
    assert [t for w in ws for t in w.continuation_ids] == tokens
    assert ws[0].context_ids == [0]
    for w in ws:
        assert len(w.context_ids) + len(w.continuation_ids) <= 11  # fits the window (+1 unseen last token)
        assert w.context_ids == tokens[tokens.index(w.continuation_ids[0]) - len(w.context_ids) : tokens.index(w.continuation_ids[0])] or w.context_ids == [0]


def test_batch_encoding_equals_pair_by_pair(tiny_dir):
    """encode_pairs (Rust backend, each distinct text once) gives exactly encode_pair's split, including
    empty and whitespace-only contexts, trailing spaces and a context shared by several choices."""
    from transformers import AutoTokenizer

    from service.engine.text import BatchEncoder, encode_pair, encode_pairs

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    eot = tok.eos_token_id
    pairs = [("", "안녕하세요"), ("   ", "맑다"), ("오늘은 날씨가 ", "맑고"), ("오늘은 날씨가", " 맑고"),
             ("서울의 봄은", " 벚꽃"), ("서울의 봄은", " 춥다"), ("서울의 봄은", "벚꽃"), ("뷁궯", " 햏\n")]
    assert encode_pairs(BatchEncoder(tok), pairs, eot) == [encode_pair(tok, c, x, eot) for c, x in pairs]
