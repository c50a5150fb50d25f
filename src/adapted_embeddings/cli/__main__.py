"""``python -m adapted_embeddings.cli``: the same as the ``adapted-embeddings`` command."""

from adapted_embeddings.cli import main

main()
