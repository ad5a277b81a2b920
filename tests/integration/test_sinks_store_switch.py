"""A version switch never makes two deer of one animal (real PostgreSQL): deer are created
only under the active version, and not while a deer made moments ago under another version
has no centroid of the batch's version (nothing could compare the batch's animal with it)."""

from __future__ import annotations

import numpy as np
import psycopg
import pytest

from sinks.registry import VersionSpec
from sinks.store import NewDeerDeferred, PgStore
from tests.integration.test_sinks_store import normalised_mean, row

V1, V2 = "switch-v1", "switch-v2"


def deer_total(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        return conn.execute("SELECT count(*) FROM deer").fetchone()[0]


def test_only_the_active_version_creates_deer(store: PgStore, database_url: str) -> None:
    rng = np.random.default_rng(1)
    store.registry.register(VersionSpec(V1), activate_if_none=True)
    first = store.write_batch(V1, 1, [row(rng, "a-1", new_deer=0)], normalised_mean)
    deer = first.new_deer_ids[0]
    store.registry.register(VersionSpec(V2))
    store.registry.activate(V2)

    with pytest.raises(NewDeerDeferred) as raised:  # a worker that has not switched yet
        store.write_batch(V1, 1, [row(rng, "b-1", new_deer=0)], normalised_mean)
    assert raised.value.active == V2
    assert deer_total(database_url) == 1
    assert store.existing_assignments(["b-1"]) == {}
    # Its sightings of known deer are still written: they make no identity.
    again = store.write_batch(V1, 0, [row(rng, "a-2", deer_id=deer, minutes=1)], normalised_mean)
    assert again.assignments[0].deer_id == deer


def test_a_new_deer_waits_for_a_recent_deer_it_cannot_compare_with(
    store: PgStore, database_url: str
) -> None:
    rng = np.random.default_rng(2)
    store.registry.register(VersionSpec(V1), activate_if_none=True)
    made = store.write_batch(V1, 1, [row(rng, "a-1", new_deer=0)], normalised_mean)
    store.registry.register(VersionSpec(V2))
    store.registry.activate(V2)

    with pytest.raises(NewDeerDeferred) as raised:
        store.write_batch(V2, 1, [row(rng, "b-1", new_deer=0)], normalised_mean, version_gap_s=30)
    assert raised.value.active is None
    assert deer_total(database_url) == 1

    # The replay gives the deer its V2 centroid: now the batch can compare, and goes on.
    centroid = made.centroids[0]
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO deer_centroids (deer_id, embedding_version, centroid_resnet, "
            "centroid_effnet, vectors) SELECT deer_id, %s, centroid_resnet, centroid_effnet, "
            "vectors FROM deer_centroids WHERE deer_id = %s AND embedding_version = %s",
            (V2, centroid.deer_id, V1),
        )
    result = store.write_batch(
        V2, 1, [row(rng, "b-1", new_deer=0)], normalised_mean, version_gap_s=30
    )
    assert len(result.new_deer_ids) == 1


def test_an_old_gap_does_not_hold_new_deer(store: PgStore) -> None:
    """A deer of another version older than REID_VERSION_GAP_S (activate --force over a gap)
    does not stop new deer for ever."""
    rng = np.random.default_rng(3)
    store.registry.register(VersionSpec(V1), activate_if_none=True)
    store.write_batch(V1, 1, [row(rng, "a-1", new_deer=0)], normalised_mean)
    store.registry.register(VersionSpec(V2))
    store.registry.activate(V2)
    result = store.write_batch(
        V2, 1, [row(rng, "b-1", new_deer=0)], normalised_mean, version_gap_s=0.001
    )
    assert len(result.new_deer_ids) == 1
