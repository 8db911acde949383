"""Log output: text lines for a terminal or journald, JSON lines for a log collector.

    [node]
    log_format = "json"        # ipop-trio signal --log-format json

One JSON object per line: `time` (RFC 3339, UTC, milliseconds), `level`, `logger`,
`message`, and `exception` (the traceback) when there is one. Newlines and control
characters in a message (a peer's reason, a name) are escaped by JSON, so one record is
always one line.
"""

from __future__ import annotations

import datetime
import json
import logging

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC)
        out = {
            "time": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup(level: str, fmt: str = "text") -> None:
    """Configure the root logger: `level` (debug, info, ...), `fmt` one of LOG_FORMATS."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {LOG_FORMATS}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])


__all__ = ["LOG_FORMATS", "JsonFormatter", "setup"]
