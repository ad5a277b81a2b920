"""The ONNX Runtime backend: same embeddings as PyTorch, and a cache that never mixes models."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime")

from reid.embedder import Embedder
from reid.onnx_backend import (
    OnnxExportError,
    auto_backend,
    cache_path,
    default_cache_dir,
    export_onnx,
    load_or_export,
    weights_digest,
)
from reid.preprocess import crop, decode_image
from tests.conftest import ZEBRA_DIR

SIZE = 96  # small, and a multiple of 32 (the multi-scale pooling exports only then)


def zebra_crops(n: int = 6) -> list[Path]:
    return sorted(ZEBRA_DIR.glob("z*/*.jpg"))[::7][:n]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Embedder, Embedder]]:
    hub = tmp_path_factory.mktemp("empty-hub")
    cache = tmp_path_factory.mktemp("onnx-cache")
    ref = Embedder(seed=0, device="cpu", hub_dir=hub, input_size=SIZE)
    onnx = Embedder(seed=0, device="cpu", hub_dir=hub, input_size=SIZE, backend="onnx",
                    onnx_cache_dir=cache)  # fmt: skip
    ref.start()
    onnx.start()
    yield ref, onnx
    ref.stop()
    onnx.stop()


def real_batch(embedder: Embedder) -> torch.Tensor:
    tensors = []
    for path in zebra_crops():
        image = decode_image(path.read_bytes())
        w, h = image.size
        # The middle of the photo, where the flank is: a detection-like crop.
        tensors.append(embedder.preprocess.to_uint8(crop(image, [w * 0.1, h * 0.1, w * 0.9, h])))
    return torch.stack(tensors)


def test_onnx_embeddings_match_pytorch_on_real_crops(pair: tuple[Embedder, Embedder]) -> None:
    ref, onnx = pair
    assert (ref.backend, onnx.backend) == ("torch", "onnx")
    assert onnx.embedding_version == ref.embedding_version  # same model, same vectors
    batch = real_batch(ref)
    assert len(batch) == 6
    a, b = ref.embed(batch), onnx.embed(batch)
    for want, got in ((a.resnet, b.resnet), (a.effnet, b.effnet)):
        assert got.shape == (6, 512) and got.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        cosine = np.sum(want * got, axis=1)
        assert cosine.min() >= 0.9999, cosine
    # The rows are distinct images: a backend returning one row for all would fail above,
    # but make it explicit that the comparison is between different vectors.
    assert np.sum(a.resnet[0] * a.resnet[1]) < 0.9999


def test_onnx_single_image_and_chunked_batches(pair: tuple[Embedder, Embedder]) -> None:
    ref, onnx = pair
    batch = real_batch(ref)
    one = onnx.embed(batch[:1])
    np.testing.assert_allclose(one.resnet, onnx.embed(batch).resnet[:1], atol=1e-5)
    with pytest.raises(ValueError, match="ONNX model takes"):
        onnx.embed(torch.zeros((1, 3, SIZE + 32, SIZE + 32), dtype=torch.uint8))


def test_onnx_embedder_writes_its_file_in_the_cache(pair: tuple[Embedder, Embedder]) -> None:
    _, onnx = pair
    assert onnx.onnx_path is not None and onnx.onnx_path.is_file()
    assert onnx.onnx_path.name.startswith(f"{onnx.embedding_version}-{SIZE}x{SIZE}-")
    # Nothing but the finished file: the temporary export file was renamed, not left behind.
    assert [p.name for p in onnx.onnx_path.parent.iterdir()] == [onnx.onnx_path.name]


class TwoHeads(nn.Module):
    """A tiny two-output model: the cache logic does not depend on the ensemble."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.conv = nn.Conv2d(3, 4, 3)
            self.head = nn.Linear(4, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.conv(x).mean(dim=(2, 3))
        return f, self.head(f)


def test_cache_reuses_the_file_and_never_mixes_models(tmp_path: Path) -> None:
    size = (16, 16)
    model = TwoHeads(0).eval()
    s1, reused1 = load_or_export(model, cache_dir=tmp_path, embedding_version="v1",
                                 input_size=size)  # fmt: skip
    stat = s1.path.stat()
    s2, reused2 = load_or_export(model, cache_dir=tmp_path, embedding_version="v1",
                                 input_size=size)  # fmt: skip
    assert (reused1, reused2) == (False, True)
    assert s2.path == s1.path and s2.path.stat().st_mtime_ns == stat.st_mtime_ns
    # Another version, another size or other weights: another file.
    s3, reused3 = load_or_export(model, cache_dir=tmp_path, embedding_version="v2",
                                 input_size=size)  # fmt: skip
    s4, reused4 = load_or_export(model, cache_dir=tmp_path, embedding_version="v1",
                                 input_size=(24, 24))  # fmt: skip
    other = TwoHeads(1).eval()
    s5, reused5 = load_or_export(other, cache_dir=tmp_path, embedding_version="v1",
                                 input_size=size)  # fmt: skip
    assert not (reused3 or reused4 or reused5)
    assert len({s.path for s in (s1, s3, s4, s5)}) == 4
    assert len(list(tmp_path.glob("*.onnx"))) == 4
    # Each file runs its own model.
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        for session, module in ((s1, model), (s5, other)):
            want = module(x)
            for w, g in zip(want, session.run(x), strict=True):
                np.testing.assert_allclose(g, w.numpy(), atol=1e-5)
    assert not np.allclose(s1.run(x)[0], s5.run(x)[0], atol=1e-3)


def test_damaged_cache_file_is_exported_again(tmp_path: Path) -> None:
    model = TwoHeads(0).eval()
    path = cache_path(tmp_path, "v1", (16, 16), weights_digest(model))
    path.write_bytes(b"not an onnx file")
    session, reused = load_or_export(model, cache_dir=tmp_path, embedding_version="v1",
                                     input_size=(16, 16))  # fmt: skip
    assert not reused and session.path == path
    assert path.read_bytes() != b"not an onnx file"
    assert session.run(torch.zeros(2, 3, 16, 16))[1].shape == (2, 8)


def test_weights_digest_sees_values_not_layout() -> None:
    model = TwoHeads(0)
    digest = weights_digest(model)
    assert digest == weights_digest(TwoHeads(0).to(memory_format=torch.channels_last))
    with torch.no_grad():
        model.head.bias[0] += 1e-3
    assert weights_digest(model) != digest


def test_cache_path_is_a_safe_file_name(tmp_path: Path) -> None:
    path = cache_path(tmp_path, "../../etc/passwd v1", (224, 224), "ab" * 32)
    assert path.parent == tmp_path
    assert "/" not in path.name and " " not in path.name
    assert "224x224" in path.name and "abababab" in path.name


def test_default_cache_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "reid-stream" / "onnx"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path(os.path.expanduser("~")) / ".cache/reid-stream/onnx"


def test_export_refuses_sizes_the_pooling_cannot_export(tmp_path: Path) -> None:
    class Pool(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return nn.functional.adaptive_avg_pool2d(x, 4).flatten(1), x.mean(dim=(2, 3))

    export_onnx(Pool(), tmp_path / "ok.onnx", (16, 16))
    with pytest.raises(OnnxExportError, match="multiples of 32"):
        export_onnx(Pool(), tmp_path / "bad.onnx", (18, 18))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.onnx"]


def test_onnx_configuration_is_checked() -> None:
    with pytest.raises(ValueError, match="CPU only"):
        Embedder(device="cuda", backend="onnx")
    with pytest.raises(ValueError, match="torch_compile"):
        Embedder(backend="onnx", torch_compile="on")
    with pytest.raises(ValueError, match="backend"):
        Embedder(backend="tensorrt")
    # "auto" means the CPU for this backend, even where CUDA exists.
    assert Embedder(backend="onnx").device == "cpu"


def test_missing_onnxruntime_is_named_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name)
    )
    with pytest.raises(ValueError, match=r"pip install 'deer-reid-stream\[onnx\]'"):
        Embedder(backend="onnx")
    assert Embedder(backend="torch").backend == "torch"  # the default backend does not need it


