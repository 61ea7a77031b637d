"""Discovery findings: facts gathered from both databases, judged into risks with fixes.

Pure: :mod:`cdcsync.adapters.discovery` reads the facts, :func:`evaluate` turns them into
:class:`Finding` objects, and the renderers format them. Keeping the judgement free of
I/O lets every rule be tested with hand-made facts, including ones a test cluster cannot
have (``wal_level = replica``, a slot retaining 200 GB). Identifiers in facts arrive
already quoted (``ident`` fields) so every fix shown is valid SQL as printed.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from typing import Any

#: Exit code of ``cdcsync assess`` when an error (or, with ``--strict``, a warning) is found:
#: the code cdcsync uses for "precondition not met".
EXIT_BLOCKED = 3

#: A table this big gets the parallelism advice.
LARGE_TABLE_BYTES = 10 * 1024**3
#: TOAST holding this share of a table (and at least this many bytes) makes it TOAST-heavy.
TOAST_HEAVY_SHARE = 0.5
TOAST_HEAVY_MIN_BYTES = 64 * 1024**2
#: The ``max_slot_wal_keep_size`` suggested when it is unlimited.
SUGGESTED_SLOT_WAL_KEEP = "50GB"


class Severity(IntEnum):
    """Ordered so that ``max()`` is the worst."""

    info = 1
    warning = 2
    error = 3

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Finding:
    """One risk: how bad, what kind, where, why, and what to do about it."""

    severity: Severity
    code: str  # stable, kebab-case: what scripts and docs refer to
    location: str  # "source", "target", "source:public.t", "source:public.t.col"
    message: str
    fix: str | None = None  # exact SQL where there is one, else an instruction

    def to_dict(self) -> dict[str, Any]:
        return {
            "severity": self.severity.name,
            "code": self.code,
            "location": self.location,
            "message": self.message,
            "fix": self.fix,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Finding:
        return cls(
            Severity[str(data["severity"])],
            str(data["code"]),
            str(data["location"]),
            str(data["message"]),
            None if data.get("fix") is None else str(data["fix"]),
        )


# --- facts ------------------------------------------------------------------------------


@dataclass
class ColumnFacts:
    name: str
    ident: str  # quoted
    type: str  # format_type()
    base_type: str  # typname after resolving domains (arrays: "_int4" …)
    element_type: str = ""  # arrays: typname of the element's base type
    typtype: str = "b"  # of the base type: b, c(omposite), e(num), r(ange), m(ultirange)
    is_array: bool = False
    generated: bool = False
    not_null: bool = False
    odd_dates: int | None = None  # rows with infinite or BC dates; None: not audited
    nulls: int | None = None  # NULLs on the source; audited only when the target needs it


@dataclass
class LeafFacts:
    """A heap the changes come from: the table itself, or one leaf partition."""

    name: str
    ident: str
    replica_identity: str  # d(efault), n(othing), f(ull), i(ndex)
    has_primary_key: bool
    persistence: str = "p"  # p, u(nlogged)


@dataclass
class ForeignKeyFacts:
    name: str
    ident: str  # the constraint's name, quoted
    columns: list[str]
    references: str  # schema.table
    ref_columns: list[str]
    ref_in_scope: bool
    validated: bool = True
    orphans: int | None = None  # rows without their parent; None: not audited
    orphan_query: str = ""


@dataclass
class TriggerFacts:
    name: str
    enabled: str  # pg_trigger.tgenabled: O(rigin/local), D(isabled), R(eplica), A(lways)


@dataclass
class TargetTableFacts:
    rows: bool  # holds at least one row
    columns: dict[str, str]  # name → type ("generated" for generated columns)
    not_null: list[str] = field(default_factory=list)
    required_extra: list[str] = field(default_factory=list)  # NOT NULL, no default, not on S
    triggers: list[TriggerFacts] = field(default_factory=list)


@dataclass
class TableFacts:
    name: str  # schema.table, unquoted
    ident: str  # quoted
    partitioned: bool
    total_bytes: int
    toast_bytes: int
    rows_estimate: int
    primary_key: list[str]
    leaves: list[LeafFacts]
    columns: list[ColumnFacts]
    readable: bool = True
    owned: bool = True
    foreign_keys: list[ForeignKeyFacts] = field(default_factory=list)
    triggers: list[TriggerFacts] = field(default_factory=list)
    duplicate_rows: int | None = None  # keyless: rows identical to another; None: not audited
    audited: bool = True  # data audits ran (the table was under the size limit)
    target: TargetTableFacts | None = None  # None: absent on the target

    @property
    def keyed(self) -> bool:
        return bool(self.primary_key)


@dataclass
class SlotFacts:
    name: str
    literal: str  # the name as an SQL string literal
    plugin: str
    active: bool
    retained_bytes: int
    wal_status: str = ""


@dataclass
class ServerFacts:
    version: str = ""  # server_version
    version_num: int = 0
    wal_level: str = ""
    role: str = ""  # current_user, quoted
    superuser: bool = False
    replication: bool = False
    replication_connect_error: str | None = None
    can_set_replica_role: bool = True
    max_replication_slots: int = 0
    slots_used: int = 0
    max_wal_senders: int = 0
    senders_used: int = 0
    max_slot_wal_keep_size_mb: int = -1
    slots: list[SlotFacts] = field(default_factory=list)
    extensions: dict[str, str] = field(default_factory=dict)  # installed: name → version
    available_extensions: list[str] = field(default_factory=list)


@dataclass
class SequenceFacts:
    name: str
    owned_by: str | None  # schema.table.column, or None


@dataclass
class PlanCheck:
    """What the plan's cast or filter does to one table's rows, tried on the source."""

    table: str  # schema.table
    kind: str  # "cast" or "filter"
    column: str | None = None
    target_type: str | None = None
    failure: str | None = None  # the first value PostgreSQL refused, in its own words
    rows: int | None = None  # rows the filter keeps (None: not counted)
    total: int | None = None  # rows of the table (for a filter)
    audited: bool = True  # False: over the audit size limit, not tried


@dataclass
class Facts:
    """Everything :func:`evaluate` judges; also the ``facts`` member of the JSON report."""

    source: ServerFacts = field(default_factory=ServerFacts)
    target: ServerFacts = field(default_factory=ServerFacts)
    tables: list[TableFacts] = field(default_factory=list)
    sequences: list[SequenceFacts] = field(default_factory=list)
    extension_columns: dict[str, list[str]] = field(default_factory=dict)  # ext → table.col
    audit_max_bytes: int = 0
    plan_checks: list[PlanCheck] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- rules ------------------------------------------------------------------------------

#: Column types whose values Debezium's events cannot carry exactly (DEBEZIUM.md), by
#: base type name, with what goes wrong.
LOSSY_TYPES: dict[str, str] = {
    "timetz": "timetz values arrive converted to UTC: the offset is lost",
    "varbit": "varbit values lose their leading zeros",
    "_interval": "interval[] columns are missing from the events",
}
_ARRAY_REASON = (
    "arrays lose lower bounds other than 1 and multiple dimensions, and a NULL enum "
    "element or a NaN numeric element turns the whole array NULL"
)
_COMPOSITE_REASON = "composite values arrive as hex of their text form, ambiguous to decode"
#: Types whose values are OIDs: they name objects whose OIDs differ on the target.
OID_TYPES = {
    "regclass",
    "regproc",
    "regprocedure",
    "regoper",
    "regoperator",
    "regtype",
    "regconfig",
    "regdictionary",
    "regnamespace",
    "regrole",
    "regcollation",
}


def lossy_reason(col: ColumnFacts) -> str | None:
    """Why the events cannot carry this column's values exactly, or None if they can."""
    if col.generated:
        return None  # never written from events: the target computes it
    if col.base_type in LOSSY_TYPES:
        return LOSSY_TYPES[col.base_type]
    if col.is_array:
        return _ARRAY_REASON
    if col.typtype == "c":
        return _COMPOSITE_REASON
    if col.base_type == "date" and col.odd_dates:
        return f"{col.odd_dates} row(s) hold infinite or BC dates, which arrive as garbage"
    return None


