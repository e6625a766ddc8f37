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
