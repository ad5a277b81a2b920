import math

import numpy as np
import pytest

from reid.matching import (
    DEFAULT_THRESHOLD,
    W_EFFNET,
    W_RESNET,
    Gallery,
    assign_batch,
    ensemble_scores,
    l2_normalise,
    merge_centroid,
)


def _v(*values: float, dim: int = 4) -> np.ndarray:
    out = np.zeros(dim, dtype=np.float32)
    out[: len(values)] = values
    return out


def _angle(deg: float, dim: int = 4) -> np.ndarray:
    return _v(math.cos(math.radians(deg)), math.sin(math.radians(deg)), dim=dim)


def _gallery(resnet: list[np.ndarray], effnet: list[np.ndarray], ids=None, sightings=None):
    n = len(resnet)
    return Gallery(
        deer_ids=np.asarray(ids if ids is not None else range(100, 100 + n), dtype=np.int64),
        resnet=np.stack(resnet),
        effnet=np.stack(effnet),
        sightings=np.asarray(sightings if sightings is not None else [1] * n, dtype=np.int64),
    )


def test_ensemble_scores_hand_computed() -> None:
    g = _gallery([_v(1, 0), _v(0, 1)], [_v(0, 1), _v(1, 0)])
    r, e = _v(0.6, 0.8)[None], _v(1, 0)[None]
    s, sr, se = ensemble_scores(r, e, g.resnet, g.effnet)
    np.testing.assert_allclose(sr, [[0.6, 0.8]], atol=1e-7)
    np.testing.assert_allclose(se, [[0.0, 1.0]], atol=1e-7)
    np.testing.assert_allclose(s, [[0.6 * 0.6 + 0.4 * 0.0, 0.6 * 0.8 + 0.4 * 1.0]], atol=1e-6)
    s_w, _, _ = ensemble_scores(r, e, g.resnet, g.effnet, w_resnet=0.0, w_effnet=1.0)
    np.testing.assert_allclose(s_w, se, atol=1e-7)

    result = assign_batch(r, e, g)
    (m,) = result.matches
    assert (m.deer_id, m.new_deer, m.is_new_deer) == (101, None, False)
    assert m.similarity == pytest.approx(0.88, abs=1e-6)
    assert m.score_resnet == pytest.approx(0.8, abs=1e-6)
    assert m.score_effnet == pytest.approx(1.0, abs=1e-6)
    assert result.new_deer == []


def test_threshold_boundary_assigns_at_exactly_the_threshold() -> None:
    # 0.6 * 0.5 + 0.4 * 0.25 = 0.40 with both cosines exact in float32.
    g = _gallery([_v(1, 0)], [_v(1, 0)])
    r = _v(0.5, math.sqrt(0.75))[None]
    e = _v(0.25, math.sqrt(1 - 0.0625))[None]
    s = float(ensemble_scores(r, e, g.resnet, g.effnet)[0][0, 0])
    assert s == pytest.approx(W_RESNET * 0.5 + W_EFFNET * 0.25, abs=1e-7)
    assert assign_batch(r, e, g).matches[0].deer_id == 100

    # Tie the threshold to the computed score, so the test pins `>=` without float luck.
    at = assign_batch(r, e, g, threshold=s).matches[0]
    assert at.deer_id == 100
    above = assign_batch(r, e, g, threshold=float(np.nextafter(np.float32(s), 1))).matches[0]
    assert (above.deer_id, above.new_deer, above.is_new_deer) == (None, 0, True)
    assert above.similarity == pytest.approx(s)  # the best rejected score
    assert above.score_resnet == pytest.approx(0.5)
    assert above.score_effnet == pytest.approx(0.25)


def test_two_detections_of_one_new_animal_make_one_deer() -> None:
    rng = np.random.default_rng(0)
    base_r, base_e = l2_normalise(rng.normal(size=(2, 512)))
    noise = rng.normal(scale=0.01, size=(2, 512))
    r = l2_normalise(np.stack([base_r, base_r + noise[0]]))
    e = l2_normalise(np.stack([base_e, base_e + noise[1]]))
    result = assign_batch(r, e, Gallery.empty())

    first, second = result.matches
    assert (first.deer_id, first.new_deer, first.is_new_deer) == (None, 0, True)
    assert first.similarity is None and first.score_resnet is None and first.score_effnet is None
    assert (second.deer_id, second.new_deer, second.is_new_deer) == (None, 0, False)
    assert second.similarity is not None and second.similarity > 0.95
    (deer,) = result.new_deer
    assert deer.sightings == 2
    assert deer.first_detection == 0
    np.testing.assert_allclose(deer.resnet, merge_centroid(r[0], 1, r[1]), atol=1e-7)
    np.testing.assert_allclose(deer.effnet, merge_centroid(e[0], 1, e[1]), atol=1e-7)


