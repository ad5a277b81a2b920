"""The embedder's GPU-path features, checked on the CPU: the padding ladder, chunking, the
warm-up sizes, torch.compile's wiring, and the tensor JPEG decoder against the PIL path."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import reid.embedder as embedder_module
from reid.embedder import Embedder, batch_ladder, padded_size
from reid.gpu_decode import decode_crops, jpeg_header
from reid.preprocess import ImageError, Preprocess, crop, decode_image
from reid.weights import LoadedEnsemble, load_ensemble
from tests.conftest import ZEBRA_DIR

SIZE = 64


def _batch(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, SIZE, SIZE), generator=g, dtype=torch.uint8)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedEnsemble:
    return load_ensemble(seed=0, hub_dir=tmp_path_factory.mktemp("hub"), input_size=SIZE)


@pytest.fixture()
def recorded(loaded: LoadedEnsemble, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Embedders built in the test share one loaded model, whose ResNet records the batch
    size of every forward pass (warm-up included)."""
    sizes: list[int] = []
    hook = loaded.model.resnet.register_forward_hook(
        lambda _m, args, _o: sizes.append(len(args[0]))
    )
    monkeypatch.setattr(embedder_module, "load_ensemble", lambda *a, **k: loaded)
    yield sizes
    hook.remove()


def started(**kwargs: object) -> Embedder:
    emb = Embedder(device="cpu", input_size=SIZE, **kwargs)  # type: ignore[arg-type]
    emb.start()
    return emb


def test_batch_ladder() -> None:
    assert batch_ladder(1) == (1,)
    assert batch_ladder(5) == (1, 5)
    assert batch_ladder(8) == (1, 8)
    assert batch_ladder(32) == (1, 8, 16, 32)
    assert batch_ladder(64) == (1, 8, 16, 32, 64)
    assert batch_ladder(100) == (1, 8, 16, 32, 64, 100)
    assert [padded_size(n, batch_ladder(32)) for n in (1, 2, 8, 9, 17, 32)] == [1, 8, 8, 16, 32, 32]
    with pytest.raises(ValueError):
        batch_ladder(0)


def test_padding_changes_no_real_row(recorded: list[int]) -> None:
    plain = started(pad_batches=False, max_batch=32)
    padded = started(pad_batches=True, max_batch=32)
    assert (plain.pad_batches, padded.pad_batches) == (False, True)
    recorded.clear()
    for n in (1, 3, 9, 20):
        batch = _batch(n, seed=n)
        a, b = plain.embed(batch), padded.embed(batch)
        assert b.resnet.shape == (n, 512) and b.effnet.shape == (n, 512)
        np.testing.assert_allclose(b.resnet, a.resnet, atol=2e-5)
        np.testing.assert_allclose(b.effnet, a.effnet, atol=2e-5)
    # The padded embedder ran the ladder sizes; the plain one ran the batches as they came.
    assert recorded == [1, 1, 3, 8, 9, 16, 20, 32]


def test_large_batches_are_chunked(recorded: list[int]) -> None:
    whole = started(pad_batches=False, max_batch=64)
    chunked = started(pad_batches=True, max_batch=4)
    assert chunked.batch_sizes == (1, 4)
    batch = _batch(10, seed=3)
    recorded.clear()
    a = whole.embed(batch)
    b = chunked.embed(batch)
    assert recorded == [10, 4, 4, 4]  # the last chunk of 2 is padded to 4
    assert b.resnet.shape == (10, 512)
    np.testing.assert_allclose(b.resnet, a.resnet, atol=2e-5)
    np.testing.assert_allclose(b.effnet, a.effnet, atol=2e-5)


def test_warm_up_sizes(recorded: list[int]) -> None:
    cpu = started(max_batch=32)
    assert recorded == [1]  # the CPU warms up the smallest size only
    assert cpu.pad_batches is False  # padding costs real compute on a CPU: off by default
    recorded.clear()
    started(max_batch=32, warmup_all_sizes=True, pad_batches=True)
    assert recorded == [1, 8, 16, 32]


