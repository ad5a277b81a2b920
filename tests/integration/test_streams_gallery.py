"""The in-memory gallery against real PostgreSQL and Redis: it stays equal to the truth.

Workers are driven like ``BatchProcessor`` drives them: load, match, ``write_batch`` (with the
re-check under the advisory lock), then ``put`` of the committed centroids.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector

from reid.matching import Gallery, assign_batch, l2_normalise, merge_centroid
from sinks.cache import CentroidCache
from sinks.metrics import StreamMetrics
from sinks.migrate import migrate
from sinks.records import BatchWriteResult, DeerCentroid, DetectionRow
from sinks.store import PgStore
from streams.gallery import GalleryLoader
from streams.tools.stack import free_port
from tests.proxy import TcpProxy

VERSION = "gallery-v1"
DIM = 512


class FakeClock:
    """Monotonic seconds that move only when told: refreshes happen when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Herd:
    """Animals as random unit vectors; a sighting is the animal plus noise (cosine ~0.7)."""

    def __init__(self, seed: int, animals: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.resnet = l2_normalise(self.rng.normal(size=(animals, DIM)))
        self.effnet = l2_normalise(self.rng.normal(size=(animals, DIM)))
        self.count = 0

    def sightings(self, animals: list[int]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        def noisy(base: np.ndarray) -> np.ndarray:
            return l2_normalise(base + self.rng.normal(size=base.shape) / np.sqrt(DIM))

        ids = [f"det-{self.count + i}" for i in range(len(animals))]
        self.count += len(animals)
        return noisy(self.resnet[animals]), noisy(self.effnet[animals]), ids


def rows_for(plan, r: np.ndarray, e: np.ndarray, ids: list[str]) -> list[DetectionRow]:
    now = datetime.now(UTC)
    return [
        DetectionRow(
            detection_id=ids[i],
            camera_id="cam-1",
            captured_at=now,
            deer_id=m.deer_id,
            new_deer=m.new_deer if m.deer_id is None else None,
            is_new_deer=m.is_new_deer,
            similarity=m.similarity,
            score_resnet=m.score_resnet,
            score_effnet=m.score_effnet,
            embedding_resnet=r[i],
            embedding_effnet=e[i],
            bbox=None,
            confidence=None,
            species=None,
            source_topic="detections",
            source_partition=0,
            source_offset=i,
            processed_at=now,
        )
        for i, m in enumerate(plan.matches)
    ]


class Worker:
    """One consumer's store, cache and gallery loader, used the way the processor uses them."""

    def __init__(self, database_url: str, cache_url: str | None, prefix: str, **loader) -> None:
        self.store = PgStore(database_url)
        self.store.start()
        self.cache = None
        if cache_url is not None:
            self.cache = CentroidCache(cache_url, key_prefix=prefix, socket_timeout=0.5)
            self.cache.start()
        self.metrics = StreamMetrics()
        self.clock = FakeClock()
        self.loader = GalleryLoader(
            self.store, self.cache, self.metrics, clock=self.clock, **loader
        )
        self.replans = 0

    def batch(self, r: np.ndarray, e: np.ndarray, ids: list[str]) -> BatchWriteResult:
        known = self.loader.load(VERSION)

        def plan_against(gallery: Gallery):
            plan = assign_batch(r, e, gallery)
            return len(plan.new_deer), rows_for(plan, r, e, ids)

        def replan(others: list[DeerCentroid]):
            self.replans += 1
            return plan_against(self.loader.absorb(VERSION, others))

        new_deer, rows = plan_against(known)
        result = self.store.write_batch(
            VERSION, new_deer, rows, merge_centroid,
            known_deer_ids=known.deer_ids.tolist(), replan=replan,
        )  # fmt: skip
        self.loader.put(VERSION, result.centroids)
        return result

    def held(self) -> list[DeerCentroid]:
        return self.loader._held[VERSION].matrix.centroids()

    def counter(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels or None)
        return value or 0.0

    def stop(self) -> None:
        if self.cache is not None:
            self.cache.stop()
        self.store.stop()


def assert_same(got: list[DeerCentroid], want: list[DeerCentroid]) -> None:
    assert [c.deer_id for c in got] == [c.deer_id for c in want]
    for g, w in zip(got, want, strict=True):
        assert g.sightings == w.sightings, g.deer_id
        np.testing.assert_array_equal(g.resnet, w.resnet)
        np.testing.assert_array_equal(g.effnet, w.effnet)


@pytest.fixture()
def workers(database_url: str, redis_url: str, unique: str) -> Iterator[Callable[..., Worker]]:
    migrate(database_url)
    made: list[Worker] = []

    def make(cache_url: str | None = redis_url, **loader) -> Worker:
        w = Worker(database_url, cache_url, f"gal-{unique}", **loader)
        made.append(w)
        return w

    yield make
    for w in made:
        w.stop()


def test_memory_after_batches_equals_a_fresh_load(workers) -> None:
    herd = Herd(seed=1, animals=40)
    a = workers(refresh_s=3600)  # no refresh: memory is kept by its own puts alone
    assert len(a.loader.load(VERSION)) == 0
    assert a.counter("reid_cache_requests_total", result="miss") == 1  # cold version
    rng = np.random.default_rng(2)
    for _ in range(6):
        r, e, ids = herd.sightings(list(rng.integers(0, 40, size=16)))
        a.batch(r, e, ids)

    truth = a.store.load_centroids(VERSION)
    assert len(truth) >= 20 and max(c.sightings for c in truth) >= 3
    assert_same(a.held(), truth)
    view = a.loader.load(VERSION)
    assert sorted(view.deer_ids.tolist()) == [c.deer_id for c in truth]
    assert view.resnet.base is not None  # a view of the matrices, not a copy

    # A second worker reads the same version from Redis: all hits, equal to Postgres too.
    b = workers(refresh_s=3600)
    b.loader.load(VERSION)
    assert b.counter("reid_cache_requests_total", result="hit") == len(truth)
    assert b.counter("reid_cache_requests_total", result="miss") == 0
    assert_same(b.held(), truth)


def test_deer_written_by_another_worker_appear_after_the_refresh(workers) -> None:
    herd = Herd(seed=3, animals=30)
    a = workers(refresh_s=5)
    b = workers(refresh_s=5)
    r, e, ids = herd.sightings(list(range(10)))
    a.batch(r, e, ids)
    assert len(a.loader.load(VERSION)) == 10
    b.loader.load(VERSION)

    # b sees animals 0-4 again (moving those deer) and 10-14 for the first time.
    r, e, ids = herd.sightings([0, 1, 2, 3, 4, 10, 11, 12, 13, 14])
    result = b.batch(r, e, ids)
    assert len(result.new_deer_ids) == 5

    assert len(a.loader.load(VERSION)) == 10  # no refresh due yet: memory as it was
    a.clock.advance(5)
    view = a.loader.load(VERSION)
    assert len(view) == 15
    assert_same(a.held(), a.store.load_centroids(VERSION))

    # a's next batch joins b's deer instead of creating them again (no re-plan needed).
    r, e, ids = herd.sightings([10, 11, 12])
    result = a.batch(r, e, ids)
    assert result.new_deer_ids == [] and a.replans == 0


def test_refresh_margin_catches_a_transaction_that_committed_after_the_read(
    workers, database_url: str
) -> None:
    herd = Herd(seed=4, animals=10)
    a = workers(refresh_s=0)  # default margin: 60 s
    blind = workers(refresh_s=0, refresh_margin_s=0)
    r, e, ids = herd.sightings(list(range(4)))
    a.batch(r, e, ids)
    a.loader.load(VERSION)
    blind.loader.load(VERSION)
    moved = a.held()[0]

    # "Another worker" whose transaction started before the refreshes below and commits after
    # them: its rows carry its start time (now()) as updated_at.
    rng = np.random.default_rng(5)
    new_r, new_e = l2_normalise(rng.normal(size=(2, DIM)))
    with psycopg.connect(database_url) as conn:
        register_vector(conn)
        new_id = conn.execute(
            "INSERT INTO deer (id, embedding_version, sightings, first_seen, last_seen) "
            "VALUES (nextval('deer_id_seq'), %s, 1, now(), now()) RETURNING id",
            (VERSION,),
        ).fetchone()[0]
        conn.execute(
            "INSERT INTO deer_centroids (deer_id, embedding_version, centroid_resnet, "
            "centroid_effnet, vectors) VALUES (%s, %s, %s, %s, 1)",
            (new_id, VERSION, new_r, new_e),
        )
        conn.execute(
            "UPDATE deer_centroids SET centroid_resnet = %s, vectors = vectors + 1, "
            "updated_at = now() WHERE embedding_version = %s AND deer_id = %s",
            (new_e, VERSION, moved.deer_id),
        )
        assert len(a.loader.load(VERSION)) == 4  # not committed yet
        assert len(blind.loader.load(VERSION)) == 4
    # committed here
    view = a.loader.load(VERSION)
    assert new_id in view.deer_ids.tolist()
    got = {c.deer_id: c for c in a.held()}
    assert got[moved.deer_id].sightings == moved.sightings + 1
    np.testing.assert_array_equal(got[moved.deer_id].resnet, new_e)
    assert_same(a.held(), a.store.load_centroids(VERSION))
    # Without the margin the refresh misses it: its updated_at is before the previous read.
    assert new_id not in blind.loader.load(VERSION).deer_ids.tolist()


def test_redis_down_falls_back_to_postgres_and_recovers(
    workers, redis_url: str, unique: str
) -> None:
    # Redis behind a proxy that cut() takes down (connections closed, new ones refused).
    proxy = TcpProxy(free_port(), int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    proxy.start()
    proxy_url = f"redis://127.0.0.1:{proxy.port}/0"
    try:
        herd = Herd(seed=6, animals=30)
        a = workers(cache_url=proxy_url, refresh_s=3600)
        rng = np.random.default_rng(7)
        a.batch(*herd.sightings(list(rng.integers(0, 30, size=12))))
        assert a.counter("reid_cache_errors_total") == 0

        proxy.cut()
        a.batch(*herd.sightings(list(rng.integers(0, 30, size=12))))  # its cache write fails
        errors = a.counter("reid_cache_errors_total")
        assert errors >= 1
        a.batch(*herd.sightings(list(rng.integers(0, 30, size=12))))  # load retries Redis
        assert a.counter("reid_cache_errors_total") > errors
        assert_same(a.held(), a.store.load_centroids(VERSION))  # memory never went wrong

        # A worker starting while Redis is down reads Postgres, and counts the failure.
        b = workers(cache_url=proxy_url, refresh_s=3600)
        b.loader.load(VERSION)
        assert b.counter("reid_cache_errors_total") >= 1
        assert_same(b.held(), b.store.load_centroids(VERSION))

        proxy.start()
        misses = a.counter("reid_cache_requests_total", result="miss")
        before = len(a.store.load_centroids(VERSION))
        a.batch(*herd.sightings(list(rng.integers(0, 30, size=12))))
        # Redis answered: the version was dropped there, reloaded from Postgres (every deer
        # a miss) and written back in full, then the batch's own write went through.
        assert a.counter("reid_cache_requests_total", result="miss") == misses + before
        truth = a.store.load_centroids(VERSION)
        assert_same(a.held(), truth)
        direct = CentroidCache(redis_url, key_prefix=f"gal-{unique}")
        direct.start()
        try:
            read = direct.get_all(VERSION)
        finally:
            direct.stop()
        assert read is not None and read.missing_ids == []
        assert_same(sorted(read.centroids, key=lambda c: c.deer_id), truth)
    finally:
        proxy.cut()


def test_forget_drops_memory_and_a_later_load_reads_again(workers) -> None:
    herd = Herd(seed=8, animals=5)
    a = workers(refresh_s=3600)
    a.batch(*herd.sightings([0, 1, 2]))
    assert a.loader.versions() == [VERSION]
    a.loader.forget(VERSION)
    assert a.loader.versions() == []
    hits = a.counter("reid_cache_requests_total", result="hit")
    assert len(a.loader.load(VERSION)) == 3
    assert a.counter("reid_cache_requests_total", result="hit") == hits + 3


def test_load_from_redis_rereads_what_redis_may_have_missed(workers, monkeypatch) -> None:
    monkeypatch.setattr("streams.gallery.CACHE_WRITE_CHUNK", 4)  # the full write in chunks
    herd = Herd(seed=9, animals=20)
    a = workers(refresh_s=3600)
    a.batch(*herd.sightings(list(range(12))))
    # a commits a batch and dies before its cache write: Redis keeps the older centroids.
    a.loader.put = lambda *args, **kwargs: None
    a.batch(*herd.sightings([0, 1, 2, 12, 13]))
    truth = a.store.load_centroids(VERSION)
    assert len(truth) == 14

    b = workers(refresh_s=3600)  # starts later and finds the version warm in Redis
    b.loader.load(VERSION)
    assert b.counter("reid_cache_requests_total", result="hit") == 12
    assert_same(b.held(), truth)  # the refresh after the load re-read the lost writes

    # Without the look-back (and margin, which covers these few seconds as well), the lost
    # writes stay lost: two deer missing, three with their older centroids.
    forgetful = workers(refresh_s=3600, redis_lookback_s=0, refresh_margin_s=0)
    forgetful.loader.load(VERSION)
    held = {c.deer_id: c for c in forgetful.held()}
    assert len(held) == 12
    stale = [c for c in truth if c.deer_id in held and c.sightings != held[c.deer_id].sightings]
    assert len(stale) == 3


def test_curation_changes_reach_memory_before_the_next_batch(workers) -> None:
    herd = Herd(seed=11, animals=12)
    a = workers(refresh_s=3600)  # no timed refresh: only the curation check can update it
    for animals in ([0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 0, 1, 2, 3]):
        r, e, ids = herd.sightings(animals)
        a.batch(r, e, ids)
    a.loader.load(VERSION)
    by_size = sorted(a.store.load_centroids(VERSION), key=lambda c: -c.sightings)
    keep, other, split = by_size[0].deer_id, by_size[1].deer_id, by_size[2].deer_id
    with a.store.session("t") as conn:
        of_split = [r[0] for r in conn.execute(
            "SELECT detection_id FROM detections WHERE deer_id = %s ORDER BY detection_id",
            (split,)).fetchall()]  # fmt: skip

    a.store.curation.merge(keep, other)
    a.store.curation.split(split, of_split[:1])  # lowers a count: replaced all the same

    view = a.loader.load(VERSION)
    truth = a.store.load_centroids(VERSION)
    assert other not in view.deer_ids.tolist()
    assert_same(a.held(), truth)
    # The next batch of the merged animal joins the survivor; nothing re-creates the other.
    r, e, ids = herd.sightings([1])
    result = a.batch(r, e, ids)
    assert result.assignments[0].deer_id != other
    assert other not in {c.deer_id for c in a.store.load_centroids(VERSION)}


def test_a_late_cache_write_cannot_bring_a_merged_deer_back(workers) -> None:
    herd = Herd(seed=12, animals=6)
    a = workers(refresh_s=3600)
    r, e, ids = herd.sightings([0, 1, 2, 3, 4, 5])
    a.batch(r, e, ids)
    keep, other = sorted(c.deer_id for c in a.store.load_centroids(VERSION))[:2]
    stale = next(c for c in a.held() if c.deer_id == other)
    a.store.curation.merge(keep, other)
    a.cache.put(VERSION, [stale])  # a worker's cache write that lost the race with the merge

    b = workers(refresh_s=3600, redis_lookback_s=None)  # loads from Redis, which has it
    view = b.loader.load(VERSION)
    assert b.counter("reid_cache_requests_total", result="hit") >= 5
    assert other not in view.deer_ids.tolist()
    assert_same(b.held(), a.store.load_centroids(VERSION))


def test_matrix_remove_moves_the_last_row_into_the_hole() -> None:
    from streams.gallery import GalleryMatrix

    rng = np.random.default_rng(5)
    made = [DeerCentroid(i, l2_normalise(rng.normal(size=DIM)), l2_normalise(rng.normal(size=DIM)),
                         i) for i in (10, 20, 30, 40)]  # fmt: skip
    matrix = GalleryMatrix(DIM, capacity=2)
    matrix.upsert(made)
    assert matrix.remove([20, 99]) == 1
    assert sorted(matrix.view().deer_ids.tolist()) == [10, 30, 40]
    assert_same(matrix.centroids(), [made[0], made[2], made[3]])
    lower = DeerCentroid(40, made[0].resnet, made[0].effnet, 1)
    assert matrix.upsert([lower]) == (0, 0)  # a lower count is a stale copy...
    assert matrix.upsert([lower], force=True) == (0, 1)  # ...unless a curation change says so
    assert matrix.get(40).sightings == 1
