"""Everything the process writes to its logs, one JSON object per line (human-readable on a terminal).

Two streams: the access log, a line per answer, on stdout (written in batches, one write per turn of
the event loop); and everything the `logging` module says (uvicorn starting and stopping, the
service's own errors with their traceback), on stderr, each record one JSON line too. No line ever
holds a client's bytes unescaped, so no client can forge a line.
"""

import asyncio
import logging
import sys
import traceback
from datetime import UTC, datetime
from typing import Any, Final, TextIO

import msgspec


class AccessRecord(msgspec.Struct):
    """One access-log line. Never holds a secret or a request header other than the request id."""

    time: datetime
    request_id: str
    method: str | None  # None when the request line could not be read
    route: str | None  # the route template, e.g. /api/v1/tickets/{ref}; None when no route matched
    path: str | None  # the decoded path; None when the request line could not be read
    status: int
    duration_ms: float
    desk: str | None  # the authenticated token's desk, when a token was accepted
    token_id: str | None
    error: str | None  # the contract's error code of an error response
    limit: str | None = None  # a create's admission: allowed, unlimited, rate_limited, shed (app/limiter.py)


def printable(text: str | None) -> str:
    """Text as it may appear on a terminal line: control characters (a decoded %0a, an escape
    sequence) are written as escapes, so a path cannot end the line or move the cursor."""
    if text is None:
        return "-"
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def human_line(record: AccessRecord) -> str:
    """The terminal form of a record: time, status, method, path, duration, then the ids."""
    line = (
        f"{record.time:%H:%M:%S.%f}"[:-3]
        + f" {record.status} {printable(record.method)} {printable(record.path)} {record.duration_ms:.1f}ms"
        + f" id={record.request_id}"
    )
    if record.desk is not None:
        line += f" desk={record.desk} token={record.token_id}"
    if record.error is not None:
        line += f" error={record.error}"
    if record.limit is not None:
        line += f" limit={record.limit}"
    return line + "\n"


_encode_lines: Final = msgspec.json.Encoder().encode_lines


class AccessLog:
    """Queues records and writes those of one event-loop turn to stdout in one write."""

    __slots__ = ("_human", "_pending", "_stream")

    def __init__(self) -> None:
        self._pending: list[AccessRecord] = []
        self._stream: TextIO | None = None
        self._human = False

    def emit(self, record: AccessRecord) -> None:
        if not self._pending:
            asyncio.get_running_loop().call_soon(self.flush)
        self._pending.append(record)

    def flush(self) -> None:
        records, self._pending = self._pending, []
        stream = sys.stdout  # looked up each time, so a redirected stdout is honoured
        try:
            if stream is not self._stream:
                self._stream, self._human = stream, stream.isatty()
            if self._human:
                stream.write("".join(map(human_line, records)))
            else:
                stream.write(_encode_lines(records).decode())
            stream.flush()
        except (OSError, ValueError):  # stdout closed or gone: the request must not fail for its log
            pass


ACCESS_LOG: Final = AccessLog()


class LogLine(msgspec.Struct, omit_defaults=True):
    """One line of everything else: a `logging` record."""

    time: datetime
    level: str
    logger: str
    message: str
    exception: str | None = None  # the traceback, when the record carries one


_encode: Final = msgspec.json.Encoder().encode


class JsonFormatter(logging.Formatter):
    """A `logging` record as one JSON line (its traceback inside it), or uvicorn's plain form on a terminal."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__("%(levelname)s: %(message)s")
        self._human = (stream or sys.stderr).isatty()

    def format(self, record: logging.LogRecord) -> str:
        if self._human:
            return super().format(record)
        exception = None
        if record.exc_info:
            exception = "".join(traceback.format_exception(*record.exc_info))
        line = LogLine(
            datetime.fromtimestamp(record.created, UTC), record.levelname, record.name, record.getMessage(), exception
        )
        return _encode(line).decode()


def logging_config() -> dict[str, Any]:
    """The `logging` configuration `headoni serve` gives uvicorn: every logger's records as JSON on stderr."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["stderr"], "level": "WARNING"},
        "loggers": {
            "uvicorn": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
            "uvicorn.error": {"level": "INFO"},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
            "headoni": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
        },
    }
