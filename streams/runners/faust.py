"""The faust-streaming runner: a Faust agent windows the input, the same batch processor runs.

``reid-stream run --runner faust`` (the default runner is confluent-kafka,
streams/runners/confluent.py).
One agent reads the detections topic in batches closed by the adaptive window
(``streams.runners.faust_take.adaptive_take``, Faust's ``noack_take`` mechanism with the
policy of ``streams.runners.window``); our :class:`BatchProcessor` does everything else, in
a worker thread so that the event loop keeps serving the group (heartbeats, rebalances).

What this runner guarantees, and how:

- **Commit after the write.** ``adaptive_take`` yields the batch's events without acking them;
  they are acked only after :meth:`BatchProcessor.process` returned (rows committed, events
  acknowledged by the broker), then the acked offsets are committed at once. (``take()`` and
  ``take_events()`` ack in a ``finally`` when the generator is closed, i.e. also for a batch
  abandoned on stop or cancelled mid-way: not usable here.) Faust's own periodic commit also
  runs, but it only ever commits acked offsets, so it commits nothing unprocessed.
- **Outages pause, never crash.** StoreUnavailable / PublishError / KafkaException are retried
  with the confluent runner's backoff; the event loop keeps the group alive meanwhile. A batch
  is abandoned uncommitted when a rebalance is under way during its retries (Faust revokes
  every partition on each rebalance and waits for in-flight events, so holding the batch would
  hold the whole group) or when a stop is requested; the group redelivers it. Nothing taken
  after an abandoned batch in the same group generation is handled either: Faust commits acked
  offsets up to the first gap, but its check for a gap at the head of a partition misses some
  (when nothing or 0 is committed yet, and a gap of one offset), so acking later events could
  commit over the abandoned ones. The rebalance rewinds every partition to its committed
  offset and they all come again (``test_a_rebalance_during_an_outage_loses_nothing``).
- **Stop.** :meth:`FaustRunner.request_stop` (SIGTERM/SIGINT in the CLI) lets the batch in hand
  finish and commit, then stops the app; a batch taken after the request is left unacked.
- **Bad input stays data.** Keys and values are passed through as raw bytes (``raw``
  serializer); Faust never parses them, so malformed events reach the processor and become
  dead letters like with the other runner.

What Faust does not guarantee (open issues of faust-streaming on this path): offsets after a
gap in a partition (compaction, transaction markers) may stay uncommitted, and events can be
processed twice after a rebalance (messages of an old generation, eager revocation). Both mean
redelivery, never loss; the store is idempotent on ``detection_id`` and a redelivered event
republishes the stored assignment byte for byte, so duplicates are harmless.

Unlike the confluent runner this one runs one batch at a time (no pipeline), does not export the
consumer lag gauge (it sets ``reid_assigned_partitions``), translates only the SASL/SSL entries
of ``REID_KAFKA_OPTIONS``, and joins the group with Faust's own assignor (eager, not
cooperative-sticky): do not mix the two runners in one consumer group. On the tansu broker a
group's first generation is 0, for which aiokafka sends no LeaveGroup on stop, so the next
member's join waits out the session timeout.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from sinks.metrics import StreamMetrics
from streams.batch import BatchOutcome, SourceMessage
from streams.processor import BatchProcessor
from streams.runners.faust_take import adaptive_take
from streams.runners.retry import RETRYABLE, retry_delay
from streams.runners.window import WindowPolicy
from streams.settings import Settings

if TYPE_CHECKING:
    import faust

log = logging.getLogger(__name__)

# How often the main coroutine looks at the stop flag (set from signal handlers and threads).
_POLL_S = 0.1
# librdkafka options that have a Faust equivalent (see _credentials); others are not translated.
_TRANSLATED = {"security.protocol", "sasl.mechanism", "sasl.username", "ssl.ca.location"}


class FaustRunner:
    """Same contract as :class:`streams.runners.confluent.StreamConsumer`: ``start()``, a blocking
    ``run(on_batch, between_batches=...)``, ``request_stop()`` from any thread or a signal
    handler, ``stop()``."""

    def __init__(
        self,
        settings: Settings,
        processor: BatchProcessor,
        metrics: StreamMetrics,
        *,
        group_id: str | None = None,
    ) -> None:
        import faust  # noqa: F401  (fail here, before the model loads, when the extra is missing)

        self.settings = settings
        self.processor = processor
        self.metrics = metrics
        self.group_id = group_id or settings.group_id
        self._stop = threading.Event()
        self._in_batch = False
        self._abandoned_generation = -2  # aiokafka's "no generation" is -1
        self._error: BaseException | None = None
        self._on_batch: Callable[[BatchOutcome], None] | None = None
        self._between_batches: Callable[[], None] | None = None
        self._executor: ThreadPoolExecutor | None = None  # run()'s batch thread
        # One batch at a time: each leaves the processor before the next is handed over.
        self._submitted = 0
        self._completed = 0

    def start(self) -> None:
        log.info(
            "faust: runner ready topic=%s group=%s batch_max_size=%d batch_max_wait_ms=%d "
            "batch_min_wait_ms=%d",
            self.settings.topic_detections, self.group_id, self.settings.batch_max_size,
            self.settings.batch_max_wait_ms, self.settings.batch_min_wait_ms,
        )  # fmt: skip

    def request_stop(self) -> None:
        """Finish the batch in hand, commit it, then leave ``run`` (safe from signal handlers)."""
        self._stop.set()

    @property
    def batches_submitted(self) -> int:
        return self._submitted

    @property
    def batches_completed(self) -> int:
        return self._completed

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        """Nothing left to close: ``run`` stops the Faust app (and leaves the group) on its way
        out."""

    def run(
        self,
        on_batch: Callable[[BatchOutcome], None] | None = None,
        *,
        between_batches: Callable[[], None] | None = None,
    ) -> None:
        """Consume until :meth:`request_stop`; raises what crashed the processor or the app.
        ``on_batch`` gets each committed batch's outcome (in the event loop's thread);
        ``between_batches`` runs in the batch thread between batches and every poll while
        idle (e.g. to switch the embedding version), never while a batch is processed."""
        self._on_batch = on_batch
        self._between_batches = between_batches
        datadir = tempfile.mkdtemp(prefix="reid-faust-")  # Faust wants one; we keep no tables
        # One thread: batches never overlap, and a batch still running when the loop is
        # cancelled is waited for before the processor can be stopped.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="faust-batch")
        loop = asyncio.new_event_loop()
        try:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self._main(datadir))
        finally:
            _cancel_leftovers(loop)
            loop.close()
            asyncio.set_event_loop(None)
            self._executor.shutdown(wait=True)
            self._executor = None
            shutil.rmtree(datadir, ignore_errors=True)
        if self._error is not None:
            raise self._error

    # -- the app ----------------------------------------------------------------------------
    async def _main(self, datadir: str) -> None:
        app = build_app(self.settings, self.group_id, datadir)
        topic = app.topic(
            self.settings.topic_detections,
            key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
        )  # fmt: skip
        policy = WindowPolicy.from_settings(self.settings)

        async def batches(stream: faust.StreamT) -> None:
            async for events in adaptive_take(stream, policy):
                await self._handle(app, stream, events)

        app.agent(topic, name="reid-batches", concurrency=1)(batches)
        await app.start()
        try:
            while not self._stop.is_set() and not app.should_stop:
                self.metrics.assigned_partitions.set(len(app.consumer.assignment()))
                if not self._in_batch:
                    await self._in_thread(self._idle)
                await asyncio.sleep(_POLL_S)
            while self._in_batch and not app.should_stop:  # the batch in hand, to its commit
                await asyncio.sleep(_POLL_S / 5)
        except Exception as err:  # from between_batches: ends run() like a batch error
            log.exception("faust: between batches failed; stopping")
            self._error = self._error or err
        finally:
            crashed = app.crashed
            await app.stop()
        if crashed and self._error is None:
            self._error = RuntimeError(f"faust app crashed: {app.crash_reason!r}")
        log.info("faust: stopped")

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        assert self._executor is not None
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _idle(self) -> None:
        if self._between_batches is not None:
            self._between_batches()

    async def _handle(
        self, app: faust.App, stream: faust.StreamT, events: Sequence[faust.EventT]
    ) -> None:
        if self._stop.is_set():
            _forget(app, events)  # taken after the stop request: left for redelivery
            return
        # Acking an event past one left unacked could commit over it (see the module's
        # docstring). So after an abandoned batch nothing more of its generation is handled,
        # nor an event taken before a rebalance: Faust rewinds every assigned partition to its
        # committed offset when a rebalance ends, and those events come again.
        generation = app.consumer_generation_id
        stale = [e for e in events if e.message.generation_id != generation
                 or e.message.generation_id <= self._abandoned_generation]  # fmt: skip
        if stale:
            log.info("faust: %d events taken before a rebalance left for redelivery", len(stale))
            _forget(app, stale)
            events = [e for e in events if all(e is not s for s in stale)]
            if not events:
                return
        self._in_batch = True
        try:
            await self._in_thread(self._idle)
            messages = [_source(e.message) for e in events]
            self._submitted += 1
            try:
                outcome = await self._process_with_retry(app, messages)
            finally:
                self._completed += 1
            if outcome is None:
                _forget(app, events)
                self._abandoned_generation = max(e.message.generation_id for e in events)
                return
            for event in events:
                await stream.ack(event)
            await self._commit(app)
            if self._on_batch is not None:
                self._on_batch(outcome)
        except Exception as err:  # the confluent runner lets these end run(); so do we
            log.exception("faust: batch failed; stopping")
            _forget(app, events)
            self._error = err
            self._stop.set()
        finally:
            self._in_batch = False

    async def _process_with_retry(
        self, app: faust.App, messages: list[SourceMessage]
    ) -> BatchOutcome | None:
        """The batch's outcome, or None when it was abandoned: stop requested, or a rebalance
        under way during an outage (the revocation waits for the batch in hand, so holding it
        would hold the whole group until the outage ends)."""
        rebalances = app.rebalancing_count
        attempt = 0
        while True:
            try:
                return await self._in_thread(self.processor.process, messages)
            except RETRYABLE as err:
                attempt += 1
                delay = retry_delay(self.metrics, attempt, err)
                deadline = time.monotonic() + delay

                def rebalanced() -> bool:
                    return app.rebalancing or app.rebalancing_count != rebalances

                while not self._stop.is_set() and not rebalanced() and time.monotonic() < deadline:
                    await asyncio.sleep(min(_POLL_S, delay))
                if self._stop.is_set():
                    log.warning("faust: stopping with an unwritten batch; not committing it")
                    return None
                if rebalanced():
                    log.warning("faust: rebalance during retries; abandoning the batch uncommitted")
                    return None
                # A batch waiting for a version switch goes on once the switch is made.
                await self._in_thread(self._idle)

    async def _commit(self, app: faust.App) -> None:
        """Commit the acked offsets now rather than at Faust's next commit tick."""
        t0 = time.perf_counter()
        # commit() returns False without committing when another commit (Faust's timer, or a
        # rebalance) was in flight: it may have started before our acks, so ask once more.
        done = await app.consumer.commit() or await app.consumer.commit()
        if done:
            self.metrics.stage_seconds.labels(stage="commit").observe(time.perf_counter() - t0)
            self.metrics.committed()
        else:
            log.debug("faust: nothing committed (revoked, or committed by a concurrent commit)")


