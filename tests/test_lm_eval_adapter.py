"""The lm-evaluation-harness adapter `polyglot-grpc` against a running service (real Ray Serve + gRPC)."""
from __future__ import annotations

import json

import pytest

from conftest import ROOT, run
from service.engine.engine import ScoreOptions
from test_integration import server  # noqa: F401 - the module-scoped Ray Serve fixture

pytestmark = pytest.mark.integration

DATA = ROOT / "tests" / "data" / "lm_eval" / "kobest_tiny.jsonl"
TASK = """
task: kobest_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{premise}}}}"
doc_to_choice: "{{{{[alternative_1, alternative_2]}}}}"
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def model(server):  # noqa: F811
    from service.lm_eval import PolyglotGRPC

    return PolyglotGRPC(address=server["address"], concurrency=4)


def _instances(kind, args):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_requests_equal_the_engine(model, engine_nf4):
    pairs = [("서울의 봄은", " 벚꽃과 함께"), ("서울의 봄은", " 눈이"), ("", "안녕하세요")]
    got = model.loglikelihood(_instances("loglikelihood", pairs))
    want = run(engine_nf4.score(pairs, ScoreOptions()))
    for (ll, greedy), w in zip(got, want):
        assert ll == pytest.approx(w.logprob, abs=1e-3) and greedy == w.is_greedy
    (rolling,) = model.loglikelihood_rolling(_instances("loglikelihood_rolling", [("서울의 봄은 벚꽃과 함께 찾아온다.",)]))
    assert rolling == pytest.approx(run(engine_nf4.score_rolling("서울의 봄은 벚꽃과 함께 찾아온다."))[0], abs=1e-3)
    (text,) = model.generate_until(_instances("generate_until", [("오늘은 날씨가", {"until": ["시원"], "max_gen_toks": 20})]))
    assert text == " 맑고 바람이 "


def test_simple_evaluate_on_a_local_task(model, engine_nf4, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    (tmp_path / "kobest_tiny.yaml").write_text(TASK.format(data=DATA))
    res = lm_eval.simple_evaluate(model=model, tasks=["kobest_tiny"], task_manager=TaskManager(include_path=str(tmp_path)))
    docs = [json.loads(line) for line in DATA.read_text().splitlines()]
    hits = []
    for d in docs:
        s = run(engine_nf4.score([(d["premise"], " " + d["alternative_1"]), (d["premise"], " " + d["alternative_2"])],
                                 ScoreOptions()))
        hits.append(int(max(range(2), key=lambda i: s[i].logprob) == d["label"]))
    assert res["results"]["kobest_tiny"]["acc,none"] == pytest.approx(sum(hits) / len(hits))


def test_model_args_typos_are_refused():
    from service.lm_eval import PolyglotGRPC

    with pytest.raises(TypeError, match="adress"):
        PolyglotGRPC.create_from_arg_string("adress=127.0.0.1:1")
    # What lm-eval passes every model (--batch_size, --device) is accepted.
    m = PolyglotGRPC.create_from_arg_string("address=127.0.0.1:1,concurrency=2", {"batch_size": 8, "device": "cuda"})
    assert m.concurrency == 2


def test_generate_until_left_truncates_like_hflm(model, engine_nf4):
    """A context longer than the window: HFLM keeps its last max_length - max_gen_toks tokens (the service alone
    would refuse prompt + max_new_tokens over the window), and leaves special tokens out of the text."""
    from service.engine.generation import GenerationParams

    tok = engine_nf4.lm.tokenizer
    context = "제주도는 아름다운 바다와 한라산으로 유명하다. " * 200 + "오늘은 날씨가"
    ids = tok(context, add_special_tokens=False)["input_ids"]
    assert len(ids) > 2048
    (text,) = model.generate_until(_instances("generate_until", [(context, {"until": ["시원"], "max_gen_toks": 16})]))

    async def engine_text():
        params = GenerationParams(max_new_tokens=16, stop=("시원",), skip_special_tokens=True)
        return "".join([c.text async for c, _ in engine_nf4.generate(ids[-(2048 - 16):], params)])

    assert text == run(engine_text())


def test_an_interrupted_run_keeps_its_finished_requests(model, server, tmp_path):  # noqa: F811
    """lm-eval's --use_cache: each request goes to the cache hook when its call returns, so a run that fails part
    way keeps what finished; the rerun takes those from the cache without calling the service."""
    import grpc
    from lm_eval.api.model import CachingLM

    from service.lm_eval import PolyglotGRPC

    good = [("서울의 봄은", " 벚꽃과 함께"), ("오늘은 날씨가", " 맑고"), ("우리 가족은", " 주말마다")]
    one_at_a_time = PolyglotGRPC(address=server["address"], concurrency=1)
    cached = CachingLM(one_at_a_time, str(tmp_path / "cache.db"))
    with pytest.raises(grpc.RpcError):  # the last context's continuation is empty: INVALID_ARGUMENT ends the run
        cached.loglikelihood(_instances("loglikelihood", good + [("다음은", "")]))
    unreachable = PolyglotGRPC(address="127.0.0.1:1", timeout=2)
    again = CachingLM(unreachable, str(tmp_path / "cache.db")).loglikelihood(_instances("loglikelihood", good))
    fresh = model.loglikelihood(_instances("loglikelihood", good))  # nf4: batches of other shapes, within 1e-3
    assert [g for _, g in again] == [g for _, g in fresh]
    assert [ll for ll, _ in again] == pytest.approx([ll for ll, _ in fresh], abs=1e-3)