def evaluate(facts: Facts) -> list[Finding]:
    """Every risk the facts show, worst first (stable within a severity)."""
    out: list[Finding] = []
    out += _server_rules(facts)
    for t in facts.tables:
        out += _table_rules(t, facts)
    out += _extension_rules(facts)
    out += _target_scope_rules(facts)
    out += _plan_rules(facts)
    if facts.sequences:
        owned = sum(1 for s in facts.sequences if s.owned_by)
        out.append(
            Finding(
                Severity.info,
                "sequences",
                "source",
                f"{len(facts.sequences)} sequence(s) ({owned} owned by a column): sequence "
                "values are not streamed; cutover sets each one on the target past its "
                "source value",
            )
        )
    skipped = [t.name for t in facts.tables if not t.audited]
    if skipped:
        out.append(
            Finding(
                Severity.info,
                "audit-skipped",
                "source",
                f"data audits (duplicates, orphans, dates, NULLs) skipped for {len(skipped)} "
                f"table(s) larger than {_size(facts.audit_max_bytes)}: {_few(skipped)}",
                "run cdcsync assess --audit-max-mb <larger> to include them",
            )
        )
    return sorted(out, key=lambda f: -f.severity)


def _server_rules(facts: Facts) -> list[Finding]:
    s, t = facts.source, facts.target
    out: list[Finding] = []
    restart = "; then restart the server"
    if s.wal_level != "logical":
        out.append(
            Finding(
                Severity.error,
                "wal-level",
                "source",
                f"wal_level is {s.wal_level or 'unknown'}: logical decoding needs logical",
                "ALTER SYSTEM SET wal_level = logical;" + restart,
            )
        )
    if t.wal_level != "logical":
        out.append(
            Finding(
                Severity.error,
                "target-wal-level",
                "target",
                f"wal_level is {t.wal_level or 'unknown'}: the reverse replication that "
                "keeps rollback possible after cutover needs logical",
                "ALTER SYSTEM SET wal_level = logical;" + restart,
            )
        )
    for side, srv in (("source", s), ("target", t)):
        if srv.slots_used >= srv.max_replication_slots:
            out.append(
                Finding(
                    Severity.error,
                    "replication-slots",
                    side,
                    f"all {srv.max_replication_slots} replication slots are in use; cdcsync "
                    f"needs one on the {side}"
                    + (" (forward stream)" if side == "source" else " (reverse stream)"),
                    f"ALTER SYSTEM SET max_replication_slots = {srv.max_replication_slots + 2};"
                    + restart,
                )
            )
        if srv.senders_used >= srv.max_wal_senders:
            out.append(
                Finding(
                    Severity.error,
                    "wal-senders",
                    side,
                    f"all {srv.max_wal_senders} WAL senders are busy",
                    f"ALTER SYSTEM SET max_wal_senders = {srv.max_wal_senders + 2};" + restart,
                )
            )
    if s.max_slot_wal_keep_size_mb < 0:
        out.append(
            Finding(
                Severity.warning,
                "slot-wal-unbounded",
                "source",
                "max_slot_wal_keep_size is -1 (unlimited): a stalled replication slot keeps "
                "WAL until the source's disk is full",
                f"ALTER SYSTEM SET max_slot_wal_keep_size = '{SUGGESTED_SLOT_WAL_KEEP}'; "
                "SELECT pg_reload_conf();  -- pick what the WAL disk can spare",
            )
        )
    for slot in s.slots:
        if not slot.active and slot.retained_bytes > 0:
            out.append(
                Finding(
                    Severity.warning,
                    "inactive-slot",
                    f"source:slot {slot.name}",
                    f"inactive {slot.plugin or 'physical'} slot retains "
                    f"{_size(slot.retained_bytes)} of WAL and keeps retaining more",
                    f"SELECT pg_drop_replication_slot({slot.literal});  -- if it is unused",
                )
            )
    if not (s.superuser or s.replication):
        out.append(
            Finding(
                Severity.error,
                "source-replication-privilege",
                "source",
                f"role {s.role} has neither REPLICATION nor superuser: it cannot stream changes",
                f"ALTER ROLE {s.role} REPLICATION;",
            )
        )
    elif s.replication_connect_error:
        out.append(
            Finding(
                Severity.error,
                "replication-connection",
                "source",
                f"a replication connection is refused ({s.replication_connect_error})",
                f"add a 'host replication {s.role} <address> <method>' line to pg_hba.conf "
                "and SELECT pg_reload_conf();",
            )
        )
    if not (t.superuser or t.can_set_replica_role):
        out.append(
            Finding(
                Severity.error,
                "target-replica-role",
                "target",
                f"role {t.role} cannot SET session_replication_role, which the applier "
                "needs (it loads rows before their foreign keys and passes the write fence)",
                f"GRANT SET ON PARAMETER session_replication_role TO {t.role};"
                "  -- or connect as a superuser",
            )
        )
    sv, tv = s.version_num // 10000, t.version_num // 10000
    out.append(
        Finding(
            Severity.info,
            "versions",
            "source/target",
            f"source PostgreSQL {s.version or '?'}, target PostgreSQL {t.version or '?'}",
        )
    )
    if sv and tv and tv < sv:
        out.append(
            Finding(
                Severity.warning,
                "target-older",
                "target",
                f"the target ({tv}) is older than the source ({sv}): schema from the source's "
                "pg_dump may not restore there, and newer types or syntax fail",
                "use a target of the source's major version or newer",
            )
        )
    return out


