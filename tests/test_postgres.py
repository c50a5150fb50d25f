"""PostgreSQL + pgvector with the space enforced at the table, against a real server.

The session starts one embedded PostgreSQL 16 + pgvector (pgserver) in a private temp
directory and stops it at the end; every test gets its own database in it. Embedders are
the real MiniLM model with the bundled adapter into ada-002 (1536 dims) and, as "another
space", the registry's MiniLM -> multilingual-e5-small adapter (384 dims).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psycopg
import pytest
import sqlalchemy
from langchain_postgres import PGVector
from llama_index.core import Document as LlamaDocument
from llama_index.core.schema import TextNode
from llama_index.core.vector_stores.types import VectorStoreQuery

from adapted_embeddings import SpaceMismatchError
from adapted_embeddings.langchain import AdaptedEmbeddings
from adapted_embeddings.llama_index import AdaptedEmbeddings as LlamaAdaptedEmbeddings
from adapted_embeddings.postgres import (
    CollectionTarget,
    EmbeddedPostgres,
    MixedSpaceError,
    TableTarget,
    UnrecordedSpaceWarning,
    check_space,
    embedded_server,
    libpq_url,
    open_space,
    recorded_space,
    sqlalchemy_url,
    stamp_space,
    vector_width,
)
from adapted_embeddings.postgres.langchain import SpaceCheckedPGVector
from adapted_embeddings.postgres.llama_index import SpaceCheckedPGVectorStore
from adapted_embeddings.spaces import OPENAI_ADA_002

TEXTS = [
    "The Nile is the longest river in Africa.",
    "Paris is the capital of France.",
    "A cat is sleeping on the warm windowsill.",
    "Photosynthesis turns sunlight into chemical energy in plants.",
]
ADA_3_SMALL = "openai/text-embedding-3-small@1536"


@pytest.fixture(scope="session")
def postgres() -> Iterator[EmbeddedPostgres]:
    # Its own temp dir (mkdtemp: 0700), not pytest's basetemp, which a concurrent pytest
    # session on the same machine may prune while this server still runs.
    root = Path(tempfile.mkdtemp(prefix="ae-pgserver-"))
    server = embedded_server(root / "data", cleanup="delete")
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def db_url(postgres: EmbeddedPostgres) -> Iterator[str]:
    """A fresh database on the session's server; dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres.url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield postgres.url.replace("/postgres?", f"/{name}?", 1)
    with psycopg.connect(postgres.url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture(scope="session")
def ada() -> AdaptedEmbeddings:
    return AdaptedEmbeddings(model="text-embedding-ada-002", mode="local", cache=False)


@pytest.fixture(scope="session")
def e5(e5_adapter_path: Path) -> AdaptedEmbeddings:
    return AdaptedEmbeddings(adapter=str(e5_adapter_path), mode="local", cache=False)


@pytest.fixture(scope="session")
def llama_ada() -> LlamaAdaptedEmbeddings:
    return LlamaAdaptedEmbeddings(model="text-embedding-ada-002", mode="local", cache=False)


@pytest.fixture(scope="session")
def llama_e5(e5_adapter_path: Path) -> LlamaAdaptedEmbeddings:
    return LlamaAdaptedEmbeddings(adapter=str(e5_adapter_path), mode="local", cache=False)


def scalar(url: str, sql: str, *params: object) -> object:
    with psycopg.connect(libpq_url(url)) as conn:
        row = conn.execute(sql, params).fetchone()
    return None if row is None else row[0]


def collection_rows(url: str, collection: str) -> int:
    return int(
        scalar(  # type: ignore[arg-type]
            url,
            "SELECT count(*) FROM langchain_pg_embedding e JOIN langchain_pg_collection c "
            "ON e.collection_id = c.uuid WHERE c.name = %s",
            collection,
        )
    )


def test_embedded_server_data_directory_is_private(postgres: EmbeddedPostgres) -> None:
    mode = stat.S_IMODE(postgres.data_dir.stat().st_mode)
    assert mode == 0o700, oct(mode)
    assert "?host=" in postgres.url  # Unix socket only, no TCP port
    assert scalar(
        postgres.url, "SELECT default_version FROM pg_available_extensions WHERE name = 'vector'"
    )


def test_urls() -> None:
    assert sqlalchemy_url("postgres://u:p@h:5/d") == "postgresql+psycopg://u:p@h:5/d"
    assert sqlalchemy_url("postgresql+psycopg2://u@h/d", "asyncpg") == "postgresql+asyncpg://u@h/d"
    assert libpq_url("postgresql+asyncpg://u@/d?host=/x") == "postgresql://u@/d?host=/x"
    with pytest.raises(ValueError, match="not a PostgreSQL URL"):
        sqlalchemy_url("mysql://u@h/d")


def test_a_missing_extra_names_its_pip_line() -> None:
    from adapted_embeddings.errors import ConfigurationError
    from adapted_embeddings.postgres.extras import require

    with pytest.raises(ConfigurationError, match=r"pip install 'adapted-embeddings\[pgvector\]'"):
        require("no_such_pg_driver", "pgvector", what="SpaceCheckedPGVector")
    imported = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, adapted_embeddings.postgres; "
            "print(sorted(m for m in ('sqlalchemy', 'psycopg', 'pgserver') if m in sys.modules))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert imported.stdout.strip() == "[]"  # the package itself stays light


# --- LangChain PGVector -------------------------------------------------------------------


def test_langchain_add_search_delete_and_the_recorded_space(
    db_url: str, ada: AdaptedEmbeddings
) -> None:
    store = SpaceCheckedPGVector(ada, connection=db_url, collection_name="docs")
    ids = store.add_texts(TEXTS, ids=[f"doc-{i}" for i in range(len(TEXTS))])
    assert store.space == OPENAI_ADA_002 and store.space_recorded

    hits = store.similarity_search("Which river is the longest in Africa?", k=2)
    assert hits[0].page_content == TEXTS[0]
    scored = store.similarity_search_with_score("capital city of France", k=1)
    assert scored[0][0].page_content == TEXTS[1]
    mmr = store.max_marginal_relevance_search("sleeping cat", k=2, fetch_k=4)
    assert mmr[0].page_content == TEXTS[2]

    store.delete([ids[0]])
    assert collection_rows(db_url, "docs") == len(TEXTS) - 1
    assert all(d.page_content != TEXTS[0] for d in store.similarity_search("river", k=4))

    # Recorded in langchain-postgres's own collection metadata, and vector(1536) at the table.
    metadata = scalar(db_url, "SELECT cmetadata FROM langchain_pg_collection WHERE name='docs'")
    assert metadata == {"embedding_space": "openai/text-embedding-ada-002@1536"}
    assert recorded_space(sqlalchemy_url(db_url), CollectionTarget(collection="docs")) == (
        OPENAI_ADA_002
    )
    assert vector_width(sqlalchemy_url(db_url), CollectionTarget(collection="docs")) == 1536


async def test_langchain_async_add_search_delete(db_url: str, ada: AdaptedEmbeddings) -> None:
    store = SpaceCheckedPGVector(ada, connection=db_url, collection_name="adocs", async_mode=True)
    ids = await store.aadd_texts(TEXTS)
    hits = await store.asimilarity_search("Which river is the longest in Africa?", k=1)
    assert hits[0].page_content == TEXTS[0]
    assert store.space_recorded
    await store.adelete([ids[0]])
    hits = await store.asimilarity_search("Which river is the longest in Africa?", k=4)
    assert TEXTS[0] not in [d.page_content for d in hits] and len(hits) == len(TEXTS) - 1
    mmr = await store.amax_marginal_relevance_search("capital of France", k=1, fetch_k=3)
    assert mmr[0].page_content == TEXTS[1]

    # A collection recorded in another space of the same width: refused on first async use.
    PGVector(
        ada,
        connection=sqlalchemy_url(db_url),
        collection_name="three-small",
        embedding_length=1536,
        collection_metadata={"embedding_space": ADA_3_SMALL},
    )
    other = SpaceCheckedPGVector(
        ada, connection=db_url, collection_name="three-small", async_mode=True
    )
    with pytest.raises(SpaceMismatchError, match="text-embedding-3-small"):
        await other.asimilarity_search("anything")
    with pytest.raises(SpaceMismatchError, match="text-embedding-3-small"):
        await other.aadd_texts(["anything"])


def test_langchain_refuses_an_embedder_of_another_space(
    db_url: str, ada: AdaptedEmbeddings, e5: AdaptedEmbeddings
) -> None:
    store = SpaceCheckedPGVector(ada, connection=db_url, collection_name="docs")
    store.add_texts(TEXTS[:2])

    # Another space and another width: refused when the store is opened.
    with pytest.raises(SpaceMismatchError, match=r"multilingual-e5-small-q4@384.*ada-002@1536"):
        SpaceCheckedPGVector(e5, connection=db_url, collection_name="docs")

    # The same width, another model: only the recorded space can tell.
    PGVector(
        ada,
        connection=sqlalchemy_url(db_url),
        collection_name="three-small",
        embedding_length=1536,
        collection_metadata={"embedding_space": ADA_3_SMALL},
    )
    with pytest.raises(SpaceMismatchError, match="text-embedding-3-small"):
        SpaceCheckedPGVector(ada, connection=db_url, collection_name="three-small")

    # An embedder swapped in after opening is refused on add and on query, before any SQL.
    store.embedding_function = e5
    with pytest.raises(SpaceMismatchError):
        store.add_texts(["a new text"])
    with pytest.raises(SpaceMismatchError):
        store.similarity_search("Paris")
    assert collection_rows(db_url, "docs") == 2


def test_langchain_refuses_a_wrong_width(db_url: str, ada: AdaptedEmbeddings) -> None:
    store = SpaceCheckedPGVector(ada, connection=db_url, collection_name="docs")
    short = [[0.1] * 384]
    with pytest.raises(SpaceMismatchError, match="384 dimensions"):
        store.add_embeddings(["short"], short)
    with pytest.raises(SpaceMismatchError, match="384 dimensions"):
        store.similarity_search_by_vector(short[0])
    with pytest.raises(SpaceMismatchError, match="text-embedding-3-small"):
        store.add_embeddings(["x"], [[0.1] * 1536], space=ADA_3_SMALL)
    with pytest.raises(SpaceMismatchError):
        SpaceCheckedPGVector(ada, connection=db_url, collection_name="d2", embedding_length=768)
    assert collection_rows(db_url, "docs") == 0
    # The table itself refuses it too: the column is vector(1536).
    with psycopg.connect(libpq_url(db_url)) as conn, pytest.raises(psycopg.errors.DataException):
        conn.execute(
            "INSERT INTO langchain_pg_embedding (id, embedding) VALUES ('x', %s::vector)",
            (json.dumps([0.1] * 384),),
        )


# --- LlamaIndex PGVectorStore -------------------------------------------------------------


def test_llama_index_add_query_delete_and_the_recorded_space(
    db_url: str, llama_ada: LlamaAdaptedEmbeddings
) -> None:
    store = SpaceCheckedPGVectorStore(
        embed_model=llama_ada, connection_string=db_url, table_name="docs"
    )
    documents = [LlamaDocument(text=t, doc_id=f"doc-{i}") for i, t in enumerate(TEXTS)]
    index = store.build_index(documents)
    nodes = index.as_retriever(similarity_top_k=1).retrieve("longest river in Africa")
    assert nodes[0].node.get_content() == TEXTS[0]
    assert store.space_recorded

    store.delete("doc-0")
    nodes = index.as_retriever(similarity_top_k=4).retrieve("longest river in Africa")
    assert TEXTS[0] not in [n.node.get_content() for n in nodes] and len(nodes) == 3

    comment = scalar(db_url, "SELECT obj_description('public.data_docs'::regclass, 'pg_class')")
    assert comment == "embedding_space=openai/text-embedding-ada-002@1536"
    column = scalar(
        db_url,
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
        "WHERE attrelid = 'public.data_docs'::regclass AND attname = 'embedding'",
    )
    assert column == "vector(1536)"


async def test_llama_index_async_add_query_delete(
    db_url: str, llama_ada: LlamaAdaptedEmbeddings
) -> None:
    store = SpaceCheckedPGVectorStore(
        embed_model=llama_ada, connection_string=db_url, table_name="adocs"
    )
    vectors = await llama_ada.aget_text_embedding_batch(TEXTS)
    nodes = [
        TextNode(text=t, id_=f"n{i}", embedding=v)
        for i, (t, v) in enumerate(zip(TEXTS, vectors, strict=True))
    ]
    assert await store.async_add(nodes) == [f"n{i}" for i in range(len(TEXTS))]
    query = VectorStoreQuery(
        query_embedding=await llama_ada.aget_query_embedding("capital of France"),
        similarity_top_k=1,
    )
    result = await store.aquery(query)
    assert result.ids == ["n1"]
    await store.adelete_nodes(["n1"])
    result = await store.aquery(query)
    assert result.ids is not None and "n1" not in result.ids
    retrieved = await store.as_index().as_retriever(similarity_top_k=1).aretrieve("sleeping cat")
    assert retrieved[0].node.get_content() == TEXTS[2]
    await store.close()


def test_llama_index_refuses_another_space_and_a_wrong_width(
    db_url: str, llama_ada: LlamaAdaptedEmbeddings, llama_e5: LlamaAdaptedEmbeddings
) -> None:
    store = SpaceCheckedPGVectorStore(
        embed_model=llama_ada, connection_string=db_url, table_name="docs"
    )
    store.build_index([LlamaDocument(text=t) for t in TEXTS])
    rows = scalar(db_url, "SELECT count(*) FROM data_docs")

    # Another model of another width, and another model of the same width.
    for options in ({"embed_model": llama_e5}, {"space": ADA_3_SMALL}):
        other = SpaceCheckedPGVectorStore(connection_string=db_url, table_name="docs", **options)
        width = other.space.dimensions
        with pytest.raises(SpaceMismatchError, match="ada-002@1536"):
            other.query(VectorStoreQuery(query_embedding=[0.01] * width, similarity_top_k=1))
        with pytest.raises(SpaceMismatchError):
            other.add([TextNode(text="x", embedding=[0.01] * width)])
    with pytest.raises(SpaceMismatchError):
        store.as_index(embed_model=llama_e5)
    with pytest.raises(SpaceMismatchError):
        SpaceCheckedPGVectorStore(
            embed_model=llama_ada, space=ADA_3_SMALL, connection_string=db_url
        )

    # Raw vectors of the wrong width, on add and on query.
    with pytest.raises(SpaceMismatchError, match="384 dimensions"):
        store.add([TextNode(text="short", embedding=[0.01] * 384)])
    with pytest.raises(SpaceMismatchError, match="384 dimensions"):
        store.query(VectorStoreQuery(query_embedding=[0.01] * 384, similarity_top_k=1))
    assert scalar(db_url, "SELECT count(*) FROM data_docs") == rows


# --- tables created elsewhere: warn, check, stamp -------------------------------------------


def test_unrecorded_collection_warns_then_is_checked_and_stamped(
    db_url: str, ada: AdaptedEmbeddings
) -> None:
    # Someone else's collection: plain PGVector, no space recorded.
    legacy = PGVector(
        ada, connection=sqlalchemy_url(db_url), collection_name="legacy", embedding_length=1536
    )
    legacy.add_texts(TEXTS)
    with pytest.warns(UnrecordedSpaceWarning, match="check_space"):
        store = SpaceCheckedPGVector(ada, connection=db_url, collection_name="legacy")
    assert not store.space_recorded

    engine = sqlalchemy.create_engine(sqlalchemy_url(db_url))
    target = CollectionTarget(collection="legacy")
    report = check_space(engine, target, ada)
    assert report.passed and report.rows_checked == len(TEXTS), report
    assert report.paired_cosine is not None and report.paired_cosine > 0.999
    stamp_space(engine, target, report)
    assert recorded_space(engine, target) == OPENAI_ADA_002

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert SpaceCheckedPGVector(ada, connection=db_url, collection_name="legacy").space_recorded
    engine.dispose()


def create_vector_table(url: str, table: str, texts: list[str], vectors: np.ndarray) -> None:
    """``table`` (id, body, embedding vector(1536)) with a team's comment, rows in order."""
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        columns = "id int PRIMARY KEY, body text, embedding vector(1536)"
        conn.execute(f"CREATE TABLE {table} ({columns})")
        conn.execute(f"COMMENT ON TABLE {table} IS 'team chunks; owner: search'")
        with conn.cursor().copy(f"COPY {table} (id, body, embedding) FROM STDIN") as copy:
            for row, (body, vector) in enumerate(zip(texts, vectors, strict=True)):
                copy.write_row((row, body, json.dumps(vector.tolist())))
        conn.execute(f"ANALYZE {table}")  # as autovacuum would: the planner knows its size


@pytest.mark.slow
def test_plain_sql_table_check_refuses_vectors_of_another_basis(
    db_url: str, ada: AdaptedEmbeddings
) -> None:
    """Real ada-002 vectors pass the check; the same vectors in another basis do not."""
    from adapted_embeddings.training.corpora import load_jeopardy

    corpus = load_jeopardy()
    rows = np.arange(0, 400, 10)
    real = corpus.ada[rows]
    rotation, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((1536, 1536)))
    engine = sqlalchemy.create_engine(sqlalchemy_url(db_url))
    for table, vectors in (("chunks", real), ("rotated", real @ rotation.T)):
        create_vector_table(db_url, table, [corpus.texts[r] for r in rows], vectors)

    for table, should_pass in (("chunks", True), ("rotated", False)):
        target = TableTarget(table=table, text_column="body")
        with pytest.warns(UnrecordedSpaceWarning, match=f"public.{table} holds 40 vectors"):
            assert open_space(engine, target, ada.space) is False
        report = check_space(engine, target, ada)
        assert report.passed is should_pass, report
        if should_pass:
            stamp_space(engine, target, report)
            assert recorded_space(engine, target) == OPENAI_ADA_002
        else:
            with pytest.raises(SpaceMismatchError, match="refusing to stamp"):
                stamp_space(engine, target, report)
            assert recorded_space(engine, target) is None
    comment = scalar(db_url, "SELECT obj_description('public.chunks'::regclass, 'pg_class')")
    assert (
        comment == "team chunks; owner: search\nembedding_space=openai/text-embedding-ada-002@1536"
    )

    # A new empty table is stamped on open; a table of another width is refused.
    with psycopg.connect(libpq_url(db_url), autocommit=True) as conn:
        conn.execute("CREATE TABLE fresh (id int, text text, embedding vector(1536))")
        conn.execute("CREATE TABLE narrow (id int, text text, embedding vector(384))")
    assert open_space(engine, TableTarget(table="fresh"), ada.space) is True
    assert recorded_space(engine, TableTarget(table="fresh")) == OPENAI_ADA_002
    with pytest.raises(SpaceMismatchError, match=r"vector\(384\)"):
        open_space(engine, TableTarget(table="narrow"), ada.space)
    engine.dispose()


