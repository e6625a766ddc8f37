"""Score equals lm-evaluation-harness's own HFLM.loglikelihood on the same tiny model (fp32)."""
from __future__ import annotations

import pytest

from conftest import run
from service.engine.engine import ScoreOptions

LONG = "제주도는 아름다운 바다와 한라산으로 유명하다. " * 200  # ~3,000 tokens: HFLM truncates on the left

REQUESTS = [
    ("오늘은 날씨가", " 맑고 바람이 시원하다."),
    ("오늘은 날씨가 ", "맑고 바람이 시원하다."),  # trailing space moves to the continuation
    ("오늘은 날씨가   ", "맑고"),
    ("", "안녕하세요, 만나서 반갑습니다."),  # empty context: end-of-text prefix
    ("서울의 봄은", " 벚"),  # one-token continuation
    ("우리 가족은 주말마다", " 공원에서 산책을 한다. 도서관에는 조용히 책을 읽는 사람들이 많았다."),
    ("그는", " 뷁궯"),  # byte-level pieces of rare syllables
    (LONG, " 가을이 되면 산에 단풍이 곱게 물든다."),
]


@pytest.fixture(scope="module")
def hflm(engine_fp32, hf_fp32):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=hf_fp32, tokenizer=engine_fp32.lm.tokenizer, batch_size=4, device="cpu", max_length=2048)


def test_loglikelihood_equals_hflm(engine_fp32, hflm):
    from lm_eval.api.instance import Instance

    ref = hflm.loglikelihood(
        [Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i) for i, r in enumerate(REQUESTS)],
        disable_tqdm=True,
    )
    ours = run(engine_fp32.score(REQUESTS, ScoreOptions(truncate=True)))
    greedy = set()
    for (ll, is_greedy), r in zip(ref, ours):
        assert r.logprob == pytest.approx(ll, abs=1e-4)
        assert r.is_greedy == is_greedy
        greedy.add(is_greedy)
    assert greedy == {True, False}
    assert ours[-1].truncated_tokens > 0 and all(r.truncated_tokens == 0 for r in ours[:-1])


@pytest.mark.parametrize("text", [
    "서울의 봄은 벚꽃과 함께 찾아온다.",  # one window
    "우리 가족은 주말마다 공원에서 산책을 한다. " * 250,  # ~2,700 tokens: two disjoint windows
    "오늘은 날씨가 맑고 바람이 시원하다. " * 520,  # ~5,700 tokens: three windows, the last one partial
])
def test_rolling_equals_hflm(engine_fp32, hflm, text):
    from lm_eval.api.instance import Instance

    (ref,) = hflm.loglikelihood_rolling([Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)],
                                        disable_tqdm=True)
    logprob, n_tokens, n_windows = run(engine_fp32.score_rolling(text))
    assert logprob == pytest.approx(ref, abs=1e-3)  # a sum over up to ~6,000 tokens of fp32 log-probs
    assert n_windows == -(-n_tokens // 2048)
