"""``train``, ``calibrate`` and ``evaluate``: adapters from CSV, TSV, JSONL or Parquet files."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from adapted_embeddings.cli.adapter_commands import adapter_location
from adapted_embeddings.cli.app import app, handle_errors
from adapted_embeddings.cli.output import format_table, print_json
from adapted_embeddings.settings import AdaptedEmbeddingsSettings
from adapted_embeddings.spaces import EmbeddingSpace

if TYPE_CHECKING:
    from adapted_embeddings.adapter import Adapter
    from adapted_embeddings.training.from_files import ParallelFile


class FlavorChoice(str, Enum):
    """Adapter architectures :func:`train_adapter` knows."""

    mlp = "mlp"
    linear = "linear"


InputOption = Annotated[
    Path, typer.Option("--input", "-i", help="CSV, TSV, JSONL or Parquet file of texts.")
]
ColumnOption = Annotated[str, typer.Option("--column", "-c", help="Text column.")]
VectorColumnOption = Annotated[
    str | None,
    typer.Option(
        help="Column of the target's stored vectors (lists of numbers). Without it the "
        "provider embeds the texts (OPENAI_API_KEY or --base-url; cached, resumable)."
    ),
]
SourceOption = Annotated[
    str | None, typer.Option(help="Local model (default from settings: all-MiniLM-L6-v2).")
]
BaseUrlOption = Annotated[str | None, typer.Option(help="OpenAI-compatible provider URL.")]
LimitOption = Annotated[int | None, typer.Option(min=1, help="Read at most this many rows.")]
FallbackOption = Annotated[
    float,
    typer.Option(min=0.0, max=1.0, help="Calibrate the threshold to route at most this share."),
]
OutputOption = Annotated[Path, typer.Option("--output", "-o", help="Adapter directory to write.")]
OverwriteOption = Annotated[bool, typer.Option(help="Replace an existing --output directory.")]


def _read_pairs(
    input_file: Path,
    column: str,
    vector_column: str | None,
    source: str | None,
    target: EmbeddingSpace,
    base_url: str | None,
    limit: int | None,
) -> ParallelFile:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from adapted_embeddings.training.from_files import read_parallel_file

    settings = AdaptedEmbeddingsSettings.load()  # a bad variable: one line, exit 2
    provider = settings.provider.model_copy(
        update={"base_url": base_url or settings.provider.base_url}
    )
    pairs = read_parallel_file(
        input_file,
        text_column=column,
        vector_column=vector_column,
        source=source or settings.source,
        target=target,
        provider=provider,
        cache_dir=settings.cache.directory,
        limit=limit,
    )
    typer.echo(
        f"{len(pairs.texts)} pairs from {input_file.name}: {pairs.source_space.id} -> "
        f"{pairs.target_space.id} (target vectors from the {pairs.target_from})",
        err=True,
    )
    return pairs


def _space(value: str) -> EmbeddingSpace:
    try:
        return EmbeddingSpace.parse(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--target") from None


def _load(adapter: str) -> Adapter:
    from adapted_embeddings.adapter import Adapter

    return Adapter.load(adapter_location(adapter, given_as="ADAPTER"))


def _check_source(adapter: Adapter, pairs: ParallelFile) -> None:
    from adapted_embeddings.spaces import ensure_same_space

    ensure_same_space(adapter.source, pairs.source_space, what="the --source model's vectors")


def _summary(adapter: Adapter) -> None:
    validation = adapter.manifest.metrics.get("validation", {})
    rows = [
        ["name", adapter.name],
        ["flavor", adapter.flavor],
        ["source -> target", f"{adapter.source.id} -> {adapter.target.id}"],
        ["parameters", f"{adapter.parameter_count:,}"],
        ["recommended threshold", f"{adapter.recommended_threshold:.3f}"],
    ]
    rows += [[f"validation {k}", _number(v)] for k, v in validation.items() if _is_number(v)]
    rows.append(["saved to", str(adapter.path)])
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        typer.echo(f"{label.ljust(width)}  {value}")


@app.command("train")
@handle_errors
def train_command(
    input_file: InputOption,
    target: Annotated[
        str, typer.Option(help="Target space id, e.g. openai/text-embedding-ada-002@1536.")
    ],
    output: OutputOption,
    column: ColumnOption = "text",
    vector_column: VectorColumnOption = None,
    source: SourceOption = None,
    flavor: Annotated[FlavorChoice, typer.Option(help="mlp or linear.")] = FlavorChoice.mlp,
    name: Annotated[str | None, typer.Option(help="Adapter name.")] = None,
    seed: Annotated[int, typer.Option(help="Seeds split, initialisation and order.")] = 0,
    max_fallback_rate: FallbackOption = 0.10,
    base_url: BaseUrlOption = None,
    limit: LimitOption = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Train an adapter on your texts and save it (then use it with --adapter DIR)."""
    target_space = _space(target)
    from adapted_embeddings.training.data import check_output_directory

    try:  # before reading or embedding anything
        check_output_directory(output, overwrite=overwrite)
    except FileExistsError:
        raise typer.BadParameter(
            f"{output} exists; pass --overwrite to replace it", param_hint="--output"
        ) from None
    pairs = _read_pairs(input_file, column, vector_column, source, target_space, base_url, limit)
    from adapted_embeddings.training import train_adapter

    typer.echo("training ...", err=True)
    adapter = train_adapter(
        pairs.source_vectors,
        pairs.target_vectors,
        source=pairs.source_space,
        target=pairs.target_space,
        flavor=flavor.value,
        name=name,
        seed=seed,
        max_fallback_rate=max_fallback_rate,
        training_info={"data": f"{len(pairs.texts)} rows of {input_file.name}"},
        output_dir=output,
        overwrite=overwrite,
    )
    _summary(adapter)


