"""The dashboard and the alert rules read only metrics that a running consumer exports.

One real `reid-stream run` process (JSON logs, small model input) against the embedded
broker, PostgreSQL and Redis: its /metrics must carry every metric name that the Grafana
dashboard's PromQL and the Prometheus alert rules use; /healthz and /readyz answer; the JSON
log lines carry the batch fields and no image bytes.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from sinks.migrate import migrate
from streams.tools.produce import detection_event
from streams.topics import ensure_topics, read_topic
from tests.conftest import stream_environment, zebra_images
from tests.integration.test_streams_end_to_end import produce, stream_consumer

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "reid-stream.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
# Series Prometheus makes itself for every target; no consumer exports them.
PROMETHEUS_OWN = {"up"}
METRIC = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?=\{|\[|\)|$|\s)")
PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "by", "without", "on", "ignoring", "and", "or",
    "unless", "rate", "irate", "increase", "delta", "deriv", "histogram_quantile", "clamp_min",
    "clamp_max", "offset", "bool", "group_left", "group_right", "label_values", "instance",
    "le", "stage", "topic", "partition", "outcome", "reason", "result", "decision",
    "dependency", "job", "abs", "time", "absent", "e", "max_over_time",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords,
    label names or Grafana variables (string literals and durations removed first)."""
    expr = re.sub(r'"[^"]*"', '""', expr)  # label values
    expr = re.sub(r"\$\w+|\$\{[^}]*\}", "", expr)  # Grafana variables
    expr = re.sub(r"\[[^\]]*\]", "[]", expr)  # ranges and subqueries
    expr = re.sub(r"\b\d+(\.\d+)?(e-?\d+)?\b", "", expr)  # numbers
    names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr))
    return {n for n in names if n not in PROMQL_WORDS}


def dashboard_exprs(node: Any) -> list[str]:
    found: list[str] = []
    if isinstance(node, dict) and node.get("type") == "datasource":
        return found  # the datasource variable: its query names a plugin, not PromQL
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition", "query") and isinstance(value, str):
                found.append(value)
            else:
                found += dashboard_exprs(value)
    elif isinstance(node, list):
        for item in node:
            found += dashboard_exprs(item)
    return found


def alert_exprs() -> list[str]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule["expr"] for group in doc["groups"] for rule in group["rules"]]


