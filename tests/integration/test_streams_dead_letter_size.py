"""Dead letters too large for the producer or the dead-letter topic, against the broker
(issue 13, point 2): the truncated record goes through and reads back as documented, and a
broker's refusal is MessageRejected (with the message's tag), so the caller can fall back."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from sinks.publisher import KafkaPublisher, MessageRejected
from streams.batch import SourceMessage
from streams.dead_letters import DeadLetterSender, dead_letter_limit, dead_letter_record
from streams.events import InvalidEvent
from streams.settings import load_settings
from streams.topics import ensure_topics, read_topic

TOO_LARGE = InvalidEvent("message_too_large", "1200002 bytes > limit 300000")


def test_a_1_2_mb_dead_letter_is_published_truncated(kafka_bootstrap, unique, tmp_path) -> None:
    settings = load_settings(kafka_bootstrap_servers=kafka_bootstrap, max_message_bytes=300_000)
    topic = f"dlq-{unique}"
    ensure_topics(settings.kafka_common(), [topic], 1, config=settings.topic_config())
    value = b"{" + b"x" * 1_200_000 + b"}"
    message = SourceMessage("detections", 0, 7, b"cam-9", value)
    record = dead_letter_record(
        message, TOO_LARGE, datetime.now(UTC), limit_bytes=dead_letter_limit(settings),
        keep_dir=tmp_path,
    )  # fmt: skip
    publisher = KafkaPublisher(settings.producer_config())
    publisher.start()
    try:
        publisher.send(topic, record.key, record.value, record.headers, tag=message)
        publisher.flush_confirmed(timeout=30)
    finally:
        publisher.stop()
    (got,) = read_topic(settings.kafka_common(), topic, expected=1)
    headers = {k: v for k, v in got.headers()}
    assert headers["dlq.truncated"] == b"true"
    assert int(headers["dlq.original.size"]) == len(value)
    assert headers["dlq.original.sha256"] == hashlib.sha256(value).hexdigest().encode()
    stored = headers["dlq.original.stored"].decode()
    assert Path(stored).read_bytes() == value
    assert got.key() == b"cam-9" and value.startswith(got.value())


def test_a_refused_dead_letter_is_message_rejected_and_its_stub_goes_through(
    kafka_bootstrap, unique
) -> None:
    # The broker's own refusal (a topic's max.message.bytes) cannot be shown on tansu, which
    # does not enforce it; the producer's refusal is reported the same way (MessageRejected,
    # unit tests cover the delivery-report path), and the fallback is the same.
    settings = load_settings(
        kafka_bootstrap_servers=kafka_bootstrap, kafka_options={"message.max.bytes": "200000"}
    )
    settings = settings.model_copy(update={"topic_dead_letters": f"dlq-{unique}"})
    topic = settings.topic_dead_letters
    ensure_topics(settings.kafka_common(), [topic], 1)
    message = SourceMessage("detections", 0, 8, b"cam-9", b"y" * 500_000)
    letters = [(message, TOO_LARGE)]
    publisher = KafkaPublisher(settings.producer_config())
    sender = DeadLetterSender(publisher, settings)
    publisher.start()
    try:
        publisher.send(topic, message.key, message.value or b"", [], tag=message)  # as before
        with pytest.raises(MessageRejected) as info:
            publisher.flush_confirmed(timeout=30)
        assert [r.tag for r in info.value.rejected] == [message]
        assert sender.resend_minimal(info.value, letters, datetime.now(UTC))
        publisher.flush_confirmed(timeout=30)
    finally:
        publisher.stop()
    (got,) = read_topic(settings.kafka_common(), topic, expected=1)
    assert json.loads(got.value())["original_size"] == 500_000
    assert dict(got.headers())["dlq.truncated"] == b"true"
