"""`reid-stream bench`: how fast the models and the stream are, in one run on one machine.

Every figure comes from the same process on the same machine within minutes, so the ratios
(stream / raw model, batched / naive) hold even where the absolute numbers are noisy. The
stream runs against real servers: the embedded stack (started here, on loopback) unless
``--use-env`` points the settings at running ones.

Sections (each a list of rows in the JSON, a table on stdout):
1. ``model``: raw images/s per backbone and for the ensemble, per backend and batch size.
2. ``stream``: end-to-end events/s per runner (first event produced to last offset committed,
   rows written and assignments published), and its ratio to the raw ensemble at the same
   batch size and backend.
3. ``naive``: one detection at a time, a commit per message; ratio batched / naive.
4. ``matching`` and ``vector_search``: matching a batch against 1k-100k known deer; pgvector
   HNSW top-5 over stored detections vs exact search.
5. ``latency``: p50 / p99 from the event's produce timestamp to its assignment record, with
   the input fed at about half of the measured maximum throughput.
6. ``memory``: peak resident memory of the process (the consumer runs in it) and peak GPU
   memory where there is a GPU.
7. ``replay``: re-embedding rate of stored detections under a new version (issue 5).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import platform
import resource
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Producer

from streams.produce import detection_event

log = logging.getLogger(__name__)


SECTIONS = ("model", "stream", "naive", "latency", "precision", "matching", "replay")


@dataclass(frozen=True)
class BenchPlan:
    """What to measure; ``quick()`` is the few-seconds version the test suite runs."""

    input_size: int | None = None  # None: the model's own (224)
    batch_sizes: tuple[int, ...] = (1, 8, 32, 64)
    stream_batch: int = 32
    stream_events: int = 320
    naive_events: int = 48
    runners: tuple[str, ...] = ("confluent", "faust")
    model_seconds: float = 6.0
    deer_counts: tuple[int, ...] = (1_000, 10_000, 100_000)
    search_sizes: tuple[int, ...] = (100_000,)
    latency_seconds: float = 30.0
    replay_events: int = 200
    individuals: int = 40

    @classmethod
    def quick(cls) -> BenchPlan:
        return cls(
            input_size=64, batch_sizes=(1, 8), stream_batch=8, stream_events=32, naive_events=8,
            model_seconds=0.3, deer_counts=(1_000,), search_sizes=(2_000,),
            latency_seconds=3.0, replay_events=16, individuals=6,
        )  # fmt: skip


@dataclass
class BenchReport:
    machine: dict[str, Any]
    plan: dict[str, Any]
    sections: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, section: str, row: dict[str, Any]) -> None:
        self.sections.setdefault(section, []).append(row)
        log.info("bench: %s %s", section, json.dumps(row, default=str))

    def to_json(self) -> str:
        return json.dumps(
            {"machine": self.machine, "plan": self.plan, "sections": self.sections,
             "notes": self.notes},
            indent=2, default=str,
        )  # fmt: skip


# -- the machine ------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def peak_rss_bytes() -> int:
    """Peak resident set of this process (VmHWM), resettable with ``reset_peak_rss``."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Linux lets a process reset its own peak (``echo 5 > /proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# -- events -----------------------------------------------------------------------------
def bench_photos(count: int, individuals: int, images: Path | None = None) -> list[bytes]:
    """Detection crops: the given folder's photos (cycled), else synthetic 256 px crops."""
    if images is not None:
        from streams.produce import photos_from

        return [data for _, data in photos_from(images, count)]
    from streams.synthetic import synthetic_photos

    return [data for _, data in synthetic_photos(count, individuals=individuals)]


