"""Log lines of ``imago serve``: plain text or one JSON object per line.

Every record logged while a request is being served carries that request's
id (the one sent back to the client as ``x-request-id``), taken from a
context variable: asyncio copies context variables into every task an RPC
starts, so scheduler and dispatch code log the id without passing it along.
A record may also name its request explicitly with
``extra={"request_id": ...}``, which wins over the context.

Standard library only, so that any process may use it without importing
grpc or torch.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from datetime import datetime, timezone

#: Format of text lines; `` [request_id]`` follows when there is one.
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FORMATS = ("text", "json")

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "imago_request_id", default=None
)


def current_request_id() -> str | None:
    """The id of the request being served in this context, None outside one."""
    return _request_id.get()


def set_request_id(request_id: str | None) -> None:
    """Make ``request_id`` the current request's id for this context and the
    tasks it starts from now on."""
    _request_id.set(request_id)


class RequestIdFilter(logging.Filter):
    """Gives every record a ``request_id`` attribute (None outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = _request_id.get()
        return True


class TextFormatter(logging.Formatter):
    """:data:`TEXT_FORMAT`, with `` [request_id]`` appended inside a request.
    A ``process`` name (a worker's id) goes before the logger's name."""

    def __init__(self, process: str | None = None) -> None:
        super().__init__(TEXT_FORMAT.replace("%(name)s", f"{process} %(name)s", 1) if process
                         else TEXT_FORMAT)  # fmt: skip

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = getattr(record, "request_id", None)
        if not request_id:
            return line
        # The id belongs to the message's first line, not after a traceback.
        first, newline, rest = line.partition("\n")
        return f"{first} [{request_id}]{newline}{rest}"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (ISO 8601, UTC, milliseconds),
    ``level``, ``logger``, ``message``, and where present ``process`` (a
    worker's id), ``request_id``, ``exc_info`` and ``stack_info`` (formatted
    tracebacks)."""

    def __init__(self, process: str | None = None) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.fromtimestamp(record.created, tz=timezone.utc)
        entry: dict[str, object] = {
            "time": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.process:
            entry["process"] = self.process
        request_id = getattr(record, "request_id", None)
        if request_id:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        # json.dumps escapes newlines inside strings: one record, one line.
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(level: str, fmt: str = "text", process: str | None = None) -> None:
    """Send every log record of this process to stderr at ``level`` ("debug",
    "info", "warning", "error"; any case) as ``fmt`` ("text" or "json"),
    naming ``process`` (a worker's id) in every line when given.

    Replaces whatever handlers the root logger had, and routes Python
    warnings through logging so that JSON logs stay one object per line.
    """
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter(process) if fmt == "json" else TextFormatter(process))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)


def current_format() -> str:
    """The format this process logs in ("json" or "text"), for the worker
    processes it starts to log the same way."""
    handlers = logging.getLogger().handlers
    return "json" if any(isinstance(h.formatter, JsonFormatter) for h in handlers) else "text"
