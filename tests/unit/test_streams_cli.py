"""The command line as a user meets it (no servers): every command's help, --version, the
one-line failures (a missing folder, an unreachable broker or database, a missing extra),
unknown REID_* variables, the progress bar, replay's start positions."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sinks.pg import StoreUnavailable
from streams.cli import build_parser, main
from streams.cli.errors import one_line, redacted
from streams.cli.versions import parse_time, read_offsets_file
from streams.logs import progress_bar
from streams.settings import load_settings, unknown_variables
from tests.conftest import ZEBRA_DIR

ROOT = Path(__file__).resolve().parents[2]


def test_progress_bar_on_a_terminal_only(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    bar = progress_bar("replay v", total=200)
    bar.update(50)
    bar.close()
    line = capsys.readouterr().err
    assert "replay v" in line and "50/200" in line and "ev/s" in line and "<" in line
    quiet = progress_bar("x", total=2, enabled=False)
    quiet.update(1)
    quiet.close()
    assert capsys.readouterr().err == ""
    # Not a terminal (a log file, CI): nothing, the job's log lines say what it did.
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    piped = progress_bar("produce", total=2)
    piped.update(2)
    piped.close()
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


def subcommands() -> dict[str, object]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return dict(sub.choices)


def test_every_command_has_a_description_and_an_example() -> None:
    parsers = subcommands()
    assert {"run", "migrate", "replay", "activate", "demo", "bench", "stack", "produce"} <= set(
        parsers
    )
    for name, parser in parsers.items():
        text = parser.format_help()
        description = (parser.description or "").strip()
        assert description and "\n" not in description, f"{name}: no one-line description"
        assert "example" in (parser.epilog or ""), f"{name}: no example in --help"
        assert f"reid-stream {name}" in parser.epilog, f"{name}: the example runs another command"
        # The example parses: it names the command's real options.
        example = parser.epilog.splitlines()[1].split("reid-stream ", 1)[1].split("#")[0].split()
        build_parser().parse_args(example)
        assert description in " ".join(text.split()), name


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("reid-stream ") and out.split()[1][0].isdigit(), out


def test_unknown_variables_name_the_closest_setting() -> None:
    env = {"REID_TRESHOLD": "0.5", "REID_THRESHOLD": "0.4", "PATH": "/bin",
           "reid_batch_max_size": "8", "REID_BACTH_MAX_SIZE": "8", "REID_ZZZ": "1",
           "REID_SECRETS_DIR": "/run/secrets"}  # fmt: skip
    lines = unknown_variables(env)
    assert lines == [
        "settings: REID_BACTH_MAX_SIZE is not a setting and is ignored; "
        "did you mean REID_BATCH_MAX_SIZE?",
        "settings: REID_TRESHOLD is not a setting and is ignored; did you mean REID_THRESHOLD?",
        "settings: REID_ZZZ is not a setting and is ignored (docs/settings.md lists them)",
    ]


def test_known_failures_are_one_line_and_secrets_stay_out() -> None:
    settings = load_settings(
        database_url="postgresql://reid:s3cret-pw@db.example:6543/reid",
        kafka_bootstrap_servers="kafka.example:9092",
    )
    err = ModuleNotFoundError("No module named 'onnxruntime'", name="onnxruntime")
    assert "pip install 'deer-reid-stream[onnx]'" in one_line(err)
    # Our own module missing is a bug: no friendly line, the traceback stays.
    assert one_line(ModuleNotFoundError("x", name="streams.nope")) is None
    assert one_line(ValueError("a bug")) is None
    try:
        raise StoreUnavailable("store: cannot connect") from OSError("refused\n\tIs it running?")
    except StoreUnavailable as caught:
        line = one_line(caught, settings)
    assert line.startswith("cannot reach PostgreSQL at reid@db.example:6543/reid: refused;")
    assert "s3cret-pw" not in line and "\n" not in line
    echoed = "invalid dsn postgresql://reid:s3cret-pw@db.example:6543/reid"
    assert "s3cret-pw" not in redacted(echoed, settings)
    assert one_line(FileNotFoundError(2, "No such file or directory", "/x/y.pt")) == (
        "No such file or directory: /x/y.pt"
    )


def closed_port() -> int:
    """A loopback port nothing listens on (bound and released at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "streams.cli", *args]


