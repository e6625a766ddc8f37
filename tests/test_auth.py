"""Bearer-token access control: unit tests of the check, and a live service that requires a token."""
from __future__ import annotations

import grpc
import pytest

from conftest import CORPUS_LINE, CORPUS_PROMPT, serving
from service.api.auth import TokenCheck, Unauthenticated
from service.client import Client


def test_token_check_accepts_only_configured_bearer_tokens(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYGLOT_TEST_TOKENS", "alpha, beta")
    f = tmp_path / "token"
    f.write_text("gamma\n")
    check = TokenCheck("POLYGLOT_TEST_TOKENS", str(f))
    for token in ("alpha", "beta", "gamma"):
        check.check([("authorization", f"Bearer {token}")])
    for md in ([], [("authorization", "Bearer delta")], [("authorization", "Basic alpha")], [("x", "Bearer alpha")]):
        with pytest.raises(Unauthenticated) as err:
            check.check(md)
        assert "alpha" not in str(err.value) and "delta" not in str(err.value)  # tokens never echoed


def test_no_tokens_means_open():
    assert not TokenCheck(None, None).enabled
    TokenCheck("POLYGLOT_UNSET_VARIABLE", None).check([])


@pytest.mark.integration
def test_service_requires_the_token(tiny_dir, tmp_path):
    secret = tmp_path / "tokens"
    secret.write_text("s3cret-token\n")
    with serving(tiny_dir, engine={"auth": {"token_file": str(secret)}}, token="s3cret-token") as s, Client(s["address"]) as anonymous, \
            Client(s["address"], token="wrong") as wrong, Client(s["address"], token="s3cret-token") as good:
        for c in (anonymous, wrong):
            for call in (lambda: c.score([("서울의", " 봄")]), lambda: c.model_info(),
                         lambda: list(c.generate_stream("서울의", max_new_tokens=2)), lambda: c.tokenize("봄")):
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "s3cret" not in err.value.details()
        assert anonymous.healthy()  # Kubernetes probes send no metadata
        assert good.score([("서울의", " 봄")]).scores[0].num_tokens > 0
        assert "".join(m.text for m in good.generate_stream(CORPUS_PROMPT, max_new_tokens=30)) == CORPUS_LINE
