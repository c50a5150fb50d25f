"""``embed-dataset``: Parquet, JSONL or CSV files in, embedded Parquet files out, resumably."""

from __future__ import annotations

import logging
import signal
import sys
import time
from enum import Enum
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer

from adapted_embeddings.cli.adapter_commands import adapter_location
from adapted_embeddings.cli.app import app, fail, handle_errors
from adapted_embeddings.cli.embed_command import CLI_HINT, ModeChoice, RoleChoice
from adapted_embeddings.errors import ConfigurationError


class EngineChoice(str, Enum):
    """Where the embedding runs."""

    local = "local"
    ray = "ray"


@app.command("embed-dataset")
@handle_errors
def embed_dataset_command(
    inputs: Annotated[
        list[Path],
        typer.Argument(
            metavar="INPUT",
            help="Parquet, JSONL or CSV/TSV files (by extension).",
            show_default=False,
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output", "-o", help="Directory for the Parquet output (created; resumable)."
        ),
    ],
    text_column: Annotated[
        str, typer.Option("--text-column", "-c", help="Column holding the texts.")
    ] = "text",
    engine: Annotated[
        EngineChoice,
        typer.Option(help="local: in this process, no Ray needed; ray: Ray Data actors."),
    ] = EngineChoice.local,
    ray_address: Annotated[
        str | None,
        typer.Option(help="Ray cluster (host:port, ray://host:port, auto). Default: start one."),
    ] = None,
    actors: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Ray actors (each loads the model once). Default: CPUs / --cpus-per-actor.",
        ),
    ] = None,
    cpus_per_actor: Annotated[
        float, typer.Option(min=0.1, help="CPUs each Ray actor reserves.")
    ] = 1.0,
    threads: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Model (torch) threads: of each Ray actor (default --cpus-per-actor, so one "
            "single-threaded actor per core), or of this process with --engine local "
            "(default: the cores it may use). On a busy machine fewer threads can be faster.",
        ),
    ] = None,
    rows_per_file: Annotated[
        int, typer.Option(min=1, help="Rows per output file: the unit of work and of resuming.")
    ] = 10_000,
    batch_size: Annotated[int, typer.Option(min=1, help="Texts per pipeline call.")] = 256,
    provider_concurrency: Annotated[
        int | None,
        typer.Option(min=1, help="Ray: provider requests in flight at once, cluster-wide."),
    ] = None,
    provider_tokens_per_minute: Annotated[
        int | None, typer.Option(min=1, help="Ray: provider tokens per minute, cluster-wide.")
    ] = None,
    source: Annotated[
        str | None, typer.Option(help="Local model (default from settings: all-MiniLM-L6-v2).")
    ] = None,
    target: Annotated[
        str | None,
        typer.Option(help="Target model or space id (default: text-embedding-ada-002)."),
    ] = None,
    flavor: Annotated[str | None, typer.Option(help="Adapter flavor, e.g. mlp.")] = None,
    adapter: Annotated[
        str | None,
        typer.Option(help="Adapter name or directory, instead of a lookup by source/target."),
    ] = None,
    mode: Annotated[
        ModeChoice | None,
        typer.Option("--mode", "-m", help="hybrid, local or provider (default from settings)."),
    ] = None,
    role: Annotated[RoleChoice, typer.Option(help="query or document.")] = RoleChoice.document,
    threshold: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="Confidence needed to keep a local vector."),
    ] = None,
    base_url: Annotated[
        str | None,
        typer.Option(help="OpenAI-compatible provider URL; the key is read from OPENAI_API_KEY."),
    ] = None,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Embedding cache directory (per node).")
    ] = None,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Neither read nor write the cache.")
    ] = False,
    progress: Annotated[
        bool, typer.Option("--progress/--no-progress", help="Progress bar on stderr.")
    ] = True,
    restart: Annotated[
        bool,
        typer.Option(
            help="Start over: delete the run already in --output (the files embed-dataset "
            "wrote there) instead of resuming it."
        ),
    ] = False,
) -> None:
    """Embed the text column of files into Parquet, with the space in each file's metadata.

    Every input column is kept; embedding, confidence and route are added. The output
    directory gets one file per --rows-per-file rows of each input, each written
    atomically, so a killed run restarted with the same arguments skips the files already
    written (with either engine). Inputs are checked completely before any embedding.
    A restart that would embed with another adapter, mode or threshold is refused (the run
    and each file record them); --restart starts over instead.
    """
    from adapted_embeddings.datasets import (
        PipelineIdentity,
        available_cores,
        bulk_pipeline,
        embed_files,
        prepare_run,
        set_model_threads,
    )

    keywords: dict[str, Any] = {
        "source": source,
        "target": target,
        "flavor": flavor,
        "adapter": adapter_location(adapter) if adapter else None,
        "mode": mode.value if mode else None,
        "query_threshold": threshold if role is RoleChoice.query else None,
        "document_threshold": threshold if role is RoleChoice.document else None,
        "base_url": base_url,
        "cache": False if no_cache else None,
        "cache_dir": cache_dir,
    }
    keywords = {name: value for name, value in keywords.items() if value is not None}
    try:  # the adapter is resolved once, here, and pinned for the whole run
        pipeline, keywords = bulk_pipeline(keywords)
    except ConfigurationError as exc:
        raise ConfigurationError(str(exc) + "." + CLI_HINT) from exc
    space = pipeline.space
    tasks = prepare_run(
        inputs,
        output,
        space=space,
        pipeline=PipelineIdentity.of(pipeline),
        text_column=text_column,
        role=role.value,
        rows_per_file=rows_per_file,
        restart=restart,
    )
    total = sum(t.rows for t in tasks)
    skipped = sum(t.rows for t in tasks if t.done)
    from tqdm import tqdm

    clock = {"started": time.perf_counter()}

    def bar() -> tqdm[Any]:
        clock["started"] = time.perf_counter()  # the work starts: model loaded, Ray connected
        return tqdm(
            total=total,
            initial=skipped,
            unit="text",
            file=sys.stderr,
            disable=not progress,
            mininterval=1.0,
            dynamic_ncols=True,
        )

    if engine is EngineChoice.local:
        threads = threads or available_cores()
        set_model_threads(threads)
        workers = f"engine local, {_threads(threads)}"
        with bar() as shown:
            summary = embed_files(
                tasks,
                pipeline,
                text_column=text_column,
                role=role.value,
                rows_per_file=rows_per_file,
                batch_size=batch_size,
                on_progress=shown.update,
            )
    else:
        try:
            summary, workers = _run_on_ray(
                tasks,
                keywords,
                text_column=text_column,
                role=role.value,
                rows_per_file=rows_per_file,
                batch_size=batch_size,
                address=ray_address,
                actors=actors,
                cpus_per_actor=cpus_per_actor,
                threads=threads,
                provider_concurrency=provider_concurrency,
                provider_tokens_per_minute=provider_tokens_per_minute,
                progress_bar=bar,
            )
        except _Interrupted as interrupted:
            raise fail(
                f"interrupted by {interrupted}; the files already written are kept: run the "
                "same command again to resume",
                128 + interrupted.signum,
            ) from None
    seconds = time.perf_counter() - clock["started"]
    routes = ", ".join(f"{count} {route}" for route, count in summary.routes.items())
    rate = f" ({summary.rows / seconds:.0f} texts/s)" if summary.rows and seconds > 0 else ""
    typer.echo(
        f"{summary.rows} texts embedded into {summary.files_written} files in {seconds:.1f} s"
        f"{rate}: {routes}"
    )
    if summary.files_skipped:
        typer.echo(
            f"{summary.rows_skipped} texts in {summary.files_skipped} files were already done "
            "(skipped)"
        )
    typer.echo(f"space {space.id} · output {output} · {workers}")


