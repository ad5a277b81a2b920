import hashlib
import logging
import os
import re
from pathlib import Path

import pytest
import torch
from torchvision.models import efficientnet_b0, resnet50

from reid.backbones import Ensemble
from reid.calibration import calibration_images
from reid.preprocess import Preprocess
from reid.weights import (
    CHECKPOINT_FORMAT,
    WeightsError,
    build_seeded,
    load_ensemble,
    save_checkpoint,
)

RESNET_FILE = "resnet50-11ad3fa6.pth"  # ResNet50_Weights.IMAGENET1K_V2
EFFNET_FILE = "efficientnet_b0_rwightman-7f5810bc.pth"  # EfficientNet_B0_Weights.IMAGENET1K_V1


@pytest.fixture(scope="module")
def seeded7() -> Ensemble:
    return build_seeded(7)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, seeded7: Ensemble) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "ensemble.pt"
    save_checkpoint(
        path,
        seeded7,
        embedding_version="deer-test-v3",
        preprocess=Preprocess(input_size=(96, 80)),
        meta={"trained_on": "unit-test", "epochs": 0, "map": [0.1, None]},
    )
    return path


def _states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _rewrite(src: Path, dst: Path, edit) -> Path:
    payload = torch.load(src, map_location="cpu", weights_only=True)
    edit(payload)
    torch.save(payload, dst)
    return dst


def test_checkpoint_round_trip(checkpoint: Path, seeded7: Ensemble, tmp_path: Path) -> None:
    loaded = load_ensemble(checkpoint, seed=0, hub_dir=tmp_path)
    assert loaded.source == "checkpoint"
    assert loaded.embedding_version == "deer-test-v3"
    assert loaded.preprocess == Preprocess(input_size=(96, 80))
    # seed=0 only builds the structure; every tensor comes from the seed-7 checkpoint.
    assert _states_equal(loaded.model, seeded7)
    assert not _states_equal(loaded.model, build_seeded(0, calibrate=False))
    assert not list(checkpoint.parent.glob("*.tmp"))  # the temp file was renamed away


def test_seeded_build_is_reproducible_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = build_seeded(3)
    assert torch.equal(torch.rand(3), expected)
    assert _states_equal(a, build_seeded(3))
    assert not _states_equal(a, build_seeded(4, calibrate=False))


def test_seeded_init_is_calibrated_not_degenerate(seeded7: Ensemble) -> None:
    # Uncalibrated, EfficientNet's eval-mode features shrink to ~1e-14 (its output is the
    # projection bias for every image) and ResNet cosines sit at 0.85-1.0 for any two images.
    model = seeded7.eval()
    g = torch.Generator().manual_seed(99)
    noise = calibration_images(12345, n=4)  # another seed than the calibration set's
    two_random = torch.randn(2, 3, 224, 224, generator=g)
    with torch.no_grad():
        _, effnet = model(two_random)
        resnet, effnet_noise = model(noise)
    assert float(effnet[0] @ effnet[1]) < 0.999
    iu = torch.triu_indices(4, 4, offset=1)
    cos_r = (resnet @ resnet.T)[iu[0], iu[1]]
    cos_e = (effnet_noise @ effnet_noise.T)[iu[0], iu[1]]
    assert float(cos_e.max()) < 0.999
    assert float((0.6 * cos_r + 0.4 * cos_e).mean()) < 0.5
    # BatchNorm statistics were re-estimated, with eval mode and the default momentum restored.
    bn = model.effnet.trunk.features[0][1]
    assert not bn.training and bn.momentum == 0.1
    assert not torch.equal(bn.running_var, torch.ones_like(bn.running_var))


def test_seeded_fallback_warns_loudly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="reid.weights"):
        loaded = load_ensemble(seed=5, hub_dir=tmp_path)
    assert loaded.source == "seeded"
    assert loaded.embedding_version == "seed5-msr50+effb0-calib-v2"
    text = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "NOT meaningful" in text
    assert "weights_path" in text


def test_missing_key_is_named(checkpoint: Path, tmp_path: Path) -> None:
    bad = _rewrite(checkpoint, tmp_path / "missing.pt", lambda p: p["effnet"].pop("proj.weight"))
    with pytest.raises(WeightsError, match=r"missing\.pt.*effnet.*proj\.weight"):
        load_ensemble(bad)