def _plan_rules(facts: Facts) -> list[Finding]:
    """The plan's casts tried on every source row; its filters' share of the rows."""
    out: list[Finding] = []
    for c in facts.plan_checks:
        if c.kind == "cast":
            loc = f"source:{c.table}.{c.column}"
            if not c.audited:
                out.append(
                    Finding(
                        Severity.info,
                        "plan-cast-unchecked",
                        loc,
                        f"the plan casts it to {c.target_type}; the table is over the audit "
                        "size limit, so the values were not tried",
                        "raise --audit-max-mb to try them",
                    )
                )
            elif c.failure is not None:
                out.append(
                    Finding(
                        Severity.error,
                        "plan-cast-fails",
                        loc,
                        f"the plan casts it to {c.target_type}, and a value does not convert: "
                        f"{c.failure}; the snapshot would fail there",
                        "fix those values on the source, or change or drop the cast in the plan",
                    )
                )
        elif c.kind == "filter" and c.failure is not None:
            out.append(
                Finding(
                    Severity.error,
                    "plan-filter-fails",
                    f"source:{c.table}",
                    f"the plan's filter does not run on the source: {c.failure}",
                    "correct the filter in the plan (SQL over the source's columns)",
                )
            )
        elif c.kind == "filter" and c.rows is not None:
            share = f"{c.rows:,} of {c.total:,}" if c.total is not None else f"{c.rows:,}"
            out.append(
                Finding(
                    Severity.info,
                    "plan-filter",
                    f"source:{c.table}",
                    f"the plan's filter keeps {share} rows; the others are not migrated",
                )
            )
    return out


