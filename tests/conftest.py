"""Shared fixtures: the tiny model directory and engines loaded from it."""
from __future__ import annotations

import asyncio
from pathlib import Path

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


def looping_streams(address: str, stop, codes, n: int, timeout: float = 60):
    """n started threads, each streaming 64-token generations until `stop` is set; codes counts the outcomes."""
    import threading

    import grpc

    from service.client import Client

    def load():
        with Client(address) as c:
            while not stop.is_set():
                try:
                    for _ in c.generate_stream("서울의 봄은", max_new_tokens=64, ignore_eos=True, timeout=timeout):
                        pass
                    codes["OK"] += 1
                except grpc.RpcError as e:
                    codes[e.code().name] += 1

    threads = [threading.Thread(target=load, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    return threads
