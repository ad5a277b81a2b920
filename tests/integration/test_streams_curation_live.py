"""Curation while the stream runs: two live `reid-stream run` processes consume while deer are
merged and split through ``streams.curation.Curator`` (what `reid-stream deer` and the review
page call). Afterwards: every detection stored once, sum(sightings) == count(detections), no
centroid of a deer that no longer exists, aliases resolve, the deer.changes topic matches the
database, each consumer applied the changes before its next batch; then (confluent) a replay
under another version and its activation keep the merged herd.

The stream: ``ANIMALS`` animals, each a 64 px JPEG of seeded noise seen with identical bytes
(ensemble score 1.0); different animals score below 0.5 with the seeded model, so with
``REID_THRESHOLD=0.95`` each animal is one deer until a person says otherwise.
"""

from __future__ import annotations

import io
import json
import re
import time
from collections import Counter

import numpy as np
import psycopg
import pytest
from confluent_kafka import Producer
from PIL import Image

from sinks.curation_reads import resolve
from sinks.store import PgStore
from streams.curation import Curator
from streams.replay import Replayer
from streams.settings import Settings
from streams.tools.produce import detection_event
from streams.tools.stack import free_port
from streams.topics import ensure_topics, read_topic
from streams.versions import build_embedder
from tests.integration.conftest import PARTITIONS
from tests.integration.test_sinks_curation import herd_invariants
from tests.integration.test_streams_end_to_end import StreamConsumer, produce

ANIMALS = 8
LIVE = {"REID_INPUT_SIZE": "64", "REID_BACKEND": "torch", "REID_THRESHOLD": "0.95",
        "REID_BATCH_MAX_SIZE": "8", "REID_BATCH_MAX_WAIT_MS": "100", "REID_DECODE_WORKERS": "1",
        "REID_VERSION_POLL_S": "0.5", "REID_GALLERY_REFRESH_S": "3600"}  # fmt: skip


def animal_image(animal: int) -> bytes:
    rng = np.random.default_rng([20261202, animal])
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)).save(
        out, format="JPEG", quality=90
    )
    return out.getvalue()


def sightings(phase: str, per_animal: int) -> list[tuple[str, bytes]]:
    out = []
    for k in range(per_animal):
        for a in range(ANIMALS):
            event = detection_event(animal_image(a), f"cam-{(a + k) % 4}",
                                    detection_id=f"{phase}-a{a}-{k}")  # fmt: skip
            out.append((event["camera_id"], json.dumps(event).encode()))
    return out


def produce_from(bootstrap: str, topic: str, values: list[tuple[str, bytes]]) -> dict[int, int]:
    """Publish; returns the first offset each partition got."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    starts: dict[int, int] = {}

    def delivered(err, msg) -> None:
        assert err is None, err
        starts[msg.partition()] = min(starts.get(msg.partition(), msg.offset()), msg.offset())

    for key, value in values:
        producer.produce(topic, value, key=key, on_delivery=delivered)
    assert producer.flush(30) == 0
    return starts


def ids_of(events: list[tuple[str, bytes]]) -> list[str]:
    return [json.loads(v)["detection_id"] for _, v in events]


def wait_stored(db: str, ids: list[str], consumers: list[StreamConsumer], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with psycopg.connect(db) as conn:
            n = conn.execute(
                "SELECT count(*) FROM detections WHERE detection_id = ANY(%s)", (ids,)
            ).fetchone()[0]
        if n == len(ids):
            return
        dead = [c for c in consumers if c.proc.poll() is not None]
        assert not dead, f"a consumer exited: {dead[0].proc.returncode}"
        time.sleep(0.5)
    raise AssertionError(f"only {n} of {len(ids)} detections stored in {timeout:.0f}s")


def deer_of(db: str) -> dict[str, int]:
    with psycopg.connect(db) as conn:
        return dict(conn.execute("SELECT detection_id, deer_id FROM detections").fetchall())


def switched(consumer: StreamConsumer, version: str) -> bool:
    """The consumer's model info metric names ``version``."""
    return any(f'embedding_version="{version}"' in name and value == 1.0
               for name, value in consumer.metrics().items())  # fmt: skip


