"""Loading by hub id, exercised offline: a Hugging Face cache (snapshot layout under HF_HOME) holding the tiny model is
served by its id with HF_HUB_OFFLINE=1; the revision reported is the resolved commit, and `revision` pins one."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

REPO = "EleutherAI/polyglot-ko-tiny-test"
COMMIT = "08c8b1c0a1b2c3d4e5f60718293a4b5c6d7e8f90"  # the cache's one snapshot; refs/main points at it

LOAD = """
import json, sys
from service.engine.config import ModelConfig
from service.engine.loader import load
lm = load(ModelConfig(model=sys.argv[1], revision=sys.argv[2] or None, device="cpu", quantization="none"))
print(json.dumps({"revision": lm.revision, "model_id": lm.model_id, "quantization": lm.quantization}))
"""


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory, tiny_dir):
    """$HF_HOME/hub/models--org--name/{refs/main, snapshots/COMMIT/*, blobs/*}: how huggingface_hub lays out a download."""
    home = tmp_path_factory.mktemp("hf_home")
    repo = home / "hub" / ("models--" + REPO.replace("/", "--"))
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in tiny_dir.iterdir():
        if f.is_file() and f.name != "BUILD.json":
            blob = repo / "blobs" / f"{f.name}.blob"
            shutil.copy(f, blob)
            (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return home


def _load(hf_home, model: str, revision: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", LOAD, model, revision], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_a_hub_id_loads_from_the_cache_offline_and_reports_its_commit(hf_home):
    p = _load(hf_home, REPO)
    assert p.returncode == 0, p.stderr[-2000:]
    info = json.loads(p.stdout.strip().splitlines()[-1])
    assert info == {"revision": COMMIT, "model_id": REPO, "quantization": "none"}


def test_revision_pins_a_commit_and_an_unknown_one_is_refused(hf_home):
    p = _load(hf_home, REPO, COMMIT)
    assert p.returncode == 0 and json.loads(p.stdout.strip().splitlines()[-1])["revision"] == COMMIT
    p = _load(hf_home, REPO, "0" * 40)
    assert p.returncode != 0 and ("0" * 40 in p.stderr or "offline" in p.stderr.lower() or "cache" in p.stderr.lower())