@pytest.mark.slow
def test_a_table_mixing_spaces_is_sampled_throughout_and_not_stamped(
    db_url: str, ada: AdaptedEmbeddings
) -> None:
    """The oldest 40 rows hold real ada-002 vectors and the 260 after them the same kind of
    vectors in another basis: a check of the oldest rows would pass; sampled across the
    whole table it finds the mix, says how much is foreign, and the stamp is refused."""
    from adapted_embeddings.training.corpora import load_jeopardy

    corpus = load_jeopardy()
    rows = np.arange(0, 3000, 10)
    vectors = corpus.ada[rows].astype(np.float64)
    rotation, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((1536, 1536)))
    vectors[40:] = vectors[40:] @ rotation.T
    create_vector_table(db_url, "mixed", [corpus.texts[r] for r in rows], vectors)
    engine = sqlalchemy.create_engine(sqlalchemy_url(db_url))
    target = TableTarget(table="mixed", text_column="body")

    report = check_space(engine, target, ada)  # 32 rows drawn through TABLESAMPLE
    assert report.rows_checked == 32 and not report.passed and report.mixed, report
    assert 0 < report.rows_failing < 32 and "mix spaces" in report.reason
    with pytest.raises(MixedSpaceError, match=r"public\.mixed as openai.*rows sampled across") as e:
        stamp_space(engine, target, report)
    assert e.value.target == "table public.mixed"
    assert e.value.failing_share == report.rows_failing / 32
    assert recorded_space(engine, target) is None
    with pytest.warns(UnrecordedSpaceWarning, match="holds 300 vectors"):
        assert open_space(engine, target, ada.space) is False

    whole = check_space(engine, target, ada, sample=300)  # more than TABLESAMPLE aims at
    assert (whole.rows_checked, whole.rows_failing) == (300, 260), whole
    assert whole.failing_share == pytest.approx(260 / 300)
    with pytest.raises(MixedSpaceError, match=r"260 of the 300 rows sampled across it \(87%\)"):
        stamp_space(engine, target, whole)
    engine.dispose()


