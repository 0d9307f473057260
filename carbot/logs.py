"""Logging for every `carbot` process: readable lines for a person, or one JSON object per line for a collector.

`CARBOT_LOG_FORMAT=json` turns each record into `{"time", "level", "logger", "message"}`, plus
`"exception"` when there is a traceback and any `extra=` fields the call passed. Filters on the
handler (the Telegram bot's token redaction) run before formatting, so they guard both formats.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# What every LogRecord carries; anything else on a record came from `extra=` and goes into the JSON object.
_STANDARD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in messages and tracebacks are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        # As logging.Formatter does: a filter may already have set (and redacted) exc_text.
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRIBUTES and key not in entry:
                entry[key] = value
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure(*, level: int, json_format: bool) -> None:
    """Log to standard error at `level`, as text or JSON.

    Like `logging.basicConfig`, this does nothing when the root logger already has a handler
    (a test runner's, or an embedding program's): theirs stay in charge.
    """
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json_format else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
