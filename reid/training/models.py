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
  same batches (the sum of both members' losses).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tvm

from reid.backbones import EfficientNetB0Embedder, Ensemble, MultiScaleResNet50
from reid.training.config import ModelConfig
from reid.weights import WeightsError

_TRUNKS = {
    "resnet18": (tvm.resnet18, 512, "fc"),
    "resnet34": (tvm.resnet34, 512, "fc"),
    "resnet50": (tvm.resnet50, 2048, "fc"),
    "mobilenet_v2": (tvm.mobilenet_v2, 1280, "classifier"),
    "efficientnet_b0": (tvm.efficientnet_b0, 1280, "classifier"),
}


def _neck(dim: int) -> nn.BatchNorm1d:
    bn = nn.BatchNorm1d(dim)
    # The BNNeck's shift is frozen at zero (Luo et al.): the classifier sees a centred feature.
    bn.bias.requires_grad_(False)
    return bn


class SingleBackbone(nn.Module):
    """A torchvision trunk with its head removed, a projection and a BNNeck."""

    def __init__(self, arch: str, dim: int, bnneck: bool = True, last_stride: int = 2) -> None:
        super().__init__()
        factory, feat_dim, head = _TRUNKS[arch]
        self.arch = arch
        self.trunk = factory(weights=None)
        setattr(self.trunk, head, nn.Identity())
        if last_stride == 1:
            set_last_stride_one(self.trunk, arch)
        self.reduce = nn.Identity() if dim == feat_dim else nn.Linear(feat_dim, dim)
        self.neck = _neck(dim)
        self.bnneck = bnneck
        self.dim = dim

    def forward(self, x: torch.Tensor) -> Any:
        feat = self.reduce(self.trunk(x))
        bn = self.neck(feat)
        if self.training:
            return {"embedding": {"feat": feat, "bn": bn}}
        return {"embedding": F.normalize(bn if self.bnneck else feat, dim=1)}


class MemberNet(nn.Module):
    """A stream ensemble member with a training-only BNNeck (see the module docstring)."""

    def __init__(self, member: nn.Module) -> None:
        super().__init__()
        self.member = member
        self.neck = _neck(member.dim)
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
    """The stream's two members; `to_stream()` gives the `reid.backbones.Ensemble` to save."""

    def __init__(self, resnet: MultiScaleResNet50, effnet: EfficientNetB0Embedder) -> None:
        super().__init__()
        self.resnet = MemberNet(resnet)
        self.effnet = MemberNet(effnet)

    def forward(self, x: torch.Tensor) -> Any:
        return {"resnet": self.resnet(x), "effnet": self.effnet(x)}

    def to_stream(self) -> Ensemble:
        return Ensemble(self.resnet.member, self.effnet.member)


def set_last_stride_one(trunk: nn.Module, arch: str) -> None:
    """Remove the last down-sampling (doubles the final feature map; same state dict)."""
    if arch.startswith("resnet") or arch == "msr50":
        block = trunk.layer4[0]
        for conv in (block.conv1, getattr(block, "conv2", None)):
            if conv is not None and conv.stride == (2, 2):
                conv.stride = (1, 1)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)
    elif arch == "mobilenet_v2":
        # features[14] is the last inverted-residual block with stride 2 (160 channels).
        trunk.features[14].conv[1][0].stride = (1, 1)
    else:
        raise ValueError(f"model.last_stride = 1 is not supported for {arch}")


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model of ``cfg``, with the local pretrained weights it names loaded."""
    torch.manual_seed(cfg.seed)
    if cfg.arch == "stream_ensemble":
        if cfg.last_stride != 2:
            raise ValueError("stream_ensemble keeps last_stride = 2: the stream builds it so")
        resnet, effnet = MultiScaleResNet50(), EfficientNetB0Embedder()
        if cfg.pretrained_resnet:
            load_trunk_weights(resnet.trunk, cfg.pretrained_resnet, "resnet50")
        if cfg.pretrained_effnet:
            load_trunk_weights(effnet.trunk, cfg.pretrained_effnet, "efficientnet_b0")
        return EnsembleModel(resnet, effnet)
    if cfg.arch == "msr50":
        member = MultiScaleResNet50()
        if cfg.last_stride == 1:
            set_last_stride_one(member.trunk, "msr50")
        if cfg.pretrained:
            load_trunk_weights(member.trunk, cfg.pretrained, "resnet50")
        return MemberModel(member)
    model = SingleBackbone(cfg.arch, cfg.dim, cfg.bnneck, cfg.last_stride)
    if cfg.pretrained:
        load_trunk_weights(model.trunk, cfg.pretrained, cfg.arch)
    return model


def load_trunk_weights(trunk: nn.Module, path: str | Path, arch: str) -> int:
    """Load a local torchvision state dict (whole model or feature layers only) into ``trunk``.

    Keys are matched by name (an optional `module.`/`state_dict` wrapper and the classifier
    head are ignored); a file whose names differ (e.g. another implementation's feature
    layers) is matched in order when every tensor's shape agrees. Anything else raises
    WeightsError naming what does not fit. Returns the number of tensors loaded.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"pretrained weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"pretrained weights file {path} cannot be read: {exc}") from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise WeightsError(f"{path} is not a state dict of tensors")
    state = {str(k).removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "classifier."))}
    expected = trunk.state_dict()
    if set(state) <= set(expected):
        mapped = state
    elif {f"features.{k}" for k in state} <= set(expected):
        mapped = {f"features.{k}": v for k, v in state.items()}
    else:
        mapped = _match_in_order(state, expected, path, arch)
    bad = [
        f"{k} {tuple(v.shape)} != {tuple(expected[k].shape)}"
        for k, v in mapped.items()
        if v.shape != expected[k].shape
    ]
    if bad:
        raise WeightsError(f"{path} does not fit {arch}: {len(bad)} shape mismatches: {bad[:5]}")
    # Feature-layer files may leave non-feature layers out; a file that leaves out part of
    # the feature stack is a different architecture.
    missing = [k for k in expected if k not in mapped and k.startswith("features.")]
    if arch.startswith("resnet"):
        missing = [k for k in expected if k not in mapped]
    if missing:
        raise WeightsError(
            f"{path} does not fit {arch}: {len(missing)} trunk tensors missing, "
            f"first: {missing[:5]}"
        )
    trunk.load_state_dict(mapped, strict=False)
    return len(mapped)


def _match_in_order(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], path: Path, arch: str
) -> dict[str, torch.Tensor]:
    src, dst = list(state.items()), list(expected.items())
    if len(src) != len(dst):
        raise WeightsError(
            f"{path} does not fit {arch}: its {len(src)} tensors have other names than the "
            f"{len(dst)} of the architecture (first file key {src[0][0]!r}, expected "
            f"{dst[0][0]!r}) and cannot be matched in order"
        )
    for i, ((sk, sv), (dk, dv)) in enumerate(zip(src, dst, strict=True)):
        if tuple(sv.shape) != tuple(dv.shape):
            raise WeightsError(
                f"{path} does not fit {arch}: tensor {i} {sk!r} {tuple(sv.shape)} cannot be "
                f"{dk!r} {tuple(dv.shape)}"
            )
    return {dk: sv for (_, sv), (dk, _) in zip(src, dst, strict=True)}
