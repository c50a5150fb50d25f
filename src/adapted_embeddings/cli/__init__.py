"""The ``adapted-embeddings`` command line. Only parsing and printing live here.

Every command is a thin shell over the library: the same settings (``ADAPTED_EMBEDDINGS_*``,
``.env``), the same pipeline, the same errors.
"""

from adapted_embeddings.extras import exit_unless_cli_installed

exit_unless_cli_installed()  # without typer: the pip line, not a traceback

from adapted_embeddings.cli import (  # noqa: F401, E402  (importing registers the commands)
    adapter_commands,
    dataset_command,
    embed_command,
    learning_commands,
    report_command,
    serve_command,
    system_commands,
    training_commands,
)
from adapted_embeddings.cli.app import app, main  # noqa: E402

__all__ = ["app", "main"]
