"""Curation changes against a real PostgreSQL with pgvector: merge, split, move, confirm;
centroids rebuilt for every version, sightings recomputed, aliases, repeats and refusals."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import numpy as np
import psycopg
import pytest

from reid.matching import l2_normalise, merge_centroid
from sinks.aliases import aliases_of
from sinks.curation import CurationRefused
from sinks.curation_reads import changes_since, history, resolve, review_queue, show
from sinks.pg import NEW_DEER_LOCK_KEY
from sinks.store import PgStore
from tests.herd import VERSION, seed_herd

OTHER_VERSION = "herd-v2"


def herd_invariants(database_url: str) -> None:
    """What every change must keep: one row per detection, sightings add up, no centroid
    of a deer that does not exist, every centroid the mean of its deer's vectors."""
    with psycopg.connect(database_url) as conn:
        detections = conn.execute("SELECT count(*) FROM detections").fetchone()[0]
        sightings = conn.execute("SELECT coalesce(sum(sightings), 0) FROM deer").fetchone()[0]
        per_deer = dict(conn.execute("SELECT id, sightings FROM deer").fetchall())
        counted = dict(
            conn.execute("SELECT deer_id, count(*) FROM detections GROUP BY deer_id").fetchall()
        )
        orphans = conn.execute(
            "SELECT count(*) FROM deer_centroids c LEFT JOIN deer d ON d.id = c.deer_id "
            "WHERE d.id IS NULL"
        ).fetchone()[0]
        stale = conn.execute(
            "SELECT count(*) FROM deer_centroids c WHERE c.vectors <> (SELECT count(*) FROM "
            "detection_vectors x JOIN detections d ON d.detection_id = x.detection_id WHERE "
            "d.deer_id = c.deer_id AND x.embedding_version = c.embedding_version)"
        ).fetchone()[0]
        aliases = conn.execute(
            "SELECT count(*) FROM deer_aliases a JOIN deer d ON d.id = a.alias_id"
        ).fetchone()[0]
    assert sightings == detections
    assert per_deer == counted  # every deer has detections, and its count is right
    assert orphans == 0 and stale == 0
    assert aliases == 0  # an alias never names a living deer


def mean_of(database_url: str, deer_id: int, version: str) -> tuple[np.ndarray, np.ndarray]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT x.embedding_resnet::text, x.embedding_effnet::text FROM detection_vectors x "
            "JOIN detections d ON d.detection_id = x.detection_id WHERE d.deer_id = %s AND "
            "x.embedding_version = %s",
            (deer_id, version),
        ).fetchall()
    r = np.array([np.fromstring(a.strip("[]"), sep=",") for a, _ in rows])
    e = np.array([np.fromstring(b.strip("[]"), sep=",") for _, b in rows])
    return l2_normalise(r.mean(axis=0)), l2_normalise(e.mean(axis=0))


def deer_by_size(herd) -> list[int]:
    return [d for d, _ in Counter(herd.deer_of.values()).most_common()]


def replay_second_version(store: PgStore, herd) -> None:
    """Vectors of another version for every detection (as a replay stores them)."""
    rng = np.random.default_rng(1)
    vectors = [(d, l2_normalise(rng.standard_normal(512)), l2_normalise(rng.standard_normal(512)))
               for d in sorted(herd.deer_of)]  # fmt: skip
    store.history.store_replayed(OTHER_VERSION, vectors)


def test_merge_moves_everything_and_keeps_the_old_id_as_an_alias(store, database_url):
    herd = seed_herd(store)
    replay_second_version(store, herd)
    keep, other = deer_by_size(herd)[:2]
    moved = sorted(d for d, deer in herd.deer_of.items() if deer == other)
    before = show(store, keep)["sightings"]

    result = store.curation.merge(keep, other, reason="same stripes")

    assert result.changed and result.change.kind == "merge"
    assert (result.change.deer_id, result.change.other_id) == (keep, other)
    assert list(result.change.detections) == moved
    assert show(store, keep)["sightings"] == before + len(moved)
    assert resolve(store, other) == keep and show(store, other)["merged_into"] == keep
    # Every version's centroid of the survivor is the mean of its vectors; the merged one's
    # centroids are gone in both versions, and said so for the cache.
    for version in (VERSION, OTHER_VERSION):
        [centroid] = [c for c in result.centroids[version] if c.deer_id == keep]
        want_r, want_e = mean_of(database_url, keep, version)
        np.testing.assert_allclose(centroid.resnet, want_r, atol=2e-6)
        np.testing.assert_allclose(centroid.effnet, want_e, atol=2e-6)
        assert centroid.sightings == before + len(moved)
        assert result.removed[version] == [other]
        assert other not in {c.deer_id for c in store.load_centroids(version)}
    herd_invariants(database_url)

    # A repeat changes nothing and names the change that did it.
    again = store.curation.merge(keep, other)
    assert not again.changed and again.change.id == result.change.id
    assert [c.id for c in changes_since(store, 0)] == [result.change.id]


