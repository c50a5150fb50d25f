"""One-line explanations of bad settings: which variable (or ``.env`` line), what it accepts.

:func:`adapted_embeddings.settings.load_settings` uses these so that a typo such as
``ADAPTED_EMBEDDINGS_CACHE__DIR`` or a value such as ``QUERY_THRESHOLD=abc`` is reported as
the user wrote it, not as a pydantic ``ValidationError`` (or, for a variable pydantic-settings
would ignore, not at all).
"""

from __future__ import annotations

import difflib
import os
import re
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr, ValidationError
from pydantic.fields import FieldInfo

from adapted_embeddings.errors import ConfigurationError

ENV_PREFIX = "ADAPTED_EMBEDDINGS_"
NESTED_DELIMITER = "__"

DEBUG_ENV = ENV_PREFIX + "DEBUG"
"""Read by the command line: full tracebacks instead of one-line errors."""

SERVER_PREFIX = ENV_PREFIX + "SERVER_"
"""The server's own settings (``ServerSettings``), checked when the ``serve`` extra is installed."""

_DOTENV_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=")


@dataclass(frozen=True)
class _Variable:
    """A variable as the user set it: its name and where (environment or a .env line)."""

    name: str
    where: str

    def describe(self) -> str:
        return (
            f"{self.where} ({self.name})"
            if self.where != "environment variable"
            else (f"environment variable {self.name}")
        )


def check_variable_names(
    settings_cls: type[BaseModel], environ: Mapping[str, str] | None = None
) -> None:
    """Refuse any ``ADAPTED_EMBEDDINGS_*`` variable that is neither a setting nor read on purpose.

    pydantic-settings ignores such a variable, so a misspelt one (``ADAPTED_EMBEDDINGS_MODE``
    for ``ADAPTED_EMBEDDINGS_GATE__MODE``) would silently leave the default in force. The
    known names come from the settings models themselves (every field, at every depth),
    plus :func:`read_on_purpose` and, when the ``serve`` extra is installed, the server's
    settings. Both the library and the command line call this through ``load_settings``.

    Raises:
        ConfigurationError: Naming the variable, where it was set, and the setting it most
            likely meant (or, failing that, which names exist).

    """
    variables = list(_set_variables(os.environ if environ is None else environ, settings_cls))
    known = {_env_name(path) for path in _setting_paths(settings_cls)} | read_on_purpose()
    unknown = [v for v in variables if v.name.upper() not in known]
    server = _server_variables() if any(_is_server(v) for v in unknown) else None
    for variable in unknown:
        if _is_server(variable) and (server is None or variable.name.upper() in server):
            continue  # the server's: checked here when its extra is installed
        hint = _suggestion(variable.name.upper(), settings_cls, server)
        raise ConfigurationError(f"unknown setting in {variable.describe()}: {hint}")


def read_on_purpose() -> frozenset[str]:
    """``ADAPTED_EMBEDDINGS_*`` variables that are not settings but are read all the same."""
    from adapted_embeddings.encoders import SHOW_PROGRESS_ENV
    from adapted_embeddings.registry import ADAPTER_DIRS_ENV

    return frozenset({DEBUG_ENV, SHOW_PROGRESS_ENV, ADAPTER_DIRS_ENV})


def describe_setting(settings_cls: type[BaseModel], location: tuple[str, ...]) -> str:
    """Where the setting at ``location`` was set: its variable (or ``.env`` line), else its name.

    For example ``environment variable ADAPTED_EMBEDDINGS_ADAPTER_PATH`` or
    ``setting gate.mode``.
    """
    variables = {v.name.upper(): v for v in _set_variables(os.environ, settings_cls)}
    variable = variables.get(_env_name(NESTED_DELIMITER.join(location)))
    variable = variable or _group_variable(variables, location)
    return variable.describe() if variable else f"setting {'.'.join(location)}"


def describe_invalid(settings_cls: type[BaseModel], error: ValidationError) -> str:
    """One line for every problem in ``error``: where it was set and what is accepted."""
    problems = []
    for problem in error.errors():
        location = tuple(str(part) for part in problem["loc"])
        where = describe_setting(settings_cls, location)
        field = _field(settings_cls, location)
        if problem["type"] == "extra_forbidden":
            problems.append(f"unknown setting {where}")
            continue
        accepted = _accepted(field) if field is not None else problem["msg"]
        value = "(hidden)" if _is_secret(field) else _shown(problem.get("input"))
        problems.append(f"{where} is {value}, which is not accepted: expected {accepted}")
    return "; ".join(problems)


