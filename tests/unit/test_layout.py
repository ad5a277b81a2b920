"""The rooms' boundaries (docs and ARCHITECTURE.md), checked on every module's imports.

Static: each module of streams/, reid/ and sinks/ is parsed, and every import in it counts,
including the ones inside functions (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("streams", "reid", "sinks")
MAX_MODULE_LINES = 450


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> Iterator[str]:
    """Every module name an import statement in ``path`` names (relative ones resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def _own(target: str) -> str | None:
    """The project module an imported name belongs to, or None for a third-party one."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def _violations(prefix: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        f"{name} imports {target}"
        for name, path in MODULES.items()
        if name == prefix or name.startswith(prefix + ".")
        for target in _imports(name, path)
        if target.split(".")[0] in forbidden
    )


def test_every_package_has_modules() -> None:
    for package in PACKAGES:
        assert any(name.startswith(package + ".") for name in MODULES), package


def test_reid_knows_no_stream_and_no_servers() -> None:
    forbidden = ("streams", "sinks", "confluent_kafka", "psycopg", "redis", "prometheus_client")
    assert _violations("reid", forbidden) == []


def test_what_the_stream_runs_needs_no_training_or_evaluation() -> None:
    top = [n for n in MODULES if n.count(".") == 1 and n.startswith("reid.")]
    bad = [
        f"{name} imports {target}"
        for name in top
        for target in _imports(name, MODULES[name])
        if target.startswith(("reid.training", "reid.evaluation"))
    ]
    assert top and bad == []


def test_sinks_knows_no_model_and_no_consumer() -> None:
    assert _violations("sinks", ("torch", "torchvision", "reid", "streams")) == []


def test_sql_lives_in_sinks_only() -> None:
    assert _violations("streams", ("psycopg", "pgvector")) == []
    assert _violations("reid", ("psycopg", "pgvector")) == []


def test_nothing_imports_the_command_line() -> None:
    bad = [
        f"{name} imports {target}"
        for name, path in MODULES.items()
        if not name.startswith("streams.cli")
        for target in _imports(name, path)
        if target == "streams.cli" or target.startswith("streams.cli.")
    ]
    assert bad == []


def test_no_import_cycles() -> None:
    edges = {
        name: {
            own
            for target in _imports(name, path)
            if (own := _own(target)) is not None and own != name
        }
        for name, path in MODULES.items()
    }
    cycles = _cycles(edges)
    assert cycles == [], f"import cycles: {cycles}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_fits_on_a_few_screens(name: str) -> None:
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{name} has {lines} lines; split it along a real seam"


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_cycle_finder_finds_a_cycle() -> None:
    # The check above must be able to fail.
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = [
        line
        for line in readme.splitlines()
        if line.startswith("python3 -m venv .venv") and "pytest" in line
    ]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert len(commands) == 1 and commands[0] in ci
