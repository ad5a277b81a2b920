"""The measurement helpers behind `reid-stream bench`: model throughput rows and the
half-precision comparison. No speed is asserted, only that the measurement is what it says."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from reid.embedder import Embedder, Embeddings
from reid.evaluation.precision import compare_embeddings, compare_precisions
from reid.evaluation.throughput import CPU_BACKENDS, PARTS, QUICK, model_throughput
from reid.matching import Gallery, assign_batch, l2_normalise
from reid.weights import build_seeded

SIZE = 64


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_seeded(0, calibrate=False).eval()  # structure and weights; speed is the point


def test_quick_run_returns_every_combination(model: torch.nn.Module) -> None:
    pytest.importorskip("onnxruntime")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = model_throughput(
        model, input_size=SIZE, batch_sizes=(1, 3), backends=CPU_BACKENDS, **QUICK
    )
    # One row per (backend, part, batch size), in that order, as the docstring promises.
    combos = [(r["backend"], r["part"], r["batch"]) for r in rows]
    assert combos == list(itertools.product(CPU_BACKENDS, PARTS, (1, 3)))
    for r in rows:
        assert r["device"] == "cpu" and r["precision"] == "fp32"
        assert r["iters"] >= 1 and r["seconds"] > 0
        assert math.isfinite(r["images_per_s"]) and r["images_per_s"] > 0
        assert r["images_per_s"] == pytest.approx(r["batch"] * r["iters"] / r["seconds"])
        assert r["ms_per_batch"] == pytest.approx(1000 * r["seconds"] / r["iters"])
        assert math.isfinite(r["images_per_s_median"]) and r["images_per_s_median"] > 0
    # The caller's model is measured on a copy: not moved, not changed.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training


def test_iterations_and_time_bounds_are_honoured(model: torch.nn.Module) -> None:
    one = {"input_size": SIZE, "backends": ["torch-cpu-fp32"], "parts": ["effnet"]}
    (row,) = model_throughput(model, batch_sizes=(2,), seconds=0.0, min_iters=3, warmup_iters=0,
                              **one)  # fmt: skip
    assert row["iters"] == 3  # no time bound: exactly min_iters
    # Of 3 iterations, two last at least the median one, so it is at most half the total.
    assert row["images_per_s_median"] >= 2 * 2 / row["seconds"]
    (row,) = model_throughput(model, batch_sizes=(1,), seconds=0.3, min_iters=1, warmup_iters=0,
                              **one)  # fmt: skip
    assert row["seconds"] >= 0.3 and row["iters"] >= 1


def test_measures_a_started_embedder_at_its_input_size(tmp_path: Path) -> None:
    emb = Embedder(device="cpu", hub_dir=tmp_path, input_size=SIZE)
    emb.start()
    calls: list[tuple[int, ...]] = []
    hook = emb._require().model.effnet.register_forward_hook(
        lambda _m, args, _o: calls.append(tuple(args[0].shape))
    )
    rows = model_throughput(emb, batch_sizes=(2,), backends=["torch-cpu-fp32"], parts=["effnet"],
                            **QUICK)  # fmt: skip
    hook.remove()
    assert [(r["part"], r["batch"]) for r in rows] == [("effnet", 2)]
    # The embedder's input size (the hook travels with the copy that ran).
    assert set(calls) == {(2, 3, SIZE, SIZE)}
    assert emb.embed(torch.zeros((1, 3, SIZE, SIZE), dtype=torch.uint8)).resnet.shape == (1, 512)


def test_bad_requests_are_refused(model: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="unknown backends"):
        model_throughput(model, input_size=SIZE, backends=["tensorrt"], **QUICK)
    with pytest.raises(ValueError, match="unknown parts"):
        model_throughput(model, input_size=SIZE, backends=["torch-cpu-fp32"], parts=["head"])
    with pytest.raises(TypeError):
        model_throughput(object(), input_size=SIZE)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            model_throughput(model, input_size=SIZE, backends=["torch-cuda-fp16"])


# -- half precision ----------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA answer")
def test_compare_precisions_without_cuda_is_skipped(tmp_path: Path) -> None:
    fp32 = Embedder(device="cpu", hub_dir=tmp_path, input_size=SIZE)
    images = torch.zeros((4, 3, SIZE, SIZE), dtype=torch.uint8)
    result = compare_precisions(fp32, None, images)
    assert result["skipped"].startswith("skipped: no CUDA")
    assert result["n"] == 4 and "cosine" not in result
    assert not fp32.started  # nothing was run
    with pytest.raises(ValueError, match="only supported on cuda"):
        Embedder(device="cpu", precision="fp16")  # why there is no CPU half embedder


def clustered(n_deer: int, per_deer: int, spread: float, seed: int) -> Embeddings:
    rng = np.random.default_rng(seed)
    centres_r = rng.standard_normal((n_deer, 512))
    centres_e = rng.standard_normal((n_deer, 512))
    ids = np.repeat(np.arange(n_deer), per_deer)
    rng.shuffle(ids)
    return Embeddings(
        resnet=l2_normalise(centres_r[ids] + spread * rng.standard_normal((len(ids), 512))),
        effnet=l2_normalise(centres_e[ids] + spread * rng.standard_normal((len(ids), 512))),
    )


def perturbed(e: Embeddings, noise: float, seed: int) -> Embeddings:
    rng = np.random.default_rng(seed)
    return Embeddings(
        resnet=l2_normalise(e.resnet + noise * rng.standard_normal(e.resnet.shape)),
        effnet=l2_normalise(e.effnet + noise * rng.standard_normal(e.effnet.shape)),
    )


def test_identical_embeddings_agree_completely() -> None:
    e = clustered(3, 4, spread=0.8, seed=0)
    result = compare_embeddings(e, e)
    assert result["n"] == 12
    for stats in result["cosine"].values():
        assert stats["min"] == pytest.approx(1.0, abs=1e-6)
        assert stats["mean"] == pytest.approx(1.0, abs=1e-6)
    assert result["assignment_agreement"] == 1.0 and result["disagreements"] == []
    # 3 animals, 4 sightings each, well apart: the rule finds 3 deer.
    assert result["new_deer"] == {"reference": 3, "other": 3}


def test_cosine_statistics_and_disagreements_are_computed_per_detection() -> None:
    ref = clustered(4, 5, spread=0.8, seed=1)
    small, large = perturbed(ref, 0.001, seed=2), perturbed(ref, 0.2, seed=3)
    mild = compare_embeddings(ref, small)
    cos = np.sum(ref.resnet * small.resnet, axis=1)
    assert mild["cosine"]["resnet"]["min"] == pytest.approx(float(cos.min()), rel=1e-6)
    assert mild["cosine"]["resnet"]["mean"] == pytest.approx(float(cos.mean()), rel=1e-6)
    assert mild["cosine"]["resnet"]["p1"] == pytest.approx(float(np.percentile(cos, 1)), rel=1e-6)
    assert 0.999 < mild["cosine"]["resnet"]["min"] < 1.0
    assert mild["assignment_agreement"] == 1.0

    # Noise of 0.2 per dimension swamps the signal: decisions change, and the reported
    # disagreements are exactly the detections whose decisions differ.
    bad = compare_embeddings(ref, large)
    assert bad["cosine"]["effnet"]["mean"] < 0.5
    a = assign_batch(ref.resnet, ref.effnet, Gallery.empty())
    b = assign_batch(large.resnet, large.effnet, Gallery.empty())
    differ = [
        i
        for i, (x, y) in enumerate(zip(a.matches, b.matches, strict=True))
        if (x.deer_id, x.new_deer) != (y.deer_id, y.new_deer)
    ]
    assert differ and bad["disagreements"] == differ
    assert bad["assignment_agreement"] == pytest.approx(1 - len(differ) / 20)


def test_agreement_against_a_gallery() -> None:
    ref = clustered(3, 3, spread=0.5, seed=4)
    gallery = Gallery(
        deer_ids=np.array([101, 102, 103]),
        resnet=ref.resnet[:3],
        effnet=ref.effnet[:3],
        sightings=np.ones(3, dtype=np.int64),
    )
    result = compare_embeddings(ref, perturbed(ref, 0.001, seed=5), gallery=gallery)
    assert result["assignment_agreement"] == 1.0
    with pytest.raises(ValueError):
        compare_embeddings(ref, clustered(1, 2, 0.5, seed=6))
