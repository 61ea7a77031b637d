"""The report's pure core: statuses derived from recorded state, and both renderings."""

from __future__ import annotations

import re
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from cdcsync.core import report_model as rm
from cdcsync.core.report_model import PHASES, Status

garbage = st.one_of(
    st.none(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=3),
    st.booleans(),
)
finding = st.fixed_dictionaries(
    {
        "severity": st.sampled_from(["info", "warning", "error", "bogus"]),
        "code": st.sampled_from(["target-not-empty", "replica-identity", "versions", "x|y"]),
        "location": st.text(max_size=10),
        "message": st.text(max_size=20),
    }
)
discovery = st.one_of(
    st.fixed_dictionaries({"findings": st.lists(finding, max_size=5)}, optional={"at": garbage}),
    st.fixed_dictionaries({"error": st.text(min_size=1, max_size=10)}),
    garbage,
)
snapshot = st.one_of(
    st.fixed_dictionaries(
        {
            "step": st.sampled_from(["done", "copy", "pre_data", None]),
            "consistent_point": st.sampled_from(["0/16B3748", "", None]),
        },
        optional={
            "timings": st.dictionaries(st.sampled_from(["copy", "total"]), garbage),
            "rows": garbage,
            "tables": garbage,
        },
    ),
    garbage,
)
backup = st.one_of(
    st.fixed_dictionaries(
        {"verified": st.one_of(st.booleans(), garbage)},
        optional={"location": st.text(max_size=10), "error": garbage, "files": garbage},
    ),
    garbage,
)
stream = st.fixed_dictionaries(
    {"direction": st.sampled_from(["forward", "reverse"])},
    optional={"partitions": garbage, "applied_offsets": garbage, "last_commit_ts": garbage},
)
switch = st.fixed_dictionaries(
    {
        "kind": st.sampled_from(["cutover", "rollback"]),
        "result": st.sampled_from(["done", "AbortedSafely", "failed"]),
    },
    optional={
        "freeze_seconds": st.one_of(st.floats(0, 60), garbage),
        "steps": st.one_of(st.dictionaries(st.sampled_from(["freeze", "drain"]), garbage), garbage),
        "at": garbage,
    },
)
mismatches = st.dictionaries(st.sampled_from(["public.a", "public.b"]), st.integers(0, 3))
verification = st.one_of(
    st.fixed_dictionaries(
        {"level": st.sampled_from(["none", "counts", "checksum", "rows", None])},
        optional={"mismatches": st.one_of(mismatches, garbage), "at": garbage},
    ),
    garbage,
)
doc_keys = {
    "migration_id": st.one_of(st.text(max_size=10), garbage),
    "generated_at": garbage,
    "phase": st.sampled_from(["snapshot", "snapshotted", "cut_over", "finalized", None]),
    "discovery": discovery,
    "plan": st.one_of(st.fixed_dictionaries({"fingerprint": st.text(max_size=6)}), garbage),
    "snapshot": snapshot,
    "backup": backup,
    "streams": st.one_of(st.lists(stream, max_size=2), garbage),
    "halted": st.one_of(st.text(max_size=5), garbage),
    "switch_in_progress": st.one_of(st.fixed_dictionaries({"kind": st.just("cutover")}), garbage),
    "switches": st.one_of(st.lists(switch, max_size=3), garbage),
    "verification": verification,
    "finalized_at": st.one_of(st.floats(1e9, 2e9), garbage),
}
docs = st.fixed_dictionaries({}, optional=doc_keys)

#: What each phase needs recorded before it may show ✅.
REQUIRED: dict[str, tuple[str, ...]] = {
    "Discovery": ("discovery",),
    "Strategy": ("plan",),
    "Preparation": ("snapshot", "backup"),
    "Execution": ("streams",),
    "Verification & Cleanup": ("verification", "finalized_at"),
}


def complete_doc() -> dict[str, Any]:
    return {
        "migration_id": "m1",
        "generated_at": 1_700_000_000.0,
        "phase": "snapshotted",
        "discovery": {
            "findings": [
                {"severity": "warning", "code": "slot-wal-unbounded", "location": "source"},
                {"severity": "error", "code": "target-not-empty", "location": "target:public.a"},
            ]
        },
        "plan": {"fingerprint": "abc"},
        "snapshot": {"step": "done", "consistent_point": "0/16B3748", "timings": {"copy": 1.5}},
        "backup": {"verified": True, "location": "/b", "files": {"toc.dat": "00"}},
        "streams": [{"direction": "forward", "partitions": 3, "applied_offsets": 10}],
        "switches": [
            {
                "kind": "cutover",
                "result": "done",
                "freeze_seconds": 1.2345,
                "steps": {"freeze": 0.1},
            },
            {"kind": "rollback", "result": "done", "freeze_seconds": 2.5},
        ],
        "verification": {"level": "checksum", "mismatches": {}},
        "finalized_at": 1_700_000_100.0,
    }


