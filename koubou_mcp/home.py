"""The home directory: only its owner may touch it, and an old home is not silently abandoned.

Everything under ``KOUBOU_HOME`` is private: prompts and results in ``db/``, logs in ``logs/``,
the pool's lock and pid file in ``run/``. Whoever could write there could read every prompt,
forge a pid file that ``koubou-mcp stop`` signals, or plant a symbolic link that makes us write
a log into some other file. So a home (or its ``db/``, ``logs/``, ``run/``) that another user
owns, or that group or others may write, is refused with the command that fixes it; logs and
marker files are opened without following symbolic links and checked (a regular file of ours)
before they are used.

The default home used to be ``./.koubou`` in the start directory. ``left_behind`` finds such a
home that still holds unfinished tasks, so that the server, the pool and ``doctor`` can say how
to finish them.
"""

from __future__ import annotations

import io
import logging
import logging.handlers
import os
import pwd
import shlex
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from koubou_mcp.config import ConfigError, Settings, make_private_dir

#: The directories of a home that are checked with it
HOME_DIRS = ("db", "logs", "run")
#: The default home before it was per user: this name in the start directory
OLD_HOME_NAME = ".koubou"


class UnsafeHome(ConfigError, PermissionError):
    """The home, a directory in it, or a file we were about to open is not safely ours.
    The message says what is wrong and the command that fixes it. A ConfigError (the CLI
    refuses to start with the message) and an OSError (where a file cannot be opened is
    already handled, this is handled the same way)."""


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def check_private_dir(path: Path) -> None:
    """Raise UnsafeHome unless ``path`` (when it exists) is a directory owned by this user that
    neither group nor others may write. A symbolic link to such a directory is fine."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UnsafeHome(f"cannot inspect {path}: {exc.strerror}; set KOUBOU_HOME to a "
                         "directory of your own") from None
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeHome(f"{path} is not a directory; remove it or set KOUBOU_HOME elsewhere")
    me = os.geteuid()
    if info.st_uid != me:
        raise UnsafeHome(
            f"{path} belongs to user {_user(info.st_uid)}, not to you ({_user(me)}): its owner "
            f"could read your prompts and change your tasks. Fix: `sudo chown -R {_user(me)} "
            f"{shlex.quote(str(path))}`, or set KOUBOU_HOME to a directory of your own")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = " and ".join(name for bit, name in ((stat.S_IWGRP, "its group"),
                                                  (stat.S_IWOTH, "every user"))
                           if info.st_mode & bit)
        raise UnsafeHome(
            f"{path} is writable by {who} (mode {stat.S_IMODE(info.st_mode):04o}): they could "
            f"change your tasks and plant files there. Fix: `chmod 700 {shlex.quote(str(path))}`")


def check_home(settings: Settings) -> None:
    """Raise UnsafeHome unless the home and its ``db/``, ``logs/``, ``run/`` (those that
    exist) are this user's alone. Creates nothing."""
    check_private_dir(settings.home)
    for name in HOME_DIRS:
        check_private_dir(settings.home / name)


