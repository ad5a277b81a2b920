"""The settings table (docs/settings.md) and the Settings object agree: every setting is
documented once, with its exact default, and nothing documented is missing from the code. And
every relative link in README.md and docs/*.md leads to a file (and heading) that exists."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError
from pydantic_settings.exceptions import SettingsError

from streams.settings import Settings, explain, load_settings

ROOT = Path(__file__).resolve().parents[2]
SETTINGS_DOC = ROOT / "docs" / "settings.md"
# Read by load_settings() itself, not fields of the object.
NOT_FIELDS = {"REID_SETTINGS_FILE", "REID_SECRETS_DIR"}


def settings_table() -> dict[str, str]:
    """variable -> default cell of the settings table (the rows whose first cell is a variable)."""
    text = SETTINGS_DOC.read_text()
    rows: dict[str, str] = {}
    for line in text.splitlines():
        if not line.lstrip().startswith("|"):
            continue
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
    assert sorted(fields - set(table)) == [], "settings missing from docs/settings.md"
    unknown = sorted(set(table) - fields - NOT_FIELDS)
    assert unknown == [], "docs/settings.md documents unknown settings"


@pytest.mark.parametrize("name", sorted(Settings.model_fields))
def test_documented_default_is_the_real_one(name: str) -> None:
    cell = settings_table()[f"REID_{name.upper()}"]
    default = default_of(name)
    if default is None:
        assert cell == "", f"{name}: default is unset, docs/settings.md says {cell!r}"
    elif isinstance(default, bool | int | float):
        assert float(cell) == float(default), f"{name}: {default} vs docs/settings.md {cell!r}"
    elif isinstance(default, dict | list):
        assert json.loads(cell) == default
    else:
        assert cell == str(default), f"{name}: {default!r} vs docs/settings.md {cell!r}"


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


# -- links ----------------------------------------------------------------------------------
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file (duplicates get -1, -2, ...)."""
    seen: dict[str, int] = {}
    for line in _outside_code(path.read_text()):
        if m := re.match(r"#{1,6} +(.+?) *#* *$", line):
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            if n:
                seen[f"{slug}-{n}"] = 1
    return set(seen)


def _outside_code(text: str) -> list[str]:
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(doc: Path) -> None:
    broken = []
    for line in _outside_code(doc.read_text()):
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue  # https:, mailto:, ...
            file, _, anchor = target.partition("#")
            path = (doc.parent / file).resolve() if file else doc
            if not path.exists() or (
                anchor and path.suffix == ".md" and anchor not in _anchors(path)
            ):
                broken.append(target)
    assert broken == [], f"{doc.relative_to(ROOT)}: links to nothing: {broken}"


def test_the_docs_are_linked_from_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    unlinked = [p.name for p in DOCS[1:] if f"(docs/{p.name}" not in readme]
    assert unlinked == [], "docs/ files the README does not link to"