def test_two_different_animals_make_two_deer() -> None:
    r = np.stack([_v(1, 0), _v(0, 1)])
    e = np.stack([_v(1, 0), _v(0.6, 0.8)])
    result = assign_batch(r, e, Gallery.empty(dim=4))
    assert [(m.new_deer, m.is_new_deer) for m in result.matches] == [(0, True), (1, True)]
    # The second creator reports what it rejected: the first new deer.
    assert result.matches[1].similarity == pytest.approx(0.6 * 0.0 + 0.4 * 0.6)
    assert [d.first_detection for d in result.new_deer] == [0, 1]
    np.testing.assert_array_equal(result.new_deer[1].resnet, r[1])


def test_later_detections_see_centroids_moved_by_earlier_ones() -> None:
    g = _gallery([_angle(0)], [_angle(0)], ids=[7], sightings=[1])
    # Detection 0 at 60 deg (cos 0.5) joins deer 7 and pulls its centroid to 30 deg;
    # detection 1 at 80 deg (cos 0.17 to the stored centroid, 0.64 to the moved one) follows.
    r = np.stack([_angle(60), _angle(80)])
    result = assign_batch(r, r.copy(), g)
    assert [m.deer_id for m in result.matches] == [7, 7]
    assert result.matches[1].similarity == pytest.approx(math.cos(math.radians(50)), abs=1e-5)
    assert result.new_deer == []
    # Each detection alone against the stored gallery: only the first would match.
    assert assign_batch(r[1:], r[1:], g).matches[0].is_new_deer


def test_ties_go_to_the_lowest_index() -> None:
    g = _gallery([_v(1, 0), _v(1, 0)], [_v(1, 0), _v(1, 0)], ids=[9, 3])
    m = assign_batch(_v(1, 0)[None], _v(1, 0)[None], g).matches[0]
    assert m.deer_id == 9


def test_merge_centroid_hand_computed() -> None:
    merged = merge_centroid(_v(1, 0), 3, _v(0, 1)[None])
    np.testing.assert_allclose(merged, _v(3, 1) / math.sqrt(10), atol=1e-7)
    assert merged.dtype == np.float32
    several = merge_centroid(_v(1, 0), 2, np.stack([_v(0, 1), _v(0, 1)]))
    np.testing.assert_allclose(several, _v(1, 1) / math.sqrt(2), atol=1e-7)
    assert np.linalg.norm(merge_centroid(_v(0.3, 0.4), 5, _v(0, 2))) == pytest.approx(1.0)


def test_l2_normalise_rows_and_zero_rows() -> None:
    x = np.array([[3.0, 4.0], [0.0, 0.0]])
    out = l2_normalise(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]], atol=1e-7)


def test_gallery_validates_shapes() -> None:
    assert len(Gallery.empty(dim=8)) == 0
    assert Gallery.empty(dim=8).resnet.shape == (0, 8)
    with pytest.raises(ValueError):
        Gallery(np.arange(3), np.zeros((2, 4)), np.zeros((3, 4)), np.ones(3))


def test_rejects_non_finite_embeddings() -> None:
    r = np.full((1, 4), np.nan, dtype=np.float32)
    with pytest.raises(ValueError):
        assign_batch(r, r, Gallery.empty(dim=4))


def _naive_assign(r, e, gallery, threshold):
    """Reference: recompute every score of every row from scratch."""
    cent_r, cent_e = list(gallery.resnet), list(gallery.effnet)
    counts = list(gallery.sightings)
    d = len(gallery)
    out = []
    for i in range(len(r)):
        if not cent_r:
            choice = None
        else:
            s = W_RESNET * (np.stack(cent_r) @ r[i]) + W_EFFNET * (np.stack(cent_e) @ e[i])
            choice = int(np.argmax(s))
        if choice is not None and s[choice] >= threshold:
            cent_r[choice] = merge_centroid(cent_r[choice], counts[choice], r[i])
            cent_e[choice] = merge_centroid(cent_e[choice], counts[choice], e[i])
            counts[choice] += 1
            key = ("deer", int(gallery.deer_ids[choice])) if choice < d else ("new", choice - d)
            out.append((key, False, float(s[choice])))
        else:
            cent_r.append(r[i])
            cent_e.append(e[i])
            counts.append(1)
            sim = None if choice is None else float(s[choice])
            out.append((("new", len(cent_r) - 1 - d), True, sim))
    return out, np.stack(cent_r[d:]), counts[d:]


