"""Reading and writing adapter directories: ``adapter.json`` plus ``model.safetensors``.

Only JSON and safetensors are ever parsed, so loading an adapter cannot execute code
(unlike ``torch.load``, which unpickles). The weights' sha256 is checked against the
manifest before they are parsed, which catches both corruption and tampering.

An adapter directory may come from anywhere, so both files are read defensively: each must
be a regular file (a symlink, FIFO, device, socket or directory is refused before it is
opened, and again on the opened descriptor), opened with ``O_NOFOLLOW | O_NONBLOCK``, and
no larger than a bound known before reading: :data:`MAX_MANIFEST_BYTES` for the manifest,
and for the weights what the declared architecture can need
(:func:`weights_size_limit`). Nothing about a refused file's content, not even its hash,
goes into an error message.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import stat
import tempfile
from pathlib import Path

import numpy as np
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors_bytes
from safetensors.numpy import save as save_safetensors_bytes

from adapted_embeddings.adapter.manifest import MANIFEST_FILE, AdapterManifest, ArchitectureConfig
from adapted_embeddings.adapter.network import expected_shapes
from adapted_embeddings.errors import AdapterLoadError

MAX_MANIFEST_BYTES = 1 << 20
"""Largest ``adapter.json`` read (the shipped ones are ~16 KB, calibration curve included)."""

SAFETENSORS_HEADER_ALLOWANCE = 1 << 20
"""Bytes allowed for the safetensors length prefix and JSON header (names, shapes, metadata)."""

MAX_WEIGHTS_BYTES = 1 << 30
"""Ceiling on any weights file, whatever architecture its manifest declares."""

_WIDEST_FLOAT_BYTES = 8  # tensors may be stored as float16/32/64; they are cast to float32

_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)

_KINDS = (
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
)


def weights_size_limit(arch: ArchitectureConfig) -> int:
    """Most bytes a weights file for ``arch`` can need (capped at ``MAX_WEIGHTS_BYTES``).

    Every tensor at 8 bytes a value (float64, the widest accepted), plus the safetensors
    header allowance.
    """
    values = sum(math.prod(shape) for shape in expected_shapes(arch).values())
    return min(SAFETENSORS_HEADER_ALLOWANCE + _WIDEST_FLOAT_BYTES * values, MAX_WEIGHTS_BYTES)


def _refuse_unless_regular(mode: int, path: Path, what: str) -> None:
    if stat.S_ISREG(mode):
        return
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    raise AdapterLoadError(
        f"{what} {path} is {kind}; adapter files must be regular files (no symlinks, "
        "pipes or devices)"
    )


def _refuse_if_too_large(size: int, limit: int, path: Path, what: str, reason: str) -> None:
    if size > limit:
        raise AdapterLoadError(
            f"{what} {path} is {size:,} bytes, more than the {limit:,} {reason}; refusing to "
            "read it"
        )


def read_adapter_file(path: Path, *, limit: int, what: str, reason: str) -> bytes:
    """Read a regular file of at most ``limit`` bytes without following a symlink.

    Args:
        path: The file.
        limit: Largest size accepted, checked before reading.
        what: What the file is, for messages (``"adapter weights file"``).
        reason: Where ``limit`` comes from, for messages.

    Raises:
        FileNotFoundError: If ``path`` does not exist (callers word that themselves).
        AdapterLoadError: If it is not a regular file, is too large, or cannot be read.

    """
    try:
        _refuse_unless_regular(os.lstat(path).st_mode, path, what)
        descriptor = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # swapped for a symlink after the lstat
            _refuse_unless_regular(stat.S_IFLNK, path, what)
        raise AdapterLoadError(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        status = os.fstat(descriptor)  # the opened file itself, whatever the path is now
        _refuse_unless_regular(status.st_mode, path, what)
        _refuse_if_too_large(status.st_size, limit, path, what, reason)
        chunks, remaining = [], limit + 1
        while remaining > 0:
            chunk = os.read(descriptor, min(remaining, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
    except OSError as exc:
        raise AdapterLoadError(f"cannot read {what} {path}: {exc.strerror}") from None
    finally:
        os.close(descriptor)
    data = b"".join(chunks)
    _refuse_if_too_large(len(data), limit, path, what, reason)  # it grew while being read
    return data


def read_manifest(directory: Path) -> AdapterManifest:
    """Parse and validate ``adapter.json`` in ``directory``.

    Raises:
        AdapterLoadError: If the file is missing, not a regular file, too large, not JSON,
            or not a valid manifest.

    """
    path = directory / MANIFEST_FILE
    try:
        blob = read_adapter_file(
            path,
            limit=MAX_MANIFEST_BYTES,
            what="adapter manifest",
            reason="bytes a manifest may have",
        )
    except FileNotFoundError:
        raise AdapterLoadError(f"no {MANIFEST_FILE} in adapter directory {directory}") from None
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AdapterLoadError(f"cannot read {path}: {exc}") from None
    try:
        return AdapterManifest.model_validate_json(text)
    except ValidationError as exc:
        raise AdapterLoadError(f"invalid adapter manifest {path}:\n{exc}") from exc


def read_weights(directory: Path, manifest: AdapterManifest) -> dict[str, np.ndarray]:
    """Load, hash-check and shape-check the weights the manifest names.

    The file's size is bounded by the declared architecture before a byte is read.

    Raises:
        AdapterLoadError: Missing, non-regular or oversized file, sha256 mismatch, corrupt
            safetensors, or tensors that do not match the declared architecture (naming
            missing/unexpected keys).

    """
    path = directory / manifest.weights_file
    _check_dimensions(manifest, directory)
    try:
        blob = read_adapter_file(
            path,
            limit=weights_size_limit(manifest.architecture),
            what="adapter weights file",
            reason="bytes its declared architecture can need",
        )
    except FileNotFoundError:
        raise AdapterLoadError(f"adapter weights file is missing: {path}") from None
    if hashlib.sha256(blob).hexdigest() != manifest.weights_sha256:
        raise AdapterLoadError(
            f"sha256 of {path} differs from the manifest's weights_sha256 "
            f"{manifest.weights_sha256}: the file is corrupt or was modified"
        )
    try:
        tensors = load_safetensors_bytes(blob)
    except (SafetensorError, ValueError) as exc:
        raise AdapterLoadError(f"{path} is not a valid safetensors file: {exc}") from exc
    return _check_tensors(tensors, manifest, path)


def _check_dimensions(manifest: AdapterManifest, directory: Path) -> None:
    arch = manifest.architecture
    if arch.input_dim != manifest.source.dimensions:
        raise AdapterLoadError(
            f"{directory}: architecture input_dim {arch.input_dim} does not match the "
            f"source space {manifest.source.id}"
        )
    if arch.output_dim != manifest.target.dimensions:
        raise AdapterLoadError(
            f"{directory}: architecture output_dim {arch.output_dim} does not match the "
            f"target space {manifest.target.id}"
        )


def _check_tensors(
    tensors: dict[str, np.ndarray], manifest: AdapterManifest, path: Path
) -> dict[str, np.ndarray]:
    arch = manifest.architecture
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
    private: bool = False,
) -> None:
    """Write an adapter directory atomically.

    Files are written to a temporary sibling directory that is renamed into place, so a
    crash never leaves a half-written adapter where a loader would find it. Two writers of
    the same new directory cannot both succeed: the second gets ``FileExistsError``.

    Args:
        directory: Where the adapter goes.
        manifest: Its manifest (written as ``adapter.json``).
        weights_blob: The safetensors bytes.
        overwrite: Replace an existing directory.
        private: Directory 0700 and files 0600 (adapters fitted on a user's vectors hold
            statistics of them); otherwise 0755 and 0644, for adapters meant to be shared.

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
        for written in (manifest.weights_file, MANIFEST_FILE):
            os.chmod(staging / written, 0o600 if private else 0o644)
        os.chmod(staging, 0o700 if private else 0o755)
        if overwrite and directory.exists():
            backup = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            directory.rename(backup)
            staging.rename(directory)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            try:
                staging.rename(directory)
            except OSError as exc:  # another writer's directory appeared after the check:
                # rename(2) never replaces a non-empty directory, so only one writer wins
                if directory.exists():
                    raise FileExistsError(
                        f"adapter directory {directory} already exists (written concurrently)"
                    ) from exc
                raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
