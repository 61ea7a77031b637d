"""The final migration report: a status per phase derived from recorded state, and its rendering.

Pure: :mod:`cdcsync.engine.report` gathers one plain document (JSON-like ``dict``) from
the target's state schema, the audit trail and a read-only discovery; :func:`build`
judges it into five phases, each with exactly one status, and the renderers write
Markdown or HTML. Every status is derived from what was recorded, never assumed: a
phase whose inputs are missing is at best 🚧, so a report cannot claim "complete" for
work nobody recorded. Values of the wrong type count as missing (the document comes
from jsonb an operator or an older cdcsync may have written).
"""

from __future__ import annotations

import enum
import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any


class Status(enum.StrEnum):
    COMPLETE = "✅"
    ATTENTION = "⚠️"
    BLOCKED = "🚧"

    @property
    def label(self) -> str:
        return _LABELS[self]


_LABELS = {
    Status.COMPLETE: "complete",
    Status.ATTENTION: "needs attention",
    Status.BLOCKED: "not complete",
}

PHASES: tuple[str, ...] = (
    "Discovery",
    "Strategy",
    "Preparation",
    "Execution",
    "Verification & Cleanup",
)

#: Findings that describe what cdcsync's own snapshot did to the target: expected once
#: the snapshot is recorded, so they do not count against discovery afterwards.
EXPECTED_AFTER_SNAPSHOT = frozenset({"target-not-empty"})

#: Verification levels strong enough for a ✅ (counts prove no values).
STRONG_LEVELS = frozenset({"checksum", "rows"})

MAX_FINDINGS_LISTED = 50

#: The snapshot's steps in the order they run (its timings are listed so).
_STEP_ORDER = {
    k: i
    for i, k in enumerate(
        (
            "pre_data",
            "boundary",
            "copy",
            "post_data_overlapped",
            "sequences",
            "post_data",
            "fence",
            "total",
        )
    )
}


@dataclass(frozen=True)
class Block:
    """A table inside a phase's section."""

    title: str
    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class PhaseReport:
    name: str
    status: Status
    reason: str  # why this status, one sentence
    facts: tuple[tuple[str, str], ...] = ()
    blocks: tuple[Block, ...] = ()


@dataclass(frozen=True)
class Report:
    migration_id: str
    generated_at: str
    phases: tuple[PhaseReport, ...]

    @property
    def complete(self) -> bool:
        """The verdict: complete only when every phase is."""
        return all(p.status is Status.COMPLETE for p in self.phases)

    def status_of(self, name: str) -> Status:
        return next(p.status for p in self.phases if p.name == name)


# ------------------------------------------------------------------ tolerant readers
def _dict(value: Any) -> dict[str, Any] | None:
    return dict(value) if isinstance(value, Mapping) else None


def _list(value: Any) -> list[Any] | None:
    return list(value) if isinstance(value, list | tuple) else None


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _secs(value: Any, digits: int = 3) -> str:
    n = _num(value)
    return "-" if n is None else f"{n:.{digits}f} s"


def freeze_text(value: Any) -> str:
    """A freeze duration as shown in the report: the recorded value, 4 decimals."""
    return _secs(value, 4)


def _when(value: Any) -> str:
    n = _num(value)
    if n is not None:
        try:
            return datetime.fromtimestamp(n, UTC).isoformat(timespec="seconds")
        except (OverflowError, OSError, ValueError):
            return "-"
    return _str(value) or "-"


def _int(value: Any) -> str:
    n = _num(value)
    return "-" if n is None else f"{int(n):,}"


# ------------------------------------------------------------------ phases
def build(doc: Mapping[str, Any]) -> Report:
    """Judge the gathered document into the five phases."""
    snapshot = _snapshot_done(doc)
    phases = (
        _discovery(doc, snapshot_done=snapshot is not None),
        _strategy(doc),
        _preparation(doc),
        _execution(doc),
        _verification(doc),
    )
    return Report(
        migration_id=_str(doc.get("migration_id")) or "-",
        generated_at=_when(doc.get("generated_at")),
        phases=phases,
    )


def _snapshot_done(doc: Mapping[str, Any]) -> dict[str, Any] | None:
    snap = _dict(doc.get("snapshot"))
    if snap is None or snap.get("step") != "done" or not _str(snap.get("consistent_point")):
        return None
    return snap


