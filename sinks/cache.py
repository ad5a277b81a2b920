"""Redis hot cache of deer centroids, one namespace per embedding version.

Postgres is the truth; this only saves reading every centroid from it per batch. Keys:

- ``{prefix}:{version}:deer:{id}``: float32 resnet, float32 effnet, int64 sightings
  (little-endian, ``8 * dim + 8`` bytes);
- ``{prefix}:{version}:deer_ids``: a set of the ids cached under that version;
- ``{prefix}:{version}:complete``: set after a full load from Postgres. Without it the
  version is cold and the caller reloads everything. It expires (``complete_ttl_s``) so
  that a deer whose cache write was lost (Redis down right after its commit) is picked up by
  a full reload soon, instead of staying invisible to the matcher on every worker.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from sinks.records import DeerCentroid

log = logging.getLogger(__name__)

MGET_CHUNK = 1000


class CacheUnavailable(RuntimeError):
    """Redis could not be reached, timed out or refused the command; read Postgres instead."""


@dataclass
class CacheRead:
    """The cached centroids of a warm version, and the ids listed but whose key is gone."""

    centroids: list[DeerCentroid]
    missing_ids: list[int]


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


class CentroidCache:
    """Centroids per embedding version in Redis; ``start()`` before use, ``stop()`` after."""

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "reid",
        dim: int = 512,
        socket_timeout: float = 0.5,
        complete_ttl_s: float | None = 600.0,
    ) -> None:
        self._url = url
        self.key_prefix = key_prefix
        self.dim = dim
        self._socket_timeout = socket_timeout
        self._complete_ttl_s = complete_ttl_s
        self._client: redis.Redis | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Create the client. An unreachable Redis is logged, not raised: the cache is optional."""
        self._client = redis.Redis.from_url(
            self._url,
            socket_timeout=self._socket_timeout,
            socket_connect_timeout=self._socket_timeout,
            # One immediate retry on a dropped connection (a Redis restart leaves dead pooled
            # sockets); no backoff and no retry on timeouts, so a dead Redis costs the batch
            # about one socket timeout before it falls back to Postgres.
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
            decode_responses=False,
        )
        try:
            self.ping()
            log.info("cache: connected prefix=%s", self.key_prefix)
        except CacheUnavailable as err:
            log.warning("cache: not reachable at start, will retry per call: %s", err)

    def stop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def ping(self) -> None:
        with self._guard("ping") as client:
            client.ping()

    # -- keys -----------------------------------------------------------------------------
    def _deer_key(self, version: str, deer_id: int) -> str:
        return f"{self.key_prefix}:{version}:deer:{deer_id}"

    def _ids_key(self, version: str) -> str:
        return f"{self.key_prefix}:{version}:deer_ids"

    def _complete_key(self, version: str) -> str:
        return f"{self.key_prefix}:{version}:complete"

    # -- values ---------------------------------------------------------------------------
    def _encode(self, centroid: DeerCentroid) -> bytes:
        resnet = np.asarray(centroid.resnet, dtype="<f4").reshape(-1)
        effnet = np.asarray(centroid.effnet, dtype="<f4").reshape(-1)
        if resnet.shape != (self.dim,) or effnet.shape != (self.dim,):
            raise ValueError(
                f"deer {centroid.deer_id}: centroids must have {self.dim} values, "
                f"got {resnet.shape} and {effnet.shape}"
            )
        return resnet.tobytes() + effnet.tobytes() + np.array(centroid.sightings, "<i8").tobytes()

    def _decode(self, deer_id: int, data: bytes) -> DeerCentroid | None:
        if len(data) != 8 * self.dim + 8:
            return None  # written with another dim or format: treat as missing
        size = 4 * self.dim
        resnet = np.frombuffer(data, dtype="<f4", count=self.dim).astype(np.float32)
        effnet = np.frombuffer(data, dtype="<f4", count=self.dim, offset=size).astype(np.float32)
        sightings = int(np.frombuffer(data, dtype="<i8", count=1, offset=2 * size)[0])
        return DeerCentroid(deer_id, resnet, effnet, sightings)

    # -- operations -----------------------------------------------------------------------
    def get_all(self, version: str) -> CacheRead | None:
        """Every cached centroid of ``version`` by id, or None when the version is cold."""
        t0 = time.perf_counter()
        with self._guard("get_all") as client:
            pipe = client.pipeline(transaction=False)
            pipe.exists(self._complete_key(version))
            pipe.smembers(self._ids_key(version))
            complete, members = pipe.execute()
            if not complete:
                log.info("cache: cold version=%s", version)
                return None
            ids = sorted(int(m) for m in members)
            pipe = client.pipeline(transaction=False)
            for start in range(0, len(ids), MGET_CHUNK):
                pipe.mget([self._deer_key(version, i) for i in ids[start : start + MGET_CHUNK]])
            values = [v for chunk in pipe.execute() for v in chunk] if ids else []
        centroids: list[DeerCentroid] = []
        missing: list[int] = []
        for deer_id, data in zip(ids, values, strict=True):
            centroid = None if data is None else self._decode(deer_id, data)
            if centroid is None:
                missing.append(deer_id)
            else:
                centroids.append(centroid)
        log.debug(
            "cache: read version=%s hits=%d missing=%d ms=%.1f",
            version, len(centroids), len(missing), (time.perf_counter() - t0) * 1000,
        )  # fmt: skip
        return CacheRead(centroids, missing)

    def put(
        self, version: str, centroids: Sequence[DeerCentroid], *, complete: bool = False
    ) -> None:
        """Write centroids (after the database commit); ``complete`` marks a full load."""
        encoded = {self._deer_key(version, int(c.deer_id)): self._encode(c) for c in centroids}
        with self._guard("put") as client:
            # MULTI/EXEC: a reader never sees an id in the set before its key, nor the
            # complete flag before the whole load.
            pipe = client.pipeline(transaction=True)
            if encoded:
                pipe.mset(encoded)
                pipe.sadd(self._ids_key(version), *(int(c.deer_id) for c in centroids))
            if complete:
                ttl = None if self._complete_ttl_s is None else max(1, int(self._complete_ttl_s))
                pipe.set(self._complete_key(version), b"1", ex=ttl)
            if encoded or complete:
                pipe.execute()
        if complete:
            log.info("cache: full load written version=%s deer=%d", version, len(encoded))

    def remove(self, version: str, deer_ids: Sequence[int]) -> None:
        """Forget some deer of ``version`` (merged away, or with no vector of it left)."""
        ids = [int(i) for i in deer_ids]
        if not ids:
            return
        with self._guard("remove") as client:
            pipe = client.pipeline(transaction=True)
            pipe.srem(self._ids_key(version), *ids)
            pipe.delete(*(self._deer_key(version, i) for i in ids))
            pipe.execute()

    def invalidate(self, version: str) -> None:
        """Forget ``version`` entirely; the next ``get_all`` finds it cold."""
        pattern = _glob_escape(f"{self.key_prefix}:{version}:deer:") + "*"
        deleted = 0
        with self._guard("invalidate") as client:
            # The flag goes first, so readers fall back to Postgres while keys are removed.
            client.delete(self._complete_key(version), self._ids_key(version))
            batch: list[bytes] = []
            for key in client.scan_iter(match=pattern, count=MGET_CHUNK):
                batch.append(key)
                if len(batch) >= MGET_CHUNK:
                    deleted += client.unlink(*batch)
                    batch = []
            if batch:
                deleted += client.unlink(*batch)
        log.info("cache: invalidated version=%s deer_keys=%d", version, deleted)

    @contextmanager
    def _guard(self, what: str) -> Iterator[redis.Redis]:
        if self._client is None:
            raise RuntimeError("CentroidCache: call start() first")
        try:
            yield self._client
        except redis.RedisError as err:
            raise CacheUnavailable(f"cache: {what} failed: {type(err).__name__}: {err}") from err
