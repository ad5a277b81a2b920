"""CentroidCache against a real Redis."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest
import redis

from sinks.cache import CacheUnavailable, CentroidCache
from sinks.records import DeerCentroid

DIM = 512


def centroids(rng: np.random.Generator, ids: range) -> list[DeerCentroid]:
    return [
        DeerCentroid(
            deer_id=i,
            resnet=rng.standard_normal(DIM).astype(np.float32),
            effnet=rng.standard_normal(DIM).astype(np.float32),
            sightings=i * 1_000_003,  # beyond 32 bits for large ids
        )
        for i in ids
    ]


def by_id(items: list[DeerCentroid]) -> dict[int, DeerCentroid]:
    return {c.deer_id: c for c in items}


def assert_same(got: list[DeerCentroid], want: list[DeerCentroid]) -> None:
    got_by, want_by = by_id(got), by_id(want)
    assert sorted(got_by) == sorted(want_by)
    for deer_id, w in want_by.items():
        g = got_by[deer_id]
        assert g.resnet.dtype == np.float32 and g.effnet.dtype == np.float32
        np.testing.assert_array_equal(g.resnet, w.resnet)
        np.testing.assert_array_equal(g.effnet, w.effnet)
        assert g.sightings == w.sightings


@pytest.fixture()
def cache(redis_url: str) -> Iterator[CentroidCache]:
    c = CentroidCache(redis_url, key_prefix="test")
    c.start()
    yield c
    c.stop()


def test_roundtrip_is_exact_and_cold_version_is_none(cache: CentroidCache) -> None:
    rng = np.random.default_rng(1)
    assert cache.get_all("v1") is None
    items = centroids(rng, range(1, 2501))  # more than one MGET chunk

    cache.put("v1", items, complete=True)
    read = cache.get_all("v1")

    assert read is not None
    assert read.missing_ids == []
    assert_same(read.centroids, items)
    assert [c.deer_id for c in read.centroids] == sorted(c.deer_id for c in items)
    # The returned arrays are the caller's to modify.
    read.centroids[0].resnet[0] += 1.0


def test_incomplete_version_stays_cold_and_empty_complete_is_warm(cache: CentroidCache) -> None:
    rng = np.random.default_rng(2)
    cache.put("v1", centroids(rng, range(1, 4)))
    assert cache.get_all("v1") is None  # written after commits, but never fully loaded

    cache.put("v2", [], complete=True)  # a version with no deer yet
    read = cache.get_all("v2")
    assert read is not None and read.centroids == [] and read.missing_ids == []


def test_versions_do_not_mix(cache: CentroidCache, redis_url: str) -> None:
    rng = np.random.default_rng(3)
    old = centroids(rng, range(1, 6))
    new = centroids(rng, range(3, 9))  # overlapping ids, different vectors
    cache.put("v1", old, complete=True)
    cache.put("v2", new, complete=True)

    v1, v2 = cache.get_all("v1"), cache.get_all("v2")
    assert v1 is not None and v2 is not None
    assert_same(v1.centroids, old)
    assert_same(v2.centroids, new)

    cache.invalidate("v1")
    assert cache.get_all("v1") is None
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.keys("test:v1:*") == []
        assert len(client.keys("test:v2:deer:*")) == len(new)
    finally:
        client.close()
    v2_again = cache.get_all("v2")
    assert v2_again is not None
    assert_same(v2_again.centroids, new)


def test_deleted_key_is_reported_missing(cache: CentroidCache, redis_url: str) -> None:
    rng = np.random.default_rng(4)
    items = centroids(rng, range(1, 11))
    cache.put("v1", items, complete=True)
    client = redis.Redis.from_url(redis_url)
    try:
        client.delete("test:v1:deer:7")
        client.set("test:v1:deer:8", b"truncated")
    finally:
        client.close()

    read = cache.get_all("v1")

    assert read is not None
    assert read.missing_ids == [7, 8]
    assert_same(read.centroids, [c for c in items if c.deer_id not in (7, 8)])

    # Filling the gap (what the caller does after reading Postgres) heals it.
    cache.put("v1", [c for c in items if c.deer_id in (7, 8)])
    healed = cache.get_all("v1")
    assert healed is not None and healed.missing_ids == []
    assert_same(healed.centroids, items)


def test_update_overwrites_one_deer(cache: CentroidCache) -> None:
    rng = np.random.default_rng(5)
    items = centroids(rng, range(1, 4))
    cache.put("v1", items, complete=True)
    changed = DeerCentroid(2, items[1].resnet * 2, items[1].effnet * 3, 99)
    cache.put("v1", [changed])
    read = cache.get_all("v1")
    assert read is not None
    assert_same(read.centroids, [items[0], changed, items[2]])


def test_complete_flag_expires(redis_url: str) -> None:
    cache = CentroidCache(redis_url, key_prefix="test", complete_ttl_s=1)
    cache.start()
    try:
        cache.put("v1", centroids(np.random.default_rng(6), range(1, 3)), complete=True)
        assert cache.get_all("v1") is not None
        time.sleep(1.2)
        assert cache.get_all("v1") is None
    finally:
        cache.stop()


def test_unreachable_redis_raises_cache_unavailable_quickly() -> None:
    cache = CentroidCache("redis://127.0.0.1:1/0", socket_timeout=0.5)
    cache.start()  # logs, does not raise: the cache is optional
    try:
        for call in (
            lambda: cache.get_all("v1"),
            lambda: cache.put("v1", [], complete=True),
            cache.ping,
            lambda: cache.invalidate("v1"),
        ):
            t0 = time.monotonic()
            with pytest.raises(CacheUnavailable):
                call()
            assert time.monotonic() - t0 < 1.5
    finally:
        cache.stop()


def test_unresponsive_redis_times_out() -> None:
    """A server that accepts connections but never answers costs about one socket timeout."""
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        silent = CentroidCache(f"redis://127.0.0.1:{port}/0", socket_timeout=0.3)
        silent.start()
        try:
            t0 = time.monotonic()
            with pytest.raises(CacheUnavailable):
                silent.get_all("v1")
            assert time.monotonic() - t0 < 1.5
        finally:
            silent.stop()
