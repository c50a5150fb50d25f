"""Pipeline overhead over the bare local model, and cache-hit latency, measured side by side.

Run:  python benchmarks/pipeline_overhead.py            (about 2 minutes on 2 CPU cores)
Writes benchmarks/results/pipeline_overhead.json and prints a table.

Every repetition runs the bare sentence-transformers model and the pipeline back to back
on the same 1,000 Jeopardy test-split texts, so machine noise hits both alike; medians and
the median of per-repetition ratios are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from adapted_embeddings.langchain import AdaptedEmbeddings
from adapted_embeddings.training.corpora import load_jeopardy

RESULTS = Path(__file__).parent / "results" / "pipeline_overhead.json"


def timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def latency_samples(fn: Any, count: int) -> np.ndarray:
    samples = np.empty(count)
    for i in range(count):
        start = time.perf_counter()
        fn()
        samples[i] = time.perf_counter() - start
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--query-calls", type=int, default=5000)
    args = parser.parse_args()

    corpus = load_jeopardy()
    texts = [t for i, t in enumerate(corpus.texts) if i % 5 == 0][: args.texts]
    cache_root = Path(tempfile.mkdtemp(prefix="ae-bench-"))

    uncached = AdaptedEmbeddings(model="text-embedding-ada-002", mode="local", cache=False)
    encoder = uncached.pipeline.encoder
    model = encoder.model  # type: ignore[attr-defined]

    def bare() -> None:
        model.encode(
            texts,
            batch_size=encoder.batch_size,  # type: ignore[attr-defined]
            normalize_embeddings=True,
            convert_to_numpy=True,
        )

    bare()  # warm-up: first call pays for lazy initialisation
    uncached.embed_documents(texts[:64])
    rows: dict[str, list[float]] = {"bare": [], "pipeline_no_cache": [], "pipeline_cold_cache": []}
    for repeat in range(args.repeats):
        rows["bare"].append(timed(bare))
        rows["pipeline_no_cache"].append(timed(lambda: uncached.embed_documents(texts)))
        cold = AdaptedEmbeddings(
            model="text-embedding-ada-002", mode="local", cache_dir=cache_root / f"r{repeat}"
        )
        rows["pipeline_cold_cache"].append(timed(lambda: cold.embed_documents(texts)))  # noqa: B023

    bare_times = np.array(rows["bare"])
    ratios = {
        name: float(np.median(np.array(times) / bare_times) - 1.0)
        for name, times in rows.items()
        if name != "bare"
    }

    warm = AdaptedEmbeddings(
        model="text-embedding-ada-002", mode="local", cache_dir=cache_root / "warm"
    )
    query = texts[0]
    warm.embed_query(query)
    hit = latency_samples(lambda: warm.embed_query(query), args.query_calls)
    assert warm.stats().cache_hits >= args.query_calls
    miss_texts = iter(texts[1:] * 10)
    miss = latency_samples(lambda: uncached.embed_query(next(miss_texts)), 300)
    bare_single = latency_samples(
        lambda: model.encode([query], normalize_embeddings=True, convert_to_numpy=True), 300
    )

    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "texts": len(texts),
        "repeats": args.repeats,
        "embed_documents_seconds_median": {k: float(np.median(v)) for k, v in rows.items()},
        "embed_documents_overhead_vs_bare_median": ratios,
        "embed_query_cache_hit_ms": {
            "median": float(np.median(hit) * 1e3),
            "p99": float(np.percentile(hit, 99) * 1e3),
        },
        "embed_query_local_miss_ms_median": float(np.median(miss) * 1e3),
        "bare_single_encode_ms_median": float(np.median(bare_single) * 1e3),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")

    print(f"embed_documents of {len(texts)} texts, median of {args.repeats} side-by-side runs")
    print(f"{'system':<24}{'seconds':>10}{'overhead':>10}")
    for name, times in rows.items():
        overhead = "" if name == "bare" else f"{ratios[name] * 100:+.1f}%"
        print(f"{name:<24}{np.median(times):>10.3f}{overhead:>10}")
    print()
    print(f"{'single call':<36}{'median ms':>10}")
    print(f"{'embed_query, cache hit':<36}{result['embed_query_cache_hit_ms']['median']:>10.3f}")
    print(
        f"{'embed_query, local (no cache)':<36}{result['embed_query_local_miss_ms_median']:>10.3f}"
    )
    print(f"{'bare model.encode([text])':<36}{result['bare_single_encode_ms_median']:>10.3f}")
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
