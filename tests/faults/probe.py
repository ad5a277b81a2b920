"""`python -m tests.faults.probe run`: `reid-stream run` (the confluent runner) with its
partition revocations logged as they begin, with the batches then in flight.

The runner logs "consumer: revoked ..." only once the batches in flight have been drained,
so its log cannot tell a revocation that waited for batches from one that moved idle
partitions. This wraps, in the worker process only, the pipeline's submit/take_completed
(to know the partitions of each batch in flight) and the runner's revocation callback (to
log, on entry, how many batches are in flight and how many of them hold a revoked
partition), and slows each batch's finish stage by PROBE_FINISH_DELAY_S (1.2 s) so that batches
are in flight whenever events keep coming; everything else is the real command.
"""

from __future__ import annotations

import logging
import os
import runpy
import threading
import time
from collections import deque

from streams.processor import BatchProcessor
from streams.runners.confluent import StreamConsumer, _names
from streams.runners.pipeline import Pipeline

log = logging.getLogger("probe")
_lock = threading.Lock()
_in_flight: deque[frozenset[tuple[str, int]]] = deque()  # batches in submission order

_submit = Pipeline.submit
_take_completed = Pipeline.take_completed
_on_revoke = StreamConsumer._on_revoke
_finish = BatchProcessor.finish
# Each batch's finish stage takes this much longer than its forward pass, so that batches
# queue before it and the pipeline is full while events keep coming: the consumer thread then
# serves the group (and meets revocations) with batches in flight. With a finish shorter than
# the forward pass, the adaptive window submitted one batch at a time and the revocations,
# served while the next window filled, found none in flight: nothing was tested.
FINISH_DELAY_S = float(os.environ.get("PROBE_FINISH_DELAY_S", "1.2"))


def submit(self, messages):  # type: ignore[no-untyped-def]
    with _lock:
        _in_flight.append(frozenset((m.topic, m.partition) for m in messages))
    return _submit(self, messages)


def take_completed(self):  # type: ignore[no-untyped-def]
    done = _take_completed(self)
    with _lock:
        for _ in done:  # batches leave in the order they entered
            _in_flight.popleft()
    return done


def on_revoke(self, consumer, partitions):  # type: ignore[no-untyped-def]
    revoked = {(p.topic, p.partition) for p in partitions}
    with _lock:
        batches = list(_in_flight)
    holding = sum(1 for parts in batches if parts & revoked)
    log.info("probe: revoking %s with %d batch(es) in flight, %d holding revoked partitions",
             _names(partitions), len(batches), holding)  # fmt: skip
    return _on_revoke(self, consumer, partitions)


def finish(self, batch):  # type: ignore[no-untyped-def]
    time.sleep(FINISH_DELAY_S)
    return _finish(self, batch)


Pipeline.submit = submit  # type: ignore[method-assign]
BatchProcessor.finish = finish  # type: ignore[method-assign]
Pipeline.take_completed = take_completed  # type: ignore[method-assign]
StreamConsumer._on_revoke = on_revoke  # type: ignore[method-assign]

if __name__ == "__main__":
    runpy.run_module("streams.cli", run_name="__main__", alter_sys=True)
