"""A scratch table of vectors for the pgvector search benchmark (``streams.tools.bench.matching``).

Shaped like the schema's vector columns: ``vector(dim)`` stored inline (``SET STORAGE
PLAIN``: with the default out-of-line storage exact search is about 10x slower), and the
schema's HNSW parameters (``vector_cosine_ops``, ``m = 16``, ``ef_construction = 64``). The
benchmark generates the vectors, times each step and computes recall; this module only holds
the statements. The table has a name of its own (``bench_vectors_<random>``), lives on one
connection and is dropped when the ``with`` block ends.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql

from sinks.pg import default_timeouts, pg_connect

# PostgreSQL's binary COPY: signature, flags, header extension length; and the end marker.
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
_COPY_TRAILER = (-1).to_bytes(2, "big", signed=True)

TABLE_PREFIX = "bench_vectors_"


def copy_rows(ids: np.ndarray, vectors: np.ndarray) -> bytes:
    """Rows (bigint, vector) in PostgreSQL's binary COPY format, built by numpy in one go.

    pgvector's binary form of a vector: uint16 dim, uint16 unused, then big-endian float32s.
    """
    dim = vectors.shape[1]
    row = np.dtype(
        [("fields", ">i2"), ("id_len", ">i4"), ("id", ">i8"), ("vec_len", ">i4"),
         ("dim", ">u2"), ("unused", ">u2"), ("vec", ">f4", (dim,))]
    )  # fmt: skip
    out = np.zeros(len(ids), dtype=row)
    out["fields"] = 2
    out["id_len"] = 8
    out["id"] = ids
    out["vec_len"] = 4 + 4 * dim
    out["dim"] = dim
    out["vec"] = vectors
    return out.tobytes()


class ScratchVectors:
    """``with ScratchVectors(url, dim) as t:`` a new table (id bigint, embedding vector(dim)),
    dropped at the end of the block together with its connection."""

    def __init__(self, database_url: str, dim: int) -> None:
        self._url = database_url
        self.dim = dim
        self.name = f"{TABLE_PREFIX}{uuid.uuid4().hex[:10]}"
        self._table = sql.Identifier(self.name)
        self._top_k = sql.SQL("SELECT id FROM {} ORDER BY embedding <=> %s LIMIT %s").format(
            self._table
        )
        self._conn: psycopg.Connection[Any] | None = None

    def __enter__(self) -> ScratchVectors:
        # Bounded connect and keepalives like every connection; no statement timeout: the
        # HNSW build over 100k vectors takes minutes.
        timeouts = replace(default_timeouts(), statement_ms=0)
        conn = pg_connect(
            self._url, timeouts=timeouts, autocommit=True, application_name="reid-bench"
        )
        self._conn = conn
        try:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            register_vector(conn)
            conn.execute(
                sql.SQL("CREATE TABLE {} (id bigint PRIMARY KEY, embedding vector({}) NOT NULL)")
                .format(self._table, sql.Literal(self.dim))
            )  # fmt: skip
            conn.execute(
                sql.SQL("ALTER TABLE {} ALTER COLUMN embedding SET STORAGE PLAIN").format(
                    self._table
                )
            )
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(self._table))
        finally:
            conn.close()

    @property
    def conn(self) -> psycopg.Connection[Any]:
        if self._conn is None:
            raise RuntimeError("ScratchVectors: use it in a with block")
        return self._conn

    def load(self, chunks: Iterable[tuple[np.ndarray, np.ndarray]]) -> None:
        """Binary COPY of (ids, vectors [n, dim]) chunks; the chunks may be generated while
        the copy runs (1M x 512 floats is 2 GB at once)."""
        with (
            self.conn.cursor() as cur,
            cur.copy(
                sql.SQL("COPY {} (id, embedding) FROM STDIN WITH (FORMAT BINARY)").format(
                    self._table
                )
            ) as copy,
        ):
            copy.write(_COPY_HEADER)
            for ids, vectors in chunks:
                copy.write(copy_rows(ids, vectors))
            copy.write(_COPY_TRAILER)

    def count(self) -> int:
        row = self.conn.execute(sql.SQL("SELECT count(*) FROM {}").format(self._table)).fetchone()
        assert row is not None
        return int(row[0])

    def analyze(self) -> None:
        self.conn.execute(sql.SQL("VACUUM ANALYZE {}").format(self._table))

    def build_index(self, maintenance_work_mem: str) -> None:
        """The HNSW index, with ``maintenance_work_mem`` for the build (it must hold the whole
        graph, or the build spills to disk and slows down many times)."""
        conn = self.conn
        conn.execute(
            sql.SQL("SET maintenance_work_mem = {}").format(sql.Literal(maintenance_work_mem))
        )
        try:
            conn.execute(
                sql.SQL(
                    "CREATE INDEX ON {} USING hnsw (embedding vector_cosine_ops) "
                    "WITH (m = 16, ef_construction = 64)"
                ).format(self._table)
            )
        finally:
            conn.execute("RESET maintenance_work_mem")

    @contextmanager
    def exact(self) -> Iterator[None]:
        """Queries inside the block scan the table (index scans off): exact search."""
        self.conn.execute("SET enable_indexscan = off")
        self.conn.execute("SET enable_bitmapscan = off")
        try:
            yield
        finally:
            self.conn.execute("RESET enable_indexscan")
            self.conn.execute("RESET enable_bitmapscan")

    @contextmanager
    def indexed(self) -> Iterator[None]:
        """Queries inside the block avoid sequential scans (on small tables the planner may
        prefer a scan at a high ``ef_search``); ``set_ef_search`` applies until its end."""
        self.conn.execute("SET enable_seqscan = off")
        try:
            yield
        finally:
            self.conn.execute("RESET hnsw.ef_search")
            self.conn.execute("RESET enable_seqscan")

    def set_ef_search(self, ef_search: int) -> None:
        self.conn.execute(sql.SQL("SET hnsw.ef_search = {}").format(sql.Literal(int(ef_search))))

    def top_k(self, query: np.ndarray, k: int) -> list[int]:
        """The ids of the ``k`` nearest vectors by cosine distance, nearest first."""
        return [int(r[0]) for r in self.conn.execute(self._top_k, (query, k)).fetchall()]

    def plan(self, query: np.ndarray, k: int) -> list[str]:
        """The lines of ``EXPLAIN`` of ``top_k``."""
        rows = self.conn.execute(sql.SQL("EXPLAIN ") + self._top_k, (query, k)).fetchall()
        return [str(r[0]) for r in rows]
