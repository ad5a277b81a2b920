"""Images per second of each backbone and of the ensemble, per backend (for `reid-stream bench`).

Measures the model's forward pass on a ready, normalised batch: the decoding, the
normalisation and the L2 step around it are not included. Warm-up iterations (cuDNN
autotuning, oneDNN primitive caches, ONNX Runtime's first-run allocations) are run first and
not counted. Each (backend, part, batch size) runs for ``seconds`` and at least ``min_iters``
iterations; on CUDA every iteration is synchronised before the clock is read.

Backends:
- ``torch-cpu-fp32``: eager PyTorch, channels_last, inference mode (what the embedder runs).
- ``onnx-cpu-fp32``: onnxruntime CPUExecutionProvider (the embedder's "onnx" backend).
- ``torch-cuda-fp32``, ``torch-cuda-fp16``, ``torch-cuda-bf16``: eager PyTorch on CUDA,
  channels_last, the half ones under autocast as the embedder does.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reid.backbones import Ensemble
from reid.embedder import Embedder
from reid.onnx_backend import OnnxSession, export_onnx

PARTS = ("resnet", "effnet", "ensemble")
CPU_BACKENDS = ("torch-cpu-fp32", "onnx-cpu-fp32")
CUDA_BACKENDS = ("torch-cuda-fp32", "torch-cuda-fp16", "torch-cuda-bf16")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# A run that only proves the wiring (tests, smoke checks): one timed iteration, one warm-up.
QUICK: dict[str, Any] = {"seconds": 0.0, "min_iters": 1, "warmup_iters": 1}


def default_backends() -> tuple[str, ...]:
    """fp32 and fp16 on CUDA when present, else eager PyTorch and onnxruntime on the CPU."""
    if torch.cuda.is_available():
        return ("torch-cuda-fp32", "torch-cuda-fp16")
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return ("torch-cpu-fp32",)
    return CPU_BACKENDS


def model_throughput(
    model: Ensemble | Any,
    *,
    input_size: int | tuple[int, int] | None = None,
    batch_sizes: Sequence[int] = (1, 8, 32, 64),
    backends: Sequence[str] | None = None,
    parts: Sequence[str] = PARTS,
    seconds: float = 3.0,
    min_iters: int = 3,
    warmup_iters: int = 2,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """One row per (backend, part, batch size), in that order.

    ``model``: an `Ensemble`, or anything with the ensemble as ``.model`` (a LoadedEnsemble)
    or a started `Embedder`; its preprocess gives the input size unless ``input_size`` does.
    The model is copied, never moved or changed. ``threads``: onnxruntime's intra-op threads
    (default: the usable cores); PyTorch keeps `torch.get_num_threads()`.
    Row keys: backend, device, precision, part, batch, images_per_s (over all timed
    iterations), images_per_s_median (from the median iteration), ms_per_batch, iters, seconds.
    """
    ensemble, size = _resolve_model(model, input_size)
    backends = tuple(backends) if backends is not None else default_backends()
    unknown = [b for b in backends if b not in CPU_BACKENDS + CUDA_BACKENDS]
    if unknown:
        raise ValueError(f"unknown backends {unknown}; known: {CPU_BACKENDS + CUDA_BACKENDS}")
    if any(b.startswith("torch-cuda") for b in backends) and not torch.cuda.is_available():
        raise ValueError("CUDA backends asked for, but CUDA is not available")
    bad_parts = [p for p in parts if p not in PARTS]
    if bad_parts:
        raise ValueError(f"unknown parts {bad_parts}; known: {PARTS}")
    if not batch_sizes or min(batch_sizes) < 1 or min_iters < 1 or seconds < 0:
        raise ValueError("batch sizes and min_iters must be >= 1, seconds >= 0")

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="reid-throughput-") as tmp:
        for backend in backends:
            kind, device, precision = backend.split("-")
            for part in parts:
                module = _part(ensemble, part)
                if kind == "onnx":
                    run = _onnx_runner(module, part, size, Path(tmp), threads)
                else:
                    run = _torch_runner(module, device, precision)
                for batch in batch_sizes:
                    x = torch.randn((batch, 3, *size), generator=torch.Generator().manual_seed(0))
                    step = run(x)
                    times = _measure(step, device, seconds, min_iters, warmup_iters)
                    iters, elapsed = len(times), sum(times)
                    rows.append(
                        {
                            "backend": backend,
                            "device": device,
                            "precision": precision,
                            "part": part,
                            "batch": batch,
                            "images_per_s": batch * iters / elapsed,
                            # Robust to a neighbour's burst on a shared machine.
                            "images_per_s_median": batch / statistics.median(times),
                            "ms_per_batch": 1000.0 * elapsed / iters,
                            "iters": iters,
                            "seconds": elapsed,
                        }
                    )
                del module, run
                if device == "cuda":
                    torch.cuda.empty_cache()
    return rows


def _resolve_model(model: Any, input_size: int | tuple[int, int] | None) -> tuple[nn.Module, Any]:
    if isinstance(model, Embedder):
        model = model._require()  # the LoadedEnsemble: model and preprocess
    preprocess = getattr(model, "preprocess", None)
    ensemble = model if isinstance(model, nn.Module) else getattr(model, "model", None)
    if not isinstance(ensemble, nn.Module) or not all(
        hasattr(ensemble, name) for name in ("resnet", "effnet")
    ):
        raise TypeError(f"expected an Ensemble (or what holds one), got {type(model).__name__}")
    if input_size is None:
        size = tuple(preprocess.input_size) if preprocess is not None else (224, 224)
    elif isinstance(input_size, int):
        size = (input_size, input_size)
    else:
        size = tuple(input_size)
    # A CPU float32 copy: the caller's model stays where and what it is.
    return copy.deepcopy(ensemble).to("cpu", torch.float32).eval(), size


def _part(ensemble: nn.Module, part: str) -> nn.Module:
    return {"resnet": ensemble.resnet, "effnet": ensemble.effnet, "ensemble": ensemble}[part]


def _torch_runner(
    module: nn.Module, device: str, precision: str
) -> Callable[[torch.Tensor], Callable[[], object]]:
    if device == "cuda":
        torch.backends.cudnn.benchmark = True  # as the embedder runs; tuned in the warm-up
    module = copy.deepcopy(module).to(device).to(memory_format=torch.channels_last)

    def prepare(x: torch.Tensor) -> Callable[[], object]:
        x = x.to(device).contiguous(memory_format=torch.channels_last)
        autocast = (
            torch.autocast(device_type="cuda", dtype=_DTYPES[precision])
            if precision != "fp32"
            else contextlib.nullcontext()
        )

        def step() -> object:
            with torch.inference_mode(), autocast:
                return module(x)

        return step

    return prepare


def _onnx_runner(
    module: nn.Module, part: str, size: tuple[int, int], folder: Path, threads: int | None
) -> Callable[[torch.Tensor], Callable[[], object]]:
    path = folder / f"{part}.onnx"
    outputs = ("resnet", "effnet") if part == "ensemble" else (part,)
    export_onnx(module, path, size, outputs)
    session = OnnxSession(path, threads=threads)

    def prepare(x: torch.Tensor) -> Callable[[], object]:
        array = x.numpy()
        return lambda: session.run(array)

    return prepare


def _measure(
    step: Callable[[], object], device: str, seconds: float, min_iters: int, warmup_iters: int
) -> list[float]:
    """The duration of each timed iteration, in seconds."""

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup_iters):
        step()
    sync()
    times: list[float] = []
    while True:
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
        if len(times) >= min_iters and sum(times) >= seconds:
            return times