# --- concurrency and faults ----------------------------------------------------------------

WRITER = """
import json, sys, time
from pathlib import Path
from adapted_embeddings.langchain import AdaptedEmbeddings
from adapted_embeddings.postgres.langchain import SpaceCheckedPGVector

url, name, work = sys.argv[1], sys.argv[2], Path(sys.argv[3])
vectors = json.loads((work / "vectors.json").read_text())
store = SpaceCheckedPGVector(
    AdaptedEmbeddings(model="text-embedding-ada-002", mode="local", cache=False),
    connection=url, collection_name="shared",
)
(work / f"{name}.ready").touch()
while not (work / "go").exists():
    time.sleep(0.01)
for batch in range(10):
    ids = [f"{name}-{batch}-{i}" for i in range(25)]
    store.add_embeddings(ids, [vectors[i % len(vectors)] for i in range(25)], ids=ids)
"""


@pytest.mark.slow
def test_two_processes_write_one_collection_and_lose_no_rows(
    db_url: str, ada: AdaptedEmbeddings, tmp_path: Path
) -> None:
    SpaceCheckedPGVector(ada, connection=db_url, collection_name="shared")
    (tmp_path / "vectors.json").write_text(json.dumps(ada.embed_documents(TEXTS)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, db_url, name, str(tmp_path)], env=env)
        for name in ("a", "b")
    ]
    try:
        deadline = time.monotonic() + 240
        while not all((tmp_path / f"{n}.ready").exists() for n in ("a", "b")):
            assert time.monotonic() < deadline and all(w.poll() is None for w in writers)
            time.sleep(0.05)
        (tmp_path / "go").touch()
        assert [w.wait(timeout=240) for w in writers] == [0, 0]
    finally:
        for writer in writers:
            if writer.poll() is None:
                writer.kill()
    assert collection_rows(db_url, "shared") == 500
    distinct = scalar(db_url, "SELECT count(DISTINCT id) FROM langchain_pg_embedding")
    assert distinct == 500


