"""`reid-train --config FILE`: fine-tune a re-identification model on labelled animals.

Outputs in `output_dir`:
- `model.pt`: for `model.arch = "stream_ensemble"` a `reid-ensemble/1` checkpoint written by
  `reid.weights.save_checkpoint`, loaded as is by `reid-stream run|replay`
  (REID_WEIGHTS_PATH); embedding_version `trained-<name>-<sha12 of the weights>`, the
  Preprocess (input size, normalisation) and the resolved config in `meta`. For single
  backbones a `reid-single/1` checkpoint for `reid-eval` (not the stream), written by
  `reid.weights.save_single_checkpoint` (both formats are described there).
- `last.pt`: the training state after each epoch (`--resume` continues from it).
- `metrics.jsonl`: one line per epoch (loss and its parts, learning rate, time, and held-out
  rank-1/mAP/mINP on evaluation epochs); `curves.png` from it.

Held-out evaluation during training is `reid-eval`'s own run (`reid.evaluation.evaluate`), so
the numbers in `metrics.jsonl` are the numbers `reid-eval` gives for the same model and split.

The training-only parts (classifiers, ArcFace weights, centres, the members' BNNeck) are in
`last.pt` but never in the stream checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from reid.evaluation.evaluate import EvalModel, run_eval
from reid.training.config import Config, ConfigError, load_config, parse_overrides
from reid.training.data import ImageDataset, PKSampler, Split, load_split, train_transform
from reid.training.losses import ReIDLoss
from reid.training.models import EnsembleModel, build_model, input_preprocess
from reid.weights import save_checkpoint, save_single_checkpoint

log = logging.getLogger(__name__)


def members(model: nn.Module) -> dict[str, int]:
    """Embedding member name -> dimension (what the losses are built for)."""
    if isinstance(model, EnsembleModel):
        return {"resnet": model.resnet.dim, "effnet": model.effnet.dim}
    return {"embedding": model.dim}


def build_optimizer(cfg: Config, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, nesterov=True
        )
    return torch.optim.Adam(
        params, lr=t.lr, weight_decay=t.weight_decay, amsgrad=t.optimizer == "amsgrad"
    )


def lr_factor(cfg: Config, epoch: int) -> float:
    """Learning-rate multiplier for ``epoch`` (0-based): linear warm-up, then the schedule."""
    t = cfg.train
    if epoch < t.warmup_epochs:
        return (epoch + 1) / (t.warmup_epochs + 1)
    if t.scheduler == "cosine":
        span = max(1, t.epochs - t.warmup_epochs)
        return 0.5 * (1 + math.cos(math.pi * (epoch - t.warmup_epochs) / span))
    if t.scheduler == "multistep":
        return t.gamma ** sum(epoch >= m for m in t.milestones)
    return 1.0


def weights_digest(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


class Trainer:
    """The engine: `fit()` runs the epochs; subclasses may override `train_step`."""

    def __init__(self, cfg: Config, split: Split | None = None) -> None:
        self.cfg = cfg
        t = cfg.train
        if t.threads:
            torch.set_num_threads(t.threads)
        random.seed(t.seed)
        np.random.seed(t.seed)
        torch.manual_seed(t.seed)
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if t.device == "auto" else t.device
        )
        self.split = split if split is not None else load_split(cfg.data)
        if not self.split.train:
            raise ConfigError("no training images: check data.root and data.test_identities")
        self.preprocess = input_preprocess(cfg.model, cfg.data)
        a = cfg.augment
        self.dataset = ImageDataset(
            self.split.train,
            self.preprocess,
            train_transform(
                self.preprocess, a.flip, a.crop_padding, a.color_jitter, a.random_erasing
            ),
            cache=cfg.data.cache_images,
        )
        self.sampler = PKSampler(self.dataset.targets, t.p, t.k, t.batches_per_epoch, t.seed)
        self.loader = DataLoader(
            self.dataset, batch_sampler=self.sampler, num_workers=cfg.data.workers
        )
        self.model = build_model(cfg.model, cfg.data).to(self.device)
        classes = len(self.dataset.labels)
        self.losses = nn.ModuleDict(
            {name: ReIDLoss(cfg.loss, dim, classes) for name, dim in members(self.model).items()}
        ).to(self.device)
        params = [p for m in (self.model, self.losses) for p in m.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(cfg, params)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda e: lr_factor(cfg, e)
        )
        self.amp = t.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.out_dir = Path(cfg.output_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.history: list[dict[str, Any]] = []
        self.start_epoch = 0

    def train_step(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[float, dict[str, float]]:
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
            out = self.model(images)
            total = torch.zeros((), device=self.device)
            parts: dict[str, float] = {}
            for name, loss in self.losses.items():
                value, p = loss(out[name], labels)
                total = total + value
                for k, v in p.items():
                    parts[k] = parts.get(k, 0.0) + v
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(total.detach()), parts

    def evaluate(self) -> dict[str, Any]:
        em = EvalModel(self.model, self.preprocess, "training", self._kind())
        result = run_eval(
            em,
            self.split,
            exclude_same_camera=self.cfg.data.exclude_same_camera,
            device=str(self.device),
        )
        self.model.train()
        return {
            **{k: result["retrieval"][k] for k in ("rank1", "mAP", "mINP")},
            "stream_accuracy": result["stream"]["accuracy"],
        }

    def _kind(self) -> str:
        return "ensemble" if isinstance(self.model, EnsembleModel) else "single"

    def fit(self) -> Path:
        t = self.cfg.train
        log_path = self.out_dir / "metrics.jsonl"
        if t.eval_every and self.start_epoch == 0 and self.split.query:
            self._log(log_path, {"epoch": 0, **self.evaluate()})
        for epoch in range(self.start_epoch, t.epochs):
            self.model.train()
            self.losses.train()
            t0 = time.perf_counter()
            bar = tqdm(
                self.loader,
                desc=f"epoch {epoch + 1}/{t.epochs}",
                total=len(self.sampler),
                unit="batch",
                disable=not (t.progress and sys.stderr.isatty()),
            )
            losses, parts_sum = [], {}
            for images, labels in bar:
                loss, parts = self.train_step(images.to(self.device), labels.to(self.device))
                losses.append(loss)
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + v
                bar.set_postfix(loss=f"{np.mean(losses):.4f}")
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "loss": float(np.mean(losses)),
                "parts": {k: v / len(losses) for k, v in parts_sum.items()},
                "lr": self.optimizer.param_groups[0]["lr"],
                "seconds": round(time.perf_counter() - t0, 2),
            }
            self.scheduler.step()
            last = epoch + 1 == t.epochs
            if self.split.query and ((t.eval_every and (epoch + 1) % t.eval_every == 0) or last):
                record.update(self.evaluate())
            self._log(log_path, record)
            self._save_state(epoch + 1)
        return self.export()

    def _log(self, path: Path, record: dict[str, Any]) -> None:
        self.history.append(record)
        with path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        log.info("%s", record)

    def _save_state(self, epoch: int) -> None:
        state = {
            "epoch": epoch,
            "model": self.model.state_dict(),
            "losses": self.losses.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "sampler_rng": list(self.sampler.rng.getstate()[1]),
            "history": self.history,
            "config": self.cfg.to_dict(),
        }
        tmp = self.out_dir / "last.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(self.out_dir / "last.pt")

    def resume(self) -> None:
        path = self.out_dir / "last.pt"
        if not path.is_file():
            raise FileNotFoundError(f"--resume: {path} does not exist")
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.losses.load_state_dict(state["losses"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.sampler.rng.setstate((3, tuple(state["sampler_rng"]), None))
        self.history = list(state["history"])
        self.start_epoch = int(state["epoch"])
        log.info("resumed from %s at epoch %d", path, self.start_epoch)

    def export(self) -> Path:
        """Write `model.pt` (see the module docstring) and the curves; returns its path."""
        cfg = self.cfg
        path = self.out_dir / "model.pt"
        self.model.eval().cpu()
        meta = {
            "config": cfg.to_dict(),
            "history": self.history,
            "classes": len(self.dataset.labels),
            "train_images": len(self.dataset),
        }
        # The version names the members, so two architectures never share one.
        if isinstance(self.model, EnsembleModel):
            stream = self.model.to_stream()
            names = "+".join(m.name for m in self.model.members)
            version = f"trained-{cfg.name}-{names}-{weights_digest(stream)}"
            save_checkpoint(
                path, stream, embedding_version=version, preprocess=self.preprocess, meta=meta,
                members=self.model.members,
            )  # fmt: skip
        else:
            version = f"trained-{cfg.name}-{cfg.model.arch}-{weights_digest(self.model)}"
            save_single_checkpoint(
                path,
                self.model,
                model_config=cfg.to_dict()["model"],
                embedding_version=version,
                preprocess=self.preprocess,
                meta=meta,
            )
        self.model.to(self.device)
        self.version = version
        try:
            from reid.evaluation import plots

            plots.training_curves(self.history, self.out_dir / "curves.png")
        except ImportError:
            log.warning("matplotlib is not installed (pip install '.[train]'): no curves.png")
        log.info("wrote %s (%s)", path, version)
        return path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="reid-train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, type=Path, help="TOML config (see configs/)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.epochs=5",
    )
    p.add_argument("--resume", action="store_true", help="continue from output_dir/last.pt")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, parse_overrides(args.set))
        trainer = Trainer(cfg)
        if args.resume:
            trainer.resume()
        elif (trainer.out_dir / "metrics.jsonl").exists():
            (trainer.out_dir / "metrics.jsonl").unlink()
        path = trainer.fit()
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"reid-train: {exc}", file=sys.stderr)
        return 2
    print(f"{path} {trainer.version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
