"""Every checkpoint file format: writing, reading and telling them apart.

Checkpoints are dicts of tensors and plain containers, read with ``weights_only=True``:

- `reid-ensemble/1`: the default members (multi-scale ResNet50 + EfficientNet-B0): their
  two state dicts, the embedding version, the `Preprocess` and free-form `meta`.
- `reid-ensemble/2`: the same with any two members (`reid.members`): ``members`` holds
  their `MemberSpec`s, ``shared`` says one module serves both (a single backbone). The
  `Preprocess` is the sheet of the members' views. `save_checkpoint` writes /1 for the
  default members, so older readers keep reading those.
- `reid-single/1` (`save_single_checkpoint`): one `reid-train` backbone: the model's config
  fields (without its pretrained file), its whole state dict (BNNeck included), the
  embedding version, the `Preprocess` and `meta`. `reid-eval` reads its contents
  (`SingleCheckpoint`); the stream runs it as both members at once (`SingleAsMember`).

`load_any_checkpoint` reads any of them, telling them apart by their `format` key;
`load_stream_checkpoint` gives what the stream runs for any of them.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reid.atomic_files import atomic_write
from reid.backbones import Ensemble
from reid.members import (
    DEFAULT_MEMBERS,
    MemberSpec,
    SingleAsMember,
    SingleBackbone,
    build_member,
    member_spec,
)
from reid.preprocess import Preprocess

CHECKPOINT_FORMAT = "reid-ensemble/1"
MEMBERS_FORMAT = "reid-ensemble/2"
SINGLE_FORMAT = "reid-single/1"
ENSEMBLE_FORMATS = (CHECKPOINT_FORMAT, MEMBERS_FORMAT)


class WeightsError(ValueError):
    """A weights file that cannot be used as given."""


@dataclass
class LoadedEnsemble:
    model: Ensemble
    embedding_version: str
    source: str  # "checkpoint" | "torchvision-cache" | "seeded"
    preprocess: Preprocess
    meta: dict[str, Any] = field(default_factory=dict)  # a checkpoint's `meta`
    members: tuple[MemberSpec, ...] = DEFAULT_MEMBERS


@dataclass
class SingleCheckpoint:
    """The contents of a `reid-single/1` file (see the module docstring)."""

    model_config: dict[str, Any]  # ModelConfig fields, "pretrained" left out
    state_dict: dict[str, torch.Tensor]
    embedding_version: str
    preprocess: Preprocess
    meta: dict[str, Any] = field(default_factory=dict)


def default_members(preprocess: Preprocess) -> tuple[MemberSpec, ...]:
    """The default members at ``preprocess``'s input: what a `reid-ensemble/1` file holds."""
    return tuple(m.with_input(preprocess.input_size, preprocess.fit) for m in DEFAULT_MEMBERS)


def members_preprocess(members: Sequence[MemberSpec]) -> Preprocess:
    """The input of an ensemble of ``members``: the sheet of their views."""
    return Preprocess.sheet([m.preprocess() for m in members])


def member_boxes(
    members: Sequence[MemberSpec], preprocess: Preprocess
) -> tuple[tuple[int, int, int], tuple[int, int, int]] | None:
    """Each member's box on the input (None when they share one view)."""
    if not preprocess.views:
        return None
    boxes = preprocess.view_boxes()
    first, second = (boxes[preprocess.view_of(m.preprocess())] for m in members)
    return first, second


def build_structure(
    members: Sequence[MemberSpec], *, seed: int = 0, shared: bool = False
) -> Ensemble:
    """The ensemble of ``members`` with a seeded initialisation (each member reseeded, the
    caller's RNG left alone); `reid.weights.build_seeded` for the default members."""
    modules = []
    with torch.random.fork_rng(devices=[]):
        for spec in members[:1] if shared else members:
            torch.manual_seed(seed)
            modules.append(build_member(spec))
    boxes = None if shared else member_boxes(members, members_preprocess(members))
    if shared:
        return Ensemble(modules[0], shared=True)
    return Ensemble(modules[0], modules[1], boxes=boxes)


