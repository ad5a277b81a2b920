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
   the input fed at 3 events/s and at about half of the measured maximum throughput, with the
   adaptive batch window and with the fixed one it replaced; and ``transit``, the first hop
   alone (produce to consume, no model) for each consumer fetch wait.
6. ``memory``: peak resident memory of the process (the consumer runs in it) and peak GPU
   memory where there is a GPU.
7. ``replay``: re-embedding rate of stored detections under a new version.
8. ``thumbnails``: the crop thumbnails' cost in the decode threads and on the write path
   (``write_batch`` with and without them, alternating).

Asked for by name only: ``int8`` (ONNX Runtime static INT8 quantisation of the ensemble,
calibrated on the ``--images`` crops, against fp32: speed, cosine, assignment agreement) and
``gpu``, the preset for a lent GPU: ``model``, ``stream``, ``latency`` and ``precision`` with
PyTorch on CUDA (fp32 and fp16 raw at batch 1-64, the fp16 stream end to end, latency at 3
events/s and half load, peak GPU memory), sized to a few minutes; without CUDA it says so and
measures nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from streams.logs import progress_bar
from streams.tools.bench import sections as bench_sections
from streams.tools.bench.report import (
    EXTRA_SECTIONS,
    SECTIONS,
    BenchPlan,
    BenchReport,
    format_tables,
    machine_info,
)
from streams.tools.bench.stream import bench_photos
from streams.tools.bench.transit import transit_section

log = logging.getLogger(__name__)

__all__ = ["BenchPlan", "BenchReport", "add_arguments", "format_tables", "plan_from", "run_bench"]


@contextlib.contextmanager
def bench_servers(use_env: bool) -> Iterator[dict[str, Any]]:
    """Addresses of the servers: from the settings (``--use-env``) or a fresh embedded stack."""
    if use_env:
        yield {}
        return
    from streams.tools.stack import EmbeddedStack

    with tempfile.TemporaryDirectory(prefix="reid-bench-") as state:
        stack = EmbeddedStack(Path(state))
        info = stack.up()
        try:
            yield info.settings()
        finally:
            stack.down()


def run_bench(
    plan: BenchPlan, *, use_env: bool = False, images: Path | None = None,
    settings_file: Path | None = None, sections: tuple[str, ...] | None = None,
) -> BenchReport:  # fmt: skip
    from sinks.migrate import migrate
    from streams.settings import load_settings
    from streams.versions import build_embedder

    wanted = set(sections or SECTIONS)
    unknown = sorted(wanted - set(SECTIONS) - set(EXTRA_SECTIONS))
    if unknown:
        raise ValueError(f"unknown bench sections {unknown}; known: {SECTIONS + EXTRA_SECTIONS}")
    report = BenchReport(machine_info(), plan={k: v for k, v in plan.__dict__.items()})
    if "gpu" in wanted:
        skipped = bench_sections.gpu_missing()
        if skipped is not None:
            report.add("gpu", {"skipped": skipped})
            report.notes.append(f"gpu: {skipped}")
            return report
        wanted = (wanted - {"gpu"}) | {"model", "stream", "latency", "precision"}
    with bench_servers(use_env) as servers:
        base = {**servers, "metrics_port": 0, "input_size": plan.input_size}
        base.update({k: v for k, v in (("device", plan.device), ("backend", plan.backend)) if v})

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
        backend = bench_sections.throughput_backend(embedder)
        # Which section runs, and how many are left (a terminal only).
        bar = progress_bar("bench", total=len(wanted), unit="section")
        running: list[str] = []

        def section(name: str) -> bool:
            """Whether ``name`` runs; counts the one before it as done."""
            if name not in wanted:
                return False
            bar.update(len(running))
            running[:] = [name]
            bar.set_postfix_str(name)
            return True

        if section("model"):
            bench_sections.model_section(report, plan, embedder)
        try:
            best = None
            if section("stream"):
                best = bench_sections.stream_section(
                    report, plan, settings_for, embedder, backend, photos[: plan.stream_events]
                )
            if section("naive"):
                bench_sections.naive_section(report, plan, settings_for, embedder, photos)
            if section("latency"):
                transit_section(report, plan, settings_for)
                if best:
                    bench_sections.latency_section(
                        report, plan, settings_for, embedder, photos, best
                    )
            bench_sections.memory_section(report)
            if section("precision"):
                bench_sections.precision_section(report, settings, embedder, photos[:64])
            if section("replay"):
                bench_sections.replay_section(report, plan, settings_for, embedder)
            if section("int8"):
                bench_sections.int8_section(report, plan, embedder, images)
        finally:
            embedder.stop()
        if section("matching"):
            bench_sections.matching_section(
                report, plan, settings.database_url.get_secret_value(), backend
            )
        if section("thumbnails"):
            from streams.tools.bench.thumbnails import thumbnails_section

            thumbnails_section(report, plan, settings.database_url.get_secret_value(), photos)
        bar.update(len(running))
        bar.close()
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--quick", action="store_true", help="tiny sizes: keeps the command working")
    add("--json", type=Path, default=Path("bench.json"), help="where the figures go (JSON)")
    add("--use-env", action="store_true", help="servers named by the settings, not embedded")
    add("--images", type=Path, default=None, help="crops to feed (default: synthetic)")
    add("--sections", default=None,
        help=f"comma list of {','.join(SECTIONS + EXTRA_SECTIONS)} (default: all but "
             f"{' and '.join(EXTRA_SECTIONS)}; gpu: the preset for a lent GPU)")  # fmt: skip
    add("--events", type=int, default=None, help="events per stream run")
    add("--search-sizes", default=None, help="comma list of stored detections for HNSW search")
    add("--replay-events", type=int, default=None, help="detections to replay (e.g. 6982)")


def plan_from(args: argparse.Namespace) -> BenchPlan:
    gpu = "gpu" in (args.sections or "").split(",")
    plan = BenchPlan.quick() if args.quick else BenchPlan.gpu() if gpu else BenchPlan()
    changes: dict[str, Any] = {}
    if args.events:
        changes["stream_events"] = args.events
    if args.replay_events:
        changes["replay_events"] = args.replay_events
    if args.search_sizes:
        changes["search_sizes"] = tuple(int(s) for s in args.search_sizes.split(","))
    return dataclasses.replace(plan, **changes)