class EventFeed:
    """Publishes detection events and remembers when each was produced (for latency)."""

    def __init__(self, producer_config: dict[str, Any], topic: str, cameras: int = 8) -> None:
        self.topic = topic
        self.cameras = cameras
        self.producer = Producer({**producer_config, "enable.idempotence": True, "linger.ms": 5})
        self.sent_ms: dict[str, float] = {}
        self._n = 0

    def send(self, photo: bytes) -> str:
        camera = f"cam-{self._n % self.cameras:02d}"
        event = detection_event(photo, camera, detection_id=f"bench-{uuid.uuid4().hex}")
        self._n += 1
        self.sent_ms[event["detection_id"]] = time.time() * 1000
        while True:
            try:
                self.producer.produce(self.topic, json.dumps(event).encode(), key=camera)
                break
            except BufferError:
                self.producer.poll(0.05)
        self.producer.poll(0)
        return event["detection_id"]

    def flush(self) -> None:
        if self.producer.flush(60):
            raise RuntimeError("bench: events not acknowledged by the broker")


# -- one stream run -----------------------------------------------------------------------
@dataclass
class StreamRun:
    events: int
    seconds: float
    batches: int
    assignments_ms: dict[str, float]  # detection_id -> when its assignment record was made

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else float("nan")


def run_stream(
    settings: Any,
    embedder: Any,
    photos: list[bytes],
    *,
    runner: str,
    rate: float | None = None,
    timeout_s: float = 900.0,
) -> StreamRun:
    """Start an app on ``settings`` (fresh topics and group), wait until it consumes, then
    feed ``photos`` (all at once, or at ``rate`` events/s) and time until all are committed."""
    from streams.app import StreamApp
    from streams.topics import ensure_topics, read_topic

    topics = [settings.topic_detections, settings.topic_assignments, settings.topic_dead_letters]
    ensure_topics(settings.kafka_common(), topics, settings.topic_partitions)
    app = StreamApp(settings, serve_metrics=False, runner=runner, embedder=embedder)
    feed = EventFeed(settings.producer_config(), settings.topic_detections)
    done = threading.Event()
    seen = {"messages": 0, "batches": 0, "target": 1}
    timing: dict[str, float] = {}

    def on_batch(outcome: Any) -> None:
        seen["messages"] += outcome.messages
        seen["batches"] += 1
        if seen["messages"] >= seen["target"]:
            timing["end"] = time.perf_counter()
            done.set()

    app.start()
    thread = threading.Thread(target=app.consumer.run, args=(on_batch,), daemon=True)
    thread.start()
    try:
        # One event first: the group is joined, the gallery loaded, every stage warm.
        feed.send(photos[0])
        feed.flush()
        if not done.wait(timeout_s):
            raise TimeoutError(f"bench: {runner} consumed nothing in {timeout_s:.0f}s")
        done.clear()
        seen.update(messages=0, batches=0, target=len(photos))
        timing["start"] = time.perf_counter()
        for i, photo in enumerate(photos):
            if rate:
                _pace(timing["start"], i, rate)
            feed.send(photo)
        feed.flush()
        if not done.wait(timeout_s):
            raise TimeoutError(f"bench: {runner} did not finish {len(photos)} events in time")
    finally:
        app.consumer.request_stop()
        thread.join(60)
        app.stop()
    records = read_topic(
        settings.kafka_common(), settings.topic_assignments, expected=len(photos) + 1,
        timeout_s=60,
    )  # fmt: skip
    made = {}
    for record in records:
        _kind, ts = record.timestamp()
        made[json.loads(record.value())["detection_id"]] = float(ts)
    latency = {d: made[d] - feed.sent_ms[d] for d in made if d in feed.sent_ms}
    return StreamRun(len(photos), timing["end"] - timing["start"], seen["batches"], latency)


def _pace(start: float, index: int, rate: float) -> None:
    wait = start + index / rate - time.perf_counter()
    if wait > 0:
        time.sleep(wait)


