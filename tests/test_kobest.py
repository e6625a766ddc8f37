"""KoBEST offline (service/kobest): lm-eval's own task files fed from the published TSV files, and a run through
the served model that equals lm-eval's HFLM in-process on the same fp32 weights, document by document."""
from __future__ import annotations

import pytest

from conftest import serving

TASKS = ("kobest_boolq", "kobest_copa", "kobest_hellaswag", "kobest_sentineg", "kobest_wic")


def _lm_eval_yaml(task):
    from pathlib import Path

    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks" / "kobest" / f"{task}.yaml"


@pytest.mark.parametrize("task", TASKS)
def test_task_files_are_lm_evals_own_but_for_the_data_source(task):
    from lm_eval.tasks._yaml_loader import load_yaml

    from service.kobest import TASK_DIR

    # Unresolved, a `!function` reads "<the YAML's folder>/<name>": ours name lm-eval's prompt functions by module
    # path (lm_eval.tasks.kobest.utils.f), lm-eval's own files by the utils.py beside them (utils.f).
    def named(v):
        return v.rsplit("/", 1)[-1].removeprefix("lm_eval.tasks.kobest.") if isinstance(v, str) else v

    def norm(cfg):
        return {k: [{mk: named(mv) for mk, mv in m.items()} for m in v] if k == "metric_list" else named(v)
                for k, v in cfg.items()}

    ours = norm(load_yaml(TASK_DIR / f"{task}.yaml", resolve_func=False))
    theirs = norm(load_yaml(_lm_eval_yaml(task), resolve_func=False))
    assert ours.pop("custom_dataset") == "service.kobest." + task.removeprefix("kobest_")
    for key in ("dataset_path", "dataset_name", "validation_split"):
        theirs.pop(key)
    for m in theirs["metric_list"]:
        m.pop("hf_evaluate", None)
    as_named = ours
    assert as_named == theirs


def test_rows_map_to_the_hub_sets_columns():
    from service.kobest import TEST_ROWS, read_rows

    for task, n in TEST_ROWS.items():
        test, train = read_rows(task, "test"), read_rows(task, "train")
        assert len(test) == n and len(train) > 2000
        assert {r["label"] for r in test} == ({0, 1, 2, 3} if task == "kobest_hellaswag" else {0, 1})
    # The first rows of the files (../shared/data/kobest), mapped.
    copa = read_rows("kobest_copa", "test")[0]
    assert copa == {"premise": "새로 산 바지의 허리가 컸다.", "question": "결과", "alternative_1": "바지의 밑단을 잘랐다.",
                    "alternative_2": "벨트를 바지에 끼워 사이즈를 조절했다.", "label": 1}
    boolq = read_rows("kobest_boolq", "test")[0]
    assert boolq["question"] == "콜라독립 815는 코카콜라에서 만들었나요?" and boolq["label"] == 0
    assert boolq["paragraph"].startswith("콜라독립 815(815 Cola)는 ")
    wic = read_rows("kobest_wic", "test")[0]
    assert wic["word"] == "양분" and wic["context_1"] == "토양에 [양분]이 풍부하여 나무가 잘 자란다." and wic["label"] == 1
    sentineg = read_rows("kobest_sentineg", "test")[0]
    assert sentineg == {"sentence": "택배사 정말 마음에 듬", "label": 1}  # the negated text and its label


