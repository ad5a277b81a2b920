"""The replay never runs ahead of the live group, even when reading the live group's committed
offsets fails (issue 13, point 3): a failed read keeps the last known caps instead of
releasing the hold."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from sinks.metrics import ReplayMetrics
from streams.replay import Replayer
from streams.replay_batch import ReplayStats

TOPIC = "detections"


class FakeLive:
    """The live group's view: each ``committed`` call takes the next scripted answer (an
    exception is raised); the last answer repeats."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.calls = 0

    def committed(self, partitions: list[TopicPartition], timeout: float) -> list[Any]:
        answer = self.answers[min(self.calls, len(self.answers) - 1)]
        self.calls += 1
        if isinstance(answer, Exception):
            raise answer
        return [
            SimpleNamespace(partition=tp.partition, offset=answer.get(tp.partition, -1001),
                            error=None)
            for tp in partitions
        ]  # fmt: skip


def replayer(live: Any, partitions: tuple[int, ...] = (0, 1)) -> Replayer:
    """A Replayer with only what the loop needs (no model, no database)."""
    r = object.__new__(Replayer)
    r.settings = SimpleNamespace(batch_max_size=4, batch_max_wait_ms=1, group_id="g")
    r.metrics = ReplayMetrics()
    r.progress = False
    r.idle_s = 0.0
    r.version, r.group, r.topic = "v2", "g-replay-v2", TOPIC
    r._stop = threading.Event()
    r._live = live
    r._partitions = list(partitions)
    r._caps = None
    r._caps_fresh = True
    r._said_no_commits = False
    return r


def broken() -> KafkaException:
    return KafkaException(KafkaError(KafkaError._TRANSPORT))


def test_a_failed_read_keeps_the_last_known_caps() -> None:
    r = replayer(FakeLive({0: 5, 1: 7}, broken(), {0: 6, 1: 7}))
    assert r._live_caps({0: 0, 1: 0}) == {0: 5, 1: 7}
    assert r._live_caps({0: 5, 1: 7}) == {0: 5, 1: 7}  # was None: the hold was released
    assert r._caps_fresh is False
    assert r._live_caps({0: 5, 1: 7}) == {0: 6, 1: 7}
    assert r._caps_fresh is True


def test_a_failed_first_read_holds_where_the_replay_stands() -> None:
    r = replayer(FakeLive(broken(), {}))
    assert r._live_caps({0: 3, 1: 9}) == {0: 3, 1: 9}
    # The live group has committed nothing yet: still held (a starting consumer stores events
    # before its first commit; this released the hold and the replay skipped them for good).
    assert r._live_caps({0: 3, 1: 9}) == {0: 0, 1: 0}


def test_a_partition_error_is_a_failed_read_and_caps_never_move_back() -> None:
    r = replayer(FakeLive({0: 5, 1: 7}))
    assert r._live_caps({0: 0, 1: 0}) == {0: 5, 1: 7}

    def partly_failed(partitions: list[TopicPartition], timeout: float) -> list[Any]:
        err = KafkaError(KafkaError.COORDINATOR_LOAD_IN_PROGRESS)
        return [SimpleNamespace(partition=0, offset=-1001, error=err),
                SimpleNamespace(partition=1, offset=8, error=None)]  # fmt: skip

    r._live.committed = partly_failed  # type: ignore[method-assign]
    assert r._live_caps({0: 5, 1: 7}) == {0: 5, 1: 7}
    r._live = FakeLive({0: 2, 1: 9})  # offsets moved back (a reset): events below 5 are stored
    assert r._live_caps({0: 5, 1: 7}) == {0: 5, 1: 9}


class FakeConsumer:
    """Partition 0 holds offsets 0-9; every consumed message is delivered at the position."""

    def __init__(self, stop: threading.Event, rounds: int) -> None:
        self.position = {0: 0}
        self.paused: set[int] = set()
        self.committed: dict[int, int] = {}
        self.stop, self.rounds = stop, rounds

    def assign(self, tps: list[TopicPartition]) -> None:
        self.position = {tp.partition: tp.offset for tp in tps}

    def consume(self, num_messages: int, timeout: float) -> list[Any]:
        self.rounds -= 1
        if self.rounds <= 0:
            self.stop.set()
        if 0 in self.paused:
            return []
        start = self.position[0]
        out = [_message(o) for o in range(start, min(start + num_messages, 10))]
        self.position[0] = start + len(out)
        return out

    def seek(self, tp: TopicPartition) -> None:
        self.position[tp.partition] = tp.offset

    def pause(self, tps: list[TopicPartition]) -> None:
        self.paused.update(tp.partition for tp in tps)

    def resume(self, tps: list[TopicPartition]) -> None:
        self.paused.difference_update(tp.partition for tp in tps)

    def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> None:
        self.committed.update({tp.partition: tp.offset for tp in offsets})

    def get_watermark_offsets(self, tp: TopicPartition, **_: Any) -> tuple[int, int]:
        return 0, 10


def _message(offset: int) -> Any:
    return SimpleNamespace(error=lambda: None, partition=lambda: 0, offset=lambda: offset)


def test_the_replay_commits_nothing_past_the_live_group_while_its_offsets_cannot_be_read(
    monkeypatch: Any,
) -> None:
    monkeypatch.setattr("streams.replay.CAP_REFRESH_S", 0.0)  # re-read before every window
    live = FakeLive({0: 3}, broken())  # one good read, then the broker fails for good
    r = replayer(live, partitions=(0,))
    r._consumer = FakeConsumer(r._stop, rounds=20)
    r._batch = lambda batch, stats: None
    marked: list[str] = []
    registry = SimpleNamespace(set_state=lambda version, state: marked.append(state),
                               ensure_indexes=lambda version: None)  # fmt: skip
    r.store = SimpleNamespace(registry=registry)
    stats: ReplayStats = r.run({0: 0}, until_end=True)
    assert live.calls > 2
    assert r._consumer.committed == {0: 3}  # before the fix: 10, past unstored events
    assert not stats.reached_end and marked == []  # an end read from stale caps is no end