def save_checkpoint(
    path: Path,
    model: Ensemble,
    *,
    embedding_version: str,
    preprocess: Preprocess,
    meta: dict[str, Any] | None = None,
    members: Sequence[MemberSpec] | None = None,
) -> None:
    """Write an ensemble checkpoint atomically (temp file in the same folder, rename):
    `reid-ensemble/1` for the default members, else `reid-ensemble/2` naming them."""
    if not embedding_version:
        raise ValueError("embedding_version must be a non-empty string")
    meta = dict(meta or {})
    _check_plain(meta, "meta")
    # None: the default members at the preprocess's input (a `reid-ensemble/1` file).
    members = default_members(preprocess) if members is None else tuple(members)
    if len(members) != 2:
        raise ValueError(f"an ensemble has two members, got {len(members)}")
    shared = bool(getattr(model, "shared", False))
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "embedding_version": embedding_version,
        "resnet": _plain_state(model.resnet),
        "preprocess": preprocess.to_dict(),
        "meta": meta,
    }
    if not shared:
        payload["effnet"] = _plain_state(model.effnet)
    if shared or members != default_members(preprocess):
        payload.update(format=MEMBERS_FORMAT, shared=shared,
                       members=[m.to_dict() for m in members])  # fmt: skip
        _check_plain(payload["members"], "members")
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
    if fmt in ENSEMBLE_FORMATS:
        return _ensemble_from(ckpt, path, seed)
    if fmt == SINGLE_FORMAT:
        return _single_from(ckpt, path)
    raise WeightsError(
        f"{path} has format {fmt!r}; expected one of {[*ENSEMBLE_FORMATS, SINGLE_FORMAT]}"
    )


def load_stream_checkpoint(path: Path, *, seed: int = 0) -> LoadedEnsemble:
    """What the stream runs from any checkpoint format: an ensemble as saved, a single
    backbone as both members at once."""
    loaded = load_any_checkpoint(path, seed=seed)
    if isinstance(loaded, LoadedEnsemble):
        return loaded
    cfg = loaded.model_config
    arch = str(cfg.get("arch"))
    try:
        spec = member_spec(arch)
        if arch == "msr50":  # training's MemberModel: the stream member under `net.member.`
            single: nn.Module = build_member(
                replace(spec, last_stride=int(cfg.get("last_stride", 2)))
            )
            member: nn.Module = single
            state = {k.removeprefix("net.member."): v for k, v in loaded.state_dict.items()
                     if k.startswith("net.member.")}  # fmt: skip
        else:
            single = SingleBackbone(
                arch, int(cfg["dim"]), bool(cfg.get("bnneck", True)),
                int(cfg.get("last_stride", 2)), loaded.preprocess.input_size,
            )  # fmt: skip
            member, state = SingleAsMember(single), loaded.state_dict
    except (KeyError, ValueError) as exc:
        raise WeightsError(f"{path}: this single backbone cannot run in the stream: {exc}") from exc
    _load_state(single, state, str(path))
    view = loaded.preprocess
    spec = spec.with_input(view.input_size, view.fit)
    model = Ensemble(member, shared=True).eval()
    return LoadedEnsemble(model, loaded.embedding_version, "checkpoint", loaded.preprocess,
                          loaded.meta, (spec, spec))  # fmt: skip


def _write_atomically(path: Path, payload: dict[str, Any]) -> None:
    # A reader never sees half a checkpoint.
    with atomic_write(path) as fh:
        torch.save(payload, fh)


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
    fmt = ckpt.get("format")
    if fmt not in ENSEMBLE_FORMATS:
        raise WeightsError(
            f"weights file {path} has format {fmt!r}, expected one of {list(ENSEMBLE_FORMATS)}"
        )
    version, preprocess, meta = _common_fields(ckpt, path)
    members, shared = DEFAULT_MEMBERS, False
    if fmt == MEMBERS_FORMAT:
        raw, shared = ckpt.get("members"), bool(ckpt.get("shared", False))
        try:
            if not isinstance(raw, Sequence) or len(raw) != 2:
                raise TypeError("expected a list of two members")
            members = tuple(MemberSpec.from_dict(m) for m in raw)
            built = build_structure(members, seed=seed, shared=shared)
        except (TypeError, ValueError) as exc:
            raise WeightsError(f"weights file {path} has invalid members: {exc}") from exc
        want = members_preprocess(members[:1] if shared else members)
        if want != preprocess:
            raise WeightsError(f"weights file {path}: its preprocess is not its members' views")
    else:
        # The seeded build only provides the module structure; every tensor is overwritten.
        members = default_members(preprocess)
        built = build_structure(members, seed=seed)
    _load_state(built.resnet, ckpt.get("resnet"), f"{path} [resnet]")
    if not shared:
        _load_state(built.effnet, ckpt.get("effnet"), f"{path} [effnet]")
    return LoadedEnsemble(built, version, "checkpoint", preprocess, meta, members)


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
