"""Is the INT8 model worth running? Speed, embeddings and decisions against fp32, measured.

`compare_int8` exports the embedder's ensemble to an fp32 ONNX file, quantises it
(`reid.onnx_int8`, calibrated on a spread of the given crops), and runs both with ONNX Runtime
on the CPU:

- images/s of the ensemble at each batch size, fp32 and INT8, in alternating rounds (so a
  neighbour's burst on a shared machine hits both alike) and the speed-up;
- on the crops *not* used for calibration: the cosine between the fp32 and INT8 embedding of
  each crop (min, mean, 1st percentile, per backbone), and how often `reid.matching`'s rule
  makes the same decision under both (`reid.evaluation.precision.compare_embeddings`: the
  same deer, or the same new deer of the batch, the crops taken in order as one stream);
- the verdict of the adoption rule: at least ``MIN_SPEEDUP`` x fp32 at the stream's batch
  size, every cosine at least ``MIN_COSINE``, at least ``MIN_AGREEMENT`` identical decisions.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reid.embedder import Embedder, Embeddings
from reid.evaluation.precision import compare_embeddings
from reid.matching import DEFAULT_THRESHOLD, W_EFFNET, W_RESNET
from reid.onnx_backend import OnnxSession, export_onnx
from reid.onnx_int8 import quantize_int8

MIN_SPEEDUP = 1.5
MIN_COSINE = 0.99
MIN_AGREEMENT = 0.99


def compare_int8(
    embedder: Embedder,
    images: torch.Tensor,
    *,
    calibration: int = 64,
    batch_sizes: Sequence[int] = (1, 8, 32),
    stream_batch: int = 32,
    seconds: float = 4.0,
    threshold: float = DEFAULT_THRESHOLD,
    w_resnet: float = W_RESNET,
    w_effnet: float = W_EFFNET,
    threads: int | None = None,
) -> dict[str, Any]:
    """Measure the INT8 model of ``embedder``'s ensemble (started) on ``images``, uint8
    [N, 3, H, W] crops at the model's input size; N > ``calibration``."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    n = len(images)
    if not 0 < calibration < n:
        raise ValueError(f"need more crops ({n}) than calibration crops ({calibration})")
    loaded = embedder._require()
    size = loaded.preprocess.input_size
    with torch.inference_mode():
        x = loaded.preprocess.normalise(images).contiguous().numpy().astype(np.float32)
    # A spread of the set calibrates; the rest is what the embeddings are judged on.
    calib_idx = np.unique(np.linspace(0, n - 1, calibration).round().astype(int))
    held_out = np.setdiff1d(np.arange(n), calib_idx)
    model = copy.deepcopy(loaded.model).to("cpu", torch.float32).eval()
    with tempfile.TemporaryDirectory(prefix="reid-int8-") as tmp:
        fp32_path = Path(tmp) / "fp32.onnx"
        export_onnx(model, fp32_path, size)
        t0 = time.perf_counter()
        int8_file = quantize_int8(fp32_path, Path(tmp) / "int8.onnx", x[calib_idx])
        quantise_s = time.perf_counter() - t0
        fp32 = OnnxSession(fp32_path, threads=threads)
        int8 = OnnxSession(int8_file, threads=threads)
        sizes = {"fp32_mb": fp32_path.stat().st_size / 2**20,
                 "int8_mb": int8_file.stat().st_size / 2**20}  # fmt: skip
        speed = [_speed(fp32, int8, x, b, seconds) for b in batch_sizes]
        agreement = compare_embeddings(
            _embed(fp32, x[held_out]), _embed(int8, x[held_out]),
            threshold=threshold, w_resnet=w_resnet, w_effnet=w_effnet,
        )  # fmt: skip
    at_stream = next((r for r in speed if r["batch"] == stream_batch), speed[-1])
    worst = min(agreement["cosine"][k]["min"] for k in ("resnet", "effnet"))
    checks = {
        f"speedup >= {MIN_SPEEDUP} at batch {at_stream['batch']}":
            at_stream["speedup"] >= MIN_SPEEDUP,
        f"every cosine >= {MIN_COSINE}": worst >= MIN_COSINE,
        f"identical decisions >= {MIN_AGREEMENT:.0%}":
            agreement["assignment_agreement"] >= MIN_AGREEMENT,
    }  # fmt: skip
    return {
        "crops": n, "calibration_crops": len(calib_idx), "evaluated_crops": len(held_out),
        "input_size": list(size), "quantise_s": quantise_s, **sizes, "speed": speed,
        "cosine": agreement["cosine"], "worst_cosine": worst,
        "assignment_agreement": agreement["assignment_agreement"],
        "new_deer": agreement["new_deer"], "checks": checks, "adopt": all(checks.values()),
    }  # fmt: skip


def _embed(session: OnnxSession, x: np.ndarray, batch: int = 32) -> Embeddings:
    parts = [session.run(x[i : i + batch]) for i in range(0, len(x), batch)]
    resnet = np.concatenate([p[0] for p in parts])
    effnet = np.concatenate([p[1] for p in parts])
    return Embeddings(resnet=_l2(resnet), effnet=_l2(effnet))


def _l2(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.float32)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def _speed(
    fp32: OnnxSession, int8: OnnxSession, x: np.ndarray, batch: int, seconds: float
) -> dict[str, Any]:
    """Images/s of both at ``batch``, timed in alternating rounds; medians of the rounds."""
    chunk = np.ascontiguousarray(np.resize(x, (batch, *x.shape[1:])))
    for session in (fp32, int8):
        session.run(chunk)  # first-run allocations, not counted
    times: dict[str, list[float]] = {"fp32": [], "int8": []}
    deadline = time.perf_counter() + 2 * seconds
    while time.perf_counter() < deadline or len(times["int8"]) < 3:
        for name, session in (("fp32", fp32), ("int8", int8)):
            t0 = time.perf_counter()
            session.run(chunk)
            times[name].append(time.perf_counter() - t0)
    fp32_ips = batch / statistics.median(times["fp32"])
    int8_ips = batch / statistics.median(times["int8"])
    return {"batch": batch, "fp32_images_per_s": fp32_ips, "int8_images_per_s": int8_ips,
            "speedup": int8_ips / fp32_ips, "rounds": len(times["int8"])}  # fmt: skip
