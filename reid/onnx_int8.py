"""INT8 ONNX Runtime model of the ensemble: static quantisation calibrated on real crops.

The fp32 graph that ``reid.onnx_backend`` exports is quantised with ONNX Runtime's
``quantize_static``: weights per output channel (signed 8 bit), activations unsigned 8 bit
with ranges from a calibration pass over real, normalised crops (min-max). This CPU has AVX2
without VNNI, where ONNX Runtime's u8s8 kernels can overflow their 16-bit intermediate sums;
``reduce_range`` (7-bit weights) avoids that, as ONNX Runtime's documentation advises.

Whether the result is worth running is measured, not assumed: ``reid.evaluation.int8``
compares it with fp32 (speed, cosine, assignment decisions); see docs/BENCHMARKS.md.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from reid.onnx_backend import INPUT_NAME, require_onnxruntime

log = logging.getLogger(__name__)

# Part of a cached INT8 file's name next to the fp32 one: bump when the recipe changes.
INT8_FORMAT = "int8-qdq-u8s8-pc-rr-minmax-v1"


def quantize_int8(
    fp32_path: Path, out_path: Path, calibration: np.ndarray, *, batch: int = 8
) -> Path:
    """Write the INT8 model of ``fp32_path`` to ``out_path`` (atomically) and return it.

    ``calibration``: float32 [N, 3, H, W], normalised exactly as the model's input (the
    output of ``Preprocess.normalise`` on real crops); N of 32-128 is plenty.
    """
    require_onnxruntime()
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    calibration = np.ascontiguousarray(calibration, dtype=np.float32)
    if calibration.ndim != 4 or len(calibration) == 0:
        raise ValueError(f"calibration must be [N, 3, H, W] with N >= 1, got {calibration.shape}")

    class Crops(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._batches: Iterator[np.ndarray] = iter(
                [calibration[i : i + batch] for i in range(0, len(calibration), batch)]
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            chunk = next(self._batches, None)
            return None if chunk is None else {INPUT_NAME: chunk}

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="reid-int8-", dir=out_path.parent) as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Shape inference and graph fusions first, as ONNX Runtime recommends before quantising.
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        staged = Path(tmp) / "int8.onnx"
        quantize_static(
            str(prepared),
            str(staged),
            Crops(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=True,
            calibrate_method=CalibrationMethod.MinMax,
        )
        os.replace(staged, out_path)
    log.info("INT8 model written: %s (calibrated on %d crops)", out_path, len(calibration))
    return out_path


def int8_path(fp32_path: Path) -> Path:
    """Where the INT8 model of a cached fp32 file goes: beside it, named after it."""
    fp32_path = Path(fp32_path)
    return fp32_path.with_name(f"{fp32_path.stem}-{INT8_FORMAT}.onnx")
