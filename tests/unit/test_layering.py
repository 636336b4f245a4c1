"""The package's layering rules, read from the source with ``ast`` (nothing is imported).

Every import counts, wherever it sits: at the top, inside a function (a lazy import is still a
dependency) or under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "koubou_mcp"
#: the only module that may speak MCP
MCP_MODULE = "koubou_mcp.server"
MCP_ROOTS = ("mcp", "mcp_types")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = modules()


def imported_names(path: Path) -> Iterator[str]:
    """Every module ``path`` imports, absolute (``from . import x`` resolved); for ``from a
    import b`` both ``a`` and ``a.b`` (which is a module or a name in ``a``)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            yield origin
            yield from (f"{origin}.{alias.name}" for alias in node.names)


def imports_of(name: str) -> set[str]:
    return set(imported_names(MODULES[name]))


def package_edges(name: str) -> set[str]:
    """The modules of the package that ``name`` imports."""
    return {target for target in imports_of(name) if target in MODULES and target != name}


def graph() -> dict[str, set[str]]:
    return {name: package_edges(name) for name in MODULES}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path (first module repeated at the end), or None."""
    visiting: list[str] = []
    done: set[str] = set()

    def visit(node: str) -> list[str] | None:
        if node in visiting:
            return [*visiting[visiting.index(node):], node]
        if node in done:
            return None
        visiting.append(node)
        for target in sorted(edges.get(node, ())):
            cycle = visit(target)
            if cycle:
                return cycle
        visiting.pop()
        done.add(node)
        return None

    for start in sorted(edges):
        cycle = visit(start)
        if cycle:
            return cycle
    return None


def roots(name: str) -> set[str]:
    """The top-level packages ``name`` imports (``mcp`` for ``mcp.server.mcpserver``)."""
    return {target.split(".")[0] for target in imports_of(name)}


# -- the checker itself -------------------------------------------------------------------

def test_the_cycle_finder_finds_a_cycle_and_accepts_a_tree() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_top_level_lazy_and_relative_imports() -> None:
    assert "koubou_mcp.queue" in package_edges("koubou_mcp.service")  # top level
    assert "koubou_mcp.pool" in package_edges("koubou_mcp.service")  # inside a function
    assert "koubou_mcp.backends.base" in package_edges("koubou_mcp.backends.codex")
    assert {"mcp", "mcp_types"} <= roots(MCP_MODULE)
    assert len(MODULES) > 15 and "koubou_mcp" in MODULES


# -- the rules ----------------------------------------------------------------------------

def test_the_package_has_no_import_cycle() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_only_server_imports_mcp() -> None:
    speaking = sorted(name for name in MODULES if roots(name) & set(MCP_ROOTS))
    assert speaking == [MCP_MODULE]


@pytest.mark.parametrize("name", ["koubou_mcp.service", "koubou_mcp.http_api"])
def test_the_service_and_the_rest_api_do_not_depend_on_mcp(name: str) -> None:
    assert not roots(name) & set(MCP_ROOTS), f"{name} imports mcp"
    assert MCP_MODULE not in package_edges(name), f"{name} imports koubou_mcp.server"


def test_the_service_imports_no_web_framework() -> None:
    assert not roots("koubou_mcp.service") & {"starlette", "uvicorn"}
    assert "koubou_mcp.http_api" not in package_edges("koubou_mcp.service")
    assert "koubou_mcp.serve" not in package_edges("koubou_mcp.service")
