"""The default ensemble members; each maps an image batch to L2-normalised 512-d.

The modules are built without weights; `reid.weights` decides what goes into them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import efficientnet_b0, resnet50

EMBEDDING_DIM = 512


class MultiScaleResNet50(nn.Module):
    """ResNet50 whose embedding mixes three depths, so coat texture (layer2) and body shape
    (layer4) both contribute: 4 x 128-d projections concatenated to 512-d."""

    dim = EMBEDDING_DIM

    def __init__(self) -> None:
        super().__init__()
        self.trunk = resnet50(weights=None)
        self.trunk.fc = nn.Identity()
        self.pool_l2 = nn.AdaptiveAvgPool2d((4, 4))
        self.pool_l3 = nn.AdaptiveAvgPool2d((2, 2))
        self.pool_l4 = nn.AdaptiveAvgPool2d((1, 1))
        self.proj_l2 = nn.Linear(512 * 4 * 4, 128)
        self.proj_l3 = nn.Linear(1024 * 2 * 2, 128)
        self.proj_l4 = nn.Linear(2048, 128)
        self.proj_pool = nn.Linear(2048, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.trunk
        x = t.maxpool(t.relu(t.bn1(t.conv1(x))))
        f2 = t.layer2(t.layer1(x))
        f3 = t.layer3(f2)
        f4 = t.layer4(f3)
        parts = [
            self.proj_l2(torch.flatten(self.pool_l2(f2), 1)),
            self.proj_l3(torch.flatten(self.pool_l3(f3), 1)),
            self.proj_l4(torch.flatten(self.pool_l4(f4), 1)),
            self.proj_pool(torch.flatten(t.avgpool(f4), 1)),
        ]
        return F.normalize(torch.cat(parts, dim=1), dim=1)


class EfficientNetB0Embedder(nn.Module):
    """EfficientNet-B0 global features (1280-d) projected to 512-d."""

    dim = EMBEDDING_DIM

    def __init__(self) -> None:
        super().__init__()
        self.trunk = efficientnet_b0(weights=None)
        self.trunk.classifier = nn.Identity()
        self.proj = nn.Linear(1280, EMBEDDING_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # With the classifier gone, the trunk's forward is features -> avgpool -> flatten.
        return F.normalize(self.proj(self.trunk(x)), dim=1)


class Ensemble(nn.Module):
    """Two members; one forward pass of each per batch.

    The attribute names stay `resnet` and `effnet` (the first and second member, whatever
    their architecture: reid.members), because the stored vectors, the checkpoints and the
    embeddings are named so. ``boxes``: each member's (height, left, width) on the input
    when the members take different views (`Preprocess.view_boxes`); None = the whole input.
    ``shared``: one module serves both (a single backbone in the stream), run once.
    """

    def __init__(
        self,
        resnet: nn.Module | None = None,
        effnet: nn.Module | None = None,
        *,
        boxes: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None,
        shared: bool = False,
    ) -> None:
        super().__init__()
        # Unseeded when built here; `reid.weights.build_seeded` is the reproducible path.
        self.resnet = resnet if resnet is not None else MultiScaleResNet50()
        if shared:
            effnet = self.resnet
        self.effnet = effnet if effnet is not None else EfficientNetB0Embedder()
        self.boxes = boxes
        self.shared = shared

    def _view(self, x: torch.Tensor, k: int) -> torch.Tensor:
        if self.boxes is None:
            return x
        height, left, width = self.boxes[k]
        if (height, width) == tuple(x.shape[2:]):
            return x
        return x[:, :, :height, left : left + width]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.resnet(self._view(x, 0))
        if self.shared:
            return first, first
        return first, self.effnet(self._view(x, 1))