def test_a_cut_file_is_refused(tmp_path):
    import shutil

    from service.kobest import data_dir, read_rows

    shutil.copytree(data_dir() / "COPA", tmp_path / "COPA")
    lines = (tmp_path / "COPA" / "test.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp_path / "COPA" / "test.tsv").write_text("".join(lines[:-1]), encoding="utf-8")
    with pytest.raises(ValueError, match="999 rows"):
        read_rows("kobest_copa", "test", tmp_path)
    with pytest.raises(FileNotFoundError):
        read_rows("kobest_copa", "test", tmp_path / "missing")


def _docs(n_per_task: int) -> dict[str, list[int]]:
    """Documents spread over each test split (short and long paragraphs alike), the same for both runs."""
    from service.kobest import TEST_ROWS

    return {t: [k * TEST_ROWS[t] // n_per_task for k in range(n_per_task)] for t in TASKS}


def _evaluate(model, shots: int):
    import lm_eval

    from service.kobest import task_manager

    return lm_eval.simple_evaluate(model=model, tasks=list(TASKS), num_fewshot=shots, samples=_docs(6),
                                   task_manager=task_manager(), log_samples=True, fewshot_random_seed=1234,
                                   bootstrap_iters=0)


@pytest.fixture(scope="module")
def hflm(hf_fp32, tiny_dir):
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    return HFLM(pretrained=hf_fp32, tokenizer=AutoTokenizer.from_pretrained(tiny_dir), batch_size=16, device="cpu",
                max_length=2048)


@pytest.mark.integration
def test_kobest_through_the_service_equals_hflm(tiny_dir, hflm):
    """0- and 5-shot, 6 documents of each task: the same requests, the same choice for every document, the same
    acc / macro F1 / acc_norm. fp32 on both sides, so log-likelihoods agree to ~1e-4."""
    from service.lm_eval import PolyglotGRPC

    with serving(tiny_dir, engine={"model": {"quantization": "none"}}) as s:
        served = PolyglotGRPC(address=s["address"], concurrency=8)
        runs = {shots: (_evaluate(served, shots), _evaluate(hflm, shots)) for shots in (0, 5)}
    for shots, (ours, ref) in runs.items():
        for task in TASKS:
            a, b = ours["samples"][task], ref["samples"][task]
            assert [x["doc_id"] for x in a] == [x["doc_id"] for x in b] == _docs(6)[task]
            for x, y in zip(a, b):
                assert x["arguments"] == y["arguments"]  # the same prompts, few-shot examples included
                ll_x = [r[0] for r in x["filtered_resps"]]
                ll_y = [r[0] for r in y["filtered_resps"]]
                assert ll_x == pytest.approx(ll_y, abs=2e-3), (shots, task, x["doc_id"])
                assert {m: x[m] for m in ("acc", "f1", "acc_norm") if m in x} == \
                       {m: y[m] for m in ("acc", "f1", "acc_norm") if m in y}, (shots, task, x["doc_id"])
            metrics = {k: v for k, v in ref["results"][task].items() if k.split(",")[0] in ("acc", "f1", "acc_norm")}
            assert metrics and {k: ours["results"][task][k] for k in metrics} == pytest.approx(metrics)
        contexts = [x["arguments"][0][0] for t in TASKS for x in ours["samples"][t]]
        assert all(c.count("\n\n") == shots for c in contexts)  # lm-eval's few-shot separator: 5 examples or none
        if shots == 5:
            assert max(map(len, contexts)) > 1200


def test_benchmark_records_the_requests_and_reports_lm_evals_metrics_of_each_side(tmp_path):
    """The KoBEST benchmark's record -> (GPU run) -> report chain, with made-up answers for the GPU step: the
    recorded requests are lm-eval's, the report's metrics are lm-eval's on those answers, and a document whose
    choice differs is listed with its margin."""
    import json

    from service.kobest import bench, read_rows

    mix = bench.record(tmp_path / "req.json.xz", limit=2)
    assert mix["documents_per_task"] == {t: 2 for t in TASKS}
    assert mix["requests"] == 2 * (2 + 2 + 4 + 2 + 2)
    data, pairs = bench._load_requests(tmp_path / "req.json.xz")
    hflm = [[-float(len(x)), False] for _, x in pairs]  # the shortest choice wins
    service = [list(a) for a in hflm]
    first_copa = next(i for i, (t, *_) in enumerate(data["requests"]) if t == "kobest_copa")
    copa = pairs[first_copa : first_copa + 2]
    assert len(copa[0][1]) < len(copa[1][1])  # the first COPA document: HFLM's (made-up) answers choose the first
    service[first_copa + 1][0] += 100.0  # the service's choose the second
    results = {"date": "d", "device": "cpu", "versions": {}, "mix": mix, "service": {"4": {"seconds": 1.0}},
               "hflm": {"seconds": 3.0}, "answers": {"service-4": service, "hflm": hflm}}
    (tmp_path / "res.json").write_text(json.dumps(results))
    s = bench.report(tmp_path / "req.json.xz", [tmp_path / "res.json"])
    assert s["service"]["4"]["speedup_vs_hflm"] == 3.0
    a = s["agreement"]["service-4"]
    gap = len(copa[1][1]) - len(copa[0][1])
    assert (a["documents"], a["same_prediction"]) == (10, 9)
    assert a["disagreements"] == [{"task": "kobest_copa", "doc_id": 0, "hflm_margin": pytest.approx(gap),
                                   "service_margin": pytest.approx(100 - gap)}]
    assert s["metrics"]["service-4"]["kobest_copa"]["acc,none"] != s["metrics"]["hflm"]["kobest_copa"]["acc,none"]
    wic = s["metrics"]["hflm"]["kobest_wic"]["acc,none"]
    labels = [r["label"] for r in read_rows("kobest_wic", "test")[:2]]
    assert wic == sum(int(lbl == 1) for lbl in labels) / 2  # " 예" is shorter than " 아니오": always choice 1
