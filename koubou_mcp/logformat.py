"""The log line (``DATE TIME,MS LEVEL LOGGER [PID] MESSAGE``), cheap enough for a worker's loop.

A worker logs two lines per task. With the standard ``Formatter`` and two handlers (a worker
started by hand logs to its file and to stderr) a line cost about 55 us of CPU, 30 us with one
handler: together a tenth of a worker's CPU per task in the throughput benchmark. Most of it
was work done again for every line or every handler:

* the text is formatted once per record, not once per handler (``LineFormatter.format``);
* the date and time up to the second are formatted once per second (``formatTime``);
* ``lean_records`` stops each record from looking up its caller's frame, thread and
  multiprocessing name, none of which the line shows (the logging HOWTO's "Optimization").
"""

from __future__ import annotations

import logging
import time

LINE = "%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"


class LineFormatter(logging.Formatter):
    """``LINE``, formatted once per record however many handlers share this formatter."""

    def __init__(self) -> None:
        super().__init__(LINE)
        #: (the second, its formatted date and time): one tuple, so threads swap it whole
        self._second: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second, stamp = self._second
        if int(record.created) != second:
            stamp = time.strftime(self.default_time_format, self.converter(record.created))
            self._second = (int(record.created), stamp)
        return f"{stamp},{int(record.msecs):03d}"  # the standard Formatter's default_msec_format

    def format(self, record: logging.LogRecord) -> str:
        done = record.__dict__.get("_koubou_line")
        if done is not None and done[0] is self:
            return str(done[1])
        text = super().format(record)
        record.__dict__["_koubou_line"] = (self, text)
        return text


def lean_records() -> None:
    """Records stop collecting what ``LINE`` never shows (process-wide; the source file, line
    and function of the call, the thread and the multiprocessing process names)."""
    logging._srcfile = None  # the documented way to skip findCaller
    logging.logThreads = False
    logging.logMultiprocessing = False


__all__ = ["LINE", "LineFormatter", "lean_records"]
