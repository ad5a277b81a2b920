"""Reliability figures recorded by the tests, and docs/RELIABILITY.md written from them.

A test asks for the ``reliability`` fixture and records one row per scenario::

    reliability.record(
        {"scenario": "consumer killed with SIGKILL", "sent": 1000, "stored": 1000, "lost": 0,
         "duplicated_rows": 0, "duplicate_deer": 0, "dead_lettered": 0,
         "notes": "optional free text", "details": {...optional, kept in the JSON only...}},
        command="pytest -m faults -k kill9",
    )

The rows of a test are kept until it ends, then appended, with the test's result, as JSON
lines to a file under the session's temporary folder. When the session finishes and
``REID_WRITE_RELIABILITY=1`` is set, they are merged into ``reports/reliability.json`` (the
rows of a test that ran replace its earlier rows; the rows of tests not run keep their
earlier figures and date) and ``docs/RELIABILITY.md`` is rewritten from it (both paths from
the repository root). Without the variable nothing in the checkout changes. A test that fails
before recording anything gets one row saying so.

This module is a pytest plugin (``tests/conftest.py`` names it in ``pytest_plugins``): it
provides the fixture, keeps each test's result and writes the files when the session ends.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

WRITE_ENV = "REID_WRITE_RELIABILITY"
COMMAND = (
    "REID_WRITE_RELIABILITY=1 pytest -m faults tests/faults "
    "tests/integration/test_streams_hostile_input.py tests/integration/test_streams_poison.py"
)
SIDECAR = Path("reports") / "reliability.json"
DOCUMENT = Path("docs") / "RELIABILITY.md"

# (row key, column title) in table order.
COLUMNS = (
    ("scenario", "scenario"),
    ("sent", "events sent"),
    ("stored", "stored"),
    ("lost", "lost"),
    ("duplicated_rows", "duplicated rows"),
    ("duplicate_deer", "duplicate deer"),
    ("dead_lettered", "dead-lettered"),
    ("result", "test"),
    ("measured", "measured"),
    ("command", "reproduce"),
    ("notes", "notes"),
)
KINDS = (("fault", "Faults"), ("bad input", "Bad input"))

_ROWS_FILE = pytest.StashKey[Path]()
_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


# -- recording ----------------------------------------------------------------------------
@dataclass
class Recorder:
    """What the ``reliability`` fixture hands a test."""

    nodeid: str
    rows: list[dict[str, Any]] = field(default_factory=list)

    def record(self, row: dict[str, Any], *, command: str | None = None) -> None:
        """Keep one row; ``scenario`` names it in the table."""
        if not row.get("scenario"):
            raise ValueError("a reliability row needs a 'scenario'")
        self.rows.append(
            {
                "kind": "fault" if self.nodeid.startswith("tests/faults/") else "bad input",
                **row,
                "command": command or row.get("command") or f"pytest {self.nodeid}",
                "test": self.nodeid,
            }
        )


@pytest.fixture()
def reliability(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[Recorder]:
    """Record reliability rows; they are written with the test's result when it ends."""
    config = request.config
    if _ROWS_FILE not in config.stash:
        config.stash[_ROWS_FILE] = tmp_path_factory.getbasetemp() / "reliability-rows.jsonl"
    recorder = Recorder(request.node.nodeid)
    yield recorder
    result = _result(request.node)
    measured = datetime.now(UTC).strftime("%Y-%m-%d")
    if not recorder.rows and result != "passed":
        # Its earlier rows must not keep saying "passed".
        recorder.record({"scenario": f"`{recorder.nodeid}`: no figures, the test stopped "
                                     "before recording them"})  # fmt: skip
    with open(config.stash[_ROWS_FILE], "a", encoding="utf-8") as out:
        for row in recorder.rows:
            out.write(json.dumps({**row, "result": result, "measured": measured}) + "\n")


def _result(item: pytest.Item) -> str:
    reports = item.stash.get(_REPORTS, {})
    setup, call = reports.get("setup"), reports.get("call")
    if setup is not None and setup.failed:
        return "error"
    if call is None:
        return "unknown"
    return "passed" if call.passed else "FAILED" if call.failed else call.outcome


