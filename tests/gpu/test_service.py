"""The service on the GPU under concurrent load (Generate streams, unary Generate and Score mixed, health probes
polling), through real Ray Serve and its gRPC proxy: every stream completes, health stays SERVING, and each
greedy text holds transformers' own tokens."""
from __future__ import annotations

import random
import socket
import threading
import time

import grpc
import pytest

from gpu_support import TIE, greedy_gaps, model_dir, prompt_ids, pytestmark, record, release_engine  # noqa: F401
from service.bench import random_korean

LENGTHS = [(240, 40), (500, 40), (1000, 40), (2000, 40), (20, 40), (60, 24)]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service():
    import ray
    from ray import serve

    from service.engine import loader
    from service.engine.config import ModelConfig
    from service.serve.launch import deploy, load_config, override, start_ray

    release_engine()  # the in-process modules' engine: the replica takes the GPU memory it leaves
    ref = loader.load(ModelConfig(model=model_dir()))  # transformers' nf4 model, for the reference logits
    start_ray(None, _port(), object_store_mb=1024)
    port = _port()
    deploy(override(load_config(), model=model_dir(), num_gpus=1, grpc_port=port, http_port=_port(), replicas=1),
           timeout_s=900)
    try:
        yield f"127.0.0.1:{port}", ref
    finally:
        serve.shutdown()
        ray.shutdown()


def test_concurrent_load_keeps_streams_whole_and_greedy_exact(service):
    from service.client import Client

    address, ref = service
    jobs = [(prompt_ids(n, seed=300 + i), new) for i, (n, new) in enumerate(LENGTHS)]
    with Client(address) as c:
        solo = [list(c.generate(p, max_new_tokens=new, min_new_tokens=new, timeout=120).token_ids) for p, new in jobs]

    stop, health, codes, scored = threading.Event(), [], {}, [0]
    results: dict[int, list[int]] = {}

    def probe():
        with Client(address) as c:
            while not stop.is_set():
                health.append(c.healthy(timeout=5))
                time.sleep(0.2)

    def score():
        rng = random.Random(1)
        with Client(address) as c:
            while not stop.is_set():
                ctx = random_korean(rng, rng.randint(200, 1500))
                c.score([(ctx, " " + random_korean(rng, 20)) for _ in range(4)], timeout=120)
                scored[0] += 1

    def stream(k: int, prompt: list[int], new: int):
        try:
            with Client(address) as c:
                ids, last = [], None
                for m in c.generate_stream(prompt, max_new_tokens=new, min_new_tokens=new, timeout=300):
                    ids += m.token_ids
                    last = m.finish_reason
                results[k] = ids
                codes[k] = last
        except grpc.RpcError as e:
            codes[k] = e.code().name

    background = [threading.Thread(target=probe), threading.Thread(target=score), threading.Thread(target=score)]
    for t in background:
        t.start()
    streams = [threading.Thread(target=stream, args=(k, *jobs[k % len(jobs)])) for k in range(4 * len(jobs))]
    for i, t in enumerate(streams):
        t.start()
        time.sleep(0.05 * (i % 3))  # arrivals spread over time: the batch changes while streams run
    for t in streams:
        t.join(timeout=600)
    stop.set()
    for t in background:
        t.join(timeout=60)

    from service.api.pb import lm_pb2

    assert all(codes[k] == lm_pb2.FINISH_REASON_LENGTH for k in range(len(streams))), codes
    assert health and all(health), f"{health.count(False)} of {len(health)} health checks failed"
    assert scored[0] > 0
    same, worst = 0, 0.0
    for k, ids in results.items():
        prompt, new = jobs[k % len(jobs)]
        assert len(ids) == new
        gaps = greedy_gaps(ref.model, prompt, ids, eos_id=ref.eos_token_id, min_new=new)
        assert max(gaps) <= TIE, f"stream {k}: token {gaps.index(max(gaps))} is {max(gaps):.3f} below transformers'"
        worst = max(worst, max(gaps))
        same += ids == solo[k % len(jobs)]
    for (prompt, new), ids in zip(jobs, solo):
        worst = max(worst, max(greedy_gaps(ref.model, prompt, ids, eos_id=ref.eos_token_id, min_new=new)))
    record("service_load", streams=len(streams), identical_to_solo=same, health_checks=len(health),
           score_calls=scored[0], max_gap=worst)
    assert worst <= TIE
