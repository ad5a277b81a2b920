"""Finding the event that makes a batch fail, so that it alone is dead-lettered.

A batch whose ``finish`` raises something other than a dependency failure is split into
*units* (every occurrence of one detection_id together, since repeats share the fate of their
first; each unparsable message alone) and bisected: each half is finished on its own, a half
that fails is split again, and a single unit that still fails is an ``unprocessable`` dead
letter. k bad events among n cost about k * log2(n) extra attempts; the good ones are written.

The bookkeeping lives on the batch (``settled``, ``partial``), so that a dependency failure
in the middle (the runner then retries ``finish`` with the same batch) neither writes nor
dead-letters a unit twice: settled units are skipped, and their outcome is kept.
"""

from __future__ import annotations

from collections.abc import Sequence

from streams.batch import BatchOutcome, PreparedBatch, SourceMessage
from streams.events import InvalidEvent

Unit = tuple[SourceMessage, ...]


def _key(message: SourceMessage) -> tuple[str, int, int]:
    return (message.topic, message.partition, message.offset)


def pending(batch: PreparedBatch, units: Sequence[Unit]) -> list[Unit]:
    """The units not settled yet (a retried ``finish`` skips the others)."""
    return [u for u in units if _key(u[0]) not in batch.settled]


def settle(batch: PreparedBatch, units: Sequence[Unit], part: BatchOutcome) -> None:
    """``units`` are written or dead-lettered, with outcome ``part``."""
    if batch.partial is None:
        batch.partial = BatchOutcome(batch.batch_id, messages=len(batch.messages))
    batch.settled.update(_key(m) for u in units for m in u)
    merge(batch.partial, part)


def units_of(batch: PreparedBatch) -> list[Unit]:
    """The batch's messages grouped into units, in the order of their first message."""
    by_id: dict[str, list[SourceMessage]] = {}
    for item in [*batch.firsts, *batch.repeats]:
        by_id.setdefault(item.event.detection_id, []).append(item.message)
    unit_of = {_key(m): tuple(ms) for ms in by_id.values() for m in ms}
    units: list[Unit] = []
    seen: set[tuple[str, int, int]] = set()
    for message in batch.messages:
        key = _key(message)
        if key in seen:
            continue
        unit = unit_of.get(key, (message,))
        seen.update(_key(m) for m in unit)
        units.append(unit)
    return units


def part_of(batch: PreparedBatch, units: Sequence[Unit]) -> PreparedBatch:
    """The sub-batch of ``units``: same embedder and embeddings (rows index into them)."""
    keys = {_key(m) for u in units for m in u}
    return PreparedBatch(
        batch_id=batch.batch_id,
        messages=[m for m in batch.messages if _key(m) in keys],
        invalid=[(m, err) for m, err in batch.invalid if _key(m) in keys],
        firsts=[p for p in batch.firsts if _key(p.message) in keys],
        repeats=[p for p in batch.repeats if _key(p.message) in keys],
        undecodable=batch.undecodable,
        embedder=batch.embedder,
        vectors=batch.vectors,
    )


def dead_part(batch: PreparedBatch, unit: Unit, err: BaseException) -> PreparedBatch:
    """A sub-batch in which every message of ``unit`` is an ``unprocessable`` dead letter."""
    reason = InvalidEvent.unprocessable(err)
    return PreparedBatch(batch.batch_id, list(unit), [(m, reason) for m in unit], [], [], {},
                         embedder=batch.embedder)  # fmt: skip


def merge(into: BatchOutcome, part: BatchOutcome) -> None:
    into.assigned_existing += part.assigned_existing
    into.new_deer += part.new_deer
    into.redelivered += part.redelivered
    into.dead_letters += part.dead_letters
