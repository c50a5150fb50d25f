"""The fallback provider: OpenAI, or any OpenAI-compatible server, through the official client.

Requests are planned to respect OpenAI's limits (inputs per request, tokens per request,
tokens per input) with token counts computed offline. Raw text is sent, never token ids, so
OpenAI-compatible servers work. Each request is validated before its vectors are accepted:
count, order, width and finiteness.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import openai

from adapted_embeddings.errors import ConfigurationError, ProviderResponseError
from adapted_embeddings.settings import ProviderSettings
from adapted_embeddings.spaces import EmbeddingSpace
from adapted_embeddings.tokens import TokenCounter, default_token_counter

logger = logging.getLogger(__name__)

# What one failed request can raise: the client's own errors (HTTP status, connection,
# timeout, unparseable response) and our validation of what it returned.
_REQUEST_ERRORS = (openai.OpenAIError, ProviderResponseError, ValueError, TypeError, KeyError)


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


class OpenAIEmbeddingProvider:
    """Embeds texts in ``space`` through an OpenAI-compatible ``/embeddings`` endpoint."""

    def __init__(
        self,
        settings: ProviderSettings,
        space: EmbeddingSpace,
        *,
        token_counter: TokenCounter | None = None,
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
        # A local server needs no key, but the client insists on one.
        key = settings.api_key.get_secret_value() if settings.api_key else "not-needed"
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
            **common, http_client=openai.DefaultHttpxClient(follow_redirects=False)
        )
        self._async_client = openai.AsyncOpenAI(
            **common, http_client=openai.DefaultAsyncHttpxClient(follow_redirects=False)
        )

    def __repr__(self) -> str:
        return (
            f"OpenAIEmbeddingProvider(model={self.space.model!r}, "
            f"base_url={self.settings.base_url!r})"
        )

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
        outcome = ProviderOutcome()
        if len(requests) <= 1:
            results = [self._send(r) for r in requests]
        else:
            workers = min(self.settings.max_concurrent_requests, len(requests))
            with ThreadPoolExecutor(max_workers=workers) as pool:
                results = list(pool.map(self._send, requests))
        for request, result in zip(requests, results, strict=True):
            self._record(outcome, request, result)
        return outcome

    async def aembed(self, texts: list[str]) -> ProviderOutcome:
        """Embed texts with the async client, at most ``max_concurrent_requests`` at once."""
        requests = self.plan(texts)
        limit = asyncio.Semaphore(self.settings.max_concurrent_requests)

        async def send(request: _Request) -> tuple[np.ndarray, int] | BaseException:
            async with limit:
                try:
                    response = await self._async_client.embeddings.create(
                        **self._request_kwargs(request)
                    )
                    return self._validate(response, request)
                except _REQUEST_ERRORS as exc:
                    return exc

        results = await asyncio.gather(*(send(r) for r in requests))
        outcome = ProviderOutcome()
        for request, result in zip(requests, results, strict=True):
            self._record(outcome, request, result)
        return outcome

    def close(self) -> None:
        """Close the sync client's connections."""
        self._client.close()

    def _send(self, request: _Request) -> tuple[np.ndarray, int] | BaseException:
        try:
            response = self._client.embeddings.create(**self._request_kwargs(request))
            return self._validate(response, request)
        except _REQUEST_ERRORS as exc:
            return exc

    def _request_kwargs(self, request: _Request) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "model": self.space.model,
            "input": request.texts,
            "encoding_format": "float",
        }
        if self.settings.dimensions is not None:
            kwargs["dimensions"] = self.settings.dimensions
        return kwargs

    def _validate(self, response: Any, request: _Request) -> tuple[np.ndarray, int]:
        data = list(response.data or [])
        expected = len(request.texts)
        if len(data) != expected:
            raise ProviderResponseError(
                f"provider returned {len(data)} vectors for {expected} inputs",
                failed_indices=list(request.positions),
            )
        indices = sorted(item.index for item in data)
        if indices != list(range(expected)):
            raise ProviderResponseError(
                f"provider returned vector indices {indices[:5]}... for {expected} inputs",
                failed_indices=list(request.positions),
            )
        ordered = sorted(data, key=lambda item: item.index)
        try:
            vectors = np.asarray([item.embedding for item in ordered], dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise ProviderResponseError(
                f"provider returned vectors of unequal length or non-numbers: {exc}",
                failed_indices=list(request.positions),
            ) from exc
        if vectors.ndim != 2 or vectors.shape[1] != self.space.dimensions:
            raise ProviderResponseError(
                f"provider returned vectors of shape {vectors.shape}, expected width "
                f"{self.space.dimensions} for {self.space.id}",
                failed_indices=list(request.positions),
            )
        if not np.isfinite(vectors).all():
            raise ProviderResponseError(
                "provider returned NaN or Inf values", failed_indices=list(request.positions)
            )
        usage = getattr(response, "usage", None)
        tokens = int(getattr(usage, "total_tokens", 0) or 0) or request.tokens
        return vectors, tokens

    @staticmethod
    def _record(
        outcome: ProviderOutcome,
        request: _Request,
        result: tuple[np.ndarray, int] | BaseException,
    ) -> None:
        outcome.requests += 1
        if isinstance(result, BaseException):
            logger.warning("provider request for %d inputs failed: %s", len(request.texts), result)
            outcome.failures.append((request.positions, result))
            return
        vectors, tokens = result
        outcome.tokens += tokens
        for position, vector in zip(request.positions, vectors, strict=True):
            outcome.vectors[position] = vector