# -- the sections -------------------------------------------------------------------------
def model_section(report: BenchReport, plan: BenchPlan, embedder: Any) -> None:
    """Every backend this machine has (eager PyTorch and onnxruntime on a CPU; fp32 and fp16
    on a GPU), each backbone alone and the ensemble, at each batch size."""
    from reid.throughput import model_throughput

    for row in model_throughput(embedder, batch_sizes=plan.batch_sizes, seconds=plan.model_seconds):
        report.add("model", {k: _rounded(v) for k, v in row.items()})


def throughput_backend(embedder: Any) -> str:
    """The name `reid.throughput` gives the backend the stream runs on."""
    device = "cuda" if str(embedder.device).startswith("cuda") else "cpu"
    return f"{getattr(embedder, 'backend', 'torch')}-{device}-{embedder.precision}"


def raw_ensemble_rate(report: BenchReport, backend: str, batch: int) -> float | None:
    for row in report.sections.get("model", []):
        if row["backend"] == backend and row["part"] == "ensemble" and row["batch"] == batch:
            return float(row["images_per_s"])
    return None


def _rounded(value: Any) -> Any:
    return round(value, 3) if isinstance(value, float) else value


def stream_section(
    report: BenchReport,
    plan: BenchPlan,
    settings_for: Callable[..., Any],
    embedder: Any,
    backend: str,
    photos: list[bytes],
) -> float | None:
    """Each runner on the same backlog; returns the best events/s (for the latency feed)."""
    best = None
    raw = raw_ensemble_rate(report, backend, plan.stream_batch)
    for runner in plan.runners:
        settings = settings_for(batch_max_size=plan.stream_batch)
        reset_peak_rss()
        try:
            run = run_stream(settings, embedder, photos, runner=runner)
        except ImportError as err:
            report.notes.append(f"runner {runner} not measured: {err}")
            continue
        row = {
            "runner": runner, "backend": backend, "batch": plan.stream_batch,
            "pipeline_depth": settings.pipeline_depth, "events": run.events,
            "seconds": round(run.seconds, 2), "events_per_s": round(run.events_per_s, 2),
            "batches": run.batches,
            "raw_ensemble_per_s": None if raw is None else round(raw, 2),
            "ratio_to_raw": None if raw is None else round(run.events_per_s / raw, 3),
            "peak_rss_mb": round(peak_rss_bytes() / 2**20),
        }  # fmt: skip
        report.add("stream", row)
        best = max(best or 0.0, run.events_per_s)
    return best


def naive_section(
    report: BenchReport, plan: BenchPlan, settings_for: Callable[..., Any], embedder: Any,
    photos: list[bytes],
) -> None:  # fmt: skip
    settings = settings_for(batch_max_size=1, pipeline_depth=1)
    run = run_stream(settings, embedder, photos[: plan.naive_events], runner="confluent")
    batched = [r for r in report.sections.get("stream", []) if r["runner"] == "confluent"]
    ratio = batched[0]["events_per_s"] / run.events_per_s if batched else None
    report.add("naive", {
        "events": run.events, "seconds": round(run.seconds, 2),
        "events_per_s": round(run.events_per_s, 2), "commits": run.batches,
        "batched_events_per_s": batched[0]["events_per_s"] if batched else None,
        "ratio_batched_to_naive": None if ratio is None else round(ratio, 2),
    })  # fmt: skip


def latency_section(
    report: BenchReport, plan: BenchPlan, settings_for: Callable[..., Any], embedder: Any,
    photos: list[bytes], max_rate: float,
) -> None:  # fmt: skip
    rate = max(0.5, max_rate / 2)
    count = max(4, int(rate * plan.latency_seconds))
    settings = settings_for(batch_max_size=plan.stream_batch)
    run = run_stream(settings, embedder, _cycle(photos, count), runner="confluent", rate=rate)
    values = np.array(sorted(run.assignments_ms.values()))
    report.add("latency", {
        "runner": "confluent", "rate_events_per_s": round(rate, 2), "events": len(values),
        "batch_max_size": settings.batch_max_size,
        "batch_max_wait_ms": settings.batch_max_wait_ms,
        "p50_ms": round(float(np.percentile(values, 50)), 1),
        "p99_ms": round(float(np.percentile(values, 99)), 1),
        "max_ms": round(float(values.max()), 1),
    })  # fmt: skip


