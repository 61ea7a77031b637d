"""``cdcsync snapshot``: preflight, schema, boundary, parallel copy, post-data, fence — resumable.

The steps, each recorded in the target's state before it starts:

1. preflight (:mod:`.preflight`) — nothing is changed when it fails;
2. ``pre_data``: the schema, unless the operator created it (:mod:`.schema_copy`);
3. ``boundary``: cdcsync's publication, then the slot and its exported snapshot, held
   by a process of its own (:mod:`.boundary`);
4. ``copy``: the chunk plan is stored, then workers copy the chunks not yet recorded
   (:mod:`.copy`); each chunk's record commits with its rows. A table's indexes and
   keys are built as soon as its last chunk commits, while the others are copied
   (:mod:`.postdata`);
5. ``post_data``: sequences, the indexes left, foreign keys and the rest of the
   post-data section, then the write fence.

Run again after a crash, it continues from the recorded step: the copy under the same
exported snapshot while its holder still lives (it outlives the crashed process for
``keep_snapshot_seconds``), otherwise from a clean start — slot, publication and the
partial copy undone first. Either way no row is copied twice or missed.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from cdcsync.adapters import fence
from cdcsync.adapters.pg import connect
from cdcsync.adapters.state_store import ensure_schema
from cdcsync.config import Settings
from cdcsync.core import plan as plan_mod
from cdcsync.core.events import TableId
from cdcsync.errors import ConfigError, PreconditionError
from cdcsync.snapshot import (
    boundary,
    catalog,
    chunking,
    postdata,
    preflight,
    schema_copy,
    sequences,
)
from cdcsync.snapshot import state as st
from cdcsync.snapshot.catalog import TableInfo
from cdcsync.snapshot.chunking import Chunk
from cdcsync.snapshot.copy import (
    CopyTotals,
    RateLimiter,
    SnapshotLost,
    TableCopy,
    TableRewritten,
    copy_chunks,
    open_source,
)
from cdcsync.snapshot.progress import Progress

log = logging.getLogger("cdcsync.snapshot")

DEFAULT_KEEP_SNAPSHOT_SECONDS = 900.0


@dataclass
class SnapshotResult:
    tables: list[TableId]
    consistent_point: str
    rows: int = 0
    bytes: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    slot_name: str = ""
    publication_name: str = ""
    how: str = "fresh"  # fresh, resumed, restarted, or done (nothing left to do)
    sequences: int = 0
    kept_objects: list[str] = field(default_factory=list)  # post-data objects already there
    skipped_objects: list[str] = field(default_factory=list)  # foreign keys out of scope


@dataclass(frozen=True)
class Handover:
    """What streaming needs from the snapshot: Debezium streams from this slot."""

    slot_name: str
    publication_name: str
    consistent_point: str
    tables: list[TableId]


def migration_state(
    target: psycopg.Connection[Any], settings: Settings
) -> tuple[str, dict[str, Any]] | None:
    """(phase, data) of the migration, or None; creates nothing."""
    found = st.read(target, settings)
    return None if found is None else (found.phase, found.data)


def handover(target: psycopg.Connection[Any], settings: Settings) -> Handover:
    """Slot, publication, consistent point and tables of a finished snapshot."""
    found = st.read(target, settings)
    if found is None or found.phase == st.PHASE_SNAPSHOT or not found.consistent_point:
        raise PreconditionError(
            f"migration {settings.migration_id} has no finished snapshot: run cdcsync snapshot"
        )
    return Handover(
        found.slot_name or settings.slot_name,
        found.publication_name or settings.publication_name,
        found.consistent_point,
        found.tables,
    )


def run_snapshot(
    settings: Settings,
    *,
    allow_nonempty: bool = False,
    on_boundary: Callable[[str], None] | None = None,
    progress: Progress | None = None,
    keep_snapshot_seconds: float = DEFAULT_KEEP_SNAPSHOT_SECONDS,
    max_rate_mb_s: float | None = None,
    limiter: RateLimiter | None = None,
) -> SnapshotResult:
    """The whole snapshot phase (or what an interrupted run left of it).

    ``on_boundary`` is called with the exported snapshot's name while it can still be
    imported (tests compare the copy with what that snapshot sees). ``progress`` and
    ``limiter`` may be the caller's, to read the counters and change the pace while
    the copy runs; ``max_rate_mb_s`` is a fixed pace otherwise.
    """
    settings.require("source_dsn", "target_dsn")
    run = _Run(
        settings,
        allow_nonempty=allow_nonempty,
        on_boundary=on_boundary,
        progress=progress or Progress("auto"),
        keep_snapshot_seconds=keep_snapshot_seconds,
        limiter=limiter or RateLimiter(max_rate_mb_s * 1e6 if max_rate_mb_s else None),
    )
    return run.execute()


def plan_problems(
    source: psycopg.Connection[Any], plan: plan_mod.Plan, infos: Sequence[TableInfo]
) -> list[str]:
    """What in ``plan`` does not fit the source's tables (filters checked by PostgreSQL)."""
    if plan is plan_mod.EMPTY:
        return []
    columns = {i.table: tuple(c.name for c in i.columns) for i in infos}
    keys = {i.table: i.primary_key for i in infos}
    excluded = {t for t, p in plan.tables.items() if not p.include}
    problems = plan_mod.validate_against(
        plan_mod.Plan({t: p for t, p in plan.tables.items() if t not in excluded}),
        columns,
        keys,
    )
    for table, row_filter in plan.filters().items():
        if table not in columns:
            continue
        rel = sql.Identifier(table.schema, table.name)
        row = source.execute(
            "SELECT relreplident FROM pg_class WHERE oid = %s::regclass",
            (rel.as_string(source),),
        ).fetchone()
        if row is None or row[0] != "f":
            problems.append(
                f"plan: {table} has a row filter, so its updates and deletes must carry "
                "every column the filter may read: run ALTER TABLE "
                f"{rel.as_string(source)} REPLICA IDENTITY FULL on the source (else "
                "PostgreSQL refuses the source's own updates of the table)"
            )
        try:
            with source.transaction():
                source.execute(
                    sql.SQL("SELECT 1 FROM {} WHERE ({}) LIMIT 0").format(rel, sql.SQL(row_filter))
                )
        except psycopg.Error as exc:
            problems.append(f"plan: the filter of {table} fails on the source: {exc}")
    source.rollback()
    return problems


