"""The record a dead letter is published as: the original key and bytes when they fit, else a
truncated record whose headers say so (docs/events.md#dead-letters-topic-detectionsdlq).

A dead letter that the producer or the topic refuses would be retried for ever and stall its
partition (issue 13): so it must always fit. ``dead_letter_record`` keeps the original when
the whole record fits ``limit_bytes`` (the producer's ``message.max.bytes``), else sends the
first bytes of the value, its size and sha256, and, with ``keep_dir``
(``REID_DEAD_LETTER_DIR``), the whole original written there as ``<sha256>.bin``. When the
broker refuses even that (a dead-letter topic with a smaller ``max.message.bytes`` than the
input topic), the caller asks again with ``minimal=True``: a stub of a few hundred bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from reid.atomic_files import atomic_write
from streams.events import InvalidEvent, dead_letter_headers

if TYPE_CHECKING:
    from sinks.publisher import KafkaPublisher, MessageRejected
    from streams.batch import SourceMessage
    from streams.settings import Settings

log = logging.getLogger(__name__)

# librdkafka counts a record as its key, value and headers plus framing: a v2 record batch
# header (61 bytes), varints per record and per header. Generous, so a record that passes
# here passes its check (tests/unit/test_streams_dead_letters.py proves it with a producer).
RECORD_OVERHEAD = 512
HEADER_OVERHEAD = 16
# A truncated dead letter keeps this much of the value at most: enough to see what the event
# was, small enough for a dead-letter topic with Kafka's default limit (about 1 MB).
PREVIEW_BYTES = 64 * 1024
# A longer key is cut too (keys are ids; one this long is part of the problem).
KEY_BYTES = 1024


@dataclass(frozen=True)
class DeadLetterRecord:
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    truncated: bool = False
    stored: Path | None = None  # where the original was kept, if it was


def record_size(key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]) -> int:
    """An upper bound of what the producer's size check counts for one record."""
    return (
        RECORD_OVERHEAD + len(key or b"") + len(value)
        + sum(len(k.encode()) + len(v) + HEADER_OVERHEAD for k, v in headers)
    )  # fmt: skip


def dead_letter_limit(settings: Settings) -> int:
    """The producer's ``message.max.bytes`` (``REID_KAFKA_OPTIONS`` may set it lower)."""
    return int(settings.producer_config()["message.max.bytes"])


def dead_letter_record(
    message: SourceMessage,
    err: InvalidEvent,
    failed_at: datetime,
    *,
    limit_bytes: int,
    keep_dir: Path | None = None,
    minimal: bool = False,
) -> DeadLetterRecord:
    """The (key, value, headers) to publish for ``message``, dead-lettered for ``err``.

    The original when the record fits ``limit_bytes`` (and not ``minimal``); else truncated,
    with the headers ``dlq.truncated=true``, ``dlq.original.size``, ``dlq.original.sha256``,
    ``dlq.original.key.size`` (when the key was cut) and ``dlq.original.stored`` (the file
    under ``keep_dir`` holding the original value, when it could be written)."""
    key, value = message.key, message.value or b""
    headers = dead_letter_headers(
        err.reason, err.detail, message.topic, message.partition, message.offset, failed_at,
        err.exception,
    )  # fmt: skip
    if not minimal and record_size(key, value, headers) <= limit_bytes:
        return DeadLetterRecord(key, value, headers)

    digest = hashlib.sha256(value).hexdigest()
    extra = [
        ("dlq.truncated", b"true"),
        ("dlq.original.size", str(len(value)).encode()),
        ("dlq.original.sha256", digest.encode()),
    ]
    if key is not None and len(key) > KEY_BYTES:
        extra.append(("dlq.original.key.size", str(len(key)).encode()))
        key = key[:KEY_BYTES]
    stored = keep_original(keep_dir, value, digest) if keep_dir is not None else None
    if stored is not None:
        extra.append(("dlq.original.stored", str(stored).encode()))
    elif keep_dir is not None:
        extra.append(("dlq.original.stored", b""))  # asked for, but could not be written
    headers = headers + extra
    if minimal:
        stub = {"dlq_truncated": True, "original_size": len(value), "original_sha256": digest}
        body = json.dumps(stub, separators=(",", ":")).encode()
    else:
        room = limit_bytes - record_size(key, b"", headers)
        body = value[: max(0, min(PREVIEW_BYTES, room))]
    log.warning(
        "dead letter truncated: topic=%s partition=%d offset=%d size=%d sha256=%s stored=%s",
        message.topic, message.partition, message.offset, len(value), digest, stored or "-",
    )  # fmt: skip
    return DeadLetterRecord(key, body, headers, truncated=True, stored=stored)