@app.command("calibrate")
@handle_errors
def calibrate_command(
    adapter: Annotated[str, typer.Argument(help="Adapter name or directory.")],
    input_file: InputOption,
    output: OutputOption,
    column: ColumnOption = "text",
    vector_column: VectorColumnOption = None,
    source: SourceOption = None,
    max_fallback_rate: FallbackOption = 0.10,
    base_url: BaseUrlOption = None,
    limit: LimitOption = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Re-derive an adapter's threshold on your own held-out texts; save a copy."""
    loaded = _load(adapter)
    pairs = _read_pairs(input_file, column, vector_column, source, loaded.target, base_url, limit)
    _check_source(loaded, pairs)
    from adapted_embeddings.training import recalibrate

    calibrated = recalibrate(
        loaded,
        pairs.source_vectors,
        pairs.target_vectors,
        max_fallback_rate=max_fallback_rate,
        sample_name=f"{len(pairs.texts)} rows of {input_file.name}",
    )
    calibrated.save(output, overwrite=overwrite)
    typer.echo(
        f"threshold {loaded.recommended_threshold:.3f} -> {calibrated.recommended_threshold:.3f} "
        f"(route at most {max_fallback_rate:.0%} to the provider on this sample)"
    )
    typer.echo(f"saved to {output}")


@app.command("evaluate")
@handle_errors
def evaluate_command(
    adapter: Annotated[str, typer.Argument(help="Adapter name or directory.")],
    input_file: InputOption,
    column: ColumnOption = "text",
    vector_column: VectorColumnOption = None,
    source: SourceOption = None,
    base_url: BaseUrlOption = None,
    limit: LimitOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print every metric as JSON.")] = False,
) -> None:
    """Score an adapter on held-out pairs: retrieval agreement at each fallback rate."""
    loaded = _load(adapter)
    pairs = _read_pairs(input_file, column, vector_column, source, loaded.target, base_url, limit)
    _check_source(loaded, pairs)
    from adapted_embeddings.training.from_files import evaluate_on_pairs

    report = evaluate_on_pairs(loaded, pairs.source_vectors, pairs.target_vectors)
    if as_json:
        print_json(report)
        return
    columns = ["mean_centred_cosine", "neighbour_r@1", "neighbour_r@10", "self_r@1"]
    rows = [
        [f"{share} to provider", *(_number(metrics[c]) for c in columns)]
        for share, metrics in report["routed"].items()
    ]
    typer.echo(f"{loaded.name} on {report['pairs']} pairs (each row queries all the others)")
    typer.echo(format_table(["routed by confidence", *columns], rows))
    confidence = report["confidence"]
    typer.echo(
        f"confidence: mean {confidence['mean_confidence']:.3f}, AUROC for the worst 10% "
        f"{confidence['auroc_poor_centred_cosine']:.3f}, Spearman with quality "
        f"{confidence['spearman_centred_cosine']:.3f}"
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
