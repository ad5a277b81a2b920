"""The deployment files, by parsing (no Docker engine here): the compose services, ports
(loopback unless asked), healthchecks, one consumer per GPU and the CPU-only override; the
environment against the settings the code reads; secrets (database and Grafana passwords);
Prometheus, Alertmanager, Grafana and alert wiring; the Dockerfile's shape, its non-root
numeric user and pinned dependencies; what the README says about the image and CUDA."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

from streams.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]


class ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's `!reset` tag (an override file removing a key of the base file)."""


def _reset(loader: yaml.SafeLoader, node: yaml.Node) -> dict[str, Any]:
    if isinstance(node, yaml.MappingNode):
        value: Any = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)
    return {"!reset": value}


ComposeLoader.add_constructor("!reset", _reset)
COMPOSE = yaml.load((ROOT / "docker-compose.yml").read_text(), ComposeLoader)
CPU = yaml.load((ROOT / "docker-compose.cpu.yml").read_text(), ComposeLoader)
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
GPU_CONSUMERS = ["consumer", "consumer-gpu1", "consumer-gpu2", "consumer-gpu3"]
LONG_RUNNING = {"kafka", "postgres", "redis", "prometheus", "alertmanager", "grafana",
                *GPU_CONSUMERS}  # fmt: skip
ONE_SHOT = {"migrate", "simulator"}
# Read by load_settings() itself: the secret files' folder.
SETTINGS_VARS = {f"REID_{name.upper()}" for name in Settings.model_fields} | {"REID_SECRETS_DIR"}
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


def published(name: str) -> dict[int, str]:
    """host port -> the address it is published on, for one service (nothing set in the
    shell)."""
    ports = {}
    for spec in SERVICES[name].get("ports", []):
        address, host, _container = interpolate(spec).rsplit(":", 2)
        ports[int(host)] = address
    return ports


def test_ports_are_published_on_loopback_unless_asked() -> None:
    assert published("prometheus") == {9090: "127.0.0.1"}
    assert published("grafana") == {3000: "127.0.0.1"}
    assert published("kafka") == {29092: "127.0.0.1"}
    assert published("alertmanager") == {9093: "127.0.0.1"}
    for name, service in SERVICES.items():
        for spec in service.get("ports", []):
            # Every published port names its address, which BIND_ADDRESS can widen.
            assert str(spec).startswith("${BIND_ADDRESS:-127.0.0.1}:"), (name, spec)
    port = int(env_of("consumer")["REID_METRICS_PORT"])
    for name in GPU_CONSUMERS:
        # Consumers cannot share a host port; Prometheus reaches each inside the network.
        assert published(name) == {}, name
        assert SERVICES[name]["expose"] == [str(port)]
        assert f"127.0.0.1:{port}/readyz" in " ".join(SERVICES[name]["healthcheck"]["test"])
    assert env_of("consumer")["REID_METRICS_HOST"] == "0.0.0.0"


def test_one_consumer_service_per_gpu() -> None:
    """`deploy.replicas` with `count: 1` gives every replica GPU 0: each consumer service
    reserves one GPU by its id instead, and they differ."""
    devices = []
    for name in GPU_CONSUMERS:
        service = SERVICES[name]
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        assert "count" not in device and "replicas" not in service["deploy"], name
        (gpu,) = device["device_ids"]
        devices.append(gpu)
        assert "container_name" not in service
        # One group, one Prometheus name (the network alias), one configuration.
        assert service["networks"]["default"]["aliases"] == ["consumer"], name
        assert service["environment"] == SERVICES["consumer"]["environment"], name
        assert service["command"] == ["run"]
        assert "REID_GROUP_ID" not in service["environment"]
    assert devices == ["0", "1", "2", "3"]
    assert "profiles" not in SERVICES["consumer"]  # GPU 0 starts by default
    assert SERVICES["consumer-gpu1"]["profiles"] == ["gpu2", "gpu4"]
    assert SERVICES["consumer-gpu3"]["profiles"] == ["gpu4"]


