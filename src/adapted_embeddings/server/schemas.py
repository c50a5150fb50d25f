"""Request and response bodies, in exactly the shape of OpenAI's embeddings API.

Fields OpenAI does not have are marked *extension*; OpenAI's SDKs keep them on the parsed
objects (``item.model_extra``) and every other client ignores them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

EncodingFormat = Literal["float", "base64"]
InputType = Literal["query", "document"]


class EmbeddingRequest(BaseModel):
    """``POST /v1/embeddings`` body. Unknown fields are ignored, as most servers do."""

    model_config = ConfigDict(extra="ignore", strict=True, protected_namespaces=())

    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="A string, an array of strings, an array of cl100k token ids, or an "
        "array of such arrays; at most 2,048 inputs, none empty."
    )
    model: str = Field(description="The model name or space id the server serves.")
    encoding_format: EncodingFormat | None = Field(
        default=None, description="'float' (default) or 'base64' (little-endian float32)."
    )
    dimensions: int | None = Field(
        default=None, description="Must equal the served space's width when given."
    )
    user: str | None = Field(default=None, description="End-user id; accepted and not stored.")
    input_type: InputType | None = Field(
        default=None,
        description="Extension: 'query' or 'document' (default), the pipeline's role. The "
        "X-Embedding-Role header does the same for clients that cannot add body fields.",
    )


class EmbeddingItem(BaseModel):
    """One vector of the response, in input order."""

    object: Literal["embedding"] = Field(default="embedding", description="Always 'embedding'.")
    index: int = Field(description="Position of the input this vector belongs to.")
    embedding: list[float] | str = Field(
        description="The vector: floats, or base64 of little-endian float32 values."
    )
    route: str = Field(description="Extension: 'cache', 'local', 'provider' or 'local_degraded'.")
    confidence: float | None = Field(
        description="Extension: the adapter's confidence in [0, 1], null when not scored."
    )
    audited: bool = Field(
        description="Extension: true when a text the gate would have kept local was sent to "
        "the provider to audit the adapter (the vector is then the provider's)."
    )
    adapter: str | None = Field(
        default=None,
        description="Extension: the id (name:hash) of the adapter that made the vector, null "
        "for the provider's vectors.",
    )


class Usage(BaseModel):
    """Token counts, with OpenAI's cl100k tokenizer."""

    prompt_tokens: int = Field(description="cl100k tokens in all inputs.")
    total_tokens: int = Field(description="Same as prompt_tokens for embeddings.")


class EmbeddingResponse(BaseModel):
    """``POST /v1/embeddings`` answer."""

    object: Literal["list"] = Field(default="list", description="Always 'list'.")
    data: list[EmbeddingItem] = Field(description="One item per input, in input order.")
    model: str = Field(description="The served model's name.")
    usage: Usage = Field(description="Token counts.")


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models``."""

    model_config = ConfigDict(protected_namespaces=())

    id: str = Field(description="The model name to send as 'model'.")
    object: Literal["model"] = Field(default="model", description="Always 'model'.")
    created: int = Field(description="Unix time the server started.")
    owned_by: str = Field(description="The provider whose space the vectors are in.")
    space: str = Field(description="Extension: the embedding space id.")
    dimensions: int = Field(description="Extension: the vector width.")


class ModelList(BaseModel):
    """``GET /v1/models`` answer: the one model this server serves."""

    object: Literal["list"] = Field(default="list", description="Always 'list'.")
    data: list[ModelCard] = Field(description="The served model.")


class ErrorDetail(BaseModel):
    """What went wrong, in OpenAI's words."""

    message: str = Field(description="Human-readable explanation.")
    type: str = Field(description="e.g. 'invalid_request_error', 'server_error'.")
    param: str | None = Field(default=None, description="The request field at fault.")
    code: str | None = Field(default=None, description="e.g. 'model_not_found'.")


class ErrorResponse(BaseModel):
    """Every error body: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail = Field(description="The error.")
