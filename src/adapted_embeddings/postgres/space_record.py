"""Record an embedding space with a pgvector table, and enforce it on every add and query.

Where the space is recorded:

* a LangChain ``PGVector`` collection: key ``embedding_space`` of the collection's metadata
  (``langchain_pg_collection.cmetadata``), written when the collection is created;
* a LlamaIndex ``PGVectorStore`` table or any plain SQL table: the table's comment, as
  ``embedding_space=provider/model@dimensions`` (other comment text is kept).

:func:`open_space` is what both integrations call when they open a store: it checks the
declared width of the vector column (``vector(N)``), compares the recorded space with the
embedder's and raises :class:`SpaceMismatchError` when they differ, records the space on a
table that has none and no rows yet, and warns (:class:`UnrecordedSpaceWarning`) when rows
exist but no space was ever recorded. :class:`SpaceGuard` then checks every embedder and
every raw vector before it reaches the database.

Plain SQL:

.. code-block:: python

    from adapted_embeddings.postgres import TableTarget, open_space, check_space, stamp_space

    target = TableTarget(table="chunks", vector_column="embedding", text_column="body")
    open_space(engine, target, embeddings.space)   # records, checks, or warns
    report = check_space(engine, target, embeddings)  # for a table someone else filled
    stamp_space(engine, target, report)              # only if report.passed
"""

from __future__ import annotations

import itertools
import json
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from adapted_embeddings.errors import ConfigurationError, SpaceMismatchError
from adapted_embeddings.postgres.extras import PGVECTOR_EXTRA, require
from adapted_embeddings.spaces import EmbeddingSpace, ensure_same_space

require("sqlalchemy", PGVECTOR_EXTRA, what="adapted_embeddings.postgres")

from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import Connection, Engine  # noqa: E402

SPACE_KEY = "embedding_space"
"""The key (collection metadata) and the ``key=value`` label (table comment) of the space."""

_COMMENT_LABEL = re.compile(rf"{SPACE_KEY}=(\S+)")
_WIDTH = re.compile(r"^(?:vector|halfvec)(?:\((\d+)\))?$")

Bind = Engine | Connection | str
"""Where to run SQL: a SQLAlchemy engine, a connection (its transaction is used), or a URL."""


class UnrecordedSpaceWarning(UserWarning):
    """A vector table or collection holds rows but no recorded embedding space."""


class MixedSpaceError(SpaceMismatchError):
    """Some sampled rows of a table are in the space and others are not: it mixes spaces.

    Attributes:
        target: The table or collection, as described in messages.
        failing_share: Share of the sampled rows whose vectors are not in the space.

    """

    def __init__(self, message: str, *, target: str, failing_share: float) -> None:
        super().__init__(message)
        self.target = target
        self.failing_share = failing_share


