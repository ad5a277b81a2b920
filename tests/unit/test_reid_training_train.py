"""Short real training runs: the loss falls, held-out mAP rises, the checkpoints load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reid.evaluation.evaluate import load_checkpoint, model_for_config, run_eval
from reid.training.config import config_from_dict
from reid.training.data import load_split
from reid.training.train import Trainer
from reid.weights import load_ensemble
from tests.conftest import ZEBRA_DIR, full_zebra_dir


def zebra_config(tmp: Path, root: Path, **train) -> dict:
    return {
        "name": "ci-zebra",
        "output_dir": str(tmp),
        # z7 and z10 (the zebras seen in two bursts) are always among the held-out ids.
        "data": {"root": str(root), "csv": "meta.csv", "camera_field": "encounter",
                 "test_identities": 8, "test_ids": ["z7", "z10"], "max_identities": 24,
                 "input_size": 64, "exclude_same_camera": False},
        "model": {"arch": "resnet18", "dim": 128},
        "augment": {"flip": 0.0, "color_jitter": 0.1},
        "train": {"epochs": 6, "p": 8, "k": 4, "lr": 2e-3, "threads": 2, "progress": False,
                  "eval_every": 0, **train},
    }  # fmt: skip


@pytest.fixture(scope="session")
def zebra_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("zebra-run")
    # Held-out mAP needs more animals than the subset in the repository has.
    cfg = config_from_dict(zebra_config(out, full_zebra_dir()))
    split = load_split(cfg.data)
    before = run_eval(model_for_config(cfg), split, exclude_same_camera=False, plots=False)
    trainer = Trainer(cfg, split)
    path = trainer.fit()
    return cfg, split, before, trainer, path


def test_zebra_training_lowers_loss_and_raises_held_out_map(zebra_run):
    cfg, split, before, trainer, path = zebra_run
    losses = [h["loss"] for h in trainer.history if "loss" in h]
    assert len(losses) == cfg.train.epochs
    assert losses[-1] < 0.85 * losses[0], losses
    after = trainer.history[-1]
    assert after["mAP"] > before["retrieval"]["mAP"] + 0.05, (before["retrieval"], after)
    # Held-out identities only: no test identity was trained on.
    assert not {s.identity for s in split.train} & {s.identity for s in split.query}
    log = [json.loads(x) for x in (path.parent / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == list(range(1, cfg.train.epochs + 1))
    assert (path.parent / "curves.png").stat().st_size > 1000


def test_single_checkpoint_reloads_for_eval(zebra_run, tmp_path):
    _, split, _, trainer, path = zebra_run
    em = load_checkpoint(path)
    assert em.kind == "single" and em.embedding_version == trainer.version
    assert em.embedding_version.startswith("trained-ci-zebra-")
    assert em.preprocess.input_size == (64, 64)
    result = run_eval(em, split, exclude_same_camera=False, out_dir=tmp_path, rerank=True)
    assert result["retrieval"]["mAP"] == pytest.approx(trainer.history[-1]["mAP"], abs=1e-6)
    for name in ("metrics.json", "ranked.png", "embedding_map.png", "threshold_sweep.png"):
        assert (tmp_path / name).stat().st_size > 100
    thresholds = [r["threshold"] for r in result["stream_sweep"]]
    assert thresholds == sorted(thresholds) and thresholds[0] == 0.0 and thresholds[-1] == 1.0


def test_resume_continues_where_it_stopped(tmp_path):
    # The repository's subset: 10 animals, 2 of them (z7, z10) held out.
    raw = zebra_config(tmp_path, ZEBRA_DIR, epochs=1, batches_per_epoch=2, p=4)
    raw["data"].update(max_identities=10, test_identities=2)
    first = Trainer(config_from_dict(raw))
    first.fit()
    raw["train"]["epochs"] = 2
    second = Trainer(config_from_dict(raw))
    second.resume()
    assert second.start_epoch == 1 and len(second.history) == 1
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values(),
                    strict=True):  # fmt: skip
        assert torch.equal(a.cpu(), b.cpu())
    second.fit()
    assert [h["epoch"] for h in second.history] == [1, 2]


def _generated_dataset(root: Path, identities: int = 6, per: int = 8) -> None:
    """Each identity a fixed random colour pattern; images are noisy shifted copies."""
    rng = np.random.default_rng(0)
    for who in range(identities):
        pattern = rng.integers(0, 256, size=(6, 6, 3)).astype(np.float32)
        folder = root / f"id{who}"
        folder.mkdir(parents=True)
        for i in range(per):
            img = np.kron(pattern, np.ones((8, 8, 1))) + rng.normal(0, 25, size=(48, 48, 3))
            img = np.roll(img, rng.integers(-4, 5), axis=1).clip(0, 255).astype(np.uint8)
            Image.fromarray(img).save(folder / f"{i}.png")


def test_generated_data_with_every_loss_and_sgd(tmp_path):
    _generated_dataset(tmp_path / "data")
    cfg = config_from_dict({
        "name": "gen", "output_dir": str(tmp_path / "out"),
        "data": {"root": str(tmp_path / "data"), "format": "folders", "test_identities": 2,
                 "input_size": 48},
        "model": {"arch": "mobilenet_v2", "dim": 64},
        "loss": {"triplet": 1.0, "triplet_mining": "semi_hard", "softmax": 0.5, "arcface": 0.5,
                 "center": 0.005, "contrastive": 1.0},
        "train": {"epochs": 4, "p": 4, "k": 4, "batches_per_epoch": 3, "optimizer": "sgd",
                  "lr": 0.02, "scheduler": "multistep", "milestones": [3], "threads": 2,
                  "progress": False},
    })  # fmt: skip
    trainer = Trainer(cfg)
    trainer.fit()
    losses = [h["loss"] for h in trainer.history if "loss" in h]
    assert set(trainer.history[0]["parts"]) == {
        "triplet", "softmax", "arcface", "center", "contrastive"}  # fmt: skip
    assert losses[-1] < losses[0], losses


def test_ensemble_checkpoint_is_a_stream_checkpoint(tmp_path):
    cfg = config_from_dict({
        "name": "ci-ens", "output_dir": str(tmp_path),
        "data": {"root": str(ZEBRA_DIR), "test_identities": 0, "max_identities": 4,
                 "input_size": 64},
        "model": {"arch": "stream_ensemble"},
        "train": {"epochs": 1, "p": 2, "k": 2, "batches_per_epoch": 1, "threads": 2,
                  "progress": False},
    })  # fmt: skip
    trainer = Trainer(cfg)
    path = trainer.fit()
    loaded = load_ensemble(path)
    assert loaded.source == "checkpoint" and loaded.embedding_version == trainer.version
    assert loaded.preprocess.input_size == (64, 64)
    raw = torch.load(path, weights_only=True)
    assert raw["meta"]["config"]["model"]["arch"] == "stream_ensemble"
    # Training-only parts stay out of the stream checkpoint.
    assert not any("neck" in k for k in raw["resnet"]) and not any(
        "neck" in k for k in raw["effnet"]
    )
    # Trained weights differ from the seeded structure they started from.
    trained = trainer.model.to_stream().state_dict()
    assert all(torch.equal(v, trained[f"resnet.{k}"]) for k, v in raw["resnet"].items())
