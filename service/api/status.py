"""Maps failures to gRPC status codes with a one-line, client-readable message (never a stack trace)."""
from __future__ import annotations

import asyncio
import logging

import grpc
import torch

from ..engine.errors import InvalidRequest, NotReady, QueueFull
from .auth import Unauthenticated

log = logging.getLogger(__name__)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, Unauthenticated):
        return grpc.StatusCode.UNAUTHENTICATED, str(exc)
    if isinstance(exc, InvalidRequest):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, QueueFull):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, torch.OutOfMemoryError):
        # A batch too big for what the KV cache left free: the replica lives on, a retry may fit.
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "out of GPU memory for this batch; retry later"
    if isinstance(exc, NotReady):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
    # Anything else is our bug: log it in full here, tell the client only its kind.
    log.exception("internal error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see server log"
