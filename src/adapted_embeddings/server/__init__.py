"""``adapted-embeddings serve``: the pipeline behind an OpenAI-compatible ``/v1/embeddings``.

Importing this package needs the ``serve`` extra (FastAPI and uvicorn); without it a
:class:`~adapted_embeddings.errors.ConfigurationError` names the pip line to run.

Example:
    .. code-block:: python

        import uvicorn
        from adapted_embeddings.server import ServerSettings, create_app

        app = create_app(ServerSettings(), mode="local")
        uvicorn.run(app, host="127.0.0.1", port=8000)

"""

from adapted_embeddings.errors import ConfigurationError

try:
    import fastapi  # noqa: F401
    import orjson  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as exc:
    raise ConfigurationError(
        f"the server needs FastAPI and uvicorn ({exc.name} is missing): "
        "pip install 'adapted-embeddings[serve]'"
    ) from exc

from adapted_embeddings.server.app import create_app, create_app_from_environment
from adapted_embeddings.server.config import ServerSettings

__all__ = ["ServerSettings", "create_app", "create_app_from_environment"]