def _table_rules(t: TableFacts, facts: Facts) -> list[Finding]:
    out: list[Finding] = []
    loc = f"source:{t.name}"
    if not t.readable:
        out.append(
            Finding(
                Severity.error,
                "no-select",
                loc,
                "the source role cannot read this table",
                f"GRANT SELECT ON {t.ident} TO {facts.source.role};",
            )
        )
    if not t.owned and not facts.source.superuser:
        out.append(
            Finding(
                Severity.error,
                "not-owner",
                loc,
                "the source role does not own this table, and only an owner can add it to "
                "cdcsync's publication",
                "connect as the table's owner or a superuser",
            )
        )
    for leaf in t.leaves:
        lloc = f"source:{leaf.name}"
        if leaf.persistence == "u":
            out.append(
                Finding(
                    Severity.error,
                    "unlogged",
                    lloc,
                    "UNLOGGED: its changes are not in the WAL, so they cannot be streamed",
                    f"ALTER TABLE {leaf.ident} SET LOGGED;  -- or leave it out (CDCSYNC_TABLES)",
                )
            )
        if leaf.replica_identity == "f":
            continue
        if not leaf.has_primary_key or leaf.replica_identity == "n":
            what = "no primary key" if not leaf.has_primary_key else "a primary key"
            out.append(
                Finding(
                    Severity.error,
                    "replica-identity",
                    lloc,
                    f"{what} and REPLICA IDENTITY "
                    f"{_IDENTITY_NAMES.get(leaf.replica_identity, leaf.replica_identity)}: "
                    "once published, its UPDATEs and DELETEs fail on the source, and the "
                    "events could not say which row changed",
                    f"ALTER TABLE {leaf.ident} REPLICA IDENTITY FULL;",
                )
            )
    keyless_note = (
        "the applier halts at such a change rather than guess which row to write"
        if not t.keyed
        else "cdcsync reads those rows back from the source by key (exact, at the cost of "
        "one source query per affected change)"
    )
    for col in t.columns:
        cloc = f"{loc}.{col.name}"
        reason = lossy_reason(col)
        if reason is not None:
            out.append(
                Finding(
                    Severity.error if not t.keyed else Severity.warning,
                    "lossy-type",
                    cloc,
                    f"{col.type}: {reason}; {keyless_note}",
                    None
                    if t.keyed
                    else f"ALTER TABLE {t.ident} ADD PRIMARY KEY (<columns>);  -- give it a key",
                )
            )
        elif col.base_type == "date" and col.odd_dates is None and not t.keyed:
            out.append(
                Finding(
                    Severity.warning,
                    "unchecked-dates",
                    cloc,
                    "not audited: an infinite or BC date in a keyless table would halt the applier",
                    f"SELECT count(*) FROM {t.ident} WHERE {col.ident} IN ('infinity', "
                    f"'-infinity') OR {col.ident} < '0001-01-01';",
                )
            )
        if col.base_type in OID_TYPES or col.element_type in OID_TYPES:
            out.append(
                Finding(
                    Severity.warning,
                    "oid-type",
                    cloc,
                    f"{col.type} values refer to catalog objects by OID; they are carried "
                    "by name and fail where the object does not exist on the target",
                    "make sure every referenced object exists on the target",
                )
            )
        elif col.base_type == "oid":
            out.append(
                Finding(
                    Severity.warning,
                    "large-object",
                    cloc,
                    "oid column: if it points at large objects, those are not replicated "
                    "(logical decoding does not carry pg_largeobject)",
                    "move the contents into a bytea column, or copy large objects at cutover",
                )
            )
        if col.generated:
            out.append(
                Finding(
                    Severity.info,
                    "generated-column",
                    cloc,
                    "generated column: never written from events; the target computes it "
                    "and must define the same expression",
                )
            )
    if t.partitioned:
        out.append(
            Finding(
                Severity.info,
                "partitioned",
                loc,
                f"partitioned into {len(t.leaves)} leaf partition(s): published via the "
                "partition root, so one topic carries all of them; every leaf needs its own "
                "replica identity",
            )
        )
    if t.total_bytes >= LARGE_TABLE_BYTES:
        out.append(
            Finding(
                Severity.info,
                "large-table",
                loc,
                f"{_size(t.total_bytes)}, ~{t.rows_estimate:,} rows: the snapshot copies it in "
                "parallel chunks; more workers shorten the copy if the source has the cores "
                "and I/O to spare",
                "CDCSYNC_WORKERS=<cores> (and --max-rate to protect the source)",
            )
        )
    heavy = t.toast_bytes >= TOAST_HEAVY_MIN_BYTES and t.toast_bytes >= TOAST_HEAVY_SHARE * max(
        t.total_bytes, 1
    )
    if heavy and any(leaf.replica_identity == "d" for leaf in t.leaves):
        out.append(
            Finding(
                Severity.info,
                "toast-heavy",
                loc,
                f"{_size(t.toast_bytes)} of {_size(t.total_bytes)} is TOAST and the replica "
                "identity is DEFAULT: an UPDATE that leaves a TOASTed value unchanged does not "
                "carry it, so cdcsync re-reads it from the source by key",
                f"ALTER TABLE {t.ident} REPLICA IDENTITY FULL;  -- optional: events then "
                "carry every value, at the cost of more WAL",
            )
        )
    if t.duplicate_rows:
        out.append(
            Finding(
                Severity.info,
                "keyless-duplicates",
                loc,
                f"{t.duplicate_rows} row(s) are identical to another row: each change to one "
                "copy is replayed on exactly one matching row",
            )
        )
    for fk in t.foreign_keys:
        floc = f"{loc} ({fk.name})"
        if not fk.ref_in_scope:
            out.append(
                Finding(
                    Severity.warning,
                    "fk-out-of-scope",
                    floc,
                    f"foreign key to {fk.references}, which is not migrated: the constraint "
                    "is not created on the target",
                    f"migrate {fk.references} too (CDCSYNC_TABLES), or accept the missing "
                    "constraint",
                )
            )
        if fk.orphans:
            out.append(
                Finding(
                    Severity.warning,
                    "fk-orphans",
                    floc,
                    f"{fk.orphans} row(s) reference a missing {fk.references} row "
                    f"({'NOT VALID constraint' if not fk.validated else 'loaded around it'}): "
                    "creating the constraint on the target fails",
                    fk.orphan_query,
                )
            )
    for trg in t.triggers:
        if trg.enabled in ("A", "R"):
            mode = "ALWAYS" if trg.enabled == "A" else "REPLICA"
            out.append(
                Finding(
                    Severity.warning,
                    "replica-trigger",
                    f"{loc} (trigger {trg.name})",
                    f"ENABLE {mode} trigger: it fires on the target for replicated changes "
                    "too (the applier runs with session_replication_role = replica), so its "
                    "effect would happen twice",
                    "make it an ordinary trigger on the target (ALTER TABLE … ENABLE TRIGGER "
                    "…) unless firing there is intended",
                )
            )
        elif trg.enabled == "O":
            out.append(
                Finding(
                    Severity.info,
                    "trigger",
                    f"{loc} (trigger {trg.name})",
                    "does not fire for replicated changes on the target (the applier runs "
                    "with session_replication_role = replica); its effects arrive from the "
                    "source through the stream",
                )
            )
    if t.target is not None:
        out += _target_table_rules(t, t.target)
    return out


