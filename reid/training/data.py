"""Datasets for training and evaluation: readers, identity splits, the PK sampler, transforms.

Readers return `Sample`s. `camera` is whatever separates viewing conditions for the
evaluation protocol (see `reid.evaluation.metrics`): Market-1501's camera, or a CSV's `camera`
column, or its `encounter` (photo burst) when that is what the data has.

`load_split` turns a `DataConfig` into train and held-out query/gallery samples; training and
`reid-eval` both call it, so a model is judged on exactly the identities it never saw.
"""

from __future__ import annotations

import csv
import random
import re
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision import transforms as T

from reid.preprocess import Preprocess
from reid.training.config import DataConfig

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
_MARKET_NAME = re.compile(r"^(-?\d+)_c(\d+)")


@dataclass(frozen=True)
class Sample:
    path: str
    identity: str  # "-1" marks a junk image (Market-1501)
    camera: str = ""
    date: str = ""


@dataclass
class Split:
    train: list[Sample]
    query: list[Sample]
    gallery: list[Sample]
    # True when query and gallery are the same list (all-vs-all; self-matches are excluded).
    all_vs_all: bool = False


class DataError(ValueError):
    """A dataset that cannot be read as described."""


def read_market1501(root: str | Path) -> Split:
    """The Market-1501 layout: `bounding_box_train`, `query`, `bounding_box_test`, files named
    `PPPP_cC...jpg`. Identity -1 is junk (kept, ignored by the metrics); 0000 distractors are
    kept as gallery negatives; both are dropped from training."""
    root = Path(root)

    def folder(name: str) -> list[Sample]:
        path = root / name
        if not path.is_dir():
            raise DataError(f"{root} is not a Market-1501 folder: {name}/ is missing")
        out = []
        for file in sorted(path.iterdir()):
            m = _MARKET_NAME.match(file.name)
            if file.suffix.lower() in IMAGE_SUFFIXES and m:
                out.append(Sample(str(file), str(int(m.group(1))), m.group(2)))
        return out

    train = [s for s in folder("bounding_box_train") if s.identity not in ("-1", "0")]
    return Split(train, folder("query"), folder("bounding_box_test"))


