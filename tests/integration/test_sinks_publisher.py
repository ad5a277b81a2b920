"""KafkaPublisher against the embedded broker."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient, NewTopic

from sinks.publisher import KafkaPublisher, PublishError


def create_topic(bootstrap: str, topic: str, partitions: int = 3) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(topic, partitions, 1)]).values():
        future.result(timeout=15)


def consume(bootstrap: str, topic: str, group: str, expected: int, timeout: float = 20.0) -> list:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 6000,
        }
    )
    consumer.subscribe([topic])
    got = []
    deadline = time.monotonic() + timeout
    try:
        while len(got) < expected and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=expected, timeout=0.5):
                assert msg.error() is None, msg.error()
                got.append(msg)
    finally:
        consumer.close()
    return got


def test_sent_messages_are_confirmed_and_readable(kafka_bootstrap: str, unique: str) -> None:
    topic = f"assignments-{unique}"
    create_topic(kafka_bootstrap, topic)
    publisher = KafkaPublisher({"bootstrap.servers": kafka_bootstrap})
    publisher.start()
    sent = {}
    try:
        for i in range(50):
            value = f'{{"n":{i}}}'.encode()
            key: bytes | str | None = str(i % 7) if i % 10 else None
            headers = [("source", b"test"), ("n", str(i).encode())]
            publisher.send(topic, key, value, headers)
            sent[value] = (key, headers)
        publisher.flush_confirmed(timeout=15)
        publisher.flush_confirmed(timeout=1)  # nothing outstanding: a no-op
    finally:
        publisher.stop()

    got = consume(kafka_bootstrap, topic, f"g-{unique}", len(sent))

    assert sorted(m.value() for m in got) == sorted(sent)
    for msg in got:
        key, headers = sent[msg.value()]
        assert msg.key() == (None if key is None else key.encode())
        assert msg.headers() == headers


def test_unreachable_broker_raises_publish_error() -> None:
    publisher = KafkaPublisher(
        {"bootstrap.servers": "127.0.0.1:1", "message.timeout.ms": 1500, "linger.ms": 0}
    )
    publisher.start()
    try:
        for i in range(3):
            publisher.send("assignments", f"k{i}", b"value")
        t0 = time.monotonic()
        with pytest.raises(PublishError, match="3 of 3"):
            publisher.flush_confirmed(timeout=10)
        assert time.monotonic() - t0 < 8
        # The failures were counted once: a fresh round starts clean.
        publisher.flush_confirmed(timeout=1)
    finally:
        publisher.stop(timeout=1)


def test_flush_timeout_counts_in_flight_as_unconfirmed() -> None:
    publisher = KafkaPublisher({"bootstrap.servers": "127.0.0.1:1", "message.timeout.ms": 60000})
    publisher.start()
    try:
        publisher.send("assignments", None, b"value")
        with pytest.raises(PublishError, match="1 still in flight"):
            publisher.flush_confirmed(timeout=0.5)
    finally:
        publisher.stop(timeout=0)


def test_delivery_guarantees_cannot_be_weakened() -> None:
    publisher = KafkaPublisher(
        {"bootstrap.servers": "x:1", "acks": "1", "enable.idempotence": False, "linger.ms": 20}
    )
    assert publisher._config["acks"] == "all"
    assert publisher._config["enable.idempotence"] is True
    assert publisher._config["linger.ms"] == 20
    assert KafkaPublisher({"bootstrap.servers": "x:1"})._config["linger.ms"] == 5