class TableTarget(BaseModel):
    """A table with a pgvector column; its space is recorded in the table's comment."""

    model_config = ConfigDict(frozen=True)

    table: str = Field(min_length=1, description="Table name, unquoted (e.g. 'data_docs').")
    schema_name: str = Field(default="public", min_length=1, description="Schema of the table.")
    vector_column: str = Field(default="embedding", description="The vector(N) column.")
    text_column: str | None = Field(
        default="text", description="Column holding the embedded text (for check_space)."
    )

    def describe(self) -> str:
        """Human-readable name for messages."""
        return f"table {self.schema_name}.{self.table}"

    def _qualified(self, conn: Connection) -> str:
        quote = conn.dialect.identifier_preparer.quote
        return f"{quote(self.schema_name)}.{quote(self.table)}"

    def exists(self, conn: Connection) -> bool:
        """Whether the table exists."""
        found = conn.execute(text("SELECT to_regclass(:name)"), {"name": self._qualified(conn)})
        return found.scalar() is not None

    def read(self, conn: Connection) -> str | None:
        """The recorded space id, or ``None``."""
        comment = conn.execute(
            text("SELECT obj_description(to_regclass(:name), 'pg_class')"),
            {"name": self._qualified(conn)},
        ).scalar()
        match = _COMMENT_LABEL.search(comment or "")
        return match[1] if match else None

    def write(self, conn: Connection, space: EmbeddingSpace) -> None:
        """Record ``space`` in the table comment, keeping any other comment text."""
        qualified = self._qualified(conn)
        # Self-conflicting lock: two writers of the comment take turns; reads and inserts
        # go on. Then read again under the lock.
        conn.execute(text(f"LOCK TABLE {qualified} IN SHARE UPDATE EXCLUSIVE MODE"))
        comment = (
            conn.execute(
                text("SELECT obj_description(to_regclass(:name), 'pg_class')"),
                {"name": qualified},
            ).scalar()
            or ""
        )
        label = f"{SPACE_KEY}={space.id}"
        if _COMMENT_LABEL.search(comment):
            comment = _COMMENT_LABEL.sub(label, comment)
        else:
            comment = f"{comment}\n{label}" if comment else label
        # COMMENT takes no bind parameters; an E'' literal with both escapes is safe
        # whatever standard_conforming_strings is.
        literal = comment.replace("\\", "\\\\").replace("'", "''")
        conn.execute(text(f"COMMENT ON TABLE {qualified} IS E'{literal}'"))

    def column_type(self, conn: Connection) -> str | None:
        """``format_type`` of the vector column (e.g. ``'vector(1536)'``), ``None`` if absent."""
        return _column_type(conn, self.schema_name, self.table, self.vector_column)

    def row_count(self, conn: Connection) -> int:
        """Rows in the table."""
        return int(conn.execute(text(f"SELECT count(*) FROM {self._qualified(conn)}")).scalar_one())

    def sample(self, conn: Connection, size: int) -> list[tuple[str, list[float]]]:
        """Up to ``size`` rows of (embedded text, stored vector), drawn from the whole table."""
        if self.text_column is None:
            raise ConfigurationError(
                f"{self.describe()}: give text_column= to check stored vectors against texts"
            )
        quote = conn.dialect.identifier_preparer.quote
        vector = quote(self.vector_column)
        return _random_rows(
            conn,
            size,
            select=f"SELECT {quote(self.text_column)} AS t, {vector} AS v",
            table=self._qualified(conn),
            rest=f"WHERE {vector} IS NOT NULL",
            parameters={},
        )


class CollectionTarget(BaseModel):
    """A langchain-postgres ``PGVector`` collection; its space lives in its metadata."""

    model_config = ConfigDict(frozen=True)

    collection: str = Field(min_length=1, description="The collection name.")
    schema_name: str = Field(
        default="public", description="Schema of langchain-postgres's two tables."
    )

    def describe(self) -> str:
        """Human-readable name for messages."""
        return f"collection {self.collection!r}"

    def _tables(self, conn: Connection) -> tuple[str, str]:
        quote = conn.dialect.identifier_preparer.quote
        schema = quote(self.schema_name)
        return f"{schema}.langchain_pg_collection", f"{schema}.langchain_pg_embedding"

    def exists(self, conn: Connection) -> bool:
        """Whether the collection exists."""
        return self._metadata(conn) is not None

    def _metadata(self, conn: Connection, *, lock: bool = False) -> dict[str, Any] | None:
        collections, _ = self._tables(conn)
        if conn.execute(text("SELECT to_regclass(:name)"), {"name": collections}).scalar() is None:
            return None
        row = conn.execute(
            text(
                f"SELECT cmetadata FROM {collections} WHERE name = :name"
                + (" FOR UPDATE" if lock else "")
            ),
            {"name": self.collection},
        ).first()
        if row is None:
            return None
        metadata = row[0]
        if isinstance(metadata, str):  # asyncpg and some drivers hand JSON back as text
            metadata = json.loads(metadata)
        return dict(metadata or {})

    def read(self, conn: Connection) -> str | None:
        """The recorded space id, or ``None``."""
        value = (self._metadata(conn) or {}).get(SPACE_KEY)
        return str(value) if value else None

    def write(self, conn: Connection, space: EmbeddingSpace) -> None:
        """Record ``space`` in the collection metadata, keeping its other keys."""
        metadata = self._metadata(conn, lock=True)
        if metadata is None:
            raise ConfigurationError(f"{self.describe()} does not exist")
        metadata[SPACE_KEY] = space.id
        collections, _ = self._tables(conn)
        conn.execute(
            text(f"UPDATE {collections} SET cmetadata = CAST(:meta AS json) WHERE name = :name"),
            {"meta": json.dumps(metadata), "name": self.collection},
        )

    def column_type(self, conn: Connection) -> str | None:
        """``format_type`` of ``langchain_pg_embedding.embedding`` (shared by all collections)."""
        return _column_type(conn, self.schema_name, "langchain_pg_embedding", "embedding")

    def row_count(self, conn: Connection) -> int:
        """Rows in this collection."""
        collections, embeddings = self._tables(conn)
        return int(
            conn.execute(
                text(
                    f"SELECT count(*) FROM {embeddings} e JOIN {collections} c "
                    "ON e.collection_id = c.uuid WHERE c.name = :name"
                ),
                {"name": self.collection},
            ).scalar_one()
        )

    def sample(self, conn: Connection, size: int) -> list[tuple[str, list[float]]]:
        """Up to ``size`` rows of (document, stored vector), drawn from the whole collection."""
        collections, embeddings = self._tables(conn)
        return _random_rows(
            conn,
            size,
            select="SELECT e.document AS t, e.embedding AS v",
            table=embeddings,
            alias="e",
            rest=f"JOIN {collections} c ON e.collection_id = c.uuid "
            "WHERE c.name = :name AND e.embedding IS NOT NULL",
            parameters={"name": self.collection},
        )