def _discovery(doc: Mapping[str, Any], *, snapshot_done: bool) -> PhaseReport:
    name = PHASES[0]
    disc = _dict(doc.get("discovery"))
    if disc is None:
        return PhaseReport(name, Status.BLOCKED, "discovery did not run")
    error = _str(disc.get("error"))
    if error is not None:
        return PhaseReport(name, Status.BLOCKED, f"discovery could not read the databases: {error}")
    raw = _list(disc.get("findings"))
    if raw is None:
        return PhaseReport(name, Status.BLOCKED, "no discovery findings recorded")
    findings = [f for f in (_dict(x) for x in raw) if f is not None]
    counts = {"error": 0, "warning": 0, "info": 0, "expected": 0}
    rows: list[tuple[str, ...]] = []
    for f in findings:
        severity = str(f.get("severity"))
        expected = snapshot_done and f.get("code") in EXPECTED_AFTER_SNAPSHOT
        key = "expected" if expected else severity
        if key in counts:
            counts[key] += 1
        rows.append(
            (
                f"{severity} (expected: cdcsync's copy)" if expected else severity,
                str(f.get("code", "-")),
                str(f.get("location", "-")),
                str(f.get("message", "")),
                str(f.get("fix") or ""),
            )
        )
    order = {"error": 0, "warning": 1, "info": 2}
    rows.sort(key=lambda r: (order.get(r[0], 3), r[1], r[2]))
    facts = (
        ("errors", str(counts["error"])),
        ("warnings", str(counts["warning"])),
        ("info", str(counts["info"])),
        ("expected after the snapshot", str(counts["expected"])),
        ("read at", _when(disc.get("at"))),
    )
    blocks: tuple[Block, ...] = ()
    if rows:
        shown = rows[:MAX_FINDINGS_LISTED]
        title = "findings" + (
            f" (first {MAX_FINDINGS_LISTED} of {len(rows)})" if len(rows) > len(shown) else ""
        )
        blocks = (Block(title, ("severity", "code", "location", "message", "fix"), tuple(shown)),)
    if counts["error"]:
        return PhaseReport(
            name, Status.ATTENTION, f"{counts['error']} error finding(s) to resolve", facts, blocks
        )
    reason = "no error findings" + (
        f"; {counts['warning']} warning(s) reviewed below" if counts["warning"] else ""
    )
    return PhaseReport(name, Status.COMPLETE, reason, facts, blocks)


def _strategy(doc: Mapping[str, Any]) -> PhaseReport:
    name = PHASES[1]
    plan = _dict(doc.get("plan"))
    fingerprint = _str(plan.get("fingerprint")) if plan else None
    if plan is None or fingerprint is None:
        return PhaseReport(
            name,
            Status.BLOCKED,
            "no plan recorded: the snapshot was taken without one (`cdcsync plan` writes it, "
            "CDCSYNC_PLAN points at it), so nothing reviewed says what moves and how",
        )
    facts: list[tuple[str, str]] = [("fingerprint", fingerprint)]
    if _str(plan.get("file")):
        facts.append(("file", str(plan["file"])))
    for key, label in (
        ("tables", "tables migrated"),
        ("excluded", "excluded"),
        ("filtered", "row filters"),
        ("mapped", "column mappings"),
    ):
        value = plan.get(key)
        if isinstance(value, list):
            facts.append((label, ", ".join(map(str, value)) or "none"))
        elif value is not None:
            facts.append((label, str(value)))
    return PhaseReport(
        name, Status.COMPLETE, "reviewed plan recorded with the snapshot", tuple(facts)
    )


