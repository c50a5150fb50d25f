"""Small shared vocabularies: the role a text plays and the route its vector took."""

from __future__ import annotations

from typing import Literal

Role = Literal["query", "document"]
"""What a text is for. Local results are cached per role; providers embed both the same way."""

ROLES: tuple[Role, ...] = ("query", "document")

Route = Literal["cache", "local", "provider", "local_degraded"]
"""How a returned vector was obtained (see ``EmbeddingResult`` in :mod:`.pipeline`)."""
