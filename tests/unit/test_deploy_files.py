"""The deployment files, by parsing (no Docker engine here): the compose services, ports,
healthchecks and GPU reservation; the consumer's environment against the settings the code
reads; Prometheus, Grafana and alert wiring; the Dockerfile's shape and pinned dependencies."""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

from streams.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
LONG_RUNNING = {"kafka", "postgres", "redis", "consumer", "prometheus", "grafana"}
ONE_SHOT = {"migrate", "simulator"}
SETTINGS_VARS = {f"REID_{name.upper()}" for name in Settings.model_fields}
# Bind-mounted folders the operator provides (weights, simulator photos): not in the repo.
OPERATOR_FOLDERS = {"./models", "./images"}


def interpolate(value: Any) -> str:
    """Compose's ${VAR:-default} / ${VAR-default} / ${VAR} with nothing set in the shell."""
    return re.sub(r"\$\{\w+(?::?-([^}]*))?\}", lambda m: m.group(1) or "", str(value))


def env_of(service: str) -> dict[str, str]:
    env = SERVICES[service].get("environment", {})
    assert isinstance(env, dict), f"{service}: environment as a mapping"
    return {k: interpolate(v) for k, v in env.items()}


def test_the_services_of_the_stack() -> None:
    assert set(SERVICES) == LONG_RUNNING | ONE_SHOT
    kafka = env_of("kafka")
    assert set(kafka["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}  # KRaft
    assert "zookeeper" not in json.dumps(COMPOSE).lower()
    assert SERVICES["postgres"]["image"].startswith("pgvector/pgvector:")
    assert SERVICES["simulator"]["profiles"] == ["simulator"]
    assert SERVICES["migrate"]["command"] == ["migrate"]
    assert SERVICES["consumer"]["command"] == ["run"]
    assert SERVICES["simulator"]["command"][0] == "produce"


def test_healthchecks_and_restart_policies() -> None:
    for name in LONG_RUNNING:
        service = SERVICES[name]
        check = service.get("healthcheck", {})
        assert check.get("test") and not check.get("disable"), f"{name}: no healthcheck"
        assert service.get("restart") in ("unless-stopped", "always"), name
    for name in ONE_SHOT:  # the image's HEALTHCHECK does not apply to a command that exits
        assert SERVICES[name]["healthcheck"] == {"disable": True}, name
        assert SERVICES[name]["restart"] == "no", name
    consumer = SERVICES["consumer"]
    assert "/readyz" in " ".join(consumer["healthcheck"]["test"])
    assert consumer["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    for dep in ("kafka", "postgres", "redis"):
        assert consumer["depends_on"][dep] == {"condition": "service_healthy"}
    assert SERVICES["migrate"]["depends_on"]["postgres"] == {"condition": "service_healthy"}
    grace = int(consumer["stop_grace_period"].rstrip("s"))
    assert grace > float(env_of("consumer")["REID_SHUTDOWN_TIMEOUT_S"])


def test_ports() -> None:
    def host_ports(name: str) -> set[int]:
        return {int(str(p).split(":")[0]) for p in SERVICES[name].get("ports", [])}

    assert host_ports("prometheus") == {9090}
    assert host_ports("grafana") == {3000}
    assert host_ports("kafka") == {29092}
    # Replicas cannot share a host port; Prometheus reaches each one inside the network.
    assert host_ports("consumer") == set()
    port = int(env_of("consumer")["REID_METRICS_PORT"])
    assert SERVICES["consumer"]["expose"] == [str(port)]
    assert f"127.0.0.1:{port}/readyz" in " ".join(SERVICES["consumer"]["healthcheck"]["test"])
    assert env_of("consumer")["REID_METRICS_HOST"] == "0.0.0.0"


def test_consumer_scales_in_one_group_with_a_gpu_each() -> None:
    deploy = SERVICES["consumer"]["deploy"]
    assert int(interpolate(deploy["replicas"])) >= 1
    (device,) = deploy["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "container_name" not in SERVICES["consumer"]  # would forbid replicas
    # Every replica joins the same group: no per-replica group id.
    raw_group = SERVICES["consumer"]["environment"].get("REID_GROUP_ID", "reid-stream")
    assert "$" not in str(raw_group)


@pytest.mark.parametrize("service", ["consumer", "migrate", "simulator"])
def test_environment_is_settings_the_code_reads(
    service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = env_of(service)
    unknown = sorted(k for k in env if k.startswith("REID_") and k not in SETTINGS_VARS)
    assert unknown == [], f"{service} sets variables no setting reads: {unknown}"
    assert not [k for k in env if not k.startswith("REID_")], "only REID_ settings"
    for var in [v for v in os.environ if v.startswith("REID_")]:
        monkeypatch.delenv(var)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    s = load_settings()  # the values validate
    assert s.kafka_bootstrap_servers == "kafka:9092"
    assert "@postgres:5432/" in s.database_url.get_secret_value()
    assert s.redis_url is not None and "redis:6379" in s.redis_url.get_secret_value()


def test_bind_mounts_exist_in_the_repository() -> None:
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = interpolate(volume).split(":")[0]
            if source.startswith("./") and source not in OPERATOR_FOLDERS:
                assert (ROOT / source).exists(), f"{name}: {source} missing"


def test_prometheus_scrapes_the_consumers_and_loads_the_rules() -> None:
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["consumer"]
    assert sd["port"] == int(env_of("consumer")["REID_METRICS_PORT"])
    mounts = {v.split(":")[1] for v in SERVICES["prometheus"]["volumes"] if v.startswith("./")}
    assert set(config["rule_files"]) <= mounts
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    assert {"ReidConsumerLagGrowing", "ReidNoCommits", "ReidDeadLetterSpike",
            "ReidPostgresUnreachable"} <= set(alerts)  # fmt: skip
    for name, rule in alerts.items():
        assert rule["expr"].strip() and rule["labels"]["severity"] in ("warning", "critical")
        assert re.fullmatch(r"\d+[smh]", rule["for"]), name
        assert rule["annotations"]["summary"], name


def test_grafana_provisions_the_datasource_and_dashboard() -> None:
    grafana = SERVICES["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("./"))
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    (ds,) = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"]
    assert ds["url"] == "http://prometheus:9090" and ds["type"] == "prometheus"
    (provider,) = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/dashboards/reid.yml").read_text()
    )["providers"]
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/reid-stream.json").read_text())
    uids = {p["datasource"]["uid"] for p in dashboard["panels"] if p.get("type") != "row"} | {
        t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])
    }
    assert uids == {ds["uid"]}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("throughput", "end-to-end latency", "stage latency", "batch size", "lag",
                  "existing vs new", "dead letters", "cache hit ratio", "gpu memory"):  # fmt: skip
        assert topic in titles, topic


def test_dockerfile() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\w+))?", text, re.M)
    assert len(stages) >= 3, "multi-stage"
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+-runtime-", text, re.M)
    runtime = text[text.rindex("\nFROM ") :]
    assert re.search(r"^USER (?!root|0\b)\w+", runtime, re.M), "non-root"
    assert "HEALTHCHECK" in runtime and "/healthz" in runtime
    assert "--no-deps -r requirements.lock" in text
    assert "WEIGHTS_URL" in text
    entry = (ROOT / "deploy/docker-entrypoint.sh").read_text()
    assert entry.startswith("#!/bin/sh") and 'exec reid-stream "$@"' in entry
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def test_requirements_lock_pins_what_pyproject_asks_for() -> None:
    pins: dict[str, str] = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not pinned: {line}"
            pins[name.lower().replace("_", "-")] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for spec in project["dependencies"]:
        req = Requirement(spec)
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} missing from requirements.lock"
        assert req.specifier.contains(pins[name]), f"{name}=={pins[name]} vs {req.specifier}"
        for extra in req.extras:  # redis[hiredis], psycopg[binary]
            assert {"hiredis": "hiredis", "binary": "psycopg-binary"}[extra] in pins
