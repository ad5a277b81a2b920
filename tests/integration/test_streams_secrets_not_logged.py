"""Credentials reach the clients but never the logs, even when connecting fails."""

from __future__ import annotations

import logging

import pytest

from sinks.cache import CacheUnavailable, CentroidCache
from sinks.store import PgStore, StoreUnavailable
from streams.tools.stack import free_port

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
