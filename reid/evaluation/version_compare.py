"""Two embedding versions compared on the same detections (`reid-stream validate`).

Input: the detections that have vectors of both versions (the replayed history), with their
deer as stored (the assignments do not depend on a version). Per version:

- **best deer changes**: the fraction of detections whose best-scoring deer under NEW is not
  their best deer under OLD (over all of them, and over those whose deer was seen twice or
  more; their own deer is scored leave-one-out, see below);
- **true match**: a detection's ensemble score against its own deer, the deer's centroid
  rebuilt *without* that detection (leave-one-out: a centroid that contains the detection
  would flatter it); deer seen once have no true match and are left out of this one;
- **nearest other deer**: its best score against any other deer (full centroids);
- **false-merge rate** at a threshold t (`detection_false_merge_rate`): the fraction of
  detections whose nearest other deer scores >= t (they could join a wrong deer at t). This
  is a per-detection risk on stored history, unlike the per-deer `false_merge_rate` of
  `reid.evaluation.stream_accuracy`, which counts mixed deer after a labelled replay;
- **suggested threshold for NEW** (`threshold_for_false_merge_rate`): the smallest t whose
  false-merge rate under NEW is at most OLD's at its threshold, and the fraction of true
  matches each version accepts at its threshold.

Centroids are computed here from the stored vectors (re-normalised means, as the store
builds them), so both versions are compared on the same detections. Scores use the stream's
rule ``w_resnet * cos(resnet) + w_effnet * cos(effnet)``. Pure numpy; matplotlib is imported
by `plot` only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

HIST_BINS = np.linspace(-1.0, 1.0, 81)
CHUNK = 1024


def _normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def version_scores(
    resnet: np.ndarray, effnet: np.ndarray, deer_ids: np.ndarray, w_resnet: float, w_effnet: float
) -> dict[str, np.ndarray]:
    """Per detection: the leave-one-out score against its own deer (NaN for a deer seen
    once), the best score against any other deer (-inf when there is none), and the best
    deer overall (its own deer scored leave-one-out)."""
    resnet = resnet.astype(np.float64)
    effnet = effnet.astype(np.float64)
    deer, index = np.unique(deer_ids, return_inverse=True)
    counts = np.bincount(index, minlength=len(deer))
    sums_r = np.zeros((len(deer), resnet.shape[1]))
    sums_e = np.zeros((len(deer), effnet.shape[1]))
    np.add.at(sums_r, index, resnet)
    np.add.at(sums_e, index, effnet)
    cent_r, cent_e = _normalise(sums_r), _normalise(sums_e)
    n = len(deer_ids)
    true = np.full(n, np.nan)
    other = np.full(n, -np.inf)
    best = np.empty(n, dtype=np.int64)
    for start in range(0, n, CHUNK):
        sl = slice(start, min(n, start + CHUNK))
        own = index[sl]
        scores = w_resnet * resnet[sl] @ cent_r.T + w_effnet * effnet[sl] @ cent_e.T
        rows = np.arange(scores.shape[0])
        # Leave-one-out score against the own deer.
        loo_r = _normalise(sums_r[own] - resnet[sl])
        loo_e = _normalise(sums_e[own] - effnet[sl])
        loo = w_resnet * np.sum(loo_r * resnet[sl], 1) + w_effnet * np.sum(loo_e * effnet[sl], 1)
        single = counts[own] < 2
        loo = np.where(single, np.nan, loo)
        true[sl] = loo
        masked = scores.copy()
        masked[rows, own] = -np.inf
        other[sl] = masked.max(axis=1) if len(deer) > 1 else -np.inf
        with_own = masked.copy()
        with_own[rows, own] = np.where(single, -np.inf, loo)
        best[sl] = deer[with_own.argmax(axis=1)]
    return {"true": true, "other": other, "best": best}


def detection_false_merge_rate(other: np.ndarray, threshold: float) -> float:
    """The fraction of detections whose nearest other deer scores >= ``threshold``."""
    return float(np.mean(other >= threshold)) if len(other) else 0.0


def threshold_for_false_merge_rate(other: np.ndarray, target_rate: float) -> float:
    """The smallest threshold whose `detection_false_merge_rate` is <= ``target_rate``."""
    finite = np.sort(other[np.isfinite(other)])
    if len(finite) == 0:
        return -1.0
    allowed = int(np.floor(target_rate * len(other) + 1e-9))  # merges we may keep
    if allowed >= len(finite):
        return float(finite[0])
    # Above the (allowed+1)-th largest score: at most `allowed` remain at or above it.
    cut = finite[len(finite) - allowed - 1]
    return float(np.nextafter(np.float32(cut), np.float32(np.inf)))


def _summary(values: np.ndarray) -> dict[str, Any]:
    v = values[np.isfinite(values)]
    if len(v) == 0:
        return {"n": 0}
    q = np.quantile(v, [0.05, 0.25, 0.5, 0.75, 0.95])
    hist, _ = np.histogram(v, bins=HIST_BINS)
    return {
        "n": len(v),
        "mean": round(float(v.mean()), 6),
        "std": round(float(v.std()), 6),
        "quantiles": {k: round(float(x), 6) for k, x in zip(("p5", "p25", "p50", "p75", "p95"),
                                                             q, strict=True)},
        "histogram": [int(h) for h in hist],
    }  # fmt: skip


def compare(
    pairs: dict[str, np.ndarray], *, w_resnet: float, w_effnet: float, old_threshold: float
) -> dict[str, Any]:
    """The comparison of two versions (pure numpy; see the module docstring)."""
    deer_ids = pairs["deer_ids"]
    old = version_scores(pairs["old_resnet"], pairs["old_effnet"], deer_ids, w_resnet, w_effnet)
    new = version_scores(pairs["new_resnet"], pairs["new_effnet"], deer_ids, w_resnet, w_effnet)
    n = len(deer_ids)
    seen = np.isfinite(old["true"])
    rate_old = detection_false_merge_rate(old["other"], old_threshold)
    suggested = threshold_for_false_merge_rate(new["other"], rate_old)

    def accepted(true: np.ndarray, t: float) -> float | None:
        finite = true[np.isfinite(true)]
        return round(float(np.mean(finite >= t)), 6) if len(finite) else None

    return {
        "detections": int(n),
        "deer": len(np.unique(deer_ids)),
        "best_deer_changed": round(float(np.mean(old["best"] != new["best"])), 6) if n else 0.0,
        # The same over detections whose deer was seen at least twice (they have a true
        # match; a deer seen once competes with other deer only).
        "best_deer_changed_seen_twice": (
            round(float(np.mean((old["best"] != new["best"])[seen])), 6) if seen.any() else None
        ),
        "old": {
            "threshold": old_threshold,
            "false_merge_rate": round(rate_old, 6),
            "true_match_accepted": accepted(old["true"], old_threshold),
            "true_match": _summary(old["true"]),
            "nearest_other": _summary(old["other"]),
        },
        "new": {
            "suggested_threshold": round(suggested, 6),
            "false_merge_rate": round(detection_false_merge_rate(new["other"], suggested), 6),
            "true_match_accepted": accepted(new["true"], suggested),
            "false_merge_rate_at_old_threshold": round(
                detection_false_merge_rate(new["other"], old_threshold), 6
            ),
            "true_match": _summary(new["true"]),
            "nearest_other": _summary(new["other"]),
        },
        "histogram_bins": [round(float(b), 4) for b in HIST_BINS],
        "_scores": {"old": old, "new": new},
    }


def plot(result: dict[str, Any], old: str, new: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
    scores = result["_scores"]
    every = np.concatenate([scores[k][f] for k in ("old", "new") for f in ("true", "other")])
    every = every[np.isfinite(every)]
    low = max(-1.0, float(every.min()) - 0.05) if len(every) else -1.0
    for ax, key, name, t in (
        (axes[0], "old", old, result["old"]["threshold"]),
        (axes[1], "new", new, result["new"]["suggested_threshold"]),
    ):
        true = scores[key]["true"]
        other = scores[key]["other"]
        ax.hist(true[np.isfinite(true)], bins=HIST_BINS, alpha=0.6, label="true match (LOO)")
        ax.hist(other[np.isfinite(other)], bins=HIST_BINS, alpha=0.6, label="nearest other deer")
        ax.axvline(t, color="k", linestyle="--", label=f"threshold {t:.3f}")
        ax.set_title(f"{key.upper()}: {name}"[:70], fontsize=9)
        ax.set_xlabel("ensemble score")
        ax.set_xlim(low, 1.0)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("detections")
    fig.suptitle(f"best deer changed: {100 * result['best_deer_changed']:.1f}% "
                 f"of {result['detections']} detections", fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(result: dict[str, Any]) -> str:
    """The numbers as a plain-text table."""
    o, n = result["old"], result["new"]

    def q(d: dict[str, Any], k: str) -> str:
        return f"{d['quantiles'][k]:.3f}" if d.get("n") else "-"

    rows = [
        ("", "OLD", "NEW"),
        ("version", result["from"][:34], result["to"][:34]),
        ("threshold", f"{o['threshold']:.3f}", f"{n['suggested_threshold']:.3f} (suggested)"),
        ("false-merge rate", f"{o['false_merge_rate']:.4f}", f"{n['false_merge_rate']:.4f}"),
        ("true matches accepted", str(o["true_match_accepted"]), str(n["true_match_accepted"])),
        ("true match p50 (LOO)", q(o["true_match"], "p50"), q(n["true_match"], "p50")),
        ("nearest other p50", q(o["nearest_other"], "p50"), q(n["nearest_other"], "p50")),
        ("nearest other p95", q(o["nearest_other"], "p95"), q(n["nearest_other"], "p95")),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.append(f"detections {result['detections']}, deer {result['deer']}, best deer changed "
                 f"{100 * result['best_deer_changed']:.2f}%, false-merge rate of NEW at OLD's "
                 f"threshold {n['false_merge_rate_at_old_threshold']:.4f}")  # fmt: skip
    return "\n".join(lines)
