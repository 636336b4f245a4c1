"""Log limits: a burst of one message is cut short and summed up; log files rotate at a size."""

from __future__ import annotations

import logging
from pathlib import Path

from koubou_mcp.config import Settings
from koubou_mcp.home import private_log_handler
from koubou_mcp.throttle import RepeatFilter


def test_a_repeated_error_passes_a_few_times_per_window_then_says_how_many_were_dropped(
    tmp_path: Path,
) -> None:
    now = [0.0]
    logger = logging.getLogger("koubou_mcp.test_throttle")
    logger.propagate = False
    handler = private_log_handler(tmp_path / "logs" / "server.log")
    repeats = RepeatFilter(burst=3, window_s=60.0, clock=lambda: now[0])
    handler.addFilter(repeats)
    second = logging.StreamHandler(open(tmp_path / "stderr.txt", "w"))  # noqa: SIM115
    second.addFilter(repeats)  # shared: each record is counted once
    logger.addHandler(handler)
    logger.addHandler(second)
    try:
        for _ in range(1000):
            try:
                raise OSError(24, "Too many open files")
            except OSError:
                logger.exception("socket.accept() out of system resource")
        logger.warning("another message")
        now[0] = 61.0
        logger.error("socket.accept() out of system resource")
    finally:
        logger.removeHandler(handler)
        logger.removeHandler(second)
        handler.close()
        second.close()
    text = (tmp_path / "logs" / "server.log").read_text()
    assert text.count("socket.accept() out of system resource") == 4
    assert "another message" in text
    assert "[997 more like this in the last 60 s were not logged]" in text
    assert (tmp_path / "stderr.txt").read_text().count("out of system resource") == 4


def test_a_log_file_rotates_at_its_size_limit(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "server.log"
    handler = private_log_handler(path, max_bytes=10_000, backups=2)
    logger = logging.getLogger("koubou_mcp.test_rotation")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        for i in range(2000):
            logger.warning("line %d %s", i, "x" * 80)
    finally:
        logger.removeHandler(handler)
        handler.close()
    files = sorted(p.name for p in path.parent.iterdir())
    assert files == ["server.log", "server.log.1", "server.log.2"]
    assert all((path.parent / name).stat().st_size <= 10_000 for name in files)
    assert all((path.parent / name).stat().st_mode & 0o777 == 0o600 for name in files)


def test_setup_logging_limits_repeats_on_stderr_and_in_the_file(
    tmp_path: Path, capsys: object,
) -> None:
    from koubou_mcp.cli import setup_logging

    settings = Settings.from_env({}, home=str(tmp_path / "home"))
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging(settings, tmp_path / "home" / "logs" / "x.log", stderr_level=logging.ERROR)
        for _ in range(100):
            logging.getLogger("asyncio").error("socket.accept() out of system resource")
        for handler in root.handlers:
            handler.flush()
    finally:
        for handler in root.handlers:
            if handler not in saved[0]:
                handler.close()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    assert (tmp_path / "home" / "logs" / "x.log").read_text().count("out of system") == 5
