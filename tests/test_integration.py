"""Integration tests: real Ray Serve with its gRPC proxy on loopback, called with a real grpcio client."""
from __future__ import annotations

import concurrent.futures
import time
import urllib.request

import grpc
import pytest

from conftest import CORPUS_LINE, CORPUS_PROMPT, assert_serves, metric_sum, run, serving
from service.api.pb import lm_pb2, lm_pb2_grpc
from service.client import Client
from service.engine.engine import ScoreOptions

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tiny_dir):
    """Ray + Serve + one tiny nf4 replica on the CPU, deployed from deploy/serve_config.yaml."""
    with serving(tiny_dir, engine={"batch": {"max_wait_ms": 20}}) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with Client(server["address"]) as c:
        yield c


def test_model_info_and_health(client, tiny_dir):
    info = client.model_info()
    assert info.model_id == str(tiny_dir)
    assert info.quantization == "nf4" and info.compute_dtype == "float32"
    assert info.max_context == 2048 and info.vocab_size == 1024 and info.device == "cpu"
    assert len(info.tokenizer_hash) == 64
    assert info.kv_cache_slots == 8  # the CPU default
    assert info.kv_cache_tokens == 8 * info.max_context and info.kv_cache_tokens_used == 0
    assert client.healthy()


def test_reflection_lists_services(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server["address"]) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in resp.list_services_response.service}
    assert {"polyglot.v1.LanguageModel", "grpc.health.v1.Health"} <= names


def test_generate_and_stream_agree(client):
    unary = client.generate(CORPUS_PROMPT, max_new_tokens=30)
    assert unary.finish_reason == lm_pb2.FINISH_REASON_EOS
    assert unary.text == CORPUS_LINE  # the tiny model learned this corpus line
    msgs = list(client.generate_stream(CORPUS_PROMPT, max_new_tokens=30))
    assert "".join(m.text for m in msgs) == unary.text
    assert [m.finish_reason for m in msgs[:-1]] == [0] * (len(msgs) - 1)
    assert msgs[-1].finish_reason == unary.finish_reason
    assert msgs[-1].generated_tokens == unary.generated_tokens
    assert unary.prompt_tokens == len(client.tokenize("오늘은 날씨가").ids)
    # Token ids come with every response, logprobs or not: the stream's messages add up to the unary ids, which
    # include the end-of-text token and detokenize to the text.
    assert len(unary.token_ids) == unary.generated_tokens and unary.token_ids[-1] == client.tokenize("<|endoftext|>").ids[0]
    assert [t for m in msgs for t in m.token_ids] == list(unary.token_ids)
    assert client.detokenize(unary.token_ids[:-1]) == unary.text


def test_stream_pieces_are_whole_characters(client):
    msgs = list(client.generate_stream("뷁", max_new_tokens=12, temperature=1.0, seed=5, logprobs=True))
    assert all("\ufffd" not in m.text for m in msgs[:-1])
    ids = [i for m in msgs for i in m.details.ids]
    assert len(ids) == msgs[-1].generated_tokens
    same = client.generate("뷁", max_new_tokens=12, temperature=1.0, seed=5)
    assert "".join(m.text for m in msgs) == same.text and same.seed == 5


def test_score_over_grpc_equals_engine(client, engine_nf4):
    pairs = [("서울의 봄은", " 벚꽃과 함께 찾아온다."), ("", "안녕하세요"), ("오늘은 날씨가 ", "맑고")]
    got = client.score(pairs, token_details=True, top_logprobs=2).scores
    want = run(engine_nf4.score(pairs, ScoreOptions()))
    for g, w, (ctx, cont) in zip(got, want, pairs):
        assert g.logprob == pytest.approx(w.logprob, abs=1e-5)
        assert g.is_greedy == w.is_greedy and g.num_tokens == w.num_tokens
        assert g.details.logprobs and sum(g.details.logprobs) == pytest.approx(g.logprob, abs=1e-4)
        assert len(g.details.top) == 2 * g.num_tokens
    assert got[2].num_chars == len(" 맑고") and got[2].num_bytes == len(" 맑고".encode())


def test_concurrent_score_calls_share_batches(client):
    def call(i):
        return client.score([(f"우리 가족은 주말마다 {i}", " 공원에서 산책을 한다.")]).scores[0]

    with concurrent.futures.ThreadPoolExecutor(32) as ex:
        results = list(ex.map(call, range(64)))
    assert all(r.num_tokens > 0 for r in results)
    assert max(r.batch_pairs for r in results) > 1


