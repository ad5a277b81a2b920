"""Commit bookkeeping of the confluent-kafka runner, over a fake client (pure logic)."""

from __future__ import annotations

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from sinks.metrics import StreamMetrics
from streams.consumer import StreamConsumer
from streams.processor import SourceMessage
from streams.settings import Settings


class CommitRecorder:
    """assignment() and commit(); commit raises while ``failures`` is above zero."""

    def __init__(self, owned: set[int]) -> None:
        self.owned = owned
        self.failures = 0
        self.commits: list[dict[int, int]] = []

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition("det", p) for p in sorted(self.owned)]

    def commit(self, offsets, asynchronous=True):
        if self.failures:
            self.failures -= 1
            raise KafkaException(KafkaError(KafkaError.ILLEGAL_GENERATION))
        self.commits.append({tp.partition: tp.offset for tp in offsets})


def batch(*pairs: tuple[int, int]) -> list[SourceMessage]:
    return [SourceMessage("det", p, o, None, b"{}", None) for p, o in pairs]


def runner(client: CommitRecorder) -> StreamConsumer:
    consumer = StreamConsumer(Settings(), processor=None, metrics=StreamMetrics())  # type: ignore[arg-type]
    consumer._consumer = client  # type: ignore[assignment]
    return consumer


def test_commit_after_a_failed_commit_includes_the_earlier_offsets() -> None:
    client = CommitRecorder(owned={0, 1})
    consumer = runner(client)
    client.failures = 1
    consumer._commit(batch((0, 5), (0, 9), (1, 3)))
    assert client.commits == []
    # The partition's last batch: nothing new arrives, the empty pass commits what is owed.
    consumer._commit(())
    assert client.commits == [{0: 10, 1: 4}]
    consumer._commit(())
    assert len(client.commits) == 1  # nothing owed any more


def test_offsets_of_partitions_no_longer_owned_are_dropped() -> None:
    client = CommitRecorder(owned={0, 1})
    consumer = runner(client)
    client.failures = 1
    consumer._commit(batch((0, 5), (1, 3)))
    client.owned = {1}
    consumer._commit(batch((1, 7)))
    assert client.commits == [{1: 8}]


def test_revocation_forgets_owed_offsets() -> None:
    client = CommitRecorder(owned={0})
    consumer = runner(client)
    client.failures = 1
    consumer._commit(batch((0, 5)))
    consumer._on_revoke(client, [TopicPartition("det", 0)])  # type: ignore[arg-type]
    consumer._commit(())
    assert client.commits == []
