"""Settings: environment over YAML, clear errors, secrets never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdcsync.config import ENV_VARS, load_settings, redact_dsn
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
