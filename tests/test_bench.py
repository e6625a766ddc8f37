"""The benchmark's code path (`python -m service.bench --quick`) end to end on the CPU; its numbers mean nothing here."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT


def test_output_check_fails_loudly_on_dropped_tokens(tiny_dir):
    """The self-check that gates the report: transformers' own greedy tokens pass; the same stream with two
    tokens dropped (the CUDA-graph capture bug seen on an H200), or cut short, raises WrongOutput."""
    import torch

    from service.bench import BenchConfig, WrongOutput, check_outputs, make_workloads
    from service.engine import loader
    from service.engine.config import ModelConfig
    from service.engine.text import encode

    cfg = BenchConfig.quick_config(str(tiny_dir))
    cfg.gen_tokens = 24
    lm = loader.load(ModelConfig(model=str(tiny_dir), device="cpu"))
    w = make_workloads(lm.tokenizer, cfg)
    prompt = encode(lm.tokenizer, w.gen_prompt)
    good = lm.model.generate(torch.tensor([prompt]), max_new_tokens=26, min_new_tokens=26, do_sample=False,
                             pad_token_id=lm.tokenizer.pad_token_id)[0, len(prompt):].tolist()
    assert len(set(good)) > 5  # a text that moves: a dropped token shows

    def level(samples, short=0):
        return {"generate": {"2": {"samples": [(None, ids) for ids in samples], "short_streams": short}}}

    assert check_outputs(str(tiny_dir), w, level([good[:24]]), cfg)["checked_streams"] == 1
    with pytest.raises(WrongOutput, match="below transformers"):
        check_outputs(str(tiny_dir), w, level([good[:7] + good[9:26]]), cfg)
    with pytest.raises(WrongOutput, match="fewer tokens"):
        check_outputs(str(tiny_dir), w, level([good[:24]], short=1), cfg)


@pytest.mark.integration


def test_bench_quick_runs_and_reports(tmp_path, tiny_dir):
    proc = subprocess.run([sys.executable, "-m", "service.bench", "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "bench-quick.json").read_text())
    s, b = r["service"], r["baselines"]
    assert s["score_pairs"]["completed"] == s["score_pairs"]["requests"] == 48
    assert s["score_mc"]["completed"] == s["score_mc"]["requests"] == 6
    assert not s["score_pairs"]["errors"] and not s["score_mc"]["errors"]
    for c, g in s["generate"].items():
        assert g["completed"] == g["streams"] == int(c) and not g["errors"]
        assert g["tokens"] == int(c) * 8  # ignore_eos + min_new_tokens: every stream ran to the end
        assert g["ttft_s"]["p50"] > 0
    assert s["score_pairs"]["mean_batch_pairs"] > 1
    for k in ("raw_forward", "hflm", "generate", "traffic"):
        assert k in b
    assert set(b["traffic"]) == set(s["traffic"]) == {"sampled 4", "greedy 4", "logprobs 4", "mixed 4"}
    for name, g in b["traffic"].items():  # transformers on the real-traffic rows' own requests
        assert g["streams"] == 4 and g["batches"] == (2 if name.startswith("mixed") else 1), name
        assert g["tokens"] == s["traffic"][name]["tokens"] and g["tokens_per_s"] > 0, name  # the tokens asked for
    assert b["hflm"]["pairs"]["tokens_per_s"] > 0 and b["hflm"]["mc"]["tokens_per_s"] > 0
    assert r["check"]["checked_streams"] >= 4 and not r["check"]["problems"]  # the run checked its own outputs
    for name, g in s["traffic"].items():  # sampled and greedy streams of mixed prompt lengths
        assert g["completed"] == g["streams"] == 4 and not g["errors"] and g["short_streams"] == 0, name
        assert g["logprobs"] == (g["tokens"] if name.startswith("logprobs") else 0), name  # one per token asked
    beside = s["beside"]  # Score flood and sampled streams at once
    assert beside["score"]["completed"] == 48 and beside["streams"]["completed"] == 4
    assert beside["streams"]["tokens"] == 4 * 16 and beside["score_vs_solo"] > 0
    (ol,) = s["open_loop"].values()  # 2 requests/s for 3 s, Poisson arrivals
    assert ol["streams"] == 6 and ol["completed"] + sum(ol["errors"].values()) == 6 and ol["arrivals_s"] > 0.5
    assert not ol["errors"] and ol["tokens"] == ol["requested_tokens"] > 6 * 4  # every stream ran to its length
    assert isinstance(ol["meets_goal"], bool)
    md = (tmp_path / "bench-quick.md").read_text()
    assert "| Score, independent pairs (tokens/s) |" in md and "ratio" in md
    assert "prompts 100–1,000, 256 new (tokens/s) | " in md and "same requests (1 batch) |" in md
    assert "| Generate, mixed 4 streams, prompts 50–1,500, 16–512 new, half sampled (tokens/s) |" in md
    assert "| Score flood + sampled streams at once |" in md and "| offered (requests/s) |" in md and "Goodput" in md


def test_kv_replay_sees_a_request_blocked_by_split_free_space():
    """Pool 10: A [0, 3) and C [6, 9) end after one step, B [3, 6) runs 10. D (6 positions) arrives at step 2: 7
    positions are free, but at most 4 in one range, so with contiguous ranges it waits until B ends (step 10);
    a paged pool admits it at once. The replay uses the engine's own allocator for the contiguous case."""
    from service.bench.kvsim import Request, replay

    reqs = [Request(0, 3, 1), Request(0, 3, 10), Request(0, 3, 1), Request(2, 6, 2)]
    contiguous = replay(reqs, pool=10, rows=8, paged=False)
    paged = replay(reqs, pool=10, rows=8, paged=True, block=1)
    assert contiguous["waits"] == [0, 0, 0, 8] and contiguous["fragmented_steps"] == 8
    assert paged["waits"] == [0, 0, 0, 0] and paged["fragmented_steps"] == 0
    rows = replay(reqs, pool=100, rows=2, paged=False)  # rows bound, not space: C waits for A's row
    assert rows["waits"] == [0, 0, 1, 0] and rows["fragmented_steps"] == 0


def test_goodput_probes_bisect_between_the_passing_and_the_failing_rate():
    """The open loop's extra runs: each at the midpoint (to the resolution) of the highest rate that met the latency
    objective and the lowest above it that did not, none once they are that close, none without such a pair."""
    from service.bench.driver import goodput, next_probe

    def runs(**met):
        return {str(r): {"offered_rate": float(r), "meets_goal": ok} for r, ok in
                ((float(k.lstrip("r").replace("_", ".")), v) for k, v in met.items())}

    grid = runs(r16=True, r24=True, r28=False, r32=False)
    assert goodput(grid) == 24 and next_probe(grid, 1.0) == 26
    grid.update(runs(r26=True))
    assert goodput(grid) == 26 and next_probe(grid, 1.0) == 27
    grid.update(runs(r27=False))
    assert next_probe(grid, 1.0) is None and goodput(grid) == 26
    assert next_probe(runs(r24=True, r32=True), 1.0) is None  # nothing failed above
    assert next_probe(runs(r4=False, r8=False), 1.0) is None  # nothing met the objective
    assert next_probe(runs(r24=True, r25=False), 1.0) is None  # already within the resolution
    assert next_probe(runs(r24=True, r26=False), 0.5) == 25  # the midpoint on the resolution's grid
    # A lower rate that failed (noise) does not hide the highest one that met it.
    assert next_probe(runs(r16=False, r24=True, r32=False), 2.0) == 28
