"""The same Serve config on a two-node Ray cluster (both nodes on this machine, started with `ray start` as KubeRay
does): one replica lands on each node and both answer through one gRPC endpoint.

It turns Ray's token authentication off for its throwaway cluster, and Ray keeps that mode for the rest of the
process: a Ray started afterwards in the same pytest process fails to authenticate. So it must stay the last test
module that starts Ray (pytest runs modules in name order; only Ray-free modules follow it)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port, serving
from service.client import Client

pytestmark = pytest.mark.integration


def _ray(*args: str, env=None) -> None:
    ray_bin = Path(sys.executable).with_name("ray")
    subprocess.run([str(ray_bin), *args], check=True, capture_output=True, timeout=120, env=env)


def test_two_nodes_one_endpoint(tiny_dir, monkeypatch):
    import ray
    from ray import serve

    gcs = free_port()
    # Ray 2.60 turns token authentication on for `ray start --head`; a node joining from a test on
    # loopback carries no token, so this throwaway cluster runs without it.
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    # Serve's proxy prefers replicas on its own node; turned off so that one light client reaches both.
    env = {**os.environ, "RAY_OBJECT_STORE_ALLOW_SLOW_STORAGE": "1", "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0"}
    _ray("start", "--head", f"--port={gcs}", "--num-cpus=1", "--include-dashboard=false",
         "--object-store-memory=100000000", env=env)
    try:
        _ray("start", f"--address=127.0.0.1:{gcs}", "--num-cpus=1", "--object-store-memory=100000000", env=env)

        def two_nodes(cfg: dict) -> None:
            cfg["proxy_location"] = "HeadOnly"  # one machine: a proxy per node would need a port per node
            cfg["applications"][0]["deployments"][0]["max_replicas_per_node"] = 1

        with serving(tiny_dir, replicas=2, edit=two_nodes, ray_address=f"127.0.0.1:{gcs}") as s:
            assert len([n for n in ray.nodes() if n["Alive"]]) == 2
            assert serve.status().applications["polyglot"].deployments["LanguageModel"].replica_states == {"RUNNING": 2}
            seen = set()
            with Client(s["address"]) as c:
                deadline = time.monotonic() + 60
                while len(seen) < 2 and time.monotonic() < deadline:
                    info = c.model_info()
                    seen.add((info.node_id, info.replica_id))
                    assert c.score([("서울의 봄은", " 벚꽃")]).scores[0].num_tokens > 0
            assert len({node for node, _ in seen}) == 2, seen
    finally:
        _ray("stop", "--force")
