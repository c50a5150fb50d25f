"""The FastAPI app: one pipeline per process behind OpenAI's embeddings API.

Routes: ``POST /v1/embeddings`` (also ``/embeddings``), ``GET /v1/models``,
``GET /v1/models/{model}``, ``GET /healthz``, ``GET /metrics``, and ``GET /v1/usage`` with
``GET /dashboard`` (:mod:`.dashboard`). Every error is answered
in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import FastAPI, Request
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from adapted_embeddings.errors import InvalidInputError, ProviderError
from adapted_embeddings.factory import PipelineOptions
from adapted_embeddings.pipeline import EmbeddingPipeline, EmbeddingResult, Role
from adapted_embeddings.registry import space_matches
from adapted_embeddings.server.auth import check_bearer
from adapted_embeddings.server.config import ServerSettings
from adapted_embeddings.server.dashboard import add_dashboard
from adapted_embeddings.server.inputs import PreparedInputs, prepare_inputs
from adapted_embeddings.server.logs import redact
from adapted_embeddings.server.metrics import CONTENT_TYPE, MetricsMiddleware, ServerMetrics
from adapted_embeddings.server.openai_errors import (
    SERVER_ERROR,
    OpenAIStyleError,
    bad_request,
    error_response,
)
from adapted_embeddings.server.schemas import (
    EmbeddingRequest,
    ErrorDetail,
    ModelCard,
    ModelList,
)
from adapted_embeddings.spaces import EmbeddingSpace
from adapted_embeddings.tokens import default_token_counter

logger = logging.getLogger(__name__)

PIPELINE_KEYWORDS_ENV = "ADAPTED_EMBEDDINGS_SERVER_PIPELINE_KEYWORDS"
ROLE_HEADER = "x-embedding-role"
SPACE_HEADER = "X-Embedding-Space"
DRAIN_LIMIT_BYTES = 64 * 1024 * 1024
"""How much of an oversized body is read and dropped so the client sees the 413."""
INLINE_CHARACTERS = 20_000
"""Requests with less text than this are checked and counted on the event loop."""
ECHOED_MODEL_CHARS = 64
"""How much of an unknown model name a 404 repeats back."""


class Admission:
    """At most ``limit`` embedding requests in progress; the rest get a 429 at once."""

    def __init__(self, limit: int, retry_after: int) -> None:
        self.limit = limit
        self.retry_after = retry_after
        self.active = 0  # only touched on the event loop, so no lock

    @property
    def full(self) -> bool:
        """Whether every slot is taken (the next request gets a 429)."""
        return self.active >= self.limit

    def enter(self) -> None:
        """Take a slot, or raise a 429 with Retry-After."""
        if self.full:
            raise OpenAIStyleError(
                429,
                f"The server is busy ({self.limit} requests in progress); retry after "
                f"{self.retry_after} s.",
                type="requests",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(self.retry_after)},
            )
        self.active += 1

    def leave(self) -> None:
        """Give the slot back."""
        self.active -= 1


def create_app(settings: ServerSettings | None = None, **keywords: Any) -> FastAPI:
    """Build the app and its one pipeline.

    Args:
        settings: Server settings; default read from ``ADAPTED_EMBEDDINGS_SERVER_*``.
        **keywords: :class:`~adapted_embeddings.factory.PipelineOptions` keywords (``mode``,
            ``adapter``, ``base_url``, ``cache_dir``, ...), exactly as for the library;
            anything left out comes from the library's settings.

    Raises:
        ConfigurationError: If the host is exposed without a token, or the pipeline
            settings cannot work (see :func:`~adapted_embeddings.factory.build_pipeline`).
        AdapterNotFoundError: If no adapter fits the settings.

    """
    settings = settings or ServerSettings()
    settings.check_exposure()
    pipeline = PipelineOptions(**keywords).build_pipeline()
    return _build_app(settings, pipeline)


def create_app_from_environment() -> FastAPI:
    """The app for each ``--workers`` process: the command line's choices come by environment.

    Server settings are read from ``ADAPTED_EMBEDDINGS_SERVER_*`` and the pipeline keywords
    from the JSON object in ``ADAPTED_EMBEDDINGS_SERVER_PIPELINE_KEYWORDS`` (set by
    ``adapted-embeddings serve``), on top of the library's own settings.
    """
    keywords = json.loads(os.environ.get(PIPELINE_KEYWORDS_ENV) or "{}")
    return create_app(ServerSettings(), **keywords)


def _encoder_facts(encoder: Any) -> dict[str, Any] | None:
    """What runs the local model: its backend and intra-op threads (None: one per core)."""
    backend = getattr(encoder, "backend", None)
    if backend is None:
        return None  # an encoder of the caller's own
    from adapted_embeddings.onnx_encoder import model_threads

    return {"backend": backend, "threads": model_threads(getattr(encoder, "threads", None))}


def _build_app(settings: ServerSettings, pipeline: EmbeddingPipeline) -> FastAPI:
    metrics = ServerMetrics()
    admission = Admission(settings.max_concurrent_requests, settings.retry_after_seconds)
    counter = default_token_counter()
    space = pipeline.space
    started = int(time.time())
    upstream_key = _upstream_key(pipeline)

    warm_up: dict[str, BaseException | None] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Load the local model in the background: the port opens at once, /healthz says
        # "loading" until the model is in memory, and no request pays for loading it.
        async def load() -> None:
            try:
                await asyncio.to_thread(pipeline.warm_up)
                warm_up["error"] = None
            except Exception as exc:  # reported by /healthz; requests raise it themselves
                warm_up["error"] = exc
                logger.error("loading the local model failed: %s", redact(str(exc), [upstream_key]))

        task = asyncio.create_task(load())
        try:
            yield
        finally:
            task.cancel()

    app = FastAPI(
        lifespan=lifespan,
        title="adapted-embeddings",
        summary="OpenAI-compatible embeddings, adapted locally with provider fallback.",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.pipeline = pipeline
    app.state.metrics = metrics
    app.state.admission = admission
    app.state.settings = settings

    @app.exception_handler(OpenAIStyleError)
    async def _openai_error(request: Request, exc: OpenAIStyleError) -> Response:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = (
            f"Invalid URL ({request.method} {request.url.path})"
            if exc.status_code == 404
            else f"{exc.detail} ({request.method} {request.url.path})"
        )
        detail = ErrorDetail(message=message, type="invalid_request_error")
        return error_response(exc.status_code, detail, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        logger.error(
            "unexpected %s on %s %s: %s",
            type(exc).__name__,
            request.method,
            request.url.path,
            redact(str(exc), [upstream_key]),
        )
        detail = ErrorDetail(
            message="The server had an error while processing your request.", type=SERVER_ERROR
        )
        return error_response(500, detail)

    def authorize(request: Request) -> None:
        check_bearer(request.headers.get("authorization"), settings.api_key)

    def check_model(model: str) -> None:
        _check_model(model, space, settings.max_model_chars)

    async def embeddings(request: Request) -> Response:
        authorize(request)
        # The body is read before a slot is taken, and within a deadline, so clients that
        # send it slowly (or never) cannot hold every slot and lock the others out.
        body = await _read_body(request, settings.max_body_bytes, settings.body_timeout_seconds)
        admission.enter()
        try:
            payload = _parse(body)
            check_model(payload.model)
            if payload.dimensions is not None and payload.dimensions != space.dimensions:
                raise bad_request(
                    f"dimensions={payload.dimensions} is not available: this server serves "
                    f"one space, {space.id}, with {space.dimensions} dimensions. Leave "
                    "'dimensions' out or send the same number.",
                    param="dimensions",
                )
            role = _role(payload.input_type, request.headers.get(ROLE_HEADER))
            prepared = await _prepare(payload, settings, counter)
            results = await _embed(pipeline, prepared.texts, role, upstream_key)
            metrics.count_embedded(len(results), prepared.tokens)
            content = _response_body(results, payload, space, prepared)
        finally:
            admission.leave()
        return Response(content, media_type="application/json", headers={SPACE_HEADER: space.id})

    app.add_api_route("/v1/embeddings", embeddings, methods=["POST"])
    app.add_api_route("/embeddings", embeddings, methods=["POST"], include_in_schema=False)

    card = ModelCard(
        id=space.model,
        created=started,
        owned_by=space.provider,
        space=space.id,
        dimensions=space.dimensions,
    )

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        authorize(request)
        return _json(ModelList(data=[card]).model_dump_json())

    @app.get("/v1/models/{model:path}")
    async def model(request: Request, model: str) -> Response:
        authorize(request)
        check_model(model)
        return _json(card.model_dump_json())

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        """Readiness: 200 once the local model is in memory, 503 while loading or failed.

        A loaded server with every slot taken says ``"saturated"`` (new embedding requests
        get a 429) but still answers 200, so a liveness probe does not restart a busy server.
        """
        loaded = getattr(pipeline.encoder, "loaded", True)
        error = warm_up.get("error")
        if loaded:
            status = "saturated" if admission.full else "ok"
        else:
            status = "error" if error is not None else "loading"
        body: dict[str, Any] = {
            "status": status,
            "space": space.id,
            "adapter": pipeline.adapter.name if pipeline.adapter else None,
            "mode": pipeline.gate.mode,
            "encoder": _encoder_facts(pipeline.encoder),
            "in_flight": admission.active,
            "limit": admission.limit,
        }
        if status == "error":
            body["error"] = f"{type(error).__name__}: {redact(str(error), [upstream_key])}"
        return JSONResponse(body, status_code=200 if loaded else 503)

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        authorize(request)
        metrics.in_flight = admission.active
        report = pipeline.quality_report() if pipeline.learner is not None else None
        quality = report.as_dict() if report is not None else None
        return Response(metrics.render(pipeline, quality), media_type=CONTENT_TYPE)

    add_dashboard(app, pipeline, settings.api_key)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


async def _read_body(request: Request, limit: int, seconds: float) -> bytes:
    """The body; a 413 once it passes ``limit`` bytes, a 408 if not all in within ``seconds``.

    Raises:
        OpenAIStyleError: 413 ``request_too_large`` or 408 ``request_timeout``.

    """
    try:
        return await asyncio.wait_for(_read_limited(request, limit), seconds)
    except asyncio.TimeoutError:  # the builtin TimeoutError from Python 3.11 on
        raise OpenAIStyleError(
            408,
            f"The request body did not arrive within the server's limit of {seconds:g} s; "
            "send it without pauses, or send fewer inputs per request.",
            code="request_timeout",
            headers={"Connection": "close"},  # the rest of the body may still be coming
        ) from None


async def _read_limited(request: Request, limit: int) -> bytes:
    """The body, or a 413 once it passes ``limit`` bytes (read no further than needed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        await _drain(request, int(declared))
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            await _drain(request, size)
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> OpenAIStyleError:
    return OpenAIStyleError(
        413,
        f"The request body is larger than the server's limit of {limit} bytes; send fewer "
        "or shorter inputs per request.",
        code="request_too_large",
    )


async def _drain(request: Request, size: int) -> None:
    # Reading the rest lets the client finish sending and see the 413 instead of a reset
    # connection; past DRAIN_LIMIT_BYTES the connection is simply closed.
    if size > DRAIN_LIMIT_BYTES:
        return
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > DRAIN_LIMIT_BYTES:
            return


def _parse(body: bytes) -> EmbeddingRequest:
    try:
        return EmbeddingRequest.model_validate_json(body)
    except ValidationError as exc:
        raise _describe_invalid(exc) from None


def _describe_invalid(exc: ValidationError) -> OpenAIStyleError:
    errors = exc.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return bad_request(f"We could not parse the JSON body of your request: {first['msg']}.")
    if not first["loc"]:
        return bad_request("The request body must be a JSON object with 'input' and 'model'.")
    field = str(first["loc"][0])
    if first["type"] == "missing":
        return bad_request(f"You must provide the '{field}' parameter.", param=field)
    if field == "input":
        return bad_request(
            "Invalid type for 'input': expected a string, an array of strings, an array of "
            "integer token ids, or an array of arrays of token ids.",
            param="input",
        )
    expected = {
        "model": "a string",
        "encoding_format": "'float' or 'base64'",
        "dimensions": "a positive integer",
        "user": "a string",
        "input_type": "'query' or 'document'",
    }.get(field, "a valid value")
    return bad_request(f"Invalid value for '{field}': expected {expected}.", param=field)


def _check_model(model: str, space: EmbeddingSpace, max_chars: int) -> None:
    """Raise unless ``model`` names the served space.

    Nothing is cached by the name a client sent: any string can arrive here, and a cache
    keyed by it would keep the last few hundred, however long, in memory.

    Raises:
        OpenAIStyleError: 400 ``string_above_max_length`` past ``max_chars`` characters,
            404 ``model_not_found`` for another model (its name cut to a few dozen
            characters).

    """
    if len(model) > max_chars:
        raise bad_request(
            f"Invalid 'model': string too long. Expected a string with maximum length "
            f"{max_chars}, but got a string with length {len(model)} instead.",
            param="model",
            code="string_above_max_length",
        )
    if not space_matches(space, model):
        shown = model if len(model) <= ECHOED_MODEL_CHARS else model[:ECHOED_MODEL_CHARS] + "..."
        raise OpenAIStyleError(
            404,
            f"The model '{shown}' does not exist on this server. It serves "
            f"'{space.model}' (space {space.id}).",
            param="model",
            code="model_not_found",
        )


def _role(input_type: Role | None, header: str | None) -> Role:
    if header is None:
        return input_type or "document"
    role = header.strip().lower()
    if role not in ("query", "document"):
        raise bad_request(
            f"The X-Embedding-Role header must be 'query' or 'document', got {header!r}.",
            param="input_type",
        )
    if input_type is not None and input_type != role:
        raise bad_request(
            f"input_type={input_type!r} and the X-Embedding-Role header ({role!r}) disagree; "
            "send one of them.",
            param="input_type",
        )
    return "query" if role == "query" else "document"


async def _prepare(
    payload: EmbeddingRequest, settings: ServerSettings, counter: Any
) -> PreparedInputs:
    prepare = functools.partial(
        prepare_inputs,
        payload.input,
        counter=counter,
        max_inputs=settings.max_inputs,
        max_tokens_per_input=settings.max_tokens_per_input,
    )
    value = payload.input
    small = isinstance(value, str) and len(value) < INLINE_CHARACTERS
    return prepare() if small else await asyncio.to_thread(prepare)


async def _embed(
    pipeline: EmbeddingPipeline, texts: list[str], role: Role, upstream_key: str
) -> list[EmbeddingResult]:
    try:
        return await pipeline.aembed(texts, role)
    except ProviderError as exc:
        logger.error("upstream provider failed: %s", redact(str(exc), [upstream_key]))
        raise OpenAIStyleError(
            502,
            f"The upstream embedding provider failed for {len(exc.failed_indices)} of "
            f"{len(texts)} inputs after retries (input positions "
            f"{exc.failed_indices[:10]}); the server log has the upstream error. Retry later.",
            type=SERVER_ERROR,
            code="upstream_error",
        ) from None
    except (InvalidInputError, TypeError, ValueError) as exc:
        raise bad_request(str(exc).replace("texts[", "input["), param="input") from None


def _response_body(
    results: list[EmbeddingResult],
    payload: EmbeddingRequest,
    space: EmbeddingSpace,
    prepared: PreparedInputs,
) -> bytes:
    """The :class:`EmbeddingResponse` JSON, written by orjson straight from float32 arrays.

    Floats are the shortest text that reads back as the same float32 (as OpenAI sends them),
    about 3x faster to write and half the bytes of float64 text.
    """
    as_base64 = payload.encoding_format == "base64"
    data = [
        {
            "object": "embedding",
            "index": index,
            "embedding": _base64(result) if as_base64 else result.vector,
            "route": result.route,
            "confidence": None if result.confidence is None else float(result.confidence),
            "audited": result.audited,
            "adapter": result.adapter,
        }
        for index, result in enumerate(results)
    ]
    usage = {"prompt_tokens": prepared.tokens, "total_tokens": prepared.tokens}
    response = {"object": "list", "data": data, "model": space.model, "usage": usage}
    return orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)


def _base64(result: EmbeddingResult) -> str:
    return base64.b64encode(result.vector.astype("<f4", copy=False).tobytes()).decode("ascii")


def _json(content: str) -> Response:
    return Response(content, media_type="application/json")


def _upstream_key(pipeline: EmbeddingPipeline) -> str:
    provider = pipeline.provider
    if provider is None or provider.settings.api_key is None:
        return ""
    return provider.settings.api_key.get_secret_value()
