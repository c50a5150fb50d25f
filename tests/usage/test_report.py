"""The report: the library API on both integrations, and ``adapted-embeddings report``."""

from __future__ import annotations

import base64
import json
import re
import time
from datetime import timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapted_embeddings.cli import app
from adapted_embeddings.errors import ConfigurationError, InvalidInputError
from adapted_embeddings.langchain import AdaptedEmbeddings as LangChainEmbeddings
from adapted_embeddings.learning.fidelity import wilson_interval
from adapted_embeddings.llama_index import AdaptedEmbeddings as LlamaIndexEmbeddings
from adapted_embeddings.tokens import default_token_counter
from adapted_embeddings.usage.ledger import DAY, EVENTS, HOUR, SQLiteLedgerStore, UsageRow
from adapted_embeddings.usage.report import build_report

ADA = "openai/text-embedding-ada-002@1536"
TEXTS = ["The Nile is the longest river in Africa.", "Der Hund bellt laut.", "zxq 8123 !!"]


@pytest.mark.parametrize("integration", [LangChainEmbeddings, LlamaIndexEmbeddings])
def test_usage_report_counts_local_texts_and_what_they_would_have_cost(
    integration: type[LangChainEmbeddings] | type[LlamaIndexEmbeddings], tmp_path: Path
) -> None:
    embeddings = integration(mode="local", cache_dir=tmp_path / "cache")
    embeddings.embed_with_info(TEXTS + TEXTS[:1])
    embeddings.embed_with_info(TEXTS, role="query")

    report = embeddings.usage_report(since="1h")

    tokens = sum(default_token_counter().count(t) for t in TEXTS + TEXTS[:1] + TEXTS)
    total = report.total
    assert (total.texts, total.local, total.cache, total.provider) == (7, 7, 0, 0)
    assert total.avoided_tokens == tokens and total.paid_tokens == 0
    assert report.prices == {"text-embedding-ada-002": 0.10}
    assert total.cost_avoided == pytest.approx(tokens * 0.10 / 1_000_000)
    assert total.cost_paid == 0.0 and total.fidelity is None
    assert report.as_dict()["total"]["share_local"] == 1.0
    with pytest.raises(InvalidInputError, match="since='last week'"):
        embeddings.usage_report(since="last week")
    for longest in ("999999w", timedelta.max):  # reaching before 1970: everything
        assert embeddings.usage_report(since=longest).total.texts == total.texts
    with pytest.raises(InvalidInputError, match="at most 6 digits"):
        embeddings.usage_report(since="1000000w")


def test_usage_report_without_a_cache_says_what_to_turn_on() -> None:
    embeddings = LangChainEmbeddings(mode="local", cache=False)
    with pytest.raises(ConfigurationError, match="ADAPTED_EMBEDDINGS_USAGE__ENABLED"):
        embeddings.usage_report()


def seeded_ledger(directory: Path) -> tuple[SQLiteLedgerStore, float]:
    """Two days of known figures: an adapter switch and a guard trip on the second."""
    now = time.time()
    today = int(now) - int(now) % DAY
    earlier = today - 2 * DAY

    def row(start: int, adapter: str, route: str, **counts: float) -> UsageRow:
        return UsageRow("hour", start, ADA, adapter, "document", route, **counts)  # type: ignore[arg-type]

    store = SQLiteLedgerStore(directory)
    store.add(
        [
            row(earlier, "a1", "local", texts=900, tokens=90_000),
            row(earlier, "a1", "provider", texts=100, tokens=10_000, provider_texts=100,
                provider_requests=2, audits=50, audit_passes=45, agreement_sum=40.0),
            row(today, "a2", EVENTS, adapter_switches=1),
            row(today, "a2", "local", texts=450, tokens=45_000),
            row(today, "a2", "cache", texts=500, tokens=50_000),
            row(today, "a2", "provider", texts=50, tokens=5_000, provider_texts=50,
                provider_requests=1, audits=20, audit_passes=20, agreement_sum=18.0),
            row(today, "a2", EVENTS, guard_trips=1),
            row(today - 30 * DAY, "a0", "local", texts=7, tokens=7),  # outside --since 7d
        ]
    )  # fmt: skip
    return store, now


