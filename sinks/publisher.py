"""Kafka producer for assignment events and dead letters, with confirmed delivery.

The stream commits its input offsets only after ``flush_confirmed`` returns, so an event
that the broker did not acknowledge makes the batch fail and be redelivered, never lost.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

log = logging.getLogger(__name__)

# Enforced: without them a retried send may duplicate or reorder events, or be acknowledged
# before it is replicated.
_ENFORCED = {"enable.idempotence": True, "acks": "all"}
_EQUIVALENT = {"enable.idempotence": {"true"}, "acks": {"all", "-1"}}
_DEFAULTS = {"linger.ms": 5}
BUFFER_FULL_WAIT_S = 30.0
ERROR_LOG_INTERVAL_S = 30.0
# Errors that refuse one message for what it is (too large for the producer's
# message.max.bytes or the topic's max.message.bytes, or malformed): sending it again fails
# again, so they are never retried as they are (MessageRejected).
PERMANENT_CODES = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError.INVALID_MSG_SIZE,
    }
)


class PublishError(RuntimeError):
    """Some events sent since the last ``flush_confirmed`` were not acknowledged by the broker."""


@dataclass(frozen=True)
class Rejection:
    """One message refused for good: its topic, the ``tag`` given to ``send``, the error."""

    topic: str
    tag: object
    code: int
    error: str


class MessageRejected(PublishError):
    """Some messages sent since the last ``flush_confirmed`` were refused for what they are
    (``rejected``; see PERMANENT_CODES). Sending them again as they are fails again: the
    caller sends something smaller instead (a truncated dead letter) or gives up on them.
    Other messages of the generation may have failed too (``unconfirmed`` counts all)."""

    def __init__(self, rejected: list[Rejection], unconfirmed: int, sent: int) -> None:
        first = rejected[0]
        super().__init__(
            f"publisher: {len(rejected)} message(s) rejected ({unconfirmed} of {sent} not "
            f"acknowledged); first: {first.topic}: {first.error}"
        )
        self.rejected = rejected
        self.unconfirmed = unconfirmed


@dataclass
class _Outstanding:
    """Deliveries of one generation (the messages sent since the last flush_confirmed)."""

    sent: int = 0
    acked: int = 0
    failed: int = 0
    first_error: str | None = None
    rejected: list[Rejection] = field(default_factory=list)


class KafkaPublisher:
    """Sends events and confirms them in bulk; ``start()`` before use, ``stop()`` after."""

    def __init__(self, config: dict[str, Any]) -> None:
        overridden = {
            k: config[k]
            for k in _ENFORCED
            if k in config and str(config[k]).lower() not in _EQUIVALENT[k]
        }
        if overridden:
            log.warning(
                "publisher: ignoring %s; idempotent acks=all delivery is required", overridden
            )
        self._config = {**_DEFAULTS, **config, **_ENFORCED}
        self._producer: Producer | None = None
        self._lock = threading.Lock()  # delivery callbacks run in poll()/flush() callers
        self._current = _Outstanding()
        self._fatal: str | None = None
        # error code -> (when last logged, how many suppressed since)
        self._error_log: dict[int, tuple[float, int]] = {}

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self._producer = self._new_producer()
        log.info(
            "publisher: started bootstrap=%s linger_ms=%s",
            self._config.get("bootstrap.servers"), self._config.get("linger.ms"),
        )  # fmt: skip

    def stop(self, timeout: float = 10.0) -> None:
        producer, self._producer = self._producer, None
        if producer is None:
            return
        remaining = producer.flush(timeout)
        if remaining:
            log.warning("publisher: stopped with %d undelivered message(s)", remaining)
        else:
            log.info("publisher: stopped")

    # -- sending --------------------------------------------------------------------------
    def send(
        self,
        topic: str,
        key: bytes | str | None,
        value: bytes,
        headers: list[tuple[str, bytes]] | None = None,
        *,
        tag: object = None,
    ) -> None:
        """Queue one event; its delivery is checked by the next ``flush_confirmed``. ``tag``
        names it in a MessageRejected (e.g. the source message of a dead letter)."""
        producer = self._ready()
        with self._lock:
            generation = self._current
            generation.sent += 1

        def delivered(err: KafkaError | None, _msg: Message) -> None:
            self._on_delivery(generation, topic, err, tag)

        deadline = time.monotonic() + BUFFER_FULL_WAIT_S
        while True:
            try:
                producer.produce(
                    topic, value=value, key=key, headers=headers, on_delivery=delivered
                )
                break
            except KafkaException as err:
                # librdkafka checks message.max.bytes in produce() itself, before any broker
                # sees the message: the same refusal as the broker's, reported the same way.
                if err.args[0].code() not in PERMANENT_CODES:
                    raise
                self._on_delivery(generation, topic, err.args[0], tag)
                return
            except BufferError:
                # The local queue is full: serve delivery reports to make room, then retry.
                if time.monotonic() > deadline:
                    self._on_delivery(generation, topic, "local queue full")
                    raise PublishError(
                        f"publisher: local queue still full after {BUFFER_FULL_WAIT_S:.0f}s"
                    ) from None
                producer.poll(0.1)
        producer.poll(0)

    def flush_confirmed(self, timeout: float) -> None:
        """Wait for every event sent since the last call; raise PublishError unless all were acked.

        Either way the next call starts a new count: late reports of this generation are
        ignored, and a failed batch is resent whole by the caller.
        """
        producer = self._ready()
        remaining = producer.flush(timeout)
        with self._lock:
            generation, self._current = self._current, _Outstanding()
            sent, acked, failed, first = (
                generation.sent, generation.acked, generation.failed, generation.first_error,
            )  # fmt: skip
        unconfirmed = sent - acked
        if unconfirmed == 0:
            return
        log.error(
            "publisher: unconfirmed=%d of sent=%d failed=%d rejected=%d in_flight=%d "
            "first_error=%s", unconfirmed, sent, failed, len(generation.rejected), remaining,
            first,
        )  # fmt: skip
        if generation.rejected:
            raise MessageRejected(generation.rejected, unconfirmed, sent)
        raise PublishError(
            f"publisher: {unconfirmed} of {sent} message(s) not acknowledged "
            f"({failed} failed, {remaining} still in flight after {timeout:.1f}s); "
            f"first error: {first or 'timed out'}"
        )

    # -- internals ------------------------------------------------------------------------
    def _new_producer(self) -> Producer:
        return Producer({**self._config, "error_cb": self._on_error})

    def _ready(self) -> Producer:
        if self._producer is None:
            raise RuntimeError("KafkaPublisher: call start() first")
        if self._fatal is not None:
            # A fatal error (e.g. the idempotent producer lost its sequence) disables the
            # producer for good; the failed batch is retried by the caller on a fresh one.
            log.warning("publisher: replacing the producer after a fatal error: %s", self._fatal)
            self._fatal = None
            self._producer.flush(0)
            self._producer = self._new_producer()
        return self._producer

    def _on_delivery(
        self,
        generation: _Outstanding,
        topic: str,
        err: KafkaError | str | None,
        tag: object = None,
    ) -> None:
        with self._lock:
            if err is None:
                generation.acked += 1
                return
            generation.failed += 1
            if isinstance(err, KafkaError) and err.code() in PERMANENT_CODES:
                generation.rejected.append(Rejection(topic, tag, err.code(), err.str()))
            if generation.first_error is None:
                generation.first_error = f"{topic}: {err}"
            first = generation.failed == 1
        if first:  # one line per generation: an outage must not flood the log
            log.warning("publisher: delivery failed topic=%s error=%s", topic, err)

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._fatal = str(err)
            log.error("publisher: fatal producer error: %s", err)
            return
        # librdkafka reports every reconnect attempt; during an outage one line per error
        # code every ERROR_LOG_INTERVAL_S is enough.
        now = time.monotonic()
        code = err.code()
        last, suppressed = self._error_log.get(code, (-math.inf, 0))
        if now - last < ERROR_LOG_INTERVAL_S:
            self._error_log[code] = (last, suppressed + 1)
            return
        self._error_log[code] = (now, 0)
        log.warning("publisher: producer error: %s (similar suppressed=%d)", err.str(), suppressed)
