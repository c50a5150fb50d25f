"""Provider faults against a real misbehaving HTTP server on 127.0.0.1.

Each scenario checks the four promises of the fallback path: retries are bounded (and
honour Retry-After), the caller gets a typed error or the ``local_degraded`` vectors,
nothing wrong reaches the cache, and results stay in input order. Every scenario runs on
the sync and the async path.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pytest

from adapted_embeddings.errors import ProviderError
from adapted_embeddings.pipeline import EmbeddingResult

from ..conftest import free_port
from .conftest import Rig
from .faultserver import Fault, FaultServer, reference_vectors

PATHS = ("sync", "async")
RETRIED = (Fault.RATE_LIMIT, Fault.SERVER_ERROR, Fault.UNAVAILABLE, Fault.SLOW, Fault.RESET)
NOT_RETRIED = (Fault.MALFORMED_JSON, Fault.WRONG_COUNT, Fault.WRONG_DIMENSIONS, Fault.NAN)
FAULTS = RETRIED + NOT_RETRIED
# One retry keeps each persistent-fault scenario near a second; the backoff and Retry-After
# tests use two, to see the delays grow or hold.
MAX_RETRIES = 1
TIMEOUT = 1.0  # the SLOW fault answers after 3 s

TEXTS = [
    "How do I reset my router?",
    "Wie spät ist es in Berlin?",
    "the mitochondria is the powerhouse of the cell",
    "¿Dónde está la biblioteca?",
    "quarterly revenue grew 12% year over year",
]


async def embed(rig: Rig, texts: list[str], path: str) -> list[EmbeddingResult]:
    if path == "sync":
        return rig.pipeline.embed(texts)
    return await rig.pipeline.aembed(texts)


def vectors(results: list[EmbeddingResult]) -> np.ndarray:
    return np.stack([r.vector for r in results])


def fault_rig(make_rig: Any, server: FaultServer, **options: Any) -> Rig:
    server.slow_seconds = 3.0
    options.setdefault("timeout", TIMEOUT)
    options.setdefault("max_retries", MAX_RETRIES)
    return make_rig(server.base_url, **options)


def warm(texts: list[str]) -> list[str]:
    """Compute the server's answers now, so a healthy answer never nears the timeout."""
    reference_vectors(texts)
    return texts


def expected_attempts(fault: Fault) -> int:
    return MAX_RETRIES + 1 if fault in RETRIED else 1


def assert_nothing_cached(rig: Rig, texts: list[str]) -> None:
    assert rig.entry_count() == 0
    assert rig.cached(texts) == [None] * len(texts)


def assert_provider_results(results: list[EmbeddingResult], texts: list[str]) -> None:
    assert [r.route for r in results] == ["provider"] * len(texts)
    np.testing.assert_array_equal(vectors(results), reference_vectors(texts))


def assert_cached_correctly(rig: Rig, texts: list[str]) -> None:
    entries = rig.cached(texts)
    assert all(e is not None and e.route == "provider" for e in entries)
    np.testing.assert_array_equal(np.stack([e.vector for e in entries]), reference_vectors(texts))


@pytest.mark.fault_scenario
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fault", RETRIED, ids=lambda f: f.name)
async def test_transient_fault_is_retried_and_the_call_succeeds(
    make_rig: Any, server: FaultServer, fault: Fault, path: str
) -> None:
    rig = fault_rig(make_rig, server)
    server.inject(fault, times=MAX_RETRIES)  # the last allowed attempt gets through
    texts = warm([f"{t} ({fault.name} {path})" for t in TEXTS])

    results = await embed(rig, texts, path)

    assert_provider_results(results, texts)
    assert_cached_correctly(rig, texts)
    attempts = server.recorded()
    assert [r.fault for r in attempts] == [fault] * MAX_RETRIES + [Fault.OK]
    assert all(r.texts == tuple(texts) for r in attempts)


@pytest.mark.fault_scenario
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.name)
async def test_persistent_fault_raises_a_typed_error_and_caches_nothing(
    make_rig: Any, server: FaultServer, fault: Fault, path: str
) -> None:
    rig = fault_rig(make_rig, server)
    server.inject(fault, times=100)
    texts = [f"{t} ({fault.name} {path} raise)" for t in TEXTS]
    texts = warm([*texts, texts[1]])  # a duplicate must be reported at both of its positions

    with pytest.raises(ProviderError) as caught:
        await embed(rig, texts, path)

    error = caught.value
    assert error.failed_indices == list(range(len(texts)))
    assert error.completed == 0
    assert f"failed for {len(texts)} of {len(texts)} inputs" in str(error)
    assert len(server.recorded()) == expected_attempts(fault)  # bounded, no retry storm
    assert_nothing_cached(rig, texts)
    assert rig.pipeline.stats().failed == len(texts)

    # The outage ends: the same call now succeeds, so nothing bad was remembered.
    server.reset()
    results = await embed(rig, texts, path)
    assert_provider_results(results, texts)
    assert_cached_correctly(rig, texts)


