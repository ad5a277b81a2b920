"""Two workers, and `reid-stream activate` of a second embedding version during a burst of
sightings of new animals (issue 13, point 4): one deer per animal.

The switch is made the documented gap-free way (docs/storage-and-versions.md): a replay of
version B follows the live group (so every detection stored under A gets a B vector and its
deer a B centroid), B is activated while it runs (``--force``: the replay trails the live
group by a batch or so), and it is stopped once both workers run B. The workers switch at
different moments (each polls the registry and loads B in the background), so for a while
one creates deer under A and the other under B, and a deer created moments earlier under
the other version has no centroid of the batch's own version yet. Until the new-deer
re-check sees those, an animal can get two deer, and this test fails with "duplicate deer".
"""

from __future__ import annotations

import re
import subprocess
import sys

import psycopg

from tests.faults.harness import FaultRun
from tests.faults.stream import make_stream
from tests.faults.test_faults import ONE_CORE, redelivered, replans
from tests.faults.workers import REPO, FaultTestError, Worker, wait_for

VERSION_A = "seed0-msr50+effb0-calib-v2-64px"  # what the workers start with (seed 0, 64 px)
VERSION_B = "seed1-msr50+effb0-calib-v2-64px"
# Many animals seen few times: at the switch most animals are new or were first seen
# moments earlier, on another partition than their next sighting.
ANIMALS, SIGHTINGS = 250, 4
SWITCHED = re.compile(rf"app: switched embedding version {re.escape(VERSION_A)} -> "
                      rf"{re.escape(VERSION_B)}")  # fmt: skip


