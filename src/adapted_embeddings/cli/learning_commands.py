"""``quality``, ``adapt`` and ``pairs stats`` / ``pairs clear``: learning the user's domain.

Every command reads the same settings as the library; the pair store and the audits live
beside the cache, so they see what every process sharing the cache directory learned.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from adapted_embeddings.cli.app import app, fail, handle_errors
from adapted_embeddings.cli.output import print_json
from adapted_embeddings.settings import load_settings

if TYPE_CHECKING:
    from adapted_embeddings.pipeline import EmbeddingPipeline
    from adapted_embeddings.spaces import EmbeddingSpace

pairs_app = typer.Typer(
    help="Inspect or empty the store of learned (local, provider) vector pairs.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(pairs_app, name="pairs")

TargetOption = Annotated[
    str | None,
    typer.Option(metavar="MODEL", help="Target model or space id (default from settings)."),
]
BaseUrlOption = Annotated[
    str | None,
    typer.Option(
        metavar="URL", help="OpenAI-compatible provider URL; the key is read from OPENAI_API_KEY."
    ),
]
CacheDirOption = Annotated[
    Path | None,
    typer.Option(metavar="DIR", help="Cache directory, where the pairs and audits live."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _hybrid_pipeline(
    target: str | None, base_url: str | None, cache_dir: Path | None
) -> EmbeddingPipeline:
    """The pipeline the library would build (hybrid: the mode that audits and learns)."""
    from adapted_embeddings.factory import PipelineOptions, build_pipeline

    options = PipelineOptions(
        settings=load_settings(),
        target=target,
        base_url=base_url,
        cache_dir=cache_dir,
        mode="hybrid",
        cache=True,
    )
    return build_pipeline(options.resolved_settings())


@app.command("quality")
@handle_errors
def quality_command(
    target: TargetOption = None,
    base_url: BaseUrlOption = None,
    cache_dir: CacheDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show how good the local route is on your data, from the stored audits.

    Audits are texts the gate kept local that were also sent to the provider; their
    agreement with the provider estimates the local route's quality, with 95% intervals.
    """
    pipeline = _hybrid_pipeline(target, base_url, cache_dir)
    report = pipeline.quality_report()
    if report is None:
        raise fail(
            f"no adapter yet for {pipeline.encoder.space.id} -> {pipeline.space.id}: embed in "
            "hybrid mode, then run `adapted-embeddings adapt`"
        )
    if as_json:
        print_json(report.as_dict())
        return
    typer.echo(report.summary())
    typer.echo(f"floor from {report.floor_origin}; audit rate now {report.audit_rate:.0%}")


@app.command("adapt")
@handle_errors
def adapt_command(
    target: TargetOption = None,
    base_url: BaseUrlOption = None,
    cache_dir: CacheDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Fit a domain adapter from the stored pairs; use it only if it is better.

    It is saved as a versioned adapter under <cache dir>/adapters (see `list`), and every
    new embedder with the same settings and cache directory uses it.
    """
    report = _hybrid_pipeline(target, base_url, cache_dir).adapt()
    if as_json:
        typer.echo(json.dumps(report.as_dict(), default=str, indent=2))
        return
    typer.echo(report.summary())
    if report.path is not None:
        typer.echo(f"saved: {report.path}")


@pairs_app.command("stats")
@handle_errors
def pairs_stats_command(
    target: TargetOption = None,
    cache_dir: CacheDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """How many pairs are stored for the configured (source, target), by kind.

    And how many texts served locally unpaid are kept (their source vectors only).
    """
    from adapted_embeddings.learning.pairs import PairStore

    space_source, space_target, directory = _spaces(target, cache_dir)
    stats = PairStore(directory).stats(source=space_source, target=space_target)
    data = {
        "path": stats.path,
        "source": stats.source_space,
        "target": stats.target_space,
        "pairs": stats.pairs,
        "by_kind": stats.by_kind,
        "newest": stats.newest,
        "local_sources": stats.local_sources,
    }
    if as_json:
        print_json(data)
        return
    kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(stats.by_kind.items())) or "none"
    typer.echo(f"{stats.pairs} pairs for {stats.source_space} -> {stats.target_space} ({kinds})")
    typer.echo(f"{stats.local_sources} texts served locally unpaid (source vectors only)")
    typer.echo(f"store: {stats.path}")


@pairs_app.command("clear")
@handle_errors
def pairs_clear_command(
    cache_dir: CacheDirOption = None,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete every stored pair (a damaged store is moved aside and started anew)."""
    from adapted_embeddings.learning.pairs import PAIR_STORE_FILE, PairStore

    directory = (cache_dir or load_settings().cache.directory).expanduser()
    if not yes:
        typer.confirm(f"Delete every pair in {directory / PAIR_STORE_FILE}?", abort=True)
    removed = PairStore(directory).clear()
    typer.echo(f"removed {removed} pairs")


def _spaces(
    target: str | None, cache_dir: Path | None
) -> tuple[EmbeddingSpace, EmbeddingSpace, Path]:
    """Source and target spaces of the configured embedder, without loading any model."""
    from adapted_embeddings.encoders import known_space
    from adapted_embeddings.errors import AdapterNotFoundError
    from adapted_embeddings.registry import find_adapter
    from adapted_embeddings.spaces import EmbeddingSpace

    settings = load_settings()
    wanted = target or settings.target
    directory = (cache_dir or settings.cache.directory).expanduser()
    try:
        entry = find_adapter(source=settings.source, target=wanted, flavor=settings.flavor)
        return entry.manifest.source, entry.manifest.target, directory
    except AdapterNotFoundError:
        source = known_space(settings.source)
        if source is None:
            raise fail(f"cannot tell the space of source {settings.source!r}") from None
        try:
            return source, EmbeddingSpace.parse(wanted), directory
        except ValueError as exc:
            raise fail(f"no adapter for {wanted!r} yet; name it as a space id: {exc}") from None
