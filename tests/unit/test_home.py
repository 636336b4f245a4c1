"""The home is its owner's alone (refused otherwise, with the fix; no symbolic link followed), and
an old per-directory home with unfinished tasks is found without touching it."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from koubou_mcp import cli, queue
from koubou_mcp.config import Settings
from koubou_mcp.health import check_home as doctor_home_check
from koubou_mcp.health import collect_health
from koubou_mcp.home import UnsafeHome, check_home, left_behind, open_private
from koubou_mcp.leader import PID_FILE, LeaderLock, read_holder
from koubou_mcp.models import utcnow
from koubou_mcp.pool import PoolLog
from koubou_mcp.processes import GroupLedger
from koubou_mcp.store import open_store
from tests.support.procfs import pid_alive
from tests.support.tasks import submit

NOBODY = 65534


def tree(path: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``path`` with its size and modification time."""
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in path.rglob("*")}


# -- who may touch the home ----------------------------------------------------------------

def test_a_group_writable_home_is_refused_with_the_chmod_that_fixes_it(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    settings.home.chmod(0o770)
    with pytest.raises(UnsafeHome, match=r"writable by its group \(mode 0770\).*chmod 700"):
        check_home(settings)
    with pytest.raises(SystemExit) as exited:
        cli.main(["submit", "--home", str(settings.home), "hello"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"`chmod 700 {settings.home}`" in err and "Traceback" not in err
    assert list(settings.home.iterdir()) == []  # refused before anything was created
    settings.home.chmod(0o700)
    check_home(settings)  # the fix it named is enough


@pytest.mark.parametrize("name", ["db", "logs", "run"])
def test_a_world_writable_directory_in_the_home_is_refused(settings: Settings, name: str) -> None:
    (settings.home / name).mkdir(mode=0o700)
    (settings.home / name).chmod(0o777)
    with pytest.raises(UnsafeHome, match=rf"{name} is writable by its group and every user"):
        check_home(settings)


def test_the_doctor_reports_an_unsafe_home_as_a_failed_check_with_the_fix(
    settings: Settings
) -> None:
    settings.home.chmod(0o707)
    found = doctor_home_check(settings)
    assert not found.ok and found.reason and "every user" in found.reason
    assert found.fix == f"`chmod 700 {settings.home}`"


@pytest.fixture
def nobodys_home(settings: Settings) -> Path:
    """The home handed to user nobody (root only: nobody else can give a file away)."""
    if os.geteuid() != 0:
        pytest.skip("only root can make a directory that belongs to another user")
    os.chown(settings.home, NOBODY, NOBODY)
    return settings.home


def test_a_home_owned_by_another_user_is_refused_with_the_chown_that_fixes_it(
    settings: Settings, nobodys_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(UnsafeHome, match=r"belongs to user nobody, not to you \(root\)"):
        check_home(settings)
    with pytest.raises(SystemExit) as exited:
        cli.main(["tasks", "--home", str(nobodys_home)])
    assert exited.value.code == 2
    assert f"`sudo chown -R root {nobodys_home}`" in capsys.readouterr().err


def test_a_run_directory_owned_by_another_user_is_refused(settings: Settings) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root can make a directory that belongs to another user")
    settings.run_dir.mkdir(mode=0o700)
    os.chown(settings.run_dir, NOBODY, NOBODY)
    with pytest.raises(UnsafeHome, match="run belongs to user nobody"):
        check_home(settings)
    with pytest.raises(OSError, match="belongs to user nobody"):  # and the lock is not taken
        LeaderLock(settings.run_dir).acquire("pool")


# -- no symbolic link is followed ------------------------------------------------------------

@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim.txt"
    path.write_text("precious\n")
    return path


@pytest.fixture
def restored_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)


def test_a_symlinked_log_file_is_not_followed(settings: Settings, victim: Path,
                                              restored_logging: None) -> None:
    settings.logs_dir.mkdir(mode=0o700)
    link = settings.logs_dir / "mcp_server.log"
    link.symlink_to(victim)
    with pytest.raises(UnsafeHome, match=rf"{link} is a symbolic link.*`rm {link}`"):
        cli.setup_logging(settings, link, stderr_level=logging.WARNING)
    (settings.logs_dir / "worker_pool.log").symlink_to(victim)
    pool_log = PoolLog(settings)
    pool_log.attach()  # says why on stderr and goes on without its file
    try:
        logging.getLogger("koubou_mcp.supervisor").warning("must not reach the victim",
                                                           extra={"koubou_home": str(settings.home)})
    finally:
        pool_log.detach()
    assert victim.read_text() == "precious\n"


def test_a_log_file_of_ours_is_appended_to(settings: Settings, restored_logging: None) -> None:
    log_file = settings.logs_dir / "mcp_server.log"
    cli.setup_logging(settings, log_file, stderr_level=logging.WARNING)
    logging.getLogger("koubou_mcp").warning("first line")
    for handler in logging.getLogger().handlers:
        handler.flush()
    assert "first line" in log_file.read_text()
    assert log_file.stat().st_mode & 0o777 == 0o600


def test_a_marker_file_that_is_a_link_or_not_ours_is_not_opened(settings: Settings,
                                                              victim: Path) -> None:
    settings.run_dir.mkdir(mode=0o700)
    fifo = settings.run_dir / "a-pipe"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(UnsafeHome, match="not a regular file"):
        os.close(open_private(fifo, os.O_RDONLY))  # and it did not block on the pipe
    pid_file = settings.run_dir / PID_FILE
    victim.write_text(f"{os.getpid()}\npool\n")
    pid_file.symlink_to(victim)
    assert read_holder(settings.run_dir) is None  # a pid we would signal must come from us
    pid_file.unlink()
    pid_file.write_text(f"{os.getpid()}\npool\n")
    assert read_holder(settings.run_dir) is not None
    if os.geteuid() == 0:
        os.chown(pid_file, NOBODY, NOBODY)
        assert read_holder(settings.run_dir) is None


def test_the_lock_file_is_not_followed_through_a_link(settings: Settings, victim: Path) -> None:
    settings.run_dir.mkdir(mode=0o700)
    (settings.run_dir / "supervisor.lock").symlink_to(victim)
    with pytest.raises(UnsafeHome, match="symbolic link"):
        LeaderLock(settings.run_dir).acquire("pool")
    assert victim.read_text() == "precious\n"


def test_killing_a_dead_workers_groups_skips_notes_that_are_links(settings: Settings,
                                                                  tmp_path: Path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                               start_new_session=True)
    try:
        ledger = GroupLedger(settings.child_groups_dir("w1"))
        assert ledger.record(99999999)  # a group of ours that is long gone
        (ledger.directory / str(sleeper.pid)).symlink_to(tmp_path)  # planted, not ours
        assert ledger.kill_all() == []
        assert sleeper.poll() is None and pid_alive(sleeper.pid)
        assert not ledger.directory.exists()
    finally:
        os.killpg(sleeper.pid, signal.SIGKILL)
        sleeper.wait(10)


# -- the old per-directory home ------------------------------------------------------------

@pytest.fixture
def old_home(tmp_path: Path, settings: Settings) -> Iterator[Path]:
    """A project directory whose ``.koubou`` (the old default home) has 2 pending tasks and
    1 in progress."""
    project = tmp_path / "project"
    old = project / ".koubou"
    old_settings = settings.with_overrides(home=old, database_url=f"sqlite:///{old}/db/koubou.db")
    store = open_store(old_settings.database_url, old_settings.run_dir)
    try:
        submit(store, old_settings, 3)
        assert queue.claim_next(store, "w1", utcnow(), 30.0) is not None
    finally:
        store.close()
    yield project


def test_an_old_home_with_unfinished_tasks_is_found_without_changing_a_file(
    settings: Settings, old_home: Path
) -> None:
    before = tree(old_home)
    found = left_behind(settings, old_home)
    assert found is not None
    assert (found.home, found.pending, found.in_progress) == (old_home / ".koubou", 2, 1)
    assert f"KOUBOU_HOME={old_home}/.koubou koubou-mcp pool" in found.message
    assert tree(old_home) == before  # no -wal, no -shm, nothing written


def test_an_old_home_is_read_while_a_pool_still_has_it_open(settings: Settings,
                                                            old_home: Path) -> None:
    db = old_home / ".koubou" / "db" / "koubou.db"
    store = open_store(f"sqlite:///{db}", old_home / ".koubou" / "run")
    try:
        submit(store, settings, 1)  # in the WAL, not yet in the database file
        assert Path(f"{db}-wal").exists()
        found = left_behind(settings, old_home)
        assert found is not None and found.pending == 3
    finally:
        store.close()


def test_nothing_is_said_about_an_old_home_in_use_done_or_absent(
    settings: Settings, old_home: Path, tmp_path: Path
) -> None:
    in_use = settings.with_overrides(home=old_home / ".koubou")
    assert left_behind(in_use, old_home) is None
    assert left_behind(settings, tmp_path / "elsewhere") is None
    assert not (tmp_path / "elsewhere").exists()
    db = old_home / ".koubou" / "db" / "koubou.db"
    store = open_store(f"sqlite:///{db}", old_home / ".koubou" / "run")
    try:
        for task in queue.list_tasks(store):
            if task.status == "in_progress":
                assert queue.complete(store, task.task_id, "w1", "done", utcnow())
            else:
                queue.cancel(store, task.task_id, utcnow())
    finally:
        store.close()
    assert left_behind(settings, old_home) is None


@pytest.mark.anyio
async def test_the_health_document_names_the_old_home_and_how_to_finish_it(
    settings: Settings, old_home: Path
) -> None:
    document = await collect_health(settings, None, start_dir=old_home)
    left = document["left_behind"]
    assert (left["pending"], left["in_progress"]) == (2, 1)
    assert left["finish_command"] == f"KOUBOU_HOME={old_home}/.koubou koubou-mcp pool"
    assert (await collect_health(settings, None, start_dir=settings.home))["left_behind"] is None


def test_the_doctor_prints_a_note_about_the_old_home(
    settings: Settings, old_home: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(old_home)
    cli.main(["doctor", "--home", str(settings.home), "--ollama-url", "http://127.0.0.1:9"])
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "old home" in line)
    assert line.lstrip().startswith("note")
    assert "2 pending and 1 running" in line and "koubou-mcp pool" in line
