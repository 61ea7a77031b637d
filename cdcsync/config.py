"""Settings: one YAML file plus ``CDCSYNC_*`` environment variables.

Precedence, highest first: explicit overrides (CLI options), environment variables,
the YAML file named by ``--config`` or ``CDCSYNC_CONFIG``, built-in defaults. The four
variables printed by ``cdcsync stack env`` are enough for every command.

Secrets live in DSNs or in ``*_password_file`` files; :func:`redact_dsn` is the only
way a DSN is ever shown.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
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
#: Every name derived from the migration id must fit PostgreSQL's 63 bytes; the longest
#: is the reverse slot, ``<id>_rev_slot``.
MIGRATION_ID_MAX = 63 - len("_rev_slot")

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
    "CDCSYNC_PLAN": "path of the migration plan (YAML, written by cdcsync plan): tables, "
    "row filters, column renames, casts, drops, transforms, new required columns",
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


class KafkaSettings(BaseModel):
    """How change events are encoded on Kafka.

    ``json``: Connect's JSON converter with the schema in every message. ``avro``: the
    Apicurio Avro converter, schemas in the registry at ``schema_registry_url`` (its root
    URL, e.g. ``http://127.0.0.1:8080``): Connect registers them through the registry's
    own API, cdcsync reads them by id through its Confluent-compatible API.
    """

    model_config = ConfigDict(extra="forbid")

    format: Literal["json", "avro"] = "json"
    schema_registry_url: str | None = None

    @model_validator(mode="after")
    def _registry_for_avro(self) -> KafkaSettings:
        if self.format == "avro" and not self.schema_registry_url:
            raise ValueError(
                "kafka.format is avro but kafka.schema_registry_url is not set "
                "(CDCSYNC_KAFKA__SCHEMA_REGISTRY_URL)"
            )
        return self


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
    plan: Path | None = None
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
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)

    @field_validator("schemas", "tables", mode="before")
    @classmethod
    def _split_csv(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("migration_id", "state_schema")
    @classmethod
    def _identifier(cls, value: str, info: ValidationInfo) -> str:
        longest = MIGRATION_ID_MAX if info.field_name == "migration_id" else 63
        if not _IDENT.match(value) or len(value) > longest:
            why = (
                f" (slot, publication and topic names are derived from it; max {longest})"
                if info.field_name == "migration_id"
                else f" (max {longest})"
            )
            raise ValueError(
                f"{value!r} must be a lower-case identifier: letters, digits and _, "
                f"starting with a letter or _{why}"
            )
        return value

    @model_validator(mode="after")
    def _dead_letters_outside_prefixes(self) -> Settings:
        # The applier subscribes to ``<prefix>.*``: a dead-letter topic there would be
        # consumed back as if it were a table's change.
        topic = self.apply.dead_letter_topic
        for prefix in (self.topic_prefix, self.reverse_topic_prefix):
            if topic and topic.startswith(f"{prefix}."):
                raise ValueError(
                    f"apply.dead_letter_topic {topic!r} is under the topic prefix {prefix!r}.: "
                    "the applier would consume its own dead letters (use e.g. "
                    f"{self.topic_prefix}-dlq)"
                )
        return self

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
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(
                f"configuration file {path} is not valid YAML{at}: {what} (cdcsync reads YAML "
                "only: `key: value`, nested keys indented)"
            ) from None
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
        problems = "; ".join(_problem(err) for err in exc.errors())
        raise ConfigError(f"invalid configuration{where}: {problems}") from None
    except SettingsError as exc:
        raise ConfigError(f"invalid environment variable: {exc}") from None
    _refuse_misspelt_variables(os.environ)
    return _with_plan(settings)


def _refuse_misspelt_variables(environ: Mapping[str, str]) -> None:
    """A ``CDCSYNC_*`` variable one typo away from a setting is a mistake, not noise.

    Nested settings (``CDCSYNC_APPLY__…``) are checked by the model itself; a top-level
    variable it does not know is ignored by pydantic, so ``CDCSYNC_SOURSE_DSN`` would
    leave the source unset without a word. Variables far from every setting (other
    tools', the test fixtures') stay ignored.
    """
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields} | set(ENV_VARS)
    for name in environ:
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or "__" in upper or upper in known:
            continue
        close = difflib.get_close_matches(upper, sorted(known), n=1, cutoff=0.88)
        if close:
            raise ConfigError(
                f"environment variable {name}: unknown setting (did you mean {close[0]}?)"
            )


def _with_plan(settings: Settings) -> Settings:
    """The plan's knobs over the configuration's: workers, cutover verification, thresholds.

    The plan is the reviewed decision of how this migration runs; a command-line flag
    still wins over it (the commands apply their flags after loading settings).
    """
    if settings.plan is None:
        return settings
    from cdcsync.core import plan as plan_mod

    plan = plan_mod.load(settings.plan)
    update: dict[str, Any] = {}
    if plan.parallelism:
        update["workers"] = plan.parallelism
    cutover: dict[str, Any] = {}
    if plan.verify_level is not None:
        cutover["verify"] = "checksum" if plan.verify_level == "rows" else plan.verify_level
    if "max_lag" in plan.cutover:
        cutover["max_lag_seconds"] = float(plan.cutover["max_lag"])
    if "freeze_timeout" in plan.cutover:
        cutover["freeze_timeout_seconds"] = float(plan.cutover["freeze_timeout"])
    if cutover:
        update["cutover"] = settings.cutover.model_copy(update=cutover)
    return settings.model_copy(update=update) if update else settings


def _problem(err: Any) -> str:
    """One validation error: the key, where it came from, what is wrong; never its value."""
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc) or "configuration"
    variable = ENV_PREFIX + "__".join(loc).upper()
    origin = f" (from {variable})" if loc and variable in os.environ else ""
    if err["type"] == "extra_forbidden":
        hint = _closest(loc)
        return f"{key}: unknown setting{origin}" + (f" (did you mean {hint}?)" if hint else "")
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{key}{origin}: {msg}" if loc else msg


def _closest(loc: list[str]) -> str | None:
    """The known setting nearest to a misspelt one, as a dotted key."""
    model: Any = Settings
    for part in loc[:-1]:
        field = model.model_fields.get(part)
        inner = getattr(field, "annotation", None) if field is not None else None
        if not (isinstance(inner, type) and issubclass(inner, BaseModel)):
            return None
        model = inner
    found = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1, cutoff=0.6)
    return ".".join([*loc[:-1], found[0]]) if found else None
