"""A checkpoint written by `reid-train` is loaded as is by `reid-stream run` and assigns events."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import psycopg
import pytest
from confluent_kafka import Producer
from PIL import Image

from reid.embedder import Embedder
from reid.training.config import config_from_dict
from reid.training.train import Trainer
from sinks.migrate import migrate
from streams.tools.produce import detection_event
from streams.topics import ensure_topics, read_topic
from tests.conftest import ZEBRA_DIR, stream_environment, zebra_images

PARTITIONS = 2


def produce(bootstrap: str, topic: str, values: list[tuple[str, bytes]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for key, value in values:
        producer.produce(topic, value, key=key)
    assert producer.flush(30) == 0


@contextlib.contextmanager
def stream_process(env: dict[str, str]) -> Iterator[list[str]]:
    """`reid-stream run` as a real process; SIGTERM on exit, which must end it with 0.
    Yields a list that holds the process output once it has stopped."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "streams.cli", "run"], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    output: list[str] = []
    try:
        yield output
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        output.append(out)
    assert proc.returncode == 0, output[-1][-3000:]


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    cfg = config_from_dict({
        "name": "it-ens", "output_dir": str(out),
        "data": {"root": str(ZEBRA_DIR), "test_identities": 0, "max_identities": 4,
                 "input_size": 64},
        "model": {"arch": "stream_ensemble"},
        "train": {"epochs": 1, "p": 2, "k": 2, "batches_per_epoch": 1, "threads": 2,
                  "progress": False},
    })  # fmt: skip
    trainer = Trainer(cfg)
    return trainer.fit(), trainer.version


def test_stream_assigns_with_the_trained_checkpoint(stack, database_url, unique,
                                                    trained_checkpoint):  # fmt: skip
    path, version = trained_checkpoint
    assert version.startswith("trained-it-ens-")
    migrate(database_url)
    env = stream_environment(
        stack,
        database_url,
        unique,
        REID_TOPIC_PARTITIONS=str(PARTITIONS),
        REID_BATCH_MAX_SIZE="4",
        REID_WEIGHTS_PATH=str(path),
    )
    bootstrap = env["REID_KAFKA_BOOTSTRAP_SERVERS"]
    ensure_topics({"bootstrap.servers": bootstrap},
                  [env["REID_TOPIC_DETECTIONS"], env["REID_TOPIC_ASSIGNMENTS"],
                   env["REID_TOPIC_DEAD_LETTERS"]], PARTITIONS)  # fmt: skip
    images = zebra_images(individuals=2, per_individual=3)
    values = []
    for i, (_who, image) in enumerate(images):
        event = detection_event(image.read_bytes(), f"cam-{i % 2}", detection_id=f"d-{i}")
        values.append((event["camera_id"], json.dumps(event).encode()))
    produce(bootstrap, env["REID_TOPIC_DETECTIONS"], values)

    with stream_process(env) as output:
        got = read_topic({"bootstrap.servers": bootstrap}, env["REID_TOPIC_ASSIGNMENTS"],
                         expected=len(values), timeout_s=240)  # fmt: skip
    events = [json.loads(m.value()) for m in got]
    assert len(events) == len(values), output[-1][-3000:]
    assert {e["embedding_version"] for e in events} == {version}
    assert {e["detection_id"] for e in events} == {f"d-{i}" for i in range(len(values))}

    # The stored vectors are the checkpoint's own embeddings of the same images (64 px).
    with psycopg.connect(database_url) as conn:
        rows = dict(conn.execute(
            "SELECT detection_id, embedding_resnet::text FROM detections"
        ).fetchall())  # fmt: skip
    embedder = Embedder(weights_path=path, device="cpu")
    embedder.start()
    assert embedder.preprocess.input_size == (64, 64)
    for i, (_who, image) in enumerate(images):
        with Image.open(image) as img:
            ours = embedder.embed(embedder.preprocess.to_uint8(img)[None]).resnet[0]
        stored = np.asarray(json.loads(rows[f"d-{i}"]), dtype=np.float32)
        assert float(ours @ stored) > 0.999
    # And not those of the untrained (seeded) ensemble.
    seeded = Embedder(device="cpu", input_size=64)
    seeded.start()
    with Image.open(images[0][1]) as img:
        other = seeded.embed(seeded.preprocess.to_uint8(img)[None]).resnet[0]
    assert float(other @ np.asarray(json.loads(rows["d-0"]), np.float32)) < 0.99