def test_report_command_table_json_png_and_html(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    store, now = seeded_ledger(directory)
    runner = CliRunner()
    png, page = tmp_path / "report.png", tmp_path / "report.html"

    table = runner.invoke(app, ["report", "--cache-dir", str(directory), "--png", str(png),
                                "--html", str(page)])  # fmt: skip
    assert table.exit_code == 0, table.stderr
    lines = table.stdout.splitlines()
    total = next(line for line in lines if line.startswith("total"))
    low, high = wilson_interval(65, 70)
    assert re.split(r"\s{2,}", total) == [
        "total", "2000", "1350 (68%)", "500", "150", "200000", "0.001500", "0.018500",
        f"{65 / 70:.3f} [{low:.3f}, {high:.3f}] n=70", "1", "a1, a2",
    ]  # fmt: skip
    assert "prices per 1M tokens: text-embedding-ada-002 $0.1" in table.stdout
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size < 200_000
    html = page.read_text()
    assert base64.b64encode(png.read_bytes()[:30]).decode()[:20] in html
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # nothing fetched

    as_json = runner.invoke(app, ["report", "--cache-dir", str(directory), "--json"])
    figures = json.loads(as_json.stdout)
    expected = build_report(store, since="7d", now=now).as_dict()
    assert figures["groups"] == expected["groups"]
    assert [g["label"] for g in figures["groups"]] == [g["label"] for g in expected["daily"]]
    assert figures["total"]["texts"] == 2000 and figures["adapter_switches"][0]["adapter"] == "a2"

    by_adapter = runner.invoke(app, ["report", "--cache-dir", str(directory), "--by", "adapter",
                                     "--since", "60d", "--json"])  # fmt: skip
    groups = json.loads(by_adapter.stdout)["groups"]
    assert [(g["label"], g["texts"]) for g in groups] == [("a0", 7), ("a1", 1000), ("a2", 1000)]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [(["--since", "soon"], "since='soon'"), (["--by", "week"], "by='week'")],
)
def test_report_command_refuses_bad_options(tmp_path: Path, args: list[str], fragment: str) -> None:
    result = CliRunner().invoke(app, ["report", "--cache-dir", str(tmp_path), *args])
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: ") and fragment in result.stderr


def test_report_of_an_empty_ledger(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["report", "--cache-dir", str(tmp_path / "none")])
    assert result.exit_code == 0, result.stderr
    assert "no audits" in result.stdout and not (tmp_path / "none").exists()


def test_rows_are_bucketed_by_hour(tmp_path: Path) -> None:
    store = SQLiteLedgerStore(tmp_path)
    store.add([UsageRow("hour", 7 * HOUR, ADA, "a", "query", "local", texts=1)])
    assert build_report(store, since=None, now=8 * HOUR).daily[0].label == "1970-01-01"


def test_an_adapter_switch_is_counted_and_listed(tmp_path: Path) -> None:
    from adapted_embeddings import Adapter
    from adapted_embeddings.registry import find_adapter

    embeddings = LangChainEmbeddings(mode="local", cache_dir=tmp_path / "cache")
    embeddings.embed_with_info(TEXTS[:1])
    first = embeddings.pipeline.adapter
    assert first is not None
    linear = Adapter.load(find_adapter(source="all-MiniLM-L6-v2", target=ADA, flavor="linear").path)
    embeddings.pipeline.use_adapter(linear)
    embeddings.embed_with_info(TEXTS[1:])

    report = embeddings.usage_report(since="1h", by="adapter")

    assert [adapter for _, adapter in report.switches] == [linear.id]
    assert report.total.adapter_switches == 1
    by_adapter = {g.label: (g.texts, g.adapter_switches) for g in report.groups}
    assert by_adapter == {first.id: (1, 0), linear.id: (2, 1)}
