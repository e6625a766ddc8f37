"""Serve autoscaling from the config's autoscaling_config: load adds a replica, quiet removes it (CPU, tiny model)."""
from __future__ import annotations

import collections
import threading
import time

import pytest

from conftest import looping_streams, serving

pytestmark = pytest.mark.integration


def _replicas(serve) -> int:
    st = serve.status().applications["polyglot"].deployments["LanguageModel"]
    return st.replica_states.get("RUNNING", 0)


def _shrink(cfg: dict) -> None:
    """The production policy (target 128 ongoing requests, 300 s downscale delay), shrunk to test scale."""
    dep = cfg["applications"][0]["deployments"][0]
    dep["autoscaling_config"].update(min_replicas=1, initial_replicas=1, max_replicas=2, target_ongoing_requests=2,
                                     upscale_delay_s=1, downscale_delay_s=4, metrics_interval_s=0.5,
                                     look_back_period_s=2)
    dep["ray_actor_options"]["num_cpus"] = 0.5


def test_load_scales_up_and_quiet_scales_down(tiny_dir):
    from ray import serve

    stop = threading.Event()
    with serving(tiny_dir, replicas=None, edit=_shrink) as s:
        try:
            assert _replicas(serve) == 1
            threads = looping_streams(s["address"], stop, collections.Counter(), 12)
            deadline = time.monotonic() + 120
            while _replicas(serve) < 2:
                assert time.monotonic() < deadline, "no scale-up under load"
                time.sleep(1)
        finally:
            stop.set()
        for t in threads:
            t.join(timeout=90)
        deadline = time.monotonic() + 120
        while _replicas(serve) > 1:
            assert time.monotonic() < deadline, "no scale-down when quiet"
            time.sleep(1)
