"""The log line: the standard format exactly, formatted once per record, the time to the ms."""

from __future__ import annotations

import io
import logging
import sys

from koubou_mcp.logformat import LINE, LineFormatter


def _record(created: float, msg: str = "task %s done", *args: object,
            exc_info: object = None) -> logging.LogRecord:
    record = logging.LogRecord("koubou_mcp.worker", logging.INFO, __file__, 1, msg, args,
                               exc_info)  # type: ignore[arg-type]
    record.created = created
    record.msecs = (created - int(created)) * 1000
    return record


def test_lines_are_the_standard_formatters_across_seconds_and_with_a_traceback() -> None:
    ours, standard = LineFormatter(), logging.Formatter(LINE)
    try:
        raise ValueError("boom")
    except ValueError:
        failure = sys.exc_info()
    # within one second, into the next, back to an earlier one (threads log out of order)
    for created in (1764780000.001, 1764780000.999, 1764780001.5, 1764779999.25, 1764783600.0):
        assert ours.format(_record(created, "task %s done", "t1")) == \
            standard.format(_record(created, "task %s done", "t1"))
    assert ours.format(_record(1764780002.0, "crashed", exc_info=failure)) == \
        standard.format(_record(1764780002.0, "crashed", exc_info=failure))


class _Counting(LineFormatter):
    def __init__(self) -> None:
        super().__init__()
        self.messages = 0

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802
        self.messages += 1
        return super().formatMessage(record)


def test_two_handlers_sharing_the_formatter_format_each_record_once() -> None:
    formatter = _Counting()
    first, second = io.StringIO(), io.StringIO()
    logger = logging.getLogger("koubou_mcp.test_logformat")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handlers = [logging.StreamHandler(first), logging.StreamHandler(second)]
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    try:
        logger.info("claimed %s", "task_a")
        logger.info("claimed %s", "task_b")
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
    assert formatter.messages == 2
    assert first.getvalue() == second.getvalue()
    assert [line.rsplit(" ", 1)[-1] for line in first.getvalue().splitlines()] == \
        ["task_a", "task_b"]
