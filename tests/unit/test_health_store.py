"""Health on real files and processes: a store that still answers reads but takes no writes,
and one whose file was deleted under it, are reported, not called "ok"; concurrent checks share
one ``codex --version``."""

from __future__ import annotations

import os
import sqlite3
import sys
from pathlib import Path

import anyio
import pytest

from koubou_mcp.config import Settings
from koubou_mcp.health import check_codex, check_store
from koubou_mcp.store import open_store
from tests.support.paths import FAKE_CODEX_PATH


def test_a_store_that_reads_but_cannot_write_is_reported(settings: Settings) -> None:
    store = open_store(settings.database_url, settings.run_dir, busy_timeout_s=0.1)
    try:
        assert check_store(settings, store).ok
        other = sqlite3.connect(settings.database_url.removeprefix("sqlite:///"),
                                isolation_level=None)
        try:
            other.execute("BEGIN EXCLUSIVE")  # reads still work (WAL), writes time out
            found = check_store(settings, store)
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert not found.ok
        assert "takes no writes" in found.summary and "locked" in str(found.reason)
        assert check_store(settings, store).ok, "fine again once the lock is gone"
    finally:
        store.close()


def test_a_deleted_database_file_is_reported(settings: Settings) -> None:
    store = open_store(settings.database_url, settings.run_dir)
    try:
        path = Path(settings.database_url.removeprefix("sqlite:///"))
        path.unlink()
        found = check_store(settings, store)
        assert not found.ok and "was deleted while in use" in str(found.reason)
    finally:
        store.close()


@pytest.mark.anyio
async def test_concurrent_health_checks_run_codex_version_once_until_codex_changes(
    settings: Settings, tmp_path: Path,
) -> None:
    runs = tmp_path / "runs.txt"
    codex = tmp_path / "codex"
    codex.write_text(f"#!/bin/sh\necho run >> {runs}\nexec {sys.executable} {FAKE_CODEX_PATH} \"$@\"\n")
    codex.chmod(0o755)
    s = settings.with_overrides(codex_bin=str(codex))
    results = []

    async def one() -> None:
        results.append(await check_codex(s))

    async with anyio.create_task_group() as tg:
        for _ in range(8):
            tg.start_soon(one)
    assert [r.ok for r in results] == [True] * 8
    assert runs.read_text().count("run") == 1, "one child for eight concurrent checks"
    assert (await check_codex(s)).ok and runs.read_text().count("run") == 1, "then cached"
    later = codex.stat().st_mtime_ns + 10_000_000
    os.utime(codex, ns=(later, later))  # an upgraded codex is asked again
    assert (await check_codex(s)).ok and runs.read_text().count("run") == 2
