"""Fuzzing the live service with random and malformed requests: never INTERNAL, never a stack trace, healthy after."""
from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.api.pb import lm_pb2
from conftest import assert_serves
from test_integration import client, server  # noqa: F401 - the module-scoped Ray Serve fixtures

pytestmark = pytest.mark.integration

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
texts = st.one_of(st.text(max_size=40), st.just(""), st.text(alphabet="가나다뷁 .\n", min_size=1, max_size=3000))
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)


def _call(fn):
    try:
        fn()
    except grpc.RpcError as e:
        assert e.code() in ALLOWED, (e.code(), e.details())
        assert "Traceback" not in (e.details() or "")


@SETTINGS
@given(text=texts, ids=st.lists(st.integers(0, 2**32 - 1), max_size=5), max_new=st.integers(0, 3000),
       min_new=st.integers(0, 40), temperature=floats, top_k=st.integers(-5, 5000), top_p=floats, typical_p=floats,
       rep=floats, stop=st.lists(st.text(max_size=5), max_size=10), seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
       top_logprobs=st.integers(0, 30), stream=st.booleans())
def test_generate_fuzz(client, text, ids, max_new, min_new, temperature, top_k, top_p, typical_p, rep, stop, seed,
                       top_logprobs, stream):  # noqa: F811
    p = lm_pb2.GenerationParameters(max_new_tokens=max_new if max_new < 8 or max_new > 1024 else 4,  # short: CPU time
                                    min_new_tokens=min_new, temperature=temperature, top_k=top_k, top_p=top_p,
                                    typical_p=typical_p, repetition_penalty=rep, stop=stop, logprobs=top_logprobs > 0,
                                    top_logprobs=top_logprobs)
    if seed is not None:
        p.seed = seed
    req = lm_pb2.GenerateRequest(text=text, token_ids=ids, parameters=p)
    if stream:
        _call(lambda: list(client.stub.GenerateStream(req, timeout=60)))
    else:
        _call(lambda: client.stub.Generate(req, timeout=60))


@SETTINGS
@given(pairs=st.lists(st.tuples(texts, texts), max_size=300), truncate=st.booleans(), details=st.booleans(),
       top=st.integers(0, 30))
def test_score_fuzz(client, pairs, truncate, details, top):  # noqa: F811
    req = lm_pb2.ScoreRequest(pairs=[lm_pb2.ScorePair(context=c, continuation=x) for c, x in pairs],
                              truncate=truncate, token_details=details, top_logprobs=top)
    _call(lambda: client.stub.Score(req, timeout=60))


@SETTINGS
@given(text=texts, ids=st.lists(st.integers(0, 2**32 - 1), max_size=50))
def test_tokenizer_and_rolling_fuzz(client, text, ids):  # noqa: F811
    _call(lambda: client.stub.Tokenize(lm_pb2.TokenizeRequest(text=text), timeout=60))
    _call(lambda: client.stub.Detokenize(lm_pb2.DetokenizeRequest(ids=ids), timeout=60))
    _call(lambda: client.stub.ScoreRolling(lm_pb2.ScoreRollingRequest(text=text), timeout=60))


def test_healthy_after_fuzzing(client, server):  # noqa: F811
    assert client.healthy()
    assert_serves(server["address"])
