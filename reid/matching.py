"""The assignment rule: which deer a detection belongs to, or whether it is a new deer.

    s = W_RESNET * cos(r, R_deer) + W_EFFNET * cos(e, E_deer)
    best s >= threshold -> that deer; otherwise a new deer.

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


@dataclass
class Match:
    deer_id: int | None  # an existing deer; None when the deer was created in this batch
    new_deer: int | None  # index into BatchAssignment.new_deer
    is_new_deer: bool  # True only for the detection that created the deer
    similarity: float | None  # assigned deer's score; for a creator the best rejected score
    score_resnet: float | None
    score_effnet: float | None


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
) -> BatchAssignment:
    """Assign each detection, in batch order, to a deer or to a new deer.

    Detection i sees every gallery deer and every deer created by detections < i, with
    centroids as updated by those earlier detections. Ties go to the lowest index (gallery
    order, then creation order, gallery before new deer).

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

        if d:
            row = s_all[i]
            col = int(best_unmoved[i])
            if col in touched_pos:  # moved since the argmax: look again, past the -inf columns
                col = int(np.argmax(row))
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
                col = touched_cols[k]
                if best is None or (t_s[k], -col) > (best.s, -(best_col or 0)):
                    best = _Score(t_s[k], t_sr[k], t_se[k])
                    best_col = col

        if created_count:
            c = len(created_count)
            c_s, c_sr, c_se = _score_rows(r, e, created_r[:c], created_e[:c], w_resnet, w_effnet)
            k = int(np.argmax(c_s))
            # Strictly greater: on a tie the gallery deer (lower index) keeps it.
            if best is None or c_s[k] > best.s:
                best = _Score(c_s[k], c_sr[k], c_se[k])
                best_col, best_new = None, k

        if best is not None and best.s >= threshold:
            if best_new is not None:
                _add(created_r, created_e, created_count, best_new, r, e)
                matches.append(best.match(deer_id=None, new_deer=best_new, is_new_deer=False))
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
            matches.append(best.match(deer_id=deer_id, new_deer=None, is_new_deer=False))
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
            matches.append(best.match(deer_id=None, new_deer=new_index, is_new_deer=True))

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

    def match(self, *, deer_id: int | None, new_deer: int | None, is_new_deer: bool) -> Match:
        return Match(
            deer_id=deer_id,
            new_deer=new_deer,
            is_new_deer=is_new_deer,
            similarity=self.s,
            score_resnet=self.s_resnet,
            score_effnet=self.s_effnet,
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
