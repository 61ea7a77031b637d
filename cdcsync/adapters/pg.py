"""Connections that fail with a message naming the side and the server, never the secret."""

from __future__ import annotations

from typing import Any

import psycopg

from cdcsync.config import redact_dsn
from cdcsync.errors import PreconditionError


def connect(dsn: str, side: str, **kwargs: Any) -> psycopg.Connection[Any]:
    """``psycopg.connect`` whose failure says which database could not be reached."""
    try:
        return psycopg.connect(dsn, **kwargs)
    except psycopg.OperationalError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise PreconditionError(
            f"cannot connect to the {side} database ({redact_dsn(dsn)}): {reason}"
        ) from None


def libpq_env(dsn: str) -> dict[str, str]:
    """libpq environment variables for a DSN, for clients that take none (pgbench).

    A password travels in the child's environment, never on its command line.
    """
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    mapping = {
        "host": "PGHOST",
        "port": "PGPORT",
        "user": "PGUSER",
        "dbname": "PGDATABASE",
        "passfile": "PGPASSFILE",
        "password": "PGPASSWORD",
    }
    return {env: str(info[key]) for key, env in mapping.items() if key in info}
