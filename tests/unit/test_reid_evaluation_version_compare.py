"""The comparison of two embedding versions behind `reid-stream validate` (pure numpy)."""

from __future__ import annotations

import numpy as np
import pytest

from reid.evaluation.version_compare import (
    compare,
    detection_false_merge_rate,
    table,
    threshold_for_false_merge_rate,
    version_scores,
)


def clusters(rng: np.random.Generator, deer: int, per: int, noise: float, dim: int = 32):
    centres = rng.standard_normal((deer, dim))
    ids = np.repeat(np.arange(100, 100 + deer), per)
    x = centres[ids - 100] + noise * rng.standard_normal((deer * per, dim))
    return ids, (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_scores_are_leave_one_out_and_best_deer_is_the_own_one_on_clean_clusters() -> None:
    rng = np.random.default_rng(0)
    ids, x = clusters(rng, deer=5, per=4, noise=0.05)
    s = version_scores(x, x, ids, 0.6, 0.4)
    assert (s["best"] == ids).all()
    # Leave-one-out: against the mean of the 3 others, computed by hand for detection 0.
    others = x[1:4].astype(np.float64).mean(axis=0)
    expected = float(x[0] @ (others / np.linalg.norm(others)))
    assert s["true"][0] == pytest.approx(expected, abs=1e-6)
    assert (s["true"] > s["other"]).all()


def test_singletons_have_no_true_match() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    s = version_scores(x, x, np.array([1, 2, 2]), 0.5, 0.5)
    assert np.isnan(s["true"][0]) and np.isfinite(s["true"][1:]).all()
    assert s["best"][0] == 2  # its own deer is left out: the best other one


def test_suggested_threshold_keeps_the_false_merge_rate() -> None:
    other = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    t = threshold_for_false_merge_rate(other, 0.2)
    assert detection_false_merge_rate(other, t) == pytest.approx(0.2)
    # and it is the smallest such threshold
    assert detection_false_merge_rate(other, t - 0.06) > 0.2
    assert detection_false_merge_rate(other, threshold_for_false_merge_rate(other, 0.0)) == 0.0
    assert threshold_for_false_merge_rate(other, 1.0) == pytest.approx(0.1)


def test_compare_same_version_changes_nothing_and_keeps_the_threshold_rate() -> None:
    rng = np.random.default_rng(2)
    ids, x = clusters(rng, deer=20, per=5, noise=0.9)
    pairs = {"deer_ids": ids, "old_resnet": x, "old_effnet": x, "new_resnet": x, "new_effnet": x}
    result = compare(pairs, w_resnet=0.6, w_effnet=0.4, old_threshold=0.4)
    assert result["best_deer_changed"] == 0.0
    assert result["new"]["false_merge_rate"] <= result["old"]["false_merge_rate"]
    assert result["new"]["suggested_threshold"] <= 0.4 + 1e-6
    assert result["detections"] == 100 and result["deer"] == 20
    result.update({"from": "a", "to": "b"})
    assert "false-merge rate" in table(result)


def test_compare_sees_a_worse_version() -> None:
    rng = np.random.default_rng(3)
    ids, good = clusters(rng, deer=20, per=5, noise=0.2)
    _, bad = clusters(np.random.default_rng(4), deer=20, per=5, noise=3.0)
    pairs = {"deer_ids": ids, "old_resnet": good, "old_effnet": good, "new_resnet": bad,
             "new_effnet": bad}  # fmt: skip
    result = compare(pairs, w_resnet=0.6, w_effnet=0.4, old_threshold=0.5)
    assert result["best_deer_changed"] > 0.3
    assert result["old"]["true_match"]["quantiles"]["p50"] > result["new"]["true_match"][
        "quantiles"]["p50"]  # fmt: skip
