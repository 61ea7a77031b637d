"""Settings: environment over YAML, clear errors, secrets never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdcsync.config import ENV_VARS, MIGRATION_ID_MAX, load_settings, redact_dsn
from cdcsync.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_environment_overrides_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("source_dsn: 'host=a'\nmigration_id: from_file\nworkers: 3\n")
    monkeypatch.setenv("CDCSYNC_MIGRATION_ID", "from_env")
    monkeypatch.setenv("CDCSYNC_SCHEMAS", "public, sales")
    s = load_settings(cfg)
    assert s.source_dsn == "host=a"
    assert s.migration_id == "from_env"
    assert s.workers == 3
    assert s.schemas == ["public", "sales"]
    assert s.slot_name == "from_env_slot"


def test_nested_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDCSYNC_APPLY__ON_ERROR", "dead-letter")
    assert load_settings().apply.on_error == "dead-letter"


def test_invalid_values_name_the_setting(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("migration_id: 'Bad Name'\nworkers: 0\nbogus: 1\n")
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    text = str(err.value)
    assert "migration_id" in text and "workers" in text and "bogus" in text
    assert str(cfg) in text


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="configuration file"):
        load_settings(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad)


def test_require_names_variables() -> None:
    s = load_settings()
    with pytest.raises(ConfigError, match="CDCSYNC_KAFKA_BOOTSTRAP"):
        s.model_copy(update={"kafka_bootstrap": ""}).require("kafka_bootstrap")


def test_password_file_kept_out_of_dsn(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    s = load_settings(source_dsn="host=h dbname=d", source_password_file=pw)
    assert s.source_dsn == "host=h dbname=d"
    assert "password=s3cret" in s.source_conninfo()
    assert "s3cret" not in repr(s.source_dsn)


@pytest.mark.parametrize(
    ("dsn", "secret"),
    [
        ("host=h password=abc dbname=d", "abc"),
        ("host=h password='a b\\'c' dbname=d", "a b"),
        ("postgresql://u:pa55@h:5432/d", "pa55"),
    ],
)
def test_redact_dsn(dsn: str, secret: str) -> None:
    redacted = redact_dsn(dsn)
    assert secret not in redacted
    assert "***" in redacted


def test_every_variable_is_documented_in_readme() -> None:
    readme = (REPO / "README.md").read_text()
    missing = [name for name in ENV_VARS if f"`{name}`" not in readme]
    assert not missing, f"README lacks {missing}"


def test_example_config_is_valid() -> None:
    s = load_settings(REPO / "config" / "cdcsync.example.yaml")
    assert s.migration_id == "orders_move"


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("sourse_dsn: x\n", "sourse_dsn: unknown setting (did you mean source_dsn?)"),
        ("apply:\n  bach_max_events: 5\n", "(did you mean apply.batch_max_events?)"),
        ("cutover:\n  freez_timeout_seconds: 5\n", "cutover.freeze_timeout_seconds?"),
    ],
)
def test_misspelt_keys_get_the_nearest_name(tmp_path: Path, text: str, named: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    assert named in str(err.value) and str(cfg) in str(err.value)


def test_an_invalid_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDCSYNC_APPLY__BATCH_MAX_EVENTS", "0")
    with pytest.raises(ConfigError, match=r"apply\.batch_max_events \(from CDCSYNC_APPLY__"):
        load_settings()


def test_yaml_error_gives_the_line(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[apply]\nbatch_max_events = 5\n")
    with pytest.raises(ConfigError, match="not valid YAML at line 2, column 1") as err:
        load_settings(cfg)
    assert "<unicode string>" not in str(err.value)


@pytest.mark.parametrize("size", [MIGRATION_ID_MAX, MIGRATION_ID_MAX + 1])
def test_migration_id_leaves_room_for_derived_names(size: int) -> None:
    if size > MIGRATION_ID_MAX:
        with pytest.raises(ConfigError, match=f"migration_id.*max {MIGRATION_ID_MAX}"):
            load_settings(migration_id="m" * size)
        return
    s = load_settings(migration_id="m" * size)
    assert max(len(s.slot_name), len(s.reverse_slot_name), len(s.reverse_publication_name)) <= 63


@pytest.mark.parametrize("topic", ["orders.dlq", "orders_rev.dead"])
def test_dead_letter_topic_outside_the_subscribed_prefixes(topic: str) -> None:
    with pytest.raises(ConfigError, match="consume its own dead letters"):
        load_settings(migration_id="orders", apply={"dead_letter_topic": topic})
    assert load_settings(migration_id="orders", apply={"dead_letter_topic": "orders-dlq"})


@pytest.mark.parametrize(
    ("variable", "named"),
    [
        ("CDCSYNC_SOURSE_DSN", "CDCSYNC_SOURCE_DSN"),
        ("CDCSYNC_TABLE", "CDCSYNC_TABLES"),
        ("CDCSYNC_KAFKA_BOOTSTRAPS", "CDCSYNC_KAFKA_BOOTSTRAP"),
    ],
)
def test_misspelt_variables_are_refused(
    monkeypatch: pytest.MonkeyPatch, variable: str, named: str
) -> None:
    monkeypatch.setenv(variable, "x")
    with pytest.raises(ConfigError, match=f"{variable}: unknown setting.*{named}"):
        load_settings()


def test_other_tools_variables_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CDCSYNC_TEST_STACK_DIR", "CDCSYNC_FAULT_AT", "CDCSYNC_JAR_CACHE"):
        monkeypatch.setenv(name, "x")
    monkeypatch.setenv("CDCSYNC_WORKERS", "3")
    assert load_settings().workers == 3
