"""``doctor`` on PostgreSQL says whether the server vacuums the task table: without
autovacuum every claim walks past more dead rows (a warning, not a failure)."""

from __future__ import annotations

import anyio
import psycopg

from koubou_mcp import doctor, health
from koubou_mcp.config import Settings


def test_autovacuum_off_is_a_warning_that_says_how_to_fix_it() -> None:
    off = health.vacuum_finding("off")
    assert off.warning and not off.problem  # the doctor's exit code stays 0
    assert off.reason is not None and "dead rows" in off.reason
    assert off.fix is not None and "autovacuum = on" in off.fix and "VACUUM" in off.fix
    on = health.vacuum_finding("on")
    assert on.ok and not on.warning


def test_the_doctor_reports_the_servers_own_setting_on_postgresql_only(
        store_settings: Settings) -> None:
    checks = {c.name: c for c in anyio.run(doctor.run_checks, store_settings)}
    assert checks["database"].ok
    if not store_settings.database_url.startswith("postgresql"):
        assert "vacuum" not in checks  # SQLite has no autovacuum to speak of
        return
    plain = store_settings.database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain) as conn:
        setting = conn.execute("SHOW autovacuum").fetchone()[0]  # type: ignore[index]
    assert checks["vacuum"].data["autovacuum"] == setting
    assert checks["vacuum"].ok == (setting == "on")
