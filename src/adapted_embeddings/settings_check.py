"""One-line explanations of bad settings: which variable (or ``.env`` line), what it accepts.

:func:`adapted_embeddings.settings.load_settings` uses these so that a typo such as
``ADAPTED_EMBEDDINGS_CACHE__DIR`` or a value such as ``QUERY_THRESHOLD=abc`` is reported as
the user wrote it, not as a pydantic ``ValidationError``.
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

OTHER_VARIABLES = frozenset({"DEBUG", "SHOW_PROGRESS", "ADAPTER_DIRS"})
"""``ADAPTED_EMBEDDINGS_*`` variables read outside the settings (CLI, encoders, registry)."""

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
    """Refuse an ``ADAPTED_EMBEDDINGS_*`` variable that names no setting but resembles one.

    A variable inside a known group (``ADAPTED_EMBEDDINGS_CACHE__DIR``) must name one of the
    group's settings. Elsewhere a variable is refused only when it is a near miss of a
    setting's name, so other tools' ``ADAPTED_EMBEDDINGS_*`` variables keep working.

    Raises:
        ConfigurationError: Naming the variable, where it was set and the near-miss name.

    """
    groups = _groups(settings_cls)
    top_level = set(settings_cls.model_fields)
    nested = {f"{g}{NESTED_DELIMITER}{name}" for g, fields in groups.items() for name in fields}
    for variable in _set_variables(environ if environ is not None else os.environ, settings_cls):
        suffix = variable.name.upper()[len(ENV_PREFIX) :].lower()
        if suffix in top_level or suffix in nested or suffix.upper() in OTHER_VARIABLES:
            continue
        group, delimiter, member = suffix.partition(NESTED_DELIMITER)
        if delimiter and group in groups:
            # Compare the member alone: the shared group prefix would make anything "close".
            choices = sorted(groups[group])
            near = _near_miss(member, choices, cutoff=0.6)
            guess = f"{group}{NESTED_DELIMITER}{near}" if near else None
            every = ", ".join(_env_name(f"{group}{NESTED_DELIMITER}{c}") for c in choices)
            hint = "" if guess else f"the {group} settings are {every}"
        else:
            guess = _near_miss(suffix, sorted(nested if delimiter else top_level), cutoff=0.8)
            if guess is None:
                continue  # not ours: some other tool's variable
            hint = ""
        did_you_mean = f"did you mean {_env_name(guess)}?" if guess else ""
        raise ConfigurationError(
            f"unknown setting in {variable.describe()}: "
            + "; ".join(part for part in (did_you_mean, hint) if part)
        )


def describe_invalid(settings_cls: type[BaseModel], error: ValidationError) -> str:
    """One line for every problem in ``error``: where it was set and what is accepted."""
    variables = {v.name.upper(): v for v in _set_variables(os.environ, settings_cls)}
    problems = []
    for problem in error.errors():
        location = tuple(str(part) for part in problem["loc"])
        name = _env_name(NESTED_DELIMITER.join(location))
        variable = variables.get(name) or _group_variable(variables, location)
        where = variable.describe() if variable else f"setting {'.'.join(location)}"
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
    return (
        annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    )


def _is_secret(field: FieldInfo | None) -> bool:
    return field is not None and SecretStr in _alternatives(field.annotation)


def _near_miss(name: str, choices: list[str], cutoff: float) -> str | None:
    """The choice ``name`` most likely meant: an abbreviation of it, or a close spelling."""
    abbreviated = [c for c in choices if len(name) >= 3 and c.startswith(name)]
    if len(abbreviated) == 1:
        return abbreviated[0]
    matches = difflib.get_close_matches(name, choices, n=1, cutoff=cutoff)
    return matches[0] if matches else None


def _env_name(setting: str) -> str:
    return ENV_PREFIX + setting.upper()


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
