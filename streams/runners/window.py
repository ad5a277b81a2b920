"""When to close a batch: the adaptive window both runners use (pure logic, no Kafka).

A fixed window (wait ``max_wait`` unless ``max_size`` events came first) makes a lone event
wait the whole window under light traffic: at half load most of the latency was the window
waiting for events that were not coming. The adaptive window closes a batch as soon as
waiting cannot make it better:

- **full**: ``max_size`` events: flush (a backlog still makes full batches);
- **more is buffered**: take it first, without waiting (the client already has it);
- **the model is idle**: flush once nothing more is buffered and the first event has waited
  ``min_wait`` (0 = at once). Holding events while the model has nothing to do is pure delay;
- **the model is busy** (a batch waits for it or is in it): keep gathering, checking every few
  milliseconds whether it became idle, so the batch that follows is as large as the backlog
  that built up meanwhile. A bigger batch costs the model nothing extra on a GPU (and no
  more per image on a CPU), and an earlier flush would only queue behind the busy model;
- **``max_wait`` since the first event**: flush whatever there is, busy or not.

With ``min_wait == max_wait`` the policy is the fixed window again (a partial batch waits
``max_wait``). The model's padded batch-size ladder (``reid.embedder``) applies to whatever
size the window closes at.
"""

from __future__ import annotations

from dataclasses import dataclass

# While the model is busy, the runner looks this often whether it became idle.
BUSY_POLL_S = 0.005


@dataclass(frozen=True)
class WindowPolicy:
    max_size: int
    max_wait_s: float
    min_wait_s: float = 0.0
    busy_poll_s: float = BUSY_POLL_S

    def __post_init__(self) -> None:
        if self.max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {self.max_size}")
        if not 0 <= self.min_wait_s <= self.max_wait_s:
            raise ValueError(
                f"need 0 <= min_wait ({self.min_wait_s}) <= max_wait ({self.max_wait_s})"
            )

    @classmethod
    def from_settings(cls, settings: object) -> WindowPolicy:
        """From ``REID_BATCH_MAX_SIZE``, ``REID_BATCH_MAX_WAIT_MS``, ``REID_BATCH_MIN_WAIT_MS``."""
        return cls(
            max_size=settings.batch_max_size,  # type: ignore[attr-defined]
            max_wait_s=settings.batch_max_wait_ms / 1000,  # type: ignore[attr-defined]
            min_wait_s=settings.batch_min_wait_ms / 1000,  # type: ignore[attr-defined]
        )

    def next_wait(
        self, *, count: int, waited_s: float, more_buffered: bool, model_idle: bool
    ) -> float | None:
        """None: close the window now. Else how long (seconds, >= 0) to wait for more events
        before asking again.

        ``count``: events in the window; ``waited_s``: since the first of them (since the
        window opened while it is empty); ``more_buffered``: the last read may have left
        events in the client's buffer (it filled what it asked for); ``model_idle``: no
        batch is waiting for the model or in it.
        With ``count == 0`` a None means "give up for now, empty" (the runner's loop then does
        its housekeeping: commits, lag, version switches) and a wait means "until the first
        event", which the runner should return from as soon as one arrives.
        """
        remaining = self.max_wait_s - waited_s
        if count >= self.max_size or remaining <= 0:
            return None
        if count == 0:
            return remaining
        if more_buffered:
            return 0.0
        if model_idle:
            left = self.min_wait_s - waited_s
            return None if left <= 0 else left
        return min(self.busy_poll_s, remaining)
