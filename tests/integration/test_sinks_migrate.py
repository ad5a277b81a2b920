"""Migrations against a real PostgreSQL with pgvector."""

from __future__ import annotations

import threading

import psycopg
import pytest

from sinks.migrate import available, migrate
from sinks.pg import StoreUnavailable
from sinks.registry import VersionSpec
from sinks.store import PgStore


def test_migrate_creates_schema_and_hnsw_indexes(database_url: str) -> None:
    applied = migrate(database_url)

    assert applied == [v for v, _ in available()]
    assert applied[0] == "0001_init"
    with psycopg.connect(database_url) as conn:
        tables = {
            r[0]
            for r in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            ).fetchall()
        }
        assert {"deer", "detections", "schema_migrations"} <= tables
        assert conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'").fetchone()
        assert conn.execute("SELECT 1 FROM pg_class WHERE relname = 'deer_id_seq'").fetchone()
        indexes = dict(
            conn.execute("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'")
        )
        # HNSW indexes are per embedding version (partial), made when a version is registered.
        assert not {name for name, ddl in indexes.items() if "USING hnsw" in ddl}
        storage = dict(
            conn.execute(
                "SELECT attname, attstorage FROM pg_attribute "
                "WHERE attrelid IN ('deer'::regclass, 'detections'::regclass) "
                "AND atttypid = 'vector'::regtype"
            )
        )
        assert storage == {
            "centroid_resnet": "p",
            "centroid_effnet": "p",
            "embedding_resnet": "p",
            "embedding_effnet": "p",
        }
    store = PgStore(database_url)
    store.start()
    try:
        store.registry.register(VersionSpec("v-test"))
    finally:
        store.stop()
    with psycopg.connect(database_url) as conn:
        indexes = dict(
            conn.execute("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'")
        )
        hnsw = {name: ddl for name, ddl in indexes.items() if "USING hnsw" in ddl}
        assert {ddl.split(" ON ")[1].split()[0] for ddl in hnsw.values()} == {
            "public.deer_centroids",
            "public.detection_vectors",
        }
        assert len(hnsw) == 4
        for ddl in hnsw.values():
            assert "vector_cosine_ops" in ddl and "m='16'" in ddl and "ef_construction='64'" in ddl
            assert "WHERE (embedding_version = 'v-test'::text)" in ddl
        fk = conn.execute(
            "SELECT condeferrable, condeferred FROM pg_constraint "
            "WHERE conrelid = 'detections'::regclass AND contype = 'f'"
        ).fetchone()
        assert fk == (True, True)


def test_migrate_twice_applies_nothing(database_url: str) -> None:
    assert migrate(database_url)
    assert migrate(database_url) == []
    with psycopg.connect(database_url) as conn:
        count = conn.execute("SELECT count(*) FROM schema_migrations").fetchone()
    assert count == (len(available()),)


def test_concurrent_migrations_both_succeed(database_url: str) -> None:
    results: list[list[str]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def run() -> None:
        try:
            barrier.wait()
            results.append(migrate(database_url))
        except BaseException as err:  # reported below, in the test thread
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)

    assert errors == []
    # Exactly one of them applied the files; the other waited and found them recorded.
    assert sorted(results, key=len) == [[], [v for v, _ in available()]]


def test_migrate_reports_unreachable_database() -> None:
    # A dependency failure, named as such (the command line turns it into one line), with
    # the driver's error kept as its cause.
    with pytest.raises(StoreUnavailable, match="cannot connect to postgres") as caught:
        migrate("postgresql://postgres@127.0.0.1:1/none?connect_timeout=2")
    assert isinstance(caught.value.__cause__, psycopg.OperationalError)
