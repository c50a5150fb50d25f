"""05: Train your own adapter: parallel corpus -> train -> calibrate -> evaluate -> save -> use.

The parallel corpus is texts with the vectors your provider already returned for them: here
Jeopardy clues with their real OpenAI ada-002 vectors (a team with an ada-002 index has
exactly this). The local side (all-MiniLM-L6-v2) is computed on the spot. Rows are split
three ways: training rows, a calibration slice, and the project's held-out test rows
(index % 5 == 0), on which the new adapter is compared with the built-in one.

Needs:  pip install 'adapted-embeddings[langchain,train]'
Run:  python cookbook/05_train_your_own.py                 (1,500 pairs, linear, ~1 min)
      python cookbook/05_train_your_own.py --pairs 6000 --flavor mlp

The same steps from the shell: adapted-embeddings train / calibrate / evaluate (see README).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

from adapted_embeddings.adapter import Adapter
from adapted_embeddings.encoders import build_encoder
from adapted_embeddings.langchain import AdaptedEmbeddings
from adapted_embeddings.spaces import OPENAI_ADA_002
from adapted_embeddings.training import recalibrate, train_adapter
from adapted_embeddings.training.corpora import TEST_MODULUS, load_jeopardy
from adapted_embeddings.training.from_files import encode_texts, evaluate_on_pairs

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=1500, help="training pairs")
    parser.add_argument("--calibration", type=int, default=500, help="calibration pairs")
    parser.add_argument("--test", type=int, default=500, help="held-out test pairs")
    parser.add_argument("--flavor", choices=["linear", "mlp"], default="linear")
    parser.add_argument("--out", type=Path, default=None, help="adapter directory to write")
    args = parser.parse_args()

    corpus = load_jeopardy()
    rows = np.arange(len(corpus))
    rng = np.random.default_rng(0)
    pool = rng.permutation(rows[rows % TEST_MODULUS != 0])
    train_rows = pool[: args.pairs]
    calibration_rows = pool[args.pairs : args.pairs + args.calibration]
    test_rows = rows[rows % TEST_MODULUS == 0][: args.test]

    encoder = build_encoder("sentence-transformers/all-MiniLM-L6-v2")
    every = np.concatenate([train_rows, calibration_rows, test_rows])
    local = dict(zip(every, encode_texts(encoder, [corpus.texts[i] for i in every]), strict=True))

    def pairs(selected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.stack([local[i] for i in selected]), corpus.ada[selected]

    print(f"1. train: {len(train_rows)} pairs, {encoder.space.id} -> {OPENAI_ADA_002.id}")
    adapter = train_adapter(
        *pairs(train_rows),
        source=encoder.space,
        target=OPENAI_ADA_002,
        flavor=args.flavor,
        name=f"my-jeopardy-{args.flavor}",
        training_info={"data": f"{len(train_rows)} Jeopardy clues with stored ada-002 vectors"},
    )
    print(f"   {adapter!r}, {adapter.parameter_count:,} parameters")

    print(f"2. calibrate on {len(calibration_rows)} rows it never trained on")
    adapter = recalibrate(
        adapter, *pairs(calibration_rows), max_fallback_rate=0.2, sample_name="calibration slice"
    )
    print(f"   threshold {adapter.recommended_threshold:.3f} (at most 20% to the provider)")

    print(f"3. evaluate on {len(test_rows)} held-out test rows (each queries all the others)")
    mine = evaluate_on_pairs(adapter, *pairs(test_rows))
    builtin = Adapter.from_registry(source=encoder.space, target=OPENAI_ADA_002)
    theirs = evaluate_on_pairs(builtin, *pairs(test_rows))
    print(f"   {'':<44} {'centred cos':>11} {'neighbour r@1':>14} {'r@10':>6}")
    for label, report in ((adapter.name, mine), (f"built-in {builtin.name}", theirs)):
        for share in ("0%", "20%"):
            m = report["routed"][share]
            print(
                f"   {label + ', ' + share + ' routed':<44} {m['mean_centred_cosine']:>11.3f} "
                f"{m['neighbour_r@1']:>14.3f} {m['neighbour_r@10']:>6.3f}"
            )

    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or Path(scratch) / adapter.name
        adapter.save(out, overwrite=args.out is not None)
        files = sorted(p.name for p in out.iterdir())
        if args.out is None:  # the directory goes when the script ends: do not point at it
            print(f"4. saved to a temporary directory (pass --out DIR to keep it): {files}")
        else:
            print(f"4. saved to {out}: {files}")

        embeddings = AdaptedEmbeddings(adapter=str(out), mode="local")
        result = embeddings.embed_with_info(
            ["jeopardy question paris this city is the capital of france"], role="query"
        )[0]
        print(
            f"5. AdaptedEmbeddings(adapter=...): {len(result.vector)}-d vector in "
            f"{result.space.id}, confidence {result.confidence:.3f}, route {result.route}"
        )


if __name__ == "__main__":
    main()
