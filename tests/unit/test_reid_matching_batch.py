"""The fast assign_batch gives exactly what a straightforward implementation gives.

The reference below is the earlier, plain implementation: per row it copies the whole score
row, writes the rescored moved centroids into it and takes one argmax. The fast one must
agree bit for bit: same deer, same new-deer indices, same float scores, same centroids.
"""

from __future__ import annotations

import math
from dataclasses import astuple

import numpy as np
import pytest

from reid.matching import (
    DEFAULT_THRESHOLD,
    TOP_CANDIDATES,
    W_EFFNET,
    W_RESNET,
    BatchAssignment,
    Candidate,
    Gallery,
    Match,
    NewDeer,
    assign_batch,
    ensemble_scores,
    l2_normalise,
    merge_centroid,
    review_flag,
)


class _Moved:
    def __init__(self, r: np.ndarray, e: np.ndarray, count: int) -> None:
        self.r, self.e, self.count = r, e, count

    def add(self, r: np.ndarray, e: np.ndarray) -> None:
        self.r = merge_centroid(self.r, self.count, r)
        self.e = merge_centroid(self.e, self.count, e)
        self.count += 1


def _scores(r, e, moved: list[_Moved], wr: float, we: float):
    s, sr, se = ensemble_scores(
        r[None], e[None], np.stack([m.r for m in moved]), np.stack([m.e for m in moved]), wr, we
    )
    return s[0], sr[0], se[0]


def reference_assign(
    resnet, effnet, gallery: Gallery, *, threshold=DEFAULT_THRESHOLD, w_resnet=W_RESNET,
    w_effnet=W_EFFNET, review_band=0.0, review_margin=0.0,
) -> BatchAssignment:  # fmt: skip
    resnet = np.asarray(resnet, np.float32)
    effnet = np.asarray(effnet, np.float32)
    d = len(gallery)
    if d:
        s_all, sr_all, se_all = ensemble_scores(
            resnet, effnet, gallery.resnet, gallery.effnet, w_resnet, w_effnet
        )
    touched_cols: list[int] = []
    touched: list[_Moved] = []
    created: list[_Moved] = []
    firsts: list[int] = []
    matches: list[Match] = []
    for i in range(len(resnet)):
        r, e = resnet[i], effnet[i]
        best = col = new = None
        # Every deer's score, sorted the plain way: (-score, gallery before new, index).
        ranked = []
        if d:
            row = s_all[i].copy()
            sr_row, se_row = sr_all[i].copy(), se_all[i].copy()
            if touched:
                t_s, t_sr, t_se = _scores(r, e, touched, w_resnet, w_effnet)
                row[touched_cols], sr_row[touched_cols], se_row[touched_cols] = t_s, t_sr, t_se
            col = int(np.argmax(row))
            best = (float(row[col]), float(sr_row[col]), float(se_row[col]))
            for c in np.lexsort((np.arange(d), -row))[:TOP_CANDIDATES]:
                ranked.append((-float(row[c]), 0, int(c), float(sr_row[c]), float(se_row[c])))
        if created:
            c_s, c_sr, c_se = _scores(r, e, created, w_resnet, w_effnet)
            k = int(np.argmax(c_s))
            if best is None or c_s[k] > best[0]:
                best, col, new = (float(c_s[k]), float(c_sr[k]), float(c_se[k])), None, k
            ranked += [(-float(c_s[j]), 1, j, float(c_sr[j]), float(c_se[j]))
                       for j in range(len(created))]  # fmt: skip
        cands = tuple(
            Candidate(int(gallery.deer_ids[k]) if g == 0 else None, k if g == 1 else None,
                      -s, sr, se)
            for s, g, k, sr, se in sorted(ranked)[:TOP_CANDIDATES]
        )  # fmt: skip
        flag = review_flag(cands, threshold, review_band, review_margin)
        if best is not None and best[0] >= threshold:
            if new is not None:
                created[new].add(r, e)
                matches.append(Match(None, new, False, *best, cands, flag))
                continue
            if col not in touched_cols:
                touched_cols.append(col)
                touched.append(
                    _Moved(gallery.resnet[col], gallery.effnet[col], int(gallery.sightings[col]))
                )
            touched[touched_cols.index(col)].add(r, e)
            matches.append(Match(int(gallery.deer_ids[col]), None, False, *best, cands, flag))
            continue
        created.append(_Moved(r.copy(), e.copy(), 1))
        firsts.append(i)
        k = len(created) - 1
        if best is None:
            matches.append(Match(None, k, True, None, None, None))
        else:
            matches.append(Match(None, k, True, *best, cands, flag))
    new_deer = [NewDeer(c.r, c.e, c.count, f) for c, f in zip(created, firsts, strict=True)]
    return BatchAssignment(matches, new_deer)