@settings(max_examples=300, deadline=None)
@given(docs)
def test_every_phase_gets_exactly_one_status(doc: dict[str, Any]) -> None:
    report = rm.build(doc)
    assert tuple(p.name for p in report.phases) == PHASES
    assert all(isinstance(p.status, Status) for p in report.phases)
    assert report.complete == all(p.status is Status.COMPLETE for p in report.phases)


@settings(max_examples=300, deadline=None)
@given(docs, st.sampled_from(sorted(REQUIRED)), st.data())
def test_never_complete_without_its_recorded_inputs(
    doc: dict[str, Any], phase: str, data: st.DataObject
) -> None:
    key = data.draw(st.sampled_from(REQUIRED[phase]))
    doc.pop(key, None)
    if data.draw(st.booleans()):
        doc[key] = None
    report = rm.build(doc)
    assert report.status_of(phase) is not Status.COMPLETE
    assert not report.complete


@settings(max_examples=200, deadline=None)
@given(docs)
def test_markdown_and_html_contain_every_phase_and_its_status(doc: dict[str, Any]) -> None:
    report = rm.build(doc)
    md = rm.render_markdown(report)
    page = rm.render_html(report)
    for i, p in enumerate(report.phases, 1):
        assert f"## {i}. {p.name} — {p.status.value} {p.status.label}" in md
        assert f"{i}. {p.name.replace('&', '&amp;')} <span" in page
    statuses = re.findall(r'<section id="[^"]+" data-status="([a-z]+)">', page)
    assert len(statuses) == len(PHASES)
    assert page.count("<table>") == page.count("</table>")


def test_a_fully_recorded_migration_is_complete() -> None:
    report = rm.build(complete_doc())
    assert [p.status for p in report.phases] == [Status.COMPLETE] * 5, [
        (p.name, p.reason) for p in report.phases
    ]
    md = rm.render_markdown(report)
    assert "**complete: every phase is ✅**" in md
    assert "1.2345 s" in md and "2.5000 s" in md  # freeze durations as recorded


def test_each_gap_is_named() -> None:
    cases: list[tuple[dict[str, Any], str, Status, str]] = [
        ({"plan": None}, "Strategy", Status.BLOCKED, "taken without one"),
        ({"backup": None}, "Preparation", Status.ATTENTION, "no verified backup"),
        (
            {"backup": {"verified": False, "error": "pg_restore failed"}},
            "Preparation",
            Status.ATTENTION,
            "pg_restore failed",
        ),
        ({"snapshot": {"step": "copy"}}, "Preparation", Status.BLOCKED, "not finished"),
        ({"halted": "bad event at offset 7"}, "Execution", Status.ATTENTION, "offset 7"),
        (
            {"switch_in_progress": {"kind": "cutover", "done": "drain"}},
            "Execution",
            Status.ATTENTION,
            "--resume",
        ),
        (
            {"switches": [{"kind": "cutover", "result": "AbortedSafely", "message": "lag"}]},
            "Execution",
            Status.ATTENTION,
            "lag",
        ),
        ({"streams": []}, "Execution", Status.BLOCKED, "no streamed change"),
        (
            {"verification": {"level": "checksum", "mismatches": {"public.a": 2}}},
            "Verification & Cleanup",
            Status.ATTENTION,
            "differences",
        ),
        (
            {"verification": {"level": "counts", "mismatches": {}}},
            "Verification & Cleanup",
            Status.ATTENTION,
            "counts only",
        ),
        (
            {"verification": {"level": "none"}},
            "Verification & Cleanup",
            Status.ATTENTION,
            "without verification",
        ),
        ({"finalized_at": None}, "Verification & Cleanup", Status.BLOCKED, "finalize"),
        ({"discovery": {"error": "cannot connect"}}, "Discovery", Status.BLOCKED, "cannot connect"),
        (
            {"discovery": {"findings": [{"severity": "error", "code": "wal-level"}]}},
            "Discovery",
            Status.ATTENTION,
            "1 error",
        ),
    ]
    for change, phase, status, words in cases:
        doc = {**complete_doc(), **change}
        got = next(p for p in rm.build(doc).phases if p.name == phase)
        assert (got.status, words in got.reason) == (status, True), (change, got)


def test_target_not_empty_counts_only_before_the_snapshot() -> None:
    doc = complete_doc()
    doc["snapshot"] = {"step": "copy", "consistent_point": "0/1"}
    assert rm.build(doc).status_of("Discovery") is Status.ATTENTION


def test_html_escapes_recorded_text() -> None:
    doc = complete_doc()
    doc["discovery"] = {"findings": [{"severity": "info", "code": "<script>", "message": "a&b"}]}
    page = rm.render_html(rm.build(doc))
    assert "<script>" not in page and "&lt;script&gt;" in page and "a&amp;b" in page
