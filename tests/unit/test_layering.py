"""The package's layering rules, read from the source with ``ast`` (nothing is imported).

Every import counts, wherever it sits: at the top, inside a function (a lazy import is still a
dependency) or under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
import re
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
    assert "koubou_mcp.attachment" in package_edges("koubou_mcp.service")  # inside a function
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


# -- who writes SQL, who reads the environment, how big things grow -------------------------

#: the modules that write SQL: the store (engine, schema and its migrations, the wake-up
#: statements that ``wakeup`` runs) and the queue package (every operation on tasks)
SQL_MODULES = ("koubou_mcp.store", "koubou_mcp.queue")
#: the names that build statements (``sqlalchemy.text`` and the expression language)
SQL_BUILDERS = frozenset({
    "text", "select", "insert", "update", "delete", "func", "and_", "or_", "not_", "bindparam",
    "literal", "literal_column", "column", "table", "union", "exists", "case", "cast", "tuple_",
    "DDL",
})
#: how a string that is a SQL statement starts
SQL_TEXT = re.compile(r"^\s*(SELECT|INSERT\s+INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|CREATE\s|"
                      r"ALTER\s+TABLE|DROP\s|LISTEN\s|NOTIFY\s|PRAGMA\s|BEGIN\b)")
#: the modules that read the environment: settings are read once, in ``config`` (and by the
#: CLI, for what a supervisor tells its worker); everything else receives a ``Settings``
ENV_MODULES = ("koubou_mcp.cli", "koubou_mcp.config")
ENV_NAMES = frozenset({"environ", "environb", "getenv", "getenvb", "putenv", "unsetenv"})
MAX_FUNCTION_LINES = 100
MAX_MODULE_LINES = 600


def in_any(name: str, owners: tuple[str, ...]) -> bool:
    return any(name == owner or name.startswith(owner + ".") for owner in owners)


def tree(name: str) -> ast.Module:
    return ast.parse(MODULES[name].read_text(encoding="utf-8"), str(MODULES[name]))


def sql_written(name: str) -> list[str]:
    """What in ``name`` builds SQL: imported statement builders and SQL statement text."""
    found = [target for target in imports_of(name)
             if target.split(".")[0] in ("sqlalchemy", "sqlmodel")
             and target.rpartition(".")[2] in SQL_BUILDERS]
    for node in ast.walk(tree(name)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and SQL_TEXT.match(node.value):
            found.append(f"line {node.lineno}: {node.value[:40]!r}")
    return found


def environment_reads(name: str) -> list[str]:
    found = []
    for node in ast.walk(tree(name)):
        if isinstance(node, ast.Attribute) and node.attr in ENV_NAMES \
                and isinstance(node.value, ast.Name) and node.value.id == "os":
            found.append(f"line {node.lineno}: os.{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module == "os":
            found += [f"line {node.lineno}: from os import {a.name}" for a in node.names
                      if a.name in ENV_NAMES]
    return found


def test_the_checkers_see_sql_and_environment_reads() -> None:
    assert "sqlalchemy.text" in sql_written("koubou_mcp.store")
    assert any("SELECT" in found for found in sql_written("koubou_mcp.store"))
    assert sql_written("koubou_mcp.queue.statements")
    assert environment_reads("koubou_mcp.config")
    assert SQL_TEXT.match("SELECT pg_advisory_xact_lock(:k)")
    assert SQL_TEXT.match('LISTEN "koubou_tasks"')
    assert not SQL_TEXT.match("select a model from the list")


def test_only_the_store_and_the_queue_write_sql() -> None:
    writing = {name: found for name in MODULES if not in_any(name, SQL_MODULES)
               for found in [sql_written(name)] if found}
    assert writing == {}


def test_only_the_cli_and_the_config_read_the_environment() -> None:
    reading = {name: found for name in MODULES if not in_any(name, ENV_MODULES)
               for found in [environment_reads(name)] if found}
    assert reading == {}


def test_no_function_is_longer_than_a_hundred_lines() -> None:
    long = {f"{name}.{node.name}": node.end_lineno - node.lineno + 1
            for name in MODULES for node in ast.walk(tree(name))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno is not None
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES}
    assert long == {}


def test_no_module_is_longer_than_six_hundred_lines() -> None:
    long = {name: n for name, path in MODULES.items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert long == {}


# -- the map of the code ------------------------------------------------------------------

ARCHITECTURE = PACKAGE.parent / "ARCHITECTURE.md"


def documented_imports() -> dict[str, set[str]]:
    """ARCHITECTURE.md's module tables: each file and the package modules it may import
    (``queue.*`` for any module of the subpackage; a note in parentheses is ignored)."""
    out = {}
    for file, allowed in re.findall(r"^\| `([\w/]+\.py)` \|[^|]*\|([^|]*)\|$",
                                    ARCHITECTURE.read_text(encoding="utf-8"), re.M):
        names = {re.sub(r"\(.*?\)", "", part).strip() for part in allowed.split(",")}
        out[file] = {n for n in names if n and n != "—"}
    return out


#: ``from koubou_mcp import queue`` and ``from koubou_mcp.backends import structured`` name the
#: package too; the tables list the module imported (``queue``, ``backends.structured``)
PLAIN_PACKAGES = ("koubou_mcp", "koubou_mcp.backends")


def allows(allowed: set[str], target: str) -> bool:
    short = target.removeprefix("koubou_mcp.")
    return target in PLAIN_PACKAGES or short in allowed or any(
        a.endswith(".*") and short.startswith(a[:-1]) for a in allowed)


def test_architecture_md_has_a_row_for_every_module_and_none_for_a_module_gone() -> None:
    rows = set(documented_imports())
    files = {path.relative_to(PACKAGE).as_posix() for path in MODULES.values()}
    assert sorted(files - rows) == [], "add a row to ARCHITECTURE.md's module table"
    assert sorted(rows - files) == [], "ARCHITECTURE.md names a module that no longer exists"


def test_each_module_imports_only_what_architecture_md_allows_it() -> None:
    allowed = documented_imports()
    by_file = {path.relative_to(PACKAGE).as_posix(): name for name, path in MODULES.items()}
    extra = {file: sorted(t for t in package_edges(name)
                          if not t.startswith(name + ".") and not allows(allowed[file], t))
             for file, name in by_file.items() if file in allowed}
    assert {file: names for file, names in extra.items() if names} == {}, (
        "a new dependency between modules: if it is right, add it to the module's row in "
        "ARCHITECTURE.md (the last column)")
