"""StreamMetrics: the names a dashboard relies on, over real HTTP."""

from __future__ import annotations

import urllib.request

from sinks.metrics import StreamMetrics

EXPECTED = [
    "reid_events_consumed_total",
    "reid_batches_total",
    "reid_batch_size_bucket",
    'reid_stage_duration_seconds_count{stage="decode"}',
    'reid_stage_duration_seconds_count{stage="embed"}',
    'reid_stage_duration_seconds_count{stage="match"}',
    'reid_stage_duration_seconds_count{stage="persist"}',
    'reid_stage_duration_seconds_count{stage="publish"}',
    'reid_stage_duration_seconds_count{stage="commit"}',
    "reid_end_to_end_latency_seconds_bucket",
    'reid_assignments_total{outcome="existing"}',
    'reid_assignments_total{outcome="new"}',
    "reid_dead_letters_total",
    'reid_cache_requests_total{result="hit"}',
    'reid_cache_requests_total{result="miss"}',
    "reid_cache_errors_total",
    "reid_store_errors_total",
    "reid_known_deer",
    "reid_last_commit_timestamp_seconds",
    "reid_model_info",
]


def test_metrics_are_served_over_http() -> None:
    metrics = StreamMetrics()
    metrics.embedding_info.info(
        {"embedding_version": "r50ms-effb0-v1", "device": "cpu", "precision": "fp32"}
    )
    metrics.dead_letters.labels(reason="bad_json").inc()
    metrics.batch_size.observe(37)
    metrics.known_deer.set(12)
    port = metrics.serve(0)
    try:
        assert port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            body = response.read().decode()
    finally:
        metrics.shutdown()

    for name in EXPECTED:
        assert name in body, name
    assert 'reid_dead_letters_total{reason="bad_json"} 1.0' in body
    assert 'reid_batch_size_bucket{le="64.0"} 1.0' in body
    assert 'reid_batch_size_bucket{le="32.0"} 0.0' in body
    assert "reid_known_deer 12.0" in body
    assert 'embedding_version="r50ms-effb0-v1"' in body
    assert b"reid_known_deer 12.0" in metrics.render()


def test_registries_are_independent_and_shutdown_frees_the_port() -> None:
    a, b = StreamMetrics(), StreamMetrics()  # a shared registry would raise "Duplicated timeseries"
    a.batches.inc(3)
    assert b"reid_batches_total 3.0" in a.render()
    assert b"reid_batches_total 0.0" in b.render()

    port = a.serve(0)
    a.shutdown()
    again = b.serve(port)  # the port was released
    try:
        assert again == port
    finally:
        b.shutdown()
    a.shutdown()  # idempotent