def _threads(count: int) -> str:
    return f"{count} model thread{'s' if count > 1 else ''}"


class _Interrupted(BaseException):
    """SIGINT or SIGTERM arrived while Ray ran the tasks (a BaseException, like Ctrl-C)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise _Interrupted(signum)


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _run_on_ray(
    tasks: Any,
    keywords: dict[str, Any],
    *,
    address: str | None,
    actors: int | None,
    cpus_per_actor: float,
    threads: int | None,
    progress_bar: Any,
    **options: Any,
) -> tuple[Any, str]:
    """Run the pending tasks on Ray actors; a Ray instance started here is stopped after.

    SIGINT and SIGTERM raise :class:`_Interrupted` while the tasks run, so the instance is
    shut down (with them ignored meanwhile: a shutdown cut short would leave its processes
    behind). Left to Ray, SIGTERM aborted the driver with a C++ stack trace.

    Returns:
        The run's summary, and how many actors with how many model threads ran it.

    """
    from adapted_embeddings.datasets import RunSummary
    from adapted_embeddings.ray import actor_threads, connect, embed_tasks, require_ray

    ray = require_ray()
    started_here = not ray.is_initialized()
    connect(address, log_to_driver=False)
    previous = {s: signal.signal(s, _interrupt) for s in _SIGNALS}  # after Ray's own
    try:
        import ray.data

        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # our bar and summary instead
        # ... and no warning that Ray Data's bars are off: they are meant to be.
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
        if actors is None:
            cpus = float(ray.cluster_resources().get("CPU", 1.0))
            actors = max(1, int(cpus // cpus_per_actor))
        summary = RunSummary(
            files_skipped=sum(1 for t in tasks if t.done),
            rows_skipped=sum(t.rows for t in tasks if t.done),
        )
        with progress_bar() as shown:  # drawn once connected
            for written in embed_tasks(
                tasks,
                keywords=keywords,
                concurrency=actors,
                num_cpus=cpus_per_actor,
                threads=threads,
                **options,
            ):
                summary.add({route: count for route, count in written.items() if route != "rows"})
                shown.update(written["rows"])
        threads = actor_threads(cpus_per_actor, threads)
        return summary, f"engine ray, {actors} actors × {_threads(threads)} each"
    finally:
        for number in _SIGNALS:
            signal.signal(number, signal.SIG_IGN)
        try:
            if started_here:
                ray.shutdown()
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
