"""``serve``: the pipeline behind an OpenAI-compatible ``/v1/embeddings`` (extra ``serve``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from adapted_embeddings.cli.adapter_commands import adapter_location
from adapted_embeddings.cli.app import app, handle_errors
from adapted_embeddings.cli.embed_command import CLI_HINT, ModeChoice
from adapted_embeddings.errors import ConfigurationError

WORKER_HEALTHCHECK_SECONDS = 60


@app.command("serve")
@handle_errors
def serve_command(
    host: Annotated[
        str | None,
        typer.Option(
            help="Interface to bind (default 127.0.0.1). Beyond loopback a key is needed."
        ),
    ] = None,
    port: Annotated[int | None, typer.Option(help="TCP port (default 8000).")] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            help="Bearer token clients must send. Prefer ADAPTED_EMBEDDINGS_SERVER_API_KEY: "
            "options show in the process list."
        ),
    ] = None,
    no_auth: Annotated[
        bool, typer.Option("--no-auth", help="Serve a non-loopback host without a token.")
    ] = False,
    workers: Annotated[
        int | None,
        typer.Option(min=1, help="Worker processes, each with its own pipeline (default 1)."),
    ] = None,
    source: Annotated[
        str | None, typer.Option(help="Local model (default: all-MiniLM-L6-v2).")
    ] = None,
    target: Annotated[
        str | None, typer.Option(help="Target model or space id (default: text-embedding-ada-002).")
    ] = None,
    flavor: Annotated[str | None, typer.Option(help="Adapter flavor, e.g. mlp.")] = None,
    adapter: Annotated[
        str | None, typer.Option(help="Adapter name or directory, instead of a lookup.")
    ] = None,
    mode: Annotated[
        ModeChoice | None,
        typer.Option("--mode", "-m", help="hybrid (default), local or provider."),
    ] = None,
    query_threshold: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="Confidence to keep a local query vector."),
    ] = None,
    document_threshold: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="Confidence to keep a local document vector."),
    ] = None,
    base_url: Annotated[
        str | None,
        typer.Option(help="Upstream OpenAI-compatible URL; its key is read from OPENAI_API_KEY."),
    ] = None,
    on_provider_error: Annotated[
        str | None,
        typer.Option(help="'raise' (answer 502) or 'local' (serve the adapter's vectors)."),
    ] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Embedding cache directory.")] = None,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Neither read nor write the cache.")
    ] = False,
    max_concurrent_requests: Annotated[
        int | None, typer.Option(min=1, help="Requests in progress before 429 (default 64).")
    ] = None,
    graceful_timeout: Annotated[
        float | None,
        typer.Option(help="Seconds in-flight requests get to finish on shutdown (default 30)."),
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="uvicorn log level (default info).")] = None,
) -> None:
    """Serve OpenAI's embeddings API (POST /v1/embeddings) from the adapted pipeline.

    Point any OpenAI client at http://HOST:PORT/v1. Settings come from the same
    ADAPTED_EMBEDDINGS_* variables and .env as the library; the server's own from
    ADAPTED_EMBEDDINGS_SERVER_*. Stop it with Ctrl-C or SIGTERM: requests in flight finish.
    """
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from adapted_embeddings.server import ServerSettings, create_app
    from adapted_embeddings.server.app import PIPELINE_KEYWORDS_ENV

    server_values = _given(
        host=host,
        port=port,
        api_key=api_key,
        allow_unauthenticated=True if no_auth else None,
        workers=workers,
        max_concurrent_requests=max_concurrent_requests,
        graceful_shutdown_seconds=graceful_timeout,
        log_level=log_level,
    )
    settings = ServerSettings(**server_values)
    settings.check_exposure()  # before any model is loaded
    keywords = _given(
        source=source,
        target=target,
        flavor=flavor,
        adapter=str(adapter_location(adapter)) if adapter else None,
        mode=mode.value if mode else None,
        query_threshold=query_threshold,
        document_threshold=document_threshold,
        base_url=base_url,
        on_provider_error=on_provider_error,
        cache=False if no_cache else None,
        cache_dir=str(cache_dir) if cache_dir else None,
    )
    import uvicorn

    common: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "timeout_graceful_shutdown": settings.graceful_shutdown_seconds,
    }
    if settings.workers > 1:
        _run_workers(settings, keywords, common, PIPELINE_KEYWORDS_ENV)
        return
    try:
        application = create_app(settings, **keywords)
    except ConfigurationError as exc:
        raise ConfigurationError(str(exc) + "." + CLI_HINT) from exc
    config = uvicorn.Config(application, **common)
    _redact_logs(application.state.pipeline)
    uvicorn.Server(config).run()


def _run_workers(
    settings: Any, keywords: dict[str, Any], common: dict[str, Any], keywords_env: str
) -> None:
    """Hand the settings to ``workers`` processes by environment; each builds its pipeline."""
    import uvicorn

    from adapted_embeddings.datasets import available_cores
    from adapted_embeddings.factory import PipelineOptions
    from adapted_embeddings.provider import require_credentials

    resolved = PipelineOptions(**keywords).resolved_settings()
    if resolved.gate.mode != "local":
        require_credentials(resolved.provider)  # fail here, not once per worker
    os.environ[keywords_env] = json.dumps(keywords)
    if resolved.encoder.threads is None:
        # N workers on the same cores: each takes its share, or their thread pools wait
        # on each other (set encoder.threads to choose otherwise).
        os.environ["ADAPTED_EMBEDDINGS_ENCODER__THREADS"] = str(
            max(1, available_cores() // settings.workers)
        )
    for name, value in settings.model_dump(exclude_unset=True).items():
        secret = getattr(value, "get_secret_value", None)
        os.environ[f"ADAPTED_EMBEDDINGS_SERVER_{name.upper()}"] = str(secret() if secret else value)
    uvicorn.run(
        "adapted_embeddings.server.app:create_app_from_environment",
        factory=True,
        workers=settings.workers,
        # A worker importing torch and loading the model can miss uvicorn's 5 s ping on a
        # busy machine and be killed and restarted over and over; give it a minute.
        timeout_worker_healthcheck=WORKER_HEALTHCHECK_SECONDS,
        **common,
    )


def _redact_logs(pipeline: Any) -> None:
    from adapted_embeddings.server.logs import install_secret_redaction

    key = pipeline.provider.settings.api_key if pipeline.provider is not None else None
    install_secret_redaction([key.get_secret_value()] if key is not None else [])


def _given(**values: Any) -> dict[str, Any]:
    return {name: value for name, value in values.items() if value is not None}
