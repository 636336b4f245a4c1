"""A broken database at start: every command says what is wrong, in a sentence, not a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from koubou_mcp.config import Settings
from tests.support.processes import run_cli


@pytest.fixture
def corrupt(settings: Settings) -> Settings:
    db = settings.home / "db" / "koubou.db"
    db.parent.mkdir(parents=True)
    db.write_bytes(b"definitely not SQLite " * 500)
    return settings


@pytest.mark.parametrize("args", [
    ("worker", "--max-tasks", "1"),
    ("pool",),
    ("submit", "hello"),
    ("status", "task_x"),
    ("tasks",),
    ("stats",),
])
def test_a_corrupt_database_is_explained_by_every_command(
    corrupt: Settings, args: tuple[str, ...]
) -> None:
    result = run_cli(corrupt, *args, timeout=60)
    assert result.returncode == 1, result.stderr
    assert "corrupt" in result.stderr and "Move the file aside" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_a_database_directory_that_cannot_exist_is_explained(settings: Settings,
                                                              tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the home's parent should be")
    broken = settings.with_overrides(database_url=f"sqlite:///{blocker}/db/koubou.db")
    for args in (("submit", "hello"), ("worker", "--max-tasks", "1")):
        result = run_cli(broken, *args, timeout=60)
        assert result.returncode == 1
        assert "cannot create the database directory" in result.stderr
        assert "Traceback" not in result.stderr