def test_merge_refusals_say_why(store, database_url):
    herd = seed_herd(store)
    a, b, c = deer_by_size(herd)[:3]
    with pytest.raises(CurationRefused, match=f"cannot merge deer {a} into itself"):
        store.curation.merge(a, a)
    with pytest.raises(CurationRefused, match="no deer 999999"):
        store.curation.merge(a, 999_999)
    store.curation.merge(a, b)
    with pytest.raises(CurationRefused, match=rf"merging {a} into {b} would make a cycle"):
        store.curation.merge(b, a)
    with pytest.raises(CurationRefused, match=rf"merge into deer {a} instead"):
        store.curation.merge(b, c)
    with pytest.raises(CurationRefused, match=rf"already merged into deer {a}"):
        store.curation.merge(c, b)
    herd_invariants(database_url)
    assert len(changes_since(store, 0)) == 1  # refusals leave no trace


def test_aliases_are_flattened_when_a_survivor_is_merged_in_turn(store, database_url):
    herd = seed_herd(store)
    a, b, c = deer_by_size(herd)[:3]
    store.curation.merge(a, b)
    store.curation.merge(c, a)
    with store.session("t") as conn:
        assert aliases_of(conn, [a, b]) == {a: c, b: c}
    assert show(store, b)["merged_into"] == c
    assert sorted(show(store, c)["aliases"]) == sorted([a, b])
    assert [ch.kind for ch in history(store, a)] == ["merge", "merge"]
    herd_invariants(database_url)


def test_split_makes_a_new_deer_and_a_repeat_is_a_no_op(store, database_url):
    herd = seed_herd(store)
    replay_second_version(store, herd)
    source = deer_by_size(herd)[0]
    mine = sorted(d for d, deer in herd.deer_of.items() if deer == source)
    taken = mine[:2]

    result = store.curation.split(source, taken, reason="two animals")

    new = result.change.other_id
    assert result.changed and new not in herd.deer_of.values()
    assert show(store, new)["sightings"] == 2
    assert show(store, source)["sightings"] == len(mine) - 2
    for version in (VERSION, OTHER_VERSION):
        got = {c.deer_id: c for c in result.centroids[version]}
        assert set(got) == {source, new}
        np.testing.assert_allclose(got[new].resnet, mean_of(database_url, new, version)[0],
                                   atol=2e-6)  # fmt: skip
        assert got[new].sightings == 2
    with store.session("t") as conn:
        outcome = conn.execute(
            "SELECT DISTINCT review_outcome FROM detections WHERE detection_id = ANY(%s)",
            (taken,),
        ).fetchall()
    assert outcome == [("new_deer",)]
    herd_invariants(database_url)

    again = store.curation.split(source, list(reversed(taken)))
    assert not again.changed and again.change.id == result.change.id
    assert show(store, new)["sightings"] == 2


def test_split_refusals_say_why(store, database_url):
    herd = seed_herd(store)
    a, b = deer_by_size(herd)[:2]
    of_a = sorted(d for d, deer in herd.deer_of.items() if deer == a)
    of_b = sorted(d for d, deer in herd.deer_of.items() if deer == b)
    with pytest.raises(CurationRefused, match=rf"belong to deer {b}"):
        store.curation.split(a, [of_a[0], of_b[0]])
    with pytest.raises(CurationRefused, match="no detection"):
        store.curation.split(a, ["nope"])
    with pytest.raises(CurationRefused, match="must leave the deer at least one"):
        store.curation.split(a, of_a)
    with pytest.raises(CurationRefused, match="no detections given"):
        store.curation.split(a, [])
    store.curation.merge(b, a)
    with pytest.raises(CurationRefused, match=rf"merged into deer {b}; split deer {b}"):
        store.curation.split(a, of_a[:1])
    herd_invariants(database_url)


