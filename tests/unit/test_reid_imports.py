import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_FORBIDDEN = ("streams", "sinks", "confluent_kafka", "psycopg", "redis", "prometheus_client")


def _modules_after(statement: str) -> set[str]:
    code = f"{statement}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=True,
    )
    return set(json.loads(out.stdout))


def test_matching_does_not_import_torch() -> None:
    loaded = _modules_after("import reid, reid.matching")
    assert "reid.matching" in loaded
    assert "torch" not in loaded


def test_reid_stays_out_of_streams_and_sinks() -> None:
    loaded = _modules_after(
        "import reid.preprocess, reid.backbones, reid.weights, reid.embedder, reid.matching,"
        " reid.onnx_backend, reid.gpu_decode, reid.calibration"
    )
    assert "reid.embedder" in loaded
    leaked = {m for m in loaded if m.split(".")[0] in _FORBIDDEN}
    assert leaked == set()
    # What the stream runs needs neither the training nor the evaluation code.
    assert not {m for m in loaded if m.startswith(("reid.training", "reid.evaluation"))}
