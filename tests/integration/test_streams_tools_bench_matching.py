"""The benchmark functions in quick mode: rows with the documented keys and sane values
(no timing thresholds: speed goals live in `reid-stream bench`)."""

from __future__ import annotations

import math

import psycopg

from streams.tools.bench.matching import matching_times, vector_search_times


def test_matching_times_quick_rows() -> None:
    rows = matching_times(deer_counts=(300, 2_000), batch_size=16, repeats=3)
    assert [r["deer"] for r in rows] == [300, 2_000]
    for r in rows:
        assert r["batch"] == 16 and r["repeats"] == 3
        for key in ("match_ms_median", "match_ms_p95", "matmul_ms_median", "put_ms_median"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["match_ms_p95"] >= r["match_ms_median"]
        assert r["put_ms_p95"] >= r["put_ms_median"]
        # The generated batches hold both known deer and new animals.
        assert 0 < r["matched_existing_per_batch"] <= 16
        assert 0 < r["new_deer_per_batch"] <= 16
        assert r["gallery_mb"] >= 2 * r["deer"] * 512 * 4 / 2**20 - 1


def test_vector_search_times_quick_rows(database_url: str) -> None:
    rows = vector_search_times(
        database_url, sizes=(2_000,), k=5, queries=12, ef_search=(10, 100), exact_queries=12
    )
    assert [(r["search"], r["ef_search"]) for r in rows] == [
        ("exact", None), ("hnsw", 10), ("hnsw", 100),
    ]  # fmt: skip
    for r in rows:
        assert r["rows"] == 2_000 and r["k"] == 5
        assert r["load_s"] > 0 and r["build_s"] > 0
        assert 0 < r["query_ms_median"] <= r["query_ms_p95"]
        assert 0.0 <= r["recall_at_k"] <= 1.0
    exact, low, high = rows
    assert exact["recall_at_k"] == 1.0 and exact["queries"] == 12
    # A wider search finds at least nearly as many true neighbours as a narrow one, and at
    # ef_search=100 over 2,000 rows HNSW is close to exact.
    assert high["recall_at_k"] >= 0.9
    assert high["recall_at_k"] >= low["recall_at_k"] - 0.05
    # The scratch table is gone.
    with psycopg.connect(database_url) as conn:
        left = conn.execute(
            "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'bench_vectors_%'"
        ).fetchone()[0]
    assert left == 0
