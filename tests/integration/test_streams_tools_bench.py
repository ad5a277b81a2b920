"""`reid-stream bench --quick` keeps working: every section measured, figures consistent."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_quick_prints_a_table_and_writes_the_same_figures(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "streams.cli", "--log-level", "WARNING", "bench", "--quick",
         "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    sections = report["sections"]
    names = ("model", "stream", "naive", "latency", "transit", "memory", "precision", "matching",
             "vector_search", "replay", "thumbnails")  # fmt: skip
    for name in names:
        assert sections.get(name), f"section {name} missing: {report['notes']}"
        assert f"## {name}" in proc.stdout

    model = {(r["backend"], r["part"], r["batch"]) for r in sections["model"]}
    parts = ("resnet", "effnet", "ensemble")
    assert {("torch-cpu-fp32", part, b) for part in parts for b in (1, 8)} <= model
    assert all(r["images_per_s"] > 0 for r in sections["model"])

    runners = {r["runner"]: r for r in sections["stream"]}
    assert set(runners) == {"confluent", "faust"}
    for row in runners.values():
        assert row["events"] == report["plan"]["stream_events"]
        assert row["events_per_s"] > 0 and row["ratio_to_raw"] > 0

    naive = sections["naive"][0]
    # One detection per batch and per commit: as many commits as events.
    assert naive["commits"] == naive["events"] == report["plan"]["naive_events"]
    # The table's rates are rounded to 0.01; the ratio was computed before rounding.
    ratio = runners["confluent"]["events_per_s"] / naive["events_per_s"]
    assert abs(naive["ratio_batched_to_naive"] - ratio) <= 0.01 * ratio + 0.01
    latency = sections["latency"][0]
    assert 0 < latency["p50_ms"] <= latency["p99_ms"] <= latency["max_ms"]
    assert latency["embed_ms"] > 0 and latency["persist_ms"] > 0  # where the time went
    transit = sections["transit"]
    assert [r["fetch_wait_ms"] for r in transit] == list(report["plan"]["transit_waits_ms"])
    assert all(r["events"] == report["plan"]["transit_events"] for r in transit)
    assert all(0 < r["p50_ms"] <= r["p90_ms"] <= r["max_ms"] for r in transit)
    assert sections["memory"][0]["peak_rss_mb"] > 0
    assert {r["deer"] for r in sections["matching"]} >= set(report["plan"]["deer_counts"])
    assert all(r["share_of_batch"] > 0 for r in sections["matching"])
    replay = sections["replay"][0]
    assert replay["stored"] == replay["events"] == report["plan"]["replay_events"]
    assert replay["detections_per_s"] > 0
    thumbs = sections["thumbnails"]
    assert [(r["path"].split()[0], r["thumbnails"]) for r in thumbs] == [
        ("decode+crop", "off"),
        ("decode+crop", "on"),
        ("write_batch", "off"),
        ("write_batch", "on"),
    ]
    assert all(r["ms_median"] > 0 and r["n"] > 0 for r in thumbs)
    assert 0 < thumbs[1]["thumbnail_bytes_mean"] <= thumbs[1]["thumbnail_bytes_max"] <= 16_384