def test_move_and_confirm(store, database_url):
    herd = seed_herd(store)
    a, b = deer_by_size(herd)[:2]
    of_a = sorted(d for d, deer in herd.deer_of.items() if deer == a)

    moved = store.curation.move([of_a[0]], b, reason="review: moved")
    assert moved.changed and moved.change.kind == "move" and moved.change.source_ids == (a,)
    assert show(store, a)["sightings"] == len(of_a) - 1
    assert not store.curation.move([of_a[0]], b).changed  # already there
    # Moving every remaining detection of a deer is a merge: its id becomes an alias.
    whole = store.curation.move(of_a[1:], b)
    assert whole.change.kind == "merge" and resolve(store, a) == b
    herd_invariants(database_url)

    flagged = next(d for d in herd.flagged if d not in of_a)  # those moved were reviewed
    confirmed = store.curation.confirm(flagged)
    assert confirmed.changed and confirmed.change.detections == (flagged,)
    assert not store.curation.confirm(flagged).changed
    assert flagged not in {i["detection_id"] for i in review_queue(store)[1]}
    with pytest.raises(CurationRefused, match="no detection 'nope'"):
        store.curation.confirm("nope")


def test_flags_and_candidates_are_stored_with_the_row(store, database_url):
    herd = seed_herd(store)
    assert any(d.startswith("det-amb") for d in herd.flagged), herd.flagged
    total, items = review_queue(store, limit=100)
    assert total == len(herd.flagged) == len(items)
    for item in items:
        assert item["has_thumbnail"] and 1 <= len(item["candidates"]) <= 3
        scores = [c["similarity"] for c in item["candidates"]]
        assert scores == sorted(scores, reverse=True)
    with psycopg.connect(database_url) as conn:
        sizes = [len(t) for (t,) in conn.execute("SELECT thumbnail FROM detections").fetchall()]
    assert all(500 < s <= 16_384 for s in sizes)


def test_a_batch_planned_against_a_merged_deer_goes_to_the_survivor(store, database_url):
    herd = seed_herd(store)
    keep, other = deer_by_size(herd)[:2]
    store.curation.merge(keep, other)
    # A worker that planned before the merge: its row names the merged deer.
    rng = np.random.default_rng(3)
    from tests.integration.test_sinks_store import row

    late = row(rng, "late-1", deer_id=other)
    result = store.write_batch(VERSION, 0, [late], merge_centroid)
    assert result.assignments[0].deer_id == keep
    assert {c.deer_id for c in result.centroids} == {keep}
    herd_invariants(database_url)


def test_a_change_waits_for_a_write_in_flight(store, database_url):
    seed = seed_herd(store)
    keep, other = deer_by_size(seed)[:2]
    with psycopg.connect(database_url, autocommit=True) as writer:
        # What a batch write holds for its transaction.
        tx = writer.transaction()
        tx.__enter__()
        writer.execute("SELECT pg_advisory_xact_lock_shared(%s)", (NEW_DEER_LOCK_KEY,))
        done = threading.Event()
        thread = threading.Thread(
            target=lambda: (store.curation.merge(keep, other), done.set()), daemon=True
        )
        thread.start()
        time.sleep(0.5)
        assert not done.is_set()  # the merge waits for the write to commit
        tx.__exit__(None, None, None)
        thread.join(10)
    assert done.is_set()
    herd_invariants(database_url)


def test_a_redelivery_after_a_merge_names_the_survivor(store, database_url):
    from streams.events import assignment_event

    herd = seed_herd(store)
    keep, other = deer_by_size(herd)[:2]
    moved = next(d for d, deer in herd.deer_of.items() if deer == other)
    before = store.existing_assignments([moved])[moved]
    store.curation.merge(keep, other)
    after = store.existing_assignments([moved])[moved]
    # What the processor republishes for a redelivery: the deer it belongs to now, the rest
    # as decided (docs/curation.md, "A redelivered detection after a merge").
    assert after.deer_id == keep and before.deer_id == other
    first, again = json.loads(assignment_event(before)), json.loads(assignment_event(after))
    assert again["deer_id"] == str(keep)
    assert {k: v for k, v in again.items() if k != "deer_id"} == {
        k: v for k, v in first.items() if k != "deer_id"
    }