def describe_settings_error(settings_cls: type[BaseModel], error: Exception) -> str:
    """One line for a value pydantic-settings could not even parse (a group's JSON)."""
    match = re.search(r'field "([^"]+)"', str(error))
    if match is None:
        return f"cannot read the settings: {error}"
    group = match[1]
    variables = {v.name.upper(): v for v in _set_variables(os.environ, settings_cls)}
    variable = variables.get(_env_name(group))
    where = variable.describe() if variable else f"setting {group}"
    return (
        f"{where} is not accepted: expected a JSON object of {group} settings, or set them "
        f"one by one as {_env_name(group)}{NESTED_DELIMITER}<NAME>"
    )


# -- where a variable was set -----------------------------------------------------------


def _set_variables(
    environ: Mapping[str, str], settings_cls: type[BaseModel]
) -> Iterator[_Variable]:
    """Every ``ADAPTED_EMBEDDINGS_*`` variable set, environment first, then ``.env`` lines."""
    seen = set()
    for name in environ:
        if name.upper().startswith(ENV_PREFIX):
            seen.add(name.upper())
            yield _Variable(name, "environment variable")
    for path in _env_files(settings_cls):
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            continue  # pydantic-settings reports an unreadable .env itself
        for number, line in enumerate(lines, start=1):
            match = _DOTENV_LINE.match(line)
            if match and match[1].upper().startswith(ENV_PREFIX) and match[1].upper() not in seen:
                seen.add(match[1].upper())
                yield _Variable(match[1], f"{path} line {number}")


def _env_files(settings_cls: type[BaseModel]) -> list[Path]:
    configured = getattr(settings_cls, "model_config", {}).get("env_file")
    if configured is None:
        return []
    files = [configured] if isinstance(configured, str | os.PathLike) else list(configured)
    return [Path(f).expanduser().resolve() for f in files if Path(f).expanduser().is_file()]


def _group_variable(variables: dict[str, _Variable], location: tuple[str, ...]) -> _Variable | None:
    # A whole group can be given as JSON, e.g. ADAPTED_EMBEDDINGS_GATE='{"mode": "x"}'.
    return variables.get(_env_name(location[0])) if location else None


# -- which names exist, and which one a wrong name meant -----------------------------------


def _setting_paths(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    """Every setting as its variable spells it after the prefix (``gate__mode``), lower case.

    A group is a setting too: it can be given whole, as JSON (``ADAPTED_EMBEDDINGS_GATE``).
    """
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}".lower()
        yield path
        nested = _model_class(field.annotation)
        if nested is not None:
            yield from _setting_paths(nested, path + NESTED_DELIMITER)


def _server_variables() -> frozenset[str] | None:
    """The server's variables, or None when the ``serve`` extra is missing (nothing to check)."""
    try:
        from adapted_embeddings.server.app import PIPELINE_KEYWORDS_ENV
        from adapted_embeddings.server.config import ServerSettings
    except ImportError:  # MissingExtraError included
        return None
    prefix = str(ServerSettings.model_config.get("env_prefix") or SERVER_PREFIX)
    names = {(prefix + path).upper() for path in _setting_paths(ServerSettings)}
    return frozenset({*names, PIPELINE_KEYWORDS_ENV})


def _is_server(variable: _Variable) -> bool:
    return variable.name.upper().startswith(SERVER_PREFIX)


