"""What drives batches from Kafka: two peer runners behind one small protocol.

``confluent`` (the default) windows with confluent-kafka and runs the batches through a
three-stage pipeline; ``faust`` lets a faust-streaming agent window and runs one batch at a
time. Both hand batches to the same :class:`~streams.processor.BatchProcessor`, retry with
the same policy (``retry``), and commit offsets only after a batch was written.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from sinks.metrics import StreamMetrics
from streams.batch import BatchOutcome
from streams.processor import BatchProcessor
from streams.settings import Settings

RUNNERS = ("confluent", "faust")


class Runner(Protocol):
    """What the app needs of a runner."""

    @property
    def stopping(self) -> bool:
        """A stop was requested; the runner is finishing the batches in hand."""
        ...

    @property
    def batches_submitted(self) -> int:
        """Batches handed to the processor so far."""
        ...

    @property
    def batches_completed(self) -> int:
        """Of those, the batches that left it (written and committed, or given up)."""
        ...

    def start(self) -> None: ...

    def run(
        self,
        on_batch: Callable[[BatchOutcome], None] | None = None,
        *,
        between_batches: Callable[[], object] | None = None,
    ) -> None:
        """Consume until :meth:`request_stop`; ``between_batches`` runs in the thread that
        hands batches to the processor, between two batches and while idle."""
        ...

    def request_stop(self) -> None:
        """Finish the batches in hand, commit them, then leave ``run`` (signal-safe)."""
        ...

    def stop(self) -> None: ...


def build_runner(
    name: str, settings: Settings, processor: BatchProcessor, metrics: StreamMetrics
) -> Runner:
    """The runner called ``name`` (one of ``RUNNERS``); faust needs the `faust` extra."""
    if name == "confluent":
        from streams.runners.confluent import StreamConsumer

        return StreamConsumer(settings, processor, metrics)
    if name == "faust":
        from streams.runners.faust import FaustRunner

        return FaustRunner(settings, processor, metrics)
    raise ValueError(f"unknown runner {name!r} ({' or '.join(RUNNERS)})")
