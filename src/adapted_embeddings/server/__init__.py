"""``adapted-embeddings serve``: the pipeline behind an OpenAI-compatible ``/v1/embeddings``.

Importing this package needs the ``serve`` extra (FastAPI and uvicorn); without it a
:class:`~adapted_embeddings.errors.MissingExtraError` names the pip line to run.

Example:
    .. code-block:: python

        import uvicorn
        from adapted_embeddings.server import ServerSettings, create_app

        app = create_app(ServerSettings(), mode="local")
        uvicorn.run(app, host="127.0.0.1", port=8000)

"""

from adapted_embeddings.extras import require

for _module in ("fastapi", "uvicorn", "orjson"):
    require(_module, "serve", needed_for="adapted_embeddings.server")

from adapted_embeddings.server.app import create_app, create_app_from_environment  # noqa: E402
from adapted_embeddings.server.config import ServerSettings  # noqa: E402

__all__ = ["ServerSettings", "create_app", "create_app_from_environment"]
