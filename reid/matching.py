"""The assignment rule: which deer a detection belongs to, or whether it is a new deer.

    s = W_RESNET * cos(r, R_deer) + W_EFFNET * cos(e, E_deer)
    best s >= threshold -> that deer; otherwise a new deer.

Each decision also names its ``TOP_CANDIDATES`` best deer with their scores, and is flagged
``needs_review`` when it was close (``review_flag``): the best score within ``review_band`` of
the threshold, or an accepted deer whose runner-up is within ``review_margin`` of it.

Pure numpy (no torch) so that storage code and offline tools can apply the identical rule.
Scores are float32 dot products of L2-normalised vectors and are compared with `>=`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The one definition of the rule's defaults: the stream's settings (REID_THRESHOLD,
# REID_WEIGHT_RESNET, REID_WEIGHT_EFFNET) default to these, as do reid-eval and the benches.
DEFAULT_THRESHOLD = 0.40
W_RESNET = 0.6
W_EFFNET = 0.4
# The review flags' defaults (REID_REVIEW_BAND, REID_REVIEW_MARGIN), and how many deer a
# decision names as its candidates.
DEFAULT_REVIEW_BAND = 0.05
DEFAULT_REVIEW_MARGIN = 0.03
TOP_CANDIDATES = 3


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """L2-normalise along the last axis (rows); all-zero rows stay zero. Returns float32."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def merge_centroid(centroid: np.ndarray, count: int, vectors: np.ndarray) -> np.ndarray:
    """Running mean of `count` earlier sightings (as `centroid`) and new `vectors`, normalised.

    `vectors` is one vector [dim] or several [k, dim].
    """
    vectors = np.asarray(vectors, dtype=np.float32).reshape(-1, np.shape(centroid)[-1])
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    total = np.asarray(centroid, dtype=np.float32) * np.float32(count) + vectors.sum(axis=0)
    return l2_normalise(total / np.float32(count + len(vectors)))


@dataclass
class Gallery:
    """The known deer under one embedding version: ids, centroids and sighting counts."""

    deer_ids: np.ndarray  # int64 [D]
    resnet: np.ndarray  # float32 [D, dim]
    effnet: np.ndarray  # float32 [D, dim]
    sightings: np.ndarray  # int64 [D]

    def __post_init__(self) -> None:
        self.deer_ids = np.asarray(self.deer_ids, dtype=np.int64).reshape(-1)
        self.resnet = np.asarray(self.resnet, dtype=np.float32)
        self.effnet = np.asarray(self.effnet, dtype=np.float32)
        self.sightings = np.asarray(self.sightings, dtype=np.int64).reshape(-1)
        d = len(self.deer_ids)
        if (
            self.resnet.ndim != 2
            or self.effnet.ndim != 2
            or len(self.resnet) != d
            or len(self.effnet) != d
            or len(self.sightings) != d
        ):
            raise ValueError(
                f"inconsistent gallery: ids {self.deer_ids.shape}, resnet {self.resnet.shape}, "
                f"effnet {self.effnet.shape}, sightings {self.sightings.shape}"
            )

    @classmethod
    def empty(cls, dim: int = 512) -> Gallery:
        return cls(
            deer_ids=np.zeros(0, dtype=np.int64),
            resnet=np.zeros((0, dim), dtype=np.float32),
            effnet=np.zeros((0, dim), dtype=np.float32),
            sightings=np.zeros(0, dtype=np.int64),
        )

    def __len__(self) -> int:
        return len(self.deer_ids)

    def extended(self, other: Gallery) -> Gallery:
        """This gallery followed by ``other``'s deer (ids must not repeat)."""
        return Gallery(
            deer_ids=np.concatenate([self.deer_ids, other.deer_ids]),
            resnet=np.concatenate([self.resnet, other.resnet]),
            effnet=np.concatenate([self.effnet, other.effnet]),
            sightings=np.concatenate([self.sightings, other.sightings]),
        )


