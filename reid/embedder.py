"""The embedding service: owns the loaded ensemble on its device, with explicit start/stop.

Two backends run the forward pass: "torch" (eager, or `torch.compile`d) on the CPU or CUDA,
and "onnx" (onnxruntime, CPU only, see `reid.onnx_backend`). Everything around the forward
pass (normalisation, L2, outputs) is the same code for both. "auto" picks onnx on a CPU and
torch on CUDA (`reid.onnx_backend.auto_backend`); where the model cannot be exported it runs
torch and says so.

On CUDA the embedder keeps the batch shapes few: a batch is padded up to the next size of a
small ladder (1, 8, 16, 32, ... up to `max_batch`) and the padding rows are dropped from the
outputs. In eval mode every row is computed independently (BatchNorm uses its running
statistics), so padding changes no real row. Few shapes mean cuDNN autotuning and compiled
kernels are done once per size, at start-up (warm-up), not while consuming.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from reid.backbones import EMBEDDING_DIM
from reid.preprocess import Preprocess
from reid.weights import LoadedEnsemble, load_ensemble

log = logging.getLogger(__name__)

_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BACKENDS = ("auto", "torch", "onnx")
# "on" picks per device: max-autotune (Triton autotuning + CUDA graphs) on CUDA, default on CPU.
COMPILE_MODES = ("off", "on", "default", "reduce-overhead", "max-autotune",
                 "max-autotune-no-cudagraphs")  # fmt: skip
DEFAULT_MAX_BATCH = 64
# An ONNX session must agree with the PyTorch model it was exported from (measured: 7e-5).
_ONNX_MIN_COSINE = 0.999

Forward = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Embeddings:
    """float32 [N, 512] per backbone, rows L2-normalised."""

    resnet: np.ndarray
    effnet: np.ndarray

    def __len__(self) -> int:
        return len(self.resnet)


def batch_ladder(max_batch: int) -> tuple[int, ...]:
    """The padded batch sizes: 1, 8, 16, 32, ... doubling while below ``max_batch``, then it."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes = [1]
    size = 8
    while size < max_batch:
        sizes.append(size)
        size *= 2
    if max_batch > 1:
        sizes.append(max_batch)
    return tuple(sizes)


def padded_size(n: int, ladder: Sequence[int]) -> int:
    """The smallest ladder size that holds ``n`` rows (``n`` itself above the ladder)."""
    return next((size for size in ladder if size >= n), n)