_IDENTITY_NAMES = {"d": "DEFAULT", "n": "NOTHING", "f": "FULL", "i": "USING INDEX"}


def _target_table_rules(t: TableFacts, tt: TargetTableFacts) -> list[Finding]:
    out: list[Finding] = []
    loc = f"target:{t.name}"
    if tt.rows:
        out.append(
            Finding(
                Severity.error,
                "target-not-empty",
                loc,
                "already holds rows: the snapshot refuses to copy over them",
                f"TRUNCATE {t.ident};  -- on the target, or cdcsync snapshot "
                "--allow-nonempty-target",
            )
        )
    missing = [c for c in t.columns if c.name not in tt.columns]
    for col in missing:
        fix = f"ALTER TABLE {t.ident} ADD COLUMN {col.ident} {col.type};"
        if col.generated:
            fix = "add the generated column with the source's expression"
        out.append(
            Finding(
                Severity.error,
                "target-missing-column",
                f"{loc}.{col.name}",
                f"the source has this {col.type} column, the target table does not",
                fix,
            )
        )
    for col in t.columns:
        ttype = tt.columns.get(col.name)
        if ttype is None or col.generated or ttype == col.type:
            continue
        if ttype == "generated":
            out.append(
                Finding(
                    Severity.error,
                    "target-generated",
                    f"{loc}.{col.name}",
                    "generated on the target but an ordinary column on the source: the "
                    "source's values cannot be written",
                    f"ALTER TABLE {t.ident} ALTER COLUMN {col.ident} DROP EXPRESSION;",
                )
            )
            continue
        out.append(
            Finding(
                Severity.warning,
                "target-type-differs",
                f"{loc}.{col.name}",
                f"{col.type} on the source, {ttype} on the target: values go through the "
                "target type's input function and may fail or change",
                f"ALTER TABLE {t.ident} ALTER COLUMN {col.ident} TYPE {col.type};",
            )
        )
    for col in t.columns:
        if col.name in tt.not_null and not col.not_null and col.nulls:
            out.append(
                Finding(
                    Severity.error,
                    "target-not-null",
                    f"{loc}.{col.name}",
                    f"NOT NULL on the target, but {col.nulls} source row(s) hold NULL there",
                    f"ALTER TABLE {t.ident} ALTER COLUMN {col.ident} DROP NOT NULL;"
                    "  -- on the target, or fix the source rows",
                )
            )
    for name in tt.required_extra:
        out.append(
            Finding(
                Severity.error,
                "target-required-column",
                f"{loc}.{name}",
                "NOT NULL without a default on the target and absent on the source: every "
                "insert fails",
                "give it a DEFAULT on the target, or drop NOT NULL",
            )
        )
    for trg in tt.triggers:
        if trg.enabled in ("A", "R"):
            out.append(
                Finding(
                    Severity.warning,
                    "replica-trigger",
                    f"{loc} (trigger {trg.name})",
                    "fires for the applier's writes (ENABLE ALWAYS/REPLICA under "
                    "session_replication_role = replica)",
                    "ALTER TABLE … ENABLE TRIGGER … on the target, unless intended",
                )
            )
    return out


