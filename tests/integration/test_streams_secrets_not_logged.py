"""Credentials reach the clients but never the logs, even when connecting fails."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from sinks.cache import CacheUnavailable, CentroidCache
from sinks.store import PgStore, StoreUnavailable
from streams.tools.stack import free_port
from tests.conftest import stream_environment
from tests.integration.running import running

SECRET = "Sup3r-s3cret-Pw"


def test_failed_connections_do_not_log_passwords(caplog):
    caplog.set_level(logging.DEBUG)
    store = PgStore(f"postgresql://reid:{SECRET}@127.0.0.1:{free_port()}/reid", connect_timeout=1)
    with pytest.raises(StoreUnavailable) as store_error:
        store.start()
        store.ping()
    cache = CentroidCache(f"redis://:{SECRET}@127.0.0.1:{free_port()}/0", socket_timeout=0.3)
    cache.start()
    with pytest.raises(CacheUnavailable) as cache_error:
        cache.get_all("v1")
    assert caplog.records, "the failures should have been logged"
    assert SECRET not in caplog.text
    assert SECRET not in str(store_error.value) and SECRET not in str(cache_error.value)


# A password holding '@': libpq cuts the URL at the first one and quotes the rest as a host
# name ("failed to resolve host 's3cret-Pw@127.0.0.1'"); one slash after the scheme: libpq
# quotes the whole string back ('missing "=" after "postgres:/reid:...@..."').
AT_SECRET = "Sup3r@s3cret-Pw"
PIECES = ("Sup3r", "s3cret-Pw", AT_SECRET)


def _malformed_urls(port: int) -> list[str]:
    return [
        f"postgresql://reid:{AT_SECRET}@127.0.0.1:{port}/reid",
        f"postgres:/reid:{SECRET}@127.0.0.1:{port}/reid",
        f"postgresql://reid:{SECRET} x@127.0.0.1:{port}/reid",
        f"postgresql://reid:{SECRET}@127.0.0.1:{port}x/reid",
    ]


def _leaks(text: str) -> list[str]:
    return [piece for piece in (*PIECES, SECRET) if piece in text]


@pytest.mark.parametrize(
    "url", _malformed_urls(5432), ids=["at-sign", "one-slash", "space", "port"]
)
def test_malformed_urls_do_not_leak_through_the_store(url, caplog):
    caplog.set_level(logging.DEBUG)
    store = PgStore(url, connect_timeout=1)
    with pytest.raises(StoreUnavailable) as error:
        store.start()
    assert not _leaks(str(error.value)), str(error.value)
    assert not _leaks(caplog.text)


def test_malformed_url_leaks_nowhere_in_a_running_service(stack, unique):
    """`run` waits for a database it cannot reach (logging each attempt, JSON lines here), and
    `/readyz` says why; `migrate` exits with one line. The password is in none of them."""
    url = _malformed_urls(stack.info.postgres_port)[0]
    env = stream_environment(stack, "postgresql://unused@127.0.0.1:1/x", unique)
    env.update(REID_DATABASE_URL=url, REID_HEALTH_INTERVAL_S="0.5", REID_LOG_LEVEL="DEBUG")
    with running(env, "--log-format", "json", "run") as service:
        service.wait_for("2 attempts", lambda: service.count("waiting for PostgreSQL") >= 2, 60)
        status, body = service.get("/readyz") or (0, {})
        code, _ = service.stop()
    assert status == 503 and "postgres" in body["failed"], body
    assert "resolve host" in body["checks"]["postgres"], body  # the reason, redacted
    assert not _leaks(json.dumps(body)), body
    assert code == 0 and not _leaks(service.output), service.output[-3000:]
    for line in service.lines:
        if line.startswith("{"):
            json.loads(line)  # log lines stay JSON after redaction

    migrate = subprocess.run(
        [sys.executable, "-m", "streams.cli", "migrate"], env=env, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert migrate.returncode == 1 and "migrate:" in migrate.stderr, migrate.stderr
    assert not _leaks(migrate.stdout + migrate.stderr), migrate.stderr