def _suggestion(name: str, settings_cls: type[BaseModel], server: frozenset[str] | None) -> str:
    """The setting ``name`` most likely meant, or which names exist."""
    suffix = name[len(ENV_PREFIX) :].lower()
    groups = _groups(settings_cls)
    group, delimiter, member = suffix.partition(NESTED_DELIMITER)
    if delimiter and group in groups:
        # Compare the member alone: the shared group prefix would make anything "close".
        choices = sorted(groups[group])
        near = _near_miss(member, choices, cutoff=0.6)
        if near:
            return f"did you mean {_env_name(group + NESTED_DELIMITER + near)}?"
        every = ", ".join(_env_name(f"{group}{NESTED_DELIMITER}{c}") for c in choices)
        return f"the {group} settings are {every}"
    if server is not None and name.startswith(SERVER_PREFIX):
        # As for a group: compare the part after the shared SERVER_ prefix.
        choices = sorted(n[len(SERVER_PREFIX) :] for n in server if n.startswith(SERVER_PREFIX))
        near = _near_miss(name[len(SERVER_PREFIX) :], choices, cutoff=0.6)
        if near:
            return f"did you mean {SERVER_PREFIX}{near}?"
        return f"the server settings are {', '.join(SERVER_PREFIX + c for c in choices)}"
    on_purpose = {n[len(ENV_PREFIX) :].lower() for n in read_on_purpose()}
    paths = sorted({*_setting_paths(settings_cls), *on_purpose})
    leaf = suffix.rpartition(NESTED_DELIMITER)[2]
    # A setting's own name without its group, or in the wrong group: MODE for GATE__MODE.
    same_name = [p for p in paths if p.rpartition(NESTED_DELIMITER)[2] == leaf]
    near = _near_miss(suffix, paths, cutoff=0.8)
    meant = same_name or ([near] if near else [])
    if meant:
        return f"did you mean {' or '.join(_env_name(p) for p in meant)}?"
    top = ", ".join(n for n in settings_cls.model_fields if n not in groups)
    return (
        f"no setting has this name; the settings are {ENV_PREFIX}<NAME> for {top}, and "
        f"{ENV_PREFIX}<GROUP>{NESTED_DELIMITER}<NAME> for the groups {', '.join(groups)}"
    )


# -- what a setting accepts ---------------------------------------------------------------


def _groups(settings_cls: type[BaseModel]) -> dict[str, dict[str, FieldInfo]]:
    groups = {}
    for name, field in settings_cls.model_fields.items():
        model = _model_class(field.annotation)
        if model is not None:
            groups[name] = dict(model.model_fields)
    return groups


def _field(settings_cls: type[BaseModel], location: tuple[str, ...]) -> FieldInfo | None:
    model: type[BaseModel] | None = settings_cls
    field = None
    for part in location:
        if model is None or part not in model.model_fields:
            return None
        field = model.model_fields[part]
        model = _model_class(field.annotation)
    return field


def _accepted(field: FieldInfo) -> str:
    """What a field accepts, in words: 'a number from 0 to 1', "one of 'a', 'b'", ..."""
    kinds = [_kind(t) for t in _alternatives(field.annotation)]
    text = " or ".join(dict.fromkeys(k for k in kinds if k))
    bounds = _bounds(field)
    return f"{text} {bounds}".strip() if bounds else text


def _alternatives(annotation: Any) -> list[Any]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return [a for arg in typing.get_args(annotation) for a in _alternatives(arg)]
    return [annotation]


def _kind(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(annotation))
    names = {
        bool: "true or false",
        int: "a whole number",
        float: "a number",
        str: "text",
        Path: "a path",
        SecretStr: "text",
        type(None): "",
    }
    if annotation in names:
        return names[annotation]
    return getattr(annotation, "__name__", str(annotation))


def _bounds(field: FieldInfo) -> str:
    words = {"ge": ">= {}", "gt": "> {}", "le": "<= {}", "lt": "< {}"}
    limits = {}
    for constraint in field.metadata:
        for key in words:
            value = getattr(constraint, key, None)
            if value is not None:
                limits[key] = value
    if "ge" in limits and "le" in limits:
        return f"from {limits['ge']} to {limits['le']}"
    return " and ".join(words[key].format(value) for key, value in limits.items())


# -- small helpers -------------------------------------------------------------------------


def _model_class(annotation: Any) -> type[BaseModel] | None:
    """The settings group an annotation holds (``GateSettings``, or ``X | None``), if any."""
    for alternative in _alternatives(annotation):
        if isinstance(alternative, type) and issubclass(alternative, BaseModel):
            return alternative
    return None


def _is_secret(field: FieldInfo | None) -> bool:
    return field is not None and SecretStr in _alternatives(field.annotation)


def _near_miss(name: str, choices: list[str], cutoff: float) -> str | None:
    """The choice ``name`` most likely meant: an abbreviation of it, or a close spelling."""
    abbreviated = [c for c in choices if len(name) >= 3 and c.startswith(name)]
    if len(abbreviated) == 1:
        return abbreviated[0]
    matches = difflib.get_close_matches(name, choices, n=1, cutoff=cutoff)
    return matches[0] if matches else None


def variable_name(*location: str) -> str:
    """The variable of the setting at ``location``, e.g. ``ADAPTED_EMBEDDINGS_CACHE__DIRECTORY``."""
    return _env_name(NESTED_DELIMITER.join(location))


def _env_name(setting: str) -> str:
    return ENV_PREFIX + setting.upper()


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
