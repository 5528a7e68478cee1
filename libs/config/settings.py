"""Typed, frozen, layered settings shared by every service.

Layers, later wins: dataclass defaults, a TOML file (`--config PATH` or `<PREFIX>CONFIG`),
environment variables `<PREFIX><FIELD>` (e.g. `VOICEEDGE_RELAY_MAX_BINDINGS`), then command
line flags (`--max-bindings`). Unknown keys in the file or unknown `<PREFIX>*` variables are
errors, not silently ignored. Each settings class validates itself in `validate()`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar


class SettingsError(ValueError):
    """A setting is unknown, malformed or out of range; the message names it and its source."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServiceSettings:
    """Settings every service has. Subclasses add their own fields, all with defaults."""

    grpc_listen: str = dataclasses.field(
        default="127.0.0.1:0", metadata={"help": "host:port of the gRPC server (port 0: any free)"}
    )
    metrics_listen: str = dataclasses.field(
        default="", metadata={"help": "host:port of the Prometheus /metrics endpoint; empty: off"}
    )
    otlp_endpoint: str = dataclasses.field(
        default="", metadata={"help": "OTLP/gRPC collector for traces and metrics; empty: off"}
    )
    log_level: str = dataclasses.field(default="INFO", metadata={"help": "DEBUG, INFO, WARNING"})
    drain_grace_s: float = dataclasses.field(
        default=30.0, metadata={"help": "on the first SIGTERM, how long sessions may finish"}
    )

    def validate(self) -> None:
        parse_host_port(self.grpc_listen, "grpc_listen")
        if self.metrics_listen:
            parse_host_port(self.metrics_listen, "metrics_listen")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise SettingsError(f"log_level: unknown level {self.log_level!r}")
        if self.drain_grace_s < 0:
            raise SettingsError("drain_grace_s: must be >= 0")


def parse_host_port(value: str, name: str) -> tuple[str, int]:
    """`127.0.0.1:80` or `[::1]:80` -> (host, port); raises SettingsError naming the setting."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise SettingsError(f"{name}: expected host:port, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise SettingsError(f"{name}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise SettingsError(f"{name}: port {port} out of range")
    return host, port


T = TypeVar("T", bound=ServiceSettings)


def _fields(cls: type[ServiceSettings]) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _field_type(cls: type[ServiceSettings], name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _coerce(value: Any, kind: Any, name: str, source: str) -> Any:
    """Converts a TOML value or a string from env/flags to the field's declared type."""
    origin = typing.get_origin(kind)
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"not a boolean: {value!r}")
        if kind is int:
            if isinstance(value, bool):
                raise ValueError("boolean given for an integer")
            return int(value)
        if kind is float:
            return float(value)
        if kind is str:
            if not isinstance(value, str):
                raise ValueError(f"expected a string, got {type(value).__name__}")
            return value
        if origin is tuple:
            (item,) = (a for a in typing.get_args(kind) if a is not Ellipsis)
            items = value if isinstance(value, list | tuple) else _split(str(value))
            return tuple(_coerce(v, item, name, source) for v in items)
        if origin in (types.UnionType, typing.Union):
            raise ValueError("optional settings are not supported; use an empty default")
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"{name} (from {source}): {exc}") from None
    raise SettingsError(f"{name}: unsupported setting type {kind!r}")


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def build_parser(
    cls: type[ServiceSettings], prog: str, description: str
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every flag can also be set in the --config TOML file (key = field name) or "
        "as an environment variable (see the prefix above).",
    )
    parser.add_argument("--config", metavar="PATH", help="TOML settings file", default=None)
    for name, field in _fields(cls).items():
        default = field.default if field.default is not dataclasses.MISSING else None
        parser.add_argument(
            flag_name(name),
            dest=name,
            metavar=name.upper(),
            default=argparse.SUPPRESS,
            help=f"{field.metadata.get('help', '')} (default: {default!r})",
        )
    return parser


def load_settings(
    cls: type[T],
    argv: Sequence[str] | None,
    *,
    env_prefix: str,
    prog: str,
    description: str,
    environ: Mapping[str, str] | None = None,
) -> T:
    """Builds a validated, frozen `cls` from defaults, file, environment and flags.

    argparse exits with status 2 on bad flags and 0 on --help, as command line users expect.
    """
    environ = os.environ if environ is None else environ
    parser = build_parser(cls, prog, description)
    parser.description = f"{description.strip()}\n\nEnvironment prefix: {env_prefix}"
    args = vars(parser.parse_args(list(argv) if argv is not None else None))
    known = _fields(cls)
    values: dict[str, Any] = {}

    config_path = args.pop("config", None) or environ.get(env_prefix + "CONFIG")
    if config_path:
        try:
            data = tomllib.loads(Path(config_path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError(f"config file {config_path}: {exc}") from None
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise SettingsError(f"config file {config_path}: unknown keys {unknown}")
        for key, raw in data.items():
            values[key] = _coerce(raw, _field_type(cls, key), key, str(config_path))

    for var, raw in environ.items():
        if not var.startswith(env_prefix) or var == env_prefix + "CONFIG":
            continue
        key = var[len(env_prefix) :].lower()
        if key not in known:
            raise SettingsError(f"environment variable {var}: unknown setting {key!r}")
        values[key] = _coerce(raw, _field_type(cls, key), key, var)

    for key, raw in args.items():
        values[key] = _coerce(raw, _field_type(cls, key), key, flag_name(key))

    settings = cls(**values)
    settings.validate()
    return settings