def test_auto_backend_is_onnx_on_a_cpu_and_torch_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    assert auto_backend(torch.device("cpu")) == "onnx"
    assert auto_backend(torch.device("cuda")) == "torch"
    assert auto_backend(torch.device("cpu"), torch_compile="on") == "torch"
    assert Embedder(backend="auto", device="cpu").backend == "onnx"
    assert Embedder(backend="auto", device="cpu", torch_compile="on").backend == "torch"
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name)
    )
    assert auto_backend(torch.device("cpu")) == "torch"  # not installed: PyTorch, with a warning


def test_auto_backend_runs_pytorch_where_the_model_cannot_be_exported(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import reid.onnx_backend

    def cannot(*args, **kwargs):
        raise OnnxExportError("cannot export the model to ONNX at input size 80x80")

    monkeypatch.setattr(reid.onnx_backend, "load_or_export", cannot)
    auto = Embedder(seed=0, device="cpu", hub_dir=tmp_path, input_size=SIZE, backend="auto")
    auto.start()
    assert auto.backend == "torch" and auto.onnx_path is None
    assert len(auto.embed(torch.zeros((2, 3, SIZE, SIZE), dtype=torch.uint8))) == 2
    auto.stop()
    forced = Embedder(seed=0, device="cpu", hub_dir=tmp_path, input_size=SIZE, backend="onnx")
    with pytest.raises(OnnxExportError, match="80x80"):
        forced.start()  # asked for by name: the error stands