def test_shape_mismatch_is_named(checkpoint: Path, tmp_path: Path) -> None:
    def edit(p: dict) -> None:
        p["resnet"]["proj_l2.weight"] = torch.zeros(128, 100)
        p["resnet"]["extra.weight"] = torch.zeros(1)

    bad = _rewrite(checkpoint, tmp_path / "shape.pt", edit)
    with pytest.raises(WeightsError) as info:
        load_ensemble(bad)
    message = str(info.value)
    assert "shape.pt" in message
    assert "proj_l2.weight (128, 100) != (128, 8192)" in message
    assert "extra.weight" in message


@pytest.mark.parametrize(
    ("field", "value", "pattern"),
    [
        ("format", "something-else/9", "format"),
        ("embedding_version", "", "embedding_version"),
        ("preprocess", {"input_size": [0, 5]}, "preprocess"),
    ],
)
def test_bad_header_fields(
    checkpoint: Path, tmp_path: Path, field: str, value: object, pattern: str
) -> None:
    bad = _rewrite(checkpoint, tmp_path / "header.pt", lambda p: p.__setitem__(field, value))
    with pytest.raises(WeightsError, match=pattern):
        load_ensemble(bad)


def test_corrupted_file(checkpoint: Path, tmp_path: Path) -> None:
    data = checkpoint.read_bytes()
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(WeightsError, match=r"corrupt\.pt"):
        load_ensemble(bad)
    with pytest.raises(WeightsError, match="does not exist"):
        load_ensemble(tmp_path / "absent.pt")


def _touch(path: str) -> None:
    Path(path).write_text("pwned")


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (_touch, (self.marker,))


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "embedding_version": "x",
            "resnet": _Payload(marker),
            "effnet": {},
            "preprocess": {},
            "meta": {},
        },
        evil,
    )
    with pytest.raises(WeightsError, match="weights_only"):
        load_ensemble(evil)
    assert not marker.exists()


def test_save_refuses_meta_that_cannot_be_loaded_back(seeded7: Ensemble, tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        save_checkpoint(
            tmp_path / "x.pt",
            seeded7,
            embedding_version="v",
            preprocess=Preprocess(),
            meta={"path": Path("/tmp")},
        )
    assert not list(tmp_path.iterdir())


def test_torchvision_cache_is_used_only_with_both_trunks(tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    torch.manual_seed(11)
    resnet_state = resnet50(weights=None).state_dict()
    torch.save(resnet_state, checkpoints / RESNET_FILE)

    only_one = load_ensemble(seed=2, hub_dir=tmp_path)
    assert only_one.source == "seeded"

    effnet_state = efficientnet_b0(weights=None).state_dict()
    torch.save(effnet_state, checkpoints / EFFNET_FILE)
    loaded = load_ensemble(seed=2, hub_dir=tmp_path)
    assert loaded.source == "torchvision-cache"
    digest = hashlib.sha256(
        (checkpoints / RESNET_FILE).read_bytes() + (checkpoints / EFFNET_FILE).read_bytes()
    ).hexdigest()[:12]
    assert loaded.embedding_version == f"imagenet-{digest}-seed2"

    trunk = loaded.model.resnet.trunk.state_dict()
    assert torch.equal(trunk["conv1.weight"], resnet_state["conv1.weight"])
    assert torch.equal(trunk["layer4.2.bn3.running_var"], resnet_state["layer4.2.bn3.running_var"])
    eff = loaded.model.effnet.trunk.state_dict()
    assert torch.equal(eff["features.0.0.weight"], effnet_state["features.0.0.weight"])
    # Heads come from the seeded initialisation.
    heads = build_seeded(2, calibrate=False)
    assert torch.equal(loaded.model.resnet.proj_l2.weight, heads.resnet.proj_l2.weight)
    assert torch.equal(loaded.model.effnet.proj.weight, heads.effnet.proj.weight)


def test_corrupt_cached_trunk_is_an_error(tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / RESNET_FILE).write_bytes(os.urandom(256))
    (checkpoints / EFFNET_FILE).write_bytes(os.urandom(256))
    with pytest.raises(WeightsError, match=re.escape(RESNET_FILE)):
        load_ensemble(hub_dir=tmp_path)
