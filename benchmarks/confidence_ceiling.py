"""Can one confidence find both kinds of poor translation? A ceiling and refitted heads.

    python benchmarks/confidence_ceiling.py [--adapter NAME] [--cache-dir DIR]

The adapter-quality issue asks for confidence AUROC >= 0.85 with "poor" = the bottom 10% of
the *raw* cosine and also of the *centred* cosine. On the Jeopardy test split (exact
embedded strings, never used in training, early stopping or calibration) this reports:

* the shipped confidence;
* ceilings: scores that know the true cosines (the true centred cosine, the true raw cosine,
  the mean of their ranks), and how many rows the two poor sets share;
* logistic quality heads refitted on the adapter's validation records (both training forms;
  held out from the translation fit) with four targets (centred, raw, their mean, their
  minimum, each mapped onto [0, 1] as training does), times the shipped OOD gate.

If the ceilings meet the target and the refitted heads do not, the limit is how well quality
can be predicted from the input, not the measure. Writes
``benchmarks/results/confidence_ceiling.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import corpus_encoders
import numpy as np

from adapted_embeddings import Adapter
from adapted_embeddings.adapter.network import (
    ood_gate,
    prepare,
    quality_head,
    translate_with_features,
)
from adapted_embeddings.learning.heads import fit_quality_head, quality_targets
from adapted_embeddings.registry import list_adapters
from adapted_embeddings.training import corpora, metrics
from adapted_embeddings.training.data import grouped_validation_split
from adapted_embeddings.training.evaluation import auroc

RESULTS = Path(__file__).parent / "results" / "confidence_ceiling.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", default="minilm-l6-to-ada-002")
    parser.add_argument("--cache-dir", type=Path, default=corpus_encoders.DEFAULT_CACHE)
    args = parser.parse_args()
    adapter = Adapter.load(next(e.path for e in list_adapters() if e.name == args.adapter))
    arch, prepared = adapter.manifest.architecture, prepare(adapter.weights)
    jeopardy = corpora.load_jeopardy()
    masks = corpora.split_masks(len(jeopardy))
    test, train = np.flatnonzero(masks.test), np.flatnonzero(~masks.test)
    # The validation records of build_registry.py's fit: the same grouped split and seed.
    groups = np.tile(train, len(corpora.JEOPARDY_TRAINING_FORMS))
    validation = np.unique(groups[grouped_validation_split(groups, 0.1, 0)[1]])
    target_mean = jeopardy.ada[train].mean(axis=0)

    def measure(form: str, rows: np.ndarray) -> dict[str, np.ndarray]:
        texts = corpora.jeopardy_texts(jeopardy.records, corpora.JEOPARDY_QUERY_FORMS[form])
        source = corpus_encoders.encode_rows("minilm", texts, rows, cache_dir=args.cache_dir)
        translated, features, ood = translate_with_features(source, prepared, arch)
        return {
            "features": features,
            "gate": ood_gate(ood, adapter.weights),
            "raw": metrics.cosine_rows(translated, jeopardy.ada[rows]),
            "centred": metrics.centred_cosine_rows(translated, jeopardy.ada[rows], target_mean),
            "confidence": adapter.translate(source)[1],
        }

    held = measure("exact embedded string", test)
    poor_raw = held["raw"] < np.percentile(held["raw"], 10)
    poor_centred = held["centred"] < np.percentile(held["centred"], 10)

    def scored(score: np.ndarray) -> dict[str, float]:
        return {"raw": auroc(poor_raw, -score), "centred": auroc(poor_centred, -score)}

    ranks = {k: np.argsort(np.argsort(held[k])) for k in ("raw", "centred")}
    shipped = scored(held["confidence"])
    ceiling = {
        "true centred cosine": scored(held["centred"]),
        "true raw cosine": scored(held["raw"]),
        "mean rank of both": scored(ranks["raw"] + ranks["centred"]),
    }
    report: dict[str, object] = {
        "adapter": adapter.name,
        "queries": "Jeopardy test split, exact embedded strings (2,000 rows)",
        "poor_sets_shared_rows": int((poor_raw & poor_centred).sum()),
        "poor_set_rows": int(poor_raw.sum()),
        "shipped": shipped,
        "ceiling": ceiling,
    }
    fit_forms = [measure(form, validation) for form in corpora.JEOPARDY_TRAINING_FORMS]
    features = np.concatenate([f["features"] for f in fit_forms])
    soft = {
        k: quality_targets(np.concatenate([f[k] for f in fit_forms]))[0] for k in ("raw", "centred")
    }
    targets = {
        "centred": soft["centred"],
        "raw": soft["raw"],
        "mean of both": (soft["raw"] + soft["centred"]) / 2,
        "minimum of both": np.minimum(soft["raw"], soft["centred"]),
    }
    refitted = {}
    for name, target in targets.items():
        head = fit_quality_head(features, target)
        quality = quality_head(held["features"], head, arch)
        refitted[name] = scored(quality * held["gate"])
    report["refitted_logistic_heads"] = {"fit_rows": len(features), **refitted}

    print(f"{'score':<38} {'AUROC raw':>10} {'AUROC centred':>14}")
    rows = {"shipped confidence": shipped, **ceiling}
    rows.update({f"refitted head, {k} target": v for k, v in refitted.items()})
    for name, values in rows.items():
        print(f"{name:<38} {values['raw']:>10.3f} {values['centred']:>14.3f}")
    print(
        f"poor sets share {report['poor_sets_shared_rows']} of {report['poor_set_rows']} rows; "
        f"heads fitted on {len(features)} validation rows"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