def assert_identical(got: BatchAssignment, want: BatchAssignment) -> None:
    # Ids, flags and the exact float scores.
    assert [astuple(m) for m in got.matches] == [astuple(m) for m in want.matches]
    assert len(got.new_deer) == len(want.new_deer)
    for g, w in zip(got.new_deer, want.new_deer, strict=True):
        assert (g.sightings, g.first_detection) == (w.sightings, w.first_detection)
        np.testing.assert_array_equal(g.resnet, w.resnet)
        np.testing.assert_array_equal(g.effnet, w.effnet)


def random_case(seed: int, d: int, n: int, dim: int = 512):
    """A gallery and a batch with recurring known deer, recurring new animals and loners,
    plus exact duplicates (gallery rows and batch rows) so that ties occur."""
    rng = np.random.default_rng(seed)
    resnet = l2_normalise(rng.normal(size=(d, dim)))
    effnet = l2_normalise(rng.normal(size=(d, dim)))
    if d >= 4:  # two pairs of identical deer: ties between gallery columns
        resnet[d // 2], effnet[d // 2] = resnet[1], effnet[1]
        resnet[d - 1], effnet[d - 1] = resnet[2], effnet[2]
    gallery = Gallery(
        deer_ids=rng.permutation(10 * d + 10)[:d],
        resnet=resnet,
        effnet=effnet,
        sightings=rng.integers(1, 20, size=d),
    )

    def near(v: np.ndarray, scale: float) -> np.ndarray:
        return l2_normalise(v + rng.normal(scale=scale, size=v.shape) / math.sqrt(dim))

    known = [1, 2, *rng.choice(d, size=min(d, 4), replace=False)] if d else []
    new_r = l2_normalise(rng.normal(size=(3, dim)))
    new_e = l2_normalise(rng.normal(size=(3, dim)))
    rows_r, rows_e = [], []
    for _ in range(n):
        kind = int(rng.integers(0, 5))
        if kind <= 1 and known:
            j = known[int(rng.integers(0, len(known)))]
            exact = rng.random() < 0.3  # the centroid itself: ties with its duplicate
            rows_r.append(resnet[j] if exact else near(resnet[j], 1.0))
            rows_e.append(effnet[j] if exact else near(effnet[j], 1.0))
        elif kind <= 3:
            k = int(rng.integers(0, len(new_r)))
            rows_r.append(near(new_r[k], 1.1))
            rows_e.append(near(new_e[k], 1.1))
        elif rows_r and rng.random() < 0.5:  # a repeat of an earlier row of the batch
            k = int(rng.integers(0, len(rows_r)))
            rows_r.append(rows_r[k])
            rows_e.append(rows_e[k])
        else:
            rows_r.append(l2_normalise(rng.normal(size=dim)))
            rows_e.append(l2_normalise(rng.normal(size=dim)))
    return np.stack(rows_r), np.stack(rows_e), gallery


@pytest.mark.parametrize(
    ("seed", "d", "n"),
    [(0, 0, 16), (1, 1, 8), (2, 3, 32), (3, 50, 32), (4, 2_000, 64), (5, 20_000, 32)],
)
def test_fast_path_equals_reference_on_random_batches(seed: int, d: int, n: int) -> None:
    r, e, gallery = random_case(seed, d, n)
    want = reference_assign(r, e, gallery)
    got = assign_batch(r, e, gallery)
    assert_identical(got, want)
    if d >= 50:  # the case exercised what it is meant to
        kinds = [(m.deer_id is not None, m.is_new_deer) for m in want.matches]
        assert kinds.count((True, False)) >= 4  # known deer, several touched more than once
        assert any(m.new_deer is not None and not m.is_new_deer for m in want.matches)
        assert sum(m.is_new_deer for m in want.matches) >= 2


@pytest.mark.parametrize("threshold", [-1.0, 0.2, 0.5, 0.9])
def test_fast_path_equals_reference_across_thresholds_and_weights(threshold: float) -> None:
    r, e, gallery = random_case(11, 500, 48)
    for wr in (0.6, 1.0, 0.0):
        kwargs = {"threshold": threshold, "w_resnet": wr, "w_effnet": 1.0 - wr,
                  "review_band": 0.05, "review_margin": 0.03}  # fmt: skip
        assert_identical(
            assign_batch(r, e, gallery, **kwargs), reference_assign(r, e, gallery, **kwargs)
        )


def _v(*values: float, dim: int = 4) -> np.ndarray:
    out = np.zeros(dim, dtype=np.float32)
    out[: len(values)] = values
    return out


def _g(vectors: list[np.ndarray], ids: list[int]) -> Gallery:
    m = np.stack(vectors)
    return Gallery(np.array(ids), m, m.copy(), np.ones(len(ids), dtype=np.int64))


def test_tie_between_moved_and_unmoved_deer_goes_to_the_lower_column() -> None:
    # Columns 0 and 1 hold the same centroid; row 0 moves column 0 (it stays exactly [1,0]),
    # row 1 then ties the moved column 0 with the unmoved column 1: column 0 wins.
    g = _g([_v(1, 0), _v(1, 0)], ids=[50, 40])
    rows = np.stack([_v(1, 0), _v(1, 0)])
    got = assign_batch(rows, rows, g)
    assert [m.deer_id for m in got.matches] == [50, 50]
    assert_identical(got, reference_assign(rows, rows, g))

    # Row 0 moves column 1 (it stays exactly [0,1]); row 1 is at 45 degrees to both: the
    # unmoved column 0 wins over the moved column 1.
    g = _g([_v(1, 0), _v(0, 1)], ids=[50, 40])
    diag = _v(1, 1) / np.float32(math.sqrt(2))
    rows = np.stack([_v(0, 1), diag])
    got = assign_batch(rows, rows, g, threshold=0.5)
    assert [m.deer_id for m in got.matches] == [40, 50]
    assert_identical(got, reference_assign(rows, rows, g, threshold=0.5))


def test_every_gallery_deer_moved_still_matches_them() -> None:
    g = _g([_v(1, 0), _v(0, 1)], ids=[1, 2])
    rows = np.stack([_v(1, 0), _v(0, 1), _v(1, 0.1), _v(0.1, 1)])
    got = assign_batch(rows, rows, g)
    assert [m.deer_id for m in got.matches] == [1, 2, 1, 2]
    assert_identical(got, reference_assign(rows, rows, g))


def test_inputs_are_not_modified_and_new_deer_do_not_alias() -> None:
    r, e, gallery = random_case(7, 300, 32)
    before = [a.copy() for a in (r, e, gallery.resnet, gallery.effnet, gallery.sightings)]
    got = assign_batch(r, e, gallery)
    for a, b in zip((r, e, gallery.resnet, gallery.effnet, gallery.sightings), before, strict=True):
        np.testing.assert_array_equal(a, b)
    assert len(got.new_deer) >= 2
    got.new_deer[0].resnet[:] = 0
    assert np.any(got.new_deer[1].resnet != 0)