# Runs the command line with the `faust` package hidden, as in an install without the extra.
WITHOUT_FAUST = (
    "import sys; sys.modules['faust'] = None; from streams.cli import main; "
    "sys.exit(main(sys.argv[1:]))"
)


def test_failures_a_new_user_meets_are_one_line(tmp_path: Path) -> None:
    """Each as a real process: exit status 1, one line on stderr saying what failed and
    what to do, no traceback, no librdkafka lines, no password."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("REID_")}
    env.update(
        PYTHONPATH=str(ROOT),
        REID_KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{closed_port()}",
        REID_DATABASE_URL=f"postgresql://reid:s3cret-pw@127.0.0.1:{closed_port()}/reid",
        REID_REDIS_URL="",
    )
    (tmp_path / "empty").mkdir()
    cases = {
        "missing folder": (cli("produce", "--images", "/nonexistent"), {},
                           ["--images /nonexistent does not exist"]),
        "folder without images": (cli("produce", "--images", str(tmp_path / "empty")), {},
                                  ["has no images"]),
        "broker down": (cli("produce", "--images", str(ZEBRA_DIR), "--limit", "2"), {},
                        ["cannot reach the Kafka broker at 127.0.0.1:",
                         "REID_KAFKA_BOOTSTRAP_SERVERS"]),
        "database down": (cli("migrate"), {},
                          ["cannot reach PostgreSQL at reid@127.0.0.1:", "REID_DATABASE_URL"]),
        "faust extra missing": ([sys.executable, "-c", WITHOUT_FAUST, "run", "--runner", "faust"],
                                {}, ["needs the Python package 'faust'",
                                     "pip install 'deer-reid-stream[faust]'"]),
        "weights file missing": (cli("replay", "--embedding-version", "v2", "--weights",
                                        str(tmp_path / "v2.pt")), {}, ["v2.pt not found"]),
        "a typo beside it": (cli("produce", "--images", "/nonexistent"),
                             {"REID_TRESHOLD": "0.5"}, ["did you mean REID_THRESHOLD?"]),
        "json logs": (cli("--log-format", "json", "produce", "--images", str(ZEBRA_DIR)), {},
                      ["cannot reach the Kafka broker"]),
    }  # fmt: skip
    # All at once: the broker case waits out a metadata timeout (10 s).
    procs = {
        name: subprocess.Popen(argv, env={**env, **extra}, cwd=tmp_path, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for name, (argv, extra, _) in cases.items()
    }  # fmt: skip
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert proc.returncode == 1, (name, proc.returncode, err[-2000:])
        assert "Traceback" not in err and "rdkafka" not in err, (name, err[-2000:])
        assert "s3cret-pw" not in err + out, name
        expected_lines = 2 if name == "a typo beside it" else 1
        assert len(lines) == expected_lines, (name, lines)
        for phrase in cases[name][2]:
            assert phrase in err, (name, phrase, err)
        if name == "json logs":
            doc = json.loads(lines[0])
            assert doc["level"] == "ERROR" and doc["msg"].startswith("produce: cannot reach")
        else:
            assert lines[-1].startswith("reid-stream "), (name, lines)


def test_the_command_line_starts_without_torch() -> None:
    """Building the parser (every command's options) loads neither torch nor onnxruntime:
    `--help`, `--version` and the light commands (`activate`, `deer ...`, `stack`) start in a
    fraction of a second; the model's libraries load only in the commands that run it."""
    code = (
        "import json, sys; from streams.cli import build_parser; build_parser(); "
        "print(json.dumps(sorted(sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    loaded = set(json.loads(done.stdout))
    assert "streams.tools.bench" in loaded  # the parser did pull in the commands' modules
    assert not {m for m in loaded if m.split(".")[0] in ("torch", "onnxruntime", "torchvision")}
