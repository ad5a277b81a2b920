"""The end-of-run checks of a fault scenario: the database, the output topics and the
group's committed offsets, read once every worker has exited."""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg
import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from sinks.cache import CentroidCache
from tests.faults.workers import FaultTestError

if TYPE_CHECKING:
    from tests.faults.harness import FaultRun


@dataclass
class Verdict:
    """The figures of one run and what was wrong with them (empty: every guarantee held)."""

    figures: dict[str, Any]
    problems: list[str]

    def check(self) -> None:
        if self.problems:
            raise FaultTestError(
                "delivery guarantees broken:\n  - " + "\n  - ".join(self.problems)
                + "\nfigures: " + json.dumps(self.figures, sort_keys=True)
            )  # fmt: skip


def verify(run: FaultRun, *, read_timeout: float = 60.0) -> Verdict:
    """Read the database, the output topics and the committed offsets, and say what held.

    Call once every worker has exited (the output is then complete). The stream's poison
    pills (``Stream.pills``) must each be dead-lettered once and never stored; any other
    dead letter is a problem."""
    assert run.stream is not None
    stream = run.stream
    expected = stream.ids
    animal_of = stream.animal_of
    problems: list[str] = []
    pill_ids = {p.detection_id for p in stream.pills}
    unsent = len((expected | pill_ids) - set(stream.partition_of))
    if unsent:
        problems.append(f"{unsent} events of the stream were never produced (test error)")

    with psycopg.connect(run.database_url, connect_timeout=10) as conn:
        counts = dict(conn.execute(
            "SELECT detection_id, count(*) FROM detections GROUP BY detection_id"
        ).fetchall())  # fmt: skip
        stored_deer = dict(conn.execute("SELECT detection_id, deer_id FROM detections"))
        deer = dict(conn.execute("SELECT id, sightings FROM deer").fetchall())
        per_deer = dict(conn.execute("SELECT deer_id, count(*) FROM detections GROUP BY deer_id"))

    stored = expected & set(counts)
    lost = sorted(expected - set(counts))
    unexpected = sorted(set(counts) - expected - pill_ids)
    stored_pills = sorted(pill_ids & set(counts))
    if stored_pills:
        problems.append(f"poison pills stored: {stored_pills}")
    duplicated_rows = sum(n - 1 for n in counts.values() if n > 1)
    if lost:
        problems.append(f"{len(lost)} detections not stored, e.g. {lost[:5]}")
    if unexpected:
        problems.append(f"{len(unexpected)} stored detections never sent: {unexpected[:5]}")
    if duplicated_rows:
        problems.append(f"{duplicated_rows} duplicated detection rows")

    # One animal, one deer; one deer, one animal.
    deer_of_animal: dict[int, set[int]] = defaultdict(set)
    animals_of_deer: dict[int, set[int]] = defaultdict(set)
    for detection_id, deer_id in stored_deer.items():
        if detection_id in animal_of:
            deer_of_animal[animal_of[detection_id]].add(deer_id)
            animals_of_deer[deer_id].add(animal_of[detection_id])
    duplicate_deer = sum(len(d) - 1 for d in deer_of_animal.values())
    merged = {d: sorted(a) for d, a in animals_of_deer.items() if len(a) > 1}
    if duplicate_deer:
        split = {a: sorted(d) for a, d in deer_of_animal.items() if len(d) > 1}
        problems.append(
            f"{duplicate_deer} duplicate deer: {len(split)} animals got several deer, "
            f"e.g. {dict(list(split.items())[:5])}"
        )
    if merged:
        problems.append(
            f"{len(merged)} deer hold several animals (different images scored >= "
            "REID_THRESHOLD: the test's assumption failed), "
            f"e.g. {dict(list(merged.items())[:5])}"
        )
    animals = len({s.animal for s in stream.sightings})
    if len(deer) != animals:
        problems.append(f"{len(deer)} deer for {animals} animals")
    orphans = sorted(set(deer) - set(per_deer))
    if orphans:
        problems.append(f"{len(orphans)} deer without detections, e.g. {orphans[:5]}")

    # Sightings: in total and per deer.
    sightings_total = sum(deer.values())
    if sightings_total != len(stored_deer):
        problems.append(
            f"sum(deer.sightings)={sightings_total} != count(detections)={len(stored_deer)}"
        )
    wrong_counts = {d: (deer[d], per_deer.get(d, 0)) for d in deer
                    if deer[d] != per_deer.get(d, 0)}  # fmt: skip
    if wrong_counts:
        problems.append(
            f"{len(wrong_counts)} deer whose sightings differ from their detections "
            f"(sightings, detections): {dict(list(wrong_counts.items())[:5])}"
        )

    # The output topic: an event for every detection, repeats byte-identical and
    # agreeing with the stored row.
    events = read_all(
        run.bootstrap,
        run.topic_assignments,
        until=lambda msgs: expected <= {json.loads(v)["detection_id"] for _, v in msgs},
        timeout=read_timeout,
    )
    by_id: dict[str, list[bytes]] = defaultdict(list)
    wrong_key = 0
    for key, value in events:
        doc = json.loads(value)
        by_id[doc["detection_id"]].append(value)
        if key is None or key.decode() != doc["deer_id"]:
            wrong_key += 1
    missing_events = sorted(expected - set(by_id))
    differing = sorted(i for i, vs in by_id.items() if len(set(vs)) > 1)
    disagreeing = sorted(
        i for i, vs in by_id.items()
        if i in stored_deer and json.loads(vs[0])["deer_id"] != str(stored_deer[i])
    )  # fmt: skip
    if missing_events:
        problems.append(
            f"{len(missing_events)} detections without an assignment event, "
            f"e.g. {missing_events[:5]}"
        )
    if differing:
        problems.append(
            f"{len(differing)} detections with differing assignment events, "
            f"e.g. {differing[:3]}: {[by_id[i] for i in differing[:1]]}"
        )
    if disagreeing:
        problems.append(
            f"{len(disagreeing)} assignment events name another deer than the stored row, "
            f"e.g. {disagreeing[:5]}"
        )
    if wrong_key:
        problems.append(f"{wrong_key} assignment events whose key is not their deer_id")
    stray = sorted(set(by_id) - expected)
    if stray:
        problems.append(f"{len(stray)} assignment events for unknown detections: {stray[:5]}")

    dead = read_all(run.bootstrap, run.topic_dead_letters, until=lambda _: True, idle=1.0,
                    headers=True)  # fmt: skip
    reasons = pill_reasons(stream.pills, dead)
    for pill, found in reasons.items():
        if len(found) != 1:
            problems.append(f"poison pill {pill} dead-lettered {len(found)} times: {found}")
    others = len(dead) - sum(len(found) for found in reasons.values())
    if others:
        problems.append(f"{others} dead letters for valid events")

    committed = run.committed()
    if committed != stream.ends:
        problems.append(f"committed offsets {committed} != end offsets {stream.ends}")

    figures = {
        "sent": len(stream.sightings) + len(stream.pills),
        "stored": len(stored),
        "lost": len(lost),
        "duplicated_rows": duplicated_rows,
        "animals": animals,
        "deer": len(deer),
        "duplicate_deer": duplicate_deer,
        "merged_deer": len(merged),
        "sightings_total": sightings_total,
        "assignment_events": len(events),
        "repeated_events": len(events) - len(by_id),
        "missing_events": len(missing_events),
        "differing_events": len(differing),
        "dead_lettered": len(dead),
        "pill_reasons": reasons,
        "committed": {str(p): o for p, o in sorted(committed.items())},
        "ends": {str(p): o for p, o in sorted(stream.ends.items())},
        "seconds": round(time.monotonic() - run.t0, 1),
        "timeline": run.timeline,
    }
    return Verdict(figures, problems)


