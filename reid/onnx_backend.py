"""ONNX Runtime (CPU) execution of the ensemble: export once, cache the file, run a session.

On the project's CPUs onnxruntime ran the two backbones 1.4-2x faster than eager PyTorch
(shared/ENVIRONMENT.md). The graph's input is the *normalised* float32 NCHW batch, so
`Preprocess.normalise` and the embedder's L2 step stay the very same code for both backends.

The exported file is cached under a name made of the embedding version, the input size, a
hash of the weights and the export format, so a file is never reused for another model; it is
written to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from reid.atomic_files import atomic_path

log = logging.getLogger(__name__)

INPUT_NAME = "images"
ENSEMBLE_OUTPUTS = ("resnet", "effnet")
OPSET = 17
# Part of every cached file name: bump it when the exported graph changes (inputs, opset...).
EXPORT_FORMAT = f"f32nchw-op{OPSET}-v1"


class OnnxExportError(RuntimeError):
    """The model cannot be exported to ONNX as configured."""


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/reid-stream/onnx``, else ``~/.cache/reid-stream/onnx``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "reid-stream" / "onnx"


def weights_digest(module: nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes), in name order.

    Memory layout does not count: a channels_last copy of the same weights has the same digest.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def cache_path(
    cache_dir: Path, embedding_version: str, input_size: tuple[int, int], digest: str
) -> Path:
    """The cache file for this model: version, size, weights and export format all named."""
    height, width = input_size
    safe_version = re.sub(r"[^A-Za-z0-9._+-]", "_", embedding_version)[:80] or "unversioned"
    return Path(cache_dir) / f"{safe_version}-{height}x{width}-{digest[:16]}-{EXPORT_FORMAT}.onnx"


def export_onnx(
    module: nn.Module,
    path: Path,
    input_size: tuple[int, int],
    output_names: Sequence[str] = ENSEMBLE_OUTPUTS,
) -> None:
    """Export ``module`` (eval mode, float32, on the CPU) with a dynamic batch axis, atomically.

    ``module`` is left as it was (device, mode, memory format).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = input_size
    example = torch.zeros((1, 3, height, width), dtype=torch.float32)
    dynamic = {name: {0: "batch"} for name in (INPUT_NAME, *output_names)}
    params = list(module.parameters())
    if params and params[0].device.type != "cpu":
        raise OnnxExportError(f"export the model from the CPU, not {params[0].device}")
    was_training = module.training
    module.eval()
    try:
        with atomic_path(path) as tmp, warnings.catch_warnings(), torch.no_grad():
            # The TorchScript exporter is deprecated in favour of dynamo=True, which needs
            # onnxscript; this one is the path measured to match PyTorch here (7e-5).
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (example,),
                str(tmp),
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=list(output_names),
                dynamic_axes=dynamic,
                opset_version=OPSET,
                do_constant_folding=True,
            )
    except torch.onnx.errors.OnnxExporterError as exc:
        raise OnnxExportError(
            f"cannot export the model to ONNX at input size {height}x{width}: {_first_line(exc)}"
            " (the multi-scale ResNet's adaptive pooling exports only when its feature maps"
            " divide evenly: input sides that are multiples of 32, like 96, 128, 224)"
        ) from exc
    finally:
        module.train(was_training)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask, which containers narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def auto_backend(device: torch.device, torch_compile: str = "off") -> str:
    """What ``backend="auto"`` runs: onnxruntime on a CPU (1.3-2.7x eager PyTorch there, see
    docs/BENCHMARKS.md), PyTorch on CUDA, when compiling, or without onnxruntime."""
    if device.type != "cpu" or torch_compile != "off":
        return "torch"
    if importlib.util.find_spec("onnxruntime") is None:
        log.warning("backend auto: onnxruntime is not installed; running PyTorch on the CPU")
        return "torch"
    return "onnx"


def require_onnxruntime() -> Any:
    """The onnxruntime module, or an error that says how to install it."""
    try:
        import onnxruntime  # the optional `onnx` extra; only this backend needs it
    except ImportError as exc:
        raise OnnxExportError(
            "the 'onnx' backend needs onnxruntime: pip install 'deer-reid-stream[onnx]'"
        ) from exc
    return onnxruntime


class OnnxSession:
    """One onnxruntime CPU session over an exported file; float32 NCHW in, named outputs out."""

    def __init__(self, path: Path, *, threads: int | None = None) -> None:
        ort = require_onnxruntime()

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or cpu_cores()
        options.inter_op_num_threads = 1  # one graph at a time; the parallelism is intra-op
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.path = Path(path)
        self._session = ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        inputs = self._session.get_inputs()
        if [i.name for i in inputs] != [INPUT_NAME]:
            raise OnnxExportError(f"{path}: expected one input {INPUT_NAME!r}, got {inputs}")
        self.output_names = tuple(o.name for o in self._session.get_outputs())

    def run(self, batch: np.ndarray | torch.Tensor) -> tuple[np.ndarray, ...]:
        """float32 [N, 3, H, W] -> one float32 array per output, in `output_names` order."""
        if isinstance(batch, torch.Tensor):
            batch = batch.detach().to("cpu", torch.float32).contiguous().numpy()
        x = np.ascontiguousarray(batch, dtype=np.float32)
        return tuple(self._session.run(list(self.output_names), {INPUT_NAME: x}))


def load_or_export(
    module: nn.Module,
    *,
    cache_dir: Path | None,
    embedding_version: str,
    input_size: tuple[int, int],
    output_names: Sequence[str] = ENSEMBLE_OUTPUTS,
    threads: int | None = None,
) -> tuple[OnnxSession, bool]:
    """A session for ``module``, from the cache when this exact model was exported before.

    Returns ``(session, reused)``. A cached file that cannot be opened (damaged on disk) is
    exported again, once.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache_path(cache_dir, embedding_version, input_size, weights_digest(module))
    if path.is_file():
        try:
            session = OnnxSession(path, threads=threads)
            if session.output_names == tuple(output_names):
                log.info("ONNX model reused from %s", path)
                return session, True
            log.warning("cached ONNX file %s has outputs %s; exporting again",
                        path, session.output_names)  # fmt: skip
        except Exception as exc:  # onnxruntime raises its own untyped errors on a bad file
            log.warning("cached ONNX file %s cannot be loaded (%s); exporting again", path, exc)
    log.info("exporting the model to ONNX: %s", path)
    export_onnx(module, path, input_size, output_names)
    return OnnxSession(path, threads=threads), False
