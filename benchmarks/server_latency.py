"""``adapted-embeddings serve`` over loopback vs the library in process: single-text requests.

Run:  python benchmarks/server_latency.py            (about 3 minutes on 2 CPU cores)
Writes benchmarks/results/server_latency.json and prints a table.

The server is the real command (``python -m adapted_embeddings.cli serve --mode local``) in
its own process; the client sends one text per ``POST /v1/embeddings`` (float, as OpenAI's
default JSON) with keep-alive connections: ``httpx.Client`` at concurrency 1, an
``httpx.AsyncClient`` with N tasks above. The library runs the same texts through
``pipeline.embed`` (concurrency 1) or N concurrent ``pipeline.aembed`` tasks. "hot" repeats
texts already in the cache; "cold" sends texts never seen (local encode + cache write).
Latency is measured at the client, so the server figures include HTTP and JSON both ways;
"in-server" figures are estimated from the server's own latency histogram (/metrics), the
time from request to response inside uvicorn, interpolated within its buckets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from adapted_embeddings.langchain import AdaptedEmbeddings
from adapted_embeddings.training.corpora import load_jeopardy

RESULTS = Path(__file__).parent / "results" / "server_latency.json"
MODEL = "text-embedding-ada-002"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(cache_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [sys.executable, "-m", "adapted_embeddings.cli", "serve", "--mode", "local"]
    options = ["--port", str(port), "--cache-dir", str(cache_dir), "--log-level", "warning"]
    process = subprocess.Popen([*command, *options], stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=1):
                return process, url
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("server did not start")


def summary(latencies: list[float], elapsed: float) -> dict[str, float]:
    samples = np.asarray(latencies) * 1000
    return {
        "requests": len(samples),
        "requests_per_second": round(len(samples) / elapsed, 1),
        "p50_ms": round(float(np.percentile(samples, 50)), 3),
        "p99_ms": round(float(np.percentile(samples, 99)), 3),
    }


def sequential(call: Callable[[str], Any], texts: list[str]) -> dict[str, float]:
    latencies = []
    start = time.perf_counter()
    for text in texts:
        began = time.perf_counter()
        call(text)
        latencies.append(time.perf_counter() - began)
    return summary(latencies, time.perf_counter() - start)


async def concurrent(
    call: Callable[[str], Awaitable[Any]], texts: list[str], concurrency: int
) -> dict[str, float]:
    latencies: list[float] = []
    queue = list(reversed(texts))

    async def worker() -> None:
        while queue:
            text = queue.pop()
            began = time.perf_counter()
            await call(text)
            latencies.append(time.perf_counter() - began)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return summary(latencies, time.perf_counter() - start)


def server_histogram(url: str) -> dict[float, float]:
    """Cumulative bucket counts of the server's own /v1/embeddings latency histogram."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as answer:
        text = answer.read().decode()
    prefix = 'adapted_embeddings_http_request_duration_seconds_bucket{path="/v1/embeddings",le="'
    buckets = {}
    for line in text.splitlines():
        if line.startswith(prefix):
            bound, _, value = line[len(prefix) :].partition('"} ')
            buckets[float(bound)] = float(value)
    return buckets


def histogram_quantile(q: float, before: dict[float, float], after: dict[float, float]) -> float:
    """Prometheus-style quantile (linear within a bucket) of what was observed in between."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    rank, lower, below = q * counts[-1], 0.0, 0.0
    for bound, cumulative in zip(bounds, counts, strict=True):
        if cumulative >= rank:
            if bound == float("inf"):
                return lower
            share = (rank - below) / (cumulative - below) if cumulative > below else 1.0
            return lower + (bound - lower) * share
        lower, below = bound, cumulative
    return lower


def run_server(url: str, texts: list[str], concurrency: int) -> dict[str, float]:
    before = server_histogram(url)
    figures = run_client(url, texts, concurrency)
    after = server_histogram(url)
    for q in (0.5, 0.99):
        figures[f"server_side_p{round(q * 100)}_ms"] = round(
            1000 * histogram_quantile(q, before, after), 3
        )
    return figures


def run_client(url: str, texts: list[str], concurrency: int) -> dict[str, float]:
    endpoint = f"{url}/v1/embeddings"
    if concurrency == 1:
        with httpx.Client(timeout=120) as client:

            def send(text: str) -> None:
                client.post(endpoint, json={"input": text, "model": MODEL}).raise_for_status()

            return sequential(send, texts)

    async def main() -> dict[str, float]:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:

            async def send(text: str) -> None:
                answer = await client.post(endpoint, json={"input": text, "model": MODEL})
                answer.raise_for_status()

            return await concurrent(send, texts, concurrency)

    return asyncio.run(main())


def run_library(library: AdaptedEmbeddings, texts: list[str], concurrency: int) -> dict[str, float]:
    pipeline = library.pipeline
    if concurrency == 1:
        return sequential(lambda text: pipeline.embed([text]), texts)
    return asyncio.run(concurrent(lambda text: pipeline.aembed([text]), texts, concurrency))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hot-requests", type=int, default=2000)
    parser.add_argument("--cold-requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    args = parser.parse_args()

    corpus = load_jeopardy().texts
    hot_texts = corpus[:200]
    fresh = iter(corpus[200:])
    root = Path(tempfile.mkdtemp(prefix="ae-serve-bench-"))
    process, url = start_server(root / "server-cache")
    library = AdaptedEmbeddings(model=MODEL, mode="local", cache_dir=root / "library-cache")
    rows: list[dict[str, Any]] = []
    try:
        run_client(url, hot_texts, 1)  # warm: model loaded, hot texts cached
        library.pipeline.embed(hot_texts)
        for concurrency in args.concurrency:
            hot = [hot_texts[i % len(hot_texts)] for i in range(args.hot_requests)]
            cold = [next(fresh) for _ in range(args.cold_requests)]
            cold_library = [next(fresh) for _ in range(args.cold_requests)]
            for cache, server_texts, library_texts in (
                ("hot", hot, hot),
                ("cold", cold, cold_library),
            ):
                measured = {
                    "server": run_server(url, server_texts, concurrency),
                    "library": run_library(library, library_texts, concurrency),
                }
                for target, figures in measured.items():
                    rows.append(
                        {"target": target, "cache": cache, "concurrency": concurrency, **figures}
                    )
                    print_row(rows[-1])
    finally:
        process.terminate()
        process.wait(timeout=60)
    result = {
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
            "note": "2 CPU cores shared with other agents' jobs while measuring; the server, "
            "the client and the library take turns, never run at once.",
        },
        "method": "single-text requests; latency at the client; server = real "
        "`adapted-embeddings serve --mode local` over loopback HTTP/1.1 keep-alive, float "
        "JSON; library = pipeline.embed / N concurrent pipeline.aembed in process",
        "rows": rows,
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


def print_row(row: dict[str, Any]) -> None:
    if not hasattr(print_row, "header"):
        print(
            f"{'target':<8} {'cache':<5} {'conc':>4} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8}"
            f" {'in-server p50/p99 ms':>21}"
        )
        print_row.header = True  # type: ignore[attr-defined]
    print(
        f"{row['target']:<8} {row['cache']:<5} {row['concurrency']:>4} "
        f"{row['requests_per_second']:>9} {row['p50_ms']:>8} {row['p99_ms']:>8} "
        f"{_in_server(row):>21}",
        flush=True,
    )


def _in_server(row: dict[str, Any]) -> str:
    if "server_side_p50_ms" not in row:
        return ""
    return f"{row['server_side_p50_ms']} / {row['server_side_p99_ms']}"


if __name__ == "__main__":
    main()