# -- pytest hooks (active where this module is registered as a plugin) ---------------------
@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    rows_file = session.config.stash.get(_ROWS_FILE, None)
    if os.environ.get(WRITE_ENV) != "1" or rows_file is None or not rows_file.exists():
        return
    rows = [json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()]
    if not rows:
        return
    args = " ".join(shlex.quote(a) for a in session.config.invocation_params.args)
    path = write(session.config.rootpath, rows, invocation=f"pytest {args}".strip())
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"reliability: {len(rows)} row(s) written to {path}")


# -- the document -------------------------------------------------------------------------
def write(root: Path, rows: list[dict[str, Any]], *, invocation: str) -> Path:
    """Merge ``rows`` into the sidecar and rewrite docs/RELIABILITY.md; returns its path.

    The rows of every test that ran replace all of that test's earlier rows (where the first
    of them stood); the rows of tests that did not run are kept as they were, unless their
    test file no longer exists."""
    sidecar = root / SIDECAR
    earlier = json.loads(sidecar.read_text())["rows"] if sidecar.exists() else []
    fresh: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        fresh.setdefault(row["test"], []).append(row)
    merged: list[dict[str, Any]] = []
    for row in earlier:
        test = row.get("test")
        if test not in fresh:
            merged.append(row)
        elif fresh[test]:
            merged += fresh[test]
            fresh[test] = []
    merged += [row for new in fresh.values() for row in new]
    # A test file that is gone (renamed or deleted) measures nothing any more.
    merged = [r for r in merged if (root / str(r.get("test", "")).split("::")[0]).is_file()]
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    doc = {"written": now, "invocation": invocation, "rows": merged}
    sidecar.parent.mkdir(parents=True, exist_ok=True)
    sidecar.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    document = root / DOCUMENT
    document.parent.mkdir(parents=True, exist_ok=True)
    document.write_text(render(doc))
    return document


def render(doc: dict[str, Any]) -> str:
    lines = [
        "# Reliability",
        "",
        f"Generated {doc['written']} from the test run, not by hand:",
        "",
        "```bash",
        COMMAND,
        "```",
        "",
        f"Last written by `{doc['invocation']}`. Rows that run did not include keep the "
        "figures and date of the run that measured them (`measured`); the figures of every "
        f"row, with more detail, are in `{SIDECAR.as_posix()}`.",
        "",
        "Each fault scenario pushes 1000 detection events (100 synthetic animals, 10 sightings "
        "each with identical image bytes, shuffled, on 16 cameras over 4 partitions; the "
        "rebalance 2000 events of 200 animals, the version switch 250 animals seen 4 times, "
        "the poison pill two more events) through real `python -m streams.cli run` processes "
        "against the embedded broker, PostgreSQL and Redis (`REID_INPUT_SIZE=64`, batches of "
        "32, `REID_THRESHOLD=0.95`), injects the fault, and checks at the end: every detection "
        "stored once, an assignment event for each (repeats byte-identical), one deer per "
        "animal and one animal per deer, `sum(deer.sightings) == count(detections)`, no dead "
        "letters (a poison pill: dead-lettered exactly once, never stored), and the group's "
        "committed offsets at the end of every partition. The broker scenarios run on a broker "
        "of their own behind a proxy that cuts it (`tests/faults/broker.py` says why).",
        "",
        "- **stored**: distinct sent detections found in `detections`; **lost**: sent but "
        "neither stored nor dead-lettered (bad input: neither dead-lettered nor stored).",
        "- **duplicated rows**: extra rows for one `detection_id`; **duplicate deer**: extra "
        "deer created for one animal.",
        "- **test**: the result of the test that measured the row.",
        "",
    ]
    for kind, title in KINDS:
        rows = [r for r in doc["rows"] if r.get("kind", "fault") == kind]
        if not rows:
            continue
        lines += [f"## {title}", ""]
        lines.append("| " + " | ".join(t for _, t in COLUMNS) + " |")
        lines.append("|" + "|".join(" --- " for _ in COLUMNS) + "|")
        for row in rows:
            lines.append("| " + " | ".join(_cell(key, row.get(key)) for key, _ in COLUMNS) + " |")
        lines.append("")
    return "\n".join(lines)


def _cell(key: str, value: Any) -> str:
    if value is None or value == "":
        return "—"
    text = str(value).replace("|", "\\|").replace("\n", " ")
    if key == "command":
        return f"`{text}`"
    return text
