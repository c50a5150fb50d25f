"""``embed``: texts from options, a file or stdin, out as a table or NDJSON."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from adapted_embeddings.cli.adapter_commands import adapter_location
from adapted_embeddings.cli.app import app, fail, handle_errors
from adapted_embeddings.cli.output import (
    PREVIEW_VALUES,
    ndjson_line,
    one_line,
    printable,
    vector_preview,
    vector_values,
)
from adapted_embeddings.errors import ConfigurationError
from adapted_embeddings.io import check_texts, read_text_lines, read_text_records
from adapted_embeddings.settings import AdaptedEmbeddingsSettings, load_settings

CHUNK = 256
"""Texts per pipeline call: output streams, and memory stays flat on long inputs."""


class ModeChoice(str, Enum):
    """Routing modes, as in the library's ``gate.mode`` setting."""

    hybrid = "hybrid"
    local = "local"
    provider = "provider"


class RoleChoice(str, Enum):
    """Whether texts are search queries or documents (separate cache entries, thresholds)."""

    query = "query"
    document = "document"


CLI_HINT = (
    " On the command line: --mode local to stay offline, --base-url URL for an "
    "OpenAI-compatible server, or export OPENAI_API_KEY."
)
"""Appended to the library's missing-credentials message, which names keywords."""


def require_cli_credentials(settings: AdaptedEmbeddingsSettings) -> None:
    """Raise unless the mode in force can reach the provider, naming the CLI's ways out.

    Raises:
        ConfigurationError: The library's message followed by :data:`CLI_HINT`.

    """
    from adapted_embeddings.provider import require_credentials

    if settings.gate.mode == "local":
        return
    try:
        require_credentials(settings.provider)
    except ConfigurationError as exc:
        raise ConfigurationError(f"{exc}.{CLI_HINT}") from None


