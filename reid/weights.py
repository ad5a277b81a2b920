"""Where the ensemble's weights come from, the `embedding_version` naming them, and every
checkpoint file format.

Resolution order: an explicit checkpoint file, else torchvision ImageNet trunks already in the
local torch hub cache (never downloaded), else a seeded initialisation. Every stored vector
carries the resulting `embedding_version`, so two different weight sets never share one.

The seeded initialisation is calibrated without data (see `reid.calibration`).

Checkpoint formats (dicts of tensors and plain containers, read with ``weights_only=True``):

- `reid-ensemble/1` (`save_checkpoint`, `load_ensemble`): what the stream loads; the two
  members' state dicts, the embedding version, the `Preprocess` and free-form `meta`.
- `reid-single/1` (`save_single_checkpoint`): one trained backbone for `reid-eval`, never
  for the stream; the model's config fields (without its pretrained file), its whole state
  dict (BNNeck included), the embedding version, the `Preprocess` and `meta`. Building the
  module from that config is training's job (`reid.training.models.build_model`), so
  reading one returns the file's contents (`SingleCheckpoint`), not a module.

`load_any_checkpoint` reads either, telling them apart by their `format` key.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import EfficientNet_B0_Weights, ResNet50_Weights

from reid.backbones import EfficientNetB0Embedder, Ensemble, MultiScaleResNet50
from reid.calibration import calibrate_seeded, calibration_images
from reid.preprocess import Preprocess

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "reid-ensemble/1"
SINGLE_FORMAT = "reid-single/1"
# Changing the calibration (reid.calibration) changes the seeded embeddings: bump this with it.
SEEDED_VERSION_SUFFIX = "msr50+effb0-calib-v2"

# Preference order: V2 is the better ImageNet recipe when both happen to be cached.
_RESNET_CACHE_URLS = (ResNet50_Weights.IMAGENET1K_V2.url, ResNet50_Weights.IMAGENET1K_V1.url)
_EFFNET_CACHE_URLS = (EfficientNet_B0_Weights.IMAGENET1K_V1.url,)


class WeightsError(ValueError):
    """A weights file that cannot be used as given."""


@dataclass
class LoadedEnsemble:
    model: Ensemble
    embedding_version: str
    source: str  # "checkpoint" | "torchvision-cache" | "seeded"
    preprocess: Preprocess
    meta: dict[str, Any] = field(default_factory=dict)  # a checkpoint's `meta`


@dataclass
class SingleCheckpoint:
    """The contents of a `reid-single/1` file (see the module docstring)."""

    model_config: dict[str, Any]  # ModelConfig fields, "pretrained" left out
    state_dict: dict[str, torch.Tensor]
    embedding_version: str
    preprocess: Preprocess
    meta: dict[str, Any] = field(default_factory=dict)


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
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        resnet = MultiScaleResNet50()
        torch.manual_seed(seed)
        effnet = EfficientNetB0Embedder()
    model = Ensemble(resnet, effnet)
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
        loaded = _from_checkpoint(Path(weights_path), seed)
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
        "weights are given: pass weights_path=<checkpoint.pt> (a 'reid-ensemble/1' file "
        "written by reid.weights.save_checkpoint), or place torchvision's ImageNet "
        "resnet50 and efficientnet_b0 files in %s.",
        seed,
        cache_dir / "checkpoints",
    )
    return LoadedEnsemble(
        model=build_seeded(seed, preprocess=preprocess),
        embedding_version=f"seed{seed}-{SEEDED_VERSION_SUFFIX}{size_tag}",
        source="seeded",
        preprocess=preprocess,
    )


def save_checkpoint(
    path: Path,
    model: Ensemble,
    *,
    embedding_version: str,
    preprocess: Preprocess,
    meta: dict[str, Any] | None = None,
) -> None:
    """Write a `reid-ensemble/1` checkpoint atomically (temp file in the same folder, rename)."""
    if not embedding_version:
        raise ValueError("embedding_version must be a non-empty string")
    meta = dict(meta or {})
    _check_plain(meta, "meta")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "embedding_version": embedding_version,
        "resnet": _plain_state(model.resnet),
        "effnet": _plain_state(model.effnet),
        "preprocess": preprocess.to_dict(),
        "meta": meta,
    }
    _write_atomically(Path(path), payload)


def save_single_checkpoint(
    path: Path,
    model: nn.Module,
    *,
    model_config: Mapping[str, Any],
    embedding_version: str,
    preprocess: Preprocess,
    meta: dict[str, Any] | None = None,
) -> None:
    """Write a `reid-single/1` checkpoint atomically. ``model_config``: the ModelConfig
    fields that rebuild ``model`` (its pretrained file is not needed and is left out)."""
    if not embedding_version:
        raise ValueError("embedding_version must be a non-empty string")
    model_config = {k: v for k, v in model_config.items() if k != "pretrained"}
    meta = dict(meta or {})
    _check_plain(model_config, "model_config")
    _check_plain(meta, "meta")
    payload = {
        "format": SINGLE_FORMAT,
        "embedding_version": embedding_version,
        "model": model_config,
        "state_dict": _plain_state(model),
        "preprocess": preprocess.to_dict(),
        "meta": meta,
    }
    _write_atomically(Path(path), payload)


def load_any_checkpoint(path: Path, *, seed: int = 0) -> LoadedEnsemble | SingleCheckpoint:
    """A `reid-ensemble/1` file loaded as `load_ensemble` does, or a `reid-single/1` file's
    contents; anything else raises WeightsError."""
    path = Path(path)
    ckpt = _read_checkpoint(path)
    fmt = ckpt.get("format")
    if fmt == CHECKPOINT_FORMAT:
        return _ensemble_from(ckpt, path, seed)
    if fmt == SINGLE_FORMAT:
        return _single_from(ckpt, path)
    raise WeightsError(
        f"{path} has format {fmt!r}; expected {CHECKPOINT_FORMAT} or {SINGLE_FORMAT}"
    )


def _write_atomically(path: Path, payload: dict[str, Any]) -> None:
    # A temp file in the same folder, then a rename: a reader never sees half a checkpoint.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _plain_state(module: nn.Module) -> dict[str, torch.Tensor]:
    # Clone so each tensor owns its storage: saving a view would drag its whole base along,
    # and device tensors would not load with map_location-free tools.
    return {k: v.detach().to("cpu").clone() for k, v in module.state_dict().items()}


def _check_plain(value: Any, where: str) -> None:
    # weights_only loading accepts only primitive containers; refuse anything else at save
    # time rather than writing a file that cannot be read back.
    if value is None or isinstance(value, str | int | float | bool):
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str | int):
                raise TypeError(f"{where}: key {key!r} must be str or int")
            _check_plain(item, f"{where}[{key!r}]")
        return
    raise TypeError(f"{where}: {type(value).__name__} cannot be stored in a checkpoint")


def _from_checkpoint(path: Path, seed: int) -> LoadedEnsemble:
    return _ensemble_from(_read_checkpoint(path), path, seed)


def _read_checkpoint(path: Path) -> Mapping[str, Any]:
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WeightsError(
            f"weights file {path} contains objects other than tensors and plain containers; "
            f"refusing to unpickle it (weights_only=True): {exc}"
        ) from exc
    except Exception as exc:
        raise WeightsError(f"weights file {path} cannot be read: {exc}") from exc
    if not isinstance(ckpt, Mapping):
        raise WeightsError(f"weights file {path} is not a checkpoint dict")
    return ckpt


def _ensemble_from(ckpt: Mapping[str, Any], path: Path, seed: int) -> LoadedEnsemble:
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise WeightsError(
            f"weights file {path} has format {ckpt.get('format')!r}, expected {CHECKPOINT_FORMAT!r}"
        )
    version, preprocess, meta = _common_fields(ckpt, path)
    # The seeded build only provides the module structure; every tensor is overwritten.
    model = build_seeded(seed, calibrate=False)
    _load_state(model.resnet, ckpt.get("resnet"), f"{path} [resnet]")
    _load_state(model.effnet, ckpt.get("effnet"), f"{path} [effnet]")
    return LoadedEnsemble(model, version, "checkpoint", preprocess, meta)


def _single_from(ckpt: Mapping[str, Any], path: Path) -> SingleCheckpoint:
    if ckpt.get("format") != SINGLE_FORMAT:
        raise WeightsError(
            f"weights file {path} has format {ckpt.get('format')!r}, expected {SINGLE_FORMAT!r}"
        )
    version, preprocess, meta = _common_fields(ckpt, path)
    model_config, state = ckpt.get("model"), ckpt.get("state_dict")
    if not isinstance(model_config, Mapping):
        raise WeightsError(f"weights file {path} has no model config")
    if not isinstance(state, Mapping):
        raise WeightsError(f"weights file {path} has no state dict")
    model_config = {k: v for k, v in model_config.items() if k != "pretrained"}
    return SingleCheckpoint(model_config, dict(state), version, preprocess, meta)


def _common_fields(ckpt: Mapping[str, Any], path: Path) -> tuple[str, Preprocess, dict[str, Any]]:
    """The embedding version, the Preprocess and the meta that every format carries."""
    version = ckpt.get("embedding_version")
    if not isinstance(version, str) or not version:
        raise WeightsError(f"weights file {path} has no embedding_version")
    raw_preprocess = ckpt.get("preprocess") or {}
    try:
        if not isinstance(raw_preprocess, Mapping):
            raise TypeError(f"expected a dict, got {type(raw_preprocess).__name__}")
        preprocess = Preprocess.from_dict(raw_preprocess)
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"weights file {path} has an invalid preprocess: {exc}") from exc
    meta = ckpt.get("meta") or {}
    return version, preprocess, dict(meta) if isinstance(meta, Mapping) else {}


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
    digest = hashlib.sha256()
    for file in (resnet_file, effnet_file):
        with file.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    version = f"imagenet-{digest.hexdigest()[:12]}-seed{seed}"
    log.info("loaded ImageNet trunks from %s and %s (%s)", resnet_file, effnet_file, version)
    return LoadedEnsemble(model, version, "torchvision-cache", Preprocess())


def _read_tensors(path: Path, *, drop: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"cached weights file {path} cannot be read: {exc}") from exc
    if not isinstance(state, Mapping):
        raise WeightsError(f"cached weights file {path} is not a state dict")
    return {k: v for k, v in state.items() if not str(k).startswith(drop)}


def _load_state(module: nn.Module, state: Any, source: str, show: int = 5) -> None:
    """Strict load with a message naming the first offending keys."""
    if not isinstance(state, Mapping):
        raise WeightsError(f"{source}: expected a state dict, got {type(state).__name__}")
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    bad_shape = [
        f"{k} {tuple(v.shape)} != {tuple(expected[k].shape)}"
        if isinstance(v, torch.Tensor)
        else f"{k} is {type(v).__name__}, not a tensor"
        for k, v in state.items()
        if k in expected
        and (not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(expected[k].shape))
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys, first: {missing[:show]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys, first: {unexpected[:show]}")
    if bad_shape:
        problems.append(f"{len(bad_shape)} mismatched tensors, first: {bad_shape[:show]}")
    if problems:
        raise WeightsError(f"weights in {source} do not match the model: " + "; ".join(problems))
    module.load_state_dict(dict(state), strict=True)
