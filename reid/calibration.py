"""Data-free calibration of the seeded (untrained) ensemble.

The seeded initialisation is a *calibrated* random init, computed without any data: a plain
random init is degenerate in eval mode (BatchNorm's default running statistics 0/1 do not match
the random network's activations, so EfficientNet's features shrink to ~1e-14 and its output is
the projection bias for every image; pooled post-ReLU ResNet features are all positive, so any
two images score cosine 0.85-1.0). `calibrate_seeded` fixes both with a fixed set of synthetic
images generated from the seed: BatchNorm statistics are re-estimated on them, and each
projection head's bias is set to -W @ mean(input) so the heads see centred features.
"""

from __future__ import annotations

import torch
from torch import nn

from reid.backbones import Ensemble
from reid.preprocess import Preprocess

# Synthetic calibration set of the seeded init. Changing any of these changes the seeded
# embeddings: bump reid.weights.SEEDED_VERSION_SUFFIX with them.
_CALIB_IMAGES = 32
_CALIB_BATCH = 16
_CALIB_CHROMA = 0.35  # per-channel share of the noise next to the shared (luminance) part


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
