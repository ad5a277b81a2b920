"""INT8 quantisation and its measurement, on a tiny two-output conv net (the real ensemble's
figures are a benchmark: `reid-stream bench --sections int8`, docs/BENCHMARKS.md)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime")

from reid.evaluation.int8 import MIN_AGREEMENT, MIN_COSINE, MIN_SPEEDUP, compare_int8
from reid.onnx_backend import OnnxSession, export_onnx
from reid.onnx_int8 import INT8_FORMAT, int8_path, quantize_int8
from reid.preprocess import Preprocess

SIZE = (32, 32)


class TwoHeads(nn.Module):
    """Conv trunk, two L2-able heads: the ensemble's interface (images -> resnet, effnet)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.a = nn.Linear(32, 16)
        self.b = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(x)
        return self.a(h), self.b(h)


def crops(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    # Smooth images (upsampled noise) rather than white noise: closer to photos.
    small = torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8).float()
    return nn.functional.interpolate(small, size=SIZE, mode="bilinear").to(torch.uint8)


def test_quantised_model_runs_and_stays_close_to_fp32(tmp_path: Path) -> None:
    model = TwoHeads().eval()
    fp32 = tmp_path / "m.onnx"
    export_onnx(model, fp32, SIZE)
    x = Preprocess(input_size=SIZE).normalise(crops(24)).numpy()
    out = quantize_int8(fp32, int8_path(fp32), x[:16])
    assert out.name == f"m-{INT8_FORMAT}.onnx" and out.is_file()
    # Nothing left behind but the two models.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.onnx", out.name])
    ref, got = OnnxSession(fp32).run(x), OnnxSession(out).run(x)
    assert [a.shape for a in got] == [a.shape for a in ref]
    for a, b in zip(ref, got, strict=True):
        cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        assert cos.min() > 0.9  # 8-bit, not garbage
        assert not np.allclose(a, b)  # and really quantised
    with pytest.raises(ValueError, match="calibration"):
        quantize_int8(fp32, tmp_path / "x.onnx", x[0])


def test_compare_int8_reports_speed_agreement_and_a_verdict() -> None:
    fake = SimpleNamespace(
        _require=lambda: SimpleNamespace(model=TwoHeads().eval(),
                                         preprocess=Preprocess(input_size=SIZE))
    )  # fmt: skip
    result = compare_int8(
        fake,
        crops(40),
        calibration=10,
        batch_sizes=(1, 8),
        stream_batch=8,
        seconds=0.0,  # type: ignore[arg-type]
    )
    assert (result["calibration_crops"], result["evaluated_crops"]) == (10, 30)
    assert [r["batch"] for r in result["speed"]] == [1, 8]
    for row in result["speed"]:
        assert row["speedup"] == pytest.approx(row["int8_images_per_s"] / row["fp32_images_per_s"])
    assert 0.0 <= result["assignment_agreement"] <= 1.0
    assert -1.0 <= result["worst_cosine"] <= 1.0
    # The verdict is the three checks, each from the figures above.
    speed8 = result["speed"][1]["speedup"]
    assert list(result["checks"].values()) == [
        speed8 >= MIN_SPEEDUP,
        result["worst_cosine"] >= MIN_COSINE,
        result["assignment_agreement"] >= MIN_AGREEMENT,
    ]
    assert result["adopt"] == all(result["checks"].values())
    with pytest.raises(ValueError, match="calibration"):
        compare_int8(fake, crops(5), calibration=5)  # type: ignore[arg-type]
