"""PNG figures of training and evaluation (matplotlib, the `train` extra; Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def training_curves(history: Sequence[dict[str, Any]], out: Path) -> Path:
    """Loss per epoch (and held-out mAP/rank-1 where evaluated)."""
    plt = _plt()
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [h["epoch"] for h in history if "loss" in h]
    ax[0].plot(epochs, [h["loss"] for h in history if "loss" in h], marker="o", label="total")
    for key in sorted({k for h in history for k in h.get("parts", {})}):
        ax[0].plot(
            epochs, [h.get("parts", {}).get(key, np.nan) for h in history if "loss" in h], label=key
        )
    ax[0].set(xlabel="epoch", ylabel="loss", title="training loss")
    ax[0].legend()
    ev = [h for h in history if "mAP" in h]
    ax[1].plot([h["epoch"] for h in ev], [h["mAP"] for h in ev], marker="o", label="mAP")
    ax[1].plot([h["epoch"] for h in ev], [h["rank1"] for h in ev], marker="s", label="rank-1")
    ax[1].set(xlabel="epoch", ylim=(0, 1), title="held-out retrieval")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def threshold_sweep(
    sweep: Sequence[dict[str, Any]],
    out: Path,
    suggested: float | None,
    current: float | None = None,
) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    t = [r["threshold"] for r in sweep]
    ax.plot(t, [r["accuracy"] for r in sweep], marker="o", label="accuracy")
    ax.plot(t, [r["false_merge_rate"] for r in sweep], marker="x", label="false-merge rate")
    ax.plot(
        t,
        [r["fragmentation"] / max(1.0, max(x["fragmentation"] for x in sweep)) for r in sweep],
        ls="--",
        label="fragmentation (scaled)",
    )
    if suggested is not None:
        ax.axvline(suggested, color="green", ls=":", label=f"suggested {suggested:.2f}")
    if current is not None:
        ax.axvline(current, color="grey", ls=":", label=f"current {current:.2f}")
    ax.set(xlabel="assignment threshold", ylim=(0, 1.02), title="stream replay")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def embedding_map(features: np.ndarray, labels: Sequence[str], out: Path) -> Path:
    """2-D PCA of the embeddings, one colour per identity."""
    plt = _plt()
    x = features - features.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    xy = x @ vt[:2].T
    names = sorted(set(labels))
    colour = {n: i for i, n in enumerate(names)}
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.scatter(xy[:, 0], xy[:, 1], c=[colour[n] for n in labels], cmap="tab20", s=14)
    ax.set(title=f"embeddings (PCA), {len(names)} identities", xticks=[], yticks=[])
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def ranked_grid(
    query: Sequence[Any],
    gallery: Sequence[Any],
    ranked: Sequence[Sequence[int]],
    out: Path,
    thumb: int = 96,
) -> Path:
    """Each row: a query, then its top-k gallery images framed green (right) or red (wrong).

    ``query``/``gallery`` are `reid.training.data.Sample`s, ``ranked`` the gallery indices per query
    after the protocol's exclusions.
    """
    from PIL import Image, ImageDraw

    k = max((len(r) for r in ranked), default=0)
    pad = 6
    canvas = Image.new(
        "RGB", ((k + 1) * (thumb + pad) + pad, len(query) * (thumb + pad) + pad), "white"
    )
    draw = ImageDraw.Draw(canvas)
    for row, (q, hits) in enumerate(zip(query, ranked, strict=True)):
        y = pad + row * (thumb + pad)
        for col, sample in enumerate([q] + [gallery[j] for j in hits]):
            x = pad + col * (thumb + pad) + (pad if col else 0)
            with Image.open(sample.path) as img:
                canvas.paste(img.convert("RGB").resize((thumb, thumb)), (x, y))
            if col:
                ok = sample.identity == q.identity
                draw.rectangle(
                    [x - 2, y - 2, x + thumb + 1, y + thumb + 1],
                    outline=(0, 170, 0) if ok else (220, 0, 0),
                    width=3,
                )
    canvas.save(out)
    return out
