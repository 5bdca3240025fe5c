"""Settings.from_env fed plain dicts, and the CLI's refusal of a bad setting."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from progress_sse.cli import commands as cli
from progress_sse.cli import serve
from progress_sse.config import DEFAULT_REDIS_URL, TABLE, ConfigError, Settings

ALL_VARIABLES = (
    "REDIS_URL",
    "CELERY_BROKER_URL",
    "PORT",
    "HOST",
    "PROGRESS_SSE_HEARTBEAT",
    "PROGRESS_SSE_HISTORY_TTL",
    "PROGRESS_SSE_HISTORY_MAX",
    "PROGRESS_SSE_MAX_RATE",
    "PROGRESS_SSE_KEY_PREFIX",
    "PROGRESS_SSE_QUEUE",
)


def test_empty_environment_gives_the_documented_defaults() -> None:
    settings = Settings.from_env({})
    assert settings == Settings()
    assert settings.redis_url == "redis://localhost:6379/0" == DEFAULT_REDIS_URL
    assert settings.broker_url == settings.redis_url
    assert settings.host == "0.0.0.0"
    assert settings.port == 8000
    assert settings.heartbeat == 15.0
    assert settings.history_ttl == 86_400
    assert settings.history_max == 10_000
    assert settings.max_rate == 20.0
    assert settings.key_prefix == "progress-sse"
    assert settings.queue == "celery"


def test_unrelated_variables_are_ignored() -> None:
    assert Settings.from_env({"PATH": "/usr/bin", "HOME": "/root", "PORT_X": "nope"}) == Settings()


def test_every_variable_is_parsed() -> None:
    settings = Settings.from_env(
        {
            "REDIS_URL": "redis://cache.internal:6380/2",
            "CELERY_BROKER_URL": "amqp://guest:guest@rabbit:5672//",
            "PORT": "9001",
            "HOST": "127.0.0.1",
            "PROGRESS_SSE_HEARTBEAT": "2.5",
            "PROGRESS_SSE_HISTORY_TTL": "600",
            "PROGRESS_SSE_HISTORY_MAX": "250",
            "PROGRESS_SSE_MAX_RATE": "7.5",
            "PROGRESS_SSE_KEY_PREFIX": "app_1.progress:v2-x",
            "PROGRESS_SSE_QUEUE": "progress-jobs",
        }
    )
    assert settings == Settings(
        redis_url="redis://cache.internal:6380/2",
        broker_url="amqp://guest:guest@rabbit:5672//",
        port=9001,
        host="127.0.0.1",
        heartbeat=2.5,
        history_ttl=600,
        history_max=250,
        max_rate=7.5,
        key_prefix="app_1.progress:v2-x",
        queue="progress-jobs",
    )
    assert isinstance(settings.port, int) and isinstance(settings.history_ttl, int)
    assert isinstance(settings.heartbeat, float) and isinstance(settings.max_rate, float)


def test_broker_url_defaults_to_the_redis_url() -> None:
    settings = Settings.from_env({"REDIS_URL": "rediss://user:pw@redis.example:6390/4"})
    assert settings.redis_url == "rediss://user:pw@redis.example:6390/4"
    assert settings.broker_url == "rediss://user:pw@redis.example:6390/4"


def test_explicit_broker_url_wins_over_the_redis_url() -> None:
    settings = Settings.from_env({"REDIS_URL": "redis://a:6379/0", "CELERY_BROKER_URL": "redis://b:6379/1"})
    assert settings.redis_url == "redis://a:6379/0"
    assert settings.broker_url == "redis://b:6379/1"


@pytest.mark.parametrize("variable", ALL_VARIABLES)
@pytest.mark.parametrize("blank", ["", "   "])
def test_blank_value_means_the_default(variable: str, blank: str) -> None:
    assert Settings.from_env({variable: blank}) == Settings()


def test_blank_broker_url_falls_back_to_the_redis_url() -> None:
    settings = Settings.from_env({"REDIS_URL": "redis://a:6379/3", "CELERY_BROKER_URL": ""})
    assert settings.broker_url == "redis://a:6379/3"


def test_surrounding_whitespace_is_stripped() -> None:
    settings = Settings.from_env({"PORT": " 8080\n", "HOST": " ::1 ", "PROGRESS_SSE_MAX_RATE": "\t5 "})
    assert (settings.port, settings.host, settings.max_rate) == (8080, "::1", 5.0)


@pytest.mark.parametrize(
    ("variable", "value", "attr", "expected"),
    [
        ("PORT", "1", "port", 1),
        ("PORT", "65535", "port", 65_535),
        ("PROGRESS_SSE_HISTORY_TTL", "1", "history_ttl", 1),
        ("PROGRESS_SSE_HISTORY_MAX", "1", "history_max", 1),
        ("PROGRESS_SSE_HEARTBEAT", "0.25", "heartbeat", 0.25),
        ("PROGRESS_SSE_MAX_RATE", "1e3", "max_rate", 1000.0),
        ("PROGRESS_SSE_KEY_PREFIX", "x" * 64, "key_prefix", "x" * 64),
        ("REDIS_URL", "unix:///run/redis.sock", "redis_url", "unix:///run/redis.sock"),
        ("CELERY_BROKER_URL", "sentinel://s1:26379", "broker_url", "sentinel://s1:26379"),
        ("PROGRESS_SSE_SECRET", "s" * 32, "secret", "s" * 32),
        (
            "PROGRESS_SSE_ALLOWED_HOSTS",
            "Example.com, .example.org,[::1],127.0.0.1",
            "allowed_hosts",
            ("example.com", ".example.org", "[::1]", "127.0.0.1"),
        ),
        ("PROGRESS_SSE_ALLOWED_HOSTS", "*", "allowed_hosts", ("*",)),
        (
            "PROGRESS_SSE_CORS_ORIGINS",
            "https://app.example.com, http://localhost:3000",
            "cors_origins",
            ("https://app.example.com", "http://localhost:3000"),
        ),
        ("PROGRESS_SSE_WATCHER_ERRORS", "type", "watcher_errors", "type"),
    ],
)
def test_boundary_values_are_accepted(variable: str, value: str, attr: str, expected: Any) -> None:
    assert getattr(Settings.from_env({variable: value}), attr) == expected


BAD_VALUES = [
    ("REDIS_URL", "localhost:6379"),
    ("REDIS_URL", "http://redis.example:6379/0"),
    ("REDIS_URL", "redis:/missing-slash"),
    ("REDIS_URL", "amqp://guest@rabbit//"),  # the broker's kind of URL, not one for events
    ("REDIS_URL", "sentinel://host:26379"),
    ("CELERY_BROKER_URL", "rabbit"),
    ("CELERY_BROKER_URL", "https://broker.example"),
    ("PORT", "nope"),
    ("PORT", "0"),
    ("PORT", "65536"),
    ("PORT", "-80"),
    ("PORT", "80.5"),
    ("PROGRESS_SSE_HEARTBEAT", "soon"),
    ("PROGRESS_SSE_HEARTBEAT", "0"),
    ("PROGRESS_SSE_HEARTBEAT", "-1"),
    ("PROGRESS_SSE_HEARTBEAT", "nan"),
    ("PROGRESS_SSE_HEARTBEAT", "inf"),
    ("PROGRESS_SSE_HISTORY_TTL", "a day"),
    ("PROGRESS_SSE_HISTORY_TTL", "0"),
    ("PROGRESS_SSE_HISTORY_TTL", "1.5"),
    ("PROGRESS_SSE_HISTORY_MAX", "many"),
    ("PROGRESS_SSE_HISTORY_MAX", "-3"),
    ("PROGRESS_SSE_HISTORY_MAX", "0"),
    ("PROGRESS_SSE_MAX_RATE", "fast"),
    ("PROGRESS_SSE_MAX_RATE", "0"),
    ("PROGRESS_SSE_MAX_RATE", "-20"),
    ("PROGRESS_SSE_MAX_RATE", "NaN"),
    ("PROGRESS_SSE_MAX_RATE", "1e400"),
    ("PROGRESS_SSE_KEY_PREFIX", "app{1}"),
    ("PROGRESS_SSE_KEY_PREFIX", "has space"),
    ("PROGRESS_SSE_KEY_PREFIX", "x" * 65),
    ("PROGRESS_SSE_KEY_PREFIX", "prögress"),
    ("PROGRESS_SSE_KEY_PREFIX", "a/b"),
    ("PROGRESS_SSE_ALLOWED_HOSTS", "example.com:8000"),
    ("PROGRESS_SSE_ALLOWED_HOSTS", "http://example.com"),
    ("PROGRESS_SSE_CORS_ORIGINS", "https://app.example.com/"),
    ("PROGRESS_SSE_CORS_ORIGINS", "*"),
    ("PROGRESS_SSE_CORS_ORIGINS", "https://*.example.com"),
    ("PROGRESS_SSE_CORS_ORIGINS", "app.example.com"),
    ("PROGRESS_SSE_WATCHER_ERRORS", "none"),
    ("PROGRESS_SSE_PUBLIC_KEY", "/no/such/key.pem"),
]


def test_a_bad_secret_is_reported_without_repeating_it() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"PROGRESS_SSE_SECRET": "hunter2-too-short"})
    assert str(info.value).startswith("PROGRESS_SSE_SECRET is not valid: expected at least 32 characters (got 17)")
    assert "hunter2" not in str(info.value)


def test_the_public_key_is_read_from_its_file_and_a_private_key_is_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private = ec.generate_private_key(ec.SECP256R1())
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "public.pem").write_bytes(public_pem)
    assert (
        Settings.from_env({"PROGRESS_SSE_PUBLIC_KEY": str(tmp_path / "public.pem")}).public_key == public_pem.decode()
    )
    assert Settings.from_env({"PROGRESS_SSE_PUBLIC_KEY": public_pem.decode()}).keyed
    private_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    with pytest.raises(ConfigError, match="the private key stays with the app that signs"):
        Settings.from_env({"PROGRESS_SSE_PUBLIC_KEY": private_pem})
    with pytest.raises(ConfigError, match="not a PEM public key"):
        Settings.from_env(
            {"PROGRESS_SSE_PUBLIC_KEY": "-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----"}
        )


@pytest.mark.parametrize(("variable", "value"), BAD_VALUES)
def test_bad_value_raises_config_error_naming_variable_and_value(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({variable: value})
    message = str(info.value)
    assert variable in message
    assert value in message


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="PORT"):
        Settings.from_env({"PORT": "eighty"})


def test_bad_redis_url_is_reported_even_when_the_broker_url_is_valid() -> None:
    with pytest.raises(ConfigError, match="REDIS_URL='localhost'"):
        Settings.from_env({"REDIS_URL": "localhost", "CELERY_BROKER_URL": "redis://ok:6379/0"})


def test_with_returns_a_changed_copy_and_leaves_the_original() -> None:
    base = Settings()
    changed = base.with_(port=9000, queue="q")
    assert (changed.port, changed.queue) == (9000, "q")
    assert (base.port, base.queue) == (8000, "celery")
    assert changed.with_(port=8000, queue="celery") == base


# --- the command line -------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No setting leaks in from the machine, and nothing can really start."""
    for variable in ALL_VARIABLES:
        monkeypatch.delenv(variable, raising=False)

    def refuse(*args: Any, **kwargs: Any) -> int:
        raise AssertionError("the command must stop at its configuration check, not start anything")

    for runner in ("_web", "_worker", "_dev"):
        monkeypatch.setattr(serve, runner, refuse)
    return monkeypatch


