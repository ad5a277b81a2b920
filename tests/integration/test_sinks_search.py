"""Gallery searches over stored detections through the version's HNSW index."""

from __future__ import annotations

import numpy as np
import psycopg

from sinks.search import similar_detections, stored_vectors
from sinks.store import PgStore
from tests.integration.test_sinks_store import VERSION, normalised_mean, row


def test_similar_detections_finds_the_same_animal_first_and_uses_the_index(
    store: PgStore,
    database_url: str,
) -> None:
    rng = np.random.default_rng(7)
    rows = [row(rng, f"det-{i:03d}", new_deer=i, minutes=i) for i in range(40)]
    # det-100 is det-005 seen again (a nearby vector): the search must rank it first.
    twin = row(rng, "det-100", new_deer=40, minutes=100)
    for name in ("embedding_resnet", "embedding_effnet"):
        v = getattr(rows[5], name) + 0.05 * rng.standard_normal(512).astype(np.float32)
        setattr(twin, name, v / np.linalg.norm(v))
    result = store.write_batch(VERSION, 41, [*rows, twin], normalised_mean)
    assert result.inserted == 41

    with psycopg.connect(database_url, autocommit=True) as conn:
        query = stored_vectors(conn, VERSION, "det-100")
        assert query is not None
        found = similar_detections(conn, VERSION, *query, k=3, exclude="det-100")
        assert found[0].detection_id == "det-005"
        assert len(found) == 3 and found[0].score > found[1].score >= found[2].score
        exact = 0.6 * float(query[0] @ rows[5].embedding_resnet) + 0.4 * float(
            query[1] @ rows[5].embedding_effnet
        )
        assert abs(found[0].score - exact) < 1e-5
        assert found[0].deer_id == result.assignments[5].deer_id
        # The version's partial HNSW index serves the search (with 41 rows the planner would
        # rather scan, so scans are made dear; without a usable index it would still sort).
        conn.execute("SET enable_seqscan = off")
        plan = "\n".join(
            r[0]
            for r in conn.execute(
                psycopg.sql.SQL(
                    "EXPLAIN SELECT detection_id FROM detection_vectors WHERE "
                    "embedding_version = {} ORDER BY embedding_resnet <=> %s::vector LIMIT 5"
                ).format(psycopg.sql.Literal(VERSION)),
                (str(query[0].tolist()),),
            )
        )
        assert "detection_vectors_resnet_hnsw_" in plan, plan
        assert stored_vectors(conn, "no-such-version", "det-100") is None


def test_similar_command_prints_the_nearest_detections(store: PgStore, database_url: str) -> None:
    import json
    import os
    import subprocess
    import sys

    rng = np.random.default_rng(3)
    rows = [row(rng, f"d-{i}", new_deer=i, minutes=i) for i in range(6)]
    store.write_batch(VERSION, 6, rows, normalised_mean)
    env = {**os.environ, "REID_DATABASE_URL": database_url}
    cmd = [sys.executable, "-m", "streams.cli", "similar", "d-2", "-k", "3", "--version", VERSION]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=True)
    hits = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(hits) == 3 and "d-2" not in {h["detection_id"] for h in hits}
    assert all(h["version"] == VERSION for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    missing = subprocess.run(
        [*cmd[:4], "nope", "--version", VERSION], env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert missing.returncode != 0 and "has no vector" in missing.stderr
