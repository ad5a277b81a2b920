"""The one settings object: environment variables (prefix ``REID_``) and an optional file.

The file is a dotenv-style ``KEY=value`` list named by ``REID_SETTINGS_FILE`` (or ``--settings``);
environment variables win over it. Secrets can also come from files in ``REID_SECRETS_DIR``
(Docker/Kubernetes secrets), one file per setting named like its variable in lower case, e.g.
``reid_database_url``. ``reid`` and ``sinks`` never read settings themselves: the
stream passes each component the values it needs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from reid.matching import (
    DEFAULT_REVIEW_BAND,
    DEFAULT_REVIEW_MARGIN,
    DEFAULT_THRESHOLD,
    W_EFFNET,
    W_RESNET,
)
from sinks.pg import PgTimeouts, set_default_timeouts
from sinks.redaction import add_secrets, passwords_in
from streams.logs import kafka_logger


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="REID_", extra="forbid", frozen=True)

    # Kafka
    kafka_bootstrap_servers: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers")
    kafka_options: dict[str, str] = Field(
        default_factory=dict,
        description="Extra librdkafka options for every client, as JSON (SASL/TLS go here)",
    )
    kafka_password: SecretStr | None = Field(
        None, description="SASL password; kept out of logs and of kafka_options"
    )
    group_id: str = Field("reid-stream", description="Consumer group of `reid-stream run`")
    topic_detections: str = Field("detections", description="Input topic")
    topic_assignments: str = Field("assignments", description="Output topic, key = deer_id")
    topic_dead_letters: str = Field("detections.dlq", description="Dead-letter topic")
    topic_deer_changes: str = Field(
        "deer.changes", description="Curation changes (merge, split, move, confirm), 1 partition"
    )
    topic_partitions: int = Field(
        4, ge=1, description="Partitions for topics that `run`/`produce` create when missing"
    )
    session_timeout_ms: int = Field(
        10_000, ge=1_000, description="Consumer session timeout (a group join waits about half)"
    )
    max_message_bytes: int = Field(
        8_000_000, ge=1_000, description="Larger input events are dead-lettered"
    )
    dead_letter_dir: Path | None = Field(
        None,
        description="Folder keeping the original of a dead letter too large for its topic, as "
        "<sha256>.bin (empty = not kept; the dead letter is truncated either way)",
    )
    topic_replication_factor: int = Field(
        -1, ge=-1, le=32767,
        description="Replication factor of the topics created when missing (-1 = broker default)",
    )  # fmt: skip
    topic_min_insync_replicas: int | None = Field(
        None, ge=1, description="min.insync.replicas of the topics created (empty = broker's)"
    )

    # Batching
    batch_max_size: int = Field(32, ge=1, le=1024, description="Events per model batch")
    batch_max_wait_ms: int = Field(
        200, ge=1, description="A partial batch waits at most this long for more events"
    )
    batch_min_wait_ms: int = Field(
        0, ge=0,
        description="With the model idle, flush once nothing more is buffered and the first "
        "event waited this long (= max wait: a fixed window)",
    )  # fmt: skip
    kafka_fetch_wait_ms: int = Field(
        500, ge=0, le=60_000,
        description="How long the broker may hold a fetch while nothing new is there (Apache "
        "Kafka answers at once when an event arrives; the embedded broker only when this "
        "expires, so the embedded stack sets 50)",
    )  # fmt: skip
    pipeline_depth: int = Field(
        3, ge=1, le=16,
        description="Batches in flight at once (decode, embed, write overlap); 1 = one at a time",
    )  # fmt: skip
    gpu_decode: Literal["auto", "on", "off"] = Field(
        "auto", description="Decode JPEG crops on the model's GPU (auto = when it runs on CUDA)"
    )
    decode_workers: int = Field(
        0, ge=0, description="Threads decoding and cropping images (0 = one per core)"
    )

    # Images
    image_roots: list[Path] = Field(
        default_factory=list,
        description="Folders that `image_uri` may point into (JSON list); empty = none allowed",
    )
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="Decoded images above this are refused (bombs)"
    )
    image_wait_ms: int = Field(
        2000, ge=0,
        description="An image_uri whose file is absent is looked for again this long before "
        "the event is dead-lettered as image_not_found (files written after their event)",
    )  # fmt: skip

    # Model and matching
    weights_path: Path | None = Field(None, description="Ensemble checkpoint file")
    weights_base_url: str | None = Field(
        None,
        description="Mirror serving the publishers' files for `reid-stream weights pull` "
        "(empty = download.pytorch.org and huggingface.co)",
    )
    seed: int = Field(0, description="Seed of the initialisation when no weights are found")
    input_size: int | None = Field(
        None, ge=32, le=1024,
        description="Model input side in pixels without a checkpoint (default 224)",
    )  # fmt: skip
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="auto = fp16 on CUDA, fp32 on CPU"
    )
    backend: Literal["auto", "torch", "onnx"] = Field(
        "auto",
        description="What runs the model: auto (onnx on a CPU, torch on CUDA), torch, or onnx "
        "(onnxruntime, CPU only)",
    )
    onnx_cache_dir: Path | None = Field(
        None, description="Folder of exported ONNX models (empty = ~/.cache/reid-stream/onnx)"
    )
    pad_batches: Literal["auto", "on", "off"] = Field(
        "auto", description="Pad model batches to fixed sizes (auto = on CUDA or when compiled)"
    )
    torch_compile: Literal[
        "off", "on", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"
    ] = Field("off", description="torch.compile mode (on = max-autotune on CUDA, default on CPU)")
    # Defaults from the assignment rule itself (reid.matching), so the stream and the offline
    # tools (reid-eval, bench) start from the same numbers.
    threshold: float = Field(
        DEFAULT_THRESHOLD, ge=-1.0, le=1.0, description="Ensemble score to join a deer"
    )
    weight_resnet: float = Field(W_RESNET, ge=0.0, le=1.0, description="Weight of the ResNet score")
    weight_effnet: float = Field(
        W_EFFNET, ge=0.0, le=1.0, description="Weight of EfficientNet score"
    )

    # Curation (docs/curation.md)
    review_band: float = Field(
        DEFAULT_REVIEW_BAND, ge=0.0, le=1.0,
        description="Flag for review when the best score is within this of the threshold",
    )  # fmt: skip
    review_margin: float = Field(
        DEFAULT_REVIEW_MARGIN, ge=0.0, le=1.0,
        description="Flag for review when the runner-up deer is within this of the accepted one",
    )  # fmt: skip
    thumbnail_px: int = Field(
        128, ge=0, le=512, description="Long side of the stored crop thumbnail (0 = none)"
    )
    thumbnail_max_bytes: int = Field(
        16_384, ge=1_024, le=262_144, description="A thumbnail larger than this is not stored"
    )
    review_token: SecretStr | None = Field(
        None, description="Token `reid-stream review` requires; needed to bind beyond loopback"
    )

    # Storage
    database_url: SecretStr = Field(
        SecretStr("postgresql://postgres@127.0.0.1:5432/reid"), description="PostgreSQL DSN"
    )
    redis_url: SecretStr | None = Field(
        SecretStr("redis://127.0.0.1:6379/0"), description="Redis URL; empty disables the cache"
    )
    cache_key_prefix: str = Field("reid", description="Prefix of the Redis keys")
    gallery_refresh_s: float = Field(
        5.0, ge=0, description="How often the in-memory gallery reads deer changed elsewhere"
    )
    gallery_refresh_margin_s: float = Field(
        60.0, ge=0, description="How far before the previous read a gallery refresh looks back"
    )

    # Operations
    metrics_host: str = Field("127.0.0.1", description="Bind address of /metrics")
    metrics_port: int = Field(9108, ge=0, le=65535, description="Port of /metrics (0 = any)")
    shutdown_timeout_s: float = Field(
        30.0, gt=0, description="SIGTERM: exit with code 3 if still blocked after this long"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        "INFO", description="Python logging level"
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="text lines, or one JSON object per line (for log shippers)"
    )
    lag_interval_s: float = Field(
        5.0, gt=0, description="How often partition end offsets are read for the lag metric"
    )
    health_interval_s: float = Field(
        5.0, gt=0, description="How often /readyz re-checks the broker, Postgres and Redis"
    )
    version_poll_s: float = Field(
        5.0, gt=0, description="How often the live consumer reads the active embedding version"
    )
    health_timeout_s: float = Field(
        3.0, gt=0, description="A /readyz dependency check with no answer after this fails"
    )
    pg_connect_timeout_s: float = Field(
        5.0, gt=0, description="PostgreSQL connect timeout (every connection)"
    )
    pg_statement_timeout_ms: int = Field(
        30_000, ge=0, description="Server-side statement_timeout of every connection (0 = none)"
    )
    pg_idle_in_transaction_timeout_ms: int = Field(
        60_000, ge=0,
        description="Server-side idle_in_transaction_session_timeout (0 = none)",
    )  # fmt: skip
    pg_call_timeout_s: float = Field(
        60.0, ge=0,
        description="Client-side deadline of one database call: a hung server's connection "
        "is aborted after this (0 = none; keep it above the statement timeout)",
    )  # fmt: skip
    version_gap_s: float = Field(
        30.0, ge=0,
        description="A new deer waits while a deer created this recently under another "
        "version has no centroid of the batch's version yet (a replay fills it in)",
    )  # fmt: skip

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("redis_url", "review_token", mode="before")
    @classmethod
    def _empty_redis_disables(cls, value: Any) -> Any:
        return None if value in ("", None) else value

    @field_validator(
        "weights_path",
        "input_size",
        "onnx_cache_dir",
        "topic_min_insync_replicas",
        "weights_base_url",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # Compose passes `${VAR:-}` as an empty string; that means "not set", not Path(".").
        return None if value == "" else value

    @field_validator("torch_compile", mode="before")
    @classmethod
    def _compile_switch(cls, value: Any) -> Any:
        # REID_TORCH_COMPILE=true/false reads as a switch; a mode name picks the mode.
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no", ""):
            return "on" if value.lower() in ("true", "1", "yes") else "off"
        return value

    @model_validator(mode="after")
    def _min_wait_within_max(self) -> Settings:
        if self.batch_min_wait_ms > self.batch_max_wait_ms:
            raise ValueError("batch_min_wait_ms must not exceed batch_max_wait_ms")
        return self

    @model_validator(mode="after")
    def _weights_sum_to_one(self) -> Settings:
        if abs(self.weight_resnet + self.weight_effnet - 1.0) > 1e-6:
            raise ValueError("weight_resnet + weight_effnet must be 1.0")
        return self

    # -- views for the components -----------------------------------------------------------
    def kafka_common(self) -> dict[str, Any]:
        # librdkafka's own log lines go through Python logging (JSON with the rest, and
        # rate-limited) instead of straight to stderr.
        conf: dict[str, Any] = {"bootstrap.servers": self.kafka_bootstrap_servers,
                                "logger": kafka_logger()}  # fmt: skip
        conf.update(self.kafka_options)
        if self.kafka_password is not None:
            conf["sasl.password"] = self.kafka_password.get_secret_value()
        return conf

    def consumer_config(self, group_id: str | None = None) -> dict[str, Any]:
        conf = self.kafka_common()
        conf.update(
            {
                "group.id": group_id or self.group_id,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                "session.timeout.ms": self.session_timeout_ms,
                "heartbeat.interval.ms": max(500, self.session_timeout_ms // 5),
                "partition.assignment.strategy": "cooperative-sticky",
                "fetch.max.bytes": max(52_428_800, self.max_message_bytes * 2),
                "max.partition.fetch.bytes": max(1_048_576, self.max_message_bytes + 1024),
                "fetch.wait.max.ms": self.kafka_fetch_wait_ms,
            }
        )
        return conf

    def producer_config(self) -> dict[str, Any]:
        conf = self.kafka_common()
        conf.setdefault("message.max.bytes", self.message_limit_bytes())
        return conf

    def pg_timeouts(self) -> PgTimeouts:
        """The bounds of every PostgreSQL connection (``sinks.pg.PgTimeouts``)."""
        return PgTimeouts(
            connect_s=self.pg_connect_timeout_s, statement_ms=self.pg_statement_timeout_ms,
            idle_in_transaction_ms=self.pg_idle_in_transaction_timeout_ms,
            call_s=self.pg_call_timeout_s,
        )  # fmt: skip

    def secret_values(self) -> list[str]:
        """What must never be logged: the passwords in the URLs, the SASL password, the
        review token, and the password-like values of ``kafka_options``."""
        values = [*passwords_in(self.database_url.get_secret_value())]
        if self.redis_url is not None:
            values += passwords_in(self.redis_url.get_secret_value())
        for secret in (self.kafka_password, self.review_token):
            if secret is not None:
                values.append(secret.get_secret_value())
        values += [v for k, v in self.kafka_options.items() if re.search(r"(?i)pass|secret", k)]
        return values

    def message_limit_bytes(self) -> int:
        """What the producers and the topics must allow: the largest accepted event, and room
        for a dead letter's headers and the record batch around it."""
        return max(1_000_000, self.max_message_bytes + 65_536)

    def topic_config(self) -> dict[str, str]:
        """Configuration of the topics the stream creates: a record as large as an accepted
        event (Kafka's default is about 1 MB) and, when set, min.insync.replicas."""
        conf = {"max.message.bytes": str(self.message_limit_bytes())}
        if self.topic_min_insync_replicas is not None:
            conf["min.insync.replicas"] = str(self.topic_min_insync_replicas)
        return conf


