"""A poison pill in the middle of the stream (issue 13, point 1): events that are valid JSON
with every field present but that crashed the whole batch, so the process exited 1 without
committing, and every restart died on the same event. Expected: each pill dead-lettered
(``unprocessable`` with the exception type, or a specific bad-input reason), the 1000 good
events stored, the consumer never exits. Until the processor classifies per-event failures
and bisects a failing batch, this test fails with "ISSUE 13 POINT 1".
"""

from __future__ import annotations

from tests.faults.harness import FaultRun
from tests.faults.stream import EVENTS, make_stream, poison_pills
from tests.faults.workers import FaultTestError


def test_poison_pill(fault_run: FaultRun):
    run = fault_run.describe(
        "poison_pill",
        "two poison pills (a NUL in species, a 401-digit integer in bbox) in the middle of "
        "1000 events; both dead-lettered, the 1000 stored, the consumer never exits",
    )
    stream = make_stream()
    stream.pills = poison_pills()
    half = EVENTS // 2
    nul, huge = stream.pills
    run.produce(stream, [*stream.sightings[:half], nul, *stream.sightings[half : half + 50],
                         huge, *stream.sightings[half + 50 :]])  # fmt: skip
    run.check_produced()
    a = run.start_worker("a")
    try:
        run.wait_done(timeout=180)
    except FaultTestError:
        if a.alive():
            raise
        run.note(f"the consumer exited {a.returncode} at {run.rows()} rows")
        raise FaultTestError(
            f"ISSUE 13 POINT 1 (poison pill): the consumer exited {a.returncode} at "
            f"{run.rows()} of {EVENTS} rows instead of dead-lettering the pill\n{a.tail(20)}"
        ) from None
    verdict = run.finish()
    run.note(f"pills dead-lettered as {verdict.figures['pill_reasons']}; the consumer ran "
             "throughout and exited 0 on SIGTERM")  # fmt: skip
    verdict.check()
