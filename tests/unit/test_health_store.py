"""Health's database check on a real SQLite file: a store that still answers reads but takes no
writes, and one whose file was deleted under it, are reported, not called "ok"."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from koubou_mcp.config import Settings
from koubou_mcp.health import check_store
from koubou_mcp.store import open_store


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
