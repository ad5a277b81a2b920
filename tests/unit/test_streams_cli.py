"""The command line's own parsing (no servers): replay's start positions, the progress bar,
and that every command is registered with a description."""

from __future__ import annotations

import json

import pytest

from streams.cli import build_parser
from streams.cli.versions import parse_time, read_offsets_file
from streams.logs import progress_bar


def test_progress_prints_count_rate_and_time_left(capsys: pytest.CaptureFixture[str]) -> None:
    bar = progress_bar("replay v", total=200)
    bar.update(50)
    bar.close()
    line = capsys.readouterr().err
    assert "replay v" in line and "50/200" in line and "ev/s" in line and "<" in line
    quiet = progress_bar("x", total=2, enabled=False)
    quiet.update(1)
    quiet.close()
    assert capsys.readouterr().err == ""


def test_offsets_file_and_times(tmp_path) -> None:
    f = tmp_path / "o.json"
    f.write_text(json.dumps({"0": 12, "3": 0}))
    assert read_offsets_file(f) == {0: 12, 3: 0}
    f.write_text("[1, 2]")
    with pytest.raises(ValueError, match="partition -> offset"):
        read_offsets_file(f)
    assert parse_time("1700000000000") == 1_700_000_000_000
    assert parse_time("2023-11-14T22:13:20Z") == 1_700_000_000_000
    with pytest.raises(ValueError, match="RFC 3339"):
        parse_time("yesterday")


def test_every_command_has_a_description() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    names = set(sub.choices)
    assert {"run", "migrate", "replay", "activate", "demo", "bench", "stack"} <= names
    helps = {choice.dest: choice.help for choice in sub._choices_actions}
    assert all(helps.get(name) for name in names), helps
