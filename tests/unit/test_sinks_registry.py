"""The version registry's index DDL, without a server."""

from __future__ import annotations

from sinks.registry import create_index_statements, index_names, index_tag


def test_index_ddl_quotes_the_version() -> None:
    odd = "v'; DROP TABLE deer; --"
    names = index_names(odd)
    assert len(set(names)) == 4 and all(index_tag(odd) in n for n in names)
    for statement in create_index_statements(odd):
        text = statement.as_string(None)
        assert "'v''; DROP TABLE deer; --'" in text  # a quoted literal, not SQL
