"""Metric-learning and classification losses, combinable with weights (`ReIDLoss`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reid.training.config import LossConfig


def pairwise_distance(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between rows; clamped before sqrt so gradients stay finite."""
    sq = (x * x).sum(1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * x @ x.T
    return d2.clamp(min=1e-12).sqrt()


def triplet_loss(
    feat: torch.Tensor, labels: torch.Tensor, margin: float = 0.3, mining: str = "batch_hard"
) -> torch.Tensor:
    """Triplet loss on a PK batch.

    batch_hard (Hermans et al. 2017): per anchor, the farthest positive and the nearest
    negative. semi_hard (Schroff et al. 2015): per anchor-positive pair, the nearest negative
    farther than the positive; where there is none, the farthest negative.
    """
    dist = pairwise_distance(feat.float())
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    pos, neg = same & ~eye, ~same
    if not pos.any() or not neg.any():
        return feat.sum() * 0.0
    if mining == "batch_hard":
        d_ap = (dist * pos).max(1).values
        d_an = dist.masked_fill(~neg, float("inf")).min(1).values
        valid = pos.any(1) & neg.any(1)
        return F.relu(d_ap - d_an + margin)[valid].mean()
    a, p = pos.nonzero(as_tuple=True)
    d_ap = dist[a, p][:, None]
    d_an = dist[a]
    neg_a = neg[a]
    semi = neg_a & (d_an > d_ap)
    nearest_semi = d_an.masked_fill(~semi, float("inf")).min(1).values
    farthest = d_an.masked_fill(~neg_a, float("-inf")).max(1).values
    chosen = torch.where(semi.any(1), nearest_semi, farthest)
    return F.relu(d_ap[:, 0] - chosen + margin).mean()


def contrastive_loss(feat: torch.Tensor, labels: torch.Tensor, margin: float = 0.5) -> torch.Tensor:
    """Siamese contrastive loss (Hadsell et al. 2006) over every pair in the batch, on
    L2-normalised features: d^2 for same-identity pairs, max(0, margin - d)^2 otherwise."""
    dist = pairwise_distance(F.normalize(feat.float(), dim=1))
    same = labels[:, None] == labels[None, :]
    upper = torch.triu(torch.ones_like(same), diagonal=1)
    pos, neg = same & upper, ~same & upper
    terms = torch.cat([dist[pos] ** 2, F.relu(margin - dist[neg]) ** 2])
    return terms.mean() if len(terms) else feat.sum() * 0.0


class ArcFace(nn.Module):
    """Additive angular margin (Deng et al. 2019): logits s*cos(theta + m) for the true class,
    s*cos(theta) for the others, then cross-entropy."""

    def __init__(self, dim: int, classes: int, scale: float = 30.0, margin: float = 0.3) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(classes, dim) * 0.01)
        self.scale, self.margin = scale, margin

    def forward(self, feat: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = F.linear(F.normalize(feat.float(), dim=1), F.normalize(self.weight, dim=1))
        theta = torch.acos(cos.clamp(-1 + 1e-7, 1 - 1e-7))
        target = torch.cos(theta + self.margin)
        onehot = F.one_hot(labels, cos.shape[1]).bool()
        return F.cross_entropy(self.scale * torch.where(onehot, target, cos), labels)


class CenterLoss(nn.Module):
    """Mean squared distance of each feature to its identity's learned centre (Wen et al.)."""

    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        self.centers = nn.Parameter(torch.randn(classes, dim) * 0.01)

    def forward(self, feat: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return ((feat.float() - self.centers[labels]) ** 2).sum(1).mean() / 2


class ReIDLoss(nn.Module):
    """The weighted sum of the configured losses for one embedding member.

    Triplet, center and contrastive losses see the pre-neck feature; cross-entropy (with label
    smoothing, on a bias-free linear classifier) and ArcFace see the BNNeck feature.
    """

    def __init__(self, cfg: LossConfig, dim: int, classes: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.classifier = nn.Linear(dim, classes, bias=False) if cfg.softmax > 0 else None
        if self.classifier is not None:
            nn.init.normal_(self.classifier.weight, std=0.001)
        self.arcface = (
            ArcFace(dim, classes, cfg.arcface_scale, cfg.arcface_margin)
            if cfg.arcface > 0
            else None
        )
        self.center = CenterLoss(dim, classes) if cfg.center > 0 else None

    def forward(
        self, out: dict[str, torch.Tensor], labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, feat, bn = self.cfg, out["feat"], out["bn"]
        parts: dict[str, torch.Tensor] = {}
        if cfg.triplet > 0:
            parts["triplet"] = cfg.triplet * triplet_loss(
                feat, labels, cfg.triplet_margin, cfg.triplet_mining
            )
        if self.classifier is not None:
            logits = self.classifier(bn.float())
            parts["softmax"] = cfg.softmax * F.cross_entropy(
                logits, labels, label_smoothing=cfg.label_smoothing
            )
        if self.arcface is not None:
            parts["arcface"] = cfg.arcface * self.arcface(bn, labels)
        if self.center is not None:
            parts["center"] = cfg.center * self.center(feat, labels)
        if cfg.contrastive > 0:
            parts["contrastive"] = cfg.contrastive * contrastive_loss(
                feat, labels, cfg.contrastive_margin
            )
        total = torch.stack(list(parts.values())).sum()
        return total, {k: float(v.detach()) for k, v in parts.items()}
