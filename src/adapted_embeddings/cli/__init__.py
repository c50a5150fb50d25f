"""The ``adapted-embeddings`` command line. Only parsing and printing live here.

Every command is a thin shell over the library: the same settings (``ADAPTED_EMBEDDINGS_*``,
``.env``), the same pipeline, the same errors.
"""

from adapted_embeddings.cli import (  # noqa: F401  (importing registers the commands)
    adapter_commands,
    embed_command,
    system_commands,
    training_commands,
)
from adapted_embeddings.cli.app import app, main

__all__ = ["app", "main"]
