"""Retrieval metrics against hand-computed cases and independent references."""

from __future__ import annotations

import numpy as np
import pytest

from reid.evaluation.metrics import cosine_distance, evaluate_rank, re_ranking


def reference_market1501(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=50):
    """torchreid's pure-python eval_market1501, written out again, plus junk (-1) removal."""
    indices = np.argsort(distmat, axis=1, kind="stable")
    matches = (g_pids[indices] == q_pids[:, None]).astype(np.int32)
    all_cmc, all_ap, all_inp = [], [], []
    for q in range(len(q_pids)):
        order = indices[q]
        remove = ((g_pids[order] == q_pids[q]) & (g_cams[order] == q_cams[q])) | (
            g_pids[order] == -1
        )
        raw = matches[q][~remove]
        if not np.any(raw):
            continue
        cmc = raw.cumsum()
        last = np.max(np.where(raw == 1))
        all_inp.append(cmc[last] / (last + 1.0))
        cmc[cmc > 1] = 1
        all_cmc.append(cmc[:max_rank])
        tmp = np.asarray([x / (i + 1.0) for i, x in enumerate(raw.cumsum())]) * raw
        all_ap.append(tmp.sum() / raw.sum())
    return np.mean(all_cmc, axis=0), np.mean(all_ap), np.mean(all_inp), len(all_cmc)


def test_hand_computed_case():
    # One query (id 1, cam 0). Ranked gallery: [id1 cam0 (excluded), id2, id1 cam1, id3, id1 cam2]
    distmat = np.array([[0.1, 0.2, 0.3, 0.4, 0.5]])
    g_pids = np.array([1, 2, 1, 3, 1])
    g_cams = np.array([0, 1, 1, 1, 2])
    r = evaluate_rank(distmat, np.array([1]), g_pids, np.array([0]), g_cams, max_rank=4)
    # After exclusion the ranking is [2, 1, 3, 1]: hits at ranks 2 and 4.
    assert r.cmc.tolist() == [0.0, 1.0, 1.0, 1.0]
    assert r.mAP == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert r.mINP == pytest.approx(2 / 4)
    # Without the exclusion the same-camera image is a hit at rank 1.
    r2 = evaluate_rank(
        distmat, np.array([1]), g_pids, np.array([0]), g_cams, exclude_same_camera=False
    )
    assert r2.cmc[0] == 1.0
    assert r2.mAP == pytest.approx((1 / 1 + 2 / 3 + 3 / 5) / 3)
    assert r2.mINP == pytest.approx(3 / 5)


def test_query_without_valid_match_is_skipped_and_junk_ignored():
    distmat = np.array([[0.1, 0.2, 0.3], [0.3, 0.2, 0.1]])
    g_pids = np.array([-1, 5, 7])
    g_cams = np.array([0, 0, 0])
    # Query 0 (id 5, cam 0): its only match is in its own camera -> skipped.
    # Query 1 (id 7, cam 1): junk at any rank is ignored; id 7 ranks first.
    r = evaluate_rank(distmat, np.array([5, 7]), g_pids, np.array([0, 1]), g_cams)
    assert (r.num_valid, r.num_skipped) == (1, 1)
    assert r.cmc[0] == 1.0 and r.mAP == 1.0


def test_self_match_excluded_in_all_vs_all():
    feats = np.eye(3, dtype=np.float32)
    pids = np.array([0, 0, 1])
    d = cosine_distance(feats, feats)
    r = evaluate_rank(d, pids, pids, pids * 0, pids * 0, exclude_same_camera=False,
                      q_index=np.arange(3), g_index=np.arange(3))  # fmt: skip
    # Query 2 has no other image of its identity; queries 0 and 1 see only each other.
    assert r.num_valid == 2 and r.num_skipped == 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference_on_random_matrix(seed):
    rng = np.random.default_rng(seed)
    nq, ng = 40, 200
    q_pids = rng.integers(0, 15, nq)
    g_pids = rng.integers(-1, 15, ng)
    q_cams, g_cams = rng.integers(0, 3, nq), rng.integers(0, 3, ng)
    distmat = rng.random((nq, ng))
    cmc, m_ap, m_inp, valid = reference_market1501(distmat, q_pids, g_pids, q_cams, g_cams, 20)
    r = evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=20)
    assert r.num_valid == valid and r.num_valid + r.num_skipped == nq
    np.testing.assert_allclose(r.cmc, cmc)
    assert r.mAP == pytest.approx(m_ap) and r.mINP == pytest.approx(m_inp)


def reference_re_ranking(q, g, k1, k2, lambda_value):
    """Zhong et al.'s dense re-ranking on features (the authors' code, float64)."""
    feat = np.concatenate([q, g]).astype(np.float64)
    feat /= np.linalg.norm(feat, axis=1, keepdims=True)
    query_num, all_num = len(q), len(feat)
    original_dist = np.maximum(2 - 2 * feat @ feat.T, 0)
    original_dist = np.transpose(original_dist / np.max(original_dist, axis=0))
    V = np.zeros_like(original_dist)
    initial_rank = np.argsort(original_dist, kind="stable").astype(np.int32)
    for i in range(all_num):
        forward = initial_rank[i, : k1 + 1]
        backward = initial_rank[forward, : k1 + 1]
        recip = forward[np.where(backward == i)[0]]
        expansion = recip
        for cand in recip:
            c_forward = initial_rank[cand, : int(np.around(k1 / 2)) + 1]
            c_backward = initial_rank[c_forward, : int(np.around(k1 / 2)) + 1]
            c_recip = c_forward[np.where(c_backward == cand)[0]]
            if len(np.intersect1d(c_recip, recip)) > 2 / 3 * len(c_recip):
                expansion = np.append(expansion, c_recip)
        expansion = np.unique(expansion)
        weight = np.exp(-original_dist[i, expansion])
        V[i, expansion] = weight / np.sum(weight)
    original_dist = original_dist[:query_num]
    if k2 != 1:
        V = np.stack([np.mean(V[initial_rank[i, :k2]], axis=0) for i in range(all_num)])
    inv = [np.where(V[:, i] != 0)[0] for i in range(all_num)]
    jaccard = np.zeros((query_num, all_num))
    for i in range(query_num):
        temp_min = np.zeros(all_num)
        nz = np.where(V[i] != 0)[0]
        for j in nz:
            temp_min[inv[j]] += np.minimum(V[i, j], V[inv[j], j])
        jaccard[i] = 1 - temp_min / (2 - temp_min)
    final = jaccard * (1 - lambda_value) + original_dist * lambda_value
    return final[:, query_num:]


def test_re_ranking_matches_dense_reference_in_small_chunks():
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(6, 16))
    labels = rng.integers(0, 6, 70)
    feats = centres[labels] + 0.6 * rng.normal(size=(70, 16))
    q, g = feats[:15], feats[15:]
    expected = reference_re_ranking(q, g, k1=8, k2=3, lambda_value=0.3)
    got = re_ranking(q, g, k1=8, k2=3, lambda_value=0.3, chunk=7)
    np.testing.assert_allclose(got, expected, atol=2e-5)
