"""Worker configuration: defaults < TOML file (``--config``) < environment < flags.

Environment variables are ``CREDIT_ROUTER_WORKER_<FIELD>`` (the product's prefix, then the
role), e.g. ``CREDIT_ROUTER_WORKER_ROUTER=tcp://10.0.0.5:5557``. Read once in ``__main__`` and
passed inward as plain values. A bad value fails with one line naming the setting.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, NonNegativeFloat, PositiveInt, field_validator
from pydantic_settings import SettingsConfigDict

from credit_common.settings import LayeredSettings, SettingsError, endpoint_problem

__all__ = ["SettingsError", "WorkerSettings"]


class WorkerSettings(LayeredSettings):
    """Everything ``credit-router worker`` can be told (executor options stay flags)."""

    model_config = SettingsConfigDict(
        env_prefix="CREDIT_ROUTER_WORKER_", env_nested_delimiter="__", frozen=True, extra="forbid"
    )

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
    labels: dict[str, str] = Field(default_factory=dict)
    """Extra labels announced in the hello (host and executor are added)."""
    latency_buckets_s: tuple[NonNegativeFloat, ...] | None = None
    """Upper bounds (seconds, increasing) of the TTFT and duration histograms (default 10 µs
    to 120 s); flag comma-separated, environment a JSON list."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"

    @field_validator("router")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        problem = endpoint_problem(value) if value else None
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("latency_buckets_s")
    @classmethod
    def _increasing(cls, value: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if value is not None and (not value or list(value) != sorted(set(value))):
            raise ValueError("must be a non-empty list of strictly increasing bounds")
        return value

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        """``INFO`` and ``info`` alike, as the router accepts them."""
        return value.lower() if isinstance(value, str) else value

    @classmethod
    def load(cls, config_file: Path | None = None, **flags: Any) -> WorkerSettings:
        """The effective settings; the router address is required (from any source)."""
        settings = super().load(config_file, **flags)
        if not settings.router:
            raise SettingsError(
                "invalid setting router: required (--router or CREDIT_ROUTER_WORKER_ROUTER)"
            )
        return settings