def applied_before_batches(output: str, generation: int, topic: str, after: dict[int, int]):
    """True when the process logged its gallery reaching ``generation`` before every batch
    that held an offset at or past ``after`` (partition -> first offset) on ``topic`` (a
    consumer that had no such batch has nothing to show)."""
    applied = False
    for line in output.splitlines():
        # Brought up to date, or loaded afresh after the change: either way current.
        if "curation changes applied" in line or "gallery: loaded" in line:
            m = re.search(r"generation=(\d+)", line)
            applied = applied or (m is not None and int(m.group(1)) >= generation)
        elif m := re.search(r"batch \d+: .*offsets=(\S+)", line):
            for span in m.group(1).split(","):
                name, _, rest = span.rpartition("[")
                part, _, rng = rest.partition("]:")
                hi = int(rng.split("-")[1])
                if name == topic and hi >= after.get(int(part), 1 << 62) and not applied:
                    return False
    return True


@pytest.mark.parametrize("runner", ["confluent", "faust"])
def test_merges_and_splits_while_two_consumers_run(stream_env, stack, unique, runner, tmp_path):
    env = {**stream_env, **LIVE, "REID_TOPIC_DEER_CHANGES": f"deer.changes-{unique}"}
    db = env["REID_DATABASE_URL"]
    bootstrap = {"bootstrap.servers": env["REID_KAFKA_BOOTSTRAP_SERVERS"]}
    topic = env["REID_TOPIC_DETECTIONS"]
    ensure_topics(bootstrap, [topic, env["REID_TOPIC_ASSIGNMENTS"],
                              env["REID_TOPIC_DEAD_LETTERS"]], PARTITIONS)  # fmt: skip
    settings = Settings(**{k[5:].lower(): v for k, v in env.items()
                           if k.startswith("REID_") and k != "REID_IMAGE_ROOTS"})  # fmt: skip
    consumers = [StreamConsumer({**env, "REID_METRICS_PORT": str(free_port())}, runner)
                 for _ in range(2)]  # fmt: skip
    curator = Curator(settings)
    try:
        # 1. History: every animal three times.
        first = sightings("p1", 3)
        produce(bootstrap["bootstrap.servers"], topic, first)
        wait_stored(db, ids_of(first), consumers, 240)
        curator.start()
        herd = deer_of(db)
        deer = {a: herd[f"p1-a{a}-0"] for a in range(ANIMALS)}
        assert len(set(deer.values())) == ANIMALS

        # 2. Changes while more events stream in: merges (one into a survivor merged again
        # later: the aliases are flattened), a split, a move.
        second = sightings("p2", 3)
        produce(bootstrap["bootstrap.servers"], topic, second[:12])
        curator.merge(deer[0], deer[1], reason="same animal")
        curator.merge(deer[2], deer[3])
        produce(bootstrap["bootstrap.servers"], topic, second[12:])
        curator.merge(deer[0], deer[2], reason="all one")
        split = curator.split(deer[4], ["p1-a4-1", "p1-a4-2"], reason="two animals")
        curator.move(["p1-a5-1"], deer[6])
        assert not curator.merge(deer[0], deer[1]).changed  # a repeat
        wait_stored(db, ids_of(second), consumers, 240)

        # 3. After the last change: every batch of each consumer follows it.
        with psycopg.connect(db) as conn:
            last = conn.execute("SELECT max(id) FROM deer_changes").fetchone()[0]
        third = sightings("p3", 2)
        starts = produce_from(bootstrap["bootstrap.servers"], topic, third)
        wait_stored(db, ids_of(third), consumers, 240)
        herd = deer_of(db)
        for a in (1, 2, 3):  # the merged-away deer are gone for good, their animals not
            assert deer[a] not in herd.values()
            assert resolve(curator.store, deer[a]) == deer[0]
            assert herd[f"p3-a{a}-0"] not in {deer[1], deer[2], deer[3]}

        # 4. Replay under another version and activate it: the merged herd stays.
        later: list[str] = []
        if runner == "confluent":
            later = replay_and_activate(settings, env, db, consumers, curator)
    finally:
        codes = [c.stop() for c in consumers]
        curator.stop()
        for i, c in enumerate(consumers):  # shown when the test fails
            print(f"--- consumer {i} exit {c.proc.returncode}:\n{c.output[-4000:]}")
    outputs = [c.output for c in consumers]
    assert codes == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]

    # Every detection once, in the database and on the assignments topic.
    everything = ids_of(first) + ids_of(second) + ids_of(third) + later
    herd = deer_of(db)
    assert sorted(herd) == sorted(everything)
    events = read_topic(bootstrap, env["REID_TOPIC_ASSIGNMENTS"], expected=len(everything))
    assert {json.loads(m.value())["detection_id"] for m in events} == set(everything)
    merged = {deer[1], deer[2], deer[3]}
    assert not merged & {int(json.loads(m.value())["deer_id"]) for m in events
                         if json.loads(m.value())["detection_id"].startswith("p3")}  # fmt: skip
    herd_invariants(db)
    assert Counter(herd.values())[split.change.other_id] >= 2  # ties may add to either half
    with psycopg.connect(db) as conn:
        aliases = dict(conn.execute("SELECT alias_id, deer_id FROM deer_aliases").fetchall())
        rows = conn.execute(
            "SELECT id, kind, deer_id, other_id, detections, published_at IS NOT NULL "
            "FROM deer_changes ORDER BY id"
        ).fetchall()
    assert aliases == {deer[1]: deer[0], deer[2]: deer[0], deer[3]: deer[0]}

    # The deer.changes topic is the database's change log, in order, each change once.
    read = read_topic(bootstrap, env["REID_TOPIC_DEER_CHANGES"], expected=len(rows))
    published = [json.loads(m.value()) for m in read]
    assert [(e["change_id"], e["kind"], int(e["deer_id"]),
             None if e["other_deer_id"] is None else int(e["other_deer_id"]), e["detections"])
            for e in published] == [r[:5] for r in rows]  # fmt: skip
    assert [r[1] for r in rows] == ["merge", "merge", "merge", "split", "move"]
    assert all(r[5] for r in rows)

    # Each consumer brought its memory up to the last change before any batch after it.
    assert any("curation changes applied" in output for output in outputs)
    for output in outputs:
        assert applied_before_batches(output, last, topic, starts), output[-3000:]


