"""The benchmark's plan and sections as pure logic: the gpu preset, the latency rows (the runs
themselves are faked here; `tests/integration/test_streams_tools_bench.py` runs them)."""

from __future__ import annotations

import argparse

import pytest
import torch

from streams.settings import Settings
from streams.tools import bench
from streams.tools.bench import sections
from streams.tools.bench.report import BenchPlan, BenchReport
from streams.tools.bench.stream import StreamRun


def args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_gpu_preset_plan() -> None:
    plan = bench.plan_from(args("--sections", "gpu"))
    assert (plan.device, plan.backend) == ("cuda", "torch")
    assert plan.batch_sizes == (1, 8, 16, 32, 64) and plan.stream_batch == 64
    assert bench.plan_from(args("--sections", "model")) == BenchPlan()
    assert bench.plan_from(args("--quick", "--sections", "gpu")).device is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="the skip path needs a machine without CUDA")
def test_gpu_section_without_cuda_says_so_and_measures_nothing() -> None:
    report = bench.run_bench(BenchPlan.quick(), sections=("gpu",))  # would start servers
    (row,) = report.sections["gpu"]
    assert "no CUDA device" in row["skipped"] and "--sections gpu" in row["skipped"]
    assert set(report.sections) == {"gpu"}
    assert report.notes == [f"gpu: {row['skipped']}"]
    assert "no CUDA device" in bench.format_tables(report)


def test_unknown_sections_are_refused() -> None:
    with pytest.raises(ValueError, match="modle"):
        bench.run_bench(BenchPlan.quick(), sections=("modle",))


def test_latency_rows_at_each_rate_with_both_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[tuple[Settings, int, float]] = []

    def fake_run(settings, embedder, photos, *, runner, rate=None):
        runs.append((settings, len(photos), rate))
        # Latency grows with the window: the fixed window holds each event for longer.
        ms = 50.0 + settings.batch_min_wait_ms
        return StreamRun(len(photos), 1.0, len(photos), {f"d{i}": ms + i for i in range(9)})

    monkeypatch.setattr(sections, "run_stream", fake_run)
    report = BenchReport({}, {})
    plan = BenchPlan(latency_seconds=10.0, stream_batch=16)
    sections.latency_section(
        report, plan, lambda **kw: Settings(**kw), None, [b"jpeg"], max_rate=30.0
    )
    rows = report.sections["latency"]
    assert [(r["load"], r["window"]) for r in rows] == [
        ("3 ev/s", "adaptive"), ("3 ev/s", "fixed"),
        ("half of max", "adaptive"), ("half of max", "fixed"),
    ]  # fmt: skip
    assert [r["rate_events_per_s"] for r in rows] == [3.0, 3.0, 15.0, 15.0]
    assert [n for _, n, _ in runs] == [30, 30, 150, 150]  # rate x latency_seconds events
    # "fixed": the old window, min wait = max wait; "adaptive": the settings' own.
    assert [r["batch_min_wait_ms"] for r in rows] == [0, 200, 0, 200]
    assert all(s.batch_max_size == 16 for s, _, _ in runs)
    assert rows[0]["p50_ms"] == pytest.approx(54.0) and rows[1]["p50_ms"] == pytest.approx(254.0)
    assert all(r["p50_ms"] <= r["p99_ms"] <= r["max_ms"] for r in rows)


def test_latency_rows_break_the_batch_down_by_stage() -> None:
    from sinks.metrics import StreamMetrics
    from streams.tools.bench.stream import mean_stage_ms, stage_totals

    metrics = StreamMetrics()
    metrics.stage_seconds.labels(stage="embed").observe(5.0)  # before the measured part
    before = stage_totals(metrics.registry)
    for seconds in (0.090, 0.110):
        metrics.stage_seconds.labels(stage="embed").observe(seconds)
    metrics.stage_seconds.labels(stage="persist").observe(0.004)
    means = mean_stage_ms(before, stage_totals(metrics.registry))
    # Per batch of the measured part only; "decode" did not run, so it is not reported.
    assert means == {"embed": pytest.approx(100.0), "persist": pytest.approx(4.0)}
