"""Benchmarks of matching and of pgvector search, as plain functions returning table rows.

``reid-stream bench`` (``streams.tools.bench``) calls them and prints the tables; they print
nothing and make no assertions. Timings on a shared machine are noisy: each row carries the
median and the 95th percentile of several repeats.

- ``matching_times``: ``assign_batch`` of one batch against 1k-100k known deer held as the
  in-memory gallery (``streams.gallery.GalleryMatrix``), and the in-memory part of ``put``
  (writing the batch's committed centroids into the matrices). The Redis write of ``put`` is
  network I/O of a few kilobytes and is not part of it.
- ``vector_search_times``: pgvector HNSW top-k over stored detection vectors against exact
  search, in a scratch table shaped like the schema's vector columns (``vector(512)``, inline
  storage, ``hnsw (... vector_cosine_ops) WITH (m = 16, ef_construction = 64)``), with the
  load and index build times and the recall of HNSW against exact.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from reid.matching import (
    DEFAULT_THRESHOLD,
    assign_batch,
    ensemble_scores,
    l2_normalise,
    merge_centroid,
)
from sinks.records import DeerCentroid
from streams.gallery import GalleryMatrix

if TYPE_CHECKING:
    from sinks.search_bench import ScratchVectors

log = logging.getLogger(__name__)

DIM = 512


def _ms(samples: Sequence[float]) -> tuple[float, float]:
    """(median, p95) in milliseconds of samples in seconds."""
    a = np.asarray(samples, dtype=np.float64) * 1000
    return round(float(np.median(a)), 3), round(float(np.percentile(a, 95)), 3)


def _unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    return l2_normalise(rng.standard_normal((n, dim), dtype=np.float32))


def _noisy(rng: np.random.Generator, base: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Another sighting of the same animal: cosine about 1/sqrt(1 + scale^2) to ``base``."""
    noise = rng.standard_normal(base.shape, dtype=np.float32) * np.float32(scale / math.sqrt(DIM))
    return l2_normalise(base + noise)


