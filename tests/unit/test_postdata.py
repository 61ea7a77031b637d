"""Which table each post-data entry waits for: read from pg_dump's SQL, quoting included."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from cdcsync.core.events import TableId
from cdcsync.snapshot.postdata import phases, references_of, split, table_of
from cdcsync.snapshot.schema_copy import Entry

_PLAIN = re.compile(r"^[a-z_][a-z0-9_$]*$")


def quote(name: str) -> str:
    """As pg_dump writes a name: bare when it may be, else in double quotes."""
    if _PLAIN.match(name) and name not in ("select", "table", "only", "on", "using"):
        return name
    return '"' + name.replace('"', '""') + '"'


def entry(type_: str, body: str, name: str = "x") -> Entry:
    return Entry(name, type_, "public", (), body + "\n")


names = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1)


@given(names, names, names, st.booleans(), st.booleans())
def test_the_table_of_an_index_or_key_is_read_back_whatever_its_name(
    schema: str, table: str, index: str, unique: bool, only: bool
) -> None:
    rel = f"{quote(schema)}.{quote(table)}"
    create = (
        f"CREATE {'UNIQUE ' if unique else ''}INDEX {quote(index)} ON "
        f"{'ONLY ' if only else ''}{rel} USING btree (a);"
    )
    assert table_of(entry("INDEX", create)) == TableId(schema, table)
    for kind in ("PRIMARY KEY (a)", "UNIQUE (a, b)", "EXCLUDE USING gist (r WITH &&)"):
        alter = (
            f"ALTER TABLE {'ONLY ' if only else ''}{rel}\n    ADD CONSTRAINT {quote(index)} {kind};"
        )
        assert table_of(entry("CONSTRAINT", alter)) == TableId(schema, table)
    fk = (
        f"ALTER TABLE {'ONLY ' if only else ''}{rel}\n    ADD CONSTRAINT {quote(index)} "
        f"FOREIGN KEY ({quote(index)}, b) REFERENCES {quote(table)}.{quote(schema)}"
        f"({quote(index)}, id);"
    )
    assert references_of(entry("FK CONSTRAINT", fk)) == (
        TableId(schema, table),
        TableId(table, schema),
    )
    assert table_of(entry("FK CONSTRAINT", fk)) is None


def test_entries_that_need_more_than_one_table_have_no_table() -> None:
    fk = (
        "ALTER TABLE ONLY public.a\n"
        "    ADD CONSTRAINT a_b_fkey FOREIGN KEY (b) REFERENCES public.b(id);"
    )
    assert table_of(entry("FK CONSTRAINT", fk)) is None
    # A foreign key in a CONSTRAINT entry (never written so) is not mistaken for a key.
    assert table_of(entry("CONSTRAINT", fk)) is None
    attach = "ALTER INDEX public.p_pkey ATTACH PARTITION public.p1_pkey;"
    assert table_of(entry("INDEX ATTACH", attach)) is None
    trigger = "CREATE TRIGGER t AFTER INSERT ON public.a FOR EACH ROW EXECUTE FUNCTION f();"
    assert table_of(entry("TRIGGER", trigger)) is None
    assert table_of(entry("INDEX", "something pg_dump never writes")) is None


def test_split_groups_by_migrated_table_and_keeps_the_phase_order() -> None:
    parent, leaf = TableId("s", "Parent"), TableId("s", "parent_1")
    plain, other = TableId("s", "a"), TableId("s", "B b")
    owner = {parent: parent, leaf: parent, plain: plain, other: other}
    parent_pk = entry(
        "CONSTRAINT", 'ALTER TABLE ONLY s."Parent"\n    ADD CONSTRAINT p_pk PRIMARY KEY (id);'
    )
    leaf_pk = entry(
        "CONSTRAINT", "ALTER TABLE ONLY s.parent_1\n    ADD CONSTRAINT l_pk PRIMARY KEY (id);"
    )
    plain_ix = entry("INDEX", "CREATE INDEX a_ix ON s.a USING btree (v);")
    view_ix = entry("INDEX", "CREATE INDEX mv_ix ON s.mv USING btree (v);")  # not a copied heap
    attach = entry("INDEX ATTACH", "ALTER INDEX s.p_pk ATTACH PARTITION s.l_pk;")
    to_parent = entry(
        "FK CONSTRAINT",
        'ALTER TABLE ONLY s.a\n    ADD CONSTRAINT f FOREIGN KEY (p) REFERENCES s."Parent"(id);',
    )
    to_plain = entry(
        "FK CONSTRAINT",
        'ALTER TABLE ONLY s.a\n    ADD CONSTRAINT g FOREIGN KEY ("x(", y) '
        'REFERENCES s."B b"(id, "z)") NOT VALID;',
    )
    to_elsewhere = entry(
        "FK CONSTRAINT",
        "ALTER TABLE ONLY s.a\n    ADD CONSTRAINT h FOREIGN KEY (q) REFERENCES t.gone(id);",
    )
    trigger = entry(
        "TRIGGER", "CREATE TRIGGER t AFTER INSERT ON s.a FOR EACH ROW EXECUTE FUNCTION f();"
    )
    every = [parent_pk, trigger, plain_ix, to_plain, leaf_pk, view_ix, to_parent, attach]
    every.append(to_elsewhere)
    got = split(every, owner, frozenset({parent}))
    assert got.per_table == {parent: [parent_pk, leaf_pk], plain: [plain_ix]}
    assert got.foreign_keys == [(to_plain, plain, other)]
    assert got.after_copy == [
        ("indexes and keys", [view_ix], True),
        ("partition index attachments", [attach], False),
        ("foreign keys", [to_parent, to_elsewhere], True),  # a partitioned or unknown table
        ("triggers, rules, policies and the rest", [trigger], False),
    ]
    # Every entry runs exactly once: per table, as an early foreign key, or after the copy.
    placed = [
        *(e for es in got.per_table.values() for e in es),
        *(e for e, _, _ in got.foreign_keys),
        *(e for _, es, _ in got.after_copy for e in es),
    ]
    assert sorted(map(id, placed)) == sorted(map(id, every))
    assert [name for name, _, _ in phases([])] == [name for name, _, _ in got.after_copy]
