"""Replay, validate, activate and roll back embedding versions, on the embedded stack.

The live stream runs version A (the seeded ensemble at 64 px); a replay re-embeds the history
under version B (a checkpoint of the seeded ensemble with another seed, 64 px), is killed
midway and resumed; then the live consumer is switched to B and back to A without a restart.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import psycopg
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from reid.preprocess import Preprocess
from reid.weights import build_seeded, save_checkpoint
from sinks.cache import CentroidCache
from sinks.migrate import available, migrate
from sinks.registry import index_names
from sinks.store import PgStore
from streams.app import StreamApp
from streams.replay import Replayer, ReplayError, replay_group
from streams.settings import Settings
from streams.tools.produce import detection_event
from streams.tools.synthetic import synthetic_photos
from streams.topics import ensure_topics, read_topic
from streams.validate import validate
from tests.conftest import ZEBRA_DIR

VERSION_A = "seed0-msr50+effb0-calib-v2-64px"
VERSION_B = "it-replay-b-seed1-64px"
SYNTHETIC, ZEBRAS, INVALID = 150, 14, 4
PARTITIONS = 2


@pytest.fixture(scope="module")
def checkpoint_b(tmp_path_factory) -> Path:
    """Version B: other weights (seed 1) at the same small input size."""
    path = tmp_path_factory.mktemp("weights") / "b.pt"
    pre = Preprocess(input_size=(64, 64))
    save_checkpoint(path, build_seeded(1, preprocess=pre), embedding_version=VERSION_B,
                    preprocess=pre, meta={"test": "replay"})  # fmt: skip
    return path


def settings_of(env: dict[str, str], **extra) -> Settings:
    fields = Settings.model_fields
    values = {k[5:].lower(): v for k, v in env.items() if k.startswith("REID_")}
    values = {k: v for k, v in values.items() if k in fields}
    values["image_roots"] = json.loads(values.get("image_roots", "[]"))
    values.update(extra)
    return Settings(**values)


def produce(env: dict[str, str], values: list[tuple[str, bytes]]) -> None:
    producer = Producer({"bootstrap.servers": env["REID_KAFKA_BOOTSTRAP_SERVERS"]})
    for i, (key, value) in enumerate(values):
        # Spread over both partitions whatever the keys hash to.
        producer.produce(env["REID_TOPIC_DETECTIONS"], value, key=key, partition=i % PARTITIONS)
    assert producer.flush(30) == 0


def events(prefix: str, photos: list[bytes]) -> list[tuple[str, bytes]]:
    out = []
    for i, jpeg in enumerate(photos):
        event = detection_event(jpeg, f"cam-{i % 3}", detection_id=f"{prefix}-{i}")
        out.append((event["camera_id"], json.dumps(event).encode()))
    return out


def committed(env: dict[str, str], group: str) -> int:
    consumer = Consumer({"bootstrap.servers": env["REID_KAFKA_BOOTSTRAP_SERVERS"],
                         "group.id": group})  # fmt: skip
    try:
        parts = [TopicPartition(env["REID_TOPIC_DETECTIONS"], p) for p in range(PARTITIONS)]
        return sum(max(0, tp.offset) for tp in consumer.committed(parts, timeout=10))
    finally:
        consumer.close()


def vectors_by_detection(conn: psycopg.Connection, version: str) -> dict[str, list[np.ndarray]]:
    out: dict[str, list[np.ndarray]] = defaultdict(list)
    for detection_id, r, e in conn.execute(
        "SELECT detection_id, embedding_resnet::text, embedding_effnet::text "
        "FROM detection_vectors WHERE embedding_version = %s", (version,)
    ):  # fmt: skip
        out[detection_id].append(np.array(json.loads(r) + json.loads(e), np.float64))
    return out


def check_centroids(conn: psycopg.Connection, version: str) -> None:
    """Every deer's centroids are the re-normalised means of its vectors of the version."""
    vectors = vectors_by_detection(conn, version)
    deer_of = dict(conn.execute("SELECT detection_id, deer_id FROM detections").fetchall())
    members: dict[int, list[np.ndarray]] = defaultdict(list)
    for detection_id, [v] in vectors.items():
        members[deer_of[detection_id]].append(v)
    rows = conn.execute(
        "SELECT deer_id, centroid_resnet::text, centroid_effnet::text, vectors "
        "FROM deer_centroids WHERE embedding_version = %s", (version,)
    ).fetchall()  # fmt: skip
    assert {r[0] for r in rows} == set(members)
    for deer_id, resnet, effnet, count in rows:
        stacked = np.stack(members[deer_id])
        assert count == len(stacked)
        for got, part in ((resnet, slice(0, 512)), (effnet, slice(512, 1024))):
            mean = stacked[:, part].mean(axis=0)
            np.testing.assert_allclose(json.loads(got), mean / np.linalg.norm(mean), atol=2e-6)


