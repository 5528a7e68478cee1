"""Typed, frozen, layered settings shared by every service.

Layers, later wins: dataclass defaults, a TOML file (`--config PATH` or `<PREFIX>CONFIG`),
environment variables `<PREFIX><FIELD>` (e.g. `VOICEEDGE_RELAY_MAX_BINDINGS`), then command
line flags (`--max-bindings`). Unknown keys in the file or unknown `<PREFIX>*` variables are
errors, not silently ignored.

A field declares its own constraints with `setting(default, help, ge=..., choices=...,
parse=...)`; `validate()` checks every field's rule, so a subclass overrides it only for
rules that tie two fields together. The rule is also written into `--help` and the README
settings tables (`settings_table`), so the documented range is the enforced one.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import tomllib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar


class SettingsError(ValueError):
    """A setting is unknown, malformed or out of range; the message names it and its source."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule:
    """What a setting's value must satisfy. For a tuple setting the bounds, choices and parser
    apply to each item and `nonempty` to the tuple."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[object, ...] | None = None
    # Raises ValueError (its message is shown) when the value is malformed.
    parse: Callable[[Any], object] | None = None
    # The empty string (or empty tuple) is allowed and skips `parse`: the setting is off.
    optional: bool = False
    nonempty: bool = False
    what: str = ""  # what `parse` accepts, in words for --help: "each >= 16 chars, not ek_"

    def describe(self) -> str:
        """The rule in words, for --help and the README tables."""
        parts = []
        if self.choices is not None:
            parts.append("one of " + ", ".join(str(c) for c in self.choices))
        if bounds := self.describe_bounds():
            parts.append(bounds)
        if self.what:
            parts.append(self.what + (" or empty" if self.optional else ""))
        if self.nonempty:
            parts.append("at least one")
        return "; ".join(parts)

    def check(self, name: str, value: object) -> None:
        if isinstance(value, tuple):
            if self.nonempty and not value:
                raise SettingsError(f"{name}: at least one value is needed")
            for item in value:
                self._check_one(name, item)
        else:
            self._check_one(name, value)

    def _check_one(self, name: str, value: Any) -> None:
        if self.optional and value == "":
            return
        if self.nonempty and value == "":
            raise SettingsError(f"{name}: must not be empty")
        if self.choices is not None and value not in self.choices:
            allowed = ", ".join(str(c) for c in self.choices)
            raise SettingsError(f"{name}: expected one of {allowed}, got {value!r}")
        if isinstance(value, int | float) and not isinstance(value, bool):
            if isinstance(value, float) and not math.isfinite(value):
                raise SettingsError(f"{name}: must be a finite number")
            if (
                (self.ge is not None and value < self.ge)
                or (self.gt is not None and value <= self.gt)
                or (self.le is not None and value > self.le)
                or (self.lt is not None and value >= self.lt)
            ):
                raise SettingsError(f"{name}: must be {self.describe_bounds()}, got {value!r}")
        if self.parse is not None:
            try:
                self.parse(value)
            except SettingsError:
                raise  # the parser named the setting itself
            except ValueError as exc:
                raise SettingsError(f"{name}: {exc}") from None

    def describe_bounds(self) -> str:
        if self.ge is not None and self.le is not None:
            return f"{_number(self.ge)} to {_number(self.le)}"
        parts = []
        for word, bound in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt)):
            if bound is not None:
                parts.append(f"{word} {_number(bound)}")
        return " and ".join(parts)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def setting(
    default: Any,
    help: str,
    **rule: Any,
) -> Any:
    """A settings field: its default, its help line and (keywords of `Rule`) its constraints."""
    metadata: dict[str, object] = {"help": help}
    if rule:
        metadata["rule"] = Rule(**rule)
    return dataclasses.field(default=default, metadata=metadata)


def rule_of(field: dataclasses.Field[Any]) -> Rule | None:
    found = field.metadata.get("rule")
    return found if isinstance(found, Rule) else None


def inherited_rule(cls: type, name: str) -> Rule | None:
    """The rule of field `name`, from the most derived class that declares one: a subclass
    that only changes a default (`grpc_listen`) keeps the base class's check."""
    for klass in cls.__mro__:
        declared = getattr(klass, "__dataclass_fields__", {}).get(name)
        if declared is not None and (rule := rule_of(declared)) is not None:
            return rule
    return None


def host_port(value: str) -> tuple[str, int]:
    """`127.0.0.1:80` or `[::1]:80` -> (host, port); ValueError says what is wrong. A
    `Rule.parse` for address settings."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected host:port, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    return host, port


def log_level(value: str) -> str:
    if value.upper() not in LOG_LEVELS:
        raise ValueError(f"unknown level {value!r}")
    return value.upper()


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def redis_url(value: str) -> str:
    """A `Rule.parse` for Redis URLs (the schemes redis-py's `from_url` takes)."""
    if not value.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"expected redis://, rediss:// or unix://, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServiceSettings:
    """Settings every service has. Subclasses add their own fields, all with defaults."""

    grpc_listen: str = setting(
        "127.0.0.1:0",
        "host:port of the gRPC server (port 0: any free)",
        parse=host_port,
    )
    metrics_listen: str = setting(
        "",
        "host:port of the Prometheus /metrics endpoint; empty: off",
        parse=host_port,
        optional=True,
    )
    otlp_endpoint: str = setting("", "OTLP/gRPC collector for traces and metrics; empty: off")
    log_level: str = setting(
        "INFO", "log threshold", parse=log_level, what="DEBUG, INFO, WARNING or ERROR"
    )
    drain_grace_s: float = setting(30.0, "on the first SIGTERM, how long sessions may finish", ge=0)

    def validate(self) -> None:
        """Checks every field's declared rule; override (calling super) for rules that tie
        fields together."""
        for field in dataclasses.fields(self):
            rule = inherited_rule(type(self), field.name)
            if rule is not None:
                rule.check(field.name, getattr(self, field.name))


def join_host_port(host: str, port: int) -> str:
    """The inverse of `host_port`: `127.0.0.1:80`, or `[::1]:80` for an IPv6 literal."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_host_port(value: str, name: str) -> tuple[str, int]:
    """`host_port` for code that reads an address setting: raises SettingsError naming it."""
    try:
        return host_port(value)
    except ValueError as exc:
        raise SettingsError(f"{name}: {exc}") from None


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


def field_help(field: dataclasses.Field[Any], cls: type | None = None) -> str:
    """A field's help line with its rule, as --help and the README tables show it."""
    text = str(field.metadata.get("help", ""))
    rule = rule_of(field) if cls is None else inherited_rule(cls, field.name)
    if rule is not None and (described := rule.describe()):
        text = f"{text} [{described}]"
    return text


def _default_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) if value else "(empty)"
    if value == "":
        return "(empty)"
    return str(value)


def settings_table(cls: type[ServiceSettings]) -> str:
    """The markdown settings table of a service README, built from the same fields and help
    lines as its --help (a test keeps every README's copy equal to this)."""
    rows = ["| setting | default | meaning |", "|---|---|---|"]
    for name, field in _fields(cls).items():
        default = field.default if field.default is not dataclasses.MISSING else ""
        meaning = field_help(field, cls).replace("|", "\\|")
        rows.append(f"| `{name}` | `{_default_text(default)}` | {meaning} |")
    return "\n".join(rows) + "\n"


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
            help=f"{field_help(field, cls)} (default: {default!r})",
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