def open_private(path: Path, flags: int, *, directory_checked: bool = False) -> int:
    """Open a log or marker file of the home without following a symbolic link, creating it
    (mode 0600) when ``flags`` has O_CREAT, its directory too (0700). Returns the descriptor.

    Raises UnsafeHome when ``path`` is a symbolic link or not a regular file, when it or its
    directory belongs to another user, or when the directory is writable by group or others.
    """
    if flags & os.O_CREAT:
        make_private_dir(path.parent)
    if not directory_checked:
        check_private_dir(path.parent)
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o600)
    except OSError:
        if os.path.islink(path):  # ELOOP, or ENXIO/ENOENT for links to odd things
            raise UnsafeHome(f"{path} is a symbolic link; koubou-mcp does not follow links "
                             f"in its home. Fix: `rm {shlex.quote(str(path))}`") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeHome(f"{path} is not a regular file. Fix: remove it "
                             f"(`rm -r {shlex.quote(str(path))}`)")
        if info.st_uid != os.geteuid():
            raise UnsafeHome(f"{path} belongs to user {_user(info.st_uid)}, not to you. Fix: "
                             f"`rm {shlex.quote(str(path))}`")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def is_own_marker(path: Path) -> bool:
    """Whether ``path`` is a regular file (not a link) of this user: the check before acting
    on a marker file (a pid file, a child-group note)."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid()


#: A log file is rotated at this size, keeping this many older ones (``name.log.1``, ...): a
#: burst of errors cannot fill the disk.
LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 3


class PrivateFileHandler(logging.handlers.RotatingFileHandler):
    """A log file of the home, (re)opened through ``open_private``: never through a link; rotated
    at ``max_bytes``.

    It measures the record it writes once and asks the open file its size (one ``fstat``): the
    standard handler looks the path up twice, formats each record a second time to measure it,
    and seeks the file, for every record, which was a tenth of a worker's CPU per task. The
    file's own size also counts what other processes appended to it.
    """

    def _open(self) -> io.TextIOWrapper:
        fd = open_private(Path(self.baseFilename), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        return open(fd, "a", encoding=self.encoding, errors=self.errors)  # noqa: SIM115

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record) + self.terminator
            if self.stream is None:
                self.stream = self._open()
            if self.maxBytes > 0:
                size = len(text) if text.isascii() else len(text.encode(self.encoding or "utf-8"))
                # every write below is flushed, so the file's size is all that was written
                written = os.fstat(self.stream.fileno()).st_size
                if written > 0 and written + size >= self.maxBytes:
                    self.doRollover()
            self.stream.write(text)
            self.stream.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


def private_log_handler(path: Path, *, max_bytes: int = LOG_MAX_BYTES,
                        backups: int = LOG_BACKUPS) -> logging.FileHandler:
    """A handler appending to the log ``path``, rotated at ``max_bytes``; raises UnsafeHome (or
    OSError) at once, not at the first record, when the file cannot be opened safely."""
    return PrivateFileHandler(path, encoding="utf-8", maxBytes=max_bytes, backupCount=backups)


# -- the home the old default left behind ---------------------------------------------------

@dataclass(frozen=True)
class LeftBehind:
    """An old per-directory home (``./.koubou``) that still holds unfinished tasks."""

    home: Path
    pending: int
    in_progress: int

    @property
    def finish_command(self) -> str:
        return f"KOUBOU_HOME={shlex.quote(str(self.home))} koubou-mcp pool"

    @property
    def message(self) -> str:
        return (f"{self.home} (the old default home, ./{OLD_HOME_NAME}) still holds "
                f"{self.pending} pending and {self.in_progress} running tasks that the pool "
                f"of the new default home does not run. Finish them with `{self.finish_command}`"
                f" (Ctrl-C once they are done), or keep using that home: set "
                f"KOUBOU_HOME={shlex.quote(str(self.home))} in the server's environment")

    def as_dict(self) -> dict[str, Any]:
        return {"home": str(self.home), "pending": self.pending,
                "in_progress": self.in_progress, "finish_command": self.finish_command,
                "message": self.message}


def left_behind(settings: Settings, start_dir: Path) -> LeftBehind | None:
    """The old default home in ``start_dir`` when it is not the home in use and its SQLite
    database still holds pending or in-progress tasks; None otherwise. Reads the database
    read-only and creates nothing."""
    from koubou_mcp.store import peek_unfinished  # the lock and log helpers stay light

    old = start_dir.absolute() / OLD_HOME_NAME
    try:
        if old.resolve() == settings.home.resolve():
            return None
    except OSError:
        return None
    counts = peek_unfinished(old / "db" / "koubou.db")
    if not counts or not any(counts.values()):
        return None
    return LeftBehind(old, counts["pending"], counts["in_progress"])


__all__ = ["HOME_DIRS", "OLD_HOME_NAME", "LeftBehind", "PrivateFileHandler", "UnsafeHome",
           "check_home", "check_private_dir", "is_own_marker", "left_behind", "open_private",
           "private_log_handler"]
