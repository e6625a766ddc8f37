"""The gRPC ingress deployment: forwards each RPC to a model replica through a Serve handle, so that a replica lost
mid-call reaches the client as UNAVAILABLE (retried on another replica first where nothing was sent yet).

Ray's gRPC proxy maps the death of the actor it called to INTERNAL and offers no hook; behind this thin CPU-only
deployment the proxy calls a process that stays up, and the loss surfaces here as a handle error we can map.
The model replica keeps all the work (auth, validation, limits, metrics): it answers with a `CallStatus` that is
copied onto the client's gRPC context here.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any, AsyncIterator

import grpc
from grpc_health.v1 import health_pb2
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.metrics import Counter

from ..api.pb import lm_pb2

log = logging.getLogger(__name__)

# Serve's own errors for a replica that went away while the router held the call (names differ across versions).
_LOST_NAMES = {"ActorDiedError", "ActorUnavailableError", "RayActorError", "DeploymentUnavailableError",
               "BackPressureError"}


def replica_lost(exc: BaseException) -> bool:
    """True for the errors a Serve handle raises when the replica serving the call died or became unreachable."""
    return isinstance(exc, RayActorError) or any(t.__name__ in _LOST_NAMES for t in type(exc).__mro__)


@dataclasses.dataclass
class CallStatus:
    """What a model replica set on its call's context: copied onto the client's context by the frontend."""
    code: grpc.StatusCode
    details: str
    trailing: list[tuple[str, str]]

    def apply(self, ctx) -> None:
        ctx.set_code(self.code)
        ctx.set_details(self.details)
        if self.trailing:
            ctx.set_trailing_metadata(self.trailing)


class HandleContext:
    """The subset of Serve's gRPC context the model's RPC methods use, for a call that arrives through a handle."""

    def __init__(self, metadata: list[tuple[str, str]]):
        self._metadata = metadata
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._trailing: list[tuple[str, str]] = []

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self._metadata

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def set_details(self, details: str) -> None:
        self._details = details

    def details(self) -> str:
        return self._details

    def set_trailing_metadata(self, trailing: list[tuple[str, str]]) -> None:
        self._trailing = list(trailing)

    def status(self) -> CallStatus | None:
        if self._code is None or self._code == grpc.StatusCode.OK:
            return None
        return CallStatus(self._code, self._details, self._trailing)


class StatusSet(Exception):
    """Ends a stream whose gRPC status code and details are already set on the context: raising is what makes Ray's
    proxy send them (a stream that ends normally is OK whatever the context says)."""


_EMPTY = {
    "Score": lm_pb2.ScoreResponse, "ScoreRolling": lm_pb2.ScoreRollingResponse,
    "Generate": lm_pb2.GenerateResponse, "Tokenize": lm_pb2.TokenizeResponse,
    "Detokenize": lm_pb2.DetokenizeResponse, "ModelInfo": lm_pb2.ModelInfoResponse,
}


@serve.deployment(name="Frontend", max_ongoing_requests=4096, ray_actor_options={"num_cpus": 0})
class Frontend:
    """Ingress of polyglot.v1.LanguageModel and grpc.health.v1.Health in front of the LanguageModel deployment."""

    def __init__(self, model, unary_attempts: int = 3):
        self.model = model
        self.stream_model = model.options(stream=True)
        # Every unary RPC is read-only, so one that lost its replica before answering is safe to run again.
        self.unary_attempts = unary_attempts
        self.lost = Counter("polyglot_replica_lost_total", tag_keys=("method", "outcome"),
                            description="Calls whose model replica died or became unreachable mid-call "
                                        "(outcome: retried on another replica, or unavailable to the client).")

    async def _unary(self, method: str, request, ctx):
        metadata = list(ctx.invocation_metadata())
        for attempt in range(1, self.unary_attempts + 1):
            try:
                response, status = await self.model.call.remote(method, request, metadata)
            except Exception as e:  # noqa: BLE001 - mapped to a status code below
                if not replica_lost(e):
                    log.exception("%s failed in the frontend", method)
                    return _status(ctx, grpc.StatusCode.INTERNAL, f"{method} failed: {type(e).__name__}", method)
                if attempt < self.unary_attempts:
                    self.lost.inc(tags={"method": method, "outcome": "retried"})
                    await asyncio.sleep(0.1 * attempt)  # let the router drop the dead replica
                    continue
                self.lost.inc(tags={"method": method, "outcome": "unavailable"})
                return _status(ctx, grpc.StatusCode.UNAVAILABLE, _lost_message(method, e), method)
            if status is not None:
                status.apply(ctx)
            return response
        raise AssertionError("unreachable")

    async def Score(self, request, grpc_context):
        return await self._unary("Score", request, grpc_context)

    async def ScoreRolling(self, request, grpc_context):
        return await self._unary("ScoreRolling", request, grpc_context)

    async def Generate(self, request, grpc_context):
        return await self._unary("Generate", request, grpc_context)

    async def Tokenize(self, request, grpc_context):
        return await self._unary("Tokenize", request, grpc_context)

    async def Detokenize(self, request, grpc_context):
        return await self._unary("Detokenize", request, grpc_context)

    async def ModelInfo(self, request, grpc_context):
        return await self._unary("ModelInfo", request, grpc_context)

    async def Check(self, request, grpc_context) -> health_pb2.HealthCheckResponse:
        """SERVING when a model replica answers its own Check; NOT_SERVING when none does."""
        try:
            response, _ = await asyncio.wait_for(self.model.call.remote("Check", request, []), timeout=45)
            return response
        except Exception as e:  # noqa: BLE001
            log.warning("health check found no model replica: %s", e)
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)

    async def GenerateStream(self, request, grpc_context) -> AsyncIterator[lm_pb2.GenerateResponse]:
        gen = self.stream_model.stream.remote("GenerateStream", request, list(grpc_context.invocation_metadata()))
        sent = False
        try:
            async for item in gen:
                if isinstance(item, CallStatus):
                    item.apply(grpc_context)
                    raise StatusSet(item.details)
                sent = True
                yield item
        except StatusSet:
            raise
        except Exception as e:  # noqa: BLE001
            # A stream is not retried even when nothing was sent yet: its model replica may have been generating,
            # and the client's deadline and retry policy are the right place to decide.
            lost = replica_lost(e)
            if lost:
                self.lost.inc(tags={"method": "GenerateStream", "outcome": "unavailable"})
            else:
                log.exception("GenerateStream failed in the frontend")
            code = grpc.StatusCode.UNAVAILABLE if lost else grpc.StatusCode.INTERNAL
            grpc_context.set_code(code)
            grpc_context.set_details(_lost_message("GenerateStream", e, sent) if lost
                                     else f"GenerateStream failed: {type(e).__name__}")
            raise StatusSet(grpc_context.details()) from None
        finally:
            gen.cancel()  # the client left (or the stream ended): the model replica frees the batch row


def _status(ctx, code: grpc.StatusCode, details: str, method: str):
    ctx.set_code(code)
    ctx.set_details(details)
    return _EMPTY[method]()


def _lost_message(method: str, exc: BaseException, sent: bool = False) -> str:
    part = " after part of the stream was sent" if sent else ""
    return (f"{method}: the model replica serving this call stopped{part} ({type(exc).__name__}); "
            f"retry: another replica (or its replacement) takes the call")


def bind(model_app, options: dict[str, Any] | None = None):
    deployment = Frontend.options(**options) if options else Frontend
    return deployment.bind(model_app)