def _preparation(doc: Mapping[str, Any]) -> PhaseReport:
    name = PHASES[2]
    snap = _dict(doc.get("snapshot"))
    if snap is None:
        return PhaseReport(name, Status.BLOCKED, "no snapshot recorded")
    facts: list[tuple[str, str]] = [
        ("step", str(snap.get("step", "-"))),
        ("consistent point", _str(snap.get("consistent_point")) or "-"),
        ("slot", _str(snap.get("slot_name")) or "-"),
        ("publication", _str(snap.get("publication_name")) or "-"),
        ("tables", _int(snap.get("tables"))),
        ("rows copied", _int(snap.get("rows"))),
        ("bytes copied", _int(snap.get("bytes"))),
        ("sequences", _int(snap.get("sequences"))),
    ]
    blocks: list[Block] = []
    timings = _dict(snap.get("timings")) or {}
    if timings:
        blocks.append(
            Block(
                "snapshot timings",
                ("step", "seconds"),
                tuple(
                    (k, _secs(timings[k]))
                    for k in sorted(timings, key=lambda k: (_STEP_ORDER.get(k, 99), k))
                ),
            )
        )
    backup = _dict(doc.get("backup"))
    if backup is not None:
        facts += [
            ("backup", _str(backup.get("location")) or "-"),
            ("backup taken", _when(backup.get("at"))),
            ("backup size", f"{_int(backup.get('size_bytes'))} bytes"),
            ("backup verified", "yes" if backup.get("verified") is True else "no"),
        ]
        check = _dict(backup.get("verification")) or {}
        if check:
            facts.append(("backup check", f"{check.get('level', '-')}: {_mismatch_text(check)}"))
        files = _dict(backup.get("files")) or {}
        if files:
            blocks.append(
                Block(
                    "backup files (sha256)",
                    ("file", "sha256"),
                    tuple((str(k), str(v)) for k, v in sorted(files.items())),
                )
            )
    if _snapshot_done(doc) is None:
        return PhaseReport(
            name,
            Status.BLOCKED,
            f"snapshot not finished (step {snap.get('step', '-')})",
            tuple(facts),
            tuple(blocks),
        )
    if backup is None:
        return PhaseReport(
            name,
            Status.ATTENTION,
            "snapshot done, but no verified backup of the source recorded (run cdcsync backup)",
            tuple(facts),
            tuple(blocks),
        )
    if backup.get("verified") is not True:
        why = _str(backup.get("error")) or "its check did not pass"
        return PhaseReport(
            name, Status.ATTENTION, f"the last backup failed: {why}", tuple(facts), tuple(blocks)
        )
    return PhaseReport(
        name,
        Status.COMPLETE,
        "snapshot done at its consistent point and a verified backup recorded",
        tuple(facts),
        tuple(blocks),
    )


def _mismatch_text(verification: Mapping[str, Any]) -> str:
    mismatches = _dict(verification.get("mismatches"))
    if mismatches is None:
        return "no result recorded"
    bad = {k: v for k, v in mismatches.items() if v}
    if not bad:
        return f"equal ({len(mismatches)} table(s))" if mismatches else "equal"
    return "differs: " + ", ".join(f"{k} ({v})" for k, v in bad.items())


