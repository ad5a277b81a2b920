"""Where the stream's weights come from, and the `embedding_version` naming them.

Resolution order (`load_ensemble`; nothing is ever downloaded here): an explicit checkpoint
file (any format of `reid.checkpoints`), else torchvision's ImageNet trunks already in the
local torch hub cache (`reid-stream weights pull imagenet` puts them there), else a seeded
initialisation with a loud warning. Every stored vector carries the resulting
`embedding_version`, so two different weight sets never share one.

The seeded initialisation is calibrated without data (see `reid.calibration`). The
checkpoint formats and their readers and writers are in `reid.checkpoints` (re-exported here).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torchvision.models import EfficientNet_B0_Weights, ResNet50_Weights

from reid.backbones import Ensemble
from reid.calibration import calibrate_seeded, calibration_images
from reid.checkpoints import (
    CHECKPOINT_FORMAT,
    MEMBERS_FORMAT,
    SINGLE_FORMAT,
    LoadedEnsemble,
    SingleCheckpoint,
    WeightsError,
    _load_state,
    build_structure,
    load_any_checkpoint,
    load_stream_checkpoint,
    save_checkpoint,
    save_single_checkpoint,
)
from reid.members import DEFAULT_MEMBERS
from reid.preprocess import Preprocess

__all__ = [
    "CHECKPOINT_FORMAT",
    "MEMBERS_FORMAT",
    "SINGLE_FORMAT",
    "LoadedEnsemble",
    "SingleCheckpoint",
    "WeightsError",
    "build_seeded",
    "load_any_checkpoint",
    "load_ensemble",
    "save_checkpoint",
    "save_single_checkpoint",
]

log = logging.getLogger(__name__)

# Changing the calibration (reid.calibration) changes the seeded embeddings: bump this with it.
SEEDED_VERSION_SUFFIX = "msr50+effb0-calib-v2"

# Preference order: V2 is the better ImageNet recipe when both happen to be cached.
_RESNET_CACHE_URLS = (ResNet50_Weights.IMAGENET1K_V2.url, ResNet50_Weights.IMAGENET1K_V1.url)
_EFFNET_CACHE_URLS = (EfficientNet_B0_Weights.IMAGENET1K_V1.url,)


def build_seeded(
    seed: int = 0, *, calibrate: bool = True, preprocess: Preprocess | None = None
) -> Ensemble:
    """Build the ensemble with a deterministic initialisation (CPU, float32).

    The global RNG is reseeded before each backbone, in a fixed order, so each backbone's
    initial weights depend on the seed alone. The caller's RNG state is restored afterwards.
    With `calibrate` (the seeded fallback), `calibrate_seeded` then makes the random init
    usable in eval mode; without it, the build only provides the module structure for weights
    that are loaded over it.
    """
    model = build_structure(DEFAULT_MEMBERS, seed=seed)
    if calibrate:
        calibrate_seeded(model, seed, calibration_images(seed, preprocess=preprocess))
    return model


def load_ensemble(
    weights_path: Path | None = None,
    *,
    seed: int = 0,
    hub_dir: Path | None = None,
    input_size: int | None = None,
) -> LoadedEnsemble:
    """Resolve and load the ensemble's weights (see the module docstring for the order).

    ``input_size`` (square side in pixels) applies to the ImageNet and seeded paths; a
    checkpoint keeps the size it was trained at and refuses another one.
    """
    if weights_path is not None:
        loaded = load_stream_checkpoint(Path(weights_path), seed=seed)
        if input_size is not None and loaded.preprocess.input_size != (input_size, input_size):
            raise WeightsError(
                f"{weights_path} was made for input size {loaded.preprocess.input_size}, "
                f"not {input_size}; leave the input size unset to use the checkpoint's"
            )
        return loaded
    preprocess = Preprocess() if input_size is None else Preprocess(input_size=(input_size,) * 2)
    # Another input size gives other embeddings, so it is part of the version.
    size_tag = "" if preprocess == Preprocess() else f"-{input_size}px"
    cache_dir = Path(hub_dir) if hub_dir is not None else Path(torch.hub.get_dir())
    cached = _find_cached_trunks(cache_dir / "checkpoints")
    if cached is not None:
        loaded = _from_torchvision_cache(*cached, seed=seed)
        loaded.preprocess = preprocess
        loaded.embedding_version += size_tag
        return loaded
    log.warning(
        "NO TRAINED WEIGHTS: the re-identification ensemble is randomly initialised "
        "(seed=%d). Its embeddings are NOT meaningful for re-identification until trained "
        "weights are given: pass weights_path=<checkpoint.pt> (written by reid-train or "
        "`reid-stream weights checkpoint`), or get torchvision's ImageNet resnet50 and "
        "efficientnet_b0 files into %s (`reid-stream weights pull imagenet`).",
        seed,
        cache_dir / "checkpoints",
    )
    return LoadedEnsemble(
        model=build_seeded(seed, preprocess=preprocess),
        embedding_version=f"seed{seed}-{SEEDED_VERSION_SUFFIX}{size_tag}",
        source="seeded",
        preprocess=preprocess,
    )


def _find_cached_trunks(checkpoints: Path) -> tuple[Path, Path] | None:
    def first_present(urls: tuple[str, ...]) -> Path | None:
        for url in urls:
            candidate = checkpoints / os.path.basename(url)
            if candidate.is_file():
                return candidate
        return None

    resnet = first_present(_RESNET_CACHE_URLS)
    effnet = first_present(_EFFNET_CACHE_URLS)
    if resnet is None or effnet is None:
        if resnet is not None or effnet is not None:
            log.warning(
                "only one ImageNet trunk found in %s; both are needed, ignoring it", checkpoints
            )
        return None
    return resnet, effnet


def _from_torchvision_cache(resnet_file: Path, effnet_file: Path, *, seed: int) -> LoadedEnsemble:
    # Uncalibrated: the ImageNet BatchNorm statistics are real, and the heads keep their
    # seeded initialisation so this version's embeddings stay what they were.
    model = build_seeded(seed, calibrate=False)
    # The classifier heads are replaced by Identity in our trunks; their tensors are unused.
    _load_state(model.resnet.trunk, _read_tensors(resnet_file, drop="fc."), str(resnet_file))
    _load_state(
        model.effnet.trunk, _read_tensors(effnet_file, drop="classifier."), str(effnet_file)
    )
    version = imagenet_version(resnet_file, effnet_file, seed)
    log.info("loaded ImageNet trunks from %s and %s (%s)", resnet_file, effnet_file, version)
    return LoadedEnsemble(model, version, "torchvision-cache", Preprocess())


def imagenet_version(resnet_file: Path, effnet_file: Path, seed: int = 0) -> str:
    """The version of the default members on torchvision's ImageNet trunks: both files'
    bytes (in this order) and the seed of the heads."""
    return f"imagenet-{files_digest([resnet_file, effnet_file])[:12]}-seed{seed}"


def files_digest(files: Sequence[Path]) -> str:
    """sha256 over the files' bytes, one after the other."""
    digest = hashlib.sha256()
    for file in files:
        with Path(file).open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def cached_imagenet_trunks(hub_dir: Path | None = None) -> tuple[Path, Path] | None:
    """The torchvision ImageNet files the stream would load (torch hub cache), if both are
    there."""
    cache_dir = Path(hub_dir) if hub_dir is not None else Path(torch.hub.get_dir())
    return _find_cached_trunks(cache_dir / "checkpoints")


def _read_tensors(path: Path, *, drop: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"cached weights file {path} cannot be read: {exc}") from exc
    if not isinstance(state, Mapping):
        raise WeightsError(f"cached weights file {path} is not a state dict")
    return {k: v for k, v in state.items() if not str(k).startswith(drop)}
