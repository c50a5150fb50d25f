"""04: Migration. An ada-002 corpus in SQLite, queried from a local model; mixed spaces refused.

Every row stores its vector *and* the space it lives in (provider, model, dimensions), as an
architecture decision record would require. New queries and new documents are embedded by
the local model through the adapter, so nothing is re-embedded and OpenAI is not called.
Two deliberate mistakes then show that a space mismatch fails loudly instead of returning
plausible-looking nonsense:

1. querying with the raw local model's vectors (384-d MiniLM) instead of the adapter's;
2. a row written by a different model of the *same width* (text-embedding-3-small, 1536-d),
   where nothing but the stored metadata can tell the vectors apart.

Needs:  pip install 'adapted-embeddings[langchain,train]'
Run:  python cookbook/04_sqlite_migration.py            (2,000 rows, ~20 s)
      python cookbook/04_sqlite_migration.py --rows 8000 --db corpus.sqlite
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile
from pathlib import Path

import numpy as np

from adapted_embeddings import EmbeddingSpace, SpaceMismatchError, ensure_same_space
from adapted_embeddings.langchain import AdaptedEmbeddings
from adapted_embeddings.spaces import OPENAI_ADA_002
from adapted_embeddings.training.corpora import TEST_MODULUS, load_jeopardy

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    id          INTEGER PRIMARY KEY,
    text        TEXT    NOT NULL,
    provider    TEXT    NOT NULL,   -- who computed the vector's space, e.g. 'openai'
    model       TEXT    NOT NULL,   -- e.g. 'text-embedding-ada-002'
    dimensions  INTEGER NOT NULL,
    made_by     TEXT    NOT NULL,   -- provenance: 'openai' or the adapter that translated it
    vector      BLOB    NOT NULL    -- little-endian float32
)
"""


def insert(
    db: sqlite3.Connection, texts: list[str], vectors: np.ndarray, space: EmbeddingSpace, by: str
) -> None:
    space.check_vectors(vectors, what="vectors to store")
    db.executemany(
        "INSERT INTO documents (text, provider, model, dimensions, made_by, vector) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        [
            (t, space.provider, space.model, space.dimensions, by, v.astype("<f4").tobytes())
            for t, v in zip(texts, vectors, strict=True)
        ],
    )
    db.commit()


def corpus_space(db: sqlite3.Connection) -> EmbeddingSpace:
    """The one space every stored vector lives in; a mixed table is refused."""
    spaces = db.execute("SELECT DISTINCT provider, model, dimensions FROM documents").fetchall()
    if len(spaces) != 1:
        found = ", ".join(
            EmbeddingSpace(provider=p, model=m, dimensions=d).id for p, m, d in spaces
        )
        raise SpaceMismatchError(
            f"the documents table mixes {len(spaces)} embedding spaces ({found}); "
            "vectors from different spaces cannot be searched together"
        )
    provider, model, dimensions = spaces[0]
    return EmbeddingSpace(provider=provider, model=model, dimensions=dimensions)


def search(
    db: sqlite3.Connection, query: np.ndarray, query_space: EmbeddingSpace, k: int = 3
) -> list[tuple[float, str]]:
    """Cosine top-k, after checking the query lives in the corpus's space."""
    ensure_same_space(corpus_space(db), query_space, what="query vectors")
    rows = db.execute("SELECT text, vector FROM documents").fetchall()
    matrix = np.stack([np.frombuffer(blob, dtype="<f4") for _, blob in rows])
    scores = matrix @ (query / np.linalg.norm(query))
    best = np.argsort(-scores)[:k]
    return [(float(scores[i]), rows[i][0]) for i in best]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2000, help="corpus rows to store")
    parser.add_argument(
        "--db", type=Path, default=None, help="SQLite file to (re)create (default: a temporary one)"
    )
    args = parser.parse_args()

    corpus = load_jeopardy()
    index = np.arange(len(corpus))
    stored_rows = index[index % TEST_MODULUS != 0][: args.rows]
    held_out = index[index % TEST_MODULUS == 0][:3]

    with tempfile.TemporaryDirectory() as scratch:
        path = args.db or Path(scratch) / "corpus.sqlite"
        db = sqlite3.connect(path)
        db.executescript(SCHEMA)
        db.execute("DELETE FROM documents")
        insert(
            db,
            [corpus.texts[i] for i in stored_rows],
            corpus.ada[stored_rows],
            OPENAI_ADA_002,
            "openai",
        )
        print(f"stored {len(stored_rows)} documents with their ada-002 vectors in {path.name}")
        print(f"corpus space: {corpus_space(db).id}\n")

        embeddings = AdaptedEmbeddings(model="text-embedding-ada-002", mode="local")
        adapter = embeddings.pipeline.adapter
        print(
            f"queries: local {adapter.source.id} -> adapter {adapter.name} -> {adapter.target.id}"
        )
        for row in held_out:
            result = embeddings.embed_with_info([corpus.texts[row]], role="query")[0]
            print(f"\nquery  {corpus.texts[row][:90]}  (confidence {result.confidence:.2f})")
            for score, text in search(db, result.vector, result.space):
                print(f"  {score:.3f}  {text[:90]}")

        new_docs = [
            "jeopardy question the mariana trench this ocean holds the deepest point on earth",
            "jeopardy question marie curie first person to win nobel prizes in two sciences",
        ]
        new = embeddings.embed_with_info(new_docs, role="document")
        insert(
            db, new_docs, np.stack([r.vector for r in new]), new[0].space, f"adapter:{adapter.id}"
        )
        space = corpus_space(db).id
        print(f"\nadded {len(new_docs)} new documents embedded locally; space still {space}")

        print("\n== deliberate mistake 1: query with the raw local model's vectors")
        encoder = embeddings.pipeline.encoder
        raw = encoder.encode([corpus.texts[held_out[0]]])[0]
        mistakes_caught = 0
        try:
            search(db, raw, encoder.space)
        except SpaceMismatchError as exc:
            mistakes_caught += 1
            print(f"SpaceMismatchError: {exc}")

        print("\n== deliberate mistake 2: a row from another model of the same width")
        other = EmbeddingSpace(provider="openai", model="text-embedding-3-small", dimensions=1536)
        insert(db, ["a document embedded by a newer model"], corpus.ada[:1], other, "openai")
        try:
            search(db, new[0].vector, new[0].space)
        except SpaceMismatchError as exc:
            mistakes_caught += 1
            print(f"SpaceMismatchError: {exc}")
        db.close()

    if mistakes_caught != 2:
        print("a space mismatch went undetected", file=sys.stderr)
        return 1
    print("\nboth mistakes were refused before any similarity was computed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
