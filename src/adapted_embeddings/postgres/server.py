"""Which PostgreSQL to use: ``DATABASE_URL``, or an embedded one started on demand (pgserver).

``pgserver`` ships a real PostgreSQL 16 with pgvector in a wheel, so a laptop or CI runner
gets a vector database with no service to install. The server listens on a Unix socket in
its data directory only (no TCP port), and the data directory is private (0700).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Literal

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from adapted_embeddings.postgres.extras import PGVECTOR_EXTRA, require

DATABASE_URL_ENV = "DATABASE_URL"
"""Environment variable naming the server to use instead of the embedded one."""

_DRIVERLESS_SCHEMES = ("postgres://", "postgresql://")


def default_data_dir() -> Path:
    """Where the embedded server keeps its data unless told otherwise.

    The user's data directory; for root, ``/var/lib/adapted-embeddings/pgserver``, because
    pgserver then runs PostgreSQL as a separate ``pgserver`` user and makes every parent
    of the data directory traversable, which must not happen to ``/root``.
    """
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return Path("/var/lib/adapted-embeddings/pgserver")
    return platformdirs.user_data_path("adapted-embeddings", appauthor=False) / "pgserver"


class EmbeddedPostgres(BaseModel):
    """A running embedded PostgreSQL (with pgvector) and how to reach it."""

    model_config = ConfigDict(frozen=True)

    data_dir: Path = Field(description="The server's private (0700) data directory.")
    url: str = Field(description="libpq URL over the Unix socket, e.g. postgresql://...?host=")

    _handle: Any = PrivateAttr(default=None)

    def stop(self) -> None:
        """Stop the server (and delete its data if it was started with ``cleanup='delete'``)."""
        with _lock:
            _servers.pop(self.data_dir, None)
        if self._handle is not None:
            self._handle.cleanup()


_lock = threading.Lock()
_servers: dict[Path, EmbeddedPostgres] = {}


def embedded_server(
    data_dir: str | Path | None = None,
    *,
    cleanup: Literal["stop", "delete"] = "stop",
) -> EmbeddedPostgres:
    """Start (or reuse) the embedded PostgreSQL whose data lives in ``data_dir``.

    Args:
        data_dir: The data directory; created if missing. Defaults to
            :func:`default_data_dir`.
        cleanup: What happens when the last process using it exits (or :meth:`stop`):
            ``"stop"`` keeps the data, ``"delete"`` removes it.

    Raises:
        ConfigurationError: If ``pgserver`` is not installed (names the extra).

    """
    pgserver = require("pgserver", PGVECTOR_EXTRA, what="the embedded PostgreSQL (pgserver)")
    directory = Path(data_dir or default_data_dir()).expanduser().resolve()
    with _lock:
        running = _servers.get(directory)
        if running is not None:
            return running
        created_parent = not directory.parent.exists()
        directory.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if directory.exists():
            directory.chmod(0o700)
        handle = pgserver.get_server(directory, cleanup_mode=cleanup)
        directory.chmod(0o700)  # initdb makes it 0700; keep it so whatever umask and owner
        if created_parent:
            # As root, pgserver opened the parent for listing too; traversal is all it needs.
            directory.parent.chmod(0o711)
        server = EmbeddedPostgres(data_dir=directory, url=handle.get_uri())
        server._handle = handle
        _servers[directory] = server
        return server


def database_url(data_dir: str | Path | None = None) -> str:
    """``DATABASE_URL`` if set, else the URL of the embedded server (started on first use)."""
    configured = os.environ.get(DATABASE_URL_ENV, "").strip()
    if configured:
        return configured
    return embedded_server(data_dir).url


def sqlalchemy_url(url: str, driver: str = "psycopg") -> str:
    """``url`` with the SQLAlchemy driver set, e.g. ``postgresql+psycopg://...``.

    Accepts ``postgres://``, ``postgresql://`` and ``postgresql+anydriver://`` URLs.
    """
    for scheme in _DRIVERLESS_SCHEMES:
        if url.startswith(scheme):
            return f"postgresql+{driver}://{url[len(scheme) :]}"
    if url.startswith("postgresql+"):
        return f"postgresql+{driver}://{url.split('://', 1)[1]}"
    raise ValueError(f"not a PostgreSQL URL: {url.split('://', 1)[0]}://...")


def libpq_url(url: str) -> str:
    """``url`` as libpq (psql, ``psycopg.connect``) reads it: ``postgresql://...``."""
    return sqlalchemy_url(url, "x").replace("postgresql+x://", "postgresql://", 1)
