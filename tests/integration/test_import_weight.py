"""What importing a module drags in, checked in a fresh interpreter: the server, its health
checks and the command line load the leader lock, never the supervisor or the pool (those load
only when a pool is started)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.paths import REPO_ROOT

HEAVY = ("koubou_mcp.supervisor", "koubou_mcp.pool")


def loaded_after_import(module: str) -> list[str]:
    probe = (f"import json, sys, {module}; "
             f"print(json.dumps(sorted(m for m in sys.modules if m.startswith('koubou_mcp'))))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60, check=True)
    return list(json.loads(done.stdout))


@pytest.mark.parametrize("module", ["koubou_mcp.server", "koubou_mcp.service", "koubou_mcp.serve",
                                    "koubou_mcp.health", "koubou_mcp.cli"])
def test_importing_the_front_end_does_not_load_the_supervisor(module: str) -> None:
    loaded = loaded_after_import(module)
    assert "koubou_mcp.leader" in loaded  # the probe saw the package at all
    assert [m for m in HEAVY if m in loaded] == []
