"""Where the ensemble's weights come from, and the `embedding_version` naming them.

Resolution order: an explicit checkpoint file, else torchvision ImageNet trunks already in the
local torch hub cache (never downloaded), else a seeded initialisation. Every stored vector
carries the resulting `embedding_version`, so two different weight sets never share one.

The seeded initialisation is a *calibrated* random init, computed without any data: a plain
random init is degenerate in eval mode (BatchNorm's default running statistics 0/1 do not match
the random network's activations, so EfficientNet's features shrink to ~1e-14 and its output is
the projection bias for every image; pooled post-ReLU ResNet features are all positive, so any
two images score cosine 0.85-1.0). `calibrate_seeded` fixes both with a fixed set of synthetic
images generated from the seed: BatchNorm statistics are re-estimated on them, and each
projection head's bias is set to -W @ mean(input) so the heads see centred features.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import EfficientNet_B0_Weights, ResNet50_Weights

from reid.backbones import EfficientNetB0Embedder, Ensemble, MultiScaleResNet50
from reid.preprocess import Preprocess

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "reid-ensemble/1"
SEEDED_VERSION_SUFFIX = "msr50+effb0-calib-v2"

# Synthetic calibration set of the seeded init. Changing any of these changes the seeded
# embeddings: bump SEEDED_VERSION_SUFFIX with them.
_CALIB_IMAGES = 32
_CALIB_BATCH = 16
_CALIB_CHROMA = 0.35  # per-channel share of the noise next to the shared (luminance) part

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


def build_seeded(seed: int = 0, *, calibrate: bool = True) -> Ensemble:
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
        calibrate_seeded(model, seed)
    return model


def calibration_images(
    seed: int, n: int = _CALIB_IMAGES, preprocess: Preprocess | None = None
) -> torch.Tensor:
    """`n` synthetic, normalised [n, 3, H, W] images drawn from `seed` alone (no data, no disk).

    Random-phase noise with the 1/f amplitude spectrum of natural photographs (mostly shared
    across channels, like luminance), a per-image contrast and colour cast and a little
    per-pixel noise; quantised to uint8 and normalised like real inputs. The 1/f spectrum
    matters: smoother noise (only coarse grids upsampled) left real photos far from the
    calibration mean, and their ensemble scores stayed ~0.92 whatever the identity.
    """
    preprocess = preprocess or Preprocess()
    height, width = preprocess.input_size
    g = torch.Generator().manual_seed(seed)
    fy = torch.fft.fftfreq(height).view(-1, 1)
    fx = torch.fft.rfftfreq(width).view(1, -1)
    freq = torch.sqrt(fx**2 + fy**2)
    amplitude = torch.where(freq > 0, 1.0 / freq.clamp(min=1e-6), torch.zeros(()))
    spectrum_shape = (height, width // 2 + 1, 2)
    real_imag = torch.randn(n, 1, *spectrum_shape, generator=g) + _CALIB_CHROMA * torch.randn(
        n, 3, *spectrum_shape, generator=g
    )
    spectrum = torch.view_as_complex(real_imag.contiguous()) * amplitude
    texture = torch.fft.irfft2(spectrum, s=(height, width))
    texture /= texture.flatten(1).std(dim=1).view(n, 1, 1, 1)
    contrast = 0.15 + 0.15 * torch.rand(n, 1, 1, 1, generator=g)
    colour = 0.45 + 0.12 * torch.randn(n, 3, 1, 1, generator=g)
    fine = 0.02 * torch.randn(n, 3, height, width, generator=g)
    pixels = (colour + contrast * texture + fine).clamp(0.0, 1.0)
    return preprocess.normalise((pixels * 255.0).round().to(torch.uint8))


@torch.no_grad()
def calibrate_seeded(model: Ensemble, seed: int, images: torch.Tensor | None = None) -> None:
    """Data-free calibration of a randomly initialised ensemble, in place (CPU, float32).

    1. BatchNorm: running statistics are re-estimated as the cumulative average over the
       synthetic `calibration_images(seed)` (only BatchNorm layers in train mode, so nothing
       random such as stochastic depth runs), then eval mode and momentum are restored.
    2. Centring: each projection head's bias becomes -W @ mean, the mean of its input over the
       same images in eval mode, so the head outputs W (f - mean) and cosines between unrelated
       images spread around 0 instead of sitting near 1.
    The model is left in eval mode.
    """
    if images is None:
        images = calibration_images(seed)
    for backbone in (model.resnet, model.effnet):
        _recalibrate_batchnorm(backbone, images)
        _centre_heads(backbone, images)
    model.eval()


def _batches(images: torch.Tensor) -> list[torch.Tensor]:
    return [
        images[i : i + _CALIB_BATCH].contiguous(memory_format=torch.channels_last)
        for i in range(0, len(images), _CALIB_BATCH)
    ]


@torch.no_grad()
def _recalibrate_batchnorm(backbone: nn.Module, images: torch.Tensor) -> None:
    norms = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    backbone.eval()
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over all calibration batches
            m.train()
        for batch in _batches(images):
            backbone(batch)
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        backbone.eval()


@torch.no_grad()
def _centre_heads(backbone: nn.Module, images: torch.Tensor) -> None:
    # The heads are the backbone's direct nn.Linear children (the trunks' classifiers are
    # Identity); a pre-hook sees exactly the (flattened) feature each head reads.
    heads = [m for m in backbone.children() if isinstance(m, nn.Linear)]
    if not heads:
        raise ValueError(f"{type(backbone).__name__} has no projection heads to centre")
    sums: dict[nn.Linear, torch.Tensor] = {}
    counts: dict[nn.Linear, int] = {}

    def accumulate(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].detach().to(torch.float64)
        sums[module] = sums.get(module, 0) + x.sum(dim=0)
        counts[module] = counts.get(module, 0) + x.shape[0]

    hooks = [head.register_forward_pre_hook(accumulate) for head in heads]
    try:
        backbone.eval()
        for batch in _batches(images):
            backbone(batch)
    finally:
        for hook in hooks:
            hook.remove()
    for head in heads:
        mean = sums[head] / counts[head]
        bias = -(head.weight.detach().to(torch.float64) @ mean)
        head.bias.copy_(bias.to(head.bias.dtype))


def load_ensemble(
    weights_path: Path | None = None, *, seed: int = 0, hub_dir: Path | None = None
) -> LoadedEnsemble:
    """Resolve and load the ensemble's weights (see the module docstring for the order)."""
    if weights_path is not None:
        return _from_checkpoint(Path(weights_path), seed)
    cache_dir = Path(hub_dir) if hub_dir is not None else Path(torch.hub.get_dir())
    cached = _find_cached_trunks(cache_dir / "checkpoints")
    if cached is not None:
        return _from_torchvision_cache(*cached, seed=seed)
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
        model=build_seeded(seed),
        embedding_version=f"seed{seed}-{SEEDED_VERSION_SUFFIX}",
        source="seeded",
        preprocess=Preprocess(),
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
    path = Path(path)
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
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise WeightsError(
            f"weights file {path} has format {ckpt.get('format')!r}, expected {CHECKPOINT_FORMAT!r}"
        )
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
    # The seeded build only provides the module structure; every tensor is overwritten.
    model = build_seeded(seed, calibrate=False)
    _load_state(model.resnet, ckpt.get("resnet"), f"{path} [resnet]")
    _load_state(model.effnet, ckpt.get("effnet"), f"{path} [effnet]")
    return LoadedEnsemble(model, version, "checkpoint", preprocess)


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
