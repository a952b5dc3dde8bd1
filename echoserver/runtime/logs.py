"""Logging: the handler on stderr (plain or one JSON object per line) with the redacting
filter on it, so no secret reaches stderr from any logger.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from echoserver.config import Settings
from echoserver.web import redact
from echoserver.wire.hosts import Throttle

log = logging.getLogger("echoserver")


class JSONFormatter(logging.Formatter):
    """One JSON object per line; an access line's fields (extra={"access": {...}}) as keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            entry.update(access)
        if record.exc_info:  # exc_text: set (redacted) by redact.RedactingFilter
            entry["exception"] = record.exc_text or self.formatException(record.exc_info)
        else:
            cause = getattr(record, "exception", None)
            if isinstance(cause, str):  # a cause without its traceback
                entry["exception"] = cause
        return json.dumps(entry)


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log.format == "json":
        handler.setFormatter(JSONFormatter())
        # What would otherwise reach stderr as plain text goes through the handler too.
        logging.captureWarnings(True)
        sys.excepthook = lambda *exc: log.critical("uncaught exception", exc_info=exc)
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # Every record on its way out, from any logger: no secret reaches stderr.
    handler.addFilter(redact.install(settings.websocket.auth_token, settings.api.key))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log.level.upper())


class OncePer:
    """Log at most one line per `interval` seconds; the next says how many were held back
    (for what a client can make the server log by the line)."""

    def __init__(self, level: int, interval: float) -> None:
        self.level = level
        self._throttle = Throttle(interval)

    def __call__(self, message: str, *args: object) -> None:
        held = self._throttle.ready(time.monotonic())
        if held is None:
            return
        if held:
            message += " (and %d more like it in the last %.0fs)"
            args = (*args, held, self._throttle.interval)
        log.log(self.level, message, *args)