def test_large_gallery_matches_naive_reference() -> None:
    rng = np.random.default_rng(42)
    d, dim = 20_000, 512
    gallery = Gallery(
        deer_ids=rng.permutation(10 * d)[:d],
        resnet=l2_normalise(rng.normal(size=(d, dim))),
        effnet=l2_normalise(rng.normal(size=(d, dim))),
        sightings=rng.integers(1, 20, size=d),
    )

    def near(v: np.ndarray, scale: float) -> np.ndarray:
        return l2_normalise(v + rng.normal(scale=scale, size=v.shape) / math.sqrt(dim))

    known = rng.choice(d, size=6, replace=False)
    new_r = l2_normalise(rng.normal(size=(4, dim)))
    new_e = l2_normalise(rng.normal(size=(4, dim)))
    rows_r, rows_e = [], []
    for i in range(48):
        kind = i % 4
        if kind == 0:  # a known deer, several times each (touched columns)
            j = known[(i // 4) % len(known)]
            rows_r.append(near(gallery.resnet[j], 1.0))
            rows_e.append(near(gallery.effnet[j], 1.0))
        elif kind in (1, 2):  # new animals that recur within the batch
            k = (i // 4) % len(new_r)
            rows_r.append(near(new_r[k], 1.2))
            rows_e.append(near(new_e[k], 1.2))
        else:  # unrelated animals
            rows_r.append(l2_normalise(rng.normal(size=dim)))
            rows_e.append(l2_normalise(rng.normal(size=dim)))
    r, e = np.stack(rows_r), np.stack(rows_e)

    result = assign_batch(r, e, gallery)
    expected, exp_new_r, exp_counts = _naive_assign(r, e, gallery, DEFAULT_THRESHOLD)

    got = []
    for m in result.matches:
        key = ("deer", m.deer_id) if m.deer_id is not None else ("new", m.new_deer)
        got.append((key, m.is_new_deer, m.similarity))
    assert [g[:2] for g in got] == [x[:2] for x in expected]
    for g_row, x_row in zip(got, expected, strict=True):
        assert g_row[2] == pytest.approx(x_row[2], abs=1e-5)
    # The batch exercised every path: touched known deer, recurring new deer, loners.
    kinds = [x[0][0] for x in expected]
    assert kinds.count("deer") >= 12
    assert len(result.new_deer) >= 4 + 12
    assert [nd.sightings for nd in result.new_deer] == exp_counts
    np.testing.assert_allclose(
        np.stack([nd.resnet for nd in result.new_deer]), exp_new_r, atol=1e-6
    )


# -- candidates and the review flag (docs/curation.md) --------------------------------------
def test_candidates_name_the_best_three_deer_best_first() -> None:
    g = _gallery([_angle(0), _angle(30), _angle(60), _angle(90)],
                 [_angle(0), _angle(30), _angle(60), _angle(90)], ids=[7, 8, 9, 10])  # fmt: skip
    q = np.stack([_angle(20)])
    m = assign_batch(q, q, g, threshold=0.5).matches[0]
    assert [c.deer_id for c in m.candidates] == [8, 7, 9]  # 10 deg, 20 deg, 40 deg away
    assert m.candidates[0].deer_id == m.deer_id
    assert m.candidates[0].similarity == pytest.approx(math.cos(math.radians(10)), abs=1e-6)
    assert [c.similarity for c in m.candidates] == sorted(
        (c.similarity for c in m.candidates), reverse=True
    )
    # A deer created earlier in the batch is a candidate too, named by its index.
    q = np.stack([_angle(180), _angle(178)])
    second = assign_batch(q, q, g, threshold=0.9).matches[1]
    assert second.deer_id is None and second.new_deer == 0
    assert second.candidates[0].new_deer == 0 and second.candidates[0].deer_id is None


def test_review_flag_band_and_margin() -> None:
    g = _gallery([_angle(0), _angle(90)], [_angle(0), _angle(90)], ids=[1, 2])
    close = np.stack([_angle(40)])  # cos 40 deg = 0.766: just above a threshold of 0.75
    clear = np.stack([_angle(5)])  # 0.996, runner-up far below
    split = np.stack([_angle(45)])  # 0.707 to both deer: which one is the question
    kw = {"threshold": 0.75, "review_band": 0.05, "review_margin": 0.03}
    assert assign_batch(close, close, g, **kw).matches[0].needs_review
    assert not assign_batch(clear, clear, g, **kw).matches[0].needs_review
    assert not assign_batch(close, close, g, threshold=0.75).matches[0].needs_review  # off
    kw = {"threshold": 0.5, "review_band": 0.05, "review_margin": 0.03}
    assert assign_batch(split, split, g, **kw).matches[0].needs_review  # runner-up ties
    assert (
        not assign_batch(split, split, g, threshold=0.5, review_band=0.05).matches[0].needs_review
    )  # margin off
    # A new deer just below the threshold is flagged; two far-off rejected deer are not
    # (their runner-up gap does not matter: both were rejected).
    below = assign_batch(close, close, g, threshold=0.78, review_band=0.05).matches[0]
    assert below.is_new_deer and below.needs_review
    far = assign_batch(split, split, g, threshold=0.95, review_band=0.05, review_margin=0.5)
    assert far.matches[0].is_new_deer and not far.matches[0].needs_review
    # The very first deer has nothing to compare with: no candidates, no flag.
    first = assign_batch(clear, clear, Gallery.empty(4), review_band=1.0).matches[0]
    assert first.candidates == () and not first.needs_review
