"""LangChain integration: a drop-in replacement for ``OpenAIEmbeddings``.

Example:
    .. code-block:: python

        from adapted_embeddings.langchain import AdaptedEmbeddings

        embeddings = AdaptedEmbeddings(model="text-embedding-ada-002")  # was OpenAIEmbeddings
        vector = embeddings.embed_query("What is the capital of France?")

"""

from __future__ import annotations

from typing import Any

from adapted_embeddings.extras import require

require(
    "langchain_core",
    "langchain",
    needed_for="adapted_embeddings.langchain",
    package="langchain-core",
)

from langchain_core.embeddings import Embeddings  # noqa: E402  (after the check above)
from pydantic import ConfigDict  # noqa: E402

from adapted_embeddings.factory import PipelineOptions  # noqa: E402


class AdaptedEmbeddings(PipelineOptions, Embeddings):
    """LangChain ``Embeddings`` that embeds locally and falls back to OpenAI when unsure.

    Vectors live in the target provider's space, so they can query an index built with
    ``OpenAIEmbeddings``. Keywords left out are read from
    :class:`~adapted_embeddings.settings.AdaptedEmbeddingsSettings` (environment
    ``ADAPTED_EMBEDDINGS_*``, ``OPENAI_API_KEY``, ``.env``).

    Setup:
        .. code-block:: bash

            pip install adapted-embeddings
            export OPENAI_API_KEY="sk-..."   # or mode="local" to stay offline

    Instantiate:
        .. code-block:: python

            embeddings = AdaptedEmbeddings(model="text-embedding-ada-002", mode="hybrid")

    Embed:
        .. code-block:: python

            embeddings.embed_query("hello")          # list[float], 1536 long
            embeddings.embed_documents(["a", "b"])   # list[list[float]]
            await embeddings.aembed_query("hello")   # native async (AsyncOpenAI)
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, protected_namespaces=())

    def __init__(self, **data: Any) -> None:
        """Validate keywords, then build the pipeline.

        The pipeline is built after validation, not in a validator, so its typed errors
        (``ConfigurationError``, ``AdapterNotFoundError``, ...) reach the caller as they are
        instead of being wrapped in a pydantic ``ValidationError``.
        """
        super().__init__(**data)
        self._pipeline = self.build_pipeline()

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """Embed documents (role ``document``), in input order."""
        return [r.vector.tolist() for r in self._pipeline.embed(texts, "document")]

    def embed_query(self, text: str) -> list[float]:
        """Embed one query (role ``query``)."""
        return self._pipeline.embed([text], "query")[0].vector.tolist()

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        """Async :meth:`embed_documents`, using the async OpenAI client for fallback."""
        return [r.vector.tolist() for r in await self._pipeline.aembed(texts, "document")]

    async def aembed_query(self, text: str) -> list[float]:
        """Async :meth:`embed_query`."""
        return (await self._pipeline.aembed([text], "query"))[0].vector.tolist()