def ensemble_scores(
    resnet: np.ndarray,
    effnet: np.ndarray,
    gallery_resnet: np.ndarray,
    gallery_effnet: np.ndarray,
    w_resnet: float = W_RESNET,
    w_effnet: float = W_EFFNET,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(s, s_resnet, s_effnet), each float32 [N, D]; inputs must be L2-normalised rows."""
    s_resnet = np.asarray(resnet, dtype=np.float32) @ np.asarray(gallery_resnet, np.float32).T
    s_effnet = np.asarray(effnet, dtype=np.float32) @ np.asarray(gallery_effnet, np.float32).T
    # In place: the same float32 values as `w_r * s_r + w_e * s_e`, one [N, D] temporary less.
    s = np.multiply(s_resnet, np.float32(w_resnet))
    s += np.float32(w_effnet) * s_effnet
    return s, s_resnet, s_effnet


@dataclass(frozen=True)
class Candidate:
    """A deer a detection was compared with: a gallery deer (``deer_id``) or one created
    earlier in the batch (``new_deer``), with the ensemble and per-backbone scores."""

    deer_id: int | None
    new_deer: int | None
    similarity: float
    score_resnet: float
    score_effnet: float


@dataclass
class Match:
    deer_id: int | None  # an existing deer; None when the deer was created in this batch
    new_deer: int | None  # index into BatchAssignment.new_deer
    is_new_deer: bool  # True only for the detection that created the deer
    similarity: float | None  # assigned deer's score; for a creator the best rejected score
    score_resnet: float | None
    score_effnet: float | None
    # The best deer first (the assigned one, or for a creator the best it rejected); ties in
    # the order the rule breaks them (gallery order, then creation order).
    candidates: tuple[Candidate, ...] = ()
    needs_review: bool = False


def review_flag(
    candidates: tuple[Candidate, ...] | list[Candidate],
    threshold: float,
    band: float,
    margin: float,
) -> bool:
    """Whether a decision was close enough for a person to look at it.

    The best score within ``band`` of the threshold (either side), or, for an accepted
    deer, the runner-up within ``margin`` of it: which deer was the question. For a new
    deer the runner-up does not matter (both were rejected), only how close the best came.
    ``band``/``margin`` 0 turn that test off.
    """
    if not candidates:
        return False
    best = candidates[0].similarity
    if band > 0 and threshold - band <= best < threshold + band:
        return True
    return (
        margin > 0
        and best >= threshold
        and len(candidates) > 1
        and best - candidates[1].similarity < margin
    )


@dataclass
class NewDeer:
    resnet: np.ndarray  # centroid after the whole batch
    effnet: np.ndarray
    sightings: int
    first_detection: int  # batch index of the detection that created it


@dataclass
class BatchAssignment:
    matches: list[Match]
    new_deer: list[NewDeer]


def assign_batch(
    resnet: np.ndarray,
    effnet: np.ndarray,
    gallery: Gallery,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    w_resnet: float = W_RESNET,
    w_effnet: float = W_EFFNET,
    review_band: float = 0.0,
    review_margin: float = 0.0,
) -> BatchAssignment:
    """Assign each detection, in batch order, to a deer or to a new deer.

    Detection i sees every gallery deer and every deer created by detections < i, with
    centroids as updated by those earlier detections. Ties go to the lowest index (gallery
    order, then creation order, gallery before new deer). Each match names its
    ``TOP_CANDIDATES`` best deer as scored at that moment and its ``review_flag``.

    Cost: one [N, D] matmul per backbone against the gallery as it was before the batch; per
    row, an argmax over that score row (only when its best column was moved by an earlier
    row) and a small matmul against the few centroids the batch moved or created. The
    gallery's matrices are only read, never copied.
    """
    resnet = np.asarray(resnet, dtype=np.float32)
    effnet = np.asarray(effnet, dtype=np.float32)
    _check_batch(resnet, effnet, gallery)
    n, d = len(resnet), len(gallery)
    dim_r, dim_e = resnet.shape[1], effnet.shape[1]
    neg_inf = np.float32(-np.inf)

    # The expensive part, against the gallery as it was before this batch: one matmul each.
    # `s_all` is ours: a column's scores are set to -inf once a row moved that deer, so an
    # argmax over a row is the best *unmoved* deer, without copying the row.
    if d:
        s_all, sr_all, se_all = ensemble_scores(
            resnet, effnet, gallery.resnet, gallery.effnet, w_resnet, w_effnet
        )
        best_unmoved = np.argmax(s_all, axis=1)
        top_cols = _top_columns(s_all, best_unmoved, min(TOP_CANDIDATES, d))
    # Centroids moved in this batch, in small buffers rescored per row: gallery deer matched
    # earlier ("touched", by column) and deer created earlier (by creation order).
    touched_r = np.empty((n, dim_r), np.float32)
    touched_e = np.empty((n, dim_e), np.float32)
    touched_count: list[int] = []
    touched_cols: list[int] = []
    touched_pos: dict[int, int] = {}
    created_r = np.empty((n, dim_r), np.float32)
    created_e = np.empty((n, dim_e), np.float32)
    created_count: list[int] = []
    first_detection: list[int] = []
    matches: list[Match] = []

    for i in range(n):
        r, e = resnet[i], effnet[i]
        best: _Score | None = None
        best_col: int | None = None
        best_new: int | None = None
        # (score, group, index, s_resnet, s_effnet): group 0 a gallery column, 1 a new deer.
        ranked: list[tuple[float, int, int, float, float]] = []

        if d:
            row = s_all[i]
            col = int(best_unmoved[i])
            if col in touched_pos:  # moved since the argmax: look again, past the -inf columns
                col = int(np.argmax(row))
            ranked += _unmoved_candidates(row, top_cols[i], touched_pos, sr_all[i], se_all[i])
            if row[col] != neg_inf:  # -inf: every gallery deer was moved by this batch
                best = _Score(row[col], sr_all[i, col], se_all[i, col])
                best_col = col
            if touched_cols:
                t = len(touched_cols)
                t_s, t_sr, t_se = _score_rows(
                    r, e, touched_r[:t], touched_e[:t], w_resnet, w_effnet
                )
                top = t_s.max()
                # The lowest column among equal scores, as an argmax over the whole row would.
                k = min((k for k in range(t) if t_s[k] == top), key=touched_cols.__getitem__)
                ranked += [
                    (float(t_s[j]), 0, touched_cols[j], float(t_sr[j]), float(t_se[j]))
                    for j in range(t)
                ]
                col = touched_cols[k]
                if best is None or (t_s[k], -col) > (best.s, -(best_col or 0)):
                    best = _Score(t_s[k], t_sr[k], t_se[k])
                    best_col = col

        if created_count:
            c = len(created_count)
            c_s, c_sr, c_se = _score_rows(r, e, created_r[:c], created_e[:c], w_resnet, w_effnet)
            k = int(np.argmax(c_s))
            ranked += [(float(c_s[j]), 1, j, float(c_sr[j]), float(c_se[j])) for j in range(c)]
            # Strictly greater: on a tie the gallery deer (lower index) keeps it.
            if best is None or c_s[k] > best.s:
                best = _Score(c_s[k], c_sr[k], c_se[k])
                best_col, best_new = None, k

        candidates = _candidates(ranked, gallery.deer_ids)
        flagged = review_flag(candidates, threshold, review_band, review_margin)
        if best is not None and best.s >= threshold:
            if best_new is not None:
                _add(created_r, created_e, created_count, best_new, r, e)
                matches.append(best.match(deer_id=None, new_deer=best_new, is_new_deer=False,
                                          candidates=candidates, needs_review=flagged))  # fmt: skip
                continue
            assert best_col is not None
            k = touched_pos.get(best_col)
            if k is None:
                k = touched_pos[best_col] = len(touched_cols)
                touched_cols.append(best_col)
                touched_r[k] = gallery.resnet[best_col]
                touched_e[k] = gallery.effnet[best_col]
                touched_count.append(int(gallery.sightings[best_col]))
                s_all[:, best_col] = neg_inf  # its score from now on comes from touched_*
            _add(touched_r, touched_e, touched_count, k, r, e)
            deer_id = int(gallery.deer_ids[best_col])
            matches.append(best.match(deer_id=deer_id, new_deer=None, is_new_deer=False,
                                      candidates=candidates, needs_review=flagged))  # fmt: skip
            continue

        # A new deer; its centroids start as its own vectors.
        new_index = len(created_count)
        created_r[new_index] = r
        created_e[new_index] = e
        created_count.append(1)
        first_detection.append(i)
        if best is None:
            matches.append(Match(None, new_index, True, None, None, None))
        else:
            matches.append(best.match(deer_id=None, new_deer=new_index, is_new_deer=True,
                                      candidates=candidates, needs_review=flagged))  # fmt: skip

    new_deer = [
        NewDeer(
            resnet=created_r[k].copy(),
            effnet=created_e[k].copy(),
            sightings=created_count[k],
            first_detection=f,
        )
        for k, f in enumerate(first_detection)
    ]
    return BatchAssignment(matches=matches, new_deer=new_deer)


def _add(
    buf_r: np.ndarray, buf_e: np.ndarray, counts: list[int], k: int, r: np.ndarray, e: np.ndarray
) -> None:
    """Merge one detection into centroid ``k`` of a batch buffer (running mean, normalised)."""
    buf_r[k] = merge_centroid(buf_r[k], counts[k], r)
    buf_e[k] = merge_centroid(buf_e[k], counts[k], e)
    counts[k] += 1


class _Score:
    __slots__ = ("s", "s_effnet", "s_resnet")

    def __init__(self, s: np.floating, s_resnet: np.floating, s_effnet: np.floating) -> None:
        self.s = float(s)
        self.s_resnet = float(s_resnet)
        self.s_effnet = float(s_effnet)

    def match(
        self,
        *,
        deer_id: int | None,
        new_deer: int | None,
        is_new_deer: bool,
        candidates: tuple[Candidate, ...],
        needs_review: bool,
    ) -> Match:
        return Match(
            deer_id=deer_id,
            new_deer=new_deer,
            is_new_deer=is_new_deer,
            similarity=self.s,
            score_resnet=self.s_resnet,
            score_effnet=self.s_effnet,
            candidates=candidates,
            needs_review=needs_review,
        )


def _top_columns(s: np.ndarray, best: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` best columns of each row of ``s`` [N, D], best first, ties to the lowest
    column: repeated argmax with the found columns masked (argmax is a fast vectorised scan;
    a partition of the whole matrix was measured 5-10x slower). ``s`` is restored."""
    rows = np.arange(len(s))
    cols = [best]
    saved = []
    for _ in range(k - 1):
        saved.append(s[rows, cols[-1]].copy())
        s[rows, cols[-1]] = -np.inf
        cols.append(np.argmax(s, axis=1))
    for col, values in zip(reversed(cols[:-1]), reversed(saved), strict=True):
        s[rows, col] = values
    return np.stack(cols, axis=1)


def _unmoved_candidates(
    row: np.ndarray,
    top: np.ndarray,
    touched: dict[int, int],
    row_resnet: np.ndarray,
    row_effnet: np.ndarray,
) -> list[tuple[float, int, int, float, float]]:
    """The best gallery columns of a row not moved by the batch (moved ones are -inf in
    ``row`` and scored from the batch's buffers instead). ``top`` holds the row's best
    columns before the batch; when a moved one is among them, the row is searched again."""
    cols = [int(c) for c in top if int(c) not in touched]
    if len(cols) < len(top):
        again = _top_columns(row[None, :], np.argmax(row)[None], len(top))[0]
        # Fewer unmoved columns than asked: the search ends in -inf ones (and may repeat).
        cols = [c for c in dict.fromkeys(int(c) for c in again) if row[c] != -np.inf]
    return [(float(row[c]), 0, int(c), float(row_resnet[c]), float(row_effnet[c])) for c in cols]


def _candidates(
    ranked: list[tuple[float, int, int, float, float]], deer_ids: np.ndarray
) -> tuple[Candidate, ...]:
    """The best ``TOP_CANDIDATES`` of a row's scores, in the rule's tie order."""
    ranked.sort(key=lambda t: (-t[0], t[1], t[2]))
    return tuple(
        Candidate(int(deer_ids[index]), None, s, sr, se)
        if group == 0
        else Candidate(None, index, s, sr, se)
        for s, group, index, sr, se in ranked[:TOP_CANDIDATES]
    )


def _score_rows(
    r: np.ndarray,
    e: np.ndarray,
    cent_r: np.ndarray,
    cent_e: np.ndarray,
    w_resnet: float,
    w_effnet: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s, sr, se = ensemble_scores(r[None, :], e[None, :], cent_r, cent_e, w_resnet, w_effnet)
    return s[0], sr[0], se[0]


def _check_batch(resnet: np.ndarray, effnet: np.ndarray, gallery: Gallery) -> None:
    if resnet.ndim != 2 or effnet.ndim != 2 or len(resnet) != len(effnet):
        raise ValueError(f"expected [N, dim] pairs, got {resnet.shape} and {effnet.shape}")
    if resnet.shape[1] != gallery.resnet.shape[1] or effnet.shape[1] != gallery.effnet.shape[1]:
        raise ValueError(
            f"dimension mismatch: batch {resnet.shape[1]}/{effnet.shape[1]}, "
            f"gallery {gallery.resnet.shape[1]}/{gallery.effnet.shape[1]}"
        )
    # A NaN would win every argmax and silently become a deer.
    if not (np.isfinite(resnet).all() and np.isfinite(effnet).all()):
        raise ValueError("embeddings contain NaN or infinite values")