def _cycle(photos: list[bytes], count: int) -> list[bytes]:
    return [photos[i % len(photos)] for i in range(count)]


def matching_section(report: BenchReport, plan: BenchPlan, database_url: str, backend: str) -> None:
    """Matching per batch, and its share of the batch time (the raw ensemble's time for a
    batch of that size on this machine: the model is what a batch costs)."""
    from streams import bench_matching

    for batch in sorted({plan.stream_batch, max(plan.batch_sizes)}):
        raw = raw_ensemble_rate(report, backend, batch)
        batch_ms = None if raw is None else 1000.0 * batch / raw
        for row in bench_matching.matching_times(deer_counts=plan.deer_counts, batch_size=batch):
            share = None if batch_ms is None else round(row["match_ms_median"] / batch_ms, 4)
            report.add("matching", {**row, "model_ms_per_batch": _rounded(batch_ms),
                                    "share_of_batch": share})  # fmt: skip
    for row in bench_matching.vector_search_times(database_url, sizes=plan.search_sizes):
        report.add("vector_search", row)


def replay_section(
    report: BenchReport, plan: BenchPlan, settings_for: Callable[..., Any], embedder: Any
) -> None:
    """Re-embedding stored detections under another version, end to end (issue 5)."""
    from streams.replay import replay_rate

    row = replay_rate(settings_for(), events=plan.replay_events, embedder=embedder)
    report.add("replay", {k: _rounded(v) for k, v in row.items()})


def precision_section(
    report: BenchReport, settings: Any, embedder: Any, photos: list[bytes]
) -> None:
    """fp16 (and bf16) against fp32 on the same crops: cosine per detection and the share of
    identical assignment decisions. Needs CUDA; on a CPU the row says it was skipped."""
    import torch

    from reid.precision import compare_precisions
    from reid.preprocess import decode_image
    from streams.app import build_embedder

    images = torch.stack([embedder.preprocess.to_uint8(decode_image(p)) for p in photos])
    if not torch.cuda.is_available():
        report.add("precision", {"precision": "fp16", "n": len(images),
                                 "skipped": "no CUDA device on this machine"})  # fmt: skip
        return
    fp32 = build_embedder(settings.model_copy(update={"precision": "fp32"}))
    for precision in ("fp16", "bf16"):
        half = build_embedder(settings.model_copy(update={"precision": precision}))
        result = compare_precisions(fp32, half, images, threshold=settings.threshold)
        half.stop()
        report.add("precision", {"precision": precision, **_flat(result)})
    fp32.stop()


def _flat(doc: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}_"))
        else:
            out[f"{prefix}{key}"] = _rounded(value)
    return out