def replay_and_activate(
    settings: Settings, env: dict[str, str], db: str, consumers: list[StreamConsumer],
    curator: Curator,
) -> list[str]:  # fmt: skip
    """Replay the topic under another version (seed 1), activate it, stream a little more."""
    other = settings.model_copy(update={"seed": 1, "input_size": 64})
    embedder = build_embedder(other)
    embedder.start()
    version = embedder.embedding_version
    replayer = Replayer(other, embedder, version=version, idle_s=1.0)
    replayer.start()
    try:
        replayer.run(replayer.start_offsets(from_beginning=True), until_end=True)
    finally:
        replayer.stop()
        embedder.stop()
    store: PgStore = curator.store
    living = {r for r in deer_of(db).values()}
    assert {c.deer_id for c in store.load_centroids(version)} == living  # no merged deer
    store.registry.activate(version)
    deadline = time.monotonic() + 180
    while not all(switched(c, version) for c in consumers):  # built in the background
        assert time.monotonic() < deadline, "the consumers did not switch to the new version"
        time.sleep(0.5)
    fourth = sightings("p4", 1)
    produce(env["REID_KAFKA_BOOTSTRAP_SERVERS"], env["REID_TOPIC_DETECTIONS"], fourth)
    wait_stored(db, ids_of(fourth), consumers, 240)
    with psycopg.connect(db) as conn:
        versions = conn.execute(
            "SELECT DISTINCT embedding_version FROM detections WHERE detection_id LIKE 'p4-%%'"
        ).fetchall()
    assert versions == [(version,)]  # both consumers switched
    herd = deer_of(db)
    assert {c.deer_id for c in store.load_centroids(version)} == set(herd.values())
    herd_invariants(db)
    return ids_of(fourth)