class Embedder:
    """Embeds uint8 image batches with the two-backbone ensemble.

    Lifecycle: construct (cheap, validates the configuration), `start()` (loads weights, moves
    to the device, exports/loads the ONNX model for that backend, warms up), `embed()` any
    number of times, `stop()`.

    ``max_batch``: larger batches are cut into chunks of this size (one forward pass each).
    ``pad_batches``: pad to the ladder sizes (None = on CUDA or when compiled, else off: on
    a CPU the padding rows would cost as much as real ones).
    ``torch_compile``: one of `COMPILE_MODES` ("off" by default).
    ``warmup_all_sizes``: warm up every ladder size at start (None = on CUDA only; the CPU
    warms up the smallest to keep starting fast).
    """

    def __init__(
        self,
        *,
        weights_path: Path | None = None,
        seed: int = 0,
        device: str = "auto",
        precision: str = "auto",
        hub_dir: Path | None = None,
        input_size: int | None = None,
        backend: str = "torch",
        onnx_cache_dir: Path | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        pad_batches: bool | None = None,
        torch_compile: str = "off",
        warmup_all_sizes: bool | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if torch_compile not in COMPILE_MODES:
            raise ValueError(f"torch_compile must be one of {COMPILE_MODES}, got {torch_compile!r}")
        self._auto = backend == "auto"
        if self._auto:
            from reid.onnx_backend import auto_backend

            backend = auto_backend(_resolve_device(device), torch_compile)
        if backend == "onnx":
            # onnxruntime runs here on the CPU execution provider only.
            if device != "auto" and torch.device(device).type != "cpu":
                raise ValueError(
                    f"backend 'onnx' runs on the CPU only, not on {device!r}; "
                    "use backend 'torch' on CUDA"
                )
            device = "cpu"
            if torch_compile != "off":
                raise ValueError("torch_compile applies to the 'torch' backend, not 'onnx'")
            if importlib.util.find_spec("onnxruntime") is None:
                raise ValueError(
                    "backend 'onnx' needs onnxruntime: pip install 'deer-reid-stream[onnx]'"
                )
        self._weights_path = Path(weights_path) if weights_path is not None else None
        self._seed = seed
        self._hub_dir = hub_dir
        self._input_size = input_size
        self._device = _resolve_device(device)
        self._precision = _resolve_precision(precision, self._device)
        self._backend = backend
        self._onnx_cache_dir = Path(onnx_cache_dir) if onnx_cache_dir is not None else None
        self._ladder = batch_ladder(max_batch)
        self._max_batch = max_batch
        self._compile = _resolve_compile(torch_compile, self._device)
        cuda = self._device.type == "cuda"
        self._pad = pad_batches if pad_batches is not None else cuda or self._compile != "off"
        self._warmup_all = warmup_all_sizes if warmup_all_sizes is not None else cuda
        self._loaded: LoadedEnsemble | None = None
        self._forward: Forward | None = None
        self._onnx_path: Path | None = None

    @property
    def device(self) -> str:
        return str(self._device)

    @property
    def precision(self) -> str:
        return self._precision

    @property
    def backend(self) -> str:
        """What runs the forward pass: "torch" or "onnx"."""
        return self._backend

    @property
    def torch_compile(self) -> str:
        """The resolved compile mode, "off" when not compiled."""
        return self._compile

    @property
    def max_batch(self) -> int:
        return self._max_batch

    @property
    def pad_batches(self) -> bool:
        return self._pad

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """The ladder of padded batch sizes (used when `pad_batches`)."""
        return self._ladder

    @property
    def warmup_sizes(self) -> tuple[int, ...]:
        return self._ladder if self._warmup_all else self._ladder[:1]

    @property
    def onnx_path(self) -> Path | None:
        """The ONNX file the session runs (backend "onnx", once started)."""
        return self._onnx_path

    @property
    def started(self) -> bool:
        return self._loaded is not None

    @property
    def embedding_version(self) -> str:
        return self._require().embedding_version

    @property
    def source(self) -> str:
        return self._require().source

    @property
    def preprocess(self) -> Preprocess:
        return self._require().preprocess

    @property
    def members(self) -> tuple[str, ...]:
        """The names of the two ensemble members (reid.members), e.g. ("msr50", "effb0")."""
        return tuple(m.name for m in self._require().members)

    def start(self) -> None:
        """Load the weights and warm up; a second call while started does nothing."""
        if self._loaded is not None:
            return
        loaded = load_ensemble(
            self._weights_path, seed=self._seed, hub_dir=self._hub_dir, input_size=self._input_size
        )
        model = loaded.model.to(self._device).eval()
        if self._device.type == "cuda":
            # Batch shapes repeat, so cuDNN's autotuning pays for itself after a few batches.
            torch.backends.cudnn.benchmark = True
        # channels_last on the CPU too: oneDNN convolutions ran 1.3-1.5x faster with it here
        # (shared/ENVIRONMENT.md and a batch-8 check of this ensemble).
        model = model.to(memory_format=torch.channels_last)
        loaded.model = model
        forward = self._onnx_forward(loaded) if self._backend == "onnx" else None
        if forward is None and self._compile != "off":
            # Static shapes: with the padding ladder there are only a few, each compiled once
            # during the warm-up below. Dynamo falls back to eager after `recompile_limit`
            # shapes (8 by default); a long ladder must fit under it.
            limit = len(self._ladder) + 2
            if torch._dynamo.config.recompile_limit < limit:
                torch._dynamo.config.recompile_limit = limit
            forward = torch.compile(model, mode=self._compile, dynamic=False)
        elif forward is None:
            forward = model
        self._forward = forward
        self._loaded = loaded
        height, width = loaded.preprocess.input_size
        try:
            for size in self.warmup_sizes:
                self.embed(torch.zeros((size, 3, height, width), dtype=torch.uint8))
        except BaseException:
            self._loaded = self._forward = None
            raise
        log.info(
            "embedder started: version=%s source=%s device=%s precision=%s backend=%s "
            "compile=%s pad=%s sizes=%s",
            loaded.embedding_version,
            loaded.source,
            self._device,
            self._precision,
            self._backend,
            self._compile,
            self._pad,
            self.warmup_sizes,
        )

    def stop(self) -> None:
        """Release the model (and cached device memory)."""
        if self._loaded is None:
            return
        self._loaded = None
        self._forward = None
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    def embed(self, batch: torch.Tensor | Sequence[torch.Tensor]) -> Embeddings:
        """uint8 [N, 3, H, W] (or a list of [3, H, W]) -> L2-normalised float32 embeddings.

        One forward pass per backbone per `max_batch` images.
        """
        loaded = self._require()
        if not isinstance(batch, torch.Tensor):
            if len(batch) == 0:
                return _empty()
            batch = torch.stack(list(batch))
        if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected uint8 [N, 3, H, W], got {batch.dtype} {tuple(batch.shape)}")
        if batch.shape[0] == 0:
            return _empty()
        if self._backend == "onnx" and tuple(batch.shape[2:]) != loaded.preprocess.input_size:
            raise ValueError(
                f"the ONNX model takes {loaded.preprocess.input_size} inputs, "
                f"got {tuple(batch.shape[2:])}"
            )
        n, step = batch.shape[0], self._max_batch
        if n <= step:
            return self._embed_chunk(batch)
        parts = [self._embed_chunk(batch[i : i + step]) for i in range(0, n, step)]
        return Embeddings(
            resnet=np.concatenate([p.resnet for p in parts]),
            effnet=np.concatenate([p.effnet for p in parts]),
        )

    def _embed_chunk(self, batch: torch.Tensor) -> Embeddings:
        loaded = self._require()
        assert self._forward is not None
        n = batch.shape[0]
        if self._device.type == "cuda" and batch.device.type == "cpu":
            # Pinned host memory lets the copy overlap with host work.
            batch = batch.pin_memory().to(self._device, non_blocking=True)
        else:
            batch = batch.to(self._device)
        size = padded_size(n, self._ladder) if self._pad else n
        if size > n:
            # Padded on the device: no extra bytes cross the bus.
            batch = torch.cat([batch, batch.new_zeros((size - n, *batch.shape[1:]))])
        with torch.inference_mode():
            x = loaded.preprocess.normalise(batch)
            resnet, effnet = self._run(x)
            # Half-precision outputs are no longer unit length; renormalise in float32.
            resnet = F.normalize(resnet[:n].float(), dim=1).cpu().numpy()
            effnet = F.normalize(effnet[:n].float(), dim=1).cpu().numpy()
        return Embeddings(
            resnet=np.ascontiguousarray(resnet, dtype=np.float32),
            effnet=np.ascontiguousarray(effnet, dtype=np.float32),
        )

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._forward is not None
        if self._backend == "onnx":
            return self._forward(x)
        x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            return self._forward(x)

    def _onnx_forward(self, loaded: LoadedEnsemble) -> Forward | None:
        """The ONNX session's forward; None when "auto" falls back to torch (no export)."""
        from reid.onnx_backend import OnnxExportError, load_or_export

        input_size = loaded.preprocess.input_size
        try:
            session, reused = load_or_export(
                loaded.model,
                cache_dir=self._onnx_cache_dir,
                embedding_version=loaded.embedding_version,
                input_size=input_size,
            )
        except OnnxExportError as exc:
            if not self._auto:
                raise
            log.warning("backend auto: %s; running PyTorch on the CPU instead", exc)
            self._backend = "torch"
            return None
        self._onnx_path = session.path

        def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            resnet, effnet = session.run(x)
            return torch.from_numpy(resnet), torch.from_numpy(effnet)

        # A check against the PyTorch model on one seeded image, so a wrong file (or an
        # exporter bug) stops the start instead of writing wrong vectors.
        g = torch.Generator().manual_seed(0)
        probe = torch.randint(0, 256, (1, 3, *input_size), generator=g, dtype=torch.uint8)
        with torch.inference_mode():
            x = loaded.preprocess.normalise(probe)
            want = loaded.model(x.contiguous(memory_format=torch.channels_last))
            got = forward(x)
        worst = min(
            float(F.cosine_similarity(a, b, dim=1).min()) for a, b in zip(want, got, strict=True)
        )
        if worst < _ONNX_MIN_COSINE:
            raise OnnxExportError(
                f"the ONNX model {session.path} disagrees with PyTorch (cosine {worst:.6f}); "
                "delete the file to export it again"
            )
        log.info("ONNX backend: %s (%s)", session.path, "cached" if reused else "exported")
        return forward

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self._precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=_PRECISIONS[self._precision])

    def _require(self) -> LoadedEnsemble:
        if self._loaded is None:
            raise RuntimeError("Embedder is not started; call start() first")
        return self._loaded


def _empty() -> Embeddings:
    return Embeddings(
        resnet=np.zeros((0, EMBEDDING_DIM), dtype=np.float32),
        effnet=np.zeros((0, EMBEDDING_DIM), dtype=np.float32),
    )


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return resolved


def _resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be 'auto', 'fp32', 'fp16' or 'bf16', got {precision!r}")
    if device.type == "cpu" and precision != "fp32":
        # Half precision on these CPUs is emulated and 50-100x slower; refuse it outright.
        raise ValueError(f"precision {precision!r} is only supported on cuda; use 'fp32' on cpu")
    return precision


def _resolve_compile(mode: str, device: torch.device) -> str:
    if mode != "on":
        return mode
    return "max-autotune" if device.type == "cuda" else "default"