def test_tokenize_detokenize_round_trip(client):
    t = client.tokenize("한글 텍스트")
    assert client.detokenize(t.ids) == "한글 텍스트"
    assert len(t.texts) == len(t.ids)


LONG = "오늘은 날씨가 맑고 바람이 시원하다. " * 400


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda c: c.generate(""), "prompt is empty"),
        (lambda c: c.generate("안녕", max_new_tokens=5000), "max_new_tokens"),
        (lambda c: c.generate(LONG, max_new_tokens=100), "window"),
        (lambda c: c.generate("안녕", temperature=-1.0), "temperature"),
        (lambda c: c.generate("안녕", top_p=1.5), "top_p"),
        (lambda c: c.generate("안녕", top_k=-1), "top_k"),
        (lambda c: c.generate([999999]), "vocabulary"),
        (lambda c: list(c.generate_stream("안녕", temperature=-1.0)), "temperature"),
        (lambda c: list(c.generate_stream("")), "prompt is empty"),
        (lambda c: c.score([("맥락", "")]), "continuation is empty"),
        (lambda c: c.score([]), "no pairs"),
        (lambda c: c.score([(LONG, " 끝")]), "window"),
        (lambda c: c.score([("a", "b")] * 257), "limit per call"),
        (lambda c: c.score([("가" * 150_000, " 끝")] * 10), "the request is 4500"),  # 4.5 MB > 4 MiB
        (lambda c: c.score([("a", "b")], token_details=True, top_logprobs=50), "top_logprobs"),
        (lambda c: c.score([("맥락", " 다음 차례" * 300)] * 12, token_details=True, top_logprobs=20),
         "the limit per call is 65536"),
        (lambda c: c.detokenize([10**6]), "vocabulary"),
    ],
)
def test_bad_input_is_invalid_argument_and_server_survives(client, call, message):
    with pytest.raises(grpc.RpcError) as err:
        call(client)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()
    assert "Traceback" not in err.value.details()
    assert client.score([("서울의 봄은", " 벚꽃")]).scores[0].num_tokens > 0


def test_truncation_is_reported(client):
    r = client.score([(LONG, " 끝")], truncate=True).scores[0]
    assert r.truncated_tokens > 0


MOVING = [  # (metric, labels): each must grow while traffic flows
    ("ray_polyglot_requests_total", {"method": "Score", "code": "OK"}),
    ("ray_polyglot_requests_total", {"method": "GenerateStream", "code": "OK"}),
    ("ray_polyglot_requests_total", {"method": "Score", "code": "INVALID_ARGUMENT"}),
    ("ray_polyglot_request_latency_seconds_count", {"method": "Score"}),
    ("ray_polyglot_score_batch_pairs_count", {}),
    ("ray_polyglot_score_batch_tokens_count", {}),
    ("ray_polyglot_score_queue_seconds_count", {}),
    ("ray_polyglot_scored_tokens_total", {}),
    ("ray_polyglot_score_padding_tokens_total", {}),
    ("ray_polyglot_generated_tokens_total", {}),
    ("ray_polyglot_prompt_tokens_total", {}),
    ("ray_polyglot_time_to_first_token_seconds_count", {}),
    ("ray_polyglot_generation_queue_seconds_count", {}),
    ("ray_polyglot_inter_token_latency_seconds_count", {}),
    ("ray_serve_num_grpc_requests_total", {}),
]


def test_every_metric_exists_and_moves_under_traffic(client, server):
    def scrape() -> str:
        return urllib.request.urlopen(server["metrics"], timeout=5).read().decode()

    before = scrape()
    for _ in range(3):
        client.score([("서울의 봄은", " 벚꽃"), ("우리 가족은 주말마다 공원에서", " 산책을 한다.")])  # padding
        list(client.generate_stream("서울의 봄은", max_new_tokens=6, min_new_tokens=6))
        with pytest.raises(grpc.RpcError):
            client.score([("맥락", "")])
    deadline = time.monotonic() + 60
    while True:  # Ray exports replica metrics every few seconds
        after = scrape()
        still = [(m, l) for m, l in MOVING if metric_sum(after, m, **l) <= metric_sum(before, m, **l)]
        if not still:
            break
        assert time.monotonic() < deadline, f"metrics that did not move: {still}"
        time.sleep(2)
    assert metric_sum(after, "ray_polyglot_kv_cache_slots") == 8
    assert metric_sum(after, "ray_polyglot_kv_cache_tokens", kind="total") == 8 * 2048
    assert any(line.startswith("ray_polyglot_kv_cache_tokens") and 'kind="used"' in line for line in after.splitlines())
    assert metric_sum(after, "ray_polyglot_memory_bytes", kind="host_rss") > 100e6
    for gauge in ("ray_polyglot_generation_running", "ray_polyglot_generation_waiting"):
        assert any(line.startswith(gauge) for line in after.splitlines()), gauge
    assert metric_sum(after, "ray_serve_deployment_replica_healthy", deployment="LanguageModel") == 1  # from Ray itself


