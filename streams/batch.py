"""What a batch is, between the runner that windows it and the processor's stages: the
source messages, the events on their way through, and what the batch did."""

from __future__ import annotations

import functools
import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from reid.embedder import Embedder, Embeddings
from streams.events import DetectionEvent, InvalidEvent


@dataclass(frozen=True)
class SourceMessage:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None = None


@dataclass
class BatchOutcome:
    """What one batch did; the runner commits ``messages`` afterwards."""

    batch_id: int
    messages: int = 0
    assigned_existing: int = 0
    new_deer: int = 0
    redelivered: int = 0
    dead_letters: list[tuple[SourceMessage, InvalidEvent]] = field(default_factory=list)

    @property
    def dead_lettered(self) -> int:
        return len(self.dead_letters)

    @property
    def dead_letter_reasons(self) -> dict[str, int]:
        return dict(Counter(err.reason for _, err in self.dead_letters))


@dataclass(eq=False)  # compared by identity: it holds tensors
class PendingEvent:
    """A valid event on its way through the batch."""

    message: SourceMessage
    event: DetectionEvent
    pixels: torch.Tensor | None = None
    row: int | None = None  # its row in the batch's embeddings
    thumbnail: bytes | None = None  # JPEG of the crop, stored with the row

    @functools.cached_property
    def digest(self) -> bytes:
        return hashlib.sha256(self.message.value or b"").digest()


@dataclass
class PreparedBatch:
    """A batch between the stages: parsed and decoded by ``prepare``, embedded by ``embed``,
    written and published by ``finish``. Nothing in it is stored until ``finish``."""

    batch_id: int
    messages: Sequence[SourceMessage]
    invalid: list[tuple[SourceMessage, InvalidEvent]]  # failed parsing
    firsts: list[PendingEvent]  # first occurrence of each detection_id, in batch order
    repeats: list[PendingEvent]  # later occurrences in the same batch
    undecodable: dict[str, InvalidEvent]  # detection_id -> why its image failed
    embedder: Embedder | None = None  # the one that embeds it (its version is the batch's)
    pixels: torch.Tensor | None = None  # uint8 [n, 3, H, W] of the decoded firsts, by row
    vectors: Embeddings | None = None
    # Set by finish when it bisects the batch (streams.poison): what is already written or
    # dead-lettered, by (topic, partition, offset), and what that did.
    settled: set[tuple[str, int, int]] = field(default_factory=set)
    partial: BatchOutcome | None = None
    # An image could not be read for a reason that is not the event's (streams.images):
    # finish prepares the batch again, and retries like an outage while that keeps failing.
    unavailable: Exception | None = None

    @property
    def partitions(self) -> set[tuple[str, int]]:
        return {(m.topic, m.partition) for m in self.messages}
