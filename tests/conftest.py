"""Shared fixtures: the tiny model directory, engines loaded from it, and a live service to test against."""
from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / ".models" / "tiny"


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    from service.engine.tiny import ensure

    return ensure(TINY)


def _engine(tiny_dir: Path, quantization: str, generation: dict | None = None):
    from service.engine.config import EngineConfig, GenerationConfig, ModelConfig
    from service.engine.engine import Engine

    return Engine(
        EngineConfig(model=ModelConfig(model=str(tiny_dir), quantization=quantization, device="cpu"),
                     generation=GenerationConfig(**(generation or {})))
    )


@pytest.fixture(scope="session")
def engine_fp32(tiny_dir):
    return _engine(tiny_dir, "none")


@pytest.fixture(scope="session")
def engine_nf4(tiny_dir):
    return _engine(tiny_dir, "nf4")


@pytest.fixture(scope="session")
def engine_small(tiny_dir):
    """Two KV slots, 3-token prefill chunks, at most 3 waiting: exercises admission, queueing, chunking."""
    return _engine(tiny_dir, "none", {"max_slots": 2, "prefill_chunk": 3, "max_waiting": 3})


@pytest.fixture(scope="session")
def hf_fp32(tiny_dir):
    """transformers' own GPTNeoXForCausalLM on the same weights: the independent reference."""
    from transformers import GPTNeoXForCausalLM

    return GPTNeoXForCausalLM.from_pretrained(tiny_dir, dtype="float32").eval()


_LOOP = asyncio.new_event_loop()


def run(coro):
    """Run on one loop for the whole session, as a replica does (the engine's batcher lives on it)."""
    return _LOOP.run_until_complete(coro)


def looping(address: str, stop, codes, n: int, call, details: list | None = None) -> list:
    """n started threads, each with its own Client repeating `call(client)` until `stop` is set; codes counts
    the outcomes (OK or the gRPC status code's name), `details` collects the failures' messages."""
    import threading

    import grpc

    from service.client import Client

    def load():
        with Client(address) as c:
            while not stop.is_set():
                try:
                    call(c)
                    codes["OK"] += 1
                except grpc.RpcError as e:
                    codes[e.code().name] += 1
                    if details is not None:
                        details.append(e.details())

    threads = [threading.Thread(target=load, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


def looping_streams(address: str, stop, codes, n: int, timeout: float = 60, retry=None, details=None) -> list:
    """n threads streaming 64-token generations until `stop` is set (with `retry`, a RetryPolicy, if given)."""
    def stream(c):
        if retry is not None:
            c.retry = retry
        for _ in c.generate_stream("서울의 봄은", max_new_tokens=64, ignore_eos=True, timeout=timeout):
            pass

    return looping(address, stop, codes, n, stream, details)


def metric_sum(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of one metric in a Prometheus text scrape whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            series, value = line.rsplit(" ", 1)
            if series.split("{")[0] == name and all(f'{k}="{v}"' in series for k, v in labels.items()):
                total += float(value)
    return total


def replica_pids() -> list[str]:
    """Process ids of this machine's LanguageModel replicas (Ray names the worker process after the actor)."""
    import subprocess

    return subprocess.run(["pgrep", "-f", "ServeReplica:polyglot:LanguageModel"], capture_output=True,
                          text=True).stdout.split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CORPUS_PROMPT, CORPUS_LINE = "오늘은 날씨가", " 맑고 바람이 시원하다."  # a line the tiny model learned by heart


def assert_serves(address: str, token: str | None = None) -> None:
    """The service at `address` answers a Generate with the corpus line (greedy, so exactly)."""
    from service.client import Client

    with Client(address, token=token) as c:
        assert c.generate(CORPUS_PROMPT, max_new_tokens=30, timeout=60).text == CORPUS_LINE


@contextlib.contextmanager
def serving(
    tiny_dir: Path,
    *,
    replicas: int | None = 1,
    engine: dict[str, dict] | None = None,
    edit: Callable[[dict], None] | None = None,
    ray_address: str | None = None,
    token: str | None = None,
) -> Iterator[dict[str, Any]]:
    """The tiny model served by real Ray Serve + its gRPC proxy on loopback, deployed from
    deploy/serve_config.yaml with launch-time overrides (`engine` sections, `edit(cfg)` for the rest).
    Starts Ray unless `ray_address` names a running cluster. Yields {"address", "metrics", "cfg"}; when the
    body succeeds, checks the service still serves (sending `token`); always shuts Serve and Ray down."""
    import ray
    from ray import serve

    from service.serve.launch import deploy, load_config, override, start_ray

    metrics_port = free_port()
    try:
        start_ray(ray_address, metrics_port, object_store_mb=256)
    except Exception as e:  # Ray's fixed 30 s for the raylet to register; once more on a machine that was busy
        if ray_address or "timed out during startup" not in str(e):
            raise
        ray.shutdown()
        _wait_for_ray_to_exit()
        start_ray(ray_address, metrics_port, object_store_mb=256)
    try:
        cfg = override(load_config(), model=str(tiny_dir), num_gpus=0, grpc_port=free_port(), http_port=free_port(),
                       replicas=replicas, engine=engine)
        if edit:
            edit(cfg)
        deploy(cfg, timeout_s=300)
        address = f"127.0.0.1:{cfg['grpc_options']['port']}"
        yield {"address": address, "metrics": f"http://127.0.0.1:{metrics_port}/metrics", "cfg": cfg}
        assert_serves(address, token)
    finally:
        serve.shutdown()
        ray.shutdown()
        if not ray_address:
            _wait_for_ray_to_exit()


def _wait_for_ray_to_exit(timeout_s: float = 60) -> None:
    """Waits until the stopped cluster's raylet, GCS and workers are gone: on CI's two cores, a next cluster started
    while they still ran once failed to register its raylet within Ray's fixed 30 s (CI: test_fuzz right after
    test_faults)."""
    import subprocess

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = subprocess.run(["pgrep", "-f", "raylet|gcs_server|ray::"], capture_output=True, text=True).stdout
        if not left.split():
            return
        time.sleep(0.5)
