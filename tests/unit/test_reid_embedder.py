import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from reid.embedder import Embedder
from reid.preprocess import Preprocess
from reid.weights import build_seeded, save_checkpoint

REPO = Path(__file__).resolve().parents[2]

# Run in a fresh interpreter: determinism must hold across processes, not just within one.
_EMBED_SCRIPT = """
import sys
import numpy as np
import torch
from reid.embedder import Embedder

seed, hub_dir, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
emb = Embedder(seed=seed, device="cpu", hub_dir=hub_dir)
emb.start()
g = torch.Generator().manual_seed(1234)
batch = torch.randint(0, 256, (3, 3, 112, 112), generator=g, dtype=torch.uint8)
result = emb.embed(batch)
np.save(out + ".resnet.npy", result.resnet)
np.save(out + ".effnet.npy", result.effnet)
print(emb.embedding_version)
"""


def _batch(n: int, size: int = 96, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


@pytest.fixture(scope="module")
def embedder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Embedder]:
    emb = Embedder(seed=0, device="cpu", hub_dir=tmp_path_factory.mktemp("empty-hub"))
    emb.start()
    yield emb
    emb.stop()


def test_embed_shapes_norms_and_one_pass_per_backbone(embedder: Embedder) -> None:
    model = embedder._require().model
    calls: list[str] = []
    hooks = [
        model.resnet.register_forward_hook(lambda *_: calls.append("resnet")),
        model.effnet.register_forward_hook(lambda *_: calls.append("effnet")),
    ]
    try:
        out = embedder.embed(_batch(5))
    finally:
        for h in hooks:
            h.remove()
    assert sorted(calls) == ["effnet", "resnet"]
    for arr in (out.resnet, out.effnet):
        assert arr.shape == (5, 512)
        assert arr.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(arr, axis=1), 1.0, atol=1e-5)
    assert embedder.source == "seeded"
    assert embedder.embedding_version == "seed0-msr50+effb0-calib-v2"
    assert embedder.device == "cpu"
    assert embedder.preprocess == Preprocess()


def test_list_input_equals_stacked_tensor(embedder: Embedder) -> None:
    batch = _batch(3, seed=4)
    a = embedder.embed(batch)
    b = embedder.embed([batch[0], batch[1], batch[2]])
    np.testing.assert_array_equal(a.resnet, b.resnet)
    np.testing.assert_array_equal(a.effnet, b.effnet)


def test_empty_batch_skips_the_model(embedder: Embedder) -> None:
    model = embedder._require().model
    called: list[int] = []
    hook = model.resnet.register_forward_hook(lambda *_: called.append(1))
    try:
        for empty in (torch.zeros((0, 3, 96, 96), dtype=torch.uint8), []):
            out = embedder.embed(empty)
            assert out.resnet.shape == (0, 512) and out.effnet.shape == (0, 512)
            assert out.resnet.dtype == np.float32
    finally:
        hook.remove()
    assert called == []


def test_embed_rejects_float_input(embedder: Embedder) -> None:
    with pytest.raises(ValueError, match="uint8"):
        embedder.embed(torch.zeros((1, 3, 96, 96)))


@pytest.mark.parametrize(
    ("device", "precision"), [("cpu", "fp16"), ("cpu", "bf16"), ("cpu", "fp8"), ("tpu", "auto")]
)
def test_invalid_configuration(device: str, precision: str) -> None:
    with pytest.raises((ValueError, RuntimeError)):
        Embedder(device=device, precision=precision)


def test_auto_precision_on_cpu_is_fp32() -> None:
    assert Embedder(device="cpu").precision == "fp32"


def test_lifecycle_guards(tmp_path: Path) -> None:
    emb = Embedder(device="cpu", hub_dir=tmp_path)
    with pytest.raises(RuntimeError, match="start"):
        emb.embed(_batch(1))
    with pytest.raises(RuntimeError):
        _ = emb.embedding_version
    emb.stop()  # stopping a stopped embedder is harmless


def test_checkpoint_round_trip_through_embedder(embedder: Embedder, tmp_path: Path) -> None:
    path = tmp_path / "deer.pt"
    save_checkpoint(
        path, build_seeded(7), embedding_version="deer-2025-06", preprocess=Preprocess()
    )
    from_ckpt = Embedder(weights_path=path, device="cpu", hub_dir=tmp_path)
    from_seed = Embedder(seed=7, device="cpu", hub_dir=tmp_path)
    from_ckpt.start()
    from_seed.start()
    batch = _batch(2, seed=9)
    a, b = from_ckpt.embed(batch), from_seed.embed(batch)
    c = embedder.embed(batch)  # seed 0
    assert from_ckpt.embedding_version == "deer-2025-06"
    assert from_ckpt.source == "checkpoint"
    np.testing.assert_array_equal(a.resnet, b.resnet)
    np.testing.assert_array_equal(a.effnet, b.effnet)
    assert not np.allclose(a.resnet, c.resnet, atol=1e-4)
    from_ckpt.stop()
    with pytest.raises(RuntimeError):
        from_ckpt.embed(batch)


def test_embeddings_are_identical_across_processes(tmp_path: Path) -> None:
    script = tmp_path / "embed.py"
    script.write_text(_EMBED_SCRIPT)
    hub = tmp_path / "hub"
    hub.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    runs = {"a": 0, "b": 0, "c": 1}
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(script), str(seed), str(hub), str(tmp_path / name)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, seed in runs.items()
    }
    versions = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 0, stderr
        versions[name] = stdout.strip()
    assert versions == {
        "a": "seed0-msr50+effb0-calib-v2",
        "b": "seed0-msr50+effb0-calib-v2",
        "c": "seed1-msr50+effb0-calib-v2",
    }

    def load(name: str, which: str) -> np.ndarray:
        return np.load(tmp_path / f"{name}.{which}.npy")

    for which in ("resnet", "effnet"):
        assert load("a", which).shape == (3, 512)
        np.testing.assert_array_equal(load("a", which), load("b", which))
        assert not np.allclose(load("a", which), load("c", which), atol=1e-4)
