"""Log output for people and for journald: text (the default) or JSON lines (``edgecoop --log-format json``).

Text::

    2026-11-30 15:02:11,042 WARNING edgecoop.connection: air-park: connection to mqtt://hub:1883 lost: ...; reconnecting

JSON lines (one object per record, never spread over several lines, so a traceback stays one journal entry)::

    {"ts": "2026-11-30T15:02:11.042+00:00", "level": "WARNING", "logger": "edgecoop.connection",
     "message": "air-park: connection to mqtt://hub:1883 lost: ...; reconnecting", "pid": 4242}

Under systemd (``$JOURNAL_STREAM`` names the stream the records go to) every line starts with its syslog priority,
``<4>`` for a warning, which journald turns into the entry's PRIORITY and strips: ``journalctl -p warning`` then shows
exactly the warnings and errors. The format comes from ``--log-format`` or ``EDGECOOP_LOG_FORMAT`` (e.g. in
/etc/edgecoop/edgecoop.env).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from typing import IO, Any

__all__ = ["LOG_FORMATS", "JsonFormatter", "formatter_for", "setup_logging"]

LOG_FORMATS = ("text", "json")
_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Python level -> syslog priority (sd-daemon(3) prefixes)
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (ISO 8601, UTC), level, logger, message, pid, and exception when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class _JournalPriority(logging.Formatter):
    """Prefix each line with ``<priority>`` for journald (only the first line of a multi-line text record)."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self._inner = inner

    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        return f"<{priority}>{self._inner.format(record)}"


def _is_journal(stream: IO[str]) -> bool:
    """Whether ``stream`` is the journal stream systemd connected us to (``$JOURNAL_STREAM`` is ``dev:inode``)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def formatter_for(fmt: str, stream: IO[str]) -> logging.Formatter:
    """The formatter of ``fmt`` (``text`` or ``json``), with journald priorities when ``stream`` is the journal."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {fmt!r}")
    formatter: logging.Formatter = JsonFormatter() if fmt == "json" else logging.Formatter(_TEXT)
    return _JournalPriority(formatter) if _is_journal(stream) else formatter


def setup_logging(level: int, fmt: str = "text", stream: IO[str] | None = None) -> logging.Handler | None:
    """Configure the root logger for a command, as :func:`logging.basicConfig` does (and, like it, not at all when
    the root logger has handlers already, e.g. under pytest): records of ``level`` and above go to ``stream``
    (default stderr) as ``fmt``."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {fmt!r}")
    root = logging.getLogger()
    if root.handlers:
        return None
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter_for(fmt, handler.stream))
    root.addHandler(handler)
    root.setLevel(level)
    return handler