class _Run:
    def __init__(
        self,
        settings: Settings,
        *,
        allow_nonempty: bool,
        on_boundary: Callable[[str], None] | None,
        progress: Progress,
        keep_snapshot_seconds: float,
        limiter: RateLimiter,
    ) -> None:
        self.settings = settings
        self.allow_nonempty = allow_nonempty
        self.on_boundary = on_boundary
        self.progress = progress
        self.keep = keep_snapshot_seconds
        self.limiter = limiter
        self.source_dsn = settings.source_conninfo()
        self.target_dsn = settings.target_conninfo()
        self.timings: dict[str, float] = {}
        self.started = time.monotonic()
        self.holder: boundary.Holder | None = None
        self.post: postdata.PostDataRun | None = None
        self.plan = plan_mod.load(settings.plan) if settings.plan else plan_mod.EMPTY

    # ------------------------------------------------------------------ driver
    def execute(self) -> SnapshotResult:
        source = connect(self.source_dsn, "source")
        target = connect(self.target_dsn, "target")
        try:
            return self._execute(source, target)
        except BaseException as exc:
            if (
                self.holder is not None
                and self.holder.boundary is not None
                and not isinstance(exc, TableRewritten | SnapshotLost)
            ):
                log.warning(
                    "snapshot interrupted (%s); the exported snapshot is kept for %.0f s: run "
                    "cdcsync snapshot again to finish the copy under it",
                    type(exc).__name__,
                    self.keep,
                )
            raise
        finally:
            if self.post is not None:
                self.post.builder.close(cancel=True)
            if self.holder is not None:
                self.holder.detach()
            source.close()
            target.close()

    def _execute(
        self, source: psycopg.Connection[Any], target: psycopg.Connection[Any]
    ) -> SnapshotResult:
        s = self.settings
        found = st.read(target, s)
        if found is not None and found.phase != st.PHASE_SNAPSHOT:
            log.info("migration %s is past its snapshot (phase %s)", s.migration_id, found.phase)
            return self._result(target, found, how="done")
        row = source.execute("SELECT current_database()").fetchone()
        source.rollback()
        inputs = st.fingerprint_inputs(s, str(row[0]) if row else "")
        if self.plan is not plan_mod.EMPTY:
            inputs["plan"] = self.plan.fingerprint()  # a changed plan needs a new snapshot
        fingerprint = st.fingerprint(inputs)
        if found is not None and found.fingerprint and found.fingerprint != fingerprint:
            before = found.data.get("fingerprint_inputs", {})
            changed = ", ".join(
                f"{k}: {before.get(k)!r} → {v!r}" for k, v in inputs.items() if before.get(k) != v
            )
            raise ConfigError(
                f"migration {s.migration_id} was started with other settings "
                f"({changed or 'unknown'}): run it with the original settings, or use a new "
                "CDCSYNC_MIGRATION_ID"
            )

        if found is not None and found.step == st.STEP_POST_DATA:
            log.info("resuming: the copy is complete, finishing indexes, sequences and fence")
            with psycopg.connect(self.source_dsn, autocommit=True) as admin:
                boundary.end_holder(admin, s.slot_name)  # if the crash came before its release
            infos = catalog.describe(source, found.tables)
            return self._finish(source, target, found.tables, infos, how="resumed")
        if found is not None and found.step == st.STEP_COPY and self._alive(source, found):
            return self._resume_copy(source, target, found)

        tables = self.plan.included(catalog.list_tables(source, s))
        infos = catalog.describe(source, tables)
        plan_problems = self._plan_problems(source, infos)
        if plan_problems:
            raise PreconditionError(
                "the plan does not fit the source, nothing was changed:\n  - "
                + "\n  - ".join(plan_problems)
            )
        ours = preflight.Ownership(
            slot=bool(found and found.data.get("created_slot")),
            publication=bool(found and found.data.get("created_publication")),
            target_tables=frozenset(str(t) for t in (found.tables if found else [])),
        )
        facts = preflight.gather(
            source,
            target,
            source_dsn=self.source_dsn,
            tables=tables,
            infos=infos,
            slot=s.slot_name,
            publication=s.publication_name,
            pg_dump=schema_copy.pg_bin("pg_dump"),
            plan=self.plan,
        )
        problems = preflight.evaluate(
            facts,
            slot=s.slot_name,
            publication=s.publication_name,
            allow_nonempty=self.allow_nonempty,
            ours=ours,
        )
        if problems:
            raise PreconditionError(
                "snapshot preflight failed, nothing was changed:\n  - " + "\n  - ".join(problems)
            )
        ensure_schema(target, s.state_schema)
        how = "fresh"
        if found is not None:
            log.warning(
                "the previous snapshot attempt stopped at step %s and its exported snapshot is "
                "gone: undoing it and starting over with a new slot",
                found.step,
            )
            self._undo(source, target, found)
            how = "restarted"
        return self._fresh(source, target, tables, infos, facts, inputs, fingerprint, how)

    # -------------------------------------------------------------- the steps
    def _fresh(
        self,
        source: psycopg.Connection[Any],
        target: psycopg.Connection[Any],
        tables: list[TableId],
        infos: list[TableInfo],
        facts: preflight.Facts,
        inputs: dict[str, Any],
        fingerprint: str,
        how: str,
    ) -> SnapshotResult:
        s = self.settings
        self.holder = boundary.Holder.spawn()  # starts while the schema is copied
        st.write(
            target,
            s,
            st.PHASE_SNAPSHOT,
            fingerprint=fingerprint,
            replace_data=True,
            step=st.STEP_PRE_DATA,
            tables=[[t.schema, t.name] for t in tables],
            fingerprint_inputs=inputs,
            created_slot=False,
            created_publication=False,
            plan=self._plan_summary(tables),
        )
        selection = self._selection(source, infos)
        # Neither the chunk plan nor the post-data script depends on the boundary (chunk
        # bounds only share out the rows, whatever the snapshot): both are prepared on
        # the side while the schema is restored and the slot created.
        size = chunking.chunk_bytes(
            sum(i.bytes for i in infos), s.workers, s.snapshot_chunk_blocks * chunking.BLOCK_SIZE
        )
        prep = ThreadPoolExecutor(max_workers=2, thread_name_prefix="snapshot-prep")
        planned = prep.submit(self._plan_chunks, infos, size)
        dumped = prep.submit(self._post_data_script, selection)
        prep.shutdown(wait=False)
        t = time.monotonic()
        if facts.target_present:
            log.info("the target already has the migrated tables: using its schema as it is")
        else:
            count = schema_copy.copy_pre_data(
                source,
                target,
                source_dsn=self.source_dsn,
                target_dsn=self.target_dsn,
                selection=selection,
            )
            log.info("pre-data schema restored on the target: %d objects", count)
        if self.allow_nonempty and facts.target_nonempty:
            log.warning(
                "emptying %d non-empty target table(s) (--allow-nonempty-target)",
                len(facts.target_nonempty),
            )
            st.clear_copy(target, s, tables)
        self.timings["pre_data"] = time.monotonic() - t

        t = time.monotonic()
        # Intent first: from here on an interrupted run is undone by the next one.
        st.write(
            target,
            s,
            st.PHASE_SNAPSHOT,
            step=st.STEP_BOUNDARY,
            created_slot=True,
            created_publication=True,
        )
        with psycopg.connect(self.source_dsn, autocommit=True) as ddl:
            started = time.monotonic()
            boundary.create_publication(
                ddl,
                s.publication_name,
                [(i.table, i.partitioned) for i in infos],
                self.plan.filters(),
            )

            def waiting(seconds: float) -> None:
                blockers = boundary.open_transactions(ddl, seconds)
                log.warning(
                    "creating slot %s has waited %.0f s for transactions open on the source to "
                    "end: %s (end them, or wait)",
                    s.slot_name,
                    seconds,
                    "; ".join(blockers[:5]) or "none visible to this role",
                )

            published = time.monotonic()
            try:
                b = self.holder.create(self.source_dsn, s.slot_name, self.keep, waiting)
            except BaseException:
                boundary.drop_publication(ddl, s.publication_name)
                st.write(
                    target,
                    s,
                    st.PHASE_SNAPSHOT,
                    step=st.STEP_PRE_DATA,
                    created_slot=False,
                    created_publication=False,
                )
                raise
        slotted = time.monotonic()
        probe = open_source(self.source_dsn, b.snapshot_name)
        identity = boundary.snapshot_identity(probe)
        if self.on_boundary is not None:
            self.on_boundary(b.snapshot_name)
        probe.close()
        log.info(
            "slot %s created at consistent point %s; snapshot %s exported",
            b.slot_name,
            b.consistent_point,
            b.snapshot_name,
        )
        probed = time.monotonic()
        plan = planned.result()
        planned_at = time.monotonic()
        st.save_plan(target, s, plan)
        st.write(
            target,
            s,
            st.PHASE_SNAPSHOT,
            step=st.STEP_COPY,
            consistent_point=b.consistent_point,
            snapshot_name=b.snapshot_name,
            snapshot_identity=identity,
            holder_pid=b.holder_pid,
            holder_host=socket.gethostname(),
        )
        self.timings["boundary"] = time.monotonic() - t
        log.info(
            "boundary in %.2fs: publication %.2fs, slot %.2fs, snapshot probe %.2fs, waiting "
            "for the chunk plan %.2fs, state %.2fs",
            self.timings["boundary"],
            published - started,
            slotted - published,
            probed - slotted,
            planned_at - probed,
            time.monotonic() - planned_at,
        )

        self._copy(target, infos, plan, b.snapshot_name, dumped.result())
        self.holder.release()
        self.holder = None
        st.write(target, s, st.PHASE_SNAPSHOT, step=st.STEP_POST_DATA)
        return self._finish(source, target, tables, infos, how=how)

    def _plan_summary(self, tables: list[TableId]) -> dict[str, Any] | None:
        """What the report shows of the plan the snapshot was taken under."""
        if self.plan is plan_mod.EMPTY:
            return None
        return {
            "file": str(self.settings.plan),
            "fingerprint": self.plan.fingerprint(),
            "tables": len(tables),
            "excluded": sorted(str(t) for t, p in self.plan.tables.items() if not p.include),
            "filtered": sorted(str(t) for t in self.plan.filters()),
            "mapped": sorted(
                str(t) for t, p in self.plan.tables.items() if p.include and p.maps_columns
            ),
        }

    def _plan_chunks(self, infos: Sequence[TableInfo], size: int) -> list[Chunk]:
        with psycopg.connect(self.source_dsn, autocommit=True) as sizing:
            return plan_chunks(sizing, infos, size)

    def _post_data_script(self, selection: schema_copy.Selection) -> schema_copy.Script:
        """The source's post-data section, without what the selection leaves out."""
        script = schema_copy.parse(schema_copy.dump(self.source_dsn, "post-data", selection))
        script.entries = [e for e in script.entries if selection.keep(e)]
        return script

    def _plan_problems(
        self, source: psycopg.Connection[Any], infos: Sequence[TableInfo]
    ) -> list[str]:
        return plan_problems(source, self.plan, infos)

    def _apply_plan(self, target: psycopg.Connection[Any], tables: list[TableId]) -> None:
        """The plan's columns on the target, in one transaction with the record of it."""
        s = self.settings
        found = st.read(target, s)
        target.rollback()
        if found is not None and found.data.get("plan_applied"):
            return
        statements = [stmt for t in tables for stmt in self.plan.table(t).ddl(s.state_schema)]
        hooked = [tp for t in tables if (tp := self.plan.table(t)).hooks()]
        with target.transaction():
            # Python hooks first, on the table as copied (source names, before the DDL):
            # rows read by key through a server-side cursor, whose snapshot does not see
            # the rows rewritten meanwhile, each rewritten once.
            for tp in hooked:
                key = tuple(
                    r[0]
                    for r in target.execute(
                        "SELECT a.attname FROM pg_index i JOIN pg_attribute a "
                        "ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey) "
                        "WHERE i.indrelid = to_regclass(format('%%I.%%I', %s::text, %s::text)) "
                        "AND i.indisprimary ORDER BY array_position(i.indkey::int2[], a.attnum)",
                        (tp.table.schema, tp.table.name),
                    )
                )
                if not key:
                    raise PreconditionError(
                        f"plan: {tp.table} has no primary key on the target: "
                        "its hooked columns cannot be rewritten"
                    )
                select, update = tp.hook_sql(key)
                rows = 0
                with target.cursor(name="cdcsync_plan_hook") as cur, target.cursor() as out:
                    cur.execute(select)
                    while batch := cur.fetchmany(2000):
                        out.executemany(update, [tp.hook_row(key, r) for r in batch])
                        rows += len(batch)
                log.info("plan: %d row(s) of %s through the hook(s)", rows, tp.table)
            for stmt in statements:
                log.info("plan: %s", stmt.as_string(target))
                target.execute(stmt)
            st.write(target, s, st.PHASE_SNAPSHOT, step=st.STEP_POST_DATA, plan_applied=True)

    def _alive(self, source: psycopg.Connection[Any], found: st.State) -> bool:
        """Whether an interrupted copy can go on under its own exported snapshot."""
        s = self.settings
        if not (found.snapshot_name and found.data.get("snapshot_identity")):
            return False
        slot = boundary.slot_info(source, s.slot_name)
        pub = source.execute(
            "SELECT 1 FROM pg_publication WHERE pubname = %s", (s.publication_name,)
        ).fetchone()
        source.rollback()
        if slot is None or pub is None:
            return False
        return boundary.snapshot_alive(
            self.source_dsn, found.snapshot_name, str(found.data["snapshot_identity"])
        )

    def _resume_copy(
        self, source: psycopg.Connection[Any], target: psycopg.Connection[Any], found: st.State
    ) -> SnapshotResult:
        s = self.settings
        assert found.snapshot_name is not None
        log.info(
            "resuming the copy under exported snapshot %s (consistent point %s)",
            found.snapshot_name,
            found.consistent_point,
        )
        if self.on_boundary is not None:
            self.on_boundary(found.snapshot_name)
        infos = catalog.describe(source, found.tables)
        plan = st.load_plan(target, s)
        script = self._post_data_script(self._selection(source, infos))
        self._copy(target, infos, plan, found.snapshot_name, script)
        # The interrupted run's holder still keeps the snapshot: the copy needs it no more.
        with psycopg.connect(self.source_dsn, autocommit=True) as admin:
            boundary.end_holder(admin, s.slot_name)
        st.write(target, s, st.PHASE_SNAPSHOT, step=st.STEP_POST_DATA)
        return self._finish(source, target, found.tables, infos, how="resumed")

    def _copy(
        self,
        target: psycopg.Connection[Any],
        infos: Sequence[TableInfo],
        plan: Sequence[Chunk],
        snapshot_name: str,
        script: schema_copy.Script,
    ) -> CopyTotals:
        s = self.settings
        t = time.monotonic()
        done = st.done_chunks(target, s)
        how = {info.table: self._how(target, info) for info in infos}
        per_table: dict[TableId, list[Chunk]] = {info.table: [] for info in infos}
        for chunk in plan:
            per_table.setdefault(chunk.table, []).append(chunk)
        self.progress.plan(
            {info.table: (info.rows, info.bytes, len(per_table[info.table])) for info in infos}
        )
        for (table, _number), (rows, nbytes) in done.items():
            if table in per_table:
                self.progress.already_done(table, rows, nbytes, 1)
        todo = [c for c in plan if (c.table, c.number) not in done]
        if done:
            log.info(
                "%d of %d chunks were copied before; copying the other %d",
                len(plan) - len(todo),
                len(plan),
                len(todo),
            )
        as_text = sorted(str(t) for t, h in how.items() if not h.binary)
        if as_text:
            log.info("copied as text (a column type has no portable binary form): %s", as_text)
        post = self.post = postdata.PostDataRun(
            self.target_dsn, script, _owners(infos), _partitioned(infos)
        )
        left: dict[TableId, int] = {info.table: 0 for info in infos}
        for chunk in todo:
            left[chunk.table] = left.get(chunk.table, 0) + 1
        # While the copy runs, its workers keep most of the cores: a few connections
        # build the indexes of the tables already copied.
        post.start(left, during_copy=max(1, s.workers // 2), workers=s.workers)
        try:
            with self.progress.listening(post.chunk_done), self.progress.shown():
                totals = copy_chunks(
                    chunking.schedule(todo, self.plan.copy_order),
                    how,
                    source_dsn=self.source_dsn,
                    target_dsn=self.target_dsn,
                    snapshot_name=snapshot_name,
                    workers=s.workers,
                    state_schema=s.state_schema,
                    migration_id=s.migration_id,
                    progress=self.progress,
                    limiter=self.limiter,
                )
        except BaseException:
            post.builder.close(cancel=True)
            self.post = None
            raise
        post.copy_done()
        self.timings["copy"] = time.monotonic() - t
        during = post.started_during_copy()
        log.info(
            "copy done in %.1fs; started meanwhile: the indexes and keys of %d of %d table(s), "
            "%d of %d foreign key(s)",
            self.timings["copy"],
            during["tables"],
            len(post.split.per_table),
            during["foreign keys"],
            len(post.split.foreign_keys),
        )
        return totals

    def _how(self, target: psycopg.Connection[Any], info: TableInfo) -> TableCopy:
        """Binary when every column's type allows it and the target's column types match."""
        theirs = catalog.target_columns(target, info.table) or {}
        target.rollback()
        same = all(theirs.get(c.name) == c.type_name for c in info.columns)
        return TableCopy(
            info.table,
            tuple(c.name for c in info.columns),
            info.primary_key,
            binary=info.binary and same,
            row_filter=self.plan.table(info.table).filter,
        )

    def _finish(
        self,
        source: psycopg.Connection[Any],
        target: psycopg.Connection[Any],
        tables: list[TableId],
        infos: list[TableInfo],
        *,
        how: str,
    ) -> SnapshotResult:
        s = self.settings
        t = time.monotonic()
        schemas = {leaf.relation.schema for i in infos for leaf in i.leaves} | {
            i.table.schema for i in infos
        }
        seqs = sequences.copy_sequences(source, target, schemas)
        self.timings["sequences"] = time.monotonic() - t
        t = time.monotonic()
        run = self.post
        if run is None:  # resumed after the copy: nothing of post-data ran in this process
            script = self._post_data_script(self._selection(source, infos))
            run = self.post = postdata.PostDataRun(
                self.target_dsn, script, _owners(infos), _partitioned(infos)
            )
        try:
            post = run.finish(s.workers)
        finally:
            self.post = None
        self.timings["post_data"] = time.monotonic() - t
        # Work the copy's (and the sequences') wall time already holds: not in the total.
        self.timings["post_data_overlapped"] = run.builder.busy_before(t)
        t = time.monotonic()
        self._apply_plan(target, tables)
        self.timings["plan"] = time.monotonic() - t
        t = time.monotonic()
        fence.install(target, tables, s.migration_id, schema=s.state_schema)
        self.timings["fence"] = time.monotonic() - t
        self.timings["total"] = time.monotonic() - self.started
        done = st.done_chunks(target, s)
        st.write(
            target,
            s,
            st.PHASE_SNAPSHOTTED,
            step="done",
            rows=sum(r for r, _ in done.values()),
            bytes=sum(b for _, b in done.values()),
            sequences=seqs,
            timings=self.timings,
            kept_objects=post.existing,
            skipped_objects=post.skipped,
        )
        found = st.read(target, s)
        assert found is not None
        result = self._result(target, found, how=how)
        result.kept_objects = post.existing
        result.skipped_objects = post.skipped
        return result

    def _result(
        self, target: psycopg.Connection[Any], found: st.State, *, how: str
    ) -> SnapshotResult:
        done = st.done_chunks(target, self.settings)
        return SnapshotResult(
            tables=found.tables,
            consistent_point=found.consistent_point or "",
            rows=sum(r for r, _ in done.values()),
            bytes=sum(b for _, b in done.values()),
            timings=dict(self.timings) if how != "done" else dict(found.data.get("timings", {})),
            slot_name=found.slot_name or self.settings.slot_name,
            publication_name=found.publication_name or self.settings.publication_name,
            how=how,
            sequences=int(found.data.get("sequences", 0)),
        )

    def _undo(
        self, source: psycopg.Connection[Any], target: psycopg.Connection[Any], found: st.State
    ) -> None:
        """Take back what an interrupted attempt created: slot, publication, partial copy."""
        s = self.settings
        with psycopg.connect(self.source_dsn, autocommit=True) as admin:
            if found.data.get("created_slot"):
                boundary.drop_slot(admin, s.slot_name)
            if found.data.get("created_publication"):
                boundary.drop_publication(admin, s.publication_name)
        st.clear_copy(target, s, found.tables)
        st.forget_boundary(target, s)
        source.rollback()

    def _selection(
        self, source: psycopg.Connection[Any], infos: Sequence[TableInfo]
    ) -> schema_copy.Selection:
        excluded = any(not p.include for p in self.plan.tables.values())
        return schema_copy.selection_for(
            source,
            schemas=self.settings.schemas,
            # Tables the plan leaves out are left out of the schema too.
            tables=[f"{i.table.schema}.{i.table.name}" for i in infos]
            if excluded
            else self.settings.tables,
            infos=infos,
            state_schema=self.settings.state_schema,
        )


def _owners(infos: Sequence[TableInfo]) -> dict[TableId, TableId]:
    """Every heap the copy fills (a table, a leaf partition) → the migrated table."""
    owner = {info.table: info.table for info in infos}
    for info in infos:
        for leaf in info.leaves:
            owner.setdefault(leaf.relation, info.table)
    return owner


def _partitioned(infos: Sequence[TableInfo]) -> frozenset[TableId]:
    return frozenset(info.table for info in infos if info.partitioned)


def plan_chunks(
    conn: psycopg.Connection[Any], infos: Sequence[TableInfo], chunk_size: int
) -> list[Chunk]:
    """Cut every heap into chunks.

    Primary-key ranges (cut at sampled keys) where the key follows the heap's order;
    block ranges where there is no key, or where the key is scattered over the heap
    (random UUIDs, say), so that no chunk has to read the whole heap to find its rows.
    """
    plan: list[Chunk] = []
    for info in infos:
        number = 0
        for leaf in info.leaves:
            rel = chunking.Relation(
                info.table,
                leaf.relation,
                leaf.blocks,
                leaf.bytes,
                has_key=bool(info.primary_key) and leaf.has_primary_key,
                filenode=leaf.filenode,
            )
            pieces = chunking.pieces_for(leaf.bytes, chunk_size)
            bounds: list[chunking.Bound] = []
            if rel.has_key and pieces > 1:
                sample = catalog.sample_keys(conn, leaf, info.primary_key, pieces)
                order = chunking.key_order(sample.blocks)
                if abs(order) >= chunking.KEY_ORDER_MIN:
                    bounds = chunking.pick_boundaries(sample.keys, pieces)
                else:
                    log.info(
                        "%s: key order and heap order differ (r=%.2f): copying by block ranges",
                        leaf.relation,
                        order,
                    )
                    rel = dataclasses.replace(rel, has_key=False)
            chunks = chunking.plan_relation(rel, chunk_size, number, bounds)
            number += len(chunks)
            plan.extend(chunks)
    return plan
