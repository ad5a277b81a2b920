"""Retrieval metrics of re-identification: CMC, mAP, mINP, and k-reciprocal re-ranking.

Evaluation protocol (Market-1501, Zheng et al. 2015), applied per query:
- the gallery is ranked by increasing distance;
- gallery images of the same identity AND the same camera as the query are removed
  (`exclude_same_camera=True`); with the zebra data, the photo burst (`encounter`) plays the
  camera's role, so a query is never scored against frames of its own burst;
- junk gallery images (identity -1, Market-1501's "junk" files) are removed;
- the query image itself is removed when it also sits in the gallery (same `q_index` and
  `g_index`), which makes all-vs-all evaluation of one set possible;
- a query with no valid match left is skipped and counted in `num_skipped`; the averages are
  over the remaining (`num_valid`) queries.
CMC@k is the fraction of valid queries with a correct match within the first k ranks. AP is
the area under the precision-recall curve (mean precision at each correct match). INP is
num_correct / (rank of the hardest correct match), mINP its mean (Ye et al., 2021).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

JUNK = -1


@dataclass
class RankResult:
    cmc: np.ndarray  # float [max_rank]
    mAP: float
    mINP: float
    num_valid: int
    num_skipped: int
    ap: np.ndarray = field(repr=False)  # per valid query

    def summary(self) -> dict[str, float | int]:
        def at(k: int) -> float:
            return float(self.cmc[min(k, len(self.cmc)) - 1]) if len(self.cmc) else 0.0

        return {
            "rank1": at(1),
            "rank5": at(5),
            "rank10": at(10),
            "mAP": self.mAP,
            "mINP": self.mINP,
            "queries": self.num_valid,
            "queries_without_match": self.num_skipped,
        }


def valid_gallery_mask(
    q_pid: object,
    q_cam: object,
    g_pids: np.ndarray,
    g_cams: np.ndarray,
    *,
    exclude_same_camera: bool = True,
    q_index: int | None = None,
    g_index: np.ndarray | None = None,
) -> np.ndarray:
    """Which gallery entries count for this query under the protocol of the module docstring."""
    keep = g_pids != JUNK
    if exclude_same_camera:
        keep &= ~((g_pids == q_pid) & (g_cams == q_cam))
    if q_index is not None and g_index is not None:
        keep &= g_index != q_index
    return keep


def evaluate_rank(
    distmat: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_cams: np.ndarray,
    g_cams: np.ndarray,
    *,
    max_rank: int = 50,
    exclude_same_camera: bool = True,
    q_index: np.ndarray | None = None,
    g_index: np.ndarray | None = None,
) -> RankResult:
    """CMC, mAP and mINP of a [num_query, num_gallery] distance matrix (smaller = closer)."""
    distmat = np.asarray(distmat, dtype=np.float64)
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    q_cams, g_cams = np.asarray(q_cams), np.asarray(g_cams)
    nq, ng = distmat.shape
    if len(q_pids) != nq or len(g_pids) != ng or len(q_cams) != nq or len(g_cams) != ng:
        raise ValueError(f"labels do not match the distance matrix {distmat.shape}")
    max_rank = min(max_rank, ng)
    # Stable sort: ties keep gallery order, so results do not depend on the sort algorithm.
    order = np.argsort(distmat, axis=1, kind="stable")
    cmcs, aps, inps = [], [], []
    skipped = 0
    for i in range(nq):
        ranked = order[i]
        keep = valid_gallery_mask(
            q_pids[i],
            q_cams[i],
            g_pids[ranked],
            g_cams[ranked],
            exclude_same_camera=exclude_same_camera,
            q_index=None if q_index is None else int(q_index[i]),
            g_index=None if g_index is None else np.asarray(g_index)[ranked],
        )
        hits = (g_pids[ranked][keep] == q_pids[i]).astype(np.float64)
        if not hits.any():
            skipped += 1
            continue
        cum = hits.cumsum()
        cmc = np.minimum(cum, 1.0)
        padded = np.ones(max_rank)
        padded[: min(max_rank, len(cmc))] = cmc[:max_rank]
        cmcs.append(padded)
        positions = np.flatnonzero(hits)
        # Precision at each correct match, averaged: AP over this query's ranking.
        aps.append(float(np.mean(cum[positions] / (positions + 1.0))))
        inps.append(float(cum[positions[-1]] / (positions[-1] + 1.0)))
    if not cmcs:
        return RankResult(np.zeros(max_rank), 0.0, 0.0, 0, skipped, np.zeros(0))
    return RankResult(
        cmc=np.mean(cmcs, axis=0),
        mAP=float(np.mean(aps)),
        mINP=float(np.mean(inps)),
        num_valid=len(cmcs),
        num_skipped=skipped,
        ap=np.asarray(aps),
    )


def cosine_distance(q: np.ndarray, g: np.ndarray) -> np.ndarray:
    """1 - cos for L2-normalised rows."""
    return 1.0 - np.asarray(q, np.float32) @ np.asarray(g, np.float32).T


def re_ranking(
    q_feat: np.ndarray,
    g_feat: np.ndarray,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    chunk: int = 1024,
) -> np.ndarray:
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017) in bounded memory.

    Same definitions as the authors' code on features (original distance = squared Euclidean
    of L2-normalised features, each row divided by its maximum; k-reciprocal sets with the
    1/2-expansion; Gaussian weights; query expansion over k2 neighbours; Jaccard distance),
    but the (N x N) matrices of the original are never built (N = queries + gallery): the
    neighbour lists are found a chunk of rows at a time, the weight vectors are sparse, and
    only the [num_query, num_gallery] result is dense. Memory is O(chunk * N + N * k1 +
    num_query * num_gallery), so galleries of tens of thousands fit.
    Returns the final [num_query, num_gallery] distance.
    """
    from scipy import sparse

    feats = np.concatenate([q_feat, g_feat]).astype(np.float32)
    feats /= np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    n, nq = len(feats), len(q_feat)
    depth = min(k1 + 1, n)
    initial_rank = np.empty((n, depth), dtype=np.int64)
    row_max = np.empty(n, dtype=np.float32)
    for start in range(0, n, chunk):
        block = np.maximum(2.0 - 2.0 * feats[start : start + chunk] @ feats.T, 0.0)
        row_max[start : start + len(block)] = block.max(axis=1)
        part = np.argpartition(block, depth - 1, axis=1)[:, :depth]
        part_d = np.take_along_axis(block, part, axis=1)
        initial_rank[start : start + len(block)] = np.take_along_axis(
            part, np.argsort(part_d, axis=1, kind="stable"), axis=1
        )
    row_max = np.maximum(row_max, 1e-12)

    def dist(i: int, idx: np.ndarray) -> np.ndarray:
        return np.maximum(2.0 - 2.0 * feats[idx] @ feats[i], 0.0) / row_max[i]

    def k_reciprocal(i: int, k: int) -> np.ndarray:
        forward = initial_rank[i, : k + 1]
        backward = initial_rank[forward, : k + 1]
        return forward[np.any(backward == i, axis=1)]

    rows, cols, vals = [], [], []
    half = int(np.around(k1 / 2))
    for i in range(n):
        recip = k_reciprocal(i, k1)
        expansion = recip
        for cand in recip:
            cand_recip = k_reciprocal(int(cand), half)
            if len(np.intersect1d(cand_recip, recip)) > 2 / 3 * len(cand_recip):
                expansion = np.append(expansion, cand_recip)
        expansion = np.unique(expansion)
        weight = np.exp(-dist(i, expansion))
        rows.append(np.full(len(expansion), i))
        cols.append(expansion)
        vals.append(weight / weight.sum())
    v = sparse.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n)
    )
    if k2 != 1:
        # Query expansion: each vector becomes the mean of its k2 nearest neighbours' vectors.
        kk = min(k2, depth)
        avg = sparse.csr_matrix(
            (
                np.full(n * kk, 1.0 / kk),
                (np.repeat(np.arange(n), kk), initial_rank[:, :kk].reshape(-1)),
            ),
            shape=(n, n),
        )
        v = (avg @ v).tocsr()
    v_gallery = v[nq:].tocsc()
    jaccard = np.empty((nq, n - nq), dtype=np.float32)
    for i in range(nq):
        row = v.getrow(i)
        nz, weights = row.indices, row.data
        sub = v_gallery[:, nz].tocsc()
        col_of_data = np.repeat(np.arange(len(nz)), np.diff(sub.indptr))
        sub.data = np.minimum(sub.data, weights[col_of_data])
        temp_min = np.asarray(sub.sum(axis=1)).ravel()
        jaccard[i] = 1.0 - temp_min / (2.0 - temp_min)
    original = np.empty((nq, n - nq), dtype=np.float32)
    for start in range(0, nq, chunk):
        block = np.maximum(2.0 - 2.0 * feats[start : min(start + chunk, nq)] @ feats[nq:].T, 0)
        original[start : start + len(block)] = block / row_max[start : start + len(block), None]
    return jaccard * (1 - lambda_value) + original * lambda_value