def _extension_rules(facts: Facts) -> list[Finding]:
    out: list[Finding] = []
    available = set(facts.target.available_extensions)
    for ext, version in sorted(facts.source.extensions.items()):
        used = facts.extension_columns.get(ext, [])
        if ext not in available:
            out.append(
                Finding(
                    Severity.error,
                    "extension-missing",
                    f"target:extension {ext}",
                    f"installed on the source ({version})"
                    + (f", used by {_few(used)}" if used else "")
                    + ", not available on the target",
                    f"install the package providing {ext} on the target server",
                )
            )
        elif ext in facts.target.extensions and facts.target.extensions[ext] != version:
            out.append(
                Finding(
                    Severity.info,
                    "extension-version",
                    f"target:extension {ext}",
                    f"version {version} on the source, {facts.target.extensions[ext]} on the "
                    "target",
                )
            )
    return out


def _target_scope_rules(facts: Facts) -> list[Finding]:
    present = [t.name for t in facts.tables if t.target is not None]
    absent = [t.name for t in facts.tables if t.target is None]
    out: list[Finding] = []
    if not facts.tables:
        out.append(
            Finding(
                Severity.error,
                "no-tables",
                "source",
                "no table to migrate",
                "check CDCSYNC_SCHEMAS / CDCSYNC_TABLES",
            )
        )
    if present and absent:
        out.append(
            Finding(
                Severity.error,
                "target-partial-schema",
                "target",
                f"{len(present)} migrated table(s) exist on the target, {len(absent)} do not "
                f"({_few(absent)})",
                "create all of them on the target, or none and let cdcsync copy the schema",
            )
        )
    return out


