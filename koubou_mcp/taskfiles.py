"""A task's project directory and the files it hands the model: checked at submit, read when
the task runs.

A task records the directory it belongs to (``workdir``: absolute, existing, a directory) and
the paths of the files it names, not their contents: the worker reads them when the task runs
and puts each one into the prompt under a header of its own. The same rules apply at both
times (the files may have changed in between): a path must lead, after resolving every
symbolic link, to a regular file inside the task's directory that can be read, is UTF-8 text
(no NUL byte) and keeps the files' total within the limit. Nothing here touches the store.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Most files one task may name (their total size has its own limit, KOUBOU_MAX_FILES_BYTES).
MAX_FILES = 50
#: Longest path accepted, characters (Linux's PATH_MAX).
MAX_PATH_CHARS = 4096


class FileRefused(ValueError):
    """A working directory or a file a task cannot use; the message says which and why.

    ``field`` is the request field to blame (``workdir`` or ``files``), ``index`` the position
    of the file in ``files`` when one is to blame.
    """

    def __init__(self, message: str, field: str, index: int | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.index = index


@dataclass(frozen=True)
class FileText:
    """One file as the model gets it."""

    #: the path as the task names it
    name: str
    text: str
    size_bytes: int


def check_workdir(value: Any, default: Path) -> str:
    """The task's working directory: ``value`` (None: ``default``, the directory of the
    server or command that delegates), which must be an absolute path of an existing
    directory. Returned resolved (symbolic links followed), as the task stores it."""
    if value is None:
        value = str(default)
    if not isinstance(value, str):
        raise FileRefused(f"workdir must be an absolute path (a string), got "
                          f"{_kind(value)}", "workdir")
    if not value or "\x00" in value or len(value) > MAX_PATH_CHARS:
        raise FileRefused("workdir must be an absolute path without NUL characters, of at "
                          f"most {MAX_PATH_CHARS} characters", "workdir")
    if not os.path.isabs(value):
        raise FileRefused(f"workdir must be an absolute path, got {value!r}; give the "
                          "project's full path (for example the output of `pwd`)", "workdir")
    try:
        resolved = Path(value).resolve(strict=True)
        mode = resolved.stat().st_mode
    except FileNotFoundError:
        raise FileRefused(f"workdir {value!r} does not exist", "workdir") from None
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symbolic link loop (3.11)
        raise FileRefused(f"workdir {value!r} cannot be used: "
                          f"{getattr(exc, 'strerror', None) or exc}", "workdir") from None
    if not stat.S_ISDIR(mode):
        raise FileRefused(f"workdir {value!r} is not a directory", "workdir")
    return str(resolved)


def check_files(value: Any, workdir: str, max_total_bytes: int) -> tuple[str, ...]:
    """The paths of ``files`` as the task keeps them, after checking that each can be read
    now (see the module's rules). An empty list is no files."""
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise FileRefused(f"files must be a list of paths, got {_kind(value)}", "files")
    if len(value) > MAX_FILES:
        raise FileRefused(f"files names {len(value)} files; at most {MAX_FILES} are accepted",
                          "files")
    names: list[str] = []
    for index, raw in enumerate(value):
        if not isinstance(raw, str) or not raw.strip():
            raise FileRefused(f"files[{index}] must be a non-empty path, got {_kind(raw)}",
                              "files", index)
        if "\x00" in raw or len(raw) > MAX_PATH_CHARS or not raw.isprintable():
            raise FileRefused(f"files[{index}] must be a printable path of at most "
                              f"{MAX_PATH_CHARS} characters", "files", index)
        names.append(raw)
    read_files(names, workdir, max_total_bytes)
    return tuple(names)


def read_files(names: Sequence[str], workdir: str, max_total_bytes: int) -> list[FileText]:
    """Read the files ``names`` of a task whose directory is ``workdir``; FileRefused names
    the first that breaks a rule."""
    root = Path(workdir)
    try:
        root = root.resolve(strict=True)
    except OSError:
        raise FileRefused(f"the task's workdir {workdir!r} no longer exists", "workdir") from None
    seen: dict[Path, int] = {}
    out: list[FileText] = []
    total = 0
    for index, name in enumerate(names):
        path = _inside(root, name, index)
        if path in seen:
            raise FileRefused(f"files[{index}] ({name!r}) is the same file as "
                              f"files[{seen[path]}]; name each file once", "files", index)
        seen[path] = index
        data = _read(path, name, index, max_total_bytes - total, max_total_bytes)
        total += len(data)
        if b"\x00" in data:
            raise FileRefused(f"files[{index}] ({name!r}) is a binary file (it holds NUL "
                              "bytes); only text files can be given to the model", "files", index)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FileRefused(f"files[{index}] ({name!r}) is not UTF-8 text (byte {exc.start} "
                              "is not); only text files can be given to the model",
                              "files", index) from None
        out.append(FileText(name, text, len(data)))
    return out


def _inside(root: Path, name: str, index: int) -> Path:
    """The file ``name`` (relative to ``root``, or absolute) with every link resolved, which
    must lie inside ``root``."""
    given = Path(name)
    candidate = given if given.is_absolute() else root / given
    try:
        # outside first, whether or not it exists: nothing is said about paths outside
        leads_to = candidate.resolve(strict=False)
        if not leads_to.is_relative_to(root):
            where = "" if leads_to == candidate else f" (it leads to {leads_to})"
            raise FileRefused(f"files[{index}] ({name!r}) is outside the task's workdir "
                              f"{root}{where}; only files inside it can be given", "files",
                              index)
        return candidate.resolve(strict=True)
    except FileNotFoundError:
        raise FileRefused(f"files[{index}] ({name!r}) does not exist in {root}", "files",
                          index) from None
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symbolic link loop (3.11)
        raise FileRefused(f"files[{index}] ({name!r}) cannot be used: "
                          f"{getattr(exc, 'strerror', None) or exc}", "files", index) from None


def _read(path: Path, name: str, index: int, room: int, limit: int) -> bytes:
    """The bytes of a regular file, refusing one that would take the total beyond ``limit``
    (``room`` bytes are left)."""
    try:
        # O_NONBLOCK: opening a FIFO that slipped in must not hang the caller
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except PermissionError:
        raise FileRefused(f"files[{index}] ({name!r}) cannot be read (permission denied)",
                          "files", index) from None
    except OSError as exc:
        raise FileRefused(f"files[{index}] ({name!r}) cannot be read: {exc.strerror or exc}",
                          "files", index) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise FileRefused(f"files[{index}] ({name!r}) is a directory; name the files in "
                              "it instead", "files", index)
        raise FileRefused(f"files[{index}] ({name!r}) is not a regular file", "files", index)
    with os.fdopen(fd, "rb") as handle:
        try:
            data = handle.read(max(room, 0) + 1)
        except OSError as exc:
            raise FileRefused(f"files[{index}] ({name!r}) cannot be read: "
                              f"{exc.strerror or exc}", "files", index) from None
    if len(data) > room:
        raise FileRefused(f"files[{index}] ({name!r}) takes the files beyond their limit of "
                          f"{limit} bytes in all (KOUBOU_MAX_FILES_BYTES); give fewer or smaller "
                          "files, or the parts that matter", "files", index)
    return data


def prompt_with_files(prompt: str, files: Sequence[FileText]) -> str:
    """The prompt the model gets: the task's prompt, then each file between a header naming
    it and an end line, so the model can tell them apart and refer to them by name."""
    if not files:
        return prompt
    parts = [prompt.rstrip(), "", f"The task comes with {len(files)} file(s), each between "
             "its header and end line:"]
    for f in files:
        parts += ["", f"===== file: {f.name} ({f.size_bytes} bytes) =====", f.text.rstrip("\n"),
                  f"===== end of file: {f.name} ====="]
    return "\n".join(parts) + "\n"


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return repr(value[:60])
    return {dict: "an object", list: "a list", bool: "true/false"}.get(type(value),
                                                                      type(value).__name__)


__all__ = ["MAX_FILES", "FileRefused", "FileText", "check_files", "check_workdir",
           "prompt_with_files", "read_files"]
