"""PgStore against a real PostgreSQL with pgvector: batch writes, idempotence, failures."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import numpy as np
import psycopg
import pytest

from sinks.records import DetectionRow
from sinks.store import PgStore, StoreUnavailable

DIM = 512
VERSION = "test-v1"
T0 = datetime(2024, 5, 1, 6, 30, 0, 123456, tzinfo=UTC)


def normalised_mean(centroid: np.ndarray, count: int, vectors: np.ndarray) -> np.ndarray:
    """The reference merge: running mean of unit vectors, re-normalised."""
    vectors = np.asarray(vectors, dtype=np.float32).reshape(-1, centroid.shape[-1])
    total = centroid.astype(np.float64) * count + vectors.astype(np.float64).sum(axis=0)
    mean = total / (count + len(vectors))
    return (mean / np.linalg.norm(mean)).astype(np.float32)


def unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def row(
    rng: np.random.Generator,
    detection_id: str,
    *,
    deer_id: int | None = None,
    new_deer: int | None = None,
    minutes: int = 0,
    processed_at: datetime | None = None,
) -> DetectionRow:
    return DetectionRow(
        detection_id=detection_id,
        camera_id="cam-07",
        captured_at=T0 + timedelta(minutes=minutes),
        deer_id=deer_id,
        new_deer=new_deer,
        is_new_deer=new_deer is not None,
        similarity=None if new_deer is not None else 0.8123456,
        score_resnet=0.7,
        score_effnet=np.float32(0.9),  # numpy scalars come from the matcher
        embedding_resnet=unit(rng),
        embedding_effnet=unit(rng),
        bbox=[0.1, 0.2, 0.5, 0.6],
        confidence=0.93,
        species="roe deer",
        source_topic="detections",
        source_partition=2,
        source_offset=100 + minutes,
        processed_at=processed_at or datetime.now(UTC),
    )


def seed_deer(store: PgStore, rng: np.random.Generator) -> tuple[int, DetectionRow]:
    first = row(rng, "seed-1", new_deer=0)
    result = store.write_batch(VERSION, 1, [first], normalised_mean)
    assert result.inserted == 1 and len(result.new_deer_ids) == 1
    return result.new_deer_ids[0], first


def test_write_batch_new_and_existing_deer_then_redelivery(store: PgStore) -> None:
    rng = np.random.default_rng(7)
    known, seed = seed_deer(store, rng)
    rows = [
        row(rng, "d-1", new_deer=0, minutes=1),
        row(rng, "d-2", deer_id=known, minutes=2),
        row(rng, "d-3", new_deer=1, minutes=3),
        row(rng, "d-4", new_deer=0, minutes=4),
        row(rng, "d-5", deer_id=known, minutes=5),
    ]

    result = store.write_batch(VERSION, 2, rows, normalised_mean)

    assert result.inserted == 5
    assert len(result.new_deer_ids) == 2
    a, b = result.new_deer_ids
    assert len({known, a, b}) == 3
    assert [s.deer_id for s in result.assignments] == [a, known, b, a, known]
    assert [s.detection_id for s in result.assignments] == [r.detection_id for r in rows]
    assert [s.is_new_deer for s in result.assignments] == [True, False, True, True, False]
    first = result.assignments[1]
    assert first.embedding_version == VERSION and first.camera_id == "cam-07"
    assert first.captured_at == rows[1].captured_at and first.processed_at == rows[1].processed_at
    assert first.similarity == pytest.approx(0.8123456, rel=1e-6)  # stored as real

    zeros = np.zeros(DIM, np.float32)
    expected = {
        a: (normalised_mean(zeros, 0, [rows[0].embedding_resnet, rows[3].embedding_resnet]),
            normalised_mean(zeros, 0, [rows[0].embedding_effnet, rows[3].embedding_effnet]), 2),
        b: (rows[2].embedding_resnet, rows[2].embedding_effnet, 1),
        known: (
            normalised_mean(seed.embedding_resnet, 1,
                            [rows[1].embedding_resnet, rows[4].embedding_resnet]),
            normalised_mean(seed.embedding_effnet, 1,
                            [rows[1].embedding_effnet, rows[4].embedding_effnet]),
            3,
        ),
    }  # fmt: skip
    stored = {c.deer_id: c for c in store.load_centroids(VERSION)}
    assert sorted(stored) == sorted(expected)
    returned = {c.deer_id: c for c in result.centroids}
    assert sorted(returned) == sorted(expected)
    for deer_id, (resnet, effnet, sightings) in expected.items():
        np.testing.assert_allclose(stored[deer_id].resnet, resnet, rtol=0, atol=1e-6)
        np.testing.assert_allclose(stored[deer_id].effnet, effnet, rtol=0, atol=1e-6)
        assert stored[deer_id].sightings == sightings
        # What the cache gets is exactly what was committed.
        np.testing.assert_array_equal(returned[deer_id].resnet, stored[deer_id].resnet)
        np.testing.assert_array_equal(returned[deer_id].effnet, stored[deer_id].effnet)
        assert returned[deer_id].sightings == sightings
        assert stored[deer_id].resnet.dtype == np.float32

    # Redelivery: same detections, processed again later (new processed_at, new vectors).
    again = [
        row(rng, r.detection_id, deer_id=r.deer_id, new_deer=r.new_deer, minutes=9,
            processed_at=datetime.now(UTC) + timedelta(seconds=5))
        for r in rows
    ]  # fmt: skip
    replay = store.write_batch(VERSION, 2, again, normalised_mean)

    assert replay.inserted == 0
    assert replay.new_deer_ids == []
    assert replay.centroids == []
    assert replay.assignments == result.assignments
    after = {c.deer_id: c for c in store.load_centroids(VERSION)}
    for deer_id, centroid in stored.items():
        assert after[deer_id].sightings == centroid.sightings
        np.testing.assert_array_equal(after[deer_id].resnet, centroid.resnet)
    assert store.deer_count(VERSION) == 3
    assert store.deer_count("other-version") == 0

    found = store.existing_assignments([r.detection_id for r in rows] + ["never-seen"])
    assert sorted(found) == sorted(r.detection_id for r in rows)
    assert [found[r.detection_id] for r in rows] == result.assignments

    assert {c.deer_id for c in store.load_centroids(VERSION, [a, b, 10**9])} == {a, b}
    assert store.load_centroids(VERSION, []) == []
    assert store.load_centroids("other-version") == []


def test_partial_redelivery_counts_only_inserted_rows(store: PgStore, database_url: str) -> None:
    rng = np.random.default_rng(11)
    known, _ = seed_deer(store, rng)
    old = row(rng, "p-1", deer_id=known)
    store.write_batch(VERSION, 0, [old], normalised_mean)

    # p-1 again (now claimed by a new deer), one fresh row for the same new deer, a repeat
    # of the fresh row in the same batch, and a new deer whose only row is already stored.
    fresh = row(rng, "p-2", new_deer=0, minutes=1)
    repeat = row(rng, "p-2", new_deer=0, minutes=2)
    stale = row(rng, "seed-1", new_deer=1)
    redo = row(rng, "p-1", new_deer=0)
    result = store.write_batch(VERSION, 2, [redo, fresh, repeat, stale], normalised_mean)

    assert result.inserted == 1
    assert len(result.new_deer_ids) == 1
    (created,) = result.new_deer_ids
    assert [s.deer_id for s in result.assignments] == [known, created, created, known]
    centroids = {c.deer_id: c for c in store.load_centroids(VERSION)}
    assert centroids[created].sightings == 1
    np.testing.assert_allclose(centroids[created].resnet, fresh.embedding_resnet, atol=1e-6)
    assert centroids[known].sightings == 2  # seed + p-1, not p-1 twice
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM detections").fetchone() == (3,)
        orphans = conn.execute(
            "SELECT count(*) FROM detections d LEFT JOIN deer ON deer.id = d.deer_id "
            "WHERE deer.id IS NULL"
        ).fetchone()
        assert orphans == (0,)


def test_foreign_key_holds(store: PgStore, database_url: str) -> None:
    rng = np.random.default_rng(3)
    with pytest.raises(ValueError, match="not stored under version"):
        store.write_batch(VERSION, 0, [row(rng, "orphan", deer_id=424242)], normalised_mean)
    assert store.existing_assignments(["orphan"]) == {}

    # The schema itself refuses it too, at commit (the constraint is deferred).
    r = row(rng, "orphan-sql", deer_id=424242)
    with psycopg.connect(database_url) as conn, pytest.raises(psycopg.errors.ForeignKeyViolation):
        conn.execute(
            "INSERT INTO detections (detection_id, camera_id, captured_at, deer_id, "
            "is_new_deer, embedding_version, embedding_resnet, embedding_effnet, source_topic, "
            "source_partition, source_offset, processed_at) VALUES "
            "(%s, %s, %s, %s, false, %s, %s::vector, %s::vector, 't', 0, 0, now())",
            (r.detection_id, r.camera_id, r.captured_at, 424242, VERSION,
             str(r.embedding_resnet.tolist()), str(r.embedding_effnet.tolist())),
        )  # fmt: skip
        conn.commit()


def test_invalid_rows_are_refused_before_writing(store: PgStore) -> None:
    rng = np.random.default_rng(5)
    both = row(rng, "x", deer_id=1, new_deer=0)
    with pytest.raises(ValueError, match="exactly one"):
        store.write_batch(VERSION, 1, [both], normalised_mean)
    with pytest.raises(ValueError, match="outside"):
        store.write_batch(VERSION, 1, [row(rng, "y", new_deer=1)], normalised_mean)
    short = row(rng, "z", new_deer=0)
    short.embedding_resnet = short.embedding_resnet[:10]
    with pytest.raises(ValueError, match="512 finite"):
        store.write_batch(VERSION, 1, [short], normalised_mean)
    assert store.deer_count(VERSION) == 0


def plain_mean(centroid: np.ndarray, count: int, vectors: np.ndarray) -> np.ndarray:
    """Not normalised, so the result does not depend on the order of the merges."""
    vectors = np.asarray(vectors, dtype=np.float64).reshape(-1, centroid.shape[-1])
    return (centroid.astype(np.float64) * count + vectors.sum(axis=0)) / (count + len(vectors))


def test_concurrent_batches_on_one_deer_lose_no_update(store: PgStore, database_url: str) -> None:
    rng = np.random.default_rng(13)
    first = row(rng, "seed-1", new_deer=0)
    (known,) = store.write_batch(VERSION, 1, [first], plain_mean).new_deer_ids
    workers, per_worker = 4, 6
    batches = [
        # No new deer: those batches would queue on the advisory lock and never race.
        [row(rng, f"c-{w}-{i}-{j}", deer_id=known) for j in range(3)]
        for w in range(workers)
        for i in range(per_worker)
    ]
    errors: list[BaseException] = []
    barrier = threading.Barrier(workers)

    def worker(mine: list[list[DetectionRow]]) -> None:
        s = PgStore(database_url)
        s.start()
        try:
            barrier.wait()
            for batch in mine:
                s.write_batch(VERSION, 0, batch, plain_mean)
        except BaseException as err:
            errors.append(err)
        finally:
            s.stop()

    threads = [threading.Thread(target=worker, args=(batches[w::workers],)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)

    assert errors == []
    centroids = {c.deer_id: c for c in store.load_centroids(VERSION)}
    assert len(centroids) == 1
    assert centroids[known].sightings == 1 + 3 * len(batches)
    # Every batch merged into the centroid the previous one committed: none was lost.
    members = [first] + [r for b in batches for r in b if r.deer_id == known]
    expected = np.mean([r.embedding_resnet for r in members], axis=0)
    np.testing.assert_allclose(centroids[known].resnet, expected, rtol=0, atol=1e-5)


def test_unreachable_database_raises_store_unavailable() -> None:
    store = PgStore("postgresql://postgres@127.0.0.1:1/reid", connect_timeout=2)
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable):
        store.start()
    with pytest.raises(StoreUnavailable):
        store.ping()
    assert time.monotonic() - t0 < 6
    store.stop()


def test_lost_connection_fails_one_call_then_reconnects(store: PgStore, database_url: str) -> None:
    store.ping()
    with psycopg.connect(database_url, autocommit=True) as admin:
        killed = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = 'reid-sinks'"
        ).fetchall()
    assert killed == [(True,)]
    with pytest.raises(StoreUnavailable):
        store.deer_count(VERSION)
    assert store.deer_count(VERSION) == 0


def test_connection_lost_mid_batch_commits_nothing(store: PgStore, database_url: str) -> None:
    rng = np.random.default_rng(17)
    known, _ = seed_deer(store, rng)
    rows = [row(rng, "m-1", new_deer=0), row(rng, "m-2", deer_id=known)]
    killed: list[bool] = []

    def merge_then_kill(centroid: np.ndarray, count: int, vectors: np.ndarray) -> np.ndarray:
        # Runs inside the write transaction, after the detections were inserted.
        if not killed:
            with psycopg.connect(database_url, autocommit=True) as admin:
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND application_name = 'reid-sinks'"
                )
            killed.append(True)
        return normalised_mean(centroid, count, vectors)

    with pytest.raises(StoreUnavailable):
        store.write_batch(VERSION, 1, rows, merge_then_kill)
    assert killed
    assert store.existing_assignments(["m-1", "m-2"]) == {}
    assert store.deer_count(VERSION) == 1

    retry = store.write_batch(VERSION, 1, rows, normalised_mean)
    assert retry.inserted == 2 and len(retry.new_deer_ids) == 1
    assert {c.deer_id: c.sightings for c in store.load_centroids(VERSION)} == {
        known: 2,
        retry.new_deer_ids[0]: 1,
    }


def test_new_deer_are_rechecked_against_deer_created_elsewhere(store: PgStore) -> None:
    """Two workers saw no deer and each plan a new deer for one animal: the second, holding
    the creation lock, is re-planned against the first one's deer and joins it."""
    rng = np.random.default_rng(11)
    known_before: list[int] = []  # both snapshots were taken while no deer existed
    first = store.write_batch(
        VERSION, 1, [row(rng, "a-1", new_deer=0)], normalised_mean,
        known_deer_ids=known_before, replan=lambda others: pytest.fail("nothing to re-check"),
    )  # fmt: skip
    created = first.new_deer_ids[0]
    seen: list[list[int]] = []
    second = row(rng, "a-2", new_deer=0)

    def replan(others):
        seen.append([c.deer_id for c in others])
        joined = row(rng, "a-2", deer_id=others[0].deer_id)
        return 0, [joined]

    result = store.write_batch(
        VERSION, 1, [second], normalised_mean, known_deer_ids=known_before, replan=replan
    )
    assert seen == [[created]]
    assert result.new_deer_ids == []
    assert result.assignments[0].deer_id == created and not result.assignments[0].is_new_deer
    assert store.deer_count(VERSION) == 1
    # A worker whose snapshot already holds the deer is not re-planned.
    third = store.write_batch(
        VERSION, 1, [row(rng, "b-1", new_deer=0)], normalised_mean,
        known_deer_ids=[created], replan=lambda others: pytest.fail(f"re-planned: {others}"),
    )  # fmt: skip
    assert len(third.new_deer_ids) == 1
