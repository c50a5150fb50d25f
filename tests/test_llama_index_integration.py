"""LlamaIndex: Settings.embed_model, a VectorStoreIndex and its retriever, offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from llama_index.core import Document, Settings, VectorStoreIndex

from adapted_embeddings.langchain import AdaptedEmbeddings as LangChainAdaptedEmbeddings
from adapted_embeddings.llama_index import AdaptedEmbeddings
from adapted_embeddings.spaces import OPENAI_ADA_002


def test_vector_store_index_with_retriever(tmp_path: Path) -> None:
    embed_model = AdaptedEmbeddings(
        model="text-embedding-ada-002", mode="local", cache_dir=tmp_path
    )
    assert embed_model.class_name() == "AdaptedEmbeddings"
    assert embed_model.model_name == "text-embedding-ada-002"
    assert embed_model.space == OPENAI_ADA_002
    # Reading Settings.embed_model would build LlamaIndex's OpenAI default; read the slot.
    previous = Settings._embed_model
    Settings.embed_model = embed_model
    try:
        index = VectorStoreIndex.from_documents(
            [
                Document(text="The Amazon is the largest rainforest on Earth.", doc_id="amazon"),
                Document(text="Beethoven composed nine symphonies.", doc_id="music"),
                Document(text="Mount Everest is the highest mountain.", doc_id="everest"),
            ]
        )
        nodes = index.as_retriever(similarity_top_k=1).retrieve("Who wrote symphonies?")
        assert nodes[0].node.ref_doc_id == "music"
        nodes = index.as_retriever(similarity_top_k=1).retrieve("tallest peak in the world")
        assert nodes[0].node.ref_doc_id == "everest"
    finally:
        Settings._embed_model = previous
    assert embed_model.stats().local >= 5


async def test_hooks_match_the_langchain_integration(tmp_path: Path) -> None:
    options = {"model": "text-embedding-ada-002", "mode": "local", "cache": False}
    llama = AdaptedEmbeddings(**options)
    langchain = LangChainAdaptedEmbeddings(**options)
    texts = ["first document", "second document"]
    np.testing.assert_allclose(llama.get_query_embedding("q"), langchain.embed_query("q"))
    np.testing.assert_allclose(
        llama.get_text_embedding_batch(texts), langchain.embed_documents(texts)
    )
    np.testing.assert_allclose(
        await llama.aget_query_embedding("q"), await langchain.aembed_query("q")
    )
    np.testing.assert_allclose(
        await llama.aget_text_embedding_batch(texts), await langchain.aembed_documents(texts)
    )