def read_all(
    bootstrap: str,
    topic: str,
    *,
    until: Callable[[list], bool],
    idle: float = 2.0,
    timeout: float = 60.0,
    headers: bool = False,
) -> list[Any]:
    """(key, value) of every message of ``topic`` (``headers``: (key, value, headers as a
    dict of str)), read from the start of each partition
    without joining a group (no join delay). Stops when nothing came for ``idle`` seconds and
    ``until(messages)`` holds, or when nothing came for ``idle`` seconds after ``timeout``."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "unused", "enable.auto.commit": False}
    )
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
        messages: list[Any] = []
        deadline = time.monotonic() + timeout
        last = time.monotonic()
        while True:
            batch = [m for m in consumer.consume(500, timeout=0.2) if m.error() is None]
            if batch:
                messages.extend(
                    (m.key(), m.value(), {k: (v or b"").decode("utf-8", "replace")
                                          for k, v in m.headers() or []})
                    if headers else (m.key(), m.value())
                    for m in batch
                )  # fmt: skip
                last = time.monotonic()
                continue
            quiet = time.monotonic() - last >= idle
            if quiet and (until(messages) or time.monotonic() > deadline):
                return messages
    finally:
        consumer.close()


def cache_state(redis_url: str, prefix: str, database_url: str) -> dict[str, Any]:
    """Compare the Redis centroid cache with the deer in Postgres."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT id, embedding_version, sightings FROM deer").fetchall()
    versions = {v for _, v, _ in rows}
    db = {int(i): int(n) for i, _, n in rows}
    cache = CentroidCache(redis_url, key_prefix=prefix)
    cache.start()
    try:
        cached: dict[int, int] = {}
        cold = []
        for version in versions:
            read = cache.get_all(version)
            if read is None:
                cold.append(version)
                continue
            cached.update({c.deer_id: c.sightings for c in read.centroids})
    finally:
        cache.stop()
    client = redis.Redis.from_url(redis_url)
    try:
        keys = sum(1 for _ in client.scan_iter(match=f"{prefix}:*:deer:*", count=1000))
    finally:
        client.close()
    stale = Counter("missing" if d not in cached else "stale" for d in db
                    if cached.get(d) != db[d])  # fmt: skip
    return {
        "deer_keys": keys,
        "deer_in_db": len(db),
        "cold_versions": cold,
        "missing": stale["missing"],
        "stale": stale["stale"],
    }


def pill_reasons(pills: list, dead: list[tuple[bytes | None, bytes, dict[str, str]]]
                 ) -> dict[str, list[str]]:  # fmt: skip
    """detection_id of each pill -> the ``dlq.reason`` (and ``dlq.exception`` when given) of
    each dead letter that carries it (its original bytes, or its detection_id when the dead
    letter holds something else, e.g. a truncated record)."""
    found: dict[str, list[str]] = {p.detection_id: [] for p in pills}
    by_value = {p.value: p.detection_id for p in pills}
    for _key, value, head in dead:
        pill = by_value.get(value or b"") or _detection_id(value or b"")
        if pill in found:
            reason = head.get("dlq.reason", "?")
            if "dlq.exception" in head:
                reason += f" ({head['dlq.exception']})"
            found[pill].append(reason)
    return found


def _detection_id(value: bytes) -> str | None:
    try:
        return str(json.loads(value)["detection_id"])
    except (ValueError, KeyError, TypeError):
        return None
