"""The one settings object: every ``CERTSYNC_*`` environment variable (and ``.env``), validated."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal
from uuid import UUID
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import psycopg
from psycopg.conninfo import conninfo_to_dict
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Configuration as pinned in ``docs`` / interface section 2. Reading it does no I/O beyond ``.env``."""

    model_config = SettingsConfigDict(
        env_prefix="CERTSYNC_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    database_url: str | None = Field(default=None, description="PostgreSQL/Supabase DSN; unset: embedded")
    data_dir: str | None = Field(default=None, description="where the embedded PostgreSQL lives")

    dynamics_base_url: str | None = None
    dynamics_api: Literal["contract-v1", "dataverse"] = Field(
        default="contract-v1", description="which wire the portal speaks (interface section 4 or 5)"
    )
    dynamics_sync_enabled: bool | None = Field(
        default=None, description="feature flag; defaults to true exactly when the base URL is set"
    )
    dynamics_token: SecretStr | None = None
    dynamics_token_url: str | None = None
    dynamics_client_id: str | None = None
    dynamics_client_secret: SecretStr | None = None
    dynamics_scope: str | None = None
    dynamics_signing_secret: SecretStr | None = None
    dynamics_tenant_id: str | None = Field(
        default=None, description="Entra ID tenant: tokens come from Entra ID through msal"
    )
    dynamics_client_certificate: Path | None = Field(
        default=None, description="PEM file with a certificate and its key, instead of a client secret"
    )
    dynamics_authority_host: str = Field(
        default="https://login.microsoftonline.com",
        description="Entra ID's authority host (another cloud: e.g. https://login.microsoftonline.us)",
    )
    dataverse_table: str = Field(default="hlf_certification", pattern=r"^[a-z][a-z0-9_]{0,63}$")
    dataverse_entity_set: str = Field(default="hlf_certifications", pattern=r"^[a-z][a-z0-9_]{0,63}$")
    dataverse_batch_size: int = Field(
        default=100, ge=1, le=1000, description="most targets in one UpsertMultiple; 1: one PATCH per change"
    )
    dynamics_rate_window_seconds: float = Field(
        default=300.0,
        gt=0.0,
        le=86400.0,
        description="the portal's service-protection sliding window (Dataverse: 300 s); sends pace on it",
    )
    dynamics_max_requests_per_window: int | None = Field(
        default=None,
        ge=1,
        description="client-side limit per window for a portal that reports no remaining budget; unset: off",
    )

    dynamics_organisation_id: UUID | None = Field(
        default=None,
        description="the organisation whose portal this is; unset: every organisation's mentors are sent",
    )
    reconcile_interval_seconds: float = Field(
        default=3600.0, ge=0.0, le=7 * 86400.0, description="how often a running worker reconciles; 0: never"
    )
    auto_replay: bool = Field(
        default=True, description="the worker re-sends pending queue entries itself (1, 5, 15, 60 min apart)"
    )
    outbox_retention_days: float = Field(
        default=30.0,
        gt=0.0,
        le=3650.0,
        description="delivered and superseded outbox events are kept this long",
    )
    queue_retention_days: float = Field(
        default=90.0,
        gt=0.0,
        le=3650.0,
        description="replayed and discarded retry-queue entries are kept this long after they became final",
    )
    audit_retention_days: float = Field(
        default=365.0,
        gt=0.0,
        le=36500.0,
        description="access-audit records (private.access_audit) are kept this long",
    )

    retry_max_retries: int = Field(default=3, ge=0, le=20)
    retry_base_delay: float = Field(default=2.0, ge=0.0, le=3600.0)
    retry_max_retry_after: float = Field(default=60.0, ge=0.0, le=3600.0)

    breaker_failure_threshold: int = Field(default=3, ge=1, le=1000)
    breaker_cooldown: float = Field(default=30.0, ge=0.0, le=86400.0)

    http_timeout: float = Field(default=10.0, gt=0.0, le=600.0)

    worker_lease_seconds: float = Field(
        default=60.0,
        ge=1.0,
        le=3600.0,
        description="how long a claim lives without a heartbeat: a dead worker's events wait this long",
    )

    timezone: str = Field(
        default="Europe/Oslo", description="where 'today' is decided: expiry and public listing"
    )

    log_format: Literal["json", "console"] | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # The operator console (docs/console.md): at least the token or the username and password.
    console_operator_token: SecretStr | None = Field(
        default=None, description="bearer token for /api/ and token sign-in; at least 24 characters"
    )
    console_operator_name: str = Field(
        default="operator", min_length=1, max_length=64, description="who token sign-ins act as"
    )
    console_username: str | None = Field(default=None, min_length=1, max_length=64)
    console_password: SecretStr | None = Field(default=None, description="at least 12 characters")
    console_session_secret: SecretStr | None = Field(
        default=None, description="signs session cookies (32+ characters); unset: a random one per process"
    )
    console_session_hours: float = Field(default=8.0, gt=0.0, le=24.0 * 30)
    console_secure_cookies: bool = Field(
        default=False, description="set when served over HTTPS; implied when listening beyond loopback"
    )

    @field_validator("database_url")
    @classmethod
    def _parsable_database_url(cls, value: str | None) -> str | None:
        # Parsing does no I/O; a typo is bad configuration (exit 2), not an unreachable database.
        if value is not None:
            try:
                conninfo_to_dict(value)
            except psycopg.ProgrammingError:
                raise ValueError("not a PostgreSQL connection string or URL") from None
        return value

    @field_validator("dynamics_token", "dynamics_client_secret", "dynamics_signing_secret")
    @classmethod
    def _not_empty(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("must not be empty (unset it instead)")
        return value

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @model_validator(mode="after")
    def _derive_defaults(self) -> Settings:
        if self.dynamics_sync_enabled is None:
            self.dynamics_sync_enabled = self.dynamics_base_url is not None
        if self.log_format is None:
            self.log_format = "console" if sys.stdout.isatty() else "json"
        return self

    @property
    def sync_enabled(self) -> bool:
        return bool(self.dynamics_sync_enabled)