# --- exit code --------------------------------------------------------------------------


def worst(findings: Iterable[Finding]) -> Severity | None:
    return max((f.severity for f in findings), default=None)


def exit_code(findings: Iterable[Finding], *, strict: bool = False) -> int:
    """0 unless an error is found (or, with ``strict``, a warning): then :data:`EXIT_BLOCKED`."""
    w = worst(findings)
    limit = Severity.warning if strict else Severity.error
    return EXIT_BLOCKED if w is not None and w >= limit else 0


# --- renderers --------------------------------------------------------------------------

_TITLES = {Severity.error: "Errors", Severity.warning: "Warnings", Severity.info: "Info"}


def _grouped(findings: Sequence[Finding]) -> list[tuple[Severity, list[Finding]]]:
    return [
        (sev, [f for f in findings if f.severity == sev])
        for sev in sorted(Severity, reverse=True)
        if any(f.severity == sev for f in findings)
    ]


def summary(findings: Sequence[Finding]) -> dict[str, int]:
    return {sev.name: sum(1 for f in findings if f.severity == sev) for sev in Severity}


def render_json(findings: Sequence[Finding], facts: Facts, *, strict: bool = False) -> str:
    """One object: findings, summary, exit code and every fact judged."""
    doc = {
        "format": "cdcsync-assess/1",
        "exit_code": exit_code(findings, strict=strict),
        "summary": summary(findings),
        "findings": [f.to_dict() for f in findings],
        "facts": facts.to_dict(),
    }
    return json.dumps(doc, indent=2, ensure_ascii=False)


def findings_from_json(text: str) -> list[Finding]:
    return [Finding.from_dict(d) for d in json.loads(text)["findings"]]


def _fence(text: str) -> str:
    """A code fence longer than any run of backticks in ``text``."""
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    return "`" * max(3, longest + 1)


def _md_inline(text: str) -> str:
    """``text`` as a Markdown code span, whatever backticks it holds."""
    ticks = "`"
    while ticks in text:
        ticks += "`"
    return f"{ticks} {text} {ticks}"


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>")


