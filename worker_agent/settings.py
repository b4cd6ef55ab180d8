"""Worker configuration: defaults < TOML file (``--config``) < environment < flags.

Environment variables are ``CREDIT_ROUTER_WORKER_<FIELD>`` (the product's prefix, then the
role), e.g. ``CREDIT_ROUTER_WORKER_ROUTER=tcp://10.0.0.5:5557``. Read once in ``__main__`` and
passed inward as plain values. A bad value fails with one line naming the setting.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, NonNegativeFloat, PositiveInt, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from router_service.settings import SettingsError, describe_error

__all__ = ["SettingsError", "WorkerSettings"]


class WorkerSettings(BaseSettings):
    """Everything ``credit-router worker`` can be told (executor options stay flags)."""

    model_config = SettingsConfigDict(
        env_prefix="CREDIT_ROUTER_WORKER_", env_nested_delimiter="__", frozen=True, extra="forbid"
    )

    config_file: ClassVar[Path | None] = None

    router: str = Field(default="", pattern=r"^(tcp://\S+:\d{1,5}|ipc://\S+)$")
    """The router's worker endpoint (``tcp://HOST:PORT`` or ``ipc://PATH``); required."""
    name: str = Field(default_factory=socket.gethostname, min_length=1, max_length=256)
    """This worker's name; with CURVE, the name its key is bound to."""
    capacity: PositiveInt = 64
    drain_deadline_s: NonNegativeFloat = 30.0
    first_token_events: bool = True
    curve_server_key: Path | None = None
    """The router's public key file (enables CurveZMQ, with ``curve_key``)."""
    curve_key: Path | None = None
    """This worker's key pair file (``NAME.key_secret``)."""
    http_host: str = "127.0.0.1"
    http_port: int | None = Field(default=None, ge=0, le=65535)
    """``/metrics``, ``/livez``, ``/readyz`` (off unless set)."""
    labels: dict[str, str] = {}
    """Extra labels announced in the hello (host and executor are added)."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Flags (init kwargs) > environment > TOML file > defaults."""
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls.config_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=cls.config_file))
        return tuple(sources)

    @classmethod
    def load(cls, config_file: Path | None = None, **flags: Any) -> WorkerSettings:
        """The effective settings; raises ``SettingsError`` with a one-line message."""
        if config_file is not None and not config_file.is_file():
            raise SettingsError(f"config file {config_file} does not exist")
        cls.config_file = config_file
        try:
            settings = cls(**{k: v for k, v in flags.items() if v is not None})
        except ValidationError as exc:
            raise SettingsError(describe_error(exc)) from None
        finally:
            cls.config_file = None
        if not settings.router:
            raise SettingsError(
                "invalid setting router: required (--router or CREDIT_ROUTER_WORKER_ROUTER)"
            )
        return settings
