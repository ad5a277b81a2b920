"""The adaptive batch window (pure logic), and the confluent runner's window over a fake client."""

from __future__ import annotations

import pytest

from sinks.metrics import StreamMetrics
from streams.runners.confluent import StreamConsumer
from streams.runners.window import WindowPolicy
from streams.settings import Settings


def policy(**kw) -> WindowPolicy:
    return WindowPolicy(**{"max_size": 32, "max_wait_s": 0.2, "min_wait_s": 0.0, **kw})


def test_idle_model_flushes_a_partial_batch_once_nothing_more_is_buffered() -> None:
    p = policy()
    assert p.next_wait(count=1, waited_s=0.0, more_buffered=False, model_idle=True) is None
    # Something still buffered: read it first, without waiting.
    assert p.next_wait(count=1, waited_s=0.0, more_buffered=True, model_idle=True) == 0.0


def test_minimum_wait_holds_a_partial_batch_that_long() -> None:
    p = policy(min_wait_s=0.02)
    wait = p.next_wait(count=1, waited_s=0.005, more_buffered=False, model_idle=True)
    assert wait == pytest.approx(0.015)
    assert p.next_wait(count=1, waited_s=0.021, more_buffered=False, model_idle=True) is None


def test_busy_model_keeps_gathering_until_it_is_idle_full_or_out_of_time() -> None:
    p = policy()
    wait = p.next_wait(count=3, waited_s=0.01, more_buffered=False, model_idle=False)
    assert wait is not None and 0 < wait <= p.busy_poll_s
    # Close to max_wait: never waits past it.
    wait = p.next_wait(count=3, waited_s=0.199, more_buffered=False, model_idle=False)
    assert wait == pytest.approx(0.001)
    assert p.next_wait(count=3, waited_s=0.2, more_buffered=False, model_idle=False) is None
    assert p.next_wait(count=32, waited_s=0.0, more_buffered=True, model_idle=False) is None
    assert p.next_wait(count=3, waited_s=0.02, more_buffered=False, model_idle=True) is None


def test_empty_window_waits_for_the_first_event_then_gives_up() -> None:
    p = policy()
    assert p.next_wait(count=0, waited_s=0.05, more_buffered=False, model_idle=True) == (
        pytest.approx(0.15)
    )
    assert p.next_wait(count=0, waited_s=0.2, more_buffered=False, model_idle=True) is None


def test_min_wait_equal_to_max_wait_is_the_fixed_window() -> None:
    p = policy(min_wait_s=0.2)
    for waited in (0.0, 0.1, 0.19):
        wait = p.next_wait(count=1, waited_s=waited, more_buffered=False, model_idle=True)
        assert wait == pytest.approx(0.2 - waited)
    assert p.next_wait(count=1, waited_s=0.2, more_buffered=False, model_idle=True) is None


def test_policy_is_validated_and_read_from_the_settings() -> None:
    with pytest.raises(ValueError, match="min_wait"):
        WindowPolicy(max_size=8, max_wait_s=0.1, min_wait_s=0.2)
    with pytest.raises(ValueError, match="max_size"):
        WindowPolicy(max_size=0, max_wait_s=0.1)
    p = WindowPolicy.from_settings(
        Settings(batch_max_size=16, batch_max_wait_ms=300, batch_min_wait_ms=7)
    )
    assert (p.max_size, p.max_wait_s, p.min_wait_s) == (16, 0.3, 0.007)
    with pytest.raises(ValueError, match="batch_min_wait_ms"):
        Settings(batch_max_wait_ms=100, batch_min_wait_ms=101)


# -- the confluent runner's window over a fake client -------------------------------------
class FakeMessage:
    def __init__(self, offset: int) -> None:
        self._offset = offset

    def error(self):
        return None

    def topic(self) -> str:
        return "det"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes:
        return b"cam"

    def value(self) -> bytes:
        return b"{}"

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_000)


class FakeClient:
    """consume() hands out what is buffered; ``arrivals`` are added at given calls (the n-th
    consume call sees them); every call is recorded with its timeout."""

    def __init__(self, buffered: int, arrivals: dict[int, int] | None = None) -> None:
        self.buffer = [FakeMessage(i) for i in range(buffered)]
        self.next_offset = buffered
        self.arrivals = arrivals or {}
        self.calls: list[tuple[int, float]] = []

    def consume(self, num_messages: int, timeout: float) -> list[FakeMessage]:
        self.calls.append((num_messages, timeout))
        for _ in range(self.arrivals.get(len(self.calls), 0)):
            self.buffer.append(FakeMessage(self.next_offset))
            self.next_offset += 1
        out, self.buffer = self.buffer[:num_messages], self.buffer[num_messages:]
        return out


class FakePipeline:
    """The model is busy until the client has been called ``busy_until`` times."""

    def __init__(self, client: FakeClient, busy_until: int) -> None:
        self.client = client
        self.busy_until = busy_until

    in_flight = 0

    @property
    def model_idle(self) -> bool:
        return len(self.client.calls) >= self.busy_until

    def take_completed(self) -> list:
        return []


def window_of(client: FakeClient, *, busy_until: int = 0, **settings) -> list[int]:
    s = Settings(batch_max_size=8, batch_max_wait_ms=5_000, **settings)
    consumer = StreamConsumer(s, processor=None, metrics=StreamMetrics())  # type: ignore[arg-type]
    consumer._consumer = client  # type: ignore[assignment]
    consumer.pipeline = FakePipeline(client, busy_until)  # type: ignore[assignment]
    return [m.offset for m in consumer._window()]


def test_a_lone_event_leaves_at_once_when_the_model_is_idle() -> None:
    client = FakeClient(buffered=1)
    assert window_of(client) == [0]
    # One call that returns at the first event, one that finds nothing more: no 5 s wait.
    assert [n for n, _ in client.calls] == [1, 7]
    assert client.calls[0][1] <= 0.2 and client.calls[1][1] == 0.0


def test_an_empty_window_returns_to_the_loop_soon() -> None:
    client = FakeClient(buffered=0)
    assert window_of(client) == []
    assert len(client.calls) == 1 and client.calls[0][1] <= 0.2  # not the 5 s window


def test_a_backlog_fills_the_batch() -> None:
    client = FakeClient(buffered=20)
    assert window_of(client) == list(range(8))
    assert [n for n, _ in client.calls] == [1, 7]


def test_while_the_model_is_busy_the_batch_gathers_what_arrives() -> None:
    # Busy until the 5th call; two events arrive on the 3rd and one on the 4th consume call.
    client = FakeClient(buffered=1, arrivals={3: 2, 4: 1})
    assert window_of(client, busy_until=5) == [0, 1, 2, 3]
    assert len(client.calls) == 5
    timeouts = [t for _, t in client.calls[2:]]
    assert all(t <= 0.005 for t in timeouts), timeouts  # short looks, never the 5 s window


def test_fixed_window_when_min_wait_is_max_wait() -> None:
    client = FakeClient(buffered=1)
    assert window_of(client, batch_min_wait_ms=5_000) == [0]
    # After the first event and the empty drain, it waits (almost) the whole window.
    assert client.calls[2][1] > 4.9