Target = TableTarget | CollectionTarget

_ROWS_PER_SAMPLED_ROW = 4
"""TABLESAMPLE aims at this many rows per row wanted, then a random ``size`` of them."""


def _random_rows(
    conn: Connection,
    size: int,
    *,
    select: str,
    table: str,
    rest: str,
    parameters: dict[str, Any],
    alias: str = "",
) -> list[tuple[str, list[float]]]:
    """``size`` rows drawn uniformly from the whole table, not its oldest rows.

    A table whose estimated size (``pg_class.reltuples``) is large is read through
    ``TABLESAMPLE BERNOULLI`` (each row kept with the same probability, so no part of the
    table is favoured) aiming at a few times ``size`` rows, of which ``size`` are taken in
    random order. A small, unanalysed or filtered table, where the sample came back short,
    is read whole in random order instead.

    Args:
        conn: The connection.
        size: Rows wanted.
        select: ``SELECT <text> AS t, <vector> AS v``.
        table: The table to sample, schema-qualified and quoted.
        rest: Joins and ``WHERE`` clause after the table.
        parameters: Bind parameters of ``rest``.
        alias: The table's alias in ``select`` and ``rest``, if any.

    """
    estimate = conn.execute(
        text("SELECT reltuples FROM pg_class WHERE oid = to_regclass(:name)"), {"name": table}
    ).scalar()
    percent = 100.0 * size * _ROWS_PER_SAMPLED_ROW / estimate if estimate and estimate > 0 else 100
    source = f"{table} {alias}".strip()
    limit = {**parameters, "size": size}
    rows: Sequence[Any] = []
    if percent < 100:
        # A float computed here, not user input; TABLESAMPLE takes no bind parameter.
        sampled = f"{source} TABLESAMPLE BERNOULLI ({percent:.6f})"
        rows = conn.execute(text(_sample_query(select, sampled, rest)), limit).all()
    if len(rows) < size:
        rows = conn.execute(text(_sample_query(select, source, rest)), limit).all()
    return [("" if t is None else str(t), json.loads(v)) for t, v in rows]


def _sample_query(select: str, source: str, rest: str) -> str:
    # The vectors are cast to text for the chosen rows only, not for every row scanned.
    return (
        f"SELECT t, v::text FROM ({select} FROM {source} {rest} ORDER BY random() "
        "LIMIT :size) AS sampled"
    )


def _column_type(conn: Connection, schema: str, table: str, column: str) -> str | None:
    return conn.execute(
        text(
            "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
            "JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = :schema AND c.relname = :table AND a.attname = :column "
            "AND NOT a.attisdropped"
        ),
        {"schema": schema, "table": table, "column": column},
    ).scalar()


@contextmanager
def transaction(bind: Bind) -> Iterator[Connection]:
    """A connection inside a transaction that commits on success and rolls back on error.

    A :class:`Connection` already in a transaction is used as is (its owner commits).
    """
    if isinstance(bind, Connection):
        if bind.in_transaction():
            yield bind
        else:
            with bind.begin():
                yield bind
    elif isinstance(bind, Engine):
        with bind.begin() as conn:
            yield conn
    else:
        from adapted_embeddings.postgres.server import sqlalchemy_url

        engine = create_engine(sqlalchemy_url(bind))
        try:
            with engine.begin() as conn:
                yield conn
        finally:
            engine.dispose()


