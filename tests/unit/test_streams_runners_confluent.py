"""Commit bookkeeping of the confluent-kafka runner, over a fake client (pure logic)."""

from __future__ import annotations

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from sinks.metrics import StreamMetrics
from streams.batch import SourceMessage
from streams.runners.confluent import StreamConsumer
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


class RewindRecorder(CommitRecorder):
    """Also pause/resume/poll/seek, as the consumer uses them while it serves the group."""

    def __init__(self, owned: set[int]) -> None:
        super().__init__(owned)
        self.seeks: list[tuple[int, int]] = []

    def pause(self, partitions) -> None:
        pass

    def resume(self, partitions) -> None:
        pass

    def poll(self, timeout):
        return None

    def seek(self, tp) -> None:
        self.seeks.append((tp.partition, tp.offset))


def test_an_abandoned_batch_rewinds_owned_partitions_and_commits_only_what_came_before() -> None:
    from streams.batch import BatchOutcome
    from streams.runners.pipeline import Completed

    client = RewindRecorder(owned={0, 1})
    consumer = runner(client)
    pipeline = consumer.pipeline
    written = Completed(batch((0, 1), (1, 1)), BatchOutcome(batch_id=1, messages=2))
    # Batch 2 was abandoned (partition 2 revoked during an outage); batch 3 behind it too.
    pipeline._done.extend(
        [written, Completed(batch((0, 2), (2, 7)), None), Completed(batch((0, 3), (1, 2)), None)]
    )
    pipeline.halt()
    consumer._settle()
    assert client.commits == [{0: 2, 1: 2}]
    consumer._recover()
    # Partition 2 is not ours any more: its new owner starts from the committed offset.
    assert sorted(client.seeks) == [(0, 2), (1, 2)]
    assert not pipeline.halted and pipeline.has_room()
    assert client.commits == [{0: 2, 1: 2}]
