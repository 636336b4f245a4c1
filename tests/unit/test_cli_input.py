"""Hostile and random input to the CLI: never a crash, always exit 0 or 2 with a message, and a
rejected call changes nothing in the database."""

from __future__ import annotations

import io
import os
import sqlite3
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from koubou_mcp import cli


def run(home: Path, *args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    """Run the CLI in this process (fast enough for property tests) and capture its output."""
    out, err = io.StringIO(), io.StringIO()
    old = sys.stdout, sys.stderr, sys.stdin
    sys.stdout, sys.stderr = out, err
    if stdin is not None:
        sys.stdin = io.TextIOWrapper(io.BytesIO(stdin))
    try:
        try:
            code = cli.main([args[0], "--home", str(home), *args[1:]])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.stdout, sys.stderr, sys.stdin = old
    return code, out.getvalue(), err.getvalue()


def task_rows(home: Path) -> list[tuple[Any, ...]]:
    db = home / "db" / "koubou.db"
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        try:
            return conn.execute("SELECT task_id, prompt, status FROM task_master").fetchall()
        except sqlite3.OperationalError:
            return []


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in list(os.environ):
        if name.startswith("KOUBOU_"):
            monkeypatch.delenv(name)
    return tmp_path / "home"


FUZZ = hsettings(max_examples=60, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
# "-" alone means "read the prompt from stdin" (the test below sends it that way)
@given(prompt=st.text(max_size=300).filter(lambda p: p != "-"),
       priority=st.integers(-5, 15) | st.just(10**12),
       task_type=st.sampled_from(["general", "code", "poem", "", "GENERAL"]))
def test_submit_accepts_good_input_verbatim_and_refuses_bad_input_changing_nothing(
    home: Path, prompt: str, priority: int, task_type: str
) -> None:
    before = task_rows(home)
    code, out, err = run(home, "submit", "--priority", str(priority), "--type", task_type, "--",
                         prompt)
    after = task_rows(home)
    if code == 0:
        assert len(after) == len(before) + 1
        new = next(r for r in after if r not in before)
        assert new[1] == prompt, "the prompt is stored verbatim"
        assert out.strip() == new[0]
    else:
        assert code == 2, err
        assert "error" in err and len(err.strip()) > 10
        assert after == before


@pytest.mark.parametrize("prompt", [
    "--help", '-c model="x"', "$(touch /tmp/koubou_pwned)", "; rm -rf ~", "`id`", "-", "--",
])
def test_prompts_that_look_like_flags_or_shell_are_stored_verbatim(home: Path, prompt: str) -> None:
    if prompt == "-":  # "-" itself means "read stdin", so it is sent that way
        code, _, err = run(home, "submit", "-", stdin=b"-")
    else:
        code, _, err = run(home, "submit", "--", prompt)
    assert code == 0, err
    assert task_rows(home)[-1][1] == prompt


def test_invalid_utf8_on_stdin_is_refused(home: Path) -> None:
    code, _, err = run(home, "submit", "-", stdin=b"caf\xe9 \xff\xfe")
    assert code == 2
    assert "not valid UTF-8" in err
    assert task_rows(home) == []


def test_an_empty_prompt_on_stdin_is_refused(home: Path) -> None:
    code, _, err = run(home, "submit", "-", stdin=b"  \n")
    assert (code, "empty" in err) == (2, True)


@pytest.mark.parametrize("args", [
    ("submit", "x", "--priority", "NaN"),
    ("submit", "x", "--timeout", "-5"),
    ("submit", "x", "--timeout", "nan"),
    ("submit", "x", "--timeout", "inf"),
    ("submit", "x", "--wait-timeout", "-1"),
    ("tasks", "--limit", "0"),
    ("tasks", "--limit", "-1"),
    ("tasks", "--status", "exploded"),
    ("pool", "--max", "-1"),
    ("pool", "--min", "9", "--max", "2"),
    ("worker", "--max-tasks", "x"),
])
def test_bad_flags_exit_2_with_a_message_and_change_nothing(home: Path, args: tuple[str, ...]) -> None:
    run(home, "submit", "seed task")
    before = task_rows(home)
    code, _, err = run(home, *args)
    assert code == 2
    assert "error" in err
    assert task_rows(home) == before


@FUZZ
@given(task_id=st.text(min_size=1, max_size=80).filter(lambda s: not s.startswith("-")))
def test_unknown_task_ids_exit_2_for_status_and_cancel(home: Path, task_id: str) -> None:
    run(home, "submit", "seed task")
    before = task_rows(home)
    for command in ("status", "cancel"):
        code, _, err = run(home, command, task_id)
        assert code == 2, err
        assert "no task with id" in err
    assert task_rows(home) == before


def test_a_bad_environment_variable_is_named_in_the_error(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KOUBOU_MAX_ATTEMPTS", "lots")
    code, _, err = run(home, "submit", "x")
    assert code == 2
    assert "KOUBOU_MAX_ATTEMPTS must be an integer" in err