def test_torch_compile_wiring(recorded: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiling the real ensemble takes minutes on these CPUs; check what is asked of it."""
    calls: list[dict[str, object]] = []

    def fake_compile(model: torch.nn.Module, **kwargs: object) -> torch.nn.Module:
        calls.append(kwargs)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    emb = started(torch_compile="on", max_batch=16)
    assert calls == [{"mode": "default", "dynamic": False}]  # "on" is "default" on a CPU
    assert emb.torch_compile == "default" and emb.pad_batches  # compiled: shapes stay few
    assert len(emb.embed(_batch(3))) == 3
    assert recorded[-1] == 8
    calls.clear()
    started(torch_compile="reduce-overhead")
    assert calls == [{"mode": "reduce-overhead", "dynamic": False}]
    calls.clear()
    plain = started()
    assert calls == [] and plain.torch_compile == "off"
    with pytest.raises(ValueError, match="torch_compile"):
        Embedder(torch_compile="fastest")


# -- the tensor decoder ------------------------------------------------------------------------


def zebra_files(n: int = 6) -> list[Path]:
    return sorted(ZEBRA_DIR.glob("z*/*.jpg"))[::11][:n]


def pil_path(data: bytes, bbox: list[float] | None, size: tuple[int, int]) -> torch.Tensor:
    return Preprocess(input_size=size).to_uint8(crop(decode_image(data), bbox))


def test_tensor_decode_matches_the_pil_path_on_real_photos() -> None:
    payloads = [p.read_bytes() for p in zebra_files()]
    # Inside every photo of the subset (the smallest is 467x256).
    boxes: list[list[float] | None] = [[12.4, 30.0, 300.6, 250.0], None] * 3
    out = decode_crops(payloads, boxes, (96, 128), device="cpu")
    assert out.errors == {} and out.index == list(range(6)) and out.cpu_fallbacks == 0
    assert out.images.shape == (6, 3, 96, 128) and out.images.dtype == torch.uint8
    ref = torch.stack([pil_path(d, b, (96, 128)) for d, b in zip(payloads, boxes, strict=True)])
    diff = (out.images.int() - ref.int()).abs()
    # Same crop, same antialiased bilinear resize: off by at most a rounding step or two.
    assert diff.float().mean() < 0.5 and diff.max() <= 4, (diff.float().mean(), diff.max())
    # ...and not trivially: another crop of the same photos is far from it.
    other = decode_crops(payloads, [[0, 0, 100, 100]] * 6, (96, 128), device="cpu")
    assert (other.images.int() - ref.int()).abs().float().mean() > 10


def _jpeg(mode: str, size: tuple[int, int] = (80, 60), **save: object) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 120 if mode == "L" else (200, 40, 90)[: len(mode)]).save(
        buf, format="JPEG", **save
    )
    return buf.getvalue()


def _with_declared_size(data: bytes, width: int, height: int) -> bytes:
    header = jpeg_header(data)
    assert header is not None
    i = data.index(bytes([0xFF, header.sof]))
    return data[: i + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + data[i + 9 :]


def test_tensor_decode_refuses_and_falls_back_like_the_cpu_path() -> None:
    real = zebra_files(1)[0].read_bytes()
    png = io.BytesIO()
    Image.new("RGB", (50, 40), "green").save(png, format="PNG")
    cases: list[tuple[bytes, list[float] | None]] = [
        (real, None),  # 0 fast path
        (real[:3000], None),  # 1 truncated
        (_with_declared_size(real, 60_000, 60_000), None),  # 2 header declares a bomb
        (real, [10, 10, 10, 40]),  # 3 zero-width box
        (real, [0, 0, 600, 100]),  # 4 box outside the 512-wide photo
        (png.getvalue(), [5, 5, 45, 35]),  # 5 not a JPEG: PIL path
        (_jpeg("L"), None),  # 6 greyscale JPEG: fast path, 3 channels out
        (_jpeg("CMYK"), None),  # 7 CMYK JPEG: PIL path
        (_jpeg("RGB", progressive=True), None),  # 8 progressive JPEG: fast path
        (b"", None),  # 9 empty
    ]
    out = decode_crops([c[0] for c in cases], [c[1] for c in cases], (32, 32), device="cpu")
    assert out.index == [0, 5, 6, 7, 8]
    assert {i: e.reason for i, e in out.errors.items()} == {
        1: "undecodable_image",
        2: "image_too_large",
        3: "bbox_invalid",
        4: "bbox_outside_image",
        9: "undecodable_image",
    }
    # Every refusal carries the reason the CPU path gives the same input.
    for i, err in out.errors.items():
        with pytest.raises(ImageError) as cpu:
            crop(decode_image(cases[i][0]), cases[i][1])
        assert cpu.value.reason == err.reason, i
    assert out.cpu_fallbacks == 4  # PNG, CMYK, truncated (no EOI), empty
    for k, i in enumerate(out.index):
        ref = pil_path(cases[i][0], cases[i][1], (32, 32))
        assert (out.images[k].int() - ref.int()).abs().float().mean() < 1.5, i


def test_tensor_decode_with_nothing_to_decode() -> None:
    out = decode_crops([b"nope"], [None], (32, 48), device="cpu")
    assert out.images.shape == (0, 3, 32, 48) and list(out.errors) == [0]
    with pytest.raises(ValueError, match="boxes"):
        decode_crops([b"x"], [], (32, 32), device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA fallback")
def test_cuda_request_without_cuda_runs_the_cpu_path() -> None:
    payloads = [p.read_bytes() for p in zebra_files(2)]
    out = decode_crops(payloads, [None, None], (48, 48), device="cuda")
    assert out.images.device.type == "cpu" and out.cpu_fallbacks == 2
    ref = torch.stack([pil_path(d, None, (48, 48)) for d in payloads])
    assert torch.equal(out.images, ref)  # exactly the PIL path


def test_jpeg_header_parser() -> None:
    assert jpeg_header(b"") is None and jpeg_header(b"\x89PNG\r\n\x1a\n") is None
    assert jpeg_header(b"\xff\xd8\xff\xda\x00\x02") is None  # scan before any frame
    assert jpeg_header(b"\xff\xd8\xff\xe0\x00\x01") is None  # impossible segment length
    header = jpeg_header(_jpeg("RGB", (77, 33)))
    assert header is not None and (header.width, header.height, header.components) == (77, 33, 3)
    progressive = jpeg_header(_jpeg("RGB", progressive=True))
    assert progressive is not None and progressive.sof == 0xC2


def test_settings_reach_the_embedder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from streams.app import build_embedder
    from streams.settings import load_settings

    for var in [v for v in os.environ if v.startswith("REID_")]:
        monkeypatch.delenv(var)
    default = build_embedder(load_settings())
    # REID_BACKEND=auto: onnxruntime on a CPU, PyTorch on CUDA.
    auto = "torch" if default.device.startswith("cuda") else "onnx"
    assert (default.backend, default.torch_compile, default.max_batch) == (auto, "off", 32)
    assert default.pad_batches == (default.device != "cpu")  # auto: on CUDA only
    monkeypatch.setenv("REID_BACKEND", "onnx")
    monkeypatch.setenv("REID_ONNX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("REID_PAD_BATCHES", "on")
    monkeypatch.setenv("REID_BATCH_MAX_SIZE", "48")
    emb = build_embedder(load_settings())
    assert (emb.backend, emb.device, emb.pad_batches) == ("onnx", "cpu", True)
    assert emb.batch_sizes == (1, 8, 16, 32, 48)
    assert emb._onnx_cache_dir == tmp_path
    monkeypatch.setenv("REID_BACKEND", "torch")
    monkeypatch.setenv("REID_ONNX_CACHE_DIR", "")
    monkeypatch.setenv("REID_PAD_BATCHES", "off")
    for given, mode in (("true", "on"), ("0", "off"), ("reduce-overhead", "reduce-overhead")):
        monkeypatch.setenv("REID_TORCH_COMPILE", given)
        s = load_settings()
        assert s.torch_compile == mode and s.onnx_cache_dir is None
    monkeypatch.setenv("REID_TORCH_COMPILE", "true")
    compiled = build_embedder(load_settings())
    assert compiled.torch_compile == ("max-autotune" if compiled.device != "cpu" else "default")
    assert compiled.pad_batches is False  # an explicit "off" wins over the compile default
