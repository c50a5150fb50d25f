"""Concurrency: processes × threads sharing one cache directory, and many async callers.

The outcome must be the one a single-threaded run gives, with no exception, no corrupt
cache entry, and no text paid for twice at the provider.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import socket
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from adapted_embeddings.adapter import Adapter
from adapted_embeddings.cache import _decode
from adapted_embeddings.errors import ProviderError

from . import figures
from .concurrency_worker import WorkerJob, run_worker
from .conftest import Rig
from .faultserver import Fault, FaultServer, reference_vectors

PROCESSES = 4
THREADS = 8
SUBJECTS = ["the router", "a kidney", "Rome", "photosynthesis", "the 1998 final", "TCP", "jazz"]
QUESTIONS = ["What is {}?", "History of {}", "{} explained simply", "Why does {} matter?"]


def text_pool(size: int, tag: str) -> list[str]:
    return [
        f"{QUESTIONS[i % len(QUESTIONS)].format(SUBJECTS[i % len(SUBJECTS)])} #{i} {tag}"
        for i in range(size)
    ]


def median_threshold(rig: Rig, texts: list[str]) -> float:
    """A threshold that sends about half the texts to the provider."""
    _, confidence = rig.adapter.translate(rig.encoder.encode(texts))
    return float(np.median(confidence))


def assert_cache_entries_valid(rig: Rig) -> int:
    raw = rig.cache._cache
    keys = list(raw.iterkeys())
    for key in keys:
        value = raw[key]
        assert isinstance(value, bytes) and _decode(key, value, rig.pipeline.space.dimensions), key
    return len(keys)


@pytest.mark.slow
def test_processes_and_threads_sharing_one_cache_agree_with_a_single_thread(
    make_rig: Any, server: FaultServer, adapter: Adapter, tmp_path: Path
) -> None:
    pool = text_pool(200, "mp")
    reference_vectors(pool)  # the server's answers are ready: the race is in our code
    probe = make_rig(server.base_url, mode="local")
    threshold = median_threshold(probe, pool)

    single = make_rig(
        server.base_url, mode="hybrid", document_threshold=threshold, cache_dir=tmp_path / "one"
    )
    expected = {t: r for t, r in zip(pool, single.pipeline.embed(pool), strict=True)}
    needed = {t for t, r in expected.items() if r.route == "provider"}
    assert 0 < len(needed) < len(pool)
    server.reset()

    shared = tmp_path / "shared-cache"
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    assert adapter.path is not None
    jobs = [
        WorkerJob(
            worker=w,
            threads=THREADS,
            texts=pool,
            texts_per_thread=40,
            adapter_path=str(adapter.path),
            base_url=server.base_url,
            cache_dir=str(shared),
            threshold=threshold,
            barrier_dir=str(barrier),
            processes=PROCESSES,
            seed=7,
        )
        for w in range(PROCESSES)
    ]
    context = multiprocessing.get_context("spawn")  # no fork of a process running threads
    with ProcessPoolExecutor(max_workers=PROCESSES, mp_context=context) as executor:
        results = list(executor.map(run_worker, jobs))

    assert [e for r in results for e in r.errors] == []
    assert [t for r in results for t in r.inconsistent] == []
    requested: set[str] = set()
    for result in results:
        for text, vector in result.vectors.items():
            requested.add(text)
            want = expected[text]
            np.testing.assert_allclose(vector, want.vector, atol=1e-5, err_msg=text)
            assert result.routes[text] <= {want.route, "cache"}, (text, result.routes[text])
    embedded = sum(r.embedded for r in results)
    figures.add("concurrency: embed results checked", embedded)

    paid = Counter(server.texts_embedded())
    duplicates = {t: n for t, n in paid.items() if n > 1}
    figures.add("concurrency: provider texts needed", len(needed & requested))
    figures.add("concurrency: provider texts sent", sum(paid.values()))
    assert set(paid) == needed & requested  # nothing local was sent, nothing needed missed
    assert duplicates == {}, f"{len(duplicates)} texts were paid for more than once"

    checker = make_rig(server.base_url, mode="hybrid", cache_dir=shared)
    assert assert_cache_entries_valid(checker) == len(requested) + 1  # + the blank warm-up


async def test_many_concurrent_async_queries_share_one_pipeline(
    make_rig: Any, server: FaultServer
) -> None:
    pool = text_pool(60, "async")
    reference_vectors(pool)
    probe = make_rig(server.base_url, mode="local")
    threshold = median_threshold(probe, pool)
    single = make_rig(server.base_url, mode="hybrid", query_threshold=threshold)
    expected = {t: r for t, r in zip(pool, single.pipeline.embed(pool, "query"), strict=True)}
    needed = {t for t, r in expected.items() if r.route == "provider"}
    server.reset()

    rig = make_rig(server.base_url, mode="hybrid", query_threshold=threshold)
    calls = [pool[(i * 37) % len(pool)] for i in range(400)]  # every text ~7 times
    results = await asyncio.gather(*(rig.pipeline.aembed([t], "query") for t in calls))

    figures.add("concurrency: async aembed calls", len(calls))
    for text, (result,) in zip(calls, results, strict=True):
        np.testing.assert_allclose(result.vector, expected[text].vector, atol=1e-5)
        assert result.route in {expected[text].route, "cache"}
    paid = Counter(server.texts_embedded())
    assert set(paid) == needed
    assert max(paid.values()) == 1, {t: n for t, n in paid.items() if n > 1}
    assert assert_cache_entries_valid(rig) == len(pool)


async def test_an_outage_costs_one_set_of_retries_not_one_per_waiting_caller(
    make_rig: Any, server: FaultServer
) -> None:
    rig: Rig = make_rig(server.base_url, mode="provider", max_retries=1)
    server.inject(Fault.SERVER_ERROR, times=1000)
    text = "a popular query during an outage"

    outcomes = await asyncio.gather(
        *(rig.pipeline.aembed([text], "query") for _ in range(50)), return_exceptions=True
    )

    assert all(isinstance(o, ProviderError) for o in outcomes), outcomes
    assert len(server.recorded()) == 2  # one caller's first try and its one retry
    assert rig.entry_count() == 0  # no vector, and no lease left behind


def test_a_lease_left_by_a_dead_process_does_not_block_anyone(
    make_rig: Any, server: FaultServer
) -> None:
    rig: Rig = make_rig(server.base_url, mode="provider")
    texts = ["a text whose fetcher crashed"]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    holder = f"{socket.gethostname()}\0{dead.pid}\0crashed".encode()
    assert rig.cache.claim(rig.keys(texts, "query"), holder, seconds=600) == [None]

    started = time.monotonic()
    results = rig.pipeline.embed(texts, "query")

    assert time.monotonic() - started < 30  # not the 600 s the dead holder's lease runs
    assert results[0].route == "provider"
    np.testing.assert_array_equal(results[0].vector, reference_vectors(texts)[0])
