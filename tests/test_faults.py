"""Fault tests: a model replica's process is killed mid-load, and the calls in flight fail fast (none hangs), Score
calls still all succeed, and Serve starts a replacement, which serves.

Shipped path (Ray's proxy calls the replicas): Ray reports the dead replica's calls as INTERNAL ("The actor died
unexpectedly"), a mapping inside Ray with no hook, which is why the client's policy retries INTERNAL on read-only
calls. With `frontend: true` (service/serve/frontend.py) the dead replica's streams are UNAVAILABLE and unary calls
are retried on the other replica server-side, so clients without any retry policy see no failure but those.
"""
from __future__ import annotations

import collections
import os
import signal
import threading
import time
import urllib.request

import pytest

from conftest import looping, looping_streams, metric_sum, replica_pids, serving
from service.client import NO_RETRY, Client

pytestmark = pytest.mark.integration


def _score_four(c: Client) -> None:
    r = c.score([("우리 가족은 주말마다", " 공원에서 산책을 한다.")] * 4, timeout=120)
    assert len(r.scores) == 4


def _score_four_unretried(c: Client) -> None:
    c.retry = NO_RETRY  # a server-side retry or nothing
    _score_four(c)


def _kill_one_under_load(tiny_dir, replicas: int, score, lost, stream_retry=None, edit=None, metric=None,
                         kills: int = 3):
    """Streams and Scores loop while one of `replicas` replicas is SIGKILLed; returns (streams, scores, details,
    Scores done before the first kill, streams done before the last replacement came up, the sum of `metric` once it
    is exported) after the replacement served. `lost(streams)`: whether some stream was cut by a kill; while not
    (the killed replica held no stream at that instant: seen on 2 of 6 CI runs), a replica is killed again, up to
    `kills` times."""
    from ray import serve

    streams: collections.Counter = collections.Counter()
    scores: collections.Counter = collections.Counter()
    details: list[str] = []
    stop = threading.Event()
    with serving(tiny_dir, replicas=replicas, edit=edit) as s:
        try:
            # Four streams per replica: Ray's router (power of two choices) could leave a replica with none of only four.
            threads = looping_streams(s["address"], stop, streams, 4 * replicas, timeout=30, retry=stream_retry,
                                      details=details)
            threads += looping(s["address"], stop, scores, 4, score)
            time.sleep(4)
            scores_before_kill = scores["OK"]
            for _ in range(kills):
                pids = replica_pids()
                assert len(pids) == replicas
                os.kill(int(pids[0]), signal.SIGKILL)
                deadline = time.monotonic() + 120

                def replaced() -> bool:
                    now = replica_pids()
                    running = serve.status().applications["polyglot"].deployments["LanguageModel"].replica_states
                    return len(now) == replicas and now != pids and running.get("RUNNING", 0) == replicas

                while not replaced():
                    assert time.monotonic() < deadline, "the replica did not come back"
                    time.sleep(1)
                ok_before = streams["OK"]
                time.sleep(5)
                if lost(streams):
                    break
        finally:
            stop.set()
        for t in threads:
            t.join(timeout=150)
            assert not t.is_alive(), "a call hung"
        counted = 0.0
        deadline = time.monotonic() + 60
        while metric and not counted and time.monotonic() < deadline:  # Ray exports metrics every few seconds
            counted = metric_sum(urllib.request.urlopen(s["metrics"], timeout=5).read().decode(), metric)
            time.sleep(0 if counted else 2)
    return streams, scores, details, scores_before_kill, ok_before, counted


def test_killed_replica_fails_streams_fast_retries_scores_and_comes_back(tiny_dir):
    streams, scores, _, scores_before_kill, ok_before, _ = _kill_one_under_load(
        tiny_dir, 1, _score_four, lambda s: s["INTERNAL"] + s["UNAVAILABLE"] >= 1)
    assert scores_before_kill > 0 and set(scores) == {"OK"}, scores  # the client's policy retried them, none lost
    assert streams["OK"] > ok_before  # the new replica serves the same clients
    assert set(streams) <= {"OK", "INTERNAL", "UNAVAILABLE"}, streams  # failed fast, never DEADLINE_EXCEEDED
    assert streams["INTERNAL"] + streams["UNAVAILABLE"] >= 1  # the killed replica's in-flight streams


def test_with_the_frontend_a_killed_replica_is_unavailable_to_its_streams_and_scores_are_retried(tiny_dir):
    def with_frontend(cfg):
        cfg["applications"][0]["args"]["frontend"] = True

    streams, scores, details, scores_before_kill, ok_before, lost = _kill_one_under_load(
        tiny_dir, 2, _score_four_unretried, lambda s: s["UNAVAILABLE"] >= 1, stream_retry=NO_RETRY, edit=with_frontend,
        metric="ray_polyglot_replica_lost_total")
    assert scores_before_kill > 0 and set(scores) == {"OK"}, scores  # retried on the other replica, none lost
    assert streams["OK"] > ok_before  # the replicas serve the same clients
    assert set(streams) <= {"OK", "UNAVAILABLE"}, streams  # failed fast and retryable: never INTERNAL or a deadline
    assert streams["UNAVAILABLE"] >= 1, streams  # the killed replica's in-flight streams
    assert all("model replica serving this call stopped" in d for d in details), details
    assert lost >= streams["UNAVAILABLE"], lost  # the frontend counts every call that lost its replica
