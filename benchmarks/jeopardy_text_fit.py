"""Which string did Weaviate embed for each Jeopardy record? Settle it by fit.

For each hypothesis, embed the strings with MiniLM, fit a ridge map MiniLM -> ada-002 on the
training rows (index % 5 != 0) and score held-out cosine on the test rows after centring on
the training ada mean (raw cosine is inflated by ada's anisotropy). A constant prefix cannot be
tested this way (the intercept absorbs it), so the round is also tested directly: if it had been
embedded, the ada vectors would encode it as plainly as MiniLM vectors of texts that contain it.

    python benchmarks/jeopardy_text_fit.py [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import corpus_encoders
import numpy as np

from adapted_embeddings.training import corpora

HYPOTHESES = {
    "class+answer+question": corpora.JEOPARDY_EMBEDDED_FORMAT,
    "class+answer+question+round": "jeopardy question {answer} {question} {round}",
    "answer+question": corpora.JEOPARDY_SOURCE_FORMAT,
    "question": "{question}",
}


def ridge_centred_cosine(
    x: np.ndarray, y: np.ndarray, train: np.ndarray, alpha: float
) -> np.ndarray:
    xm, ym = x[train].mean(0), y[train].mean(0)
    xt, yt = x[train] - xm, y[train] - ym
    w = np.linalg.solve(xt.T @ xt + alpha * np.eye(x.shape[1]), xt.T @ yt)
    pred = (x[~train] - xm) @ w
    true = y[~train] - ym
    cos = (pred * true).sum(1) / np.linalg.norm(pred, axis=1) / np.linalg.norm(true, axis=1)
    return cos


def round_classifier_accuracy(x: np.ndarray, rounds: np.ndarray, train: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=10.0, max_iter=2000).fit(x[train], rounds[train])
    return float(model.score(x[~train], rounds[~train]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=None, help="reuse MiniLM vectors cached here")
    parser.add_argument("--alpha", type=float, default=1.0)
    args = parser.parse_args()
    jeopardy = corpora.load_jeopardy()
    train = ~corpora.split_masks(len(jeopardy)).test
    ada = jeopardy.ada.astype(np.float64)
    per_row = {}
    for name, text_format in HYPOTHESES.items():
        texts = [corpora.jeopardy_text(r, text_format) for r in jeopardy.records]
        x = corpus_encoders.encode("minilm", texts, cache_dir=args.cache_dir).astype(np.float64)
        per_row[name] = ridge_centred_cosine(x, ada, train, args.alpha)
    best = max(per_row, key=lambda n: per_row[n].mean())
    results = {}
    print(f"{'hypothesis':30s} {'centred cos':>11s} {'vs best':>8s} {'+- 2 s.e.':>9s}")
    for name, cos in per_row.items():
        diff = cos - per_row[best]
        margin = 2 * diff.std(ddof=1) / np.sqrt(len(diff))
        results[name] = {
            "centred_cosine": float(cos.mean()),
            "paired_difference": float(diff.mean()),
            "two_standard_errors": float(margin),
        }
        print(f"{name:30s} {cos.mean():11.4f} {diff.mean():+8.4f} {margin:9.4f}")
    rounds = np.array([str(r["Round"]) for r in jeopardy.records])
    with_round = [
        corpora.jeopardy_text(r, HYPOTHESES["class+answer+question+round"])
        for r in jeopardy.records
    ]
    round_accuracy = {
        "ada-002 vectors": round_classifier_accuracy(ada, rounds, train),
        "MiniLM, text without round": round_classifier_accuracy(
            corpus_encoders.encode("minilm", jeopardy.texts, cache_dir=args.cache_dir),
            rounds,
            train,
        ),
        "MiniLM, text with round": round_classifier_accuracy(
            corpus_encoders.encode("minilm", with_round, cache_dir=args.cache_dir), rounds, train
        ),
    }
    print("\nround read back by a logistic classifier (test accuracy):")
    for name, accuracy in round_accuracy.items():
        print(f"  {name:30s} {accuracy:.3f}")
    out = Path(__file__).parent / "results" / "jeopardy_text_fit.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(
        json.dumps(
            {"alpha": args.alpha, "hypotheses": results, "round_accuracy": round_accuracy}, indent=2
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
