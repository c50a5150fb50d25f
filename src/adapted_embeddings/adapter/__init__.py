"""Adapter runtime: manifest, NumPy forward pass and safe (safetensors + JSON) persistence."""

from adapted_embeddings.adapter.core import Adapter
from adapted_embeddings.adapter.manifest import AdapterManifest, ArchitectureConfig

__all__ = ["Adapter", "AdapterManifest", "ArchitectureConfig"]
