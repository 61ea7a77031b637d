"""The assess rules and renderers, fed hand-made facts (including ones no test cluster has)."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from cdcsync.core import findings as fnd
from cdcsync.core.findings import (
    ColumnFacts,
    Facts,
    Finding,
    ForeignKeyFacts,
    LeafFacts,
    ServerFacts,
    Severity,
    SlotFacts,
    TableFacts,
    TargetTableFacts,
    TriggerFacts,
)


def server(**kw: object) -> ServerFacts:
    base: dict[str, object] = {
        "version": "15.8",
        "version_num": 150008,
        "wal_level": "logical",
        "role": '"app"',
        "superuser": True,
        "replication": True,
        "max_replication_slots": 10,
        "max_wal_senders": 10,
        "max_slot_wal_keep_size_mb": 10240,
    }
    base.update(kw)
    return ServerFacts(**base)  # type: ignore[arg-type]


def col(name: str, base: str = "int4", **kw: object) -> ColumnFacts:
    return ColumnFacts(name, f'"{name}"', kw.pop("type", base), base, **kw)  # type: ignore[arg-type]


def table(
    name: str = "public.t", *, pk: bool = True, identity: str = "d", **kw: object
) -> TableFacts:
    ident = '"' + name.replace(".", '"."') + '"'
    base: dict[str, object] = {
        "partitioned": False,
        "total_bytes": 8192,
        "toast_bytes": 0,
        "rows_estimate": 1,
        "primary_key": ["id"] if pk else [],
        "leaves": [LeafFacts(name, ident, identity, pk)],
        "columns": [col("id")],
    }
    base.update(kw)
    return TableFacts(name, ident, **base)  # type: ignore[arg-type]


def facts(*tables: TableFacts, **kw: object) -> Facts:
    f = Facts(source=server(), target=server(), tables=list(tables), audit_max_bytes=1024**3)
    for k, v in kw.items():
        setattr(f, k, v)
    return f


def codes(found: list[Finding], severity: Severity | None = None) -> list[str]:
    return [f.code for f in found if severity is None or f.severity == severity]


def test_a_clean_database_has_no_warning_or_error() -> None:
    found = fnd.evaluate(facts(table()))
    assert codes(found) == ["versions"]
    assert fnd.exit_code(found) == 0


def test_keyless_without_full_identity_is_an_error_with_the_quoted_fix() -> None:
    found = fnd.evaluate(facts(table("public.Odd name", pk=False)))
    (f,) = [f for f in found if f.code == "replica-identity"]
    assert f.severity is Severity.error
    assert f.location == "source:public.Odd name"
    assert f.fix == 'ALTER TABLE "public"."Odd name" REPLICA IDENTITY FULL;'
    assert codes(fnd.evaluate(facts(table(pk=False, identity="f")))) == ["versions"]
    # A key with REPLICA IDENTITY NOTHING breaks updates too.
    assert "replica-identity" in codes(fnd.evaluate(facts(table(identity="n"))))


def test_every_leaf_of_a_partitioned_table_needs_an_identity() -> None:
    t = table(
        "public.p",
        pk=False,
        partitioned=True,
        leaves=[
            LeafFacts("public.p1", '"public"."p1"', "f", False),
            LeafFacts("public.p2", '"public"."p2"', "d", False),
        ],
    )
    found = fnd.evaluate(facts(t))
    (f,) = [f for f in found if f.code == "replica-identity"]
    assert f.location == "source:public.p2" and '"public"."p2"' in (f.fix or "")
    assert "partitioned" in codes(found, Severity.info)


def test_lossy_types_warn_when_keyed_and_fail_when_keyless() -> None:
    columns = [
        col("id"),
        col("tz", "timetz"),
        col("vb", "varbit"),
        col("iv", "_interval", is_array=True),
        col("arr", "_int4", is_array=True, element_type="int4"),
        col("comp", "pair", typtype="c"),
        col("d_ok", "date", odd_dates=0),
        col("d_inf", "date", odd_dates=3),
        col("gen", "timetz", generated=True),
        col("n", "numeric"),
    ]
    keyed = fnd.evaluate(facts(table(columns=columns)))
    lossy = [f for f in keyed if f.code == "lossy-type"]
    assert [f.location.rsplit(".", 1)[1] for f in lossy] == [
        "tz",
        "vb",
        "iv",
        "arr",
        "comp",
        "d_inf",
    ]
    assert {f.severity for f in lossy} == {Severity.warning}
    assert "reads those rows back from the source by key" in lossy[0].message
    keyless = fnd.evaluate(facts(table(pk=False, identity="f", columns=columns)))
    assert {f.severity for f in keyless if f.code == "lossy-type"} == {Severity.error}
    assert "generated-column" in codes(keyless)


def test_server_settings() -> None:
    f = facts(table())
    f.source = server(
        wal_level="replica",
        max_slot_wal_keep_size_mb=-1,
        slots_used=10,
        superuser=False,
        replication=False,
        slots=[SlotFacts("old", "'old'", "pgoutput", False, 5 * 1024**3)],
    )
    f.target = server(wal_level="replica", superuser=False, can_set_replica_role=False)
    found = {x.code: x for x in fnd.evaluate(f)}
    assert found["wal-level"].fix is not None
    assert "ALTER SYSTEM SET wal_level = logical;" in found["wal-level"].fix
    assert found["target-wal-level"].severity is Severity.error
    assert found["slot-wal-unbounded"].severity is Severity.warning
    assert "max_slot_wal_keep_size" in (found["slot-wal-unbounded"].fix or "")
    assert (
        found["inactive-slot"].fix == "SELECT pg_drop_replication_slot('old');  -- if it is unused"
    )
    assert found["replication-slots"].location == "source"
    assert found["source-replication-privilege"].fix == 'ALTER ROLE "app" REPLICATION;'
    assert "session_replication_role" in (found["target-replica-role"].fix or "")
    assert fnd.exit_code(found.values()) == fnd.EXIT_BLOCKED


def test_target_tables() -> None:
    t = table(
        columns=[col("id"), col("v", "text"), col("w", "int4", type="integer"), col("x", "text")],
        target=TargetTableFacts(
            rows=True,
            columns={"id": "int4", "w": "bigint", "x": "text", "extra": "text"},
            not_null=["x", "extra"],
            required_extra=["extra"],
            triggers=[TriggerFacts("audit", "A")],
        ),
    )
    t.columns[3].nulls = 2
    found = {(x.code, x.location): x for x in fnd.evaluate(facts(t, table("public.u")))}
    assert found["target-not-empty", "target:public.t"].severity is Severity.error
    assert found["target-missing-column", "target:public.t.v"].fix == (
        'ALTER TABLE "public"."t" ADD COLUMN "v" text;'
    )
    assert found["target-type-differs", "target:public.t.w"].severity is Severity.warning
    assert found["target-not-null", "target:public.t.x"].severity is Severity.error
    assert ("target-required-column", "target:public.t.extra") in found
    assert ("replica-trigger", "target:public.t (trigger audit)") in found
    assert ("target-partial-schema", "target") in found


def test_audits_and_objects() -> None:
    fk = ForeignKeyFacts(
        "c_p_fkey", '"c_p_fkey"', ["p"], "public.p", ["id"], True, False, 4, "SELECT …;"
    )
    out_of_scope = ForeignKeyFacts("c_q", '"c_q"', ["q"], "other.q", ["id"], False)
    t = table(
        "public.c",
        pk=False,
        identity="f",
        duplicate_rows=6,
        foreign_keys=[fk, out_of_scope],
        triggers=[TriggerFacts("plain", "O"), TriggerFacts("always", "A")],
        total_bytes=20 * 1024**3,
        toast_bytes=15 * 1024**3,
        columns=[col("id"), col("r", "regclass"), col("lo", "oid"), col("d", "date")],
        audited=False,
    )
    found = {x.code: x for x in fnd.evaluate(facts(t))}
    assert found["fk-orphans"].severity is Severity.warning
    assert found["fk-orphans"].fix == "SELECT …;" and "NOT VALID" in found["fk-orphans"].message
    assert found["fk-out-of-scope"].severity is Severity.warning
    assert found["keyless-duplicates"].severity is Severity.info
    assert found["replica-trigger"].severity is Severity.warning
    assert found["trigger"].severity is Severity.info
    assert found["large-table"].severity is Severity.info
    assert "toast-heavy" not in found  # FULL identity carries every value
    assert found["oid-type"].severity is Severity.warning
    assert found["large-object"].severity is Severity.warning
    assert found["unchecked-dates"].severity is Severity.warning
    assert found["audit-skipped"].severity is Severity.info
    t.leaves[0].replica_identity = "d"
    t.primary_key = ["id"]
    t.leaves[0].has_primary_key = True
    assert "toast-heavy" in codes(fnd.evaluate(facts(t)), Severity.info)


def test_extensions() -> None:
    f = facts(table())
    f.source.extensions = {"postgis": "3.4", "hstore": "1.8", "citext": "1.6"}
    f.target.extensions = {"hstore": "1.7"}
    f.target.available_extensions = ["hstore", "citext"]
    f.extension_columns = {"postgis": ["public.t.geom"]}
    found = {x.code + ":" + x.location: x for x in fnd.evaluate(f)}
    missing = found["extension-missing:target:extension postgis"]
    assert missing.severity is Severity.error and "public.t.geom" in missing.message
    assert found["extension-version:target:extension hstore"].severity is Severity.info
    assert "extension-missing:target:extension citext" not in found


# --- properties -------------------------------------------------------------------------

_text = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=40).filter(
    lambda s: s.strip() == s and "\n" not in s and "\r" not in s
)
findings_st = st.lists(
    st.builds(
        Finding,
        st.sampled_from(list(Severity)),
        st.from_regex(r"[a-z][a-z-]{0,20}", fullmatch=True),
        _text,
        st.text(max_size=200),
        st.none() | st.text(max_size=200),
    ),
    max_size=12,
)


@given(findings_st, st.booleans())
def test_exit_code_follows_the_worst_severity(found: list[Finding], strict: bool) -> None:
    worst = max((f.severity for f in found), default=None)
    blocked = worst is Severity.error or (strict and worst is Severity.warning)
    assert fnd.exit_code(found, strict=strict) == (fnd.EXIT_BLOCKED if blocked else 0)


@given(findings_st)
def test_json_round_trips(found: list[Finding]) -> None:
    text = fnd.render_json(found, facts(table()))
    assert fnd.findings_from_json(text) == found
    doc = json.loads(text)
    assert doc["exit_code"] == fnd.exit_code(found)
    assert sum(doc["summary"].values()) == len(found)
    assert doc["facts"]["tables"][0]["name"] == "public.t"


@given(findings_st)
def test_every_finding_renders_in_markdown(found: list[Finding]) -> None:
    md = fnd.render_markdown(found, facts(table()))
    assert md.count("\n### ") == len(found)
    for f in found:
        assert f"### {f.code} · " in md
        # Every line of the message and the fix is there verbatim.
        for line in (f.message + "\n" + (f.fix or "")).splitlines():
            assert line in md
    for sev in Severity:
        n = sum(1 for f in found if f.severity == sev)
        assert (f"({n})" in md) if n else True


@given(findings_st)
def test_every_finding_renders_as_text(found: list[Finding]) -> None:
    out = fnd.render_text(found, facts(table()), width=4000)
    for f in found:
        assert f.code in out
    # Markup in messages is shown, not interpreted.
    marked = [Finding(Severity.error, "x", "[bold]loc[/bold]", "[red]msg[/red]")]
    assert "[red]msg[/red]" in fnd.render_text(marked, facts(), width=200)
    if not found:
        assert "no findings" in out
    elif not any("no findings" in f"{f.code} {f.location} {f.message} {f.fix}" for f in found):
        assert "no findings" not in out  # unless a finding's own text says so


def test_markdown_fences_survive_backticks() -> None:
    f = Finding(Severity.warning, "c", "a`b", "m", "SELECT '```';")
    md = fnd.render_markdown([f], facts())
    assert "````sql\nSELECT '```';\n````" in md
    assert "`` a`b ``" in md
