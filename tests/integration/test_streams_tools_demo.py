"""The README's first command: `reid-stream demo` accounts for every event it produced."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_demo_accounts_for_every_event(tmp_path):
    # A small model input keeps it quick; everything else is what a new user runs.
    env = {**os.environ, "REID_INPUT_SIZE": "64", "REID_SESSION_TIMEOUT_MS": "6000"}
    proc = subprocess.run(
        [sys.executable, "-m", "streams.cli", "demo", "--events", "24", "--state",
         str(tmp_path / "state")],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["events"] == 24 and summary["unaccounted"] == 0
    assert summary["assigned_existing"] + summary["new_deer"] + summary["dead_lettered"] == 24
    assert summary["deer"] == summary["new_deer"] >= 1
    assert summary["embedding_version"].endswith("-64px")
