"""The Ray Serve deployment: one engine per replica, one ingress method per RPC, errors as gRPC status codes."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
import ray
from ray import serve

from ..api import convert, validation
from ..api.pb import lm_pb2
from ..api.auth import TokenCheck
from ..api.status import status_for
from ..engine.config import EngineConfig, LimitsConfig
from ..engine.engine import Engine
from ..engine.errors import QueueFull
from . import frontend
from .frontend import HandleContext, StatusSet
from .metrics import Metrics

log = logging.getLogger(__name__)

_UNARY = {"Score", "ScoreRolling", "Generate", "Tokenize", "Detokenize", "ModelInfo", "Check"}


@serve.deployment(name="LanguageModel", max_ongoing_requests=1024, health_check_period_s=10)
class LanguageModelServer:
    """Ingress of the polyglot.v1.LanguageModel service (and grpc.health.v1.Health)."""

    def __init__(self, engine_config: dict[str, Any], auth: dict[str, Any] | None = None):
        auth = auth or {}
        self.auth = TokenCheck(auth.get("token_env"), auth.get("token_file"))
        self.metrics = Metrics()
        self._replica_id = serve.get_replica_context().replica_id.unique_id
        self._node_id = ray.get_runtime_context().get_node_id()
        self.engine = Engine(EngineConfig.from_dict(engine_config), on_stats=self.metrics.record)

    def __del__(self) -> None:
        """Serve calls this on shutdown after draining (it waits up to graceful_shutdown_timeout_s for the calls in
        flight): anything still queued or streaming ends UNAVAILABLE, the engine's threads stop and its GPU memory
        is freed. Serve gives no earlier signal that a replica is stopping."""
        engine = getattr(self, "engine", None)  # absent when __init__ failed
        if engine is not None:
            engine.close()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve `user_config`: request limits change without a restart ({"limits": {...}})."""
        limits = dict(user_config.get("limits", {}))
        self.engine.cfg.limits = LimitsConfig(**{**vars(self.engine.cfg.limits), **limits})

    async def call(self, method: str, request, metadata: list[tuple[str, str]]):
        """A unary RPC from the frontend's handle: (response, CallStatus or None)."""
        if method not in _UNARY:
            raise ValueError(f"no unary RPC {method}")
        ctx = HandleContext(metadata)
        response = await getattr(self, method)(request, ctx)
        return response, ctx.status()

    async def stream(self, method: str, request, metadata: list[tuple[str, str]]):
        """GenerateStream from the frontend's handle: its messages, then a CallStatus if it failed."""
        if method != "GenerateStream":
            raise ValueError(f"no streaming RPC {method}")
        ctx = HandleContext(metadata)
        try:
            async for message in self.GenerateStream(request, ctx):
                yield message
        except StatusSet:
            yield ctx.status()

    @property
    def limits(self) -> LimitsConfig:
        return self.engine.cfg.limits

    def _fail(self, ctx, method: str, exc: BaseException, t0: float) -> None:
        code, msg = status_for(exc)
        if isinstance(exc, QueueFull):
            self.metrics.refused(method, exc.reason)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            wait_ms = self.limits.retry_after_ms
            # gRPC's standard pushback trailer: clients with a retry policy wait this long, then retry.
            # Ray's proxy drops trailers of a failed stream, so the message says it too.
            ctx.set_trailing_metadata([("grpc-retry-pushback-ms", str(wait_ms))])
            msg = f"{msg} (retry after {wait_ms} ms)"
        ctx.set_code(code)
        ctx.set_details(msg)
        self.metrics.request(method, code.name, time.monotonic() - t0)

    def _admit(self, ctx, request) -> None:
        """Checks every RPC passes before any work: the caller's token, then the message size."""
        self.auth.check(ctx.invocation_metadata())
        validation.request_size(request, self.limits)

    def _ok(self, method: str, t0: float) -> None:
        self.metrics.request(method, "OK", time.monotonic() - t0)
        self.metrics.memory_bytes(self.engine.memory_bytes)

    async def _unary(self, method: str, ctx, request, empty, work):
        """Answer a unary RPC with `await work()`; any failure becomes a status code and `empty`."""
        t0 = time.monotonic()
        try:
            self._admit(ctx, request)
            response = await work()
        except Exception as e:  # noqa: BLE001 - every failure becomes a status code
            self._fail(ctx, method, e, t0)
            return empty
        self._ok(method, t0)
        return response

    async def Score(self, request: lm_pb2.ScoreRequest, grpc_context) -> lm_pb2.ScoreResponse:
        async def work():
            pairs, opts = validation.score_request(request, self.limits)
            delimiter = request.target_delimiter if request.HasField("target_delimiter") else " "
            results = await self.engine.score(pairs, opts, validation.timeout_s(grpc_context.invocation_metadata()))
            if not opts.details:
                return convert.score_response(pairs, results, self.engine.token_texts, delimiter)
            # Up to limits.max_score_details entries, each a message and a decoded text: off the event loop.
            entries = sum(r.num_tokens for r in results) * (1 + opts.top_n)
            return await self.engine.on_tokenizer_thread(convert.score_response, pairs, results,
                                                         self.engine.token_texts, delimiter, size=entries)

        return await self._unary("Score", grpc_context, request, lm_pb2.ScoreResponse(), work)

    async def ScoreRolling(self, request: lm_pb2.ScoreRollingRequest, grpc_context) -> lm_pb2.ScoreRollingResponse:
        async def work():
            text = validation.rolling_request(request, self.limits)
            logprob, n_tokens, n_windows = await self.engine.score_rolling(
                text, validation.timeout_s(grpc_context.invocation_metadata()))
            return lm_pb2.ScoreRollingResponse(logprob=logprob, num_tokens=n_tokens, num_chars=len(text),
                                               num_bytes=len(text.encode("utf-8")), num_windows=n_windows)

        return await self._unary("ScoreRolling", grpc_context, request, lm_pb2.ScoreRollingResponse(), work)

    async def Generate(self, request: lm_pb2.GenerateRequest, grpc_context) -> lm_pb2.GenerateResponse:
        async def work():
            acc = None
            async for acc in self._generate(request, grpc_context):
                pass
            return acc.response()

        return await self._unary("Generate", grpc_context, request, lm_pb2.GenerateResponse(), work)

    async def GenerateStream(self, request: lm_pb2.GenerateRequest, grpc_context):
        t0 = time.monotonic()
        try:
            self._admit(grpc_context, request)
            async for acc in self._generate(request, grpc_context):
                if acc.text or acc.finish is not None or acc.ids and acc.want_details:
                    yield acc.take()
        except Exception as e:  # noqa: BLE001
            self._fail(grpc_context, "GenerateStream", e, t0)
            # A stream that ends normally is OK whatever the context says: raising is what makes
            # Ray's proxy send the status code and details set above.
            raise StatusSet(grpc_context.details()) from None
        self._ok("GenerateStream", t0)

    async def _generate(self, request, ctx):
        """Validate, then yield the accumulator after every generated token."""
        t0 = time.monotonic()
        text, ids, params = validation.generate_request(request, self.limits)
        timeout = validation.timeout_s(ctx.invocation_metadata())
        prompt = await self.engine.prompt(text, ids)  # off the event loop, after the queue check
        acc = convert.GenerateAccumulator(len(prompt), params.logprobs, self.engine.token_texts)
        if timeout is not None:
            timeout -= time.monotonic() - t0
        try:
            async for chunk, seed in self.engine.generate(prompt, params, timeout):
                if acc.generated == 0:
                    self._report_load()
                acc.add(chunk, seed)
                yield acc
        finally:
            self._report_load()

    def _report_load(self) -> None:
        self.metrics.generation_load(*self.engine.generation_load(), *self.engine.kv_cache_use())

    async def Tokenize(self, request: lm_pb2.TokenizeRequest, grpc_context) -> lm_pb2.TokenizeResponse:
        async def work():
            text = validation.text_request("text", request.text, self.limits)
            # The response too is built off the event loop: 190,000 characters are ~300,000 ids and texts.
            return await self.engine.on_tokenizer_thread(self._tokenize, text, size=len(text))

        return await self._unary("Tokenize", grpc_context, request, lm_pb2.TokenizeResponse(), work)

    def _tokenize(self, text: str) -> lm_pb2.TokenizeResponse:
        ids, texts = self.engine.tokenize(text)
        return lm_pb2.TokenizeResponse(ids=ids, texts=texts)

    async def Detokenize(self, request: lm_pb2.DetokenizeRequest, grpc_context) -> lm_pb2.DetokenizeResponse:
        async def work():
            ids = list(request.ids)
            text = await self.engine.on_tokenizer_thread(self.engine.detokenize, ids, size=len(ids))
            return lm_pb2.DetokenizeResponse(text=text)

        return await self._unary("Detokenize", grpc_context, request, lm_pb2.DetokenizeResponse(), work)

    async def ModelInfo(self, request: lm_pb2.ModelInfoRequest, grpc_context) -> lm_pb2.ModelInfoResponse:
        async def work():
            return self._model_info()

        return await self._unary("ModelInfo", grpc_context, request, lm_pb2.ModelInfoResponse(), work)

    def _model_info(self) -> lm_pb2.ModelInfoResponse:
        lm = self.engine.lm
        running, waiting, slots = self.engine.generation_load()
        kv_used, kv_total = self.engine.kv_cache_use()
        return lm_pb2.ModelInfoResponse(
            model_id=lm.model_id,
            revision=lm.revision,
            quantization=lm.quantization,
            compute_dtype=str(lm.compute_dtype).removeprefix("torch."),
            max_context=lm.max_context,
            vocab_size=lm.vocab_size,
            tokenizer_hash=lm.tokenizer_hash,
            device=str(lm.device),
            eos_token_id=lm.eos_token_id,
            max_new_tokens=self.limits.max_new_tokens,
            max_score_pairs=self.limits.max_score_pairs,
            kv_cache_slots=slots,
            kv_cache_tokens=kv_total,
            kv_cache_tokens_used=kv_used,
            running_sequences=running,
            waiting_requests=waiting,
            max_request_bytes=self.limits.max_request_bytes,
            quant_storage=lm.quant_storage,
            double_quant=lm.double_quant,
            checkpoint_compute_dtype=lm.checkpoint_compute_dtype,
            tokenizer_size=lm.tokenizer_size,
            replica_id=self._replica_id,
            node_id=self._node_id,
        )

    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context) -> health_pb2.HealthCheckResponse:
        """grpc.health.v1: SERVING once the model's device answers. Open without a token: Kubernetes
        gRPC probes cannot send metadata."""
        try:
            await asyncio.wait_for(self.engine.probe(), timeout=30)
        except Exception as e:  # noqa: BLE001
            log.warning("health probe failed: %s", e)
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def check_health(self) -> None:
        """Ray's replica health check: a wedged model thread gets the replica restarted."""
        await asyncio.wait_for(self.engine.probe(), timeout=60)


