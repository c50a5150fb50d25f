"""Import an optional package, or say which extra installs it."""

from __future__ import annotations

import importlib
from types import ModuleType

from adapted_embeddings.errors import ConfigurationError

PGVECTOR_EXTRA = "pgvector"
LLAMA_INDEX_POSTGRES_EXTRA = "llama-index-postgres"


def require(module: str, extra: str, *, what: str) -> ModuleType:
    """Import ``module`` or raise :class:`ConfigurationError` naming ``pip install ...[extra]``.

    Args:
        module: Dotted module name, e.g. ``"langchain_postgres"``.
        extra: The package extra that installs it, e.g. ``"pgvector"``.
        what: What needs it, for the message (e.g. ``"SpaceCheckedPGVector"``).

    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ConfigurationError(
            f"{what} needs the {module.split('.')[0]!r} package, which is not installed: "
            f"pip install 'adapted-embeddings[{extra}]'"
        ) from error
