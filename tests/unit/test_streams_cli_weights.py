"""`reid-stream weights`: pull through a loopback mirror named by REID_WEIGHTS_BASE_URL,
list, verify and a checkpoint that the stream's loader runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from reid.weights import load_ensemble
from streams.cli import main
from tests.http_mirror import publish, serve


@pytest.fixture
def caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return tmp_path


def test_pull_list_verify_and_checkpoint(caches: Path, monkeypatch, capsys) -> None:
    pytest.importorskip("timm")
    import timm

    # A randomly initialised DINOv2 ViT-S stands in for the published file: same names, and
    # published at 518 px as DINOv2 is, so its position embedding must be resampled to 224.
    published = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0,
                                  img_size=518)  # fmt: skip
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0,
                            img_size=224)  # fmt: skip
    from timm.models.vision_transformer import checkpoint_filter_fn

    vit.load_state_dict(checkpoint_filter_fn(published.state_dict(), vit))
    root = caches / "mirror"
    repo = "timm/vit_small_patch14_dinov2.lvd142m/resolve/main"
    publish(root, f"{repo}/config.json", b'{"architecture": "vit_small_patch14_dinov2"}')
    # Served under the published name; the loader reads .safetensors, so publish a real one.
    from safetensors.torch import save_file

    save_file(published.state_dict(), str(root / repo / "model.safetensors"))
    with serve(root) as base:
        monkeypatch.setenv("REID_WEIGHTS_BASE_URL", base)
        assert main(["weights", "pull", "dinov2-s", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "embedding_version pretrained-dinov2-s-" in out

    assert main(["weights", "list", "--json"]) == 0
    rows = {r["name"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert rows["dinov2-s"]["present"] and not rows["imagenet"]["present"]
    assert rows["dinov2-s"]["embedding_version"].startswith("pretrained-dinov2-s-")
    assert all(f["check"] == "recorded" for f in rows["dinov2-s"]["files"])

    assert main(["weights", "verify", "dinov2-s"]) == 0
    assert "0 mismatch" in capsys.readouterr().out

    ckpt = caches / "dino.pt"
    assert main(["weights", "checkpoint", "dinov2-s", "--out", str(ckpt)]) == 0
    version = capsys.readouterr().out.split()[-1]
    assert version == rows["dinov2-s"]["embedding_version"]
    loaded = load_ensemble(ckpt)
    assert loaded.embedding_version == version and loaded.model.shared
    x = loaded.preprocess.normalise(torch.randint(0, 255, (2, 3, 224, 224), dtype=torch.uint8))
    with torch.inference_mode():
        first, second = loaded.model.eval()(x)
        trunk = vit.eval()(x)
    assert torch.equal(first, second)
    # An untrained projection keeps the trunk's cosines (384 orthonormal columns in 512).
    cos = torch.nn.functional.cosine_similarity
    assert abs(float(cos(first[:1], first[1:])) - float(cos(trunk[:1], trunk[1:]))) < 1e-4

    # A changed file is caught.
    blob = next((caches / "hf" / "hub").rglob("model.safetensors"))
    blob.write_bytes(blob.read_bytes()[:-4] + b"XXXX")
    assert main(["weights", "verify", "dinov2-s"]) == 1


def test_pull_without_network_fails_in_one_line(caches: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("REID_WEIGHTS_BASE_URL", "http://127.0.0.1:9")
    assert main(["weights", "pull", "megadescriptor-t", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "by hand" in err and "models--BVRA--MegaDescriptor-T-224" in err
