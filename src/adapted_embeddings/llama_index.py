"""LlamaIndex integration: ``Settings.embed_model = AdaptedEmbeddings(...)``.

Example:
    .. code-block:: python

        from llama_index.core import Settings, VectorStoreIndex
        from adapted_embeddings.llama_index import AdaptedEmbeddings

        Settings.embed_model = AdaptedEmbeddings(model="text-embedding-ada-002", mode="local")
        index = VectorStoreIndex.from_documents(documents)

"""

from __future__ import annotations

from typing import Any

from adapted_embeddings.extras import require

require(
    "llama_index.core",
    "llama-index",
    needed_for="adapted_embeddings.llama_index",
    package="llama-index-core",
)

from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding  # noqa: E402
from pydantic import ConfigDict, Field  # noqa: E402

from adapted_embeddings.factory import PipelineOptions  # noqa: E402


class AdaptedEmbeddings(BaseEmbedding, PipelineOptions):
    """LlamaIndex embedding model: local adapter first, provider fallback when unsure.

    Takes the same keywords as the LangChain integration
    (:class:`adapted_embeddings.langchain.AdaptedEmbeddings`); ``model_name`` reports the
    target model, so LlamaIndex shows which space the vectors live in.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

    embed_batch_size: int = Field(
        default=512,
        gt=0,
        le=2048,
        description="Texts per call into the pipeline. Larger than LlamaIndex's default of "
        "10 because the pipeline batches local encoding and provider requests itself.",
    )

    def __init__(self, **data: Any) -> None:
        """Build the pipeline from keywords and settings (see ``PipelineOptions``)."""
        super().__init__(**data)
        self._pipeline = self.build_pipeline()
        self.model_name = self._pipeline.space.model

    @classmethod
    def class_name(cls) -> str:
        """Stable name LlamaIndex uses when serialising this component."""
        return "AdaptedEmbeddings"

    def _get_query_embedding(self, query: str) -> Embedding:
        return self._pipeline.embed([query], "query")[0].vector.tolist()

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return (await self._pipeline.aembed([query], "query"))[0].vector.tolist()

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._pipeline.embed([text], "document")[0].vector.tolist()

    async def _aget_text_embedding(self, text: str) -> Embedding:
        return (await self._pipeline.aembed([text], "document"))[0].vector.tolist()

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return [r.vector.tolist() for r in self._pipeline.embed(texts, "document")]

    async def _aget_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return [r.vector.tolist() for r in await self._pipeline.aembed(texts, "document")]
