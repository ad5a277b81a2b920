"""The schema: apply the SQL migrations shipped in ``sinks/migrations`` (``NNNN_name.sql``),
in order; and create or drop a whole database (the embedded stack, the benchmarks' scratch
databases).

Each file runs in its own transaction together with its row in ``schema_migrations``, so a
failed file leaves nothing half-applied. A run holds a fixed advisory lock from start to end
(and every transaction takes it too): two workers starting at once then apply each file
exactly once, the second one waiting and finding them all recorded.
"""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from importlib import resources

import psycopg
from psycopg import sql

from sinks.pg import StoreUnavailable, default_timeouts, pg_connect
from sinks.redaction import redact

log = logging.getLogger(__name__)

# Arbitrary but fixed: every process that migrates this database must use the same key.
MIGRATION_LOCK_KEY = 0x4445_4552_0000_0001

_NAME = re.compile(r"^(\d{4})_[A-Za-z0-9_]+\.sql$")

_CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    text PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


def available() -> list[tuple[str, str]]:
    """(version, sql) for every migration file in the package, in version order."""
    folder = resources.files("sinks").joinpath("migrations")
    found = []
    for entry in folder.iterdir():
        if _NAME.match(entry.name):
            found.append((entry.name.removesuffix(".sql"), entry.read_text(encoding="utf-8")))
    numbers = [version[:4] for version, _ in found]
    if len(set(numbers)) != len(numbers):
        raise RuntimeError(f"migrate: two migration files share a number: {sorted(numbers)}")
    return sorted(found)


def migrate(dsn: str) -> list[str]:
    """Apply the migrations this database lacks; returns their versions (empty: up to date)."""
    applied: list[str] = []
    # Keepalives and a connect timeout, but no statement timeout: a migration may build an
    # index for minutes (or wait for another worker's run to end).
    timeouts = replace(default_timeouts(), statement_ms=0, connect_s=10)
    try:
        conn = pg_connect(dsn, timeouts=timeouts, autocommit=True, application_name="reid-migrate")
    except psycopg.Error as err:  # unreachable, or a malformed DSN (a ProgrammingError)
        raise StoreUnavailable(redact(f"migrate: cannot connect to postgres: {err}")) from err
    with conn:
        # Held for the whole run as well: with per-file locks only, a second process could
        # take the lock between two files and apply the later one itself.
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        for version, sql in available():
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
                conn.execute(_CREATE_LEDGER)
                done = conn.execute(
                    "SELECT 1 FROM schema_migrations WHERE version = %s", (version,)
                ).fetchone()
                if done:
                    continue
                # No parameters: psycopg sends the file with the simple protocol, which
                # accepts several statements.
                conn.execute(sql)  # type: ignore[arg-type]  # trusted file shipped with the package
                conn.execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES (%s, now())",
                    (version,),
                )
            applied.append(version)
            log.info("migrate: applied version=%s", version)
    log.info("migrate: up to date applied=%d", len(applied))
    return applied


def sibling_url(dsn: str, database: str) -> str:
    """The URL of another database on the same server (``postgresql://.../<database>``)."""
    return dsn.rsplit("/", 1)[0] + "/" + database


def create_database(admin_dsn: str, name: str) -> None:
    """``CREATE DATABASE name`` through a connection to ``admin_dsn`` (any database there)."""
    with pg_connect(admin_dsn, autocommit=True, application_name="reid-migrate") as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def drop_database(admin_dsn: str, name: str) -> None:
    """Drop a database, closing its connections; nothing happens when it does not exist."""
    with pg_connect(admin_dsn, autocommit=True, application_name="reid-migrate") as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