def vector_width(bind: Bind, target: Target) -> int | None:
    """Declared width ``N`` of the target's ``vector(N)`` column; ``None`` if unconstrained.

    Raises:
        ConfigurationError: If the table or its vector column does not exist, or the
            column is not a pgvector ``vector``/``halfvec``.

    """
    with transaction(bind) as conn:
        return _declared_width(conn, target)


def _declared_width(conn: Connection, target: Target) -> int | None:
    column_type = target.column_type(conn)
    if column_type is None:
        raise ConfigurationError(f"{target.describe()}: no vector column found")
    match = _WIDTH.match(column_type)
    if match is None:
        raise ConfigurationError(
            f"{target.describe()}: the vector column is {column_type}, not a pgvector vector"
        )
    return int(match[1]) if match[1] else None


def recorded_space(bind: Bind, target: Target) -> EmbeddingSpace | None:
    """The space recorded for ``target``, or ``None`` if none was ever recorded."""
    with transaction(bind) as conn:
        recorded = target.read(conn)
    return EmbeddingSpace.parse(recorded) if recorded else None


def open_space(bind: Bind, target: Target, space: EmbeddingSpace | str) -> bool:
    """Check ``target`` against ``space`` before a store uses it; record it if new.

    1. A recorded space must equal ``space``.
    2. The declared width of the vector column must be ``space.dimensions`` (an
       unconstrained ``vector`` column is accepted; widths are then checked per vector).
    3. No recorded space and no rows: ``space`` is recorded now.
    4. No recorded space but rows: an :class:`UnrecordedSpaceWarning` says how to check and
       stamp it; the store stays usable, but nothing vouches for the stored vectors.

    Returns:
        Whether the target's space is recorded (and equal to ``space``) afterwards.

    Raises:
        SpaceMismatchError: If the column width or the recorded space differ from ``space``.
        ConfigurationError: If the target has no pgvector column.

    """
    space = EmbeddingSpace.parse(space)
    with transaction(bind) as conn:
        recorded = target.read(conn)
        if recorded is not None:  # the most telling message first: both spaces by name
            ensure_same_space(recorded, space, what=f"vectors to use with {target.describe()}")
        width = _declared_width(conn, target)
        if width is not None and width != space.dimensions:
            raise SpaceMismatchError(
                f"{target.describe()} stores vector({width}) but space {space.id} has "
                f"{space.dimensions} dimensions"
            )
        if recorded is None and target.row_count(conn) == 0:
            target.write(conn, space)
            recorded = target.read(conn)  # another writer may have been first
        if recorded is not None:
            ensure_same_space(recorded, space, what=f"vectors to use with {target.describe()}")
            return True
        rows = target.row_count(conn)
    warnings.warn(
        f"{target.describe()} holds {rows} vectors but no recorded embedding space; they are "
        f"assumed to be in {space.id}, which nothing has checked. Run check_space(...) and, if "
        "it passes, stamp_space(...) to record it (adapted_embeddings.postgres).",
        UnrecordedSpaceWarning,
        stacklevel=3,
    )
    return False


def embedding_space_of(embeddings: Any) -> EmbeddingSpace:
    """The space of an embedder: its ``.space`` (``AdaptedEmbeddings`` of either framework).

    Raises:
        ConfigurationError: If the embedder does not say its space; pass ``space=`` then.

    """
    space = getattr(embeddings, "space", None)
    if isinstance(space, EmbeddingSpace | str):
        return EmbeddingSpace.parse(space)
    raise ConfigurationError(
        f"{type(embeddings).__name__} does not say which embedding space it produces; pass "
        "space='provider/model@dimensions' (e.g. 'openai/text-embedding-ada-002@1536')"
    )