def explain(err: ValidationError) -> str:
    """One line per wrong setting, named as its environment variable, with the value given."""
    lines = []
    for e in err.errors():
        field = ".".join(str(part) for part in e["loc"]) or "settings"
        # Unknown names from a dotenv file come with their prefix already.
        name = field.upper() if field.startswith("reid_") else f"REID_{field.upper()}"
        name = name if e["loc"] else "settings"
        given = "" if e["type"] == "missing" or not e["loc"] else f" (got {e['input']!r})"
        if field in SECRET_FIELDS:
            given = ""  # a wrong secret is still a secret
        if e["type"] == "extra_forbidden" and (close := closest_setting(name)):
            given += f"; did you mean {close}?"
        lines.append(f"  {name}: {e['msg']}{given}")
    return "\n".join(lines)


SECRET_FIELDS = frozenset(
    {"database_url", "redis_url", "kafka_password", "kafka_options", "review_token"}
)


def load_settings(file: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Read the settings; ``file`` (or ``REID_SETTINGS_FILE``) is an optional dotenv file."""
    file = file or os.environ.get("REID_SETTINGS_FILE")
    if file is not None and not Path(file).is_file():
        raise FileNotFoundError(f"settings file not found: {file}")
    secrets = os.environ.get("REID_SECRETS_DIR")
    if secrets is not None and not Path(secrets).is_dir():
        raise FileNotFoundError(f"secrets folder not found: {secrets}")
    try:
        settings = Settings(_env_file=file, _secrets_dir=secrets, **overrides)  # type: ignore[call-arg]
    except SettingsError as err:
        # pydantic-settings names the field but not the variable; the value stays out.
        m = re.search(r'field "(\w+)"', str(err))
        name = f"REID_{m.group(1).upper()}" if m else "a setting"
        raise SettingsError(f"{name}: cannot parse the value (lists and objects are JSON)") from err
    add_secrets(*settings.secret_values())  # redacted from every log line and error
    set_default_timeouts(settings.pg_timeouts())  # every connection the process opens
    return settings


# REID_* names read by something else than a field: load_settings() itself, the compose file
# (image tag) and the tests (the fault report, the review page's screenshot). Anything else is
# a typo or a leftover.
OTHER_VARIABLES = frozenset(
    {"REID_SETTINGS_FILE", "REID_SECRETS_DIR", "REID_IMAGE_TAG", "REID_WRITE_RELIABILITY",
     "REID_WRITE_SCREENSHOT"}
)  # fmt: skip


def closest_setting(name: str) -> str | None:
    """The real variable nearest to a misspelt one (``REID_TRESHOLD`` -> ``REID_THRESHOLD``)."""
    import difflib

    known = sorted({f"REID_{field.upper()}" for field in Settings.model_fields} | OTHER_VARIABLES)
    found = difflib.get_close_matches(name.upper(), known, n=1, cutoff=0.6)
    return found[0] if found else None


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One line per ``REID_*`` variable in ``environ`` that no setting reads (they would be
    ignored silently), with the closest real name when there is one."""
    known = {f"REID_{field.upper()}" for field in Settings.model_fields} | OTHER_VARIABLES
    lines = []
    for name in sorted(environ):
        # pydantic-settings matches names case-insensitively, so reid_threshold is read.
        if name.upper().startswith("REID_") and name.upper() not in known:
            close = closest_setting(name)
            hint = f"; did you mean {close}?" if close else " (docs/settings.md lists them)"
            lines.append(f"settings: {name} is not a setting and is ignored{hint}")
    return lines