class DeadLetterSender:
    """Sends a batch's dead letters as records that fit, and recovers from a broker's refusal.

    In the processor's publish stage::

        self.dead_letters.send(outcome.dead_letters, failed_at)
        ...  # the assignment events
        try:
            self.publisher.flush_confirmed(timeout=30.0)
        except MessageRejected as err:
            if not self.dead_letters.resend_minimal(err, outcome.dead_letters, failed_at):
                raise  # a PublishError: the batch is retried
            self.publisher.flush_confirmed(timeout=30.0)
    """

    def __init__(self, publisher: KafkaPublisher, settings: Settings) -> None:
        self.publisher = publisher
        self.topic = settings.topic_dead_letters
        self.limit_bytes = dead_letter_limit(settings)
        self.keep_dir = settings.dead_letter_dir

    def send(
        self, dead_letters: Sequence[tuple[SourceMessage, InvalidEvent]], failed_at: datetime
    ) -> None:
        """Queue each dead letter (tagged with its source message); the caller flushes."""
        for message, err in dead_letters:
            record = dead_letter_record(
                message, err, failed_at, limit_bytes=self.limit_bytes, keep_dir=self.keep_dir
            )
            self.publisher.send(self.topic, record.key, record.value, record.headers, tag=message)

    def resend_minimal(
        self,
        rejected: MessageRejected,
        dead_letters: Sequence[tuple[SourceMessage, InvalidEvent]],
        failed_at: datetime,
    ) -> bool:
        """After ``flush_confirmed`` raised ``rejected``: when the only failures were refusals
        of these dead letters, queue their minimal stubs and return True (the caller flushes
        again; everything else was acknowledged). Else False: something else failed too (an
        outage, an assignment event refused), and the caller retries the batch as usual (a
        retry converges: once the outage is over, only the refusals are left)."""
        errors = {message: err for message, err in dead_letters}
        refused = [r.tag for r in rejected.rejected if r.topic == self.topic and r.tag in errors]
        if len(refused) != len(rejected.rejected) or rejected.unconfirmed != len(refused):
            return False
        for message in refused:
            stub = dead_letter_record(
                message, errors[message], failed_at, limit_bytes=self.limit_bytes,  # type: ignore[index]
                keep_dir=self.keep_dir, minimal=True,
            )  # fmt: skip
            self.publisher.send(self.topic, stub.key, stub.value, stub.headers, tag=message)
        return True


def keep_original(folder: Path, value: bytes, digest: str) -> Path | None:
    """Write ``value`` atomically to ``<folder>/<digest>.bin`` (kept if it is there already:
    the name is its content); None, logged, when it cannot be written: a full disk must not
    stall the stream, the dead letter goes out without it."""
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError("digest must be a sha256 in hex")  # the name must stay in the folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
        target = folder.resolve() / f"{digest}.bin"
        if target.is_file() and target.stat().st_size == len(value):
            return target
        with atomic_write(target) as out:
            out.write(value)
        return target
    except OSError as err:
        log.error("dead letter: cannot keep the original in %s: %s", folder, err)
        return None
