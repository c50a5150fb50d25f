"""02: LlamaIndex: ``Settings.embed_model = AdaptedEmbeddings(...)``, VectorStoreIndex, retriever.

The index is built by LlamaIndex as usual, from Documents; every node is embedded locally and
translated into OpenAI ada-002's space, so it could later be mixed with, or queried by, real
ada-002 vectors. Because the Jeopardy clues come with the vectors OpenAI returned for them, the
script also reports how close the locally built index is to the one OpenAI would have built.

Needs:  pip install 'adapted-embeddings[llama-index,train]'
Run:  python cookbook/02_llamaindex.py                 (1,000 clues, ~30 s)
      python cookbook/02_llamaindex.py --documents 8000
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from llama_index.core import Document, Settings, VectorStoreIndex

from adapted_embeddings.llama_index import AdaptedEmbeddings
from adapted_embeddings.training.corpora import TEST_MODULUS, load_jeopardy

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--documents", type=int, default=1000, help="clues to index")
    parser.add_argument("--queries", type=int, default=50, help="held-out questions to score")
    args = parser.parse_args()

    # The one line that changes in an existing LlamaIndex application:
    Settings.embed_model = AdaptedEmbeddings(model="text-embedding-ada-002", mode="local")

    corpus = load_jeopardy()
    rows = np.arange(len(corpus))
    doc_rows = rows[rows % TEST_MODULUS != 0][: args.documents]
    query_rows = rows[rows % TEST_MODULUS == 0][: args.queries]
    documents = [
        Document(
            text=corpus.texts[row],
            doc_id=str(row),
            metadata={"category": corpus.categories[row], "answer": corpus.records[row]["Answer"]},
            # Embed the clue exactly as OpenAI saw it, without LlamaIndex's metadata header.
            excluded_embed_metadata_keys=["category", "answer"],
        )
        for row in doc_rows
    ]
    index = VectorStoreIndex.from_documents(documents)
    embed_model = Settings.embed_model
    print(
        f"indexed {len(documents)} Jeopardy clues with {type(embed_model).__name__} "
        f"(model_name={embed_model.model_name!r}, space {embed_model.space.id})"
    )

    # How close is this locally built index to the one OpenAI would have built?
    store = index.vector_store
    local = np.array([store.get(node.node_id) for node in _nodes_by_doc(index, doc_rows)])
    true = corpus.ada[doc_rows]
    mean = corpus.ada[rows % TEST_MODULUS != 0].mean(axis=0)
    cosine = np.einsum("ij,ij->i", local, true)
    centred = np.einsum("ij,ij->i", local - mean, true - mean) / (
        np.linalg.norm(local - mean, axis=1) * np.linalg.norm(true - mean, axis=1)
    )
    print(
        f"document vectors vs the real ada-002 ones: cosine {cosine.mean():.3f}, "
        f"centred cosine {centred.mean():.3f} (mean over {len(doc_rows)})\n"
    )

    retriever = index.as_retriever(similarity_top_k=3)
    same_category = []
    for n, row in enumerate(query_rows):
        question = str(corpus.records[row]["Question"])
        hits = retriever.retrieve(question)
        same_category.append(
            np.mean([hit.node.metadata["category"] == corpus.categories[row] for hit in hits])
        )
        if n < 3:
            print(f"Q [{corpus.categories[row]}] {question}")
            for hit in hits:
                meta = hit.node.metadata
                print(f"  {hit.score:.3f}  [{meta['category']}] answer: {meta['answer']}")
            print()
    stats = embed_model.stats()
    print(
        f"retrieved clues in the question's category: {np.mean(same_category):.0%} "
        f"(top-3, {len(query_rows)} held-out questions)"
    )
    print(
        f"embedding calls: {stats.local} local, {stats.provider} provider, "
        f"{stats.cache_hits} from cache"
    )


def _nodes_by_doc(index: VectorStoreIndex, doc_rows: np.ndarray) -> list:
    """The node of each document (one short clue = one node), in ``doc_rows`` order."""
    by_doc = {node.ref_doc_id: node for node in index.docstore.docs.values()}
    return [by_doc[str(row)] for row in doc_rows]


if __name__ == "__main__":
    main()