class SpaceGuard(BaseModel):
    """The space a store was opened for; checks embedders and raw vectors before SQL runs.

    Both integrations hold one and call it on every add and every query.
    """

    model_config = ConfigDict(frozen=True)

    space: EmbeddingSpace = Field(description="The space recorded with the table.")
    target: TableTarget | CollectionTarget = Field(description="Where it is recorded.")

    def check_embedder(self, embeddings: Any, *, what: str = "the embedder's vectors") -> None:
        """Raise :class:`SpaceMismatchError` unless ``embeddings`` produces this space."""
        ensure_same_space(self.space, embedding_space_of(embeddings), what=what)

    def check_space(self, space: EmbeddingSpace | str | None, *, what: str) -> None:
        """Raise unless ``space`` (when given) is this space."""
        if space is not None:
            ensure_same_space(self.space, space, what=what)

    def check_vectors(self, vectors: Sequence[Sequence[float]] | np.ndarray, *, what: str) -> None:
        """Raise :class:`SpaceMismatchError` for a vector of another width, before any SQL.

        Raises:
            SpaceMismatchError: If a vector is not ``space.dimensions`` long.
            InvalidVectorError: If a vector holds NaN or Inf.

        """
        if isinstance(vectors, np.ndarray):
            self.space.check_vectors(vectors, what=f"{what} for {self.target.describe()}")
            return
        for position, vector in enumerate(vectors):
            if len(vector) != self.space.dimensions:
                raise SpaceMismatchError(
                    f"{what} for {self.target.describe()}: vector {position} has {len(vector)} "
                    f"dimensions but space {self.space.id} has {self.space.dimensions}"
                )
        if len(vectors):
            flat = np.fromiter(
                itertools.chain.from_iterable(vectors),
                dtype=np.float32,
                count=len(vectors) * self.space.dimensions,
            )
            self.space.check_vectors(flat.reshape(len(vectors), -1), what=what)


class SpaceCheck(BaseModel):
    """What :func:`check_space` found: whether the stored vectors look like ``space``'s."""

    target: TableTarget | CollectionTarget = Field(description="What was checked.")
    space: EmbeddingSpace = Field(description="The space the stored vectors were compared with.")
    declared_width: int | None = Field(description="N of the column's vector(N), None if free.")
    stored_widths: list[int] = Field(description="Distinct widths among the sampled vectors.")
    rows_checked: int = Field(description="Stored rows re-embedded and compared.")
    rows_failing: int = Field(
        default=0,
        description="Sampled rows whose vector is not closer to its own text's new vector "
        "than to other texts' by min_margin: rows that are not in `space`.",
    )
    paired_cosine: float | None = Field(
        description="Mean cosine of each stored vector to the embedder's vector of its own text."
    )
    baseline_cosine: float | None = Field(
        description="Mean cosine of stored vectors to the embedder's vectors of other texts."
    )
    passed: bool = Field(description="Whether the stored vectors are in `space`.")
    reason: str = Field(description="Why the check passed or failed, in one sentence.")

    @property
    def failing_share(self) -> float | None:
        """Share of the sampled rows that are not in ``space`` (None if none were compared)."""
        return self.rows_failing / self.rows_checked if self.rows_checked else None

    @property
    def mixed(self) -> bool:
        """Whether some sampled rows are in ``space`` and others are not."""
        return 0 < self.rows_failing < self.rows_checked


