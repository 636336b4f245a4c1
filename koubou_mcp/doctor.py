"""``koubou-mcp doctor``: check the setup and say how to fix each problem.

Checks the home directory, the database (without creating a SQLite file; on PostgreSQL also
whether the server vacuums: a warning when autovacuum is off), Ollama and its
models, the Codex CLI, and whether a pool runs for this home (information only: the MCP server
starts one when a client connects). Exit 0 when everything needed is fine, 1 otherwise; an
optional piece that is missing (the Codex CLI: only ``code`` tasks need it) is a warning and
leaves the exit code 0. Never a traceback: every failure becomes a finding with a reason and a
fix. Commands it suggests name koubou-mcp by the absolute path of the running executable
(``command``), which is what a client such as Claude Code needs to start it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, TextIO

import anyio

from koubou_mcp import __version__, health
from koubou_mcp.config import Settings


async def run_checks(settings: Settings, command: str = "koubou-mcp") -> list[health.Check]:
    """Every check, in the order they are shown."""
    found: dict[str, health.Check] = {}

    async def ollama() -> None:
        found["ollama"] = await health.check_ollama(settings)

    async def codex() -> None:
        found["codex"] = await health.check_codex(settings)

    async with anyio.create_task_group() as tg:
        tg.start_soon(ollama)
        tg.start_soon(codex)
    home = health.check_home(settings)
    database = await anyio.to_thread.run_sync(health.check_database, settings)
    vacuum = await anyio.to_thread.run_sync(health.check_vacuum, settings) \
        if database.ok else None
    pool = health.check_supervisor(settings, None)
    # information only: the MCP server starts the pool when a client connects
    summary = pool.summary if pool.data.get("running") else (
        "not running; the MCP server starts it when Claude Code connects (or run "
        f"`{command} pool`)")
    pool = health.Check("pool", True, summary, data=pool.data)
    old_home = await anyio.to_thread.run_sync(health.check_old_home, settings, Path.cwd())
    return [home, database, *([vacuum] if vacuum is not None else []), found["ollama"],
            found["codex"], pool,
            *([old_home] if old_home is not None else [])]


def run_doctor(settings: Settings, as_json: bool = False, *, out: TextIO | None = None,
               command: str = "koubou-mcp") -> int:
    """Print the checks (text, or one JSON object) and return the exit code. ``command`` is
    how suggested commands start koubou-mcp (an absolute path, from the CLI)."""
    out = out or sys.stdout
    checks = anyio.run(run_checks, settings, command)
    problems = [c for c in checks if c.problem]
    warnings = [c for c in checks if c.warning]
    if as_json:
        document: dict[str, Any] = {
            "ok": not problems,
            "version": __version__,
            "home": str(settings.home),
            "checks": [{"name": c.name, **c.as_dict()} for c in checks],
            "problems": len(problems),
            "warnings": len(warnings),
            "register": _register_command(command),
        }
        print(json.dumps(document, ensure_ascii=False), file=out)
    else:
        print(f"koubou-mcp {__version__} doctor  (KOUBOU_HOME={settings.home})", file=out)
        for c in checks:
            tag = ("warn" if c.optional else "FAIL") if not c.ok else \
                "note" if c.data.get("notice") else "ok"
            print(f"  {tag:<5} {c.name:<9} {c.summary}", file=out)
            if not c.ok:
                if c.reason:
                    print(f"{'':17}why: {c.reason}", file=out)
                if c.fix:
                    print(f"{'':17}fix: {c.fix}", file=out)
        if problems:
            names = ", ".join(c.name for c in problems)
            print(f"{len(problems)} problem{'s' if len(problems) > 1 else ''} ({names})",
                  file=out)
        else:
            aside = (f" ({len(warnings)} warning{'s' if len(warnings) > 1 else ''}: "
                     f"{', '.join(c.name for c in warnings)})" if warnings else "")
            print(f"all good{aside}: register the server with `{_register_command(command)}`",
                  file=out)
    return 1 if problems else 0


def _register_command(command: str) -> str:
    """The Claude Code command that registers this koubou-mcp."""
    return f"claude mcp add koubou -- {command}"