@pytest.mark.usefixtures("clean_env")
def test_cli_port_flag_that_is_not_a_number_exits_2_naming_port_and_value(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["web", "--port", "nope"]) == 2
    captured = capsys.readouterr()
    assert "PORT" in captured.err
    assert "'nope'" in captured.err
    assert captured.out == ""


def test_cli_bad_port_from_the_environment_exits_2(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("PORT", "99999")
    assert cli.main(["web"]) == 2
    err = capsys.readouterr().err
    assert "PORT" in err and "99999" in err


@pytest.mark.usefixtures("clean_env")
@pytest.mark.parametrize(
    ("argv", "variable", "value"),
    [
        (["web", "--heartbeat", "0"], "PROGRESS_SSE_HEARTBEAT", "0"),
        (["web", "--redis-url", "localhost:6379"], "REDIS_URL", "localhost:6379"),
        (["worker", "--broker-url", "rabbit"], "CELERY_BROKER_URL", "rabbit"),
        (["dev", "--key-prefix", "a{b}"], "PROGRESS_SSE_KEY_PREFIX", "a{b}"),
    ],
)
def test_cli_bad_flag_exits_2_naming_setting_and_value(
    argv: list[str], variable: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert variable in err and value in err


def test_cli_flag_overrides_a_bad_environment_value(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The flag wins over the variable: a valid --port hides a bad PORT, so the command
    goes on to start (here, into the stub that proves it got past the check)."""
    clean_env.setenv("PORT", "nope")
    started: list[Any] = []
    clean_env.setattr(serve, "_web", lambda settings: started.append(settings) or 0)
    clean_env.setattr(serve.logging, "basicConfig", lambda **kwargs: None)  # keep the test process's logging
    assert cli.main(["web", "--port", "8123"]) == 0
    assert [s.port for s in started] == [8123]
    assert "nope" not in capsys.readouterr().err


def test_web_with_an_allow_list_that_does_not_import_stops_with_the_setting_named(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from progress_sse import cli

    assert cli.main(["web", "--allowlist", "nowhere.at_all:TASKS", "--port", "8999"]) == 2
    err = capsys.readouterr().err
    assert "PROGRESS_SSE_ALLOWLIST='nowhere.at_all:TASKS'" in err and "cannot be loaded" in err


def test_settings_round_trip_through_the_environment_they_hand_to_children() -> None:
    changed = Settings(
        redis_url="redis://cache:6380/2",
        broker_url="amqp://guest@rabbit//",
        host="127.0.0.1",
        port=9001,
        heartbeat=2.5,
        history_ttl=60,
        history_max=50,
        max_rate=7.5,
        key_prefix="shop",
        queue="reports",
        worker_ttl=9,
        allowlist="shop.progress:TASKS",
        secret="k" * 40,
        allowed_hosts=("shop.example", ".example.org"),
        cors_origins=("https://a.example", "http://localhost:3000"),
        watcher_errors="type",
    )
    assert Settings.from_env(changed.to_env()) == changed
    assert "PROGRESS_SSE_ALLOWLIST" not in Settings().to_env(), "no allow-list: the demo tasks"


def test_the_readme_configuration_table_is_the_settings_table() -> None:
    """Every setting, in order, with its default; nothing else."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:3] for line in section.splitlines() if line.startswith("| `")]
    assert [name.strip().strip("`") for name, _ in rows] == [s.env for s in TABLE]
    defaults = Settings()
    for (_, cell), setting in zip(rows, TABLE, strict=True):
        assert setting.default_help(defaults) in cell, (setting.env, cell)


def test_the_settings_table_declares_every_field_once() -> None:
    assert sorted(s.attr for s in TABLE) == sorted(f.name for f in dataclasses.fields(Settings))
    assert len({s.env for s in TABLE}) == len(TABLE)