@pytest.mark.fault_scenario
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.name)
async def test_persistent_fault_degrades_to_local_vectors_when_asked(
    make_rig: Any,
    server: FaultServer,
    fault: Fault,
    path: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = fault_rig(make_rig, server, on_provider_error="local")
    server.inject(fault, times=100)
    texts = warm([f"{t} ({fault.name} {path} local)" for t in TEXTS])

    with caplog.at_level(logging.WARNING, logger="adapted_embeddings"):
        results = await embed(rig, texts, path)

    assert [r.route for r in results] == ["local_degraded"] * len(texts)
    np.testing.assert_allclose(vectors(results), rig.local_vectors(texts), atol=1e-6)
    assert all(r.space == rig.pipeline.space for r in results)
    assert "local_degraded" in caplog.text
    assert len(server.recorded()) == expected_attempts(fault)
    assert_nothing_cached(rig, texts)  # degraded vectors must not stop the next call trying
    assert rig.pipeline.stats().degraded == len(texts)

    server.reset()
    assert_provider_results(await embed(rig, texts, path), texts)


@pytest.mark.fault_scenario
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.name)
async def test_partial_failure_keeps_the_batches_that_succeeded(
    make_rig: Any, server: FaultServer, fault: Fault, path: str
) -> None:
    rig = fault_rig(make_rig, server, max_inputs_per_request=2)
    unique = [f"partial {i} ({fault.name} {path}) {t}" for i, t in enumerate([*TEXTS, "sixth"])]
    a, b, c, d, e, f = warm(unique)
    texts = [a, b, c, d, e, f, c, a]  # requests: [a, b], [c, d], [e, f]
    server.poison[d] = fault  # every attempt at the request holding d fails

    with pytest.raises(ProviderError) as caught:
        await embed(rig, texts, path)

    assert caught.value.failed_indices == [2, 3, 6]  # c, d, and c again
    assert caught.value.completed == 4
    assert "input positions 2, 3, 6" in str(caught.value)
    assert_cached_correctly(rig, [a, b, e, f])
    assert rig.cached([c, d]) == [None, None]

    # Retrying pays only for what failed, and the answer comes back in input order.
    server.reset()
    results = await embed(rig, texts, path)
    assert [r.texts for r in server.recorded()] == [(c, d)]
    routes = [r.route for r in results]
    assert routes == [
        "cache",
        "cache",
        "provider",
        "provider",
        "cache",
        "cache",
        "provider",
        "cache",
    ]
    np.testing.assert_array_equal(vectors(results), reference_vectors(texts))


@pytest.mark.fault_scenario
@pytest.mark.parametrize("path", PATHS)
async def test_partial_failure_degrades_only_the_failed_inputs(
    make_rig: Any, server: FaultServer, path: str
) -> None:
    rig = fault_rig(make_rig, server, max_inputs_per_request=2, on_provider_error="local")
    texts = warm([f"degrade-some {i} {path} {t}" for i, t in enumerate([*TEXTS, "sixth"])])
    server.poison[texts[3]] = Fault.SERVER_ERROR

    results = await embed(rig, texts, path)

    routes = [r.route for r in results]
    assert routes == ["provider"] * 2 + ["local_degraded"] * 2 + ["provider"] * 2
    np.testing.assert_array_equal(vectors(results[:2]), reference_vectors(texts[:2]))
    np.testing.assert_allclose(vectors(results[2:4]), rig.local_vectors(texts[2:4]), atol=1e-6)
    np.testing.assert_array_equal(vectors(results[4:]), reference_vectors(texts[4:]))
    assert rig.cached(texts[2:4]) == [None, None]
    assert_cached_correctly(rig, texts[:2] + texts[4:])


@pytest.mark.fault_scenario
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("policy", ["raise", "local"])
async def test_connection_refused(make_rig: Any, policy: str, path: str) -> None:
    nobody = f"http://127.0.0.1:{free_port()}/v1"
    rig = make_rig(nobody, on_provider_error=policy, max_retries=MAX_RETRIES, timeout=TIMEOUT)
    texts = [f"{t} (refused {policy} {path})" for t in TEXTS]

    started = time.monotonic()
    if policy == "raise":
        with pytest.raises(ProviderError) as caught:
            await embed(rig, texts, path)
        assert caught.value.failed_indices == list(range(len(texts)))
        assert "APIConnectionError" in str(caught.value)
    else:
        results = await embed(rig, texts, path)
        assert [r.route for r in results] == ["local_degraded"] * len(texts)
        np.testing.assert_allclose(vectors(results), rig.local_vectors(texts), atol=1e-6)
    # One backoff of at most 0.5 s: bounded, not a hang.
    assert time.monotonic() - started < 10
    assert_nothing_cached(rig, texts)