def terminate_when_blocked(
    url: str, table: str, blocker: psycopg.Connection, done: threading.Event
) -> threading.Thread:
    """From another connection, kill the backend whose INSERT into `table` waits on a lock.

    If none shows up within 10 minutes, the blocker's backend is killed instead, so the
    test fails (``done`` stays unset) rather than hanging.
    """
    blocker_pid = blocker.info.backend_pid

    def run() -> None:
        with psycopg.connect(libpq_url(url), autocommit=True) as conn:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                pid = conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query LIKE %s AND pid <> pg_backend_pid()",
                    (f"INSERT INTO {table}%",),
                ).fetchone()
                if pid is not None:
                    conn.execute("SELECT pg_terminate_backend(%s)", pid)
                    done.set()
                    return
                time.sleep(0.01)
            conn.execute("SELECT pg_terminate_backend(%s)", (blocker_pid,))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_langchain_connection_dropped_mid_batch_leaves_nothing(
    db_url: str, ada: AdaptedEmbeddings
) -> None:
    store = SpaceCheckedPGVector(ada, connection=db_url, collection_name="docs")
    vectors = ada.embed_documents(TEXTS)
    ids = [f"row-{i:03d}" for i in range(200)]
    batch = [vectors[i % len(vectors)] for i in range(200)]
    uuid_ = scalar(db_url, "SELECT uuid FROM langchain_pg_collection WHERE name = 'docs'")
    # Another session holds an uncommitted row with the batch's LAST id: the batch's INSERT
    # writes the first 199 rows, then waits on that row's lock, and is killed right there.
    with psycopg.connect(libpq_url(db_url)) as blocker:
        blocker.execute(
            "INSERT INTO langchain_pg_embedding (id, collection_id, embedding, document) "
            "VALUES (%s, %s, %s::vector, 'held')",
            (ids[-1], uuid_, json.dumps(vectors[0])),
        )
        killed = threading.Event()
        killer = terminate_when_blocked(db_url, "langchain_pg_embedding", blocker, killed)
        with pytest.raises(sqlalchemy.exc.OperationalError):
            store.add_embeddings(ids, batch, ids=ids)
        killer.join()
        assert killed.is_set()
        blocker.rollback()
    assert collection_rows(db_url, "docs") == 0
    # The store recovers on a new connection, and the whole batch goes in.
    store.add_embeddings(ids, batch, ids=ids)
    assert collection_rows(db_url, "docs") == 200


