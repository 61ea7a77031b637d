"""A source database worth migrating, a load that exercises it, and an independent comparison.

Used by the end-to-end, crash and cutover tests: pgbench tables under pgbench load, a
table with every type users keep, a table with large TOASTed values updated without
touching them, a keyless table with identical duplicate rows, and truncates.
"""

from __future__ import annotations

import os
import random
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from cdcsync.adapters.pg import libpq_env

TYPES_DDL = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN posint AS int CHECK (VALUE > 0);
CREATE TABLE public.all_types (
    id bigint PRIMARY KEY,
    n numeric, n2 numeric(20,6), m money, r real, d double precision,
    ts timestamp, tstz timestamptz, dt date, tm time, iv interval,
    b bytea, u uuid, j json, jb jsonb, x xml,
    e mood, dom posint, ir int4range, tr tstzrange,
    ip inet, net cidr, mac macaddr, bits bit(12),
    pt point, bx box, tsv tsvector,
    ai int[], at text[], txt text, vc varchar(20), ch char(5), bo boolean
);
CREATE TABLE public.docs (id int PRIMARY KEY, title text, body text, meta jsonb, blob bytea);
CREATE TABLE public.events_nokey (kind text, amount int, note text);
ALTER TABLE public.events_nokey REPLICA IDENTITY FULL;
CREATE TABLE public.scratch (id int PRIMARY KEY, v text);
CREATE TABLE "Odd Schema Table" ("Id" int PRIMARY KEY, "select" text, "Mixed Case" int);
CREATE SCHEMA "Sales Dept";
CREATE TABLE "Sales Dept".orders (
    id int PRIMARY KEY, qty int NOT NULL, price numeric(10,2) NOT NULL,
    total numeric GENERATED ALWAYS AS (qty * price) STORED
);
CREATE TABLE public.measures (id int, at date NOT NULL, v double precision,
    PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
CREATE TABLE public.measures_2023 PARTITION OF public.measures
    FOR VALUES FROM ('2023-01-01') TO ('2024-01-01');
CREATE TABLE public.measures_2024 PARTITION OF public.measures
    FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE public.empty_one (id int PRIMARY KEY, t text);
"""

ROW_VALUES = [
    (
        "123456789012345678901234567890.123456789",
        "3.14",
        "12.34",
        "1.5",
        "2.5e300",
        "2024-02-29 12:34:56.789012",
        "2024-02-29 12:34:56.789012+05:30",
        "2024-02-29",
        "23:59:59.999999",
        "1 year 2 months 3 days 04:05:06.789",
        "\\x00ff10",
        "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        '{"a": [1, 2.50, null]}',
        '{"k": {"n": 1e3}}',
        "<a>x</a>",
        "happy",
        "7",
        "[1,10)",
        "[2024-01-01 00:00+00,2024-02-01 00:00+00)",
        "192.168.1.7/24",
        "10.0.0.0/8",
        "08:00:2b:01:02:03",
        "101010101010",
        "(1.5,2.5)",
        "((0,0),(1,1))",
        "'fat' 'cat'",
        "{1,NULL,3}",
        '{"a b","c,d",NULL,""}',
        "unicode ✓ Ωmega 😀",
        "short",
        "ab",
        "true",
    ),
    (
        "NaN",
        "-0.000001",
        "-5.00",
        "NaN",
        "-Infinity",
        "infinity",
        "-infinity",
        "infinity",
        "00:00:00",
        "-3 days",
        "\\x",
        "00000000-0000-0000-0000-000000000000",
        "[]",
        "{}",
        "<empty/>",
        "sad",
        "1",
        "empty",
        "(,)",
        "::1",
        "::/0",
        "ff:ff:ff:ff:ff:ff",
        "000000000001",
        "(0,0)",
        "((1,1),(1,1))",
        "",
        "{}",
        "{}",
        "",
        "",
        "",
        "false",
    ),
]
COLUMNS = [
    "n",
    "n2",
    "m",
    "r",
    "d",
    "ts",
    "tstz",
    "dt",
    "tm",
    "iv",
    "b",
    "u",
    "j",
    "jb",
    "x",
    "e",
    "dom",
    "ir",
    "tr",
    "ip",
    "net",
    "mac",
    "bits",
    "pt",
    "bx",
    "tsv",
    "ai",
    "at",
    "txt",
    "vc",
    "ch",
    "bo",
]


def pg_bin(name: str) -> str:
    return f"/usr/lib/postgresql/15/bin/{name}"


def conninfo_env(dsn: str) -> dict[str, str]:
    """libpq environment variables for a DSN (pgbench takes no conninfo string)."""
    return libpq_env(dsn)


def create_source(dsn: str, scale: int = 1) -> None:
    """pgbench tables plus the typed, TOASTed, keyless and oddly named tables."""
    subprocess.run(
        [pg_bin("pgbench"), "-i", "-q", "-s", str(scale), "--foreign-keys"],
        env={**os.environ, **conninfo_env(dsn)},
        check=True,
        capture_output=True,
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE pgbench_history REPLICA IDENTITY FULL")
        conn.execute(TYPES_DDL)
        for i, values in enumerate(ROW_VALUES, start=1):
            insert_typed(conn, i, values)
        conn.execute("INSERT INTO public.all_types (id) VALUES (3)")  # all NULL
        big = "x" * 300_000
        conn.execute(
            "INSERT INTO public.docs SELECT g, 't' || g, %s || g, "
            "jsonb_build_object('pad', repeat('p', 100000), 'g', g), "
            "decode(repeat('ab', 50000), 'hex') FROM generate_series(1, 5) g",
            (big,),
        )
        conn.execute(
            "INSERT INTO public.events_nokey VALUES ('a', 1, NULL), ('a', 1, NULL), "
            "('b', 2, 'x'), ('b', 2, 'x'), ('b', 2, 'x')"
        )
        conn.execute("INSERT INTO public.scratch SELECT g, 'v' || g FROM generate_series(1, 50) g")
        conn.execute("""INSERT INTO "Odd Schema Table" VALUES (1, 'from', 2)""")
        conn.execute(
            """INSERT INTO "Sales Dept".orders SELECT g, g % 7, g * 1.25
               FROM generate_series(1, 200) g"""
        )
        conn.execute(
            "INSERT INTO public.measures SELECT g, date '2023-06-01' + (g % 400), g / 3.0 "
            "FROM generate_series(1, 500) g"
        )


def insert_typed(conn: psycopg.Connection[Any], key: int, values: tuple[str, ...]) -> None:
    conn.execute(
        sql.SQL("INSERT INTO public.all_types (id, {}) VALUES (%s, {})").format(
            sql.SQL(", ").join(map(sql.Identifier, COLUMNS)),
            sql.SQL(", ").join(sql.Placeholder() * len(COLUMNS)),
        ),
        (key, *values),
    )


ACTIONS = (
    "typed",
    "typed_upd",
    "toast",
    "nokey_upd",
    "nokey_del",
    "nokey_ins",
    "truncate",
    "odd",
    "orders",
    "move_partition",
)


class Writer:
    """A thread writing to the source for ``seconds``; what failed is kept for the test.

    Subclasses say what one run writes (:meth:`write`); the seed makes it repeatable.
    """

    seed = 0
    grace = 60.0  # how long past ``seconds`` :meth:`wait` waits for the thread

    def __init__(self, dsn: str, seconds: float) -> None:
        self.dsn, self.seconds = dsn, seconds
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def wait(self) -> None:
        self.thread.join(self.seconds + self.grace)

    def _run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                self.write(conn, random.Random(self.seed), time.monotonic() + self.seconds)
        except psycopg.Error as exc:
            self.errors.append(str(exc))

    def write(self, conn: psycopg.Connection[Any], rng: random.Random, end: float) -> None:
        raise NotImplementedError


@dataclass
class Load:
    """pgbench plus a writer of the hard cases, until ``stop``."""

    dsn: str
    seconds: float
    clients: int = 4
    seed: int = 7
    exclude: tuple[str, ...] = ()
    rate: int | None = None  # pgbench transactions/s (-R); None runs flat out
    stats: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)
    _pgbench: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._pgbench = subprocess.Popen(
            [
                pg_bin("pgbench"),
                "-n",
                "-T",
                str(int(self.seconds)),
                "-c",
                str(self.clients),
                "-j",
                "2",
                *(["-R", str(self.rate)] if self.rate else []),
            ],
            env={**os.environ, **conninfo_env(self.dsn)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        thread = threading.Thread(target=self._hard_cases, daemon=True)
        thread.start()
        self._threads.append(thread)

    def wait(self) -> str:
        out = b""
        if self._pgbench is not None:
            out, _ = self._pgbench.communicate(timeout=self.seconds + 120)
        for thread in self._threads:
            thread.join(timeout=self.seconds + 60)
        return out.decode(errors="replace")

    def _hard_cases(self) -> None:
        rng = random.Random(self.seed)
        deadline = time.monotonic() + self.seconds
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                # Past every key an earlier load (on either side of a cutover) used.
                row = conn.execute("SELECT max(id) FROM public.all_types").fetchone()
                next_key = max(1000, int(row[0]) if row and row[0] is not None else 0)
                while time.monotonic() < deadline:
                    action = rng.choice([a for a in ACTIONS if a not in self.exclude])
                    self.stats[action] = self.stats.get(action, 0) + 1
                    if action == "typed":
                        next_key += 1
                        insert_typed(conn, next_key, rng.choice(ROW_VALUES))
                    elif action == "typed_upd":
                        conn.execute(
                            "UPDATE public.all_types SET n = n + 1, iv = iv + interval '1 second', "
                            "ai = array_append(ai, 9), tstz = tstz + interval '1 microsecond' "
                            "WHERE id = %s",
                            (rng.choice([1, 2, 3, next_key]),),
                        )
                    elif action == "toast":
                        conn.execute(
                            "UPDATE public.docs SET title = title || '+' WHERE id = %s",
                            (rng.randint(1, 5),),
                        )
                    elif action == "nokey_upd":
                        conn.execute(
                            "UPDATE public.events_nokey SET amount = amount + 1 WHERE ctid = "
                            "(SELECT ctid FROM public.events_nokey WHERE kind = %s LIMIT 1)",
                            (rng.choice("ab"),),
                        )
                    elif action == "nokey_del":
                        conn.execute(
                            "DELETE FROM public.events_nokey WHERE ctid = "
                            "(SELECT ctid FROM public.events_nokey WHERE kind = %s LIMIT 1)",
                            (rng.choice("ab"),),
                        )
                    elif action == "nokey_ins":
                        conn.execute(
                            "INSERT INTO public.events_nokey VALUES (%s, 2, 'x'), (%s, 2, 'x')",
                            (rng.choice("ab"), rng.choice("ab")),
                        )
                    elif action == "truncate":
                        with conn.transaction():
                            conn.execute("TRUNCATE public.scratch")
                            conn.execute(
                                "INSERT INTO public.scratch SELECT g, md5(g::text) "
                                "FROM generate_series(1, %s) g",
                                (rng.randint(1, 30),),
                            )
                    elif action == "orders":
                        conn.execute(
                            """UPDATE "Sales Dept".orders SET qty = qty + 1 WHERE id = %s""",
                            (rng.randint(1, 200),),
                        )
                    elif action == "move_partition":
                        # Moves a row across partitions: a delete and an insert at the source.
                        conn.execute(
                            "UPDATE public.measures SET at = CASE WHEN at < '2024-01-01' "
                            "THEN date '2024-03-01' + (id %% 200) ELSE date '2023-03-01' "
                            "+ (id %% 200) END WHERE id = %s",
                            (rng.randint(1, 500),),
                        )
                    else:
                        conn.execute(
                            """UPDATE "Odd Schema Table" SET "Mixed Case" = "Mixed Case" + 1"""
                        )
                    time.sleep(0.01)
        except Exception as exc:  # reported by the test, never swallowed
            self.errors.append(repr(exc))


def table_digests(dsn: str) -> dict[str, tuple[int, str]]:
    """Row count and an order-independent digest of every user table's rows as text.

    Computed inside the database on each side independently: the text output of a row
    is canonical for every type, so equal digests mean equal rows as PostgreSQL sees them.
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        return digests_in(conn)


def digests_in(conn: psycopg.Connection[Any]) -> dict[str, tuple[int, str]]:
    """Like :func:`table_digests`, inside the caller's transaction (e.g. a snapshot)."""
    out: dict[str, tuple[int, str]] = {}
    tables = conn.execute(
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n "
        "ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition "
        "AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'cdcsync') "
        "AND n.nspname NOT LIKE 'pg_toast%%' ORDER BY 1, 2"
    ).fetchall()
    for schema, name in tables:
        row = conn.execute(
            sql.SQL(
                "SELECT count(*), coalesce(md5(string_agg(md5(t::text), '' "
                "ORDER BY md5(t::text))), '') FROM {} t"
            ).format(sql.Identifier(schema, name))
        ).fetchone()
        assert row is not None
        out[f"{schema}.{name}"] = (int(row[0]), str(row[1]))
    return out


def differences(source_dsn: str, target_dsn: str) -> dict[str, Any]:
    src, tgt = table_digests(source_dsn), table_digests(target_dsn)
    return {
        name: (src.get(name), tgt.get(name))
        for name in sorted(set(src) | set(tgt))
        if src.get(name) != tgt.get(name)
    }