class LiveStream:
    """The live consumer in this process, switching versions between batches."""

    def __init__(self, settings: Settings) -> None:
        self.app = StreamApp(settings, serve_metrics=False)
        self.switched: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        def between() -> None:
            version = self.app.between_batches()
            if version is not None:
                self.switched.append(version)

        try:
            self.app.consumer.run(between_batches=between)
        except BaseException as err:
            self.error = err

    def __enter__(self) -> LiveStream:
        self.app.start()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.app.consumer.request_stop()
        self.thread.join(timeout=60)
        self.app.stop()
        assert self.error is None, self.error


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streams.cli", *args], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_replay_validate_activate_and_roll_back(stream_env, checkpoint_b, tmp_path) -> None:
    # A high threshold: the seeded weights would put most detections into a few deer.
    env = {**stream_env, "REID_INPUT_SIZE": "64", "REID_VERSION_POLL_S": "0.3",
           "REID_THRESHOLD": "0.6",
           "REID_BATCH_MAX_SIZE": "16", "REID_DECODE_WORKERS": "2"}  # fmt: skip
    settings = settings_of(env)
    bootstrap = {"bootstrap.servers": env["REID_KAFKA_BOOTSTRAP_SERVERS"]}
    topics = [env["REID_TOPIC_DETECTIONS"], env["REID_TOPIC_ASSIGNMENTS"],
              env["REID_TOPIC_DEAD_LETTERS"]]  # fmt: skip
    ensure_topics(bootstrap, topics, PARTITIONS)
    photos = [jpeg for _, jpeg in synthetic_photos(SYNTHETIC, 30, seed=3)]
    zebra = sorted((ZEBRA_DIR).rglob("*.jpg"))[:ZEBRAS]
    history = events("h", photos + [p.read_bytes() for p in zebra])
    history += [(f"cam-{i}", b"{not json") for i in range(INVALID)]
    produce(env, history)
    stored_total = SYNTHETIC + len(zebra)
    db = env["REID_DATABASE_URL"]

    with LiveStream(settings) as live:
        # 1. The live stream stores the history under A (the configured weights, registered
        # as the active version on a fresh database).
        wait_for(lambda: committed(env, settings.group_id) == len(history), 240, "live A")
        assert live.app.embedder.embedding_version == VERSION_A
        with psycopg.connect(db) as conn:
            assert conn.execute("SELECT count(*) FROM detections").fetchone() == (stored_total,)
            assert conn.execute("SELECT version, state FROM embedding_versions").fetchall() == [
                (VERSION_A, "active")
            ]

        # 2. Replay under B in a real process, killed (SIGKILL) midway, small batches.
        proc = subprocess.Popen(
            [sys.executable, "-m", "streams.cli", "replay", "--embedding-version", VERSION_B,
             "--weights", str(checkpoint_b), "--until-end"],
            env={**env, "REID_BATCH_MAX_SIZE": "4"}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        group_b = replay_group(settings, VERSION_B)
        try:
            wait_for(lambda: committed(env, group_b) >= 24, 180, "replay progress")
        finally:
            proc.send_signal(signal.SIGKILL)
            out, _ = proc.communicate(timeout=30)
        done_before = committed(env, group_b)
        assert 0 < done_before < len(history), out[-2000:]
        with psycopg.connect(db) as conn:
            partial = len(vectors_by_detection(conn, VERSION_B))
        assert 0 < partial < stored_total
        # Its progress: stderr is no terminal here, so a log line instead of a bar.
        assert "replay: progress events=" in out and "ev/s" in out, out[-2000:]

        # 3. Resume: continues from the committed offsets, to the end.
        b_settings = settings_of(env, input_size=None)
        from streams.app import build_embedder

        emb_b = build_embedder(b_settings, weights_path=checkpoint_b)
        replayer = Replayer(b_settings, emb_b, version=VERSION_B, weights_path=checkpoint_b,
                            idle_s=1.0)  # fmt: skip
        replayer.start()
        try:
            with pytest.raises(ReplayError, match="cannot look offsets up by timestamp"):
                replayer.start_offsets(from_time_ms=int(time.time() * 1000))
            resumed = replayer.run(replayer.start_offsets(), until_end=True)
            # 4. Run again from the beginning: idempotent, nothing stored twice.
            again = replayer.run(replayer.start_offsets(from_beginning=True), until_end=True)
        finally:
            replayer.stop()
        assert resumed.reached_end and again.reached_end
        assert resumed.events == len(history) - done_before  # it did not start over
        assert resumed.results.get("stored", 0) + partial == stored_total
        assert again.results.get("stored", 0) == 0
        assert again.results["already_stored"] == stored_total
        assert again.results["invalid"] == INVALID
        assert again.results.get("not_stored", 0) == 0

        with psycopg.connect(db) as conn:
            b_vectors = vectors_by_detection(conn, VERSION_B)
            ids = {r[0] for r in conn.execute("SELECT detection_id FROM detections")}
            assert set(b_vectors) == ids and all(len(v) == 1 for v in b_vectors.values())
            a_vectors = vectors_by_detection(conn, VERSION_A)
            assert set(a_vectors) == ids
            # Other weights, other vectors.
            some = sorted(ids)[0]
            assert float(a_vectors[some][0][:512] @ b_vectors[some][0][:512]) < 0.99
            # Exact means for B (rebuilt by the replay); A's are the live running means.
            check_centroids(conn, VERSION_B)
            state = conn.execute("SELECT state FROM embedding_versions WHERE version = %s",
                                 (VERSION_B,)).fetchone()  # fmt: skip
            assert state == ("ready",)
            present = {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes")}
            assert set(index_names(VERSION_B)) <= present

        # 5. Validate B against A.
        result = validate(settings, VERSION_A, VERSION_B, tmp_path / "validate")
        assert result["detections"] == stored_total
        assert 0.0 <= result["best_deer_changed"] <= 1.0
        written = json.loads((tmp_path / "validate" / "validate.json").read_text())
        assert written["new"]["suggested_threshold"] == result["new"]["suggested_threshold"]
        assert written["new"]["false_merge_rate"] <= written["old"]["false_merge_rate"]
        assert (tmp_path / "validate" / "validate.png").read_bytes()[:4] == b"\x89PNG"

        # 6. Activate B with its own threshold: the live consumer switches without a restart
        # and decides with B's threshold. At -1 every detection joins its best existing deer,
        # which REID_THRESHOLD (0.6) would not do.
        done = cli(env, "activate", VERSION_B, "--threshold", "-1")
        assert done.returncode == 0, done.stderr[-2000:]
        assert "threshold -1" in done.stdout
        with psycopg.connect(db) as conn:
            deer_before = {r[0] for r in conn.execute("SELECT id FROM deer")}
            assert conn.execute("SELECT threshold FROM embedding_versions WHERE version = %s",
                                (VERSION_B,)).fetchone() == (-1.0,)  # fmt: skip
        cache = CentroidCache(env["REID_REDIS_URL"], key_prefix=env["REID_CACHE_KEY_PREFIX"])
        cache.start()
        try:
            warm = cache.get_all(VERSION_B)
        finally:
            cache.stop()
        with psycopg.connect(db) as conn:
            deer = conn.execute("SELECT count(DISTINCT deer_id) FROM detections").fetchone()[0]
        assert warm is not None and len(warm.centroids) == deer  # warmed by `activate`
        after_b = trickle(env, "b", photos, lambda: VERSION_B in live.switched)
        assert live.app.processor.embedder.embedding_version == VERSION_B
        with psycopg.connect(db) as conn:
            rows = dict(conn.execute(
                "SELECT detection_id, embedding_version FROM detections WHERE detection_id "
                "LIKE 'b-%%'").fetchall())  # fmt: skip
            assert rows[after_b[-1]] == VERSION_B
            under_b = [d for d, v in rows.items() if v == VERSION_B]
            assert live.app.processor.thresholds.get(VERSION_B) == -1.0
            joined = {r[0] for r in conn.execute(
                "SELECT deer_id FROM detections WHERE detection_id = ANY(%s)", (under_b,)
            )}  # fmt: skip
            assert joined <= deer_before  # B's threshold, not REID_THRESHOLD, decided
            # The live consumer writes only the active version's vectors.
            assert set(under_b) <= set(vectors_by_detection(conn, VERSION_B))
            assert not set(under_b) & set(vectors_by_detection(conn, VERSION_A))

        # A consumer starting now runs the active version (B, from its registered checkpoint),
        # not its configured weights (the seeded A).
        other = StreamApp(settings_of(env, group_id=f"{settings.group_id}-other"),
                          serve_metrics=False)  # fmt: skip
        other.start()
        try:
            assert other.embedder.embedding_version == VERSION_B
        finally:
            other.stop()

        # 7. Roll back to A: refused while the new detections lack A vectors, then forced.
        refused = cli(env, "activate", VERSION_A)
        assert refused.returncode == 2 and "have no" in refused.stderr
        done = cli(env, "activate", VERSION_A, "--force")
        assert done.returncode == 0, done.stderr[-2000:]
        after_a = trickle(env, "a", photos, lambda: live.switched[-1:] == [VERSION_A])
        assert live.switched == [VERSION_B, VERSION_A]
        with psycopg.connect(db) as conn:
            last = conn.execute("SELECT embedding_version FROM detections WHERE detection_id = %s",
                                (after_a[-1],)).fetchone()  # fmt: skip
            assert last == (VERSION_A,)

    # Assignment events name the version that produced them.
    with psycopg.connect(db) as conn:
        made_by = dict(conn.execute("SELECT detection_id, embedding_version FROM detections"))
    got = read_topic(bootstrap, env["REID_TOPIC_ASSIGNMENTS"], expected=len(made_by),
                     timeout_s=60)  # fmt: skip
    published = {json.loads(m.value())["detection_id"]: json.loads(m.value())["embedding_version"]
                 for m in got}  # fmt: skip
    assert published == made_by
    assert {VERSION_A, VERSION_B} <= set(published.values())

    # 8. Drop B: the active version is refused; B's vectors, indexes and cache keys go.
    assert cli(env, "drop-version", VERSION_A, "--yes").returncode == 2
    dropped = cli(env, "drop-version", VERSION_B, "--yes")
    assert dropped.returncode == 0, dropped.stderr[-2000:]
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM detection_vectors WHERE embedding_version "
                            "= %s", (VERSION_B,)).fetchone() == (0,)  # fmt: skip
        present = {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes")}
        assert not set(index_names(VERSION_B)) & present
        assert conn.execute("SELECT count(*) FROM deer_centroids WHERE embedding_version = %s",
                            (VERSION_A,)).fetchone()[0] > 0  # fmt: skip
    cache = CentroidCache(env["REID_REDIS_URL"], key_prefix=env["REID_CACHE_KEY_PREFIX"])
    cache.start()
    try:
        assert cache.get_all(VERSION_B) is None
    finally:
        cache.stop()


def trickle(env, prefix: str, photos: list[bytes], switched, limit: int = 60) -> list[str]:
    """Produce one event at a time, each waited for, until the live consumer has switched;
    then one more, certainly after the switch. Returns the detection ids produced."""
    produced: list[str] = []
    store = PgStore(env["REID_DATABASE_URL"])
    store.start()
    try:
        for i in range(limit):
            after_switch = switched()
            jpeg = photos[i % len(photos)]
            event = detection_event(jpeg, "cam-9", detection_id=f"{prefix}-{i}")
            produce(env, [(event["camera_id"], json.dumps(event).encode())])
            produced.append(event["detection_id"])
            wait_for(lambda d=event["detection_id"]: d in store.existing_assignments([d]),
                     60, event["detection_id"])  # fmt: skip
            if after_switch:
                return produced
        raise AssertionError(f"no switch after {limit} events")
    finally:
        store.stop()


def test_migration_moves_existing_rows(database_url: str) -> None:
    """A database at 0001 with rows: 0002 moves vectors and centroids and keeps them usable."""
    (first, sql), *_ = available()
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql)
        conn.execute("CREATE TABLE schema_migrations (version text PRIMARY KEY, "
                     "applied_at timestamptz NOT NULL DEFAULT now())")  # fmt: skip
        conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (first,))
        rng = np.random.default_rng(1)
        v = [rng.standard_normal(512).astype(np.float32) for _ in range(4)]
        v = [x / np.linalg.norm(x) for x in v]
        text = [str(x.tolist()) for x in v]
        now = datetime.now(UTC)
        conn.execute("INSERT INTO deer VALUES (7, 'old-v', %s::vector, %s::vector, 1, %s, %s)",
                     (text[0], text[1], now, now))  # fmt: skip
        conn.execute(
            "INSERT INTO detections (detection_id, camera_id, captured_at, deer_id, is_new_deer, "
            "embedding_version, embedding_resnet, embedding_effnet, source_topic, "
            "source_partition, source_offset, processed_at) VALUES ('d1', 'c', %s, 7, true, "
            "'old-v', %s::vector, %s::vector, 't', 0, 0, %s)",
            (now, text[2], text[3], now),
        )
        conn.execute("SELECT setval('deer_id_seq', 7)")
    assert migrate(database_url) == [v for v, _ in available()][1:]
    assert migrate(database_url) == []
    store = PgStore(database_url)
    store.start()
    try:
        active = store.registry.active()
        assert active is not None and active.version == "old-v"
        (centroid,) = store.load_centroids("old-v")
        assert centroid.deer_id == 7 and centroid.sightings == 1
        np.testing.assert_allclose(centroid.resnet, v[0], atol=1e-7)
        assert store.deer_count("old-v") == 1
        assert store.registry.coverage("old-v")["vectors"] == 1
        pairs = store.history.paired_vectors("old-v", "old-v")
        np.testing.assert_allclose(pairs["old_resnet"][0], v[2], atol=1e-7)
        assert store.existing_assignments(["d1"])["d1"].embedding_version == "old-v"
    finally:
        store.stop()
    with psycopg.connect(database_url) as conn:
        present = {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes")}
    assert set(index_names("old-v")) <= present


def test_replay_group_names_are_safe() -> None:
    settings = Settings(group_id="reid")
    assert replay_group(settings, "seed0 v/2") == "reid-replay-seed0_v_2"
    assert os.sep not in replay_group(settings, "a/b")


def test_replay_rate_benchmark_replays_every_detection(stack) -> None:
    """The benchmark's function: a scratch database and topic, every event re-embedded."""
    from streams.tools.bench.replay import replay_rate

    settings = Settings(
        kafka_bootstrap_servers=stack.info.kafka_bootstrap,
        database_url=stack.info.database_url,
        redis_url=stack.info.redis_url,
        input_size=64,
        batch_max_size=16,
    )
    result = replay_rate(settings, events=40, reference=1000)
    assert result["stored"] == 40 and result["events"] == 40
    assert result["detections_per_s"] > 0
    assert result["extrapolated_1000_s"] == pytest.approx(
        1000 / result["detections_per_s"], rel=0.01
    )
    assert result["embedding_version"] == VERSION_A
    admin = stack.info.database_url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin) as conn:
        left = conn.execute(
            "SELECT count(*) FROM pg_database WHERE datname LIKE 'reid_replay_bench_%%'"
        ).fetchone()
    assert left == (0,)  # the scratch database is gone
