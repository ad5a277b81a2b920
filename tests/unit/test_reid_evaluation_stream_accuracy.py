"""The stream replay metrics on hand-built assignments and embeddings."""

from __future__ import annotations

import numpy as np
import pytest

from reid.evaluation.stream_accuracy import (
    StreamResult,
    evaluate_stream,
    replay,
    replay_order,
    score,
    suggest_threshold,
    threshold_sweep,
)


def test_score_hand_computed():
    # deer 0: a, a ; deer 1: a, b, b  -> a represented by deer 0, b by deer 1.
    r = score([0, 0, 1, 1, 1], ["a", "a", "a", "b", "b"], threshold=0.4)
    assert r.accuracy == pytest.approx(4 / 5)
    assert (r.deer, r.individuals, r.false_merges) == (2, 2, 1)
    assert r.false_merge_rate == pytest.approx(0.5)
    assert r.fragmentation == pytest.approx(1.5)
    assert r.individuals_5plus == 0 and r.accuracy_5plus == 0.0


def test_a_fragment_does_not_count_twice():
    # a split over deer 0 (3) and deer 1 (2): only the larger one represents a.
    r = score([0, 0, 0, 1, 1], ["a"] * 5, threshold=0.4)
    assert r.accuracy == pytest.approx(3 / 5) and r.accuracy_5plus == pytest.approx(3 / 5)
    assert r.individuals_5plus == 1 and r.fragmentation == 2.0


def _clusters(sizes, noise, seed=0):
    rng = np.random.default_rng(seed)
    dim = 32
    ids, vecs = [], []
    for k, n in enumerate(sizes):
        centre = np.eye(dim)[k]
        for _ in range(n):
            v = centre + noise * rng.normal(size=dim)
            vecs.append(v / np.linalg.norm(v))
            ids.append(f"id{k}")
    return np.asarray(vecs, np.float32), ids


def test_replay_separable_identities_is_perfect_in_any_order_and_batching():
    vecs, ids = _clusters([3, 2, 5], noise=0.05)
    for order in (replay_order(len(ids)), replay_order(len(ids), seed=4)):
        for batch in (1, 4, 16):
            r = evaluate_stream(vecs, vecs, ids, order, threshold=0.5, batch_size=batch)
            assert (r.accuracy, r.deer, r.false_merges, r.fragmentation) == (1.0, 3, 0, 1.0)
            assert r.individuals_5plus == 1 and r.accuracy_5plus == 1.0


def test_replay_extremes_one_deer_or_all_new():
    vecs, ids = _clusters([3, 2, 5], noise=0.05)
    same = np.tile(vecs[:1], (len(ids), 1))
    merged = evaluate_stream(same, same, ids, list(range(len(ids))), threshold=0.4)
    assert merged.deer == 1 and merged.false_merges == 1
    assert merged.accuracy == pytest.approx(5 / 10)
    apart = evaluate_stream(vecs, vecs, ids, list(range(len(ids))), threshold=1.01)
    assert apart.deer == 10 and apart.false_merges == 0
    assert apart.fragmentation == pytest.approx(10 / 3) and apart.accuracy == pytest.approx(0.3)


def test_replay_uses_both_members_with_the_stream_weights():
    vecs, ids = _clusters([2, 2], noise=0.0)
    # The effnet member says everything is the same animal; the resnet member separates them.
    # s = 0.6 * cos_r + 0.4 * 1: same-identity 1.0, other identity 0.4.
    ones = np.tile(vecs[:1], (4, 1))
    assert len(set(replay(vecs, ones, ids, [0, 1, 2, 3], threshold=0.41))) == 2
    assert len(set(replay(vecs, ones, ids, [0, 1, 2, 3], threshold=0.40))) == 1


def test_threshold_sweep_and_suggestion():
    vecs, ids = _clusters([4, 4, 4], noise=0.6, seed=1)
    sweep = threshold_sweep(vecs, vecs, ids, replay_order(len(ids), seed=0))
    assert [r.threshold for r in sweep][:3] == [0.0, 0.05, 0.1]
    # At 1.0 nothing noisy matches: every detection is a new deer.
    assert sweep[-1].deer == 12 and sweep[0].deer < 12
    best = suggest_threshold(sweep, 0.0)
    assert best is not None and best.false_merges == 0
    assert best.accuracy == max(r.accuracy for r in sweep if r.false_merges == 0)
    fake = [StreamResult(0.1, 1, 1, 1, 0.9, 1, 0.5, 1, 0.9, 0)]
    assert suggest_threshold(fake, 0.05) is None
