"""The benchmark's sections, each adding rows to the report (see the package docstring)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from streams.tools.bench.report import BenchPlan, BenchReport, peak_rss_bytes, reset_peak_rss
from streams.tools.bench.stream import run_stream

log = logging.getLogger(__name__)


def model_section(report: BenchReport, plan: BenchPlan, embedder: Any) -> None:
    """Every backend this machine has (eager PyTorch and onnxruntime on a CPU; fp32 and fp16
    on a GPU), each backbone alone and the ensemble, at each batch size."""
    from reid.evaluation.throughput import model_throughput

    for row in model_throughput(embedder, batch_sizes=plan.batch_sizes, seconds=plan.model_seconds):
        report.add("model", {k: _rounded(v) for k, v in row.items()})


def throughput_backend(embedder: Any) -> str:
    """The name `reid.evaluation.throughput` gives the backend the stream runs on."""
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
    import streams.tools.bench.matching as bench_matching

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
    """Re-embedding stored detections under another version, end to end."""
    from streams.tools.bench.replay import replay_rate

    row = replay_rate(settings_for(), events=plan.replay_events, embedder=embedder)
    report.add("replay", {k: _rounded(v) for k, v in row.items()})


def precision_section(
    report: BenchReport, settings: Any, embedder: Any, photos: list[bytes]
) -> None:
    """fp16 (and bf16) against fp32 on the same crops: cosine per detection and the share of
    identical assignment decisions. Needs CUDA; on a CPU the row says it was skipped."""
    import torch

    from reid.evaluation.precision import compare_precisions
    from reid.preprocess import decode_image
    from streams.versions import build_embedder

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