def check_space(
    bind: Bind,
    target: Target,
    embeddings: Any,
    *,
    space: EmbeddingSpace | str | None = None,
    sample: int = 32,
    min_margin: float = 0.05,
    max_failing_share: float = 0.0,
) -> SpaceCheck:
    """Check that the vectors stored in ``target`` live in the embedder's space.

    Up to ``sample`` stored rows, drawn at random from the whole table (not its oldest
    rows), are embedded again with ``embeddings``. In the same space a stored vector is
    much closer to the new vector of *its own* text than to those of other texts; in
    another space of the same width (another model, another basis) it is not. Each sampled
    row is judged on its own: it fails when its paired cosine exceeds its mean cosine to
    the other texts' new vectors by less than ``min_margin``. The check passes when every
    sampled vector has the space's width and at most ``max_failing_share`` of the sampled
    rows fail; a table of which some rows pass and others fail mixes spaces, and
    :func:`stamp_space` refuses it with :class:`MixedSpaceError`.

    Args:
        bind: Engine, connection or URL.
        target: The table or collection.
        embeddings: A LangChain ``Embeddings`` or a LlamaIndex embedding model.
        space: The space to check for; defaults to the embedder's ``.space``.
        sample: How many stored rows to compare.
        min_margin: Paired minus baseline cosine a row needs to count as in the space
            (ada-002 vectors of Jeopardy questions against the bundled adapter: 0.11 at the
            least, 0.16 typically; the same vectors in another basis: below 0.05).
        max_failing_share: Share of sampled rows allowed to fail; 0 refuses any.

    """
    space = EmbeddingSpace.parse(space) if space is not None else embedding_space_of(embeddings)
    with transaction(bind) as conn:
        declared = _declared_width(conn, target)
        rows = target.sample(conn, sample)
    widths = sorted({len(vector) for _, vector in rows})
    report: dict[str, Any] = {
        "target": target,
        "space": space,
        "declared_width": declared,
        "stored_widths": widths,
        "rows_checked": 0,
        "paired_cosine": None,
        "baseline_cosine": None,
    }
    if declared is not None and declared != space.dimensions:
        reason = f"the column is vector({declared}), the space has {space.dimensions} dimensions"
        return SpaceCheck(**report, passed=False, reason=reason)
    if widths and widths != [space.dimensions]:
        reason = f"stored vectors have widths {widths}, the space has {space.dimensions}"
        return SpaceCheck(**report, passed=False, reason=reason)
    if len(rows) < 2:
        reason = f"only {len(rows)} stored rows; at least 2 are needed to compare"
        return SpaceCheck(**report, passed=False, reason=reason)
    stored = _unit(np.asarray([vector for _, vector in rows], dtype=np.float64))
    fresh = _unit(np.asarray(_embed_texts(embeddings, [t for t, _ in rows]), dtype=np.float64))
    if fresh.shape != stored.shape:
        reason = f"the embedder returned {fresh.shape[1]}-d vectors for {space.id}"
        return SpaceCheck(**report, passed=False, reason=reason)
    cosines = stored @ fresh.T  # row i: stored vector i against every text's new vector
    paired = np.diag(cosines)
    baseline = (cosines.sum(axis=1) - paired) / (len(rows) - 1)
    failing = int(np.count_nonzero(paired - baseline < min_margin))
    report.update(
        rows_checked=len(rows),
        rows_failing=failing,
        paired_cosine=float(paired.mean()),
        baseline_cosine=float(baseline.mean()),
    )
    margin = float(paired.mean() - baseline.mean())
    closer = (
        f"{margin:+.3f} closer to their own texts' {space.id} vectors than to other texts' "
        f"(needed {min_margin:+.3f} a row)"
    )
    if failing == 0:
        reason = f"all {len(rows)} sampled rows are in {space.id}: on average {closer}"
    elif failing == len(rows):
        reason = f"none of the {len(rows)} sampled rows is in {space.id}: on average {closer}"
    else:
        reason = (
            f"{failing} of {len(rows)} sampled rows ({failing / len(rows):.0%}) are not in "
            f"{space.id} and the others are: the stored vectors mix spaces"
        )
    passed = failing <= max_failing_share * len(rows)
    return SpaceCheck(**report, passed=passed, reason=reason)


def stamp_space(bind: Bind, target: Target, check: SpaceCheck) -> None:
    """Record ``check.space`` for ``target`` after :func:`check_space` passed.

    Raises:
        MixedSpaceError: If the check failed because some sampled rows were in the space and
            others were not (the message names the table and the share that were not).
        SpaceMismatchError: If the check failed otherwise, or another space is already
            recorded.
        ConfigurationError: If ``check`` was made for another target.

    """
    if check.target != target:
        raise ConfigurationError(
            f"the check was made for {check.target.describe()}, not {target.describe()}"
        )
    if not check.passed and check.mixed:
        share = check.failing_share or 0.0
        raise MixedSpaceError(
            f"refusing to stamp {target.describe()} as {check.space.id}: {check.rows_failing} "
            f"of the {check.rows_checked} rows sampled across it ({share:.0%}) are not in that "
            "space and the others are, so it mixes spaces; re-embed the rows that are not",
            target=target.describe(),
            failing_share=share,
        )
    if not check.passed:
        raise SpaceMismatchError(
            f"refusing to stamp {target.describe()} as {check.space.id}: {check.reason}"
        )
    with transaction(bind) as conn:
        recorded = target.read(conn)
        if recorded is not None:
            what = f"the space to stamp on {target.describe()}"
            ensure_same_space(recorded, check.space, what=what)
            return
        target.write(conn, check.space)


def _unit(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms == 0, 1.0, norms)


def _embed_texts(embeddings: Any, texts: list[str]) -> list[list[float]]:
    if hasattr(embeddings, "embed_documents"):  # LangChain
        return list(embeddings.embed_documents(texts))
    if hasattr(embeddings, "get_text_embedding_batch"):  # LlamaIndex
        return list(embeddings.get_text_embedding_batch(texts))
    raise ConfigurationError(
        f"{type(embeddings).__name__} is neither a LangChain Embeddings nor a LlamaIndex "
        "embedding model"
    )
