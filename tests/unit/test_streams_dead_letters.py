"""Dead letters always fit (issue 13, point 2): the original when it does, else a truncated
record saying so; and a message the producer or broker refuses for its size is reported as
MessageRejected (never retried as it is), not as a retryable PublishError.

librdkafka checks ``message.max.bytes`` inside ``produce()``, before any broker is involved,
so a producer pointed at a closed port proves what the size check accepts."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from confluent_kafka import KafkaError, KafkaException, Producer

from sinks.publisher import KafkaPublisher, MessageRejected, PublishError, Rejection
from streams.batch import SourceMessage
from streams.dead_letters import (
    PREVIEW_BYTES,
    DeadLetterSender,
    dead_letter_limit,
    dead_letter_record,
    keep_original,
    record_size,
)
from streams.events import InvalidEvent
from streams.settings import load_settings
from tests.unit.test_streams_events_schemas import validator

NOWHERE = "127.0.0.1:1"  # nothing listens: only the local checks run
FAILED_AT = datetime(2026, 12, 7, 1, 2, 3, tzinfo=UTC)
TOO_LARGE = InvalidEvent("message_too_large", "1200000 bytes > limit 300000")


def source(value: bytes, key: bytes | None = b"cam-1") -> SourceMessage:
    return SourceMessage("detections", 2, 41, key, value)


def producer(limit: int) -> Producer:
    return Producer({"bootstrap.servers": NOWHERE, "message.max.bytes": limit,
                     "enable.idempotence": True, "acks": "all"})  # fmt: skip


def accepted(limit: int, key: bytes | None, value: bytes, headers: list) -> bool:
    try:
        producer(limit).produce("detections.dlq", value=value, key=key, headers=headers)
    except KafkaException as err:
        assert err.args[0].code() == KafkaError.MSG_SIZE_TOO_LARGE
        return False
    return True


def headers_of(record) -> dict[str, bytes]:
    return dict(record.headers)


def test_an_original_that_fits_is_sent_as_it_is() -> None:
    record = dead_letter_record(source(b'{"x": 1}'), TOO_LARGE, FAILED_AT, limit_bytes=1_000_000)
    assert (record.key, record.value, record.truncated) == (b"cam-1", b'{"x": 1}', False)
    assert "dlq.truncated" not in headers_of(record)
    assert headers_of(record)["dlq.reason"] == b"message_too_large"


def test_the_issue_case_a_1_2_mb_event_with_max_message_bytes_300000() -> None:
    settings = load_settings(max_message_bytes=300_000)
    limit = dead_letter_limit(settings)
    assert limit == settings.message_limit_bytes() == 1_000_000
    value = b"{" + b"x" * 1_200_000 + b"}"
    message = source(value)
    # The original is what stalled the partition: the producer refuses it every time.
    assert not accepted(limit, message.key, value, [("dlq.reason", b"message_too_large")])
    record = dead_letter_record(message, TOO_LARGE, FAILED_AT, limit_bytes=limit)
    assert record.truncated and accepted(limit, record.key, record.value, record.headers)
    assert record.value == value[:PREVIEW_BYTES]
    h = headers_of(record)
    assert h["dlq.truncated"] == b"true"
    assert h["dlq.original.size"] == str(len(value)).encode()
    assert h["dlq.original.sha256"] == hashlib.sha256(value).hexdigest().encode()
    assert "dlq.original.stored" not in h
    assert h["dlq.source.offset"] == b"41" and h["dlq.reason"] == b"message_too_large"


@pytest.mark.parametrize("limit", [2_000, 100_000, 1_000_000])
def test_the_size_bound_is_one_the_producer_accepts(limit: int) -> None:
    headers = dead_letter_record(source(b"v"), TOO_LARGE, FAILED_AT, limit_bytes=limit).headers
    value = b"v" * (limit - record_size(b"cam-1", b"", headers))
    assert record_size(b"cam-1", value, headers) == limit
    assert accepted(limit, b"cam-1", value, headers)
    fitted = dead_letter_record(source(value), TOO_LARGE, FAILED_AT, limit_bytes=limit)
    assert not fitted.truncated
    bigger = dead_letter_record(source(value + b"v"), TOO_LARGE, FAILED_AT, limit_bytes=limit)
    assert bigger.truncated and accepted(limit, bigger.key, bigger.value, bigger.headers)


def test_the_original_is_kept_atomically_in_the_dead_letter_dir(tmp_path: Path) -> None:
    value = b"y" * 50_000
    folder = tmp_path / "dlq"
    record = dead_letter_record(
        source(value), TOO_LARGE, FAILED_AT, limit_bytes=20_000, keep_dir=folder
    )
    digest = hashlib.sha256(value).hexdigest()
    assert record.stored == folder.resolve() / f"{digest}.bin"
    assert record.stored.read_bytes() == value
    assert headers_of(record)["dlq.original.stored"] == str(record.stored).encode()
    assert [p.name for p in folder.iterdir()] == [f"{digest}.bin"]  # no temporary left
    again = dead_letter_record(  # a retried batch: the same file, nothing new
        source(value), TOO_LARGE, FAILED_AT, limit_bytes=20_000, keep_dir=folder
    )
    assert again.stored == record.stored and len(list(folder.iterdir())) == 1


def test_a_dead_letter_dir_that_cannot_be_written_does_not_stop_the_dead_letter(
    tmp_path: Path,
) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_bytes(b"")
    record = dead_letter_record(
        source(b"z" * 50_000), TOO_LARGE, FAILED_AT, limit_bytes=20_000, keep_dir=blocked
    )
    assert record.truncated and record.stored is None
    assert headers_of(record)["dlq.original.stored"] == b""


def test_keep_original_names_stay_in_the_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        keep_original(tmp_path, b"x", "../../etc/passwd")


def test_minimal_is_a_small_stub_even_for_an_original_that_fits() -> None:
    value = b"w" * 300_000
    record = dead_letter_record(
        source(value, key=b"k" * 5000), TOO_LARGE, FAILED_AT, limit_bytes=1_000_000, minimal=True
    )
    assert record.truncated and record_size(record.key, record.value, record.headers) < 4_000
    stub = json.loads(record.value)
    assert stub["original_size"] == 300_000 and stub["dlq_truncated"] is True
    assert record.key == b"k" * 1024
    assert headers_of(record)["dlq.original.key.size"] == b"5000"


# -- the publisher -------------------------------------------------------------------------
def test_a_message_over_the_producer_limit_is_rejected_not_retryable() -> None:
    publisher = KafkaPublisher({"bootstrap.servers": NOWHERE, "message.max.bytes": 10_000})
    publisher.start()
    try:
        tag = source(b"big")
        publisher.send("detections.dlq", b"k", b"x" * 20_000, [("h", b"v")], tag=tag)
        with pytest.raises(MessageRejected) as info:
            publisher.flush_confirmed(timeout=0.2)
        (rejection,) = info.value.rejected
        assert rejection.tag is tag and rejection.topic == "detections.dlq"
        assert rejection.code == KafkaError.MSG_SIZE_TOO_LARGE
        assert isinstance(info.value, PublishError)  # unhandled, it still retries the batch
    finally:
        publisher.stop(timeout=0)


@pytest.mark.parametrize(
    "code",
    [KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE, KafkaError.INVALID_RECORD],
)
def test_a_broker_refusal_in_the_delivery_report_is_rejected(code: int) -> None:
    # The topic's own max.message.bytes is checked by the broker: the delivery report says so.
    publisher = KafkaPublisher({"bootstrap.servers": NOWHERE})
    publisher.start()
    try:
        generation = publisher._current
        generation.sent += 2
        publisher._on_delivery(generation, "detections.dlq", KafkaError(code), "tag-1")
        publisher._on_delivery(generation, "assignments", None)
        with pytest.raises(MessageRejected) as info:
            publisher.flush_confirmed(timeout=0.2)
        assert [r.tag for r in info.value.rejected] == ["tag-1"]
        assert info.value.unconfirmed == 1
    finally:
        publisher.stop(timeout=0)


def test_a_transient_failure_stays_a_plain_publish_error() -> None:
    publisher = KafkaPublisher({"bootstrap.servers": NOWHERE})
    publisher.start()
    try:
        generation = publisher._current
        generation.sent += 1
        publisher._on_delivery(generation, "assignments", KafkaError(KafkaError._MSG_TIMED_OUT))
        with pytest.raises(PublishError) as info:
            publisher.flush_confirmed(timeout=0.2)
        assert not isinstance(info.value, MessageRejected)
    finally:
        publisher.stop(timeout=0)


def test_truncated_headers_match_the_schema(tmp_path: Path) -> None:
    check = validator("dead-letter")
    for keep_dir, minimal in [(None, False), (tmp_path, False), (tmp_path / "f", True)]:
        record = dead_letter_record(
            source(b"v" * 30_000, key=b"k" * 2000), TOO_LARGE, FAILED_AT, limit_bytes=10_000,
            keep_dir=keep_dir, minimal=minimal,
        )  # fmt: skip
        check.validate({k: v.decode() for k, v in record.headers})
    bad = {k: v.decode() for k, v in record.headers} | {"dlq.original.sha256": "xyz"}
    assert not check.is_valid(bad)


# -- the processor's building block --------------------------------------------------------
class FakePublisher:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes, dict[str, bytes], object]] = []

    def send(self, topic, key, value, headers=None, *, tag=None) -> None:
        self.sent.append((topic, key, value, dict(headers or []), tag))


def rejection(tag: object, topic: str = "detections.dlq") -> Rejection:
    return Rejection(topic, tag, KafkaError.MSG_SIZE_TOO_LARGE, "Broker: Message size too large")


def test_the_sender_truncates_what_does_not_fit_and_falls_back_to_stubs(tmp_path: Path) -> None:
    settings = load_settings(max_message_bytes=300_000, dead_letter_dir=tmp_path)
    publisher = FakePublisher()
    sender = DeadLetterSender(publisher, settings)  # type: ignore[arg-type]
    big, small = source(b"b" * 1_200_000), SourceMessage("detections", 1, 5, None, b"{}")
    bad_json = InvalidEvent("bad_json", "not JSON")
    letters = [(big, TOO_LARGE), (small, bad_json)]
    sender.send(letters, FAILED_AT)
    (t1, _, v1, h1, tag1), (t2, _, v2, h2, tag2) = publisher.sent
    assert (t1, t2, tag1, tag2) == ("detections.dlq", "detections.dlq", big, small)
    assert h1["dlq.truncated"] == b"true" and len(v1) == PREVIEW_BYTES
    assert Path(h1["dlq.original.stored"].decode()).read_bytes() == big.value
    assert v2 == b"{}" and "dlq.truncated" not in h2
    # The topic refused the small one (its own max.message.bytes): a stub instead.
    publisher.sent.clear()
    refused = MessageRejected([rejection(small)], unconfirmed=1, sent=2)
    assert sender.resend_minimal(refused, letters, FAILED_AT)
    ((_, _, stub, headers, tag),) = publisher.sent
    assert tag is small and json.loads(stub)["original_size"] == 2
    assert headers["dlq.reason"] == b"bad_json"


def test_the_sender_leaves_other_failures_to_the_batch_retry() -> None:
    sender = DeadLetterSender(FakePublisher(), load_settings())  # type: ignore[arg-type]
    message = source(b"x")
    letters = [(message, TOO_LARGE)]
    also_timed_out = MessageRejected([rejection(message)], unconfirmed=2, sent=3)
    assignment = MessageRejected([rejection(None, topic="assignments")], unconfirmed=1, sent=3)
    assert not sender.resend_minimal(also_timed_out, letters, FAILED_AT)
    assert not sender.resend_minimal(assignment, letters, FAILED_AT)
    assert sender.publisher.sent == []
