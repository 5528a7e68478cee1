"""Layered settings: precedence, unknown keys, type errors, validation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from libs.config.settings import (
    ServiceSettings,
    SettingsError,
    host_port,
    join_host_port,
    load_settings,
    parse_host_port,
    redis_url,
    setting,
    settings_table,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoSettings(ServiceSettings):
    max_sessions: int = 10
    region: str = "eu"
    passthrough: bool = False
    relays: tuple[str, ...] = ("127.0.0.1:3478",)

    def validate(self) -> None:
        super().validate()
        if self.max_sessions <= 0:
            raise SettingsError("max_sessions: must be > 0")


def _load(argv: list[str], env: dict[str, str] | None = None) -> DemoSettings:
    return load_settings(
        DemoSettings, argv, env_prefix="DEMO_", prog="demo", description="d", environ=env or {}
    )


def test_defaults() -> None:
    settings = _load([])
    assert settings.max_sessions == 10
    assert settings.grpc_listen == "127.0.0.1:0"
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.max_sessions = 3  # type: ignore[misc]


def test_layers_file_then_env_then_flags(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('max_sessions = 20\nregion = "us"\nrelays = ["a:1", "b:2"]\n')
    settings = _load(
        ["--config", str(config), "--region", "ap"],
        {"DEMO_MAX_SESSIONS": "30", "DEMO_PASSTHROUGH": "yes"},
    )
    assert settings.max_sessions == 30
    assert settings.region == "ap"
    assert settings.passthrough is True
    assert settings.relays == ("a:1", "b:2")


def test_config_from_environment(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("max_sessions = 7\n")
    assert _load([], {"DEMO_CONFIG": str(config)}).max_sessions == 7


def test_env_list_is_comma_separated() -> None:
    assert _load([], {"DEMO_RELAYS": "x:1, y:2"}).relays == ("x:1", "y:2")


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        ([], {"DEMO_MAX_SESIONS": "3"}, "unknown setting 'max_sesions'"),
        (["--max-sessions", "many"], {}, "max_sessions (from --max-sessions)"),
        (["--max-sessions", "0"], {}, "max_sessions: must be > 0"),
        (["--passthrough", "maybe"], {}, "not a boolean"),
        (["--grpc-listen", "nowhere"], {}, "grpc_listen: expected host:port"),
        (["--grpc-listen", "127.0.0.1:70000"], {}, "out of range"),
    ],
)
def test_bad_input_names_the_setting(argv: list[str], env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _load(argv, env)


def test_unknown_file_key_rejected(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("max_sesions = 3\n")
    with pytest.raises(SettingsError, match=r"unknown keys \['max_sesions'\]"):
        _load(["--config", str(config)])


def test_unknown_flag_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        _load(["--no-such-flag", "1"])
    assert exc.value.code == 2


def test_parse_host_port_ipv6() -> None:
    assert parse_host_port("[::1]:3478", "x") == ("::1", 3478)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RuledSettings(ServiceSettings):
    workers: int = setting(0, "worker processes; 0: one per core", ge=0, le=64)
    ratio: float = setting(0.5, "a fraction", gt=0, le=1)
    mode: str = setting("fast", "how", choices=("fast", "safe"))
    peers: tuple[str, ...] = setting(
        ("127.0.0.1:1",), "peer addresses", parse=host_port, nonempty=True
    )
    redis: str = setting("", "store", parse=redis_url, optional=True)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"workers": -1}, "workers: must be 0 to 64, got -1"),
        ({"workers": 65}, "workers: must be 0 to 64, got 65"),
        ({"ratio": 0.0}, "ratio: must be > 0 and <= 1, got 0.0"),
        ({"ratio": float("inf")}, "ratio: must be a finite number"),
        ({"mode": "slow"}, "mode: expected one of fast, safe, got 'slow'"),
        ({"peers": ()}, "peers: at least one value is needed"),
        ({"peers": ("127.0.0.1:1", "nowhere")}, "peers: expected host:port, got 'nowhere'"),
        ({"redis": "http://x"}, "redis: expected redis://"),
        ({"log_level": "loud"}, "log_level: unknown level 'loud'"),
        ({"drain_grace_s": -1.0}, "drain_grace_s: must be >= 0"),
    ],
)
def test_declared_rules_are_enforced(change: dict[str, object], message: str) -> None:
    RuledSettings().validate()
    with pytest.raises(SettingsError) as caught:
        dataclasses.replace(RuledSettings(), **change).validate()  # type: ignore[arg-type]
    assert str(caught.value).startswith(message)


def test_rules_are_shown_in_help_and_in_the_readme_table(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        load_settings(RuledSettings, ["--help"], env_prefix="R_", prog="r", description="d")
    shown = " ".join(capsys.readouterr().out.split())
    assert "worker processes; 0: one per core [0 to 64] (default: 0)" in shown
    table = settings_table(RuledSettings)
    assert "| `workers` | `0` | worker processes; 0: one per core [0 to 64] |" in table
    assert "| `mode` | `fast` | how [one of fast, safe] |" in table
    assert "| `redis` | `(empty)` | store |" in table
    assert "| `peers` | `127.0.0.1:1` | peer addresses [at least one] |" in table
    assert table.count("\n") == 2 + len(dataclasses.fields(RuledSettings))


@dataclasses.dataclass(frozen=True, kw_only=True)
class OverridingSettings(ServiceSettings):
    # Only the default changes, with a plain field: the base class's rule still applies.
    grpc_listen: str = dataclasses.field(default="127.0.0.1:50099", metadata={"help": "x"})


def test_a_field_redefined_without_a_rule_keeps_the_base_rule() -> None:
    OverridingSettings().validate()
    with pytest.raises(SettingsError, match="grpc_listen: expected host:port"):
        OverridingSettings(grpc_listen="nowhere").validate()


@pytest.mark.parametrize(("host", "port"), [("127.0.0.1", 80), ("::1", 443), ("2001:db8::5", 0)])
def test_join_host_port_is_the_inverse_of_host_port(host: str, port: int) -> None:
    text = join_host_port(host, port)
    assert host_port(text) == (host, port)
    assert text.startswith("[") == (":" in host)