def _switches(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [s for s in (_dict(x) for x in _list(doc.get("switches")) or []) if s is not None]


def _execution(doc: Mapping[str, Any]) -> PhaseReport:
    name = PHASES[3]
    streams = [s for s in (_dict(x) for x in _list(doc.get("streams")) or []) if s is not None]
    switches = _switches(doc)
    blocks: list[Block] = []
    if streams:
        blocks.append(
            Block(
                "streaming (offsets stored with the applied rows)",
                (
                    "direction",
                    "partitions",
                    "applied offsets",
                    "last applied LSN",
                    "last applied commit",
                    "updated",
                ),
                tuple(
                    (
                        str(s.get("direction", "-")),
                        _int(s.get("partitions")),
                        _int(s.get("applied_offsets")),
                        _str(s.get("last_lsn")) or "-",
                        _when(s.get("last_commit_ts")),
                        _when(s.get("updated_at")),
                    )
                    for s in streams
                ),
            )
        )
    if switches:
        blocks.append(
            Block(
                "switches (from the audit trail)",
                ("#", "switch", "at", "actor", "result", "freeze", "verification", "positions"),
                tuple(
                    (
                        str(i),
                        str(s.get("kind", "-")),
                        _when(s.get("at")),
                        str(s.get("actor", "-")),
                        str(s.get("result", "-")),
                        freeze_text(s.get("freeze_seconds")),
                        _verification_cell(_dict(s.get("verification"))),
                        ", ".join(f"{k}={v}" for k, v in (_dict(s.get("positions")) or {}).items()),
                    )
                    for i, s in enumerate(switches, 1)
                ),
            )
        )
        for i, s in enumerate(switches, 1):
            steps = _dict(s.get("steps")) or {}
            if steps:
                blocks.append(
                    Block(
                        f"switch #{i} ({s.get('kind', '-')}) step timings",
                        ("step", "seconds"),
                        tuple((str(k), _secs(v, 4)) for k, v in steps.items()),
                    )
                )
    others = [o for o in (_dict(x) for x in _list(doc.get("events")) or []) if o is not None]
    if others:
        blocks.append(
            Block(
                "other recorded commands",
                ("command", "at", "actor", "result"),
                tuple(
                    (
                        str(o.get("command", "-")),
                        _when(o.get("at")),
                        str(o.get("actor", "-")),
                        str(o.get("result", "-")),
                    )
                    for o in others
                ),
            )
        )
    facts = (
        ("phase", str(doc.get("phase") or "-")),
        ("primary", str(doc.get("primary") or "-")),
        ("way back", _way_back(doc)),
        ("switches", str(len(switches))),
    )
    halted = _str(doc.get("halted"))
    in_progress = _dict(doc.get("switch_in_progress"))
    if not streams:
        return PhaseReport(
            name, Status.BLOCKED, "no streamed change applied yet", facts, tuple(blocks)
        )
    if halted is not None:
        return PhaseReport(
            name, Status.ATTENTION, f"the applier halted: {halted}", facts, tuple(blocks)
        )
    if in_progress is not None:
        return PhaseReport(
            name,
            Status.ATTENTION,
            f"a {in_progress.get('kind', 'switch')} is unfinished (last step "
            f"{in_progress.get('done') or 'none'}): run it with --resume, or cdcsync abort",
            facts,
            tuple(blocks),
        )
    if switches and switches[-1].get("result") != "done":
        last = switches[-1]
        return PhaseReport(
            name,
            Status.ATTENTION,
            f"the last {last.get('kind', 'switch')} ended {last.get('result', '-')}: "
            f"{last.get('message') or 'see the audit trail'}",
            facts,
            tuple(blocks),
        )
    done = sum(1 for s in switches if s.get("result") == "done")
    reason = "changes streamed and applied" + (f"; {done} switch(es) done" if done else "")
    return PhaseReport(name, Status.COMPLETE, reason, facts, tuple(blocks))


def _way_back(doc: Mapping[str, Any]) -> str:
    if _num(doc.get("finalized_at")) is not None or doc.get("phase") == "finalized":
        return "closed (finalized)"
    armed = _dict(doc.get("armed_streams")) or {}
    if armed:
        return "open: the " + ", ".join(sorted(str(k) for k in armed)) + " stream is armed"
    return "-"


def _verification_cell(v: dict[str, Any] | None) -> str:
    if v is None:
        return "-"
    level = str(v.get("level", "-"))
    if level == "none":
        return "none"
    return f"{level}: {_mismatch_text(v)}"


def _verification(doc: Mapping[str, Any]) -> PhaseReport:
    name = PHASES[4]
    ver = _dict(doc.get("verification"))
    finalized = _num(doc.get("finalized_at"))
    facts: list[tuple[str, str]] = [("finalized", _when(finalized) if finalized else "no")]
    blocks: list[Block] = []
    if ver is not None:
        facts += [
            ("last verification", _verification_cell(ver)),
            ("verified at", _when(ver.get("at"))),
        ]
        tables = _dict(ver.get("mismatches")) or {}
        if tables:
            blocks.append(
                Block(
                    "last verification per table",
                    ("table", "mismatches"),
                    tuple((str(t), _int(n)) for t, n in tables.items()),
                )
            )
    if ver is None:
        return PhaseReport(name, Status.BLOCKED, "no verification recorded", tuple(facts))
    level = ver.get("level")
    mismatches = _dict(ver.get("mismatches"))
    if level == "none":
        return PhaseReport(
            name,
            Status.ATTENTION,
            "the last switch ran without verification",
            tuple(facts),
            tuple(blocks),
        )
    if mismatches is None:
        return PhaseReport(
            name,
            Status.ATTENTION,
            "the last verification recorded no result",
            tuple(facts),
            tuple(blocks),
        )
    if any(mismatches.values()):
        return PhaseReport(
            name,
            Status.ATTENTION,
            "the last verification found differences",
            tuple(facts),
            tuple(blocks),
        )
    if level not in STRONG_LEVELS:
        return PhaseReport(
            name,
            Status.ATTENTION,
            f"the last verification compared {level or 'nothing'} only, not checksums",
            tuple(facts),
            tuple(blocks),
        )
    if finalized is None:
        return PhaseReport(
            name,
            Status.BLOCKED,
            "verified equal, but not finalized: the way back stays open until "
            "`cdcsync finalize --confirm <migration-id>`",
            tuple(facts),
            tuple(blocks),
        )
    return PhaseReport(
        name,
        Status.COMPLETE,
        "verified equal at checksum level and finalized",
        tuple(facts),
        tuple(blocks),
    )


# ------------------------------------------------------------------ rendering
def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("\r", " ")


def _verdict(report: Report) -> str:
    if report.complete:
        return "complete: every phase is ✅"
    open_ = [f"{p.name} {p.status.value}" for p in report.phases if p.status is not Status.COMPLETE]
    return "not complete: " + ", ".join(open_)


def render_markdown(report: Report) -> str:
    out = [
        f"# Migration report: {_md_cell(report.migration_id)}",
        "",
        f"Generated {report.generated_at}. Verdict: **{_verdict(report)}**.",
        "",
        "| Phase | Status | Why |",
        "| --- | --- | --- |",
    ]
    out += [
        f"| {p.name} | {p.status.value} {p.status.label} | {_md_cell(p.reason)} |"
        for p in report.phases
    ]
    for i, p in enumerate(report.phases, 1):
        out += ["", f"## {i}. {p.name} — {p.status.value} {p.status.label}", "", _md_cell(p.reason)]
        if p.facts:
            out.append("")
            out += [f"- {_md_cell(k)}: {_md_cell(v)}" for k, v in p.facts]
        for b in p.blocks:
            out += ["", f"**{_md_cell(b.title)}**", ""]
            out.append("| " + " | ".join(_md_cell(h) for h in b.headers) + " |")
            out.append("|" + " --- |" * len(b.headers))
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
    return "\n".join(out) + "\n"


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem}"
    "table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;"
    "padding:.2rem .5rem;text-align:left;vertical-align:top}"
    ".complete{color:#116611}.attention{color:#995500}.blocked{color:#993333}"
)
_CLASS = {Status.COMPLETE: "complete", Status.ATTENTION: "attention", Status.BLOCKED: "blocked"}


