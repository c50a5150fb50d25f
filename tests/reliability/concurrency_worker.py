"""One worker process of the concurrency test: N threads share one pipeline and one cache dir.

Runs in a fresh interpreter (multiprocessing "spawn"), so it builds its own pipeline from
plain arguments, waits at a file barrier until every process is ready, then lets its
threads loose at the same moment.
"""

from __future__ import annotations

import random
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class WorkerJob:
    """Everything a worker process needs, as picklable plain values."""

    worker: int
    threads: int
    texts: list[str]
    texts_per_thread: int
    adapter_path: str
    base_url: str
    cache_dir: str
    threshold: float
    barrier_dir: str
    processes: int
    seed: int


@dataclass
class WorkerResult:
    """Each text's vector and route as this process saw them, and any exception text."""

    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    routes: dict[str, set[str]] = field(default_factory=dict)
    inconsistent: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    embedded: int = 0


def build_pipeline(adapter_path: str, base_url: str, cache_dir: str, threshold: float) -> object:
    from adapted_embeddings.adapter import Adapter
    from adapted_embeddings.cache import EmbeddingCache
    from adapted_embeddings.encoders import SentenceTransformerEncoder
    from adapted_embeddings.pipeline import EmbeddingPipeline
    from adapted_embeddings.provider import OpenAIEmbeddingProvider
    from adapted_embeddings.settings import GateSettings, ProviderSettings

    adapter = Adapter.load(adapter_path)
    provider = OpenAIEmbeddingProvider(
        ProviderSettings(base_url=base_url, timeout=60, max_retries=2), adapter.target
    )
    return EmbeddingPipeline(
        adapter=adapter,
        encoder=SentenceTransformerEncoder(),
        provider=provider,
        cache=EmbeddingCache(cache_dir),
        gate=GateSettings(mode="hybrid", document_threshold=threshold),
    )


def _file_barrier(directory: Path, worker: int, processes: int, timeout: float = 300) -> None:
    (directory / f"ready-{worker}").touch()
    deadline = time.monotonic() + timeout
    while len(list(directory.glob("ready-*"))) < processes:
        if time.monotonic() > deadline:
            raise TimeoutError("not every worker process became ready")
        time.sleep(0.01)


def run_worker(job: WorkerJob) -> WorkerResult:
    """Embed overlapping random batches from ``job.threads`` threads at once."""
    from adapted_embeddings.pipeline import EmbeddingPipeline

    pipeline = build_pipeline(job.adapter_path, job.base_url, job.cache_dir, job.threshold)
    assert isinstance(pipeline, EmbeddingPipeline)
    pipeline.embed([" "])  # load the model before the race (a blank text never leaves it)
    result = WorkerResult()
    lock = threading.Lock()
    start = threading.Barrier(job.threads)

    def thread_main(index: int) -> None:
        rng = random.Random(job.seed * 1000 + job.worker * 100 + index)
        mine = rng.sample(job.texts, job.texts_per_thread)
        try:
            start.wait()
            position = 0
            while position < len(mine):
                size = rng.randint(1, 8)
                batch = mine[position : position + size]
                position += size
                for text, item in zip(batch, pipeline.embed(batch), strict=True):
                    record(text, item.vector, item.route)
        except Exception:  # the test fails on any of these; collect them all
            with lock:
                result.errors.append(traceback.format_exc())

    def record(text: str, vector: np.ndarray, route: str) -> None:
        with lock:
            result.embedded += 1
            result.routes.setdefault(text, set()).add(route)
            previous = result.vectors.setdefault(text, vector)
            if not np.allclose(previous, vector, atol=1e-5):
                result.inconsistent.append(text)

    _file_barrier(Path(job.barrier_dir), job.worker, job.processes)
    threads = [threading.Thread(target=thread_main, args=(i,)) for i in range(job.threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return result