def _batch(
    rng: np.random.Generator, gallery: GalleryMatrix, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """A batch like a camera's: half are sightings of known deer (several of the same deer),
    a quarter are new animals seen twice, the rest new animals seen once."""
    view = gallery.view()
    known = rng.choice(len(view), size=max(1, n // 8), replace=False)
    fresh_r, fresh_e = _unit(rng, max(1, n // 8)), _unit(rng, max(1, n // 8))
    rows_r, rows_e = [], []
    for i in range(n):
        if i % 4 < 2:
            j = known[rng.integers(len(known))]
            rows_r.append(_noisy(rng, view.resnet[j]))
            rows_e.append(_noisy(rng, view.effnet[j]))
        elif i % 4 == 2:
            k = rng.integers(len(fresh_r))
            rows_r.append(_noisy(rng, fresh_r[k]))
            rows_e.append(_noisy(rng, fresh_e[k]))
        else:
            rows_r.append(_unit(rng, 1)[0])
            rows_e.append(_unit(rng, 1)[0])
    return np.stack(rows_r), np.stack(rows_e)


def _committed(
    gallery: GalleryMatrix, plan: Any, resnet: np.ndarray, effnet: np.ndarray, next_id: int
) -> list[DeerCentroid]:
    """What ``write_batch`` would return for ``plan``: the moved and the created centroids."""
    moved: dict[int, list[int]] = {}
    for i, m in enumerate(plan.matches):
        if m.deer_id is not None:
            moved.setdefault(m.deer_id, []).append(i)
    out = []
    for deer_id, members in moved.items():
        held = gallery.get(deer_id)
        assert held is not None
        out.append(
            DeerCentroid(
                deer_id,
                merge_centroid(held.resnet, held.sightings, resnet[members]),
                merge_centroid(held.effnet, held.sightings, effnet[members]),
                held.sightings + len(members),
            )
        )
    for k, nd in enumerate(plan.new_deer):
        out.append(DeerCentroid(next_id + k, nd.resnet, nd.effnet, nd.sightings))
    return out


def matching_times(
    deer_counts: Sequence[int] = (1_000, 10_000, 100_000),
    batch_size: int = 32,
    repeats: int = 15,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One row per gallery size: ms per batch (median, p95) of ``assign_batch``, of its
    gallery matmul alone, and of the in-memory ``put`` of the batch's committed centroids."""
    rows = []
    for deer in deer_counts:
        rng = np.random.default_rng(seed)
        t0 = time.perf_counter()
        gallery = GalleryMatrix(DIM, capacity=deer + max(1024, deer // 4))
        for start in range(0, deer, 50_000):  # in chunks: no list of 100k records at once
            k = min(50_000, deer - start)
            r, e = _unit(rng, k), _unit(rng, k)
            counts = rng.integers(1, 30, size=k)
            gallery.upsert(
                [DeerCentroid(start + j + 1, r[j], e[j], int(counts[j])) for j in range(k)]
            )
        log.info(
            "bench matching: gallery of %d deer built in %.1f s", deer, time.perf_counter() - t0
        )
        batches = [_batch(rng, gallery, batch_size) for _ in range(repeats + 1)]
        match_s, matmul_s, put_s = [], [], []
        existing = new = 0
        next_id = deer + 1
        for i, (resnet, effnet) in enumerate(batches):
            view = gallery.view()
            t0 = time.perf_counter()
            ensemble_scores(resnet, effnet, view.resnet, view.effnet)
            t1 = time.perf_counter()
            plan = assign_batch(resnet, effnet, view, threshold=threshold)
            t2 = time.perf_counter()
            committed = _committed(gallery, plan, resnet, effnet, next_id)
            next_id += len(plan.new_deer)
            t3 = time.perf_counter()
            gallery.upsert(committed)
            t_put = time.perf_counter() - t3
            mm, t_match = t1 - t0, t2 - t1
            if i == 0:
                continue  # warm-up: first touch of the matrices and of BLAS
            match_s.append(t_match)
            matmul_s.append(mm)
            put_s.append(t_put)
            existing += sum(m.deer_id is not None for m in plan.matches)
            new += len(plan.new_deer)
        match = _ms(match_s)
        matmul = _ms(matmul_s)
        put = _ms(put_s)
        row = {
            "deer": deer,
            "batch": batch_size,
            "repeats": repeats,
            "match_ms_median": match[0],
            "match_ms_p95": match[1],
            "matmul_ms_median": matmul[0],
            "put_ms_median": put[0],
            "put_ms_p95": put[1],
            "matched_existing_per_batch": round(existing / max(1, repeats), 1),
            "new_deer_per_batch": round(new / max(1, repeats), 1),
            "gallery_mb": round(2 * gallery.capacity * DIM * 4 / 2**20),
        }
        log.info("bench matching: %s", row)
        rows.append(row)
        del gallery, batches
    return rows


# -- pgvector ------------------------------------------------------------------------------


def _clustered(
    rng: np.random.Generator, n: int, per_animal: int, dim: int = DIM
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` detection vectors, ``per_animal`` noisy sightings per animal; and the animals."""
    animals = _unit(rng, max(1, n // per_animal), dim)
    which = rng.integers(len(animals), size=n)
    return _noisy(rng, animals[which]), animals


def vector_search_times(
    database_url: str,
    sizes: Sequence[int] = (100_000, 1_000_000),
    k: int = 5,
    queries: int = 50,
    ef_search: Sequence[int] = (40, 100),
    *,
    exact_queries: int = 20,
    per_animal: int = 8,
    maintenance_work_mem: str | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Per size: one row per ``ef_search`` (HNSW) and one for exact search, each with the
    query time (median, p95, one query per round trip), the recall@k of HNSW against exact
    over ``exact_queries`` queries, and the load and index build times of that size.

    Vectors are sightings of animals (``per_animal`` each, cosine ~0.7 to their animal) so
    that a query's neighbours are its animal's other sightings, as in the real table; queries
    are new sightings. Each size uses a scratch table of its own, dropped afterwards.
    ``maintenance_work_mem`` (None: about 5 KiB per row) must hold the whole graph, or the
    build spills to disk and slows down many times (1M rows: about 5 GB).
    """
    from sinks.search_bench import ScratchVectors

    rows: list[dict[str, Any]] = []
    for size in sizes:
        rng = np.random.default_rng(seed)
        mwm = maintenance_work_mem or f"{max(256, math.ceil(size * 5 / 1024))}MB"
        with ScratchVectors(database_url, DIM) as table:
            rows += _search_one_size(
                table, rng, size, k, queries, ef_search, exact_queries, per_animal, mwm,
            )  # fmt: skip
    return rows


def _search_one_size(
    table: ScratchVectors,
    rng: np.random.Generator,
    size: int,
    k: int,
    queries: int,
    ef_search: Sequence[int],
    exact_queries: int,
    per_animal: int,
    maintenance_work_mem: str,
) -> list[dict[str, Any]]:
    # Load: binary COPY in chunks of generated vectors (1M x 512 floats is 2 GB at once).
    t0 = time.perf_counter()
    animals_seen: list[np.ndarray] = []
    chunk = 50_000

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, size, chunk):
            n = min(chunk, size - start)
            vectors, animals = _clustered(rng, n, per_animal)
            animals_seen.append(animals)
            yield np.arange(start + 1, start + n + 1), vectors

    table.load(chunks())
    load_s = time.perf_counter() - t0
    stored = table.count()
    if stored != size:
        raise RuntimeError(f"bench search: loaded {stored} rows, meant {size}")
    table.analyze()
    log.info("bench search: %d rows loaded in %.1f s (%.0f rows/s)", size, load_s, size / load_s)

    t0 = time.perf_counter()
    table.build_index(maintenance_work_mem)
    build_s = time.perf_counter() - t0
    log.info("bench search: HNSW index on %d rows built in %.1f s", size, build_s)

    # Queries: new sightings of stored animals.
    animals = np.concatenate(animals_seen)
    qs = _noisy(rng, animals[rng.integers(len(animals), size=max(queries, exact_queries))])

    def run(q: np.ndarray) -> tuple[list[int], float]:
        t = time.perf_counter()
        ids = table.top_k(q, k)
        return ids, time.perf_counter() - t

    common = {"rows": size, "k": k, "load_s": round(load_s, 2), "build_s": round(build_s, 2),
              "maintenance_work_mem": maintenance_work_mem}  # fmt: skip
    out: list[dict[str, Any]] = []

    # Exact first (index scans off): the reference for recall.
    with table.exact():
        plan = table.plan(qs[0], k)
        assert not any("hnsw" in p.lower() or "Index" in p for p in plan), plan
        run(qs[0])  # warm-up
        exact_ids, exact_s = [], []
        for q in qs[:exact_queries]:
            ids, s = run(q)
            exact_ids.append(set(ids))
            exact_s.append(s)
    med, p95 = _ms(exact_s)
    out.append(
        {**common, "search": "exact", "ef_search": None, "queries": len(exact_s),
         "query_ms_median": med, "query_ms_p95": p95, "recall_at_k": 1.0}
    )  # fmt: skip
    log.info("bench search: %s", out[-1])

    # With the index: on small tables the planner may prefer a scan at a high ef_search.
    with table.indexed():
        for ef in ef_search:
            table.set_ef_search(ef)
            plan = table.plan(qs[0], k)
            uses_index = any("Index Scan" in p for p in plan)
            for q in qs[:3]:
                run(q)  # warm-up: the index's pages into the cache
            times, hits = [], 0
            for i, q in enumerate(qs[:queries]):
                ids, s = run(q)
                times.append(s)
                if i < len(exact_ids):
                    hits += len(exact_ids[i] & set(ids))
            med, p95 = _ms(times)
            recall = hits / (k * min(len(exact_ids), len(times))) if exact_ids else None
            out.append(
                {**common, "search": "hnsw" if uses_index else "hnsw (planner chose a scan)",
                 "ef_search": int(ef), "queries": len(times), "query_ms_median": med,
                 "query_ms_p95": p95, "recall_at_k": None if recall is None else round(recall, 4)}
            )  # fmt: skip
            log.info("bench search: %s", out[-1])
    return out