@pytest.mark.slow
def test_llama_index_connection_dropped_mid_batch_leaves_nothing(
    db_url: str, llama_ada: LlamaAdaptedEmbeddings
) -> None:
    store = SpaceCheckedPGVectorStore(
        embed_model=llama_ada, connection_string=db_url, table_name="docs"
    )
    vector = llama_ada.get_text_embedding(TEXTS[0])
    nodes = [TextNode(text=f"t{i}", id_=f"node-{i:04d}", embedding=vector) for i in range(1200)]
    assert store.space_recorded
    # LlamaIndex's table has no unique key besides its serial id; one on node_id lets an
    # uncommitted row of another session hold the batch up after its first 1,000 rows
    # (SQLAlchemy sends them 1,000 per INSERT) have been written.
    with psycopg.connect(libpq_url(db_url), autocommit=True) as conn:
        conn.execute("CREATE UNIQUE INDEX data_docs_node_id ON data_docs (node_id)")
    with psycopg.connect(libpq_url(db_url)) as blocker:
        blocker.execute("INSERT INTO data_docs (node_id, text) VALUES ('node-1100', 'held')")
        killed = threading.Event()
        killer = terminate_when_blocked(db_url, "public.data_docs", blocker, killed)
        with pytest.raises(sqlalchemy.exc.OperationalError):
            store.add(nodes)
        killer.join()
        assert killed.is_set()
        blocker.rollback()
    assert scalar(db_url, "SELECT count(*) FROM data_docs") == 0
    store.add(nodes)
    assert scalar(db_url, "SELECT count(*) FROM data_docs") == 1200