IMPORT_PATH = "service.serve.app:build_app"


def split_args(args: dict[str, Any]) -> tuple[dict[str, Any], dict | None, bool]:
    """The application's `args` as (engine configuration, "auth" section or None, whether "frontend" is on)."""
    args = dict(args)
    auth = args.pop("auth", None)
    return args, auth, bool(args.pop("frontend", False))


def build_app(args: dict[str, Any], deployments: dict[str, dict] | None = None) -> serve.Application:
    """Application builder named in the Serve config (`import_path: service.serve.app:build_app`);
    `args` is the engine configuration ({"model": {...}, "limits": {...}, "batch": {...}, "generation": {...}})
    plus optional "auth": {"token_env": VAR, "token_file": PATH} to require a bearer token on every RPC, and
    "frontend": true to put the Frontend ingress (service/serve/frontend.py) between Ray's proxy and the model
    replicas: a replica lost mid-call is then UNAVAILABLE, not INTERNAL, and unary calls are retried server-side,
    at a measured cost (H200: 64 streams 4,358 tokens/s through it against 7,796 direct), so it is off by default.
    `deployments`: the config's deployment options by name, applied here when the launcher deploys through
    serve.run (Serve applies them itself when it deploys the config file, as KubeRay does)."""
    args, auth, with_frontend = split_args(args)
    EngineConfig.from_dict(args)  # fail at deploy time on a bad config, not in every replica
    deployment = LanguageModelServer
    options = dict((deployments or {}).get("LanguageModel", {}))
    options.pop("name", None)
    if options:
        deployment = deployment.options(**options)
    model = deployment.bind(args, auth)
    if not with_frontend:
        return model
    front = dict((deployments or {}).get("Frontend", {}))
    front.pop("name", None)
    return frontend.bind(model, front)
