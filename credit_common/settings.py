"""Layered settings shared by the router and the worker agent: defaults < TOML file
(``--config``) < environment < command-line flags, and one-line errors naming the setting.

Read once, at the edge (a ``__main__``), and handed inward as plain keyword arguments.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, ClassVar, Self

from pydantic import ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    TomlConfigSettingsSource,
)

__all__ = ["LayeredSettings", "SettingsError", "describe_error", "endpoint_problem"]


class SettingsError(Exception):
    """A setting has a bad value; the message is one line naming it."""


class LayeredSettings(BaseSettings):
    """Settings read from flags (init kwargs) > environment > a TOML file > defaults."""

    config_file: ClassVar[Path | None] = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Flags (passed as init kwargs) > environment > TOML file > defaults."""
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls.config_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=cls.config_file))
        return tuple(sources)

    @classmethod
    def load(cls, config_file: Path | None = None, **flags: Any) -> Self:
        """Build the effective settings; raises ``SettingsError`` with a one-line message.

        Args:
            config_file: a TOML file of settings, or ``None``.
            flags: values given on the command line (``None`` means not given).
        """
        if config_file is not None and not config_file.is_file():
            raise SettingsError(f"config file {config_file} does not exist")
        cls.config_file = config_file
        try:
            return cls(**{k: v for k, v in flags.items() if v is not None})
        except ValidationError as exc:
            raise SettingsError(describe_error(exc)) from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(
                f"config file {config_file} is not valid TOML: {exc}; fix it at that place "
                "(https://toml.io: strings are quoted, one key = value per line)"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise SettingsError(f"cannot read config file {config_file}: {exc}") from None
        finally:
            cls.config_file = None


def describe_error(exc: ValidationError) -> str:
    """One line per problem, naming the setting: ``invalid setting heartbeat_interval_s: …``."""
    parts = []
    for err in exc.errors():
        name = ".".join(str(p) for p in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        if not name:  # a rule across several settings names them in its message
            parts.append(f"invalid settings: {message}")
            continue
        given = err.get("input")
        shown = "" if isinstance(given, dict) else f" (got {given!r})"
        parts.append(f"invalid setting {name}: {message}{shown}")
    return "; ".join(parts)


def endpoint_problem(endpoint: str, *, bind: bool = False) -> str | None:
    """What is wrong with a ZeroMQ endpoint we accept (``tcp://HOST:PORT``, ``ipc://PATH``), or
    ``None``. libzmq itself takes a TCP port above 65535 and silently uses it modulo 65536, so
    ``tcp://host:99999`` would bind or connect to port 34463.

    Args:
        endpoint: the endpoint as given.
        bind: a listening endpoint: port ``0`` or ``*`` (any free port) is allowed.
    """
    scheme, sep, rest = endpoint.partition("://")
    if not sep or scheme not in ("tcp", "ipc"):
        return "expected tcp://HOST:PORT or ipc://PATH"
    if scheme == "ipc":
        return None if rest else "ipc:// needs a path"
    host, colon, port = rest.rpartition(":")
    if not colon or not host:
        return "expected tcp://HOST:PORT"
    if bind and port == "*":
        return None
    if not port.isdigit():
        return f"port {port!r} is not a number"
    lowest = 0 if bind else 1
    if not lowest <= int(port) <= 65535:
        return f"port {port} is out of range ({lowest}-65535)"
    return None
