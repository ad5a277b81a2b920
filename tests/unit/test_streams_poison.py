"""The units a batch is bisected into, and the sub-batches made of them (pure logic)."""

from __future__ import annotations

from datetime import UTC, datetime

from streams import poison
from streams.batch import BatchOutcome, PendingEvent, PreparedBatch, SourceMessage
from streams.events import DetectionEvent, InvalidEvent


def message(offset: int) -> SourceMessage:
    return SourceMessage("t", 0, offset, None, b"x%d" % offset)


def pending(offset: int, detection_id: str) -> PendingEvent:
    event = DetectionEvent(detection_id, "cam", datetime.now(UTC), b"img", None, None, None, None)
    return PendingEvent(message(offset), event)


def a_batch() -> PreparedBatch:
    # offsets: 0 a, 1 bad, 2 b, 3 a (repeat), 4 c, 5 bad
    firsts = [pending(0, "a"), pending(2, "b"), pending(4, "c")]
    repeats = [pending(3, "a")]
    bad = InvalidEvent("bad_json", "x")
    return PreparedBatch(
        7, [message(i) for i in range(6)], [(message(1), bad), (message(5), bad)], firsts,
        repeats, {},
    )  # fmt: skip


def offsets(units: list[poison.Unit]) -> list[list[int]]:
    return [[m.offset for m in unit] for unit in units]


def test_units_keep_a_detection_with_its_repeats_and_bad_messages_alone():
    assert offsets(poison.units_of(a_batch())) == [[0, 3], [1], [2], [4], [5]]


def test_a_part_holds_exactly_its_units():
    batch = a_batch()
    units = poison.units_of(batch)
    part = poison.part_of(batch, [units[0], units[4]])
    assert [m.offset for m in part.messages] == [0, 3, 5]
    assert [p.message.offset for p in part.firsts] == [0]
    assert [p.message.offset for p in part.repeats] == [3]
    assert [m.offset for m, _ in part.invalid] == [5]


def test_settled_units_are_skipped_and_their_outcomes_add_up():
    batch = a_batch()
    units = poison.units_of(batch)
    poison.settle(batch, units[:2], BatchOutcome(7, new_deer=1, redelivered=1))
    poison.settle(batch, units[3:4], BatchOutcome(7, assigned_existing=1))
    assert offsets(poison.pending(batch, units)) == [[2], [5]]
    assert batch.partial is not None
    assert (batch.partial.messages, batch.partial.new_deer, batch.partial.assigned_existing,
            batch.partial.redelivered) == (6, 1, 1, 1)  # fmt: skip


def test_a_dead_part_dead_letters_every_message_of_the_unit_with_the_error_type():
    batch = a_batch()
    unit = poison.units_of(batch)[0]
    part = poison.dead_part(batch, unit, KeyError("boom"))
    assert [m.offset for m in part.messages] == [0, 3]
    assert {err.reason for _, err in part.invalid} == {"unprocessable"}
    assert {err.exception for _, err in part.invalid} == {"builtins.KeyError"}
    assert part.firsts == [] and part.repeats == []
