"""Reading and writing adapter directories: ``adapter.json`` plus ``model.safetensors``.

Only JSON and safetensors are ever parsed, so loading an adapter cannot execute code
(unlike ``torch.load``, which unpickles). The weights' sha256 is checked against the
manifest before they are parsed, which catches both corruption and tampering.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors_bytes
from safetensors.numpy import save as save_safetensors_bytes

from adapted_embeddings.adapter.manifest import MANIFEST_FILE, AdapterManifest
from adapted_embeddings.adapter.network import expected_shapes
from adapted_embeddings.errors import AdapterLoadError


def read_manifest(directory: Path) -> AdapterManifest:
    """Parse and validate ``adapter.json`` in ``directory``.

    Raises:
        AdapterLoadError: If the file is missing, not JSON, or not a valid manifest.

    """
    path = directory / MANIFEST_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AdapterLoadError(f"no {MANIFEST_FILE} in adapter directory {directory}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AdapterLoadError(f"cannot read {path}: {exc}") from exc
    try:
        return AdapterManifest.model_validate_json(text)
    except ValidationError as exc:
        raise AdapterLoadError(f"invalid adapter manifest {path}:\n{exc}") from exc


def read_weights(directory: Path, manifest: AdapterManifest) -> dict[str, np.ndarray]:
    """Load, hash-check and shape-check the weights the manifest names.

    Raises:
        AdapterLoadError: Missing file, sha256 mismatch, corrupt safetensors, or tensors
            that do not match the declared architecture (naming missing/unexpected keys).

    """
    path = directory / manifest.weights_file
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise AdapterLoadError(f"adapter weights file is missing: {path}") from None
    except OSError as exc:
        raise AdapterLoadError(f"cannot read {path}: {exc}") from exc
    digest = hashlib.sha256(blob).hexdigest()
    if digest != manifest.weights_sha256:
        raise AdapterLoadError(
            f"sha256 of {path} is {digest}, but the manifest says {manifest.weights_sha256}: "
            "the file is corrupt or was modified"
        )
    try:
        tensors = load_safetensors_bytes(blob)
    except (SafetensorError, ValueError) as exc:
        raise AdapterLoadError(f"{path} is not a valid safetensors file: {exc}") from exc
    return _check_tensors(tensors, manifest, path)


def _check_tensors(
    tensors: dict[str, np.ndarray], manifest: AdapterManifest, path: Path
) -> dict[str, np.ndarray]:
    arch = manifest.architecture
    if arch.input_dim != manifest.source.dimensions:
        raise AdapterLoadError(
            f"{path.parent}: architecture input_dim {arch.input_dim} does not match the "
            f"source space {manifest.source.id}"
        )
    if arch.output_dim != manifest.target.dimensions:
        raise AdapterLoadError(
            f"{path.parent}: architecture output_dim {arch.output_dim} does not match the "
            f"target space {manifest.target.id}"
        )
    shapes = expected_shapes(arch)
    missing = sorted(set(shapes) - set(tensors))
    unexpected = sorted(set(tensors) - set(shapes))
    if missing or unexpected:
        raise AdapterLoadError(
            f"{path} does not match its architecture: missing keys {missing}, "
            f"unexpected keys {unexpected}"
        )
    checked: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != shape:
            raise AdapterLoadError(
                f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape}"
            )
        if tensor.dtype.kind != "f":
            raise AdapterLoadError(f"{path}: tensor {name!r} has dtype {tensor.dtype}")
        as_float = np.ascontiguousarray(tensor, dtype=np.float32)
        if not np.isfinite(as_float).all():
            raise AdapterLoadError(f"{path}: tensor {name!r} holds NaN or Inf")
        checked[name] = as_float
    return checked


def serialize_weights(weights: dict[str, np.ndarray]) -> bytes:
    """Encode tensors as safetensors bytes (float32, contiguous)."""
    return save_safetensors_bytes(
        {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in weights.items()}
    )


def write_adapter(
    directory: Path,
    manifest: AdapterManifest,
    weights_blob: bytes,
    *,
    overwrite: bool = False,
) -> None:
    """Write an adapter directory atomically.

    Files are written to a temporary sibling directory that is renamed into place, so a
    crash never leaves a half-written adapter where a loader would find it.

    Raises:
        FileExistsError: If ``directory`` exists and ``overwrite`` is False.

    """
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise FileExistsError(
            f"adapter directory {directory} already exists; pass overwrite=True to replace it"
        )
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        (staging / manifest.weights_file).write_bytes(weights_blob)
        manifest_json = json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=False)
        (staging / MANIFEST_FILE).write_text(manifest_json + "\n", encoding="utf-8")
        os.chmod(staging, 0o755)
        if directory.exists():
            backup = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            directory.rename(backup)
            staging.rename(directory)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
