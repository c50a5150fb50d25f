"""Where an adapted adapter comes from: its lineage, recorded in the manifest by ``adapt()``.

``manifest.training["lineage"]`` holds the parent's id and name, the root name versions are
counted under, the pairs used, when it was made, and ``ancestors``: the nearest earlier
adapters with the thresholds they were held to, whose accepted local vectors stay servable
from the cache.
"""

from __future__ import annotations

from typing import Any

from adapted_embeddings.adapter import AdapterManifest

LINEAGE_KEY = "lineage"
"""Key of the ``training`` section of an adapted adapter's manifest that records its lineage."""


def lineage(manifest: AdapterManifest) -> dict[str, Any] | None:
    """The lineage an adapted adapter records (None for a trained or built-in one)."""
    value = manifest.training.get(LINEAGE_KEY)
    return value if isinstance(value, dict) else None
