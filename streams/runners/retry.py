"""The one retry policy of both runners: which failures retry a batch, and how long to wait.

Only a dependency failure (the database or the broker) retries a batch; whatever a single
event raises is that event's problem and never reaches here.
"""

from __future__ import annotations

import logging

from sinks.metrics import StreamMetrics
from streams.processor import DEPENDENCY_FAILURES

log = logging.getLogger(__name__)

RETRY_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)
# What a batch attempt may fail with and still be retried (the database, the broker, a
# version switch under way); the processor dead-letters whatever else one event causes.
RETRYABLE = DEPENDENCY_FAILURES


def retry_delay(metrics: StreamMetrics, attempt: int, err: Exception) -> float:
    """Count and log failed attempt number ``attempt`` (1, 2, ...) of a batch; the seconds to
    wait before the next one (0.5, 1, 2, 5, then every 10 s)."""
    metrics.store_errors.inc()
    delay = RETRY_BACKOFF_S[min(attempt - 1, len(RETRY_BACKOFF_S) - 1)]
    log.error("batch failed (attempt %d), retrying in %.1fs: %s", attempt, delay, err)
    return delay