def render_markdown(findings: Sequence[Finding], facts: Facts) -> str:
    """A report to paste into a ticket or commit next to the plan."""
    counts = summary(findings)
    lines = [
        "# cdcsync assess",
        "",
        f"Source PostgreSQL {facts.source.version or '?'} · target PostgreSQL "
        f"{facts.target.version or '?'} · {len(facts.tables)} table(s), "
        f"{_size(sum(t.total_bytes for t in facts.tables))} · "
        f"{counts['error']} error(s), {counts['warning']} warning(s), {counts['info']} info",
        "",
    ]
    if facts.tables:
        lines += [
            "| table | size | rows (est.) | primary key | replica identity | target |",
            "| --- | ---: | ---: | --- | --- | --- |",
        ]
        for t in facts.tables:
            lines.append(
                "| "
                + " | ".join(
                    _md_cell(c)
                    for c in (
                        t.name,
                        _size(t.total_bytes),
                        f"{t.rows_estimate:,}",
                        ", ".join(t.primary_key) or "none",
                        ", ".join(
                            sorted({_IDENTITY_NAMES.get(x.replica_identity, "?") for x in t.leaves})
                        ),
                        "absent"
                        if t.target is None
                        else ("not empty" if t.target.rows else "present, empty"),
                    )
                )
                + " |"
            )
        lines.append("")
    for sev, group in _grouped(findings):
        lines += [f"## {_TITLES[sev]} ({len(group)})", ""]
        for f in group:
            lines += [f"### {f.code} · {_md_inline(f.location)}", "", f.message, ""]
            if f.fix:
                fence = _fence(f.fix)
                lines += ["Fix:", "", f"{fence}sql", f.fix, fence, ""]
    if not findings:
        lines += ["No findings.", ""]
    return "\n".join(lines)


def text_renderable(findings: Sequence[Finding], facts: Facts) -> Any:
    """Rich tables: one overview of the tables, then one table per severity."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    parts: list[Any] = []
    counts = summary(findings)
    parts.append(
        Text(
            f"source PostgreSQL {facts.source.version or '?'}, target PostgreSQL "
            f"{facts.target.version or '?'}; {len(facts.tables)} table(s), "
            f"{_size(sum(t.total_bytes for t in facts.tables))}; "
            f"{counts['error']} error(s), {counts['warning']} warning(s), {counts['info']} info"
        )
    )
    if facts.tables:
        overview = Table(title="tables", title_justify="left")
        for col in ("table", "size", "rows", "key", "identity", "target"):
            overview.add_column(col, justify="right" if col in ("size", "rows") else "left")
        for t in facts.tables:
            overview.add_row(
                Text(t.name),
                _size(t.total_bytes),
                f"~{t.rows_estimate:,}",
                Text(", ".join(t.primary_key) or "none"),
                ", ".join(sorted({_IDENTITY_NAMES.get(x.replica_identity, "?") for x in t.leaves})),
                "absent"
                if t.target is None
                else ("not empty" if t.target.rows else "present, empty"),
            )
        parts.append(overview)
    styles = {Severity.error: "bold red", Severity.warning: "yellow", Severity.info: "cyan"}
    for sev, group in _grouped(findings):
        table = Table(
            title=Text(f"{_TITLES[sev].lower()} ({len(group)})", style=styles[sev]),
            title_justify="left",
            show_lines=True,
        )
        table.add_column("code", style=styles[sev], no_wrap=True)
        table.add_column("location", overflow="fold")
        table.add_column("finding", ratio=3)
        table.add_column("fix", ratio=2, overflow="fold")
        for f in group:
            table.add_row(Text(f.code), Text(f.location), Text(f.message), Text(f.fix or ""))
        parts.append(table)
    if not findings:
        parts.append(Text("no findings", style="green"))
    return Group(*parts)


def render_text(findings: Sequence[Finding], facts: Facts, *, width: int = 120) -> str:
    """:func:`text_renderable` as plain text (no colours), for files and tests."""
    from rich.console import Console

    buf = io.StringIO()
    console = Console(file=buf, width=width, color_system=None, force_terminal=False)
    console.print(text_renderable(findings, facts))
    return buf.getvalue()


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _few(names: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")
