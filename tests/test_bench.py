"""The benchmark's code path (`python -m service.bench --quick`) end to end on the CPU; its numbers mean nothing here."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.integration


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
    for k in ("raw_forward", "hflm", "generate"):
        assert k in b
    assert b["hflm"]["pairs"]["tokens_per_s"] > 0 and b["hflm"]["mc"]["tokens_per_s"] > 0
    md = (tmp_path / "bench-quick.md").read_text()
    assert "| Score, independent pairs (tokens/s) |" in md and "ratio" in md
