"""Compare two MiniLM -> ada-002 adapters on the validation records, per query form.

    python benchmarks/validation_forms.py BEFORE_DIR [AFTER_DIR]

The validation records are those the registry recipe holds out (seed 0, grouped over the two
surface forms), so neither adapter trained on them; the test split is not touched. Quick
(800 queries against their own 800 ada-002 vectors), so it fits a busy machine.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import corpus_encoders
import numpy as np

from adapted_embeddings.adapter import Adapter
from adapted_embeddings.registry import BUILTIN_ADAPTER_DIR
from adapted_embeddings.training import corpora, metrics
from adapted_embeddings.training.data import grouped_validation_split
from adapted_embeddings.training.evaluation import auroc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument(
        "after", type=Path, nargs="?", default=BUILTIN_ADAPTER_DIR / "minilm-l6-to-ada-002"
    )
    args = parser.parse_args()
    jeopardy = corpora.load_jeopardy()
    train = np.flatnonzero(~corpora.split_masks(len(jeopardy)).test)
    groups = np.tile(train, len(corpora.JEOPARDY_TRAINING_FORMS))
    _, validation = grouped_validation_split(groups, 0.1, 0)
    rows = np.unique(groups[validation])
    target, mean = jeopardy.ada[rows], jeopardy.ada[train].mean(axis=0)
    index = np.arange(len(rows))
    labels = jeopardy.category_ids[rows]
    native_top1 = metrics.top_k_excluding_self(target, target, index, 1)[:, 0]
    native_p10 = metrics.category_precision(
        metrics.top_k_excluding_self(target, target, index, 10), labels, index
    )
    for form_name, form in corpora.JEOPARDY_QUERY_FORMS.items():
        texts = corpora.jeopardy_texts(jeopardy.records, form)
        source = corpus_encoders.encode_rows("minilm", texts, rows)
        for tag, path in (("before", args.before), ("after", args.after)):
            translated, confidence = Adapter.load(path).translate(source)
            raw = metrics.cosine_rows(translated, target)
            centred = metrics.centred_cosine_rows(translated, target, mean)
            neighbours = metrics.top_k_excluding_self(translated, target, index, 10)
            p10 = metrics.category_precision(neighbours, labels, index) / native_p10
            print(
                f"{form_name:22s} {tag:6s} centred cos {centred.mean():.4f} "
                f"NA@10 {metrics.neighbour_agreement(neighbours, native_top1)[10]:.4f} "
                f"P@10/native {p10:.4f} AUROC raw "
                f"{auroc(raw < np.percentile(raw, 10), -confidence):.3f} centred "
                f"{auroc(centred < np.percentile(centred, 10), -confidence):.3f}"
            )


if __name__ == "__main__":
    main()
