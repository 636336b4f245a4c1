"""A task's workdir and files on a real file system: every way a path is refused, and what the
model gets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from koubou_mcp.taskfiles import (
    MAX_FILES,
    FileRefused,
    check_files,
    check_workdir,
    prompt_with_files,
    read_files,
)

LIMIT = 1000


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    (root / "src").mkdir(parents=True)
    (root / "src" / "a.py").write_text("print('a')\n")
    (root / "notes.md").write_text("# notes\n")
    return root


def refused(fn, *args) -> FileRefused:  # type: ignore[no-untyped-def]
    with pytest.raises(FileRefused) as caught:
        fn(*args)
    return caught.value


# -- workdir ----------------------------------------------------------------------------------

def test_the_workdir_defaults_to_the_delegating_directory_resolved(project: Path,
                                                                   tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(project)
    assert check_workdir(None, link) == str(project.resolve())
    assert check_workdir(str(project), Path("/")) == str(project.resolve())


@pytest.mark.parametrize("value, words", [
    ("relative/dir", "must be an absolute path"),
    ("", "must be an absolute path"),
    (42, "must be an absolute path (a string)"),
    (["/tmp"], "must be an absolute path (a string)"),
    ("/no/such/dir/anywhere", "does not exist"),
    ("/tmp/\x00x", "without NUL"),
])
def test_a_bad_workdir_is_refused_saying_why(value: object, words: str) -> None:
    error = refused(check_workdir, value, Path("/"))
    assert words in str(error) and error.field == "workdir"


def test_a_workdir_that_is_a_file_is_refused(project: Path) -> None:
    assert "is not a directory" in str(refused(check_workdir, str(project / "notes.md"), Path("/")))


# -- files ------------------------------------------------------------------------------------

def test_files_relative_or_absolute_inside_the_workdir_are_kept_as_named(project: Path) -> None:
    names = check_files(["src/a.py", str(project / "notes.md")], str(project), LIMIT)
    assert names == ("src/a.py", str(project / "notes.md"))
    assert check_files(None, str(project), LIMIT) == () == check_files([], str(project), LIMIT)


def test_a_file_outside_the_workdir_is_refused_even_through_a_link(project: Path,
                                                                   tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret")
    (project / "innocent.txt").symlink_to(secret)
    for name in ("../secret.txt", str(secret), "innocent.txt"):
        error = refused(check_files, [name], str(project), LIMIT)
        assert "outside the task's workdir" in str(error) and error.index == 0
    assert "leads to" in str(refused(check_files, ["innocent.txt"], str(project), LIMIT))


def test_a_link_to_a_file_inside_the_workdir_is_fine(project: Path) -> None:
    (project / "alias.py").symlink_to(project / "src" / "a.py")
    [read] = read_files(["alias.py"], str(project), LIMIT)
    assert read.name == "alias.py" and read.text == "print('a')\n"


@pytest.mark.parametrize("setup, name, words", [
    (lambda p: None, "missing.txt", "does not exist"),
    (lambda p: None, "src", "is a directory"),
    (lambda p: (p / "bin.dat").write_bytes(b"\x7fELF\x00\x01"), "bin.dat", "binary"),
    (lambda p: (p / "latin.txt").write_bytes("café".encode("latin-1")), "latin.txt", "not UTF-8"),
    (lambda p: os.mkfifo(p / "pipe"), "pipe", "not a regular file"),
    (lambda p: (p / "big.txt").write_text("x" * (LIMIT + 1)), "big.txt", "beyond their limit"),
])
def test_each_kind_of_unusable_file_is_refused_naming_it(project: Path, setup, name: str,  # type: ignore[no-untyped-def]
                                                        words: str) -> None:
    setup(project)
    error = refused(check_files, ["notes.md", name], str(project), LIMIT)
    assert words in str(error) and f"files[1] ({name!r})" in str(error)
    assert error.field == "files" and error.index == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_is_refused(project: Path) -> None:
    (project / "notes.md").chmod(0)
    assert "permission denied" in str(refused(check_files, ["notes.md"], str(project), LIMIT))


def test_the_limit_is_on_the_files_total(project: Path) -> None:
    (project / "half1.txt").write_text("x" * 600)
    (project / "half2.txt").write_text("y" * 600)
    check_files(["half1.txt"], str(project), LIMIT)
    error = refused(check_files, ["half1.txt", "half2.txt"], str(project), LIMIT)
    assert "KOUBOU_MAX_FILES_BYTES" in str(error) and error.index == 1


@pytest.mark.parametrize("value, words", [
    ("notes.md", "must be a list of paths"),
    ({"a": 1}, "must be a list of paths"),
    ([""], "must be a non-empty path"),
    ([3], "must be a non-empty path"),
    (["a\x00b"], "printable path"),
    (["notes.md", "./notes.md"], "same file as files[0]"),
    (["notes.md"] * (MAX_FILES + 1), f"at most {MAX_FILES}"),
])
def test_a_bad_files_list_is_refused(project: Path, value: object, words: str) -> None:
    assert words in str(refused(check_files, value, str(project), LIMIT))


def test_a_workdir_gone_by_run_time_is_reported(project: Path, tmp_path: Path) -> None:
    error = refused(read_files, ["a"], str(tmp_path / "gone"), LIMIT)
    assert error.field == "workdir" and "no longer exists" in str(error)


def test_the_model_gets_each_file_under_a_header_of_its_own(project: Path) -> None:
    files = read_files(["src/a.py", "notes.md"], str(project), LIMIT)
    text = prompt_with_files("Summarise these.", files)
    assert text.startswith("Summarise these.\n")
    assert "===== file: src/a.py (11 bytes) =====\nprint('a')\n===== end of file: src/a.py" in text
    assert "===== file: notes.md (8 bytes) =====\n# notes\n===== end of file: notes.md" in text
    assert prompt_with_files("plain", []) == "plain"


def test_a_symbolic_link_loop_is_refused_not_a_crash(project: Path) -> None:
    (project / "loop").symlink_to(project / "loop")
    error = refused(check_files, ["loop"], str(project), LIMIT)
    assert error.field == "files" and "files[0] ('loop')" in str(error)
    assert refused(check_workdir, str(project / "loop"), Path("/")).field == "workdir"
