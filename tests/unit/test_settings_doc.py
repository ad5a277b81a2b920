"""The README's settings table and the Settings object agree: every setting is documented once,
with its exact default, and nothing documented is missing from the code."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError
from pydantic_settings.exceptions import SettingsError

from streams.settings import Settings, explain, load_settings

README = Path(__file__).resolve().parents[2] / "README.md"
# Read by load_settings() itself, not fields of the object.
NOT_FIELDS = {"REID_SETTINGS_FILE", "REID_SECRETS_DIR"}


def settings_table() -> dict[str, str]:
    """variable -> default cell of the table under '## Settings'."""
    text = README.read_text()
    section = text[text.index("\n## Settings\n") :]
    section = section[: section.index("\n## ", 1)]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and (m := re.fullmatch(r"`(REID_[A-Z0-9_]+)`", cells[0])):
            assert m.group(1) not in rows, f"{m.group(1)} documented twice"
            rows[m.group(1)] = cells[1].strip("`")
    return rows


def default_of(name: str) -> Any:
    value = Settings.model_fields[name].get_default(call_default_factory=True)
    return value.get_secret_value() if isinstance(value, SecretStr) else value


def test_every_setting_is_documented_and_nothing_else() -> None:
    table = settings_table()
    fields = {f"REID_{name.upper()}" for name in Settings.model_fields}
    assert sorted(fields - set(table)) == [], "settings missing from the README table"
    assert sorted(set(table) - fields - NOT_FIELDS) == [], "README documents unknown settings"


@pytest.mark.parametrize("name", sorted(Settings.model_fields))
def test_documented_default_is_the_real_one(name: str) -> None:
    cell = settings_table()[f"REID_{name.upper()}"]
    default = default_of(name)
    if default is None:
        assert cell == "", f"{name}: default is unset, README says {cell!r}"
    elif isinstance(default, bool | int | float):
        assert float(cell) == float(default), f"{name}: {default} vs README {cell!r}"
    elif isinstance(default, dict | list):
        assert json.loads(cell) == default
    else:
        assert cell == str(default), f"{name}: {default!r} vs README {cell!r}"


def test_every_setting_has_a_description() -> None:
    assert [n for n, f in Settings.model_fields.items() if not f.description] == []


def test_wrong_values_are_explained_by_variable(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("REID_BATCH_MAX_SIZE", "0")
    monkeypatch.setenv("REID_LOG_FORMAT", "xml")
    monkeypatch.setenv("REID_KAFKA_OPTIONS", '{"sasl.password": 5}')  # not a string
    with pytest.raises(ValidationError) as err:
        load_settings()
    text = explain(err.value)
    assert "REID_BATCH_MAX_SIZE: Input should be greater than or equal to 1 (got '0')" in text
    assert "REID_LOG_FORMAT: Input should be 'text' or 'json' (got 'xml')" in text
    assert "REID_KAFKA_OPTIONS" in text and "sasl.password" not in text  # may hold a secret

    for var in ("REID_BATCH_MAX_SIZE", "REID_LOG_FORMAT"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("REID_KAFKA_OPTIONS", '{"sasl.password": "hunter2"')  # broken JSON
    with pytest.raises(SettingsError, match="REID_KAFKA_OPTIONS: cannot parse") as broken:
        load_settings()
    assert "hunter2" not in str(broken.value)
    monkeypatch.delenv("REID_KAFKA_OPTIONS")
    file = tmp_path / "reid.env"
    file.write_text("REID_BATHC_MAX_SIZE=8\n")  # a typo in a file is refused, not ignored
    with pytest.raises(ValidationError) as err:
        load_settings(file)
    assert explain(err.value).startswith("  REID_BATHC_MAX_SIZE: Extra inputs are not permitted")


def test_empty_values_mean_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compose passes `${VAR:-}` as an empty string."""
    monkeypatch.setenv("REID_WEIGHTS_PATH", "")
    monkeypatch.setenv("REID_INPUT_SIZE", "")
    s = load_settings()
    assert s.weights_path is None and s.input_size is None
    monkeypatch.setenv("REID_LOG_LEVEL", "debug")
    assert load_settings().log_level == "DEBUG"