def test_the_name_extractor_finds_metrics_and_nothing_else() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (le, stage) (rate(reid_stage_duration_seconds_bucket"
        '{instance=~"$instance",stage="embed"}[5m]))) / clamp_min(sum(reid_known_deer), 1e-9)'
        " and on (instance) up == 0"
    )
    assert metric_names(expr) == {"reid_stage_duration_seconds_bucket", "reid_known_deer", "up"}
    assert metric_names("label_values(reid_model_info, instance)") == {"reid_model_info"}
    variable = {"name": "datasource", "type": "datasource", "query": "prometheus"}
    assert dashboard_exprs({"templating": {"list": [variable]}}) == []


def exported(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def wait_for(what: str, condition, timeout_s: float, output=lambda: "") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = condition()
        except (OSError, urllib.error.URLError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}\n{output()}")
        time.sleep(0.3)


@pytest.fixture()
def env(stack, database_url, unique) -> dict[str, str]:
    migrate(database_url)
    return stream_environment(
        stack,
        database_url,
        unique,
        REID_BATCH_MAX_SIZE="4",
        REID_INPUT_SIZE="64",
        REID_LOG_FORMAT="json",
        REID_LAG_INTERVAL_S="0.5",
        REID_HEALTH_INTERVAL_S="0.5",
    )


def test_dashboard_and_alerts_read_exported_metrics(env: dict[str, str]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    wanted = set().union(*(metric_names(e) for e in dashboard_exprs(dashboard)))
    alerting = set().union(*(metric_names(e) for e in alert_exprs())) - PROMETHEUS_OWN
    # The dashboard covers what the operators asked for; a typo'd or dropped panel fails here.
    for name in (
        "reid_events_consumed_total", "reid_end_to_end_latency_seconds_bucket",
        "reid_stage_duration_seconds_bucket", "reid_batch_size_sum",
        "reid_consumer_lag_messages", "reid_assignments_total", "reid_dead_letters_total",
        "reid_cache_requests_total", "reid_gpu_memory_allocated_bytes",
    ):  # fmt: skip
        assert name in wanted, name

    port = int(env["REID_METRICS_PORT"])
    bootstrap = env["REID_KAFKA_BOOTSTRAP_SERVERS"]
    topics = [env["REID_TOPIC_DETECTIONS"], env["REID_TOPIC_ASSIGNMENTS"],
              env["REID_TOPIC_DEAD_LETTERS"]]  # fmt: skip
    ensure_topics({"bootstrap.servers": bootstrap}, topics, 2)
    good = []
    for i, (_who, path) in enumerate(zebra_images(individuals=2, per_individual=3)):
        event = detection_event(path.read_bytes(), f"cam-{i % 2}", detection_id=f"dash-{i}")
        good.append((event["camera_id"], json.dumps(event).encode()))
    image_prefix = json.loads(good[0][1])["image_b64"][:64]

    with stream_consumer(env) as consumer:
        out = lambda: consumer.proc.poll() and "consumer exited"  # noqa: E731
        # Alive while the model is still loading; ready once it consumes.
        wait_for("/healthz", lambda: get(port, "/healthz")[0] == 200, 60, out)
        wait_for("/readyz 200", lambda: get(port, "/readyz")[0] == 200, 120, out)
        _, body = get(port, "/readyz")
        ready = json.loads(body)
        assert ready["status"] == "ready"
        assert set(ready["checks"]) >= {"model", "kafka", "postgres", "consumer"}
        assert set(ready["checks"].values()) == {"ok"}

        produce(bootstrap, topics[0], [*good[:3], ("cam-bad", b'{"schema": 1,'), *good[3:]])
        read_topic({"bootstrap.servers": bootstrap}, topics[1], expected=len(good), timeout_s=120)
        read_topic({"bootstrap.servers": bootstrap}, topics[2], expected=1, timeout_s=30)

        def scraped() -> set[str] | None:
            names = exported(get(port, "/metrics")[1].decode())
            # Lag appears with the first sample after an assignment; dead letters with the
            # first bad event.
            return names if "reid_consumer_lag_messages" in names else None

        names = wait_for("the lag metric", scraped, 20)
        text = get(port, "/metrics")[1].decode()
        assert get(port, "/nope")[0] == 404

    missing_dashboard = sorted(wanted - names)
    missing_alerts = sorted(alerting - names)
    assert not missing_dashboard, f"dashboard queries metrics nobody exports: {missing_dashboard}"
    assert not missing_alerts, f"alert rules use metrics nobody exports: {missing_alerts}"

    # Values that say the hooks ran, not only that the series exist.
    assert 'reid_dead_letters_total{reason="bad_json"} 1.0' in text

    def value(series: str) -> float:
        return float(re.search("^" + re.escape(series) + r" (\S+)$", text, re.M).group(1))

    # Every match is observed; so is every new deer but the very first, which (in an empty
    # database) had no candidate to reject.
    existing = value('reid_assignments_total{outcome="existing"}')
    new = value('reid_assignments_total{outcome="new"}')
    assert existing + new == len(good)
    assert value('reid_match_similarity_count{decision="accepted"}') == existing
    assert value('reid_match_similarity_count{decision="rejected"}') == new - 1
    assert re.search(r"reid_batch_fill_ratio_count [1-9]", text)
    assert 'reid_dependency_up{dependency="postgres"} 1.0' in text
    assert 'reid_dependency_up{dependency="kafka"} 1.0' in text
    assert "reid_gpu_memory_allocated_bytes 0.0" in text  # on the CPU
    assert 'backbones="multiscale-resnet50+efficientnet-b0"' in text
    assert re.search(r"reid_assigned_partitions 2\.0", text)
    assert 0 <= value("reid_last_commit_age_seconds") < 60

    # JSON logs: the batch lines carry structured fields; no image bytes anywhere.
    lines = [line for line in consumer.output.splitlines() if line.startswith("{")]
    docs = [json.loads(line) for line in lines]
    batches = [d for d in docs if "batch_id" in d]
    assert batches, consumer.output[-3000:]
    assert sum(d["messages"] for d in batches) == len(good) + 1
    assert all(isinstance(d["offsets"], str) and d["offsets"] for d in batches)
    assert {d["level"] for d in docs} >= {"INFO", "WARNING"}
    assert any(d.get("reason") == "bad_json" for d in docs)
    assert image_prefix not in consumer.output
