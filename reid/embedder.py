"""The embedding service: owns the loaded ensemble on its device, with explicit start/stop."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
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
_WARMUP_BATCH = 2


@dataclass
class Embeddings:
    """float32 [N, 512] per backbone, rows L2-normalised."""

    resnet: np.ndarray
    effnet: np.ndarray

    def __len__(self) -> int:
        return len(self.resnet)


class Embedder:
    """Embeds uint8 image batches with the two-backbone ensemble.

    Lifecycle: construct (cheap, validates the configuration), `start()` (loads weights, moves
    to the device, warms up), `embed()` any number of times, `stop()`.
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
    ) -> None:
        self._weights_path = Path(weights_path) if weights_path is not None else None
        self._seed = seed
        self._hub_dir = hub_dir
        self._input_size = input_size
        self._device = _resolve_device(device)
        self._precision = _resolve_precision(precision, self._device)
        self._loaded: LoadedEnsemble | None = None

    @property
    def device(self) -> str:
        return str(self._device)

    @property
    def precision(self) -> str:
        return self._precision

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
        self._loaded = loaded
        height, width = loaded.preprocess.input_size
        self.embed(torch.zeros((_WARMUP_BATCH, 3, height, width), dtype=torch.uint8))
        log.info(
            "embedder started: version=%s source=%s device=%s precision=%s",
            loaded.embedding_version,
            loaded.source,
            self._device,
            self._precision,
        )

    def stop(self) -> None:
        """Release the model (and cached device memory)."""
        if self._loaded is None:
            return
        self._loaded = None
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    def embed(self, batch: torch.Tensor | Sequence[torch.Tensor]) -> Embeddings:
        """uint8 [N, 3, H, W] (or a list of [3, H, W]) -> L2-normalised float32 embeddings.

        One forward pass per backbone for the whole batch.
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

        if self._device.type == "cuda" and batch.device.type == "cpu":
            # Pinned host memory lets the copy overlap with host work.
            batch = batch.pin_memory().to(self._device, non_blocking=True)
        else:
            batch = batch.to(self._device)
        with torch.inference_mode():
            x = loaded.preprocess.normalise(batch).contiguous(memory_format=torch.channels_last)
            with self._autocast():
                resnet, effnet = loaded.model(x)
            # Half-precision outputs are no longer unit length; renormalise in float32.
            resnet = F.normalize(resnet.float(), dim=1).cpu().numpy()
            effnet = F.normalize(effnet.float(), dim=1).cpu().numpy()
        return Embeddings(
            resnet=np.ascontiguousarray(resnet, dtype=np.float32),
            effnet=np.ascontiguousarray(effnet, dtype=np.float32),
        )

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