def build_app(settings: Settings, group_id: str, datadir: str) -> faust.App:
    """A Faust app that only consumes: group ``group_id``, raw bytes, no tables, no web
    server, no topic creation (``ensure_topics`` does that), the runner's session timeout."""
    from streams.runners.faust_fetch import FetchWaitApp

    s = settings
    fetch = max(1_048_576, s.max_message_bytes + 1024)
    return FetchWaitApp(
        group_id,  # Faust's app id is the consumer group id
        fetch_wait_ms=s.kafka_fetch_wait_ms,
        broker=[f"kafka://{host.strip()}" for host in s.kafka_bootstrap_servers.split(",")],
        broker_credentials=_credentials(s),
        autodiscover=False,
        datadir=datadir,
        store="memory://",
        web_enabled=False,
        topic_allow_declare=False,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=s.session_timeout_ms / 1000,
        broker_heartbeat_interval=max(500, s.session_timeout_ms // 5) / 1000,
        consumer_max_fetch_size=fetch,
        producer_max_request_size=s.message_limit_bytes(),
        # A few batches buffered ahead (Faust pauses fetching when full): images are large.
        stream_buffer_maxsize=max(64, 4 * s.batch_max_size),
        stream_wait_empty=True,  # a rebalance waits for the batch in hand, then commits it
        key_serializer="raw",
        value_serializer="raw",
    )


def _credentials(s: Settings) -> Any:
    """Faust credentials for the SASL/SSL entries of ``REID_KAFKA_OPTIONS`` (librdkafka names)."""
    import faust

    opts = s.kafka_options
    ignored = sorted(set(opts) - _TRANSLATED - {"sasl.password"})
    if ignored:
        log.warning("faust: REID_KAFKA_OPTIONS not translated for aiokafka: %s", ignored)
    protocol = opts.get("security.protocol", "PLAINTEXT").upper()
    context = None
    if protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(cafile=opts.get("ssl.ca.location"))
    if protocol.startswith("SASL"):
        password = s.kafka_password.get_secret_value() if s.kafka_password else None
        return faust.SASLCredentials(
            username=opts.get("sasl.username"), password=password or opts.get("sasl.password"),
            mechanism=opts.get("sasl.mechanism", "PLAIN").upper(), ssl_context=context,
        )  # fmt: skip
    if protocol == "SSL":
        return faust.SSLCredentials(context)
    return None


def _source(message: Any) -> SourceMessage:
    ts = message.timestamp  # seconds (float), None when the broker gave none
    return SourceMessage(
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        key=message.key,
        value=message.value,
        timestamp_ms=round(ts * 1000) if ts is not None and ts > 0 else None,
    )


def _forget(app: faust.App, events: Sequence[Any]) -> None:
    """Leave events unacked (so uncommitted) without Faust waiting for them: a rebalance or a
    stop waits for every tracked, unacked message, and these will never be acked here."""
    unacked = app.consumer.unacked
    for event in events:
        unacked.discard(event.message)


def _cancel_leftovers(loop: asyncio.AbstractEventLoop) -> None:
    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
