"""Fault test: the replica process is killed mid-load. In-flight streams fail fast (none hangs); Score calls from the
client, whose gRPC retry policy covers read-only calls, all succeed; Serve starts a new replica, and it serves.
Ray's proxy reports the dead replica's calls as INTERNAL ("The actor died unexpectedly"), not UNAVAILABLE: that
mapping lives in Ray, outside this service, which is why the client's policy retries INTERNAL on read-only calls."""
from __future__ import annotations

import collections
import os
import signal
import threading
import time

import pytest

from conftest import looping, looping_streams, replica_pids, serving
from service.client import Client

pytestmark = pytest.mark.integration


def _score_four(c: Client) -> None:
    r = c.score([("우리 가족은 주말마다", " 공원에서 산책을 한다.")] * 4, timeout=120)  # the default retry policy
    assert len(r.scores) == 4


def test_killed_replica_fails_streams_fast_retries_scores_and_comes_back(tiny_dir):
    from ray import serve

    streams: collections.Counter = collections.Counter()
    scores: collections.Counter = collections.Counter()
    stop = threading.Event()
    with serving(tiny_dir) as s:
        try:
            threads = looping_streams(s["address"], stop, streams, 4, timeout=30)
            threads += looping(s["address"], stop, scores, 4, _score_four)
            time.sleep(4)
            pids = replica_pids()
            assert len(pids) == 1
            scores_before_kill = scores["OK"]
            os.kill(int(pids[0]), signal.SIGKILL)
            deadline = time.monotonic() + 120

            def replaced() -> bool:
                now = replica_pids()
                running = serve.status().applications["polyglot"].deployments["LanguageModel"].replica_states
                return bool(now) and now != pids and running.get("RUNNING", 0) == 1

            while not replaced():
                assert time.monotonic() < deadline, "the replica did not come back"
                time.sleep(1)
            ok_before = streams["OK"]
            time.sleep(5)
        finally:
            stop.set()
        for t in threads:
            t.join(timeout=150)
            assert not t.is_alive(), "a call hung"
    assert scores_before_kill > 0 and set(scores) == {"OK"}, scores  # retried onto the new replica, none lost
    assert streams["OK"] > ok_before  # the new replica serves the same clients
    assert set(streams) <= {"OK", "INTERNAL", "UNAVAILABLE"}, streams  # failed fast, never DEADLINE_EXCEEDED
    assert streams["INTERNAL"] + streams["UNAVAILABLE"] >= 1  # the killed replica's in-flight streams
