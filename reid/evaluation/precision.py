"""How much half precision (fp16/bf16 autocast on CUDA) changes the embeddings and decisions.

`compare_precisions` embeds the same images with an fp32 and a half-precision embedder and
reports the per-detection cosine between the two (min, mean, 1st percentile, per backbone)
and how often `reid.matching.assign_batch` makes the same decision under both: the same
existing deer, or the same new deer of the batch. On a machine without CUDA it returns a
"skipped" result instead: the embedder refuses half precision on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from reid.embedder import Embedder, Embeddings
from reid.matching import DEFAULT_THRESHOLD, W_EFFNET, W_RESNET, BatchAssignment, Gallery
from reid.matching import assign_batch as _assign


def compare_precisions(
    embedder_fp32: Embedder,
    embedder_half: Embedder | None,
    images: torch.Tensor | Sequence[torch.Tensor],
    *,
    gallery: Gallery | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    w_resnet: float = W_RESNET,
    w_effnet: float = W_EFFNET,
) -> dict[str, Any]:
    """Compare the two embedders on ``images`` (uint8 [N, 3, H, W] or a list of [3, H, W]).

    ``embedder_half`` may be None where none can be built (no CUDA). Both are started if they
    are not. ``gallery`` (default: empty) is what the batch is assigned against, in order.
    """
    n = len(images)
    precision = embedder_half.precision if embedder_half is not None else None
    skipped = _skip_reason(embedder_fp32, embedder_half)
    if skipped is not None:
        return {"skipped": skipped, "precision": precision, "n": n}
    assert embedder_half is not None
    embedder_fp32.start()
    embedder_half.start()
    if embedder_fp32.embedding_version != embedder_half.embedding_version:
        raise ValueError(
            f"the embedders run different models: {embedder_fp32.embedding_version!r} vs "
            f"{embedder_half.embedding_version!r}"
        )
    result = compare_embeddings(
        embedder_fp32.embed(images),
        embedder_half.embed(images),
        gallery=gallery,
        threshold=threshold,
        w_resnet=w_resnet,
        w_effnet=w_effnet,
    )
    return {"skipped": None, "precision": precision, **result}


def compare_embeddings(
    reference: Embeddings,
    other: Embeddings,
    *,
    gallery: Gallery | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    w_resnet: float = W_RESNET,
    w_effnet: float = W_EFFNET,
) -> dict[str, Any]:
    """Cosine statistics and assignment agreement of two embeddings of the same detections."""
    if len(reference) != len(other):
        raise ValueError(f"{len(reference)} vs {len(other)} detections")
    n = len(reference)
    gallery = gallery if gallery is not None else Gallery.empty(reference.resnet.shape[1])
    cosine = {
        name: _stats(np.sum(getattr(reference, name) * getattr(other, name), axis=1))
        for name in ("resnet", "effnet")
    }
    kw = {"threshold": threshold, "w_resnet": w_resnet, "w_effnet": w_effnet}
    a = _assign(reference.resnet, reference.effnet, gallery, **kw)
    b = _assign(other.resnet, other.effnet, gallery, **kw)
    labels_a, labels_b = _labels(a), _labels(b)
    differ = [i for i in range(n) if labels_a[i] != labels_b[i]]
    return {
        "n": n,
        "cosine": cosine,
        "assignment_agreement": 1.0 - len(differ) / n if n else 1.0,
        "disagreements": differ,
        "new_deer": {"reference": len(a.new_deer), "other": len(b.new_deer)},
    }


def _skip_reason(fp32: Embedder, half: Embedder | None) -> str | None:
    if not torch.cuda.is_available():
        return "skipped: no CUDA (half precision runs on CUDA only; the CPU embedder refuses it)"
    if half is None or not half.device.startswith("cuda"):
        return "skipped: no half-precision CUDA embedder given"
    if half.precision == "fp32":
        return "skipped: the second embedder runs fp32 too"
    if fp32.precision != "fp32":
        return f"skipped: the reference embedder runs {fp32.precision}, not fp32"
    return None


def _labels(assignment: BatchAssignment) -> list[tuple[str, int]]:
    # A detection's decision: an existing deer by id, or the n-th deer created in the batch.
    labels = []
    for m in assignment.matches:
        if m.deer_id is not None:
            labels.append(("deer", int(m.deer_id)))
        else:
            assert m.new_deer is not None
            labels.append(("new", int(m.new_deer)))
    return labels


def _stats(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {"min": float("nan"), "mean": float("nan"), "p1": float("nan")}
    values = values.astype(np.float64)
    return {
        "min": float(values.min()),
        "mean": float(values.mean()),
        "p1": float(np.percentile(values, 1)),
    }
