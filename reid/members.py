"""Ensemble members: which architecture embeds, at which input, into the stream's 512-d.

The ensemble always has two members scored ``s = w1*cos1 + w2*cos2`` (reid.matching); by
default the multi-scale ResNet50 and EfficientNet-B0 of `reid.backbones`. Either may instead
be any torchvision trunk or timm model (a MegaDescriptor Swin, a DINOv2 ViT, MobileNetV2,
EfficientNet-Lite), each with its own input (size, fit, mean/std: a `Preprocess` view) and
its own weights. A `MemberSpec` says all that; checkpoints store it (`reid.weights`), and the
embedding version names the members.

Every member ends in 512 dimensions (the store's vector columns): a trunk with another
feature size gets a linear projection, initialised orthogonal so that untrained it keeps
cosines (exactly when the trunk has fewer than 512 features). timm is optional
(``pip install 'deer-reid-stream[timm]'``) and imported only for timm members.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tvm

from reid.backbones import EMBEDDING_DIM, EfficientNetB0Embedder, MultiScaleResNet50
from reid.preprocess import Preprocess

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision trunks: factory, feature size, the head replaced by Identity.
TV_TRUNKS: dict[str, tuple[Callable[..., nn.Module], int, str]] = {
    "resnet18": (tvm.resnet18, 512, "fc"),
    "resnet34": (tvm.resnet34, 512, "fc"),
    "resnet50": (tvm.resnet50, 2048, "fc"),
    "mobilenet_v2": (tvm.mobilenet_v2, 1280, "classifier"),
    "efficientnet_b0": (tvm.efficientnet_b0, 1280, "classifier"),
}
# Short names for timm architectures.
TIMM_ALIASES = {f"efficientnet_lite{n}": f"tf_efficientnet_lite{n}" for n in range(5)}


@dataclass(frozen=True)
class MemberSpec:
    """One member: its architecture, its input and where its pretrained trunk comes from."""

    name: str  # what the embedding version calls it
    arch: str  # "msr50" | "effb0" | a TV_TRUNKS name | a TIMM_ALIASES name | "timm:<model>"
    input_size: tuple[int, int] = (224, 224)  # (H, W)
    fit: str = "squash"  # "squash" | "pad" (aspect kept; reid.preprocess)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    dim: int = EMBEDDING_DIM
    last_stride: int = 2
    timm_kwargs: dict[str, Any] = field(default_factory=dict, hash=False)
    # The reid.hub catalogue file that feeds the trunk, if any (not part of equality).
    weights: str = field(default="", compare=False)

    def preprocess(self) -> Preprocess:
        return Preprocess(self.input_size, self.mean, self.std, self.fit)

    def with_input(self, input_size: tuple[int, int], fit: str | None = None) -> MemberSpec:
        return replace(self, input_size=tuple(input_size), fit=fit or self.fit)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(input_size=list(self.input_size), mean=list(self.mean), std=list(self.std))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MemberSpec:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown member fields: {sorted(unknown)}")
        values = dict(data)
        for key in ("input_size", "mean", "std"):
            if key in values:
                values[key] = tuple(values[key])
        values["timm_kwargs"] = dict(values.get("timm_kwargs") or {})
        return cls(**values)


def _timm(name: str, model: str, size: int, **kw: Any) -> MemberSpec:
    return MemberSpec(name, f"timm:{model}", (size, size), **kw)


_HALF = (0.5, 0.5, 0.5)
_TV = "models/{}"
_MEGA = "BVRA/MegaDescriptor-{}/resolve/main/pytorch_model.bin"
_DINO = "timm/vit_{}_patch14_dinov2.lvd142m/resolve/main/model.safetensors"
PRESETS: dict[str, MemberSpec] = {
    s.name: s
    for s in (
        MemberSpec("msr50", "msr50", weights=_TV.format("resnet50-11ad3fa6.pth")),
        MemberSpec("effb0", "effb0", weights=_TV.format("efficientnet_b0_rwightman-7f5810bc.pth")),
        MemberSpec("mobilenet_v2", "mobilenet_v2", weights=_TV.format("mobilenet_v2-b0353104.pth")),
        MemberSpec("resnet50", "resnet50", weights=_TV.format("resnet50-11ad3fa6.pth")),
        *(
            MemberSpec(
                f"efficientnet_lite{n}", f"efficientnet_lite{n}", (px, px), mean=_HALF, std=_HALF
            )
            for n, px in ((0, 224), (1, 240), (2, 260))
        ),
        *(
            _timm(
                f"megadescriptor-{k.lower()}", f"swin_{arch}", px, weights=_MEGA.format(f"{k}-{px}")
            )
            for k, arch, px in (
                ("T", "tiny_patch4_window7_224", 224),
                ("S", "small_patch4_window7_224", 224),
                ("B", "base_patch4_window7_224", 224),
                ("L", "large_patch4_window12_384", 384),
            )
        ),
        # DINOv2 is trained at 518 px; timm resamples its position embedding to the input.
        *(
            _timm(
                f"dinov2-{k}",
                f"vit_{full}_patch14_dinov2",
                224,
                timm_kwargs={"img_size": 224},
                weights=_DINO.format(full),
            )
            for k, full in (("s", "small"), ("b", "base"))
        ),
    )
}
# The stream's default pair. The weights file is where `reid-stream weights pull` puts the
# trunk; it is not part of what a member *is*, so two specs differing only there are equal.
DEFAULT_MEMBERS = (PRESETS["msr50"], PRESETS["effb0"])


def member_spec(name_or_arch: str) -> MemberSpec:
    """A preset by name, else a spec for a bare architecture (torchvision, alias, timm:)."""
    if name_or_arch in PRESETS:
        return PRESETS[name_or_arch]
    if name_or_arch in TV_TRUNKS or name_or_arch in TIMM_ALIASES:
        return MemberSpec(name_or_arch, name_or_arch)
    if name_or_arch.startswith("timm:"):
        return MemberSpec(name_or_arch.removeprefix("timm:"), name_or_arch)
    raise ValueError(
        f"unknown member {name_or_arch!r}: a preset ({', '.join(sorted(PRESETS))}), a "
        f"torchvision trunk ({', '.join(TV_TRUNKS)}) or timm:<model name>"
    )


def timm_module() -> Any:
    try:
        import timm  # the optional `timm` extra
    except ImportError as exc:
        raise ValueError("timm members need timm: pip install 'deer-reid-stream[timm]'") from exc
    return timm


def build_trunk(
    arch: str, input_size: tuple[int, int] | None = None, **timm_kwargs: Any
) -> tuple[nn.Module, int]:
    """(headless trunk returning pooled features, feature size), randomly initialised.

    timm transformers (Swin, ViT) are built for ``input_size`` (their position embeddings
    and windows depend on it); convolutional trunks take any size."""
    model = TIMM_ALIASES.get(arch, arch.removeprefix("timm:"))
    if arch.startswith("timm:") or arch in TIMM_ALIASES:
        timm = timm_module()
        kwargs = dict(timm_kwargs)
        if input_size is not None:
            kwargs["img_size"] = tuple(input_size)
        try:
            trunk = timm.create_model(model, pretrained=False, num_classes=0, **kwargs)
        except TypeError:  # a convolutional model: no img_size argument
            kwargs.pop("img_size", None)
            trunk = timm.create_model(model, pretrained=False, num_classes=0, **kwargs)
        return trunk, int(trunk.num_features)
    if arch not in TV_TRUNKS:
        raise ValueError(f"unknown trunk {arch!r}")
    factory, feat_dim, head = TV_TRUNKS[arch]
    trunk = factory(weights=None)
    setattr(trunk, head, nn.Identity())
    return trunk, feat_dim


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
    elif arch in TIMM_ALIASES:
        # EfficientNet-Lite: blocks[5] is the last stage that starts with stride 2.
        trunk.blocks[5][0].conv_dw.stride = (1, 1)
    else:
        raise ValueError(f"last_stride = 1 is not supported for {arch}")


def projection(feat_dim: int, dim: int) -> nn.Module:
    """Identity, or a linear map initialised orthogonal: for feat_dim <= dim its columns are
    orthonormal, so the projection of an untrained member preserves every cosine."""
    if feat_dim == dim:
        return nn.Identity()
    proj = nn.Linear(feat_dim, dim)
    nn.init.orthogonal_(proj.weight)
    nn.init.zeros_(proj.bias)
    return proj


class Member(nn.Module):
    """A trunk, its projection to `dim` and L2 normalisation: one ensemble member."""

    def __init__(self, spec: MemberSpec) -> None:
        super().__init__()
        self.spec = spec
        self.trunk, feat_dim = build_trunk(spec.arch, spec.input_size, **spec.timm_kwargs)
        if spec.last_stride == 1:
            set_last_stride_one(self.trunk, spec.arch)
        self.proj = projection(feat_dim, spec.dim)
        self.dim = spec.dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(self.trunk(x)), dim=1)


def build_member(spec: MemberSpec) -> nn.Module:
    """The module of ``spec``, randomly initialised (callers seed the RNG)."""
    if spec.arch == "msr50":
        module: nn.Module = MultiScaleResNet50()
        if spec.last_stride == 1:
            set_last_stride_one(module.trunk, "msr50")
        return module
    if spec.arch == "effb0":
        return EfficientNetB0Embedder()
    if spec.dim != EMBEDDING_DIM:
        raise ValueError(f"member {spec.name}: the stream stores {EMBEDDING_DIM}-d vectors")
    return Member(spec)


def bnneck_layer(dim: int) -> nn.BatchNorm1d:
    bn = nn.BatchNorm1d(dim)
    # The BNNeck's shift is frozen at zero (Luo et al.): the classifier sees a centred feature.
    bn.bias.requires_grad_(False)
    return bn


class SingleBackbone(nn.Module):
    """One trunk, a projection to `dim` and a BNNeck: `reid-train`'s single-backbone model.

    Training mode returns ``{"embedding": {"feat", "bn"}}`` for the losses; eval mode
    ``{"embedding": L2(bn or feat)}``. ``arch``: anything `member_spec` accepts.
    """

    def __init__(
        self,
        arch: str,
        dim: int,
        bnneck: bool = True,
        last_stride: int = 2,
        input_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        spec = member_spec(arch)
        self.arch = arch
        self.trunk, feat_dim = build_trunk(spec.arch, input_size, **spec.timm_kwargs)
        if last_stride == 1:
            set_last_stride_one(self.trunk, spec.arch)
        self.reduce = nn.Identity() if dim == feat_dim else nn.Linear(feat_dim, dim)
        self.neck = bnneck_layer(dim)
        self.bnneck = bnneck
        self.dim = dim

    def forward(self, x: torch.Tensor) -> Any:
        feat = self.reduce(self.trunk(x))
        bn = self.neck(feat)
        if self.training:
            return {"embedding": {"feat": feat, "bn": bn}}
        return {"embedding": F.normalize(bn if self.bnneck else feat, dim=1)}


class SingleAsMember(nn.Module):
    """A trained single backbone as a stream member: its eval embedding, zero-padded to the
    stream's 512 dimensions (padding keeps every cosine)."""

    def __init__(self, model: SingleBackbone) -> None:
        super().__init__()
        if model.dim > EMBEDDING_DIM:
            raise ValueError(
                f"a {model.dim}-d single backbone cannot run in the stream, which stores "
                f"{EMBEDDING_DIM}-d vectors: train it with model.dim <= {EMBEDDING_DIM}"
            )
        self.model = model
        self.dim = EMBEDDING_DIM

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.model(x)["embedding"]
        return F.pad(e, (0, EMBEDDING_DIM - e.shape[1]))
