"""What the benchmark measures (the plan), what it found (the report), and its tables."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import resource
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


SECTIONS = (
    "model", "stream", "naive", "latency", "precision", "matching", "replay", "thumbnails",
)  # fmt: skip
# Asked for by name only: ``int8`` quantises the model (minutes on a CPU); ``gpu`` is the
# preset for a lent GPU (model, stream, latency, precision and memory on CUDA).
EXTRA_SECTIONS = ("int8", "gpu")


@dataclass(frozen=True)
class BenchPlan:
    """What to measure; ``quick()`` is the few-seconds version the test suite runs."""

    input_size: int | None = None  # None: the model's own (224)
    batch_sizes: tuple[int, ...] = (1, 8, 32, 64)
    stream_batch: int = 32
    stream_events: int = 320
    naive_events: int = 48
    runners: tuple[str, ...] = ("confluent", "faust")
    model_seconds: float = 6.0
    deer_counts: tuple[int, ...] = (1_000, 10_000, 100_000)
    search_sizes: tuple[int, ...] = (100_000,)
    latency_seconds: float = 30.0
    # Feed rates of the latency rows, events/s; None = half of the best stream throughput.
    latency_rates: tuple[float | None, ...] = (3.0, None)
    # "adaptive": the settings' window; "fixed": REID_BATCH_MIN_WAIT_MS = max wait (the old one).
    latency_windows: tuple[str, ...] = ("adaptive", "fixed")
    # The latency section's first hop alone (bench/transit.py): produce to consume per fetch wait.
    transit_waits_ms: tuple[int, ...] = (500, 50, 10)
    transit_events: int = 30
    replay_events: int = 200
    individuals: int = 40
    int8_calibration: int = 64  # crops the INT8 model is calibrated on
    device: str | None = None  # None: the settings' (REID_DEVICE)
    backend: str | None = None  # None: the settings' (REID_BACKEND)

    @classmethod
    def quick(cls) -> BenchPlan:
        return cls(
            input_size=64, batch_sizes=(1, 8), stream_batch=8, stream_events=32, naive_events=8,
            model_seconds=0.3, deer_counts=(1_000,), search_sizes=(2_000,),
            latency_seconds=3.0, latency_windows=("adaptive",), replay_events=16, individuals=6,
            int8_calibration=8, transit_waits_ms=(50,), transit_events=3,
        )  # fmt: skip

    @classmethod
    def gpu(cls) -> BenchPlan:
        """A few minutes of a lent GPU: PyTorch on CUDA (fp32 and fp16 raw, fp16 stream)."""
        return cls(
            batch_sizes=(1, 8, 16, 32, 64), stream_batch=64, stream_events=3000,
            runners=("confluent",), model_seconds=1.5, latency_seconds=15.0,
            device="cuda", backend="torch",
        )  # fmt: skip


@dataclass
class BenchReport:
    machine: dict[str, Any]
    plan: dict[str, Any]
    sections: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, section: str, row: dict[str, Any]) -> None:
        self.sections.setdefault(section, []).append(row)
        log.info("bench: %s %s", section, json.dumps(row, default=str))

    def to_json(self) -> str:
        return json.dumps(
            {"machine": self.machine, "plan": self.plan, "sections": self.sections,
             "notes": self.notes},
            indent=2, default=str,
        )  # fmt: skip


# -- the machine ------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def peak_rss_bytes() -> int:
    """Peak resident set of this process (VmHWM), resettable with ``reset_peak_rss``."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Linux lets a process reset its own peak (``echo 5 > /proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def format_tables(report: BenchReport) -> str:
    """One plain-text table per section, columns in the order of the first row."""
    out = [f"machine: {report.machine.get('cpu')} x{report.machine.get('cores')}, "
           f"torch {report.machine.get('torch')}, cuda={report.machine.get('cuda')}"]  # fmt: skip
    for section, rows in report.sections.items():
        columns: list[str] = []
        for row in rows:
            columns += [c for c in row if c not in columns]
        cells = [[_cell(row.get(c)) for c in columns] for row in rows]
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
        out.append("")
        out.append(f"## {section}")
        out.append("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
        for r in cells:
            out.append("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
    for note in report.notes:
        out.append(f"note: {note}")
    return "\n".join(out)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)
