"""The stream's own accuracy: replay labelled detections through the assignment rule.

Detections are fed in order (capture order, or a seeded shuffle) in batches to
`reid.matching.assign_batch`, exactly as the stream does: each batch is matched against the
deer known before it (and the deer created earlier in the same batch), then the known deer's
centroids are updated with the batch's running mean (`merge_centroid`, as the store does) and
the batch's new deer are added. Every deer ends with a list of true identities.

Definitions (one replay):
- a deer *represents* individual X when X is its majority identity and, of all deer whose
  majority is X, it holds the most detections of X (so an individual has at most one
  representing deer, and a mixed deer represents only its majority);
- accuracy: the fraction of detections assigned to the deer that represents their individual;
- false merges: deer holding detections of 2 or more individuals; `false_merge_rate` is
  their share of all deer;
- fragmentation: the mean number of deer an individual's detections are spread over (1 is
  perfect);
- accuracy_5plus: accuracy over the individuals with 5 or more detections.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from reid.matching import (
    DEFAULT_THRESHOLD,
    W_EFFNET,
    W_RESNET,
    Gallery,
    assign_batch,
    merge_centroid,
)


@dataclass
class StreamResult:
    threshold: float
    detections: int
    individuals: int
    deer: int
    accuracy: float
    false_merges: int
    false_merge_rate: float
    fragmentation: float
    accuracy_5plus: float
    individuals_5plus: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def replay_order(n: int, keys: Sequence[str] | None = None, seed: int | None = None) -> list[int]:
    """Capture order (sorted by ``keys``, e.g. `date` then path) or a seeded random order."""
    if seed is not None:
        order = list(range(n))
        random.Random(seed).shuffle(order)
        return order
    if keys is None:
        return list(range(n))
    return sorted(range(n), key=lambda i: keys[i])


def replay(
    resnet: np.ndarray,
    effnet: np.ndarray,
    identities: Sequence[str],
    order: Sequence[int],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    batch_size: int = 16,
    w_resnet: float = W_RESNET,
    w_effnet: float = W_EFFNET,
) -> list[int]:
    """Deer index of each detection (indexed like the inputs) after replaying ``order``.

    For a single-backbone model pass the same vectors as ``resnet`` and ``effnet``: the score
    is then the plain cosine whatever the weights.
    """
    resnet = np.asarray(resnet, np.float32)
    effnet = np.asarray(effnet, np.float32)
    gallery = Gallery.empty(resnet.shape[1])
    gallery.effnet = np.zeros((0, effnet.shape[1]), np.float32)
    deer_of = [-1] * len(identities)
    for start in range(0, len(order), batch_size):
        idx = list(order[start : start + batch_size])
        plan = assign_batch(
            resnet[idx],
            effnet[idx],
            gallery,
            threshold=threshold,
            w_resnet=w_resnet,
            w_effnet=w_effnet,
        )
        first_new = len(gallery)
        by_existing: dict[int, list[int]] = defaultdict(list)
        for i, m in zip(idx, plan.matches, strict=True):
            if m.deer_id is not None:
                deer_of[i] = m.deer_id
                by_existing[m.deer_id].append(i)
            else:
                deer_of[i] = first_new + m.new_deer
        r, e, s = gallery.resnet.copy(), gallery.effnet.copy(), gallery.sightings.copy()
        for deer, members in by_existing.items():
            r[deer] = merge_centroid(r[deer], int(s[deer]), resnet[members])
            e[deer] = merge_centroid(e[deer], int(s[deer]), effnet[members])
            s[deer] += len(members)
        new = plan.new_deer
        gallery = Gallery(
            deer_ids=np.arange(first_new + len(new)),
            resnet=np.concatenate([r, *[d.resnet[None] for d in new]]),
            effnet=np.concatenate([e, *[d.effnet[None] for d in new]]),
            sightings=np.concatenate([s, [d.sightings for d in new]]).astype(np.int64),
        )
    return deer_of


def score(deer_of: Sequence[int], identities: Sequence[str], threshold: float) -> StreamResult:
    """The metrics of the module docstring for one replay's assignment."""
    per_deer: dict[int, Counter[str]] = defaultdict(Counter)
    per_ind: dict[str, Counter[int]] = defaultdict(Counter)
    for deer, who in zip(deer_of, identities, strict=True):
        per_deer[deer][who] += 1
        per_ind[who][deer] += 1
    # Ties in the majority go to the smaller identity name, so the result is deterministic.
    majority = {d: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for d, c in per_deer.items()}
    represent: dict[str, int] = {}
    for d, who in sorted(majority.items()):
        if who not in represent or per_deer[d][who] > per_deer[represent[who]][who]:
            represent[who] = d
    correct = {who: per_deer[represent[who]][who] if who in represent else 0 for who in per_ind}
    n = len(identities)
    merges = sum(1 for c in per_deer.values() if len(c) >= 2)
    big = [w for w, c in per_ind.items() if sum(c.values()) >= 5]
    big_n = sum(sum(per_ind[w].values()) for w in big)
    return StreamResult(
        threshold=float(threshold),
        detections=n,
        individuals=len(per_ind),
        deer=len(per_deer),
        accuracy=sum(correct.values()) / n if n else 0.0,
        false_merges=merges,
        false_merge_rate=merges / len(per_deer) if per_deer else 0.0,
        fragmentation=float(np.mean([len(c) for c in per_ind.values()])) if per_ind else 0.0,
        accuracy_5plus=sum(correct[w] for w in big) / big_n if big_n else 0.0,
        individuals_5plus=len(big),
    )


def evaluate_stream(
    resnet: np.ndarray,
    effnet: np.ndarray,
    identities: Sequence[str],
    order: Sequence[int],
    threshold: float = DEFAULT_THRESHOLD,
    batch_size: int = 16,
) -> StreamResult:
    deer_of = replay(resnet, effnet, identities, order, threshold=threshold, batch_size=batch_size)
    return score(deer_of, identities, threshold)


def threshold_sweep(
    resnet: np.ndarray,
    effnet: np.ndarray,
    identities: Sequence[str],
    order: Sequence[int],
    thresholds: Sequence[float] | None = None,
    batch_size: int = 16,
) -> list[StreamResult]:
    if thresholds is None:
        # Finer near 1: a model whose cosines are compressed high still gets a usable choice.
        grid = np.concatenate([np.arange(0.0, 0.9, 0.05), np.arange(0.9, 1.0001, 0.01)])
        thresholds = np.round(grid, 2).tolist()
    return [evaluate_stream(resnet, effnet, identities, order, t, batch_size) for t in thresholds]


def suggest_threshold(
    sweep: Sequence[StreamResult], target_false_merge_rate: float = 0.05
) -> StreamResult | None:
    """The most accurate threshold whose false-merge rate is within the target (ties: the
    higher, safer threshold); None if no threshold meets it."""
    ok = [r for r in sweep if r.false_merge_rate <= target_false_merge_rate]
    if not ok:
        return None
    return max(ok, key=lambda r: (r.accuracy, r.threshold))
