"""No secret in any log line, at any level: the redacting log filter.

The server's own lines never carry a secret (they name a request by its path, never its
query), and endpoints.base.BaseHandler keeps Tornado's lines about a request to that summary. What
is left are lines Tornado writes from deeper down, where only the text is at hand: a
malformed request quotes the offending header (`Invalid header value 'Bearer ...'`), an
exception's message may quote a value. This filter rewrites every record it sees, message
and traceback: a `token=` value, a `Bearer`/`Basic` credential, an `Authorization` value and
a quoted bad header become <redacted>, and so does any configured secret (auth_token,
api.key) wherever it appears. install() puts it on Tornado's loggers (so an embedding
application gets it too); runtime.logs.configure_logging() also puts it on the log handler, so
it sees every logger's records.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

REDACTED = "<redacted>"
# A secret shorter than this is replaced only where a rule below finds it: replacing
# every occurrence of a 2-character token would make the log unreadable.
MIN_LITERAL = 4

RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    # a query argument: ?token=..., &access_token=...
    (re.compile(r"(?i)(\b(?:access_)?token=)[^&;\s'\"#]*"), rf"\1{REDACTED}"),
    # an Authorization header's value, whatever its scheme
    (re.compile(r"(?i)(\bauthorization['\"]?\s*[:=]\s*['\"]?)[^'\"\r\n]*"), rf"\1{REDACTED}"),
    # a credential seen without its header name ("basic" alone is an English word)
    (re.compile(r"\b((?i:bearer)|Basic)(\s+)[^\s'\",]+"), rf"\1\2{REDACTED}"),
    # a JWT wherever it appears (its header and payload are base64url JSON: "eyJ")
    (re.compile(r"\beyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*"), REDACTED),
    # Tornado's "Invalid header value %r" and the like: the whole value goes
    (re.compile(r"(?i)(\binvalid header (?:value|name|line)\b).*"), rf"\1 {REDACTED}"),
)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with every credential it shows replaced by <redacted>."""
    for secret in secrets:
        for form in {secret, repr(secret)[1:-1]}:
            if form in text:
                text = text.replace(form, REDACTED)
    for pattern, replacement in RULES:
        text = pattern.sub(replacement, text)
    return text


class RedactingFilter(logging.Filter):
    """Rewrites a record's message and traceback with redact(); never drops a record."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()
        self._formatter = logging.Formatter()

    def protect(self, *secrets: str) -> None:
        """Configured secrets to replace wherever they appear."""
        self.secrets.update(s for s in secrets if len(s) >= MIN_LITERAL)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format: leave it to the handler to report
            return True
        record.msg = redact(message, self.secrets)
        record.args = None
        if record.exc_info and not record.exc_text:
            # The formatters use exc_text once set (runtime.logs.JSONFormatter too).
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self.secrets)
        return True


# One filter for the process: logging is process-wide too.
FILTER = RedactingFilter()
TORNADO_LOGGERS = ("tornado.access", "tornado.application", "tornado.general")


def install(*secrets: str) -> RedactingFilter:
    """Put the filter on Tornado's loggers (once) and protect these secrets."""
    FILTER.protect(*secrets)
    for name in TORNADO_LOGGERS:
        logger = logging.getLogger(name)
        if FILTER not in logger.filters:
            logger.addFilter(FILTER)
    return FILTER
