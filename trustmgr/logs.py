"""Log output: plain lines for people, JSON lines for log pipelines."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

FIELDS = ("cluster", "mesh", "provider", "rotation")
"""Record attributes (``extra=``) copied into JSON lines when present."""


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, and the fields of
    :data:`FIELDS` a record carries. Tracebacks, when asked for, go in ``error``."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, sort_keys=False)


def use_json() -> None:
    """Switch every handler of the root logger to JSON lines."""
    for handler in logging.getLogger().handlers:
        handler.setFormatter(JsonFormatter())
