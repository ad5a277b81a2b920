"""Trainable re-identification models, built by `build_model` from a `ModelConfig`.

Every model, in training mode, returns `{"feat": pre-neck feature, "bn": BNNeck feature}` per
member (the triplet/center/contrastive losses use `feat`, the classifier losses use `bn`,
as in Luo et al.'s "bag of tricks"); in eval mode it returns L2-normalised embeddings.

- Single backbones (resnet18/34/50, mobilenet_v2, efficientnet_b0 trunks from torchvision):
  trunk -> global average pool -> optional linear to `dim` -> BNNeck. At inference the
  normalised BNNeck output is the embedding (`bnneck = true`), else the pre-neck feature.
- The stream's members (`msr50` = reid.backbones.MultiScaleResNet50, and the
  EfficientNetB0Embedder) keep their module layout untouched, because the stream's
  `reid-ensemble/1` checkpoints are their state dicts. Their own (already normalised) output
  is both `feat` and the inference embedding; the BNNeck BatchNorm sits on top of it for the
  classifier losses in training only and is not saved into the stream checkpoint.
- `stream_ensemble`: both members, each with its own neck and losses, trained jointly on the
  same batches (the sum of both members' losses); `ensemble` the same for any two members
  (`model.members`, reid.members), each at the data's input size and fit with its own
  normalisation (members that normalise differently see two views of one sheet).
- Single backbones may be any member architecture too (e.g. `efficientnet_lite0`,
  `timm:<model>`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from reid.backbones import EfficientNetB0Embedder, Ensemble, MultiScaleResNet50
from reid.checkpoints import member_boxes, members_preprocess
from reid.members import (
    DEFAULT_MEMBERS,
    MemberSpec,
    SingleBackbone,
    bnneck_layer,
    build_member,
    member_spec,
    set_last_stride_one,
)
from reid.preprocess import Preprocess
from reid.training.config import DataConfig, ModelConfig, package_file
from reid.trunk_weights import load_trunk_weights

__all__ = ["EnsembleModel", "MemberModel", "SingleBackbone", "build_model", "load_trunk_weights"]


class MemberNet(nn.Module):
    """A stream ensemble member with a training-only BNNeck (see the module docstring)."""

    def __init__(self, member: nn.Module) -> None:
        super().__init__()
        self.member = member
        self.neck = bnneck_layer(member.dim)
        self.dim = member.dim

    def forward(self, x: torch.Tensor) -> Any:
        feat = self.member(x)
        if self.training:
            return {"feat": feat, "bn": self.neck(feat)}
        return feat


class MemberModel(nn.Module):
    """One stream member alone (`msr50`), as a single-backbone model."""

    def __init__(self, member: nn.Module) -> None:
        super().__init__()
        self.net = MemberNet(member)
        self.dim = member.dim

    def forward(self, x: torch.Tensor) -> Any:
        return {"embedding": self.net(x)}


class EnsembleModel(nn.Module):
    """Two stream members; `to_stream()` gives the `reid.backbones.Ensemble` to save."""

    def __init__(
        self,
        resnet: nn.Module,
        effnet: nn.Module,
        members: Sequence[MemberSpec] = DEFAULT_MEMBERS,
    ) -> None:
        super().__init__()
        self.resnet = MemberNet(resnet)
        self.effnet = MemberNet(effnet)
        self.members = tuple(members)
        self.boxes = member_boxes(self.members, members_preprocess(self.members))

    def _view(self, x: torch.Tensor, k: int) -> torch.Tensor:
        if self.boxes is None:
            return x
        height, left, width = self.boxes[k]
        return x[:, :, :height, left : left + width]

    def forward(self, x: torch.Tensor) -> Any:
        return {"resnet": self.resnet(self._view(x, 0)), "effnet": self.effnet(self._view(x, 1))}

    def to_stream(self) -> Ensemble:
        return Ensemble(self.resnet.member, self.effnet.member, boxes=self.boxes)


def member_specs(cfg: ModelConfig, data: DataConfig | None = None) -> list[MemberSpec]:
    """The member(s) of ``cfg`` at the data's input (size, fit; each keeps its own
    normalisation): two for the ensembles, one for a single backbone."""
    if cfg.arch == "stream_ensemble":
        specs = list(DEFAULT_MEMBERS)
    elif cfg.arch == "ensemble":
        specs = [member_spec(name) for name in cfg.members]
    else:
        specs = [member_spec(cfg.arch)]
    if data is not None:
        size = (data.input_size, data.input_width or data.input_size)
        specs = [s.with_input(size, data.fit) for s in specs]
    if cfg.last_stride == 1:
        specs = [replace(s, last_stride=1) for s in specs]
    return specs


def input_preprocess(cfg: ModelConfig, data: DataConfig) -> Preprocess:
    """How training and evaluation draw an image for ``cfg``: the sheet of its members' views."""
    return members_preprocess(member_specs(cfg, data))


def build_model(cfg: ModelConfig, data: DataConfig | None = None) -> nn.Module:
    """The model of ``cfg`` (at ``data``'s input), with the local pretrained weights it
    names loaded."""
    torch.manual_seed(cfg.seed)
    specs = member_specs(cfg, data)
    if cfg.arch == "stream_ensemble":
        if cfg.last_stride != 2:
            raise ValueError("stream_ensemble keeps last_stride = 2: the stream builds it so")
        resnet, effnet = MultiScaleResNet50(), EfficientNetB0Embedder()
        if cfg.pretrained_resnet:
            load_trunk_weights(resnet.trunk, cfg.pretrained_resnet, "resnet50")
        if cfg.pretrained_effnet:
            load_trunk_weights(effnet.trunk, cfg.pretrained_effnet, "efficientnet_b0")
        return EnsembleModel(resnet, effnet, specs)
    if cfg.arch == "ensemble":
        modules = []
        files = cfg.member_weights or ["", ""]
        for spec, file in zip(specs, files, strict=True):
            module = build_member(spec)
            if file:
                file = package_file(file, "model.member_weights")
                load_trunk_weights(module.trunk, file, spec.arch)
            modules.append(module)
        return EnsembleModel(modules[0], modules[1], specs)
    if cfg.arch == "msr50":
        member = MultiScaleResNet50()
        if cfg.last_stride == 1:
            set_last_stride_one(member.trunk, "msr50")
        if cfg.pretrained:
            load_trunk_weights(member.trunk, cfg.pretrained, "resnet50")
        return MemberModel(member)
    size = specs[0].input_size
    model = SingleBackbone(cfg.arch, cfg.dim, cfg.bnneck, cfg.last_stride, size)
    if cfg.pretrained:
        load_trunk_weights(model.trunk, package_file(cfg.pretrained, "model.pretrained"),
                           specs[0].arch)  # fmt: skip
    return model