def memory_section(report: BenchReport) -> None:
    import torch

    row: dict[str, Any] = {"peak_rss_mb": round(peak_rss_bytes() / 2**20)}
    if torch.cuda.is_available():
        row["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    report.add("memory", row)


# -- the command --------------------------------------------------------------------------
@contextlib.contextmanager
def bench_servers(use_env: bool) -> Iterator[dict[str, Any]]:
    """Addresses of the servers: from the settings (``--use-env``) or a fresh embedded stack."""
    if use_env:
        yield {}
        return
    from streams.stack import EmbeddedStack

    with tempfile.TemporaryDirectory(prefix="reid-bench-") as state:
        stack = EmbeddedStack(Path(state))
        info = stack.up()
        try:
            yield {
                "kafka_bootstrap_servers": info.kafka_bootstrap,
                "database_url": info.database_url,
                "redis_url": info.redis_url,
            }
        finally:
            stack.down()


def run_bench(
    plan: BenchPlan, *, use_env: bool = False, images: Path | None = None,
    settings_file: Path | None = None, sections: tuple[str, ...] | None = None,
) -> BenchReport:  # fmt: skip
    from sinks.migrate import migrate
    from streams.app import build_embedder
    from streams.settings import load_settings

    wanted = set(sections or SECTIONS)
    report = BenchReport(machine_info(), plan={k: v for k, v in plan.__dict__.items()})
    with bench_servers(use_env) as servers:
        base = {**servers, "metrics_port": 0, "input_size": plan.input_size}

        def settings_for(**overrides: Any) -> Any:
            tag = uuid.uuid4().hex[:8]
            names = {
                "topic_detections": f"bench-detections-{tag}",
                "topic_assignments": f"bench-assignments-{tag}",
                "topic_dead_letters": f"bench-dlq-{tag}",
                "group_id": f"bench-{tag}",
                "cache_key_prefix": f"bench-{tag}",
                "session_timeout_ms": 6000,
            }
            return load_settings(settings_file, **{**base, **names, **overrides})

        settings = settings_for()
        migrate(settings.database_url.get_secret_value())
        photos = bench_photos(max(plan.stream_events, plan.naive_events), plan.individuals, images)

        def embedder_for(**overrides: Any) -> Any:
            embedder = build_embedder(settings.model_copy(update=overrides))
            embedder.start()
            return embedder

        embedder = embedder_for()
        backend = throughput_backend(embedder)
        if "model" in wanted:
            model_section(report, plan, embedder)
        try:
            best = None
            if "stream" in wanted:
                best = stream_section(
                    report, plan, settings_for, embedder, backend, photos[: plan.stream_events]
                )
            if "naive" in wanted:
                naive_section(report, plan, settings_for, embedder, photos)
            if "latency" in wanted and best:
                latency_section(report, plan, settings_for, embedder, photos, best)
            memory_section(report)
            if "precision" in wanted:
                precision_section(report, settings, embedder, photos[:64])
            if "replay" in wanted:
                replay_section(report, plan, settings_for, embedder)
        finally:
            embedder.stop()
        if "matching" in wanted:
            matching_section(report, plan, settings.database_url.get_secret_value(), backend)
    return report


def format_tables(report: BenchReport) -> str:
    """One plain-text table per section, columns in the order of the first row."""
    out = [f"machine: {report.machine.get('cpu')} x{report.machine.get('cores')}, "
           f"torch {report.machine.get('torch')}, cuda={report.machine.get('cuda')}"]  # fmt: skip
    for section, rows in report.sections.items():
        columns: list[str] = []
        for row in rows:
            columns += [c for c in row if c not in columns]
        cells = [[_cell(row.get(c)) for c in columns] for row in rows]
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
        out.append("")
        out.append(f"## {section}")
        out.append("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
        for r in cells:
            out.append("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
    for note in report.notes:
        out.append(f"note: {note}")
    return "\n".join(out)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--quick", action="store_true", help="tiny sizes: keeps the command working")
    add("--json", type=Path, default=Path("bench.json"), help="where the figures go (JSON)")
    add("--use-env", action="store_true", help="servers named by the settings, not embedded")
    add("--images", type=Path, default=None, help="crops to feed (default: synthetic)")
    add("--sections", default=None, help=f"comma list of {','.join(SECTIONS)}")
    add("--events", type=int, default=None, help="events per stream run")
    add("--search-sizes", default=None, help="comma list of stored detections for HNSW search")
    add("--replay-events", type=int, default=None, help="detections to replay (e.g. 6982)")


def plan_from(args: argparse.Namespace) -> BenchPlan:
    plan = BenchPlan.quick() if args.quick else BenchPlan()
    changes: dict[str, Any] = {}
    if args.events:
        changes["stream_events"] = args.events
    if args.replay_events:
        changes["replay_events"] = args.replay_events
    if args.search_sizes:
        changes["search_sizes"] = tuple(int(s) for s in args.search_sizes.split(","))
    return dataclasses.replace(plan, **changes)
