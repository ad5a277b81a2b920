"""The Faust runner's batches, closed by the adaptive window (``streams.runners.window``).

``Stream.noack_take(max, within)`` flushes on a fixed timer: a lone event waits for the next
tick of ``within``. ``adaptive_take`` is the same mechanism (a stream processor fills a
buffer with the events, unacked; the agent's loop takes batches out of it) with the window
policy deciding when a batch is closed. The Faust runner handles one batch at a time, so the
model is idle whenever this generator runs; events that arrive while a batch is processed
wait in the buffer and leave together in the next batch. "Nothing more buffered" is the
stream channel's queue being empty.

Like ``noack_take`` this disables the stream's automatic acks while it runs: the runner acks
each event after its batch was written (see ``streams.runners.faust``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from streams.runners.window import WindowPolicy

# The shortest wait for the next event while more are queued: lets the stream's drainer run.
_YIELD_S = 0.001


async def adaptive_take(
    stream: Any, policy: WindowPolicy, *, clock: Callable[[], float] = time.monotonic
) -> AsyncIterator[list[Any]]:
    """Yield lists of at most ``policy.max_size`` unacked events of ``stream`` (a Faust
    ``StreamT``), each closed as ``policy`` decides."""
    buffer: list[Any] = []
    first_at = [0.0]  # when the buffer's first event came
    added = asyncio.Event()
    room = asyncio.Event()
    room.set()
    channel_it = aiter(stream.channel)

    async def add_to_buffer(value: Any) -> Any:
        try:
            # Strict: never more than max_size in a batch; the drainer waits for room.
            while len(buffer) >= policy.max_size:
                room.clear()
                if (await stream.wait(room)).stopped:
                    return value  # stopping: the event stays unacked, so redelivered
            event = stream.current_event
            if event is None:
                raise RuntimeError("adaptive_take: a value without its event")
            if not buffer:
                first_at[0] = clock()
            buffer.append(event)
            added.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # as noack_take: the stream crashes, the runner stops
            stream.log.exception("adaptive_take: cannot buffer an event: %r", exc)
            await stream.crash(exc)
        return value

    acks = stream.enable_acks
    stream.enable_acks = False  # the runner acks each event after its batch was written
    stream.add_processor(add_to_buffer)
    stream._enable_passive(channel_it)  # as noack_take: the stream is drained in the background
    try:
        opened = clock()
        while not stream.should_stop:
            since = first_at[0] if buffer else opened
            wait = policy.next_wait(
                count=len(buffer), waited_s=clock() - since,
                more_buffered=_queued(stream.channel) > 0, model_idle=True,
            )  # fmt: skip
            if wait is None:
                if buffer:
                    batch = buffer.copy()
                    buffer.clear()
                    room.set()
                    yield batch
                opened = clock()
                continue
            added.clear()
            await stream.wait_for_stopped(added, timeout=max(wait, _YIELD_S))
    finally:
        stream.enable_acks = acks
        stream._processors.remove(add_to_buffer)


def _queued(channel: Any) -> int:
    """Events the channel holds that the stream has not read yet (0 when it cannot tell): the
    queue the stream's iterator reads (``Stream._py_aiter`` takes ``self.channel.queue``)."""
    queue = getattr(channel, "_queue", None)
    return queue.qsize() if queue is not None else 0
