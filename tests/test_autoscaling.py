"""Serve autoscaling from the config's autoscaling_config: load adds a replica, quiet removes it (CPU, tiny model)."""
from __future__ import annotations

import collections
import threading
import time

import pytest

from conftest import looping_streams
from service.client import Client

pytestmark = pytest.mark.integration


def _replicas(serve) -> int:
    st = serve.status().applications["polyglot"].deployments["LanguageModel"]
    return st.replica_states.get("RUNNING", 0)


def test_load_scales_up_and_quiet_scales_down(tiny_dir):
    import ray
    from ray import serve

    from service.serve.launch import deploy, load_config, override, start_ray
    from test_integration import free_port

    cfg = override(load_config(), model=str(tiny_dir), num_gpus=0, grpc_port=free_port(), http_port=free_port())
    dep = cfg["applications"][0]["deployments"][0]
    # The production policy (target 128 ongoing requests, 300 s downscale delay), shrunk to test scale.
    dep["autoscaling_config"].update(min_replicas=1, initial_replicas=1, max_replicas=2, target_ongoing_requests=2,
                                     upscale_delay_s=1, downscale_delay_s=4, metrics_interval_s=0.5,
                                     look_back_period_s=2)
    dep["ray_actor_options"]["num_cpus"] = 0.5
    start_ray(None, free_port(), object_store_mb=256)
    stop = threading.Event()
    try:
        deploy(cfg, timeout_s=300)
        assert _replicas(serve) == 1
        address = f"127.0.0.1:{cfg['grpc_options']['port']}"
        threads = looping_streams(address, stop, collections.Counter(), 12)
        deadline = time.monotonic() + 120
        while _replicas(serve) < 2:
            assert time.monotonic() < deadline, "no scale-up under load"
            time.sleep(1)
        stop.set()
        for t in threads:
            t.join(timeout=90)
        deadline = time.monotonic() + 120
        while _replicas(serve) > 1:
            assert time.monotonic() < deadline, "no scale-down when quiet"
            time.sleep(1)
        with Client(address) as c:
            assert c.generate("오늘은 날씨가", max_new_tokens=30).text == " 맑고 바람이 시원하다."
    finally:
        stop.set()
        serve.shutdown()
        ray.shutdown()
