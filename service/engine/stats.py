"""Plain stats records the engine emits; the serving layer maps them to Prometheus metrics."""
from __future__ import annotations

import dataclasses
from typing import Callable, Union


@dataclasses.dataclass
class ScoreBatchStats:
    """One Score forward pass."""

    pairs: int
    tokens: int  # real (unpadded) input tokens
    padded_tokens: int  # rows x longest row
    queue_seconds: float  # oldest pair's wait before its batch started
    forward_seconds: float


@dataclasses.dataclass
class GenerationStats:
    """One finished (or abandoned) generation."""

    prompt_tokens: int
    generated_tokens: int
    time_to_first_token_seconds: float
    inter_token_seconds: list[float]
    finish_reason: str  # "length", "eos", "stop", or "cancelled"
    queue_seconds: float = 0.0  # from joining the waiting queue to getting a batch row


Stats = Union[ScoreBatchStats, GenerationStats]
StatsSink = Callable[[Stats], None]


def discard(_: Stats) -> None:
    """The default sink: stats go nowhere."""