def read_folders(root: str | Path) -> list[Sample]:
    """One sub-folder per identity; no camera information."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist")
    samples = [
        Sample(str(f), d.name)
        for d in sorted(p for p in root.iterdir() if p.is_dir())
        for f in sorted(d.iterdir())
        if f.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not samples:
        raise DataError(f"no images in identity folders under {root}")
    return samples


def read_csv(
    path: str | Path, root: str | Path | None = None, camera_field: str = "auto"
) -> list[Sample]:
    """A CSV with `path,identity[,camera|encounter][,date]`; paths are relative to ``root``
    (default: the CSV's folder). ``camera_field`` "auto" uses `camera` where filled, else
    `encounter`; "none" ignores both."""
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    try:
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if not rows or not {"path", "identity"} <= set(rows[0]):
        raise DataError(
            f"{path} needs the columns path,identity (got {list(rows[0] if rows else [])})"
        )
    out = []
    for row in rows:
        if camera_field == "auto":
            camera = row.get("camera") or row.get("encounter") or ""
        elif camera_field == "none":
            camera = ""
        else:
            camera = row.get(camera_field) or ""
        out.append(Sample(str(root / row["path"]), row["identity"], camera, row.get("date") or ""))
    return out


def split_identities(
    samples: Sequence[Sample], test: float, seed: int = 0, always: Sequence[str] = ()
) -> tuple[list[Sample], list[Sample]]:
    """Disjoint identities: ``test`` is a fraction (< 1) or a count of identities held out,
    ``always`` named identities among them (the rest drawn with ``seed``)."""
    ids = sorted({s.identity for s in samples})
    unknown = sorted(set(always) - set(ids))
    if unknown:
        raise DataError(f"test_ids not in the dataset: {unknown}")
    n_test = round(test * len(ids)) if test < 1 else int(test)
    if not 0 < n_test < len(ids) and test > 0:
        raise DataError(f"cannot hold out {n_test} of {len(ids)} identities")
    rest = [i for i in ids if i not in set(always)]
    held = set(always) | set(random.Random(seed).sample(rest, max(0, n_test - len(always))))
    return [s for s in samples if s.identity not in held], [
        s for s in samples if s.identity in held
    ]


def query_gallery(test: Sequence[Sample], mode: str = "all", seed: int = 0) -> Split:
    """Query/gallery within the test identities.

    "all": every test image queries all the others (self excluded by the metrics).
    "one_per_camera": one random image per (identity, camera) is a query, the rest gallery,
    as Market-1501 does.
    """
    if mode == "all":
        return Split([], list(test), list(test), all_vs_all=True)
    rng = random.Random(seed)
    groups: dict[tuple[str, str], list[Sample]] = defaultdict(list)
    for s in test:
        groups[(s.identity, s.camera)].append(s)
    query = [rng.choice(g) for _, g in sorted(groups.items())]
    chosen = set(query)
    return Split([], query, [s for s in test if s not in chosen])


def limit_identities(
    samples: Sequence[Sample], n: int, seed: int = 0, always: Sequence[str] = ()
) -> list[Sample]:
    """``n`` identities (the ``always`` ones among them, the rest drawn with ``seed``)."""
    ids = sorted({s.identity for s in samples})
    if n <= 0 or n >= len(ids):
        return list(samples)
    rest = [i for i in ids if i not in set(always)]
    keep = set(always) | set(random.Random(seed).sample(rest, max(0, n - len(always))))
    return [s for s in samples if s.identity in keep]


def load_split(data: DataConfig, *, use_split: bool = True) -> Split:
    """Train and test (query/gallery) samples of ``data``; without ``use_split`` the whole
    dataset is the test set (Market-1501 keeps its own split)."""
    root = Path(data.root)
    if data.format == "market1501":
        return read_market1501(root)
    if data.format == "folders":
        samples = read_folders(root)
    else:
        samples = read_csv(root / data.csv, root, data.camera_field)
    samples = limit_identities(samples, data.max_identities, data.split_seed, data.test_ids)
    if not use_split:
        train, test = [], samples
    elif data.test_identities > 0 or data.test_ids:
        train, test = split_identities(
            samples, data.test_identities, data.split_seed, data.test_ids
        )
    else:
        train, test = samples, []  # train on everything, nothing held out
    split = query_gallery(test, data.query_mode, data.split_seed)
    split.train = train
    return split


def data_from_path(path: Path, camera_field: str = "auto") -> DataConfig:
    """The `DataConfig` of a dataset named by its path alone (`reid-eval --data`): a CSV
    file, a Market-1501 folder, a folder with an `index.csv`, else one folder per identity.
    Nothing is held out: the caller evaluates it whole."""
    if path.suffix == ".csv":
        return DataConfig(
            root=str(path.parent),
            format="csv",
            csv=path.name,
            camera_field=camera_field,
            test_identities=0,
        )
    if (path / "bounding_box_test").is_dir():
        return DataConfig(root=str(path), format="market1501", query_mode="one_per_camera")
    if (path / "index.csv").is_file():
        return DataConfig(
            root=str(path), format="csv", camera_field=camera_field, test_identities=0
        )
    return DataConfig(root=str(path), format="folders", test_identities=0)


def load_uint8(path: str, preprocess: Preprocess) -> torch.Tensor:
    """Decode and draw exactly as the stream does (`Preprocess.to_uint8`: squash or pad,
    every view of a sheet)."""
    with Image.open(path) as img:
        return preprocess.to_uint8(img)


def train_transform(
    preprocess: Preprocess, flip: float, padding: int, jitter: float, erasing: float
) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 [3, H, W] (already drawn by ``preprocess``) -> normalised float, augmented.

    Each view of a sheet (members with their own inputs) is augmented on its own, so a flip
    or a shifted crop never moves pixels from one member's view into the other's."""
    views = list(preprocess.views) or [preprocess]
    boxes = preprocess.view_boxes()
    geometry = [_view_steps(v.input_size, flip, padding, jitter) for v in views]
    erase = T.RandomErasing(erasing, value=0) if erasing > 0 else None

    def apply(x: torch.Tensor) -> torch.Tensor:
        if len(views) == 1:
            x = geometry[0](x)
        else:
            x = x.clone()
            for steps, (height, left, width) in zip(geometry, boxes, strict=True):
                x[:, :height, left : left + width] = steps(x[:, :height, left : left + width])
        x = preprocess.normalise(x[None])[0]
        if erase is not None:
            for height, left, width in boxes:
                x[:, :height, left : left + width] = erase(x[:, :height, left : left + width])
        return x

    return apply


def _view_steps(size: tuple[int, int], flip: float, padding: int, jitter: float) -> T.Compose:
    steps: list[torch.nn.Module] = []
    if flip > 0:
        steps.append(T.RandomHorizontalFlip(flip))
    if padding > 0:
        steps.append(T.RandomCrop(size, padding=padding, padding_mode="reflect"))
    if jitter > 0:
        steps.append(T.ColorJitter(jitter, jitter, jitter, 0.0))
    return T.Compose(steps)


class ImageDataset(Dataset):
    """Samples with integer labels; images decoded once and kept (uint8) when ``cache``."""

    def __init__(
        self,
        samples: Sequence[Sample],
        preprocess: Preprocess,
        transform=None,
        cache: bool = True,
        labels: dict[str, int] | None = None,
    ) -> None:
        self.samples = list(samples)
        self.preprocess = preprocess
        self.transform = transform
        self.labels = labels or {p: i for i, p in enumerate(sorted({s.identity for s in samples}))}
        self.targets = [self.labels.get(s.identity, -1) for s in self.samples]
        self._cache: dict[int, torch.Tensor] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.samples)

    def image(self, i: int) -> torch.Tensor:
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        img = load_uint8(self.samples[i].path, self.preprocess)
        if self._cache is not None:
            self._cache[i] = img
        return img

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.image(i)
        x = self.transform(img) if self.transform is not None else img
        return x, self.targets[i]


class PKSampler(Sampler[list[int]]):
    """Batches of P identities x K images each (with replacement when an identity has fewer
    than K), the batch structure that batch-hard triplet mining needs."""

    def __init__(
        self, targets: Sequence[int], p: int, k: int, batches: int = 0, seed: int = 0
    ) -> None:
        self.by_label: dict[int, list[int]] = defaultdict(list)
        for i, t in enumerate(targets):
            self.by_label[t].append(i)
        if len(self.by_label) < 2:
            raise DataError("the PK sampler needs at least 2 identities")
        self.p = min(p, len(self.by_label))
        self.k = k
        self.batches = batches or max(1, len(targets) // (self.p * k))
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[list[int]]:
        labels = sorted(self.by_label)
        for _ in range(self.batches):
            batch: list[int] = []
            for label in self.rng.sample(labels, self.p):
                pool = self.by_label[label]
                if len(pool) >= self.k:
                    batch += self.rng.sample(pool, self.k)
                else:
                    batch += [self.rng.choice(pool) for _ in range(self.k)]
            yield batch