def _h(text: str) -> str:
    return html.escape(text, quote=True)


def _html_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["<table>", "<tr>" + "".join(f"<th>{_h(h)}</th>" for h in headers) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{_h(c)}</td>" for c in row) + "</tr>" for row in rows]
    out.append("</table>")
    return out


def render_html(report: Report) -> str:
    title = f"Migration report: {report.migration_id}"
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_h(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_h(title)}</h1>",
        f'<p>Generated {_h(report.generated_at)}. Verdict: <strong id="verdict">'
        f"{_h(_verdict(report))}</strong>.</p>",
    ]
    out += _html_table(
        ("Phase", "Status", "Why"),
        [(p.name, f"{p.status.value} {p.status.label}", p.reason) for p in report.phases],
    )
    for i, p in enumerate(report.phases, 1):
        slug = p.name.lower().replace(" & ", "-").replace(" ", "-")
        out.append(f'<section id="{_h(slug)}" data-status="{_CLASS[p.status]}">')
        out.append(
            f'<h2>{i}. {_h(p.name)} <span class="{_CLASS[p.status]}">'
            f"{p.status.value} {_h(p.status.label)}</span></h2>"
        )
        out.append(f"<p>{_h(p.reason)}</p>")
        if p.facts:
            out.append("<ul>")
            out += [f"<li>{_h(k)}: {_h(v)}</li>" for k, v in p.facts]
            out.append("</ul>")
        for b in p.blocks:
            out.append(f"<h3>{_h(b.title)}</h3>")
            out += _html_table(b.headers, b.rows)
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
