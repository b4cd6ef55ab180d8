"""Router configuration: defaults < TOML file (``--config``) < environment < command-line flags.

Read once, at the edge (``__main__``), and handed inward as plain keyword arguments; the core
and the service never import this module. Environment variables are
``CREDIT_ROUTER_<FIELD>``, nested with ``__`` (``CREDIT_ROUTER_CURVE__SECRET_KEY_FILE``).
Durations are float seconds named ``*_s``. A bad value fails with one line naming the setting.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    SettingsConfigDict,
)

from credit_common.settings import (
    LayeredSettings,
    SettingsError,
    describe_error,
    endpoint_problem,
)

__all__ = ["CurveSettings", "LayeredSettings", "RouterSettings", "SettingsError", "describe_error"]

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["text", "json"]
RoutingPolicy = Literal["sticky", "least_loaded"]


class CurveSettings(BaseModel):
    """CurveZMQ authentication of workers (and of TCP producers)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    secret_key_file: Path | None = None
    """The router's secret key file (``credit-router keys generate``)."""
    secret_key: SecretStr | None = None
    """Or the Z85 secret key itself (e.g. from a Kubernetes secret in the environment)."""
    allowed_keys: Path | None = None
    """A directory of ``*.key`` files, or one file, listing the workers' public keys."""


class RouterSettings(LayeredSettings):
    """Everything ``credit-router serve`` can be told."""

    model_config = SettingsConfigDict(
        env_prefix="CREDIT_ROUTER_",
        env_nested_delimiter="__",
        frozen=True,
        extra="forbid",
        use_attribute_docstrings=True,  # the docstrings are the CLI's help
    )

    worker_endpoint: str = "tcp://127.0.0.1:5557"
    """Where workers connect. A non-loopback address needs CURVE or ``insecure``."""
    producer_endpoint: str = f"ipc://{tempfile.gettempdir()}/credit-router.ipc"
    """Where producers connect (IPC by default, ``tcp://…`` allowed)."""
    http_host: str = "127.0.0.1"
    """HTTP endpoints (``/metrics``, ``/livez``, ``/readyz``, ``/status``) bind here."""
    http_port: int = Field(default=9464, ge=0, le=65535)
    heartbeat_interval_s: PositiveFloat = 1.0
    suspect_after_missed: PositiveInt = 3
    """Silent beats after which a worker gets nothing new."""
    lost_after_s: PositiveFloat = 5.0
    """Silence after which a worker is lost and its credits end (the grace period)."""
    closed_grace_s: PositiveFloat = 1.0
    """A worker whose connection closed (its process died, a link was cut) is suspect at once
    and lost this long after, unless it says hello again (capped at ``lost_after_s``)."""
    inflight_report_interval_s: PositiveFloat = 5.0
    drain_deadline_s: NonNegativeFloat = 30.0
    producer_timeout_s: PositiveFloat = 60.0
    max_sessions: PositiveInt = 1_000_000
    session_idle_ttl_s: PositiveFloat = 600.0
    queue_limit: NonNegativeInt = 100_000
    worker_queue_limit: NonNegativeInt = 10_000
    queue_timeout_s: PositiveFloat | None = None
    """A credit waiting this long in the router for a worker ends ``rejected: queue_timeout``
    (unset: it waits until the producer cancels it)."""
    soft_affinity_gap: PositiveFloat | None = None
    """Re-home a migratable session when its worker's load ratio exceeds the least-loaded
    worker's by more than this (``None``: hard affinity only)."""
    spawn_affinity_slack: NonNegativeFloat | None = None
    """Put a SPAWN child's first turn on its parent's worker when within this load ratio."""
    routing_policy: RoutingPolicy = "sticky"
    """``sticky`` (docs/ROUTING.md); ``least_loaded`` routes every credit as a new session, FORK
    children too: a baseline for measuring what stickiness is worth (``credit-router run
    --compare``), never for production."""
    latency_histograms: bool = True
    """Keep the submit->dispatch and completion histograms (set false only to measure what
    they cost: every other metric is computed at scrape time and costs nothing per credit)."""
    latency_buckets_s: tuple[NonNegativeFloat, ...] | None = None
    """Upper bounds (seconds, increasing) of the two delay histograms; flag: comma-separated
    (``--latency-buckets-s 0,0.001,0.01,0.1,1``), environment: a JSON list. Default: 0, then
    10 µs to 120 s, ~3 per decade."""
    log_level: LogLevel = "info"
    log_format: LogFormat = "text"
    insecure: bool = False
    """Allow plaintext on a non-loopback worker endpoint (logs a warning)."""
    curve: CurveSettings = CurveSettings()

    @field_validator("worker_endpoint", "producer_endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        problem = endpoint_problem(value, bind=True)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("latency_buckets_s")
    @classmethod
    def _increasing(cls, value: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if value is not None and (not value or list(value) != sorted(set(value))):
            raise ValueError("must be a non-empty list of strictly increasing bounds")
        return value

    @model_validator(mode="after")
    def _grace_covers_suspicion(self) -> RouterSettings:
        suspect = self.heartbeat_interval_s * self.suspect_after_missed
        if self.lost_after_s < suspect:
            raise ValueError(
                f"lost_after_s ({self.lost_after_s}) must be at least heartbeat_interval_s x "
                f"suspect_after_missed ({suspect:g})"
            )
        return self

    def redacted(self) -> dict[str, Any]:
        """The settings as plain data, fit to print (secrets show as ``**********``)."""
        data: dict[str, Any] = json.loads(self.model_dump_json())
        return data
