"""Training-only code: corpora, adapter training, quality head, calibration and evaluation.

Nothing here is imported by the inference runtime (:mod:`adapted_embeddings.adapter`).
"""