def test_version_switch_burst(fault_run: FaultRun):
    run = fault_run.describe(
        "version_switch",
        f"two consumers; `activate` of a second embedding version (a following replay) at "
        f"~20% of a burst of {ANIMALS} new animals seen {SIGHTINGS} times; one deer per animal",
    )
    stream = make_stream(ANIMALS, SIGHTINGS)
    events = len(stream.sightings)
    env = {**ONE_CORE, "REID_VERSION_POLL_S": "1"}
    a = run.start_worker("a", env=env)
    b = run.start_worker("b", env=env)
    # The first tenth, stored and committed on every partition before the replay starts:
    # a replay that starts while the live group has committed nothing anywhere is not held
    # back (streams/replay.py, _live_caps), runs ahead of the live group and skips for good
    # the events not stored yet (a separate fault, reported; not what this test is about).
    first = events // 10
    run.produce(stream, stream.sightings[:first])
    wait_for(lambda: all(o > 0 for o in run.committed().values()), 180,
             "the live group's first commit on every partition", run.diagnostics,
             alive=[a, b])  # fmt: skip
    # The rest once B is registered, so that `activate` at ~20% lands in the burst.
    replay = start_replay(run)
    run.produce(stream, stream.sightings[first:])
    run.check_produced()
    at = run.wait_rows(events // 5)
    done = subprocess.run(
        [sys.executable, "-m", "streams.cli", "activate", VERSION_B, "--force"],
        env=run.env, cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, f"activate failed: {done.stderr[-2000:]}\n{replay.tail()}"
    run.mark(f"{VERSION_B} activated")
    for worker in (a, b):
        wait_for(lambda w=worker: SWITCHED.search(w.log()), 120,
                 f"worker {worker.name} to switch to {VERSION_B}", run.diagnostics,
                 alive=[worker])  # fmt: skip
        run.mark(f"{worker.name} switched")
    switched_by = run.rows()
    run.wait_done(timeout=240)
    run.terminate(replay)
    verdict = run.finish()
    versions = version_counts(run)
    split = split_animals(run)
    run.note(
        f"activated at {at} rows, both workers on {VERSION_B} by {switched_by} rows; "
        f"detections stored per version {versions}; new deer re-planned against other "
        f"workers' deer {replans(run)} times; {redelivered(run)} events found already stored; "
        f"animals with several deer (deer id: the version it was created under): {split}"
    )
    if switched_by >= events:
        raise FaultTestError(f"the workers switched only after the burst ({switched_by} rows)")
    verdict.check()


def test_replay_from_start(fault_run: FaultRun):
    """The replay-ahead fault that the switch test steps around: a following replay started
    before the live group's first commit must still give every stored detection a vector of
    its version (issue 13, point 3: a replay must never pass events not stored yet)."""
    run = fault_run.describe(
        "replay_from_start",
        "a following replay of a second version started beside the live consumer, before its "
        "first commit; every stored detection gets a vector of that version",
    )
    stream = make_stream()
    run.start_worker("a", env=ONE_CORE)
    replay = start_replay(run)
    run.produce(stream)
    run.wait_done()
    # The live group is at the end: the replay's caps are the end offsets now.
    group = f"{run.group}-replay-{re.sub(r'[^A-Za-z0-9._-]', '_', VERSION_B)}"
    wait_for(lambda: run.committed(group) == stream.ends, 180, "the replay to catch up",
             run.diagnostics, alive=[replay])  # fmt: skip
    verdict = run.finish()
    with psycopg.connect(run.database_url) as conn:
        vectors = conn.execute(
            "SELECT count(*) FROM detection_vectors WHERE embedding_version = %s", (VERSION_B,)
        ).fetchone()[0]
    skipped = re.findall(r'"not_stored": (\d+)', replay.log())
    run.note(
        f"{vectors} of {verdict.figures['stored']} stored detections have a {VERSION_B} "
        f"vector after the replay caught up; events the replay passed before they were "
        f"stored (its not_stored): {skipped[-1] if skipped else 0}"
    )
    verdict.check()
    assert vectors == verdict.figures["stored"], (
        f"the replay ran ahead of the live group: {verdict.figures['stored'] - vectors} "
        f"stored detections have no {VERSION_B} vector, and a re-run does not revisit them"
    )


def version_counts(run: FaultRun) -> dict[str, int]:
    with psycopg.connect(run.database_url) as conn:
        return dict(conn.execute(
            "SELECT embedding_version, count(*) FROM detections GROUP BY 1 ORDER BY 1"
        ).fetchall())  # fmt: skip


def start_replay(run: FaultRun) -> Worker:
    """`reid-stream replay` of VERSION_B following the live group, once it has registered
    the version (when its model is loaded)."""
    replay = run.start_worker(
        "replay-b", env={**ONE_CORE, "REID_SEED": "1"},
        args=("replay", "--embedding-version", VERSION_B, "--no-progress"),
    )  # fmt: skip
    wait_for(lambda: registered(run, VERSION_B), 180, f"the replay to register {VERSION_B}",
             run.diagnostics, alive=[replay])  # fmt: skip
    return replay


def registered(run: FaultRun, version: str, *, active: bool = False) -> bool:
    with psycopg.connect(run.database_url, connect_timeout=5) as conn:
        try:
            row = conn.execute(
                "SELECT state FROM embedding_versions WHERE version = %s", (version,)
            ).fetchone()
        except psycopg.errors.UndefinedTable:
            return False
    return row is not None and (not active or row[0] == "active")


def split_animals(run: FaultRun) -> dict[int, dict[int, str]]:
    """Each animal with several deer -> {deer id: the version the deer was created under}."""
    assert run.stream is not None
    animal_of = run.stream.animal_of
    with psycopg.connect(run.database_url) as conn:
        rows = conn.execute(
            "SELECT d.detection_id, d.deer_id, r.embedding_version "
            "FROM detections d JOIN deer r ON r.id = d.deer_id"
        ).fetchall()
    deer: dict[int, dict[int, str]] = {}
    for detection_id, deer_id, version in rows:
        deer.setdefault(animal_of[detection_id], {})[deer_id] = version.split("-")[0]
    return {a: d for a, d in sorted(deer.items()) if len(d) > 1}
