"""Startup: import, construct, first embed, and a fully cached CLI ``embed``, before vs after.

Run:  python benchmarks/startup.py                      (this tree only)
      python benchmarks/startup.py --before 583eb8b     (side by side with a git revision)
Writes benchmarks/results/startup.json and prints a table.

Every measurement is a fresh Python process, as a user's script or shell command is. With
``--before REV`` the revision's ``src/`` is exported (``git archive``) to a temporary
directory and put first on ``PYTHONPATH``; the two trees run alternately in each round so
machine noise hits both alike, and medians are reported. Each tree gets its own cache.

Targets (issue 9): construct ``AdaptedEmbeddings`` <= 0.5 s, fully cached CLI embed <= 2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "startup.json"
TEXTS = ["What is the capital of France?", "a second text", "a third, longer text to embed"]
TARGETS = {"construct_s": 0.5, "cli_cached_embed_s": 2.0}

# Runs in a fresh interpreter; prints one JSON line of in-process timings.
LIBRARY_PROBE = """
import json, sys, time
t0 = time.perf_counter()
from adapted_embeddings.langchain import AdaptedEmbeddings
t1 = time.perf_counter()
embeddings = AdaptedEmbeddings(mode="local", cache_dir=sys.argv[1])
t2 = time.perf_counter()
embeddings.embed_documents(json.loads(sys.argv[2]))
t3 = time.perf_counter()
heavy = sorted(m for m in ("torch", "transformers", "sentence_transformers") if m in sys.modules)
print(json.dumps({"import_s": t1 - t0, "construct_s": t2 - t1, "first_embed_s": t3 - t2,
                  "heavy_modules_after_cached_embed": heavy}))
"""


def environment(src: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTED_EMBEDDINGS_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        )
    return env


def library_round(src: Path | None, cache: Path) -> dict[str, Any]:
    """One fresh process: import, construct, embed (cached after the first round)."""
    completed = subprocess.run(
        [sys.executable, "-c", LIBRARY_PROBE, str(cache), json.dumps(TEXTS)],
        capture_output=True,
        text=True,
        env=environment(src),
        check=True,
    )
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    result["loading_bar_on_stderr"] = "Loading weights" in completed.stderr
    return result


def cli_round(src: Path | None, cache: Path) -> tuple[float, str]:
    """Wall time of one ``adapted-embeddings embed`` process; its stderr."""
    command = [sys.executable, "-m", "adapted_embeddings.cli", "embed", "-m", "local"]
    command += ["--cache-dir", str(cache), "--ndjson"]
    command += [arg for text in TEXTS for arg in ("-t", text)]
    start = time.perf_counter()
    completed = subprocess.run(
        command, capture_output=True, text=True, env=environment(src), check=True
    )
    elapsed = time.perf_counter() - start
    routes = {json.loads(line)["route"] for line in completed.stdout.splitlines()}
    return elapsed, ",".join(sorted(routes)) + ("|bar" if "Loading" in completed.stderr else "")


def export_revision(revision: str, into: Path) -> Path:
    archive = into / "src.tar"
    with archive.open("wb") as handle:
        subprocess.run(
            ["git", "-C", str(ROOT), "archive", revision, "src"], stdout=handle, check=True
        )
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", help="git revision to compare against (e.g. 583eb8b)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        trees: dict[str, Path | None] = {"after": None}
        if args.before:
            trees = {"before": export_revision(args.before, scratch), "after": None}
        samples: dict[str, dict[str, list[Any]]] = {name: {} for name in trees}
        for name, src in trees.items():  # warm-up: fill each tree's cache, load files into RAM
            cache = scratch / f"cache-{name}"
            first = library_round(src, cache)
            samples[name]["cold_first_embed_s"] = [first["first_embed_s"]]
            samples[name]["cold_loading_bar_on_stderr"] = [first["loading_bar_on_stderr"]]
            cli_round(src, cache)
        for round_number in range(args.rounds):
            for name, src in trees.items():
                cache = scratch / f"cache-{name}"
                probe = library_round(src, cache)
                cli_seconds, cli_routes = cli_round(src, cache)
                for key in ("import_s", "construct_s", "first_embed_s"):
                    samples[name].setdefault(key, []).append(probe[key])
                samples[name].setdefault("cli_cached_embed_s", []).append(cli_seconds)
                samples[name]["cli_routes"] = [cli_routes]
                samples[name].setdefault("heavy_modules_after_cached_embed", []).append(
                    probe["heavy_modules_after_cached_embed"]
                )
            print(f"round {round_number + 1}/{args.rounds} done", file=sys.stderr)

    timed = ("import_s", "construct_s", "first_embed_s", "cli_cached_embed_s")
    results: dict[str, Any] = {
        "command": "python benchmarks/startup.py"
        + (f" --before {args.before}" if args.before else "")
        + f" --rounds {args.rounds}",
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs (shared with other work)",
        "python": platform.python_version(),
        "texts": len(TEXTS),
        "targets": TARGETS,
        "note": "first_embed_s after warm-up is a fully cached embed (all texts in the cache); "
        "cold_first_embed_s is the very first run, which loads the model.",
        "trees": {},
    }
    for name in trees:
        entry = {key: float(np.median(samples[name][key])) for key in timed}
        entry["samples"] = {key: [round(v, 4) for v in samples[name][key]] for key in timed}
        entry["cold_first_embed_s"] = round(samples[name]["cold_first_embed_s"][0], 3)
        entry["cold_loading_bar_on_stderr"] = samples[name]["cold_loading_bar_on_stderr"][0]
        entry["cli_routes"] = samples[name]["cli_routes"][0]
        # One list per round: model libraries in memory after a fully cached embed.
        entry["heavy_modules_after_cached_embed"] = samples[name][
            "heavy_modules_after_cached_embed"
        ]
        results["trees"][name if name == "after" else f"before ({args.before})"] = entry

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    header = f"{'tree':<20}" + "".join(f"{key:>20}" for key in timed) + f"{'cold 1st embed':>16}"
    print(header)
    for name, entry in results["trees"].items():
        cells = "".join(f"{entry[key]:>19.3f}s" for key in timed)
        print(f"{name:<20}{cells}{entry['cold_first_embed_s']:>15.2f}s")
    print(
        f"targets: construct <= {TARGETS['construct_s']} s, cached CLI embed <= "
        f"{TARGETS['cli_cached_embed_s']} s (medians of {args.rounds} rounds)"
    )
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
