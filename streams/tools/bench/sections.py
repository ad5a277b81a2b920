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
        gpu = _reset_peak_gpu()
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
        if gpu:
            row["peak_gpu_mb"] = _peak_gpu_mb()
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
    """p50/p99 from produce to assignment at each of ``plan.latency_rates`` (None: half of
    ``max_rate``, the best stream throughput), with each of ``plan.latency_windows``."""
    for wanted in plan.latency_rates:
        rate = max(0.5, max_rate / 2) if wanted is None else wanted
        load = "half of max" if wanted is None else f"{wanted:g} ev/s"
        count = max(4, int(rate * plan.latency_seconds))
        for window in plan.latency_windows:
            settings = settings_for(batch_max_size=plan.stream_batch)
            if window == "fixed":  # the window before it was adaptive
                settings = settings_for(batch_max_size=plan.stream_batch,
                                        batch_min_wait_ms=settings.batch_max_wait_ms)  # fmt: skip
            run = run_stream(settings, embedder, _cycle(photos, count), runner="confluent",
                             rate=rate)  # fmt: skip
            values = np.array(sorted(run.assignments_ms.values()))
            report.add("latency", {
                "runner": "confluent", "window": window, "load": load,
                "rate_events_per_s": round(rate, 2), "events": len(values),
                "batches": run.batches, "batch_max_size": settings.batch_max_size,
                "batch_max_wait_ms": settings.batch_max_wait_ms,
                "batch_min_wait_ms": settings.batch_min_wait_ms,
                "p50_ms": round(float(np.percentile(values, 50)), 1),
                "p99_ms": round(float(np.percentile(values, 99)), 1),
                "max_ms": round(float(values.max()), 1),
                **{f"{stage}_ms": ms for stage, ms in run.stage_ms.items()},
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
        row["peak_gpu_mb"] = max(_gpu_peak_before_reset[0], _peak_gpu_mb())
    report.add("memory", row)


# The process's peak GPU memory before the last reset (each stream run measures its own).
_gpu_peak_before_reset = [0]


def _reset_peak_gpu() -> bool:
    """Reset CUDA's peak-memory counter; False where there is no CUDA."""
    import torch

    if not torch.cuda.is_available():
        return False
    _gpu_peak_before_reset[0] = max(_gpu_peak_before_reset[0], _peak_gpu_mb())
    torch.cuda.reset_peak_memory_stats()
    return True


def _peak_gpu_mb() -> int:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**20)


def gpu_missing() -> str | None:
    """Why the ``gpu`` preset cannot run here, or None where it can."""
    import torch

    if not torch.cuda.is_available():
        return ("skipped: no CUDA device on this machine; run `reid-stream bench --sections gpu` "
                "on a GPU host (PyTorch with CUDA), it measures nothing on a CPU")  # fmt: skip
    return None


def int8_section(report: BenchReport, plan: BenchPlan, embedder: Any, images: Any) -> None:
    """INT8 (ONNX Runtime static quantisation) against fp32, on the ``--images`` crops (all of
    them, once) or, without them, the synthetic photos; see reid.evaluation.int8."""
    import torch

    from reid.evaluation.int8 import compare_int8
    from reid.preprocess import decode_image
    from streams.tools.bench.stream import bench_photos

    if images is not None:
        from streams.tools.produce import photos_from

        photos = [data for _, data in photos_from(images, None)]
    else:
        photos = bench_photos(4 * plan.int8_calibration, plan.individuals)
        report.notes.append("int8: synthetic crops; give --images for real ones")
    crops = torch.stack([embedder.preprocess.to_uint8(decode_image(p)) for p in photos])
    sizes = sorted({1, 8, plan.stream_batch})
    result = compare_int8(
        embedder, crops, calibration=min(plan.int8_calibration, len(crops) // 2),
        batch_sizes=sizes, stream_batch=plan.stream_batch, seconds=plan.model_seconds,
    )  # fmt: skip
    for row in result["speed"]:
        report.add("int8", {"batch": row["batch"], **{k: _rounded(v) for k, v in row.items()
                                                      if k != "batch"}})  # fmt: skip
    cos = result["cosine"]
    report.add("int8_accuracy", {
        "crops": result["crops"], "calibration_crops": result["calibration_crops"],
        "evaluated_crops": result["evaluated_crops"],
        "cos_min_resnet": round(cos["resnet"]["min"], 4),
        "cos_min_effnet": round(cos["effnet"]["min"], 4),
        "cos_mean_resnet": round(cos["resnet"]["mean"], 4),
        "cos_mean_effnet": round(cos["effnet"]["mean"], 4),
        "identical_decisions": round(result["assignment_agreement"], 4),
        "fp32_mb": round(result["fp32_mb"], 1), "int8_mb": round(result["int8_mb"], 1),
        "quantise_s": round(result["quantise_s"], 1),
        "adopt": result["adopt"],
    })  # fmt: skip
    for check, passed in result["checks"].items():
        report.notes.append(f"int8: {check}: {'yes' if passed else 'NO'}")