def test_deadline_ends_a_stream_and_the_server_keeps_serving(client):
    with pytest.raises(grpc.RpcError) as err:
        for _ in client.generate_stream("오늘은", max_new_tokens=1000, ignore_eos=True, timeout=0.5):
            pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    r = client.generate(CORPUS_PROMPT, max_new_tokens=30)
    assert r.text == CORPUS_LINE


def test_score_rolling_over_grpc(client, engine_nf4):
    text = "우리 가족은 주말마다 공원에서 산책을 한다. " * 250
    r = client.score_rolling(text)
    logprob, n_tokens, n_windows = run(engine_nf4.score_rolling(text))
    assert r.logprob == pytest.approx(logprob, abs=1e-3)
    assert (r.num_tokens, r.num_windows) == (n_tokens, n_windows) and n_windows == 2
    assert r.num_chars == len(text) and r.num_bytes == len(text.encode())
    with pytest.raises(grpc.RpcError) as err:
        client.score_rolling("")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "empty" in err.value.details()


def test_multiple_choice_reports_acc_and_acc_norm_choices(client):
    ctx = "우리 가족은 주말마다 공원에서"
    conts = [" 산책을 한다.", " 뷁", " 산책을 한다. 그리고 집에 와서 잠을 잤다."]
    r = client.score([(ctx, x) for x in conts])
    lps = [s.logprob for s in r.scores]
    assert r.HasField("choice") and r.choice == max(range(3), key=lambda i: lps[i])
    assert r.choice_normalized == max(range(3), key=lambda i: lps[i] / len(conts[i][1:]))  # lm-eval: len(choice)
    assert not client.score([("가", " 나"), ("다", " 라")]).HasField("choice")  # different contexts: no question


def test_transport_refuses_messages_beyond_the_proxy_limit(server):
    """Beyond the proxy's 64 MiB (RAY_SERVE_GRPC_MAX_MESSAGE_SIZE, set by the launcher) gRPC itself refuses."""
    from service.serve.launch import PROXY_MAX_MESSAGE_BYTES

    huge = lm_pb2.ScoreRequest(pairs=[lm_pb2.ScorePair(context="가" * (PROXY_MAX_MESSAGE_BYTES // 3 + 10),
                                                       continuation=" 끝")])
    opts = [("grpc.max_send_message_length", 256 << 20)]
    with grpc.insecure_channel(server["address"], options=opts) as ch:
        with pytest.raises(grpc.RpcError) as err:
            lm_pb2_grpc.LanguageModelStub(ch).Score(huge, timeout=60)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_serves(server["address"])


def test_a_huge_tokenize_does_not_stall_the_replicas_other_calls(server, client):
    """Tokenize (and Detokenize, and a Generate prompt's encoding) run on the tokenizer thread and decode token texts
    in one Rust call: three Tokenize calls of 190,000 characters of rare syllables (~300,000 byte-level tokens; 1-2 s
    each on the replica's event loop before, every other call waiting behind) leave a ModelInfo probe answered
    within a second throughout."""
    import random
    import threading

    from service.bench import random_korean

    big = random_korean(random.Random(0), 140_000)[:190_000]
    done, sizes, lat = threading.Event(), [], []

    def heavy():
        try:
            with Client(server["address"]) as c:
                for _ in range(3):
                    sizes.append(len(c.tokenize(big, timeout=120).ids))
        finally:
            done.set()

    t = threading.Thread(target=heavy)
    t.start()
    while not done.is_set():
        t0 = time.perf_counter()
        client.model_info(timeout=60)
        lat.append(time.perf_counter() - t0)
    t.join()
    assert len(sizes) == 3 and sizes[0] > 150_000
    assert len(lat) >= 5 and max(lat) < 1.0, f"probe latencies {sorted(lat)[-5:]}"