def test_cpu_override_runs_the_stack_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    overrides = CPU["services"]
    assert set(overrides) <= set(SERVICES)
    consumer = overrides["consumer"]
    assert consumer["deploy"] == {"!reset": {}}  # the GPU reservation is removed
    env = {**env_of("consumer"), **{k: interpolate(v) for k, v in consumer["environment"].items()}}
    assert env["REID_DEVICE"] == "cpu" and env["REID_BACKEND"] == "onnx"
    for name in ("migrate", "simulator", "consumer"):
        build = overrides[name]["build"]
        assert not build["args"]["CUDA_IMAGE"].startswith("nvidia/"), name
        assert build["args"]["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
        # Another tag than the GPU image, so the two never overwrite each other.
        assert interpolate(overrides[name]["image"]) != interpolate(SERVICES[name]["image"])
    # What the override starts is valid settings.
    for var in [v for v in os.environ if v.startswith("REID_")]:
        monkeypatch.delenv(var)
    for key, value in env.items():
        if key != "REID_SECRETS_DIR":
            monkeypatch.setenv(key, value)
    s = load_settings()
    assert (s.device, s.backend) == ("cpu", "onnx")
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG TORCH_INDEX=", text, re.M) and "$TORCH_INDEX" in text


@pytest.mark.parametrize("service", ["consumer", "migrate", "simulator"])
def test_environment_is_settings_the_code_reads(
    service: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env = env_of(service)
    unknown = sorted(k for k in env if k.startswith("REID_") and k not in SETTINGS_VARS)
    assert unknown == [], f"{service} sets variables no setting reads: {unknown}"
    assert not [k for k in env if not k.startswith("REID_")], "only REID_ settings"
    # The database password is a secret file, never an environment variable.
    assert "REID_DATABASE_URL" not in env and env["REID_SECRETS_DIR"] == "/run/secrets"
    assert SERVICES[service]["secrets"] == ["reid_database_url"]
    # The secrets folder as deploy/make-secrets.sh makes it, mounted where the service reads.
    secrets = tmp_path / "secrets"
    subprocess.run(["sh", str(ROOT / "deploy" / "make-secrets.sh"), str(secrets)], check=True,
                   capture_output=True)  # fmt: skip
    for var in [v for v in os.environ if v.startswith("REID_")]:
        monkeypatch.delenv(var)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("REID_SECRETS_DIR", str(secrets))
    s = load_settings()  # the values validate
    assert s.kafka_bootstrap_servers == "kafka:9092"
    password = (secrets / "postgres_password").read_text()
    assert len(password) >= 32
    assert s.database_url.get_secret_value() == f"postgresql://reid:{password}@postgres:5432/reid"
    assert s.redis_url is not None and "redis:6379" in s.redis_url.get_secret_value()
    assert s.topic_replication_factor >= 1 and s.topic_min_insync_replicas is not None


def test_passwords_come_from_secret_files() -> None:
    files = {name: spec["file"] for name, spec in COMPOSE["secrets"].items()}
    names = ("reid_database_url", "postgres_password", "grafana_admin_password")
    assert files == {name: f"./secrets/{name}" for name in names}
    script = (ROOT / "deploy" / "make-secrets.sh").read_text()
    for name in files:
        assert f"write {name} " in script, f"make-secrets.sh does not make {name}"
        for service in SERVICES.values():
            assert set(service.get("secrets", [])) <= set(files)
    assert "/secrets/" in (ROOT / ".gitignore").read_text().split()
    postgres = env_of("postgres")
    assert "POSTGRES_PASSWORD" not in postgres
    assert postgres["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    grafana = env_of("grafana")
    assert "GF_SECURITY_ADMIN_PASSWORD" not in grafana  # no admin/admin default
    assert grafana["GF_SECURITY_ADMIN_PASSWORD__FILE"] == "/run/secrets/grafana_admin_password"
    # No password in any environment, default or not.
    for name, service in SERVICES.items():
        for key, value in (service.get("environment") or {}).items():
            assert "PASSWORD" not in key or key.endswith("_FILE"), (name, key)
            assert not re.search(r"://[^/@:]+:[^/@]+@", str(value)), (name, key)


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
    assert sd["names"] == ["consumer"]  # the alias every per-GPU consumer service carries
    # No HTTP endpoint that stops or reloads Prometheus.
    assert not [a for a in SERVICES["prometheus"]["command"] if "lifecycle" in a]
    (am,) = config["alerting"]["alertmanagers"]
    assert am["static_configs"][0]["targets"] == ["alertmanager:9093"]
    assert SERVICES["prometheus"]["depends_on"]["alertmanager"] == {"condition": "service_healthy"}
    assert sd["port"] == int(env_of("consumer")["REID_METRICS_PORT"])
    mounts = {v.split(":")[1] for v in SERVICES["prometheus"]["volumes"] if v.startswith("./")}
    assert set(config["rule_files"]) <= mounts
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    assert {"ReidConsumerLagGrowing", "ReidNoCommits", "ReidDeadLetterSpike",
            "ReidPostgresUnreachable", "ReidConsumerDown",
            "ReidConsumerAbsent"} <= set(alerts)  # fmt: skip
    # A dead consumer's target vanishes instead of going `up == 0`.
    assert "absent(" in alerts["ReidConsumerAbsent"]["expr"]
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
    # Importable into any Grafana: every query names the `datasource` variable, not a uid.
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == ds["type"] == "prometheus"
    assert ds["isDefault"] is True  # what the variable picks in the compose stack
    uids = (
        {p["datasource"]["uid"] for p in dashboard["panels"] if p.get("type") != "row"}
        | {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])}
        | {v["datasource"]["uid"] for v in variables.values() if "datasource" in v}
    )
    assert uids == {"${datasource}"}
    assert '"uid": "prometheus"' not in json.dumps(dashboard)
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
    # Numeric and not 0, so that Kubernetes' runAsNonRoot can check it.
    (user,) = re.findall(r"^USER (\S+)$", runtime, re.M)
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0 and (not gid or gid.isdigit()), user
    assert f"--uid {uid}" in runtime, "the numeric user exists in the image"
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


def test_alertmanager_has_a_placeholder_receiver() -> None:
    service = SERVICES["alertmanager"]
    mounts = dict(v.split(":")[:2] for v in service["volumes"] if v.startswith("./"))
    path = mounts["./deploy/alertmanager/alertmanager.yml"]
    assert f"--config.file={path}" in service["command"]
    config = yaml.safe_load((ROOT / "deploy/alertmanager/alertmanager.yml").read_text())
    receivers = {r["name"]: r for r in config["receivers"]}
    routes = [config["route"], *config["route"].get("routes", [])]
    assert {r["receiver"] for r in routes if "receiver" in r} <= set(receivers)
    (hook,) = receivers[config["route"]["receiver"]]["webhook_configs"]
    # A placeholder that cannot reach anyone by accident (.invalid never resolves).
    assert ".invalid" in hook["url"]


def test_readme_states_the_image_and_what_the_pinned_torch_needs() -> None:
    readme = (ROOT / "README.md").read_text()
    base = re.search(r"^ARG CUDA_IMAGE=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert base and f"`{base.group(1)}`" in readme, "the README names the image's base"
    pins = dict(
        line.split("==") for line in (ROOT / "requirements.lock").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )  # fmt: skip
    cuda = re.match(r"(\d+\.\d+)", pins["nvidia-cuda-runtime"]).group(1)  # 13.0.96 -> 13.0
    for needle in (f"torch=={pins['torch']}", f"torchvision=={pins['torchvision']}",
                   f"CUDA {cuda}", "driver", "compute capability",
                   "download.pytorch.org/whl/cpu"):  # fmt: skip
        assert needle in readme, needle
