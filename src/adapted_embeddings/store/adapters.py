"""Adapted adapters published once to the fleet's store, and followed by every node.

A node whose ``adapt()`` switched to a new adapter publishes its directory (manifest JSON,
safetensors weights, every other file) to ``ae_adapters`` / ``ae_adapter_files`` in one
transaction, each file with its SHA-256: another node sees the whole adapter or none of it.

Every node (the publisher included) follows the newest adapter published for its (source,
target) spaces: within ``poll_seconds`` it downloads it, checks every file's hash, writes it
privately (0700/0600) beside its own adapted adapters through a temporary directory and a
rename (never a half-written one), loads it (which checks the weights against the
manifest's hash again) and switches. Two nodes that adapt at the same time both publish;
every node then converges on the one published last.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import threading
import uuid
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg

from adapted_embeddings.adapter import Adapter
from adapted_embeddings.errors import AdapterLoadError
from adapted_embeddings.registry import prune_adapted
from adapted_embeddings.store.postgres import PostgresStore, StoreUnavailableError

if TYPE_CHECKING:
    from adapted_embeddings.pipeline import EmbeddingPipeline

logger = logging.getLogger(__name__)


class AdapterFollower:
    """Publishes a pipeline's adapted adapters and switches it to the fleet's newest."""

    def __init__(
        self,
        pipeline: EmbeddingPipeline,
        shared: PostgresStore,
        learned_dir: Path,
        *,
        poll_seconds: float = 1.0,
        keep: int = 3,
    ) -> None:
        """Follow the store for ``pipeline``; adapters it fetches are kept in ``learned_dir``.

        After each fetch only the ``keep`` newest adapted adapters stay there
        (``learning.keep_adapters``).
        """
        self._pipeline = weakref.ref(pipeline)  # the thread must not keep a pipeline alive
        self.shared = shared
        self.learned_dir = learned_dir
        self.poll_seconds = poll_seconds
        self.source, self.target = pipeline.encoder.space.id, pipeline.space.id
        self._spaces = {"source": pipeline.encoder.space, "target": pipeline.space}
        self.keep = keep
        self._published: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """One step now (a node that joins serves the fleet's adapter at once), then poll."""
        self.step()
        self._thread = threading.Thread(
            target=self._poll, name="adapted-embeddings-fleet-adapters", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop polling (the pipeline keeps the adapter it has)."""
        self._stop.set()

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            if self._pipeline() is None:
                return
            try:
                self.step()
            except Exception as exc:  # a bad download must never take the node down
                logger.warning("could not follow the fleet's adapters: %s", exc)

    def step(self) -> None:
        """Publish the pipeline's adapted adapter if new; switch to the fleet's newest."""
        pipeline = self._pipeline()
        if pipeline is None:
            return
        current = pipeline.adapter
        try:
            if current is not None and self._adapted_here(current):
                self.publish(current)
            newest = self.shared.run(self._newest)
            if newest is None or (current is not None and newest[0] == current.id):
                return
            adapter = self._fetch(*newest)
        except StoreUnavailableError:
            return  # the node keeps its adapter; the next poll tries again
        except (AdapterLoadError, OSError) as exc:
            logger.warning("not switching to the fleet's newest adapter: %s", exc)
            return
        if pipeline.adapter is current:  # not switched meanwhile (say by its own adapt())
            pipeline.use_adapter(adapter)
            logger.info("switched to the fleet's adapter %s", adapter.id)

    def _adapted_here(self, adapter: Adapter) -> bool:
        return (
            adapter.id not in self._published
            and adapter.path is not None
            and adapter.path.parent.resolve() == self.learned_dir.resolve()
        )

    def publish(self, adapter: Adapter) -> None:
        """Put ``adapter``'s directory in the store, whole, in one transaction (once).

        The store then keeps the ``keep`` newest published for this (source, target).
        """
        assert adapter.path is not None
        files = {
            path.name: path.read_bytes()
            for path in sorted(adapter.path.iterdir())
            if path.is_file()
        }

        def write(conn: psycopg.Connection) -> None:
            with conn.transaction():
                inserted = conn.execute(
                    "INSERT INTO ae_adapters (adapter_id, directory, source_space, target_space, "
                    "manifest) VALUES (%s, %s, %s, %s, %s) ON CONFLICT (adapter_id) DO NOTHING "
                    "RETURNING seq",
                    (
                        adapter.id,
                        adapter.path.name if adapter.path else adapter.name,
                        self.source,
                        self.target,
                        adapter.manifest.model_dump_json(),
                    ),
                ).fetchone()
                if inserted is None:
                    return  # published already (by this node before a restart, or another)
                with conn.cursor() as cursor:
                    cursor.executemany(
                        "INSERT INTO ae_adapter_files (adapter_id, name, content, sha256) "
                        "VALUES (%s, %s, %s, %s)",
                        [
                            (adapter.id, name, content, hashlib.sha256(content).hexdigest())
                            for name, content in files.items()
                        ],
                    )
                # The store keeps as many as each node's disk (files go with ON DELETE CASCADE).
                conn.execute(
                    "DELETE FROM ae_adapters WHERE source_space = %s AND target_space = %s "
                    "AND seq NOT IN (SELECT seq FROM ae_adapters WHERE source_space = %s "
                    "AND target_space = %s ORDER BY seq DESC LIMIT %s)",
                    (self.source, self.target, self.source, self.target, self.keep),
                )

        self.shared.run(write)
        self._published.add(adapter.id)
        logger.info("published adapter %s to the fleet", adapter.id)

    def _newest(self, conn: psycopg.Connection) -> tuple[str, str] | None:
        row = conn.execute(
            "SELECT adapter_id, directory FROM ae_adapters WHERE source_space = %s "
            "AND target_space = %s ORDER BY seq DESC LIMIT 1",
            (self.source, self.target),
        ).fetchone()
        return (str(row[0]), str(row[1])) if row else None

    def _fetch(self, adapter_id: str, directory: str) -> Adapter:
        """The published adapter, from this node's disk if fetched before, else downloaded.

        Raises:
            AdapterLoadError: If a file fails its hash or the adapter does not load.

        """
        final = self.learned_dir / Path(directory).name
        if final.is_dir():
            with contextlib.suppress(AdapterLoadError):
                existing = Adapter.load(final)
                if existing.id == adapter_id:
                    return existing
            final = self.learned_dir / f"{Path(directory).name}-fleet-{uuid.uuid4().hex[:8]}"
        rows: list[Any] = self.shared.run(
            lambda conn: conn.execute(
                "SELECT name, content, sha256 FROM ae_adapter_files WHERE adapter_id = %s",
                (adapter_id,),
            ).fetchall()
        )
        self.learned_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        incoming = self.learned_dir / f".incoming-{uuid.uuid4().hex}"
        incoming.mkdir(mode=0o700)
        try:
            for name, content, digest in rows:
                content = bytes(content)
                if hashlib.sha256(content).hexdigest() != digest or Path(name).name != name:
                    raise AdapterLoadError(
                        f"the fleet's adapter {adapter_id}: file {name!r} fails its SHA-256"
                    )
                descriptor = os.open(incoming / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
                with os.fdopen(descriptor, "wb") as handle:
                    handle.write(content)
            adapter = Adapter.load(incoming)  # checks the weights against the manifest
            if adapter.id != adapter_id:
                raise AdapterLoadError(f"the fleet's adapter {adapter_id} loads as {adapter.id}")
            incoming.rename(final)
        finally:
            shutil.rmtree(incoming, ignore_errors=True)
        fetched = Adapter.load(final)
        prune_adapted(self.learned_dir, keep=self.keep, **self._spaces)
        return fetched
