"""The default install (no extras) is enough for the HTTP transport, /metrics and `top`.

Rather than building a fresh virtual environment (minutes), import those modules in a child
interpreter, list every third-party distribution that got loaded, and check that each one is
reachable from koubou-mcp's core requirements (extras left out, markers evaluated). A module
that only an extra (or the dev tools) brings would show up here as unreachable.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, packages_distributions, requires

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

#: what `serve --transport streamable-http` and `top` load
HTTP_AND_TOP_IMPORTS = ("uvicorn", "starlette", "koubou_mcp.http_api", "koubou_mcp.metrics",
                        "koubou_mcp.server", "koubou_mcp.serve", "koubou_mcp.top",
                        "koubou_mcp.http_conn", "koubou_mcp.http_sessions")


def _core_closure(root: str) -> set[str]:
    """Every distribution the core requirements of ``root`` pull in, transitively, following
    the extras that requirements ask for (``pyjwt[crypto]``) but none of ``root``'s own."""
    seen: set[tuple[str, str]] = set()
    todo = [(root, "")]
    while todo:
        name, extra = todo.pop()
        name = canonicalize_name(name)
        if (name, extra) in seen:
            continue
        seen.add((name, extra))
        try:
            reqs = requires(name) or []
        except PackageNotFoundError:
            continue
        for line in reqs:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": extra}):
                todo += [(req.name, "")] + [(req.name, e) for e in req.extras]
    return {name for name, _ in seen}


#: run in a child interpreter: refuse every module of BLOCKED (as if not installed), then import
CHILD = """
import importlib, importlib.abc, json, sys
blocked, wanted = json.loads(sys.argv[1]), json.loads(sys.argv[2])

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
for module in wanted:
    importlib.import_module(module)
print(json.dumps(sorted({n.split(".")[0] for n in sys.modules})))
"""


def test_the_http_transport_metrics_and_top_import_with_core_dependencies_only() -> None:
    """Modules of distributions outside the core closure are made unimportable in a child
    interpreter, as on a default install; optional imports of dependencies (pyjwt's
    cryptography) then fall back the way they would there."""
    core = _core_closure("koubou-mcp")
    assert {"prometheus-client", "uvicorn", "starlette", "rich"} <= core
    owners = packages_distributions()
    blocked = sorted(m for m, dists in owners.items() if m != "koubou_mcp"
                     and not any(canonicalize_name(d) in core for d in dists))
    assert "psycopg" in blocked and "huey" in blocked  # extras are really left out
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(blocked),
                           json.dumps(HTTP_AND_TOP_IMPORTS)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert {"prometheus_client", "uvicorn", "rich"} <= set(json.loads(done.stdout))


def test_the_http_extra_stays_as_an_alias() -> None:
    from importlib.metadata import metadata

    assert "http" in (metadata("koubou-mcp").get_all("Provides-Extra") or [])
