"""Settings: one YAML file plus ``CDCSYNC_*`` environment variables.

Precedence, highest first: explicit overrides (CLI options), environment variables,
the YAML file named by ``--config`` or ``CDCSYNC_CONFIG``, built-in defaults. The four
variables printed by ``cdcsync stack env`` are enough for every command.

Secrets live in DSNs or in ``*_password_file`` files; :func:`redact_dsn` is the only
way a DSN is ever shown.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from cdcsync.errors import ConfigError

ENV_PREFIX = "CDCSYNC_"
_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

#: Every environment variable cdcsync reads, with what it means (README and tests use this).
ENV_VARS: dict[str, str] = {
    "CDCSYNC_CONFIG": "path of the YAML configuration file (same as --config)",
    "CDCSYNC_SOURCE_DSN": "libpq connection string of the source database",
    "CDCSYNC_TARGET_DSN": "libpq connection string of the target database",
    "CDCSYNC_SOURCE_PASSWORD_FILE": "file holding the source password (kept out of the DSN)",
    "CDCSYNC_TARGET_PASSWORD_FILE": "file holding the target password (kept out of the DSN)",
    "CDCSYNC_KAFKA_BOOTSTRAP": "Kafka bootstrap servers, host:port[,host:port]",
    "CDCSYNC_CONNECT_URL": "Kafka Connect REST URL, e.g. http://127.0.0.1:8083",
    "CDCSYNC_CONNECT_SECRETS_FILE": "path, on the Connect worker, of a properties file with "
    "source.password and target.password (read there by Connect's file config provider)",
    "CDCSYNC_MIGRATION_ID": "name of this migration; prefixes slot, publication, topics",
    "CDCSYNC_INSTANCE_ID": "stable name of this daemon in its consumer group (default: host "
    "name); a restarted daemon with the same name takes its partitions back at once",
    "CDCSYNC_TOPIC_PARTITIONS": "partitions of each table's topic, created before the "
    "connector runs (default 1); more lets several daemons share a direction's stream. "
    "Tables without a primary key always get one partition (their events carry no key)",
    "CDCSYNC_SCHEMAS": "comma-separated source schemas to migrate (default: all non-system)",
    "CDCSYNC_TABLES": "comma-separated schema.table list to migrate (default: all in SCHEMAS)",
    "CDCSYNC_WORKERS": "parallel copy workers (default: number of cores)",
    "CDCSYNC_SNAPSHOT_CHUNK_BLOCKS": "snapshot chunk size in 8 KiB units of table plus TOAST "
    "size (default 4096; shrunk for small copies to keep ~4 chunks per worker)",
    "CDCSYNC_METRICS_ADDR": "host:port of /metrics, /livez, /readyz (default 127.0.0.1:9187)",
    "CDCSYNC_STATE_SCHEMA": "schema holding cdcsync's state on each database (default cdcsync)",
    "CDCSYNC_LOG_FORMAT": "text or json (default: text on a terminal, json otherwise)",
}


class ConnectorSettings(BaseModel):
    """How cdcsync renders the Debezium connector it registers."""

    model_config = ConfigDict(extra="forbid")

    heartbeat_interval_ms: int = Field(default=10_000, ge=0)
    max_batch_size: int = Field(default=8192, ge=1)
    max_queue_size: int = Field(default=32768, ge=1)
    # How long Debezium waits for more changes before handing a batch over: it bounds
    # how soon the cutover's drain marker reaches Kafka.
    poll_interval_ms: int = Field(default=20, ge=1)
    extra: dict[str, str] = Field(default_factory=dict)


class ApplySettings(BaseModel):
    """Batching and error policy of the streaming applier."""

    model_config = ConfigDict(extra="forbid")

    batch_max_events: int = Field(default=20_000, ge=1)
    batch_max_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    batch_max_wait_ms: int = Field(default=200, ge=1)
    on_error: Literal["halt", "dead-letter"] = "halt"
    dead_letter_topic: str | None = None
    unknown_table: Literal["halt", "ignore"] = "halt"
    add_new_columns: bool = False
    synchronous_commit: Literal["on", "off", "local"] = "off"
    # A halted stream is retried from its stored offsets this often, so the daemon stays
    # up (and /readyz says why it is not ready) until the operator fixes the cause.
    halt_retry_seconds: float = Field(default=15.0, gt=0)


class HealthSettings(BaseModel):
    """Readiness and liveness thresholds of the daemon, and how often lag is probed."""

    model_config = ConfigDict(extra="forbid")

    lag_slo_seconds: float = Field(default=60.0, gt=0)
    liveness_timeout_seconds: float = Field(default=30.0, gt=0)
    probe_interval_seconds: float = Field(default=5.0, gt=0)


class CutoverSettings(BaseModel):
    """Gates and budget of ``cdcsync cutover`` and ``rollback`` (CLI options override)."""

    model_config = ConfigDict(extra="forbid")

    freeze_timeout_seconds: float = Field(default=10.0, gt=0)
    max_lag_seconds: float = Field(default=30.0, ge=0)
    verify: Literal["none", "counts", "checksum"] = "counts"
    lock_timeout_ms: int = Field(default=500, ge=1)
    fence_attempts: int = Field(default=10, ge=1)
    on_switch: str | None = None


class PgbouncerSettings(BaseModel):
    """The pgbouncer that applications reach the database through (optional).

    ``databases_file`` is the file cdcsync rewrites to repoint ``database`` (pgbouncer's
    ini includes it with ``%include``); ``admin_dsn`` reaches the admin console.
    """

    model_config = ConfigDict(extra="forbid")

    admin_dsn: str
    databases_file: Path
    database: str


class Settings(BaseSettings):
    """Everything a cdcsync command needs to know."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        case_sensitive=False,
    )

    source_dsn: str = ""
    target_dsn: str = ""
    source_password_file: Path | None = None
    target_password_file: Path | None = None
    kafka_bootstrap: str = ""
    connect_url: str = ""
    connect_secrets_file: str | None = None
    migration_id: str = "cdcsync"
    instance_id: str = Field(default_factory=lambda: __import__("socket").gethostname())
    topic_partitions: int = Field(default=1, ge=1, le=1024)
    # Comma-separated in the environment, not JSON: NoDecode leaves the split to us.
    schemas: Annotated[list[str], NoDecode] = Field(default_factory=list)
    tables: Annotated[list[str], NoDecode] = Field(default_factory=list)
    workers: int = Field(default_factory=lambda: os.cpu_count() or 2, ge=1, le=256)
    snapshot_chunk_blocks: int = Field(default=4096, ge=1)
    metrics_addr: str = "127.0.0.1:9187"
    state_schema: str = "cdcsync"
    log_format: Literal["text", "json"] | None = None
    connector: ConnectorSettings = Field(default_factory=ConnectorSettings)
    apply: ApplySettings = Field(default_factory=ApplySettings)
    health: HealthSettings = Field(default_factory=HealthSettings)
    cutover: CutoverSettings = Field(default_factory=CutoverSettings)
    pgbouncer: PgbouncerSettings | None = None

    @field_validator("schemas", "tables", mode="before")
    @classmethod
    def _split_csv(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("migration_id", "state_schema")
    @classmethod
    def _identifier(cls, value: str) -> str:
        if not _IDENT.match(value):
            raise ValueError(
                f"{value!r} must be a lower-case identifier (letters, digits, _; max 63)"
            )
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file arrives through init_settings (see load_settings), below the env.
        return (env_settings, init_settings)

    # Derived names: one migration id drives every object cdcsync creates.
    @property
    def slot_name(self) -> str:
        return f"{self.migration_id}_slot"

    @property
    def publication_name(self) -> str:
        return f"{self.migration_id}_pub"

    @property
    def topic_prefix(self) -> str:
        return self.migration_id

    @property
    def connector_name(self) -> str:
        return f"{self.migration_id}-source"

    # The reverse direction (target → old source after cutover) has names of its own.
    @property
    def reverse_slot_name(self) -> str:
        return f"{self.migration_id}_rev_slot"

    @property
    def reverse_publication_name(self) -> str:
        return f"{self.migration_id}_rev_pub"

    @property
    def reverse_topic_prefix(self) -> str:
        return f"{self.migration_id}_rev"

    @property
    def reverse_connector_name(self) -> str:
        return f"{self.migration_id}-reverse"

    def source_conninfo(self) -> str:
        return _with_password(self.source_dsn, self.source_password_file, "source")

    def target_conninfo(self) -> str:
        return _with_password(self.target_dsn, self.target_password_file, "target")

    def require(self, *names: str) -> None:
        """Fail with one message naming every missing setting and its variable."""
        missing = [n for n in names if not getattr(self, n)]
        if missing:
            listed = ", ".join(f"{n} ({ENV_PREFIX}{n.upper()})" for n in missing)
            raise ConfigError(f"missing setting(s): {listed}")


class _Overridden(Settings):
    """Settings rebuilt with explicit overrides, which win over the environment."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def _with_password(dsn: str, password_file: Path | None, side: str) -> str:
    if password_file is None:
        return dsn
    try:
        password = password_file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{side} password file {password_file}: {exc.strerror}") from exc
    import psycopg.conninfo

    return psycopg.conninfo.make_conninfo(dsn, password=password)


_PASSWORD_KV = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
_PASSWORD_URL = re.compile(r"(://[^:/@]+:)([^@]*)(@)")


def redact_dsn(dsn: str) -> str:
    """The DSN with any password replaced, for logs and output."""
    return _PASSWORD_URL.sub(r"\1***\3", _PASSWORD_KV.sub(r"\1***", dsn))


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Build settings from the YAML file, the environment and explicit overrides."""
    if config is None and os.environ.get("CDCSYNC_CONFIG"):
        config = Path(os.environ["CDCSYNC_CONFIG"])
    path = config
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"configuration file {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"configuration file {path} is not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"configuration file {path}: top level must be a mapping")
        data.update(loaded)
    try:
        settings = Settings(**data)
        if overrides:
            given = {k: v for k, v in overrides.items() if v is not None}
            settings = _Overridden(**{**settings.model_dump(), **given})
    except ValidationError as exc:
        where = f" in {path}" if path else ""
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration{where}: {problems}") from None
    except SettingsError as exc:
        raise ConfigError(f"invalid environment variable: {exc}") from None
    return settings