@pytest.mark.fault_scenario
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fault", [Fault.RATE_LIMIT, Fault.UNAVAILABLE], ids=lambda f: f.name)
async def test_retry_after_is_honoured(
    make_rig: Any, server: FaultServer, fault: Fault, path: str
) -> None:
    rig = fault_rig(make_rig, server, max_retries=2)
    server.retry_after = "1"
    server.inject(fault, times=2)
    texts = warm([f"{t} (retry-after {fault.name} {path})" for t in TEXTS])

    assert_provider_results(await embed(rig, texts, path), texts)

    arrivals = [r.at for r in server.recorded()]
    gaps = np.diff(arrivals)
    assert len(arrivals) == 3
    # The client waits what the server asked (1 s), not its own 0.5 s / 1 s backoff.
    assert all(0.95 <= gap < 2.5 for gap in gaps), gaps


@pytest.mark.fault_scenario
@pytest.mark.parametrize("path", PATHS)
async def test_without_retry_after_the_backoff_grows(
    make_rig: Any, server: FaultServer, path: str
) -> None:
    rig = fault_rig(make_rig, server, max_retries=2)
    server.inject(Fault.SERVER_ERROR, times=100)
    texts = warm([f"{t} (backoff {path})" for t in TEXTS])

    with pytest.raises(ProviderError):
        await embed(rig, texts, path)

    gaps = np.diff([r.at for r in server.recorded()])
    assert len(gaps) == 2
    # The client's exponential backoff: 0.5 s then 1 s, each minus up to 25 % jitter.
    assert 0.35 <= gaps[0] < 1.5, gaps
    assert 0.7 <= gaps[1] < 2.5, gaps


@pytest.mark.fault_scenario
@pytest.mark.parametrize("path", PATHS)
async def test_a_retry_after_beyond_the_cap_fails_fast(
    make_rig: Any, server: FaultServer, path: str
) -> None:
    rig = fault_rig(make_rig, server)
    server.retry_after = "3600"  # an hour: waiting would hang the caller's request
    server.inject(Fault.RATE_LIMIT, times=100)
    texts = warm([f"{t} (retry-after cap {path})" for t in TEXTS])

    started = time.monotonic()
    with pytest.raises(ProviderError, match="RateLimitError"):
        await embed(rig, texts, path)
    assert time.monotonic() - started < 5
    assert len(server.recorded()) == 1
    assert_nothing_cached(rig, texts)


@pytest.mark.fault_scenario
@pytest.mark.parametrize("path", PATHS)
async def test_order_is_kept_across_cache_local_and_provider_routes_under_faults(
    make_rig: Any, server: FaultServer, path: str
) -> None:
    base = warm([f"mixed {i} {path}: {t}" for i, t in enumerate(TEXTS * 2)])
    probe = make_rig(server.base_url, mode="local")
    confidence = np.array([r.confidence for r in probe.pipeline.embed(base)])
    threshold = float(np.median(confidence))
    rig = fault_rig(
        make_rig,
        server,
        mode="hybrid",
        document_threshold=threshold,
        max_inputs_per_request=2,
        max_retries=2,  # both injected faults may land on the same request
    )
    early = base[::3]  # some texts are already cached before the faulty call
    early_results = rig.pipeline.embed(early)
    server.reset()
    server.inject(Fault.UNAVAILABLE, times=1)
    server.inject(Fault.RESET, times=1)
    texts = [*reversed(base), base[4], base[0]]

    results = await embed(rig, texts, path)

    expected_local = dict(zip(base, rig.local_vectors(base), strict=True))
    cached_vectors = dict(zip(early, (r.vector for r in early_results), strict=True))
    for text, result in zip(texts, results, strict=True):
        if text in cached_vectors:
            assert result.route == "cache"
            np.testing.assert_array_equal(result.vector, cached_vectors[text])
        elif result.route == "provider":
            np.testing.assert_array_equal(result.vector, reference_vectors([text])[0])
        else:
            assert result.route == "local"
            assert result.confidence is not None and result.confidence >= threshold
            np.testing.assert_allclose(result.vector, expected_local[text], atol=1e-6)
    routes = {r.route for r in results}
    assert {"cache", "local", "provider"} <= routes, routes