@app.command("embed")
@handle_errors
def embed_command(
    texts: Annotated[
        list[str] | None,
        typer.Option(
            "--text",
            "-t",
            metavar="TEXT",
            help="Text to embed; repeat for more. Default: stdin lines.",
        ),
    ] = None,
    input_file: Annotated[
        Path | None,
        typer.Option(
            "--input",
            "-i",
            metavar="FILE",
            help="Read texts from a CSV, TSV, JSONL or Parquet file.",
        ),
    ] = None,
    column: Annotated[
        str, typer.Option("--column", "-c", metavar="COLUMN", help="Text column of --input.")
    ] = "text",
    source: Annotated[
        str | None,
        typer.Option(
            metavar="MODEL", help="Local model (default from settings: all-MiniLM-L6-v2)."
        ),
    ] = None,
    target: Annotated[
        str | None,
        typer.Option(
            metavar="MODEL", help="Target model or space id (default: text-embedding-ada-002)."
        ),
    ] = None,
    flavor: Annotated[
        str | None, typer.Option(metavar="FLAVOR", help="Adapter flavor, e.g. mlp.")
    ] = None,
    adapter: Annotated[
        str | None,
        typer.Option(
            metavar="ADAPTER",
            help="Adapter name or directory, instead of a lookup by source/target.",
        ),
    ] = None,
    mode: Annotated[
        ModeChoice | None,
        typer.Option(
            "--mode",
            "-m",
            help="hybrid: local when confident, else provider; local: never call the provider; "
            "provider: always. Default from settings (hybrid), which needs OPENAI_API_KEY or "
            "--base-url.",
        ),
    ] = None,
    role: Annotated[RoleChoice, typer.Option(help="query or document.")] = RoleChoice.document,
    threshold: Annotated[
        float | None,
        typer.Option(
            min=0.0, max=1.0, metavar="0..1", help="Confidence needed to keep a local vector."
        ),
    ] = None,
    base_url: Annotated[
        str | None,
        typer.Option(
            metavar="URL",
            help="OpenAI-compatible provider URL; the key is read from OPENAI_API_KEY.",
        ),
    ] = None,
    cache_dir: Annotated[
        Path | None, typer.Option(metavar="DIR", help="Embedding cache directory.")
    ] = None,
    cache: Annotated[
        bool,
        typer.Option("--cache/--no-cache", help="Read and write the embedding cache."),
    ] = True,
    ndjson: Annotated[
        bool,
        typer.Option(help="One JSON object per line: text, embedding, confidence, route, space."),
    ] = False,
    quality: Annotated[
        bool,
        typer.Option(
            "--quality/--no-quality",
            help="Show each vector's confidence (--no-quality: leave it out; routing still "
            "uses it).",
        ),
    ] = True,
) -> None:
    """Embed texts into the target provider's space.

    Texts come from --text, from --input FILE, or one per line from stdin (blank lines are
    skipped). Confident translations are computed locally; with --mode hybrid the rest go to
    the provider.
    """
    batch = _read_input(texts, input_file, column)
    from adapted_embeddings.factory import PipelineOptions

    settings = load_settings()  # a bad variable is reported as itself, without the hint below
    options = PipelineOptions(
        settings=settings,
        source=source,
        target=target,
        flavor=flavor,
        adapter=adapter_location(adapter) if adapter else None,
        mode=mode.value if mode else None,
        query_threshold=threshold if role is RoleChoice.query else None,
        document_threshold=threshold if role is RoleChoice.document else None,
        base_url=base_url,
        cache=None if cache else False,
        cache_dir=cache_dir,
    )
    # Only a missing key gets the hint: other errors (a cache directory, an adapter) name
    # their own way out.
    require_cli_credentials(options.resolved_settings())
    pipeline = options.build_pipeline()
    if not ndjson:
        adapter_name = pipeline.adapter.name if pipeline.adapter is not None else "none"
        typer.echo(
            printable(
                f"space {pipeline.space.id} · adapter {adapter_name} · "
                f"mode {pipeline.gate.mode} · threshold {pipeline.threshold(role.value):.3f}"
            )
        )
        typer.echo(_table_row("#", "route", "conf", f"first {PREVIEW_VALUES} values", "text"))
    from tqdm import tqdm

    show_progress = None if len(batch) > CHUNK else True  # None: only on a terminal
    with tqdm(total=len(batch), unit="text", file=sys.stderr, disable=show_progress) as progress:
        for start in range(0, len(batch), CHUNK):
            chunk = batch[start : start + CHUNK]
            results = pipeline.embed(chunk, role.value)
            for number, (text, result) in enumerate(zip(chunk, results, strict=True), start + 1):
                if ndjson:
                    record: dict[str, object] = {
                        "text": text,
                        "embedding": vector_values(result.vector),
                    }
                    if quality:
                        record["confidence"] = _rounded(result.confidence)
                    record.update(route=result.route, space=result.space.id)
                    typer.echo(ndjson_line(record))
                else:
                    confidence = _shown(result.confidence) if quality else ""
                    preview = vector_preview(result.vector)
                    typer.echo(_table_row(str(number), result.route, confidence, preview, text))
            progress.update(len(chunk))
    if not ndjson:
        stats = pipeline.stats()
        plural = "" if stats.texts == 1 else "s"
        typer.echo(
            f"{stats.texts} text{plural}: {stats.local} local, {stats.provider} provider, "
            f"{stats.cache_hits} from cache · {pipeline.space.dimensions} dimensions"
        )


def _read_input(texts: list[str] | None, input_file: Path | None, column: str) -> list[str]:
    if texts and input_file is not None:
        raise fail("give either --text or --input, not both")
    if texts:
        return check_texts(texts, what="--text")
    if input_file is not None:
        return read_text_records(input_file, text_column=column).texts
    stdin = typer.get_binary_stream("stdin")
    if stdin.isatty():
        raise fail("nothing to embed: give --text, --input FILE, or pipe lines on stdin")
    return read_text_lines(stdin.read(), source="stdin")


def _rounded(confidence: float | None) -> float | None:
    return None if confidence is None else round(float(confidence), 6)


def _shown(confidence: float | None) -> str:
    return "-" if confidence is None else f"{confidence:.3f}"


def _table_row(number: str, route: str, confidence: str, preview: str, text: str) -> str:
    return f"{number:>4}  {route:<14}  {confidence:<5}  {preview:<37}  {one_line(text, 60)}"
