"""The real tokenizer's and config's properties (../shared/REAL_MODEL.md), on a tiny fixture that has them: padding
rows past the tokenizer, bos 0 unlike eos 2, no pad token in the config, special tokens split out of text, the
personal-data masks generated as tokens."""
from __future__ import annotations

import pytest
import torch

from conftest import run
from service.engine.engine import ScoreOptions
from service.engine.errors import InvalidRequest
from service.engine.generation import GenerationParams
from service.engine.sampling import SamplingParams
from service.engine.text import encode


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory):
    from service.engine.tiny import build

    return build(tmp_path_factory.mktemp("real-like"), real_like=True)


@pytest.fixture(scope="module")
def engine(real_dir):
    from service.engine.config import EngineConfig, ModelConfig
    from service.engine.engine import Engine

    e = Engine(EngineConfig(model=ModelConfig(model=str(real_dir), quantization="none", device="cpu")))
    yield e
    e.close()


def _generate(engine, prompt, params):
    async def go():
        return [c async for c, _ in engine.generate(prompt, params)]

    chunks = run(go())
    return [t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks)


def test_the_fixture_has_the_real_models_properties(real_dir, engine):
    from transformers import AutoConfig

    cfg, tok, lm = AutoConfig.from_pretrained(real_dir), engine.lm.tokenizer, engine.lm
    assert cfg.vocab_size == len(tok) + 77 == lm.vocab_size and lm.tokenizer_size == len(tok)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (0, 2, None)
    assert tok.bos_token is None and tok.unk_token is None and tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == ["<|unused0|>", "<|unused1|>", "<|endoftext|>", "<|sep|>"]
    assert tok.convert_ids_to_tokens(list(range(len(tok) - 3, len(tok)))) == ["<|acc|>", "<|tel|>", "<|rrn|>"]
    a, b = encode(tok, "a"), encode(tok, "b")
    assert encode(tok, "a<|sep|>b<|endoftext|>") == a + [3] + b + [2]  # split out of text, nothing added
    assert lm.eos_token_id == 2 and lm.prefix_token_id == 2  # lm-eval's prefix: no bos token, so eos


def test_padding_rows_are_never_generated(engine):
    """Padding rows made to win every argmax: greedy and sampled tokens stay inside the tokenizer, and greedy is the
    argmax over the tokenizer's ids (what transformers' forward gives, padding aside)."""
    from service.verify import greedy_gaps

    lm = engine.lm
    head = lm.model.get_output_embeddings().weight
    saved = head[lm.tokenizer_size :].clone()
    g = torch.Generator().manual_seed(0)
    head.data[lm.tokenizer_size :] = torch.randn(saved.shape, generator=g) * 50
    try:
        prompt = encode(lm.tokenizer, "서울의 봄은")
        with torch.no_grad():
            logits = lm.model(torch.tensor([prompt])).logits[0, -1]
        assert int(logits.argmax()) >= lm.tokenizer_size  # unmasked, a padding id would win
        greedy, _ = _generate(engine, prompt, GenerationParams(max_new_tokens=12, min_new_tokens=12))
        assert max(greedy_gaps(lm.model, prompt, greedy, eos_id=lm.eos_token_id, min_new=12,
                               choosable=lm.tokenizer_size)) <= 1e-4
        for seed in range(3):
            sampled, _ = _generate(engine, prompt, GenerationParams(
                max_new_tokens=12, sampling=SamplingParams(temperature=1.0, seed=seed)))
            assert max(sampled) < lm.tokenizer_size
    finally:
        head.data[lm.tokenizer_size :] = saved


def test_padding_ids_are_refused_as_input(engine):
    n = engine.lm.tokenizer_size
    with pytest.raises(InvalidRequest, match="outside the vocabulary"):
        engine.prompt_ids("", [5, n])
    with pytest.raises(InvalidRequest, match="outside the vocabulary"):
        engine.detokenize([n + 10])
    assert engine.prompt_ids("", [5, n - 1]) == [5, n - 1]  # the last real token (<|rrn|>) is fine


def test_mask_tokens_come_back_as_text_unless_special_tokens_are_skipped(engine):
    prompt = encode(engine.lm.tokenizer, "제 전화번호는")
    tel = engine.lm.tokenizer.convert_tokens_to_ids("<|tel|>")
    ids, text = _generate(engine, prompt, GenerationParams(max_new_tokens=8))
    assert tel in ids and "<|tel|>" in text  # the fixture learned its mask lines
    same, skipped = _generate(engine, prompt, GenerationParams(max_new_tokens=8, skip_special_tokens=True))
    assert same == ids and "<|" not in skipped
    assert skipped == engine.lm.tokenizer.decode(ids, skip_special_tokens=True)


def test_score_equals_hflm_with_the_real_prefix_and_split(engine, real_dir):
    """Empty context conditioned on eos (2), not on the config's bos (0); a merge across the seam split as lm-eval
    splits it; fp32, so equal within 1e-4."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import GPTNeoXForCausalLM

    hf = HFLM(pretrained=GPTNeoXForCausalLM.from_pretrained(real_dir).eval(), tokenizer=engine.lm.tokenizer,
              batch_size=4, device="cpu")
    pairs = [("", "서울의 봄은 벚꽃과 함께"), ("오늘은 날", "씨가 맑다"), ("제 전화번호는", " <|tel|> 입니다."),
             ("우리 가족은 주말마다 공원에서", " 산책을 한다.")]
    ref = hf.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i)
                            for i, p in enumerate(pairs)], disable_tqdm=True)
    ours = run(engine.score(pairs, ScoreOptions()))
    for (ll, greedy), r in zip(ref, ours):
        assert r.logprob == pytest.approx(ll, abs=1e-4) and r.is_greedy == greedy
    logprob, n, _ = run(engine.score_rolling("서울의 봄은 벚꽃과 함께 찾아온다."))
    (want,) = hf.loglikelihood_rolling([Instance(request_type="loglikelihood_rolling", doc={},
                                                 arguments=("서울의 봄은 벚꽃과 함께 찾아온다.",), idx=0)], disable_tqdm=True)
    assert logprob == pytest.approx(want, abs=1e-4)
