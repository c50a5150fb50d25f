"""Typed exceptions. Every error the library raises on purpose derives from one base."""

from __future__ import annotations

from collections.abc import Sequence


class AdaptedEmbeddingsError(Exception):
    """Base class for every error raised on purpose by this library."""


class ConfigurationError(AdaptedEmbeddingsError, ValueError):
    """The combination of settings cannot work (e.g. hybrid mode without credentials)."""


class CacheDirectoryError(ConfigurationError):
    """The cache directory cannot hold a private cache (a file, not writable, another's...).

    ``str()`` is the problem followed by the library's ways out (keywords and variable);
    the command line reports :attr:`problem` followed by its own flags instead.

    Attributes:
        problem: What is wrong, naming the directory; no way out.
        ways_out: What the caller can do instead, in the caller's terms.

    """

    def __init__(self, problem: str, ways_out: str) -> None:
        """Keep the problem and the ways out apart, so a caller can name its own."""
        super().__init__(problem, ways_out)
        self.problem = problem
        self.ways_out = ways_out

    def __str__(self) -> str:
        """The problem, then the ways out."""
        return f"{self.problem}; {self.ways_out}"


class SpaceMismatchError(AdaptedEmbeddingsError, ValueError):
    """A vector, adapter or index of one embedding space was used with another."""


class AdapterNotFoundError(AdaptedEmbeddingsError, LookupError):
    """No adapter in the registry matches the request; the message lists what exists.

    Attributes:
        problem: What was asked for and not found, on one line.
        available: One line per available adapter (empty when the problem says enough).

    """

    def __init__(self, problem: str, available: Sequence[str] = ()) -> None:
        """Keep the list apart, so the command line can print each adapter on its own line."""
        super().__init__(problem, tuple(available))
        self.problem = problem
        self.available = tuple(available)

    def __str__(self) -> str:
        """The problem, then ``Available adapters:`` and one line per adapter."""
        if not self.available:
            return self.problem
        return "\n".join([f"{self.problem} Available adapters:", *self.available])


class AdapterLoadError(AdaptedEmbeddingsError, ValueError):
    """An adapter directory is missing, corrupt, tampered with or inconsistent."""


class InvalidVectorError(AdaptedEmbeddingsError, ValueError):
    """A vector holds NaN/Inf or has the wrong shape."""


class InvalidInputError(AdaptedEmbeddingsError, ValueError):
    """An input text cannot be embedded by anything (e.g. it holds a lone surrogate)."""


class TrainingDataError(AdaptedEmbeddingsError, ValueError):
    """Training or calibration data cannot be used as given."""


class ProviderError(AdaptedEmbeddingsError, RuntimeError):
    """The embedding provider failed after all retries.

    Attributes:
        failed_indices: Positions, in the caller's input list, of the texts that got no vector.
        completed: How many of the texts sent to the provider in this call did succeed
            (those were cached and are not lost).

    """

    def __init__(self, message: str, failed_indices: list[int], completed: int = 0) -> None:
        super().__init__(message)
        self.failed_indices = failed_indices
        self.completed = completed


class ProviderResponseError(ProviderError):
    """The provider answered, but with something that is not a valid set of embeddings."""


class MissingExtraError(ConfigurationError, ImportError):
    """An optional dependency is not installed; the message names the ``pip install`` line."""


class PairStoreError(AdaptedEmbeddingsError, RuntimeError):
    """The pair store (learned provider pairs) cannot be opened, read or written."""


class AdaptationError(AdaptedEmbeddingsError, RuntimeError):
    """``adapt()`` cannot fit a domain adapter (e.g. too few stored pairs)."""


class StoreSchemaError(ConfigurationError):
    """The shared store's schema was created by a newer version of this library.

    An older node never reads or writes a layout it does not know; the message names the
    store (password masked), both versions and the setting that chose the store.
    """


class UsageLedgerError(AdaptedEmbeddingsError, RuntimeError):
    """The usage ledger (what was embedded, paid and avoided) cannot be read or written."""
