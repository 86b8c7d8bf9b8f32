"""The server's log: stdlib `logging` under the `lorafleet` logger, as text or one JSON object per line.

Loggers: `lorafleet.server` (banner, lifecycle), `lorafleet.access` (one line per finished or refused
request), `lorafleet.adapters` (adapter registered/unregistered, loaded into the pool, evicted), and
`lorafleet.steps` (--log-steps). INFO and below go to stdout, WARNING and above to stderr.

Every line carries a message and structured fields (`event(logger, message, **fields)`):
    text: 2026-11-30T06:40:00.123Z INFO access request finished id=req-3 adapter=sql status=200 ...
    json: {"ts": "2026-11-30T06:40:00.123Z", "level": "INFO", "logger": "access", "msg": "request finished",
           "id": "req-3", "adapter": "sql", "status": 200, ...}
docs/serving.md lists the fields of each line.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from aiohttp.http_exceptions import HttpProcessingError

ROOT = "lorafleet"
server_log = logging.getLogger(f"{ROOT}.server")
access_log = logging.getLogger(f"{ROOT}.access")
adapter_log = logging.getLogger(f"{ROOT}.adapters")
steps_log = logging.getLogger(f"{ROOT}.steps")


def event(logger: logging.Logger, message: str, level: int = logging.INFO, **fields: object) -> None:
    """Log `message` with structured `fields` (None values are left out)."""
    if logger.isEnabledFor(level):
        logger.log(level, message, extra={"fields": {k: v for k, v in fields.items() if v is not None}})


def _timestamp(record: logging.LogRecord) -> str:
    ms = int(record.msecs)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{ms:03d}Z"


def _short(name: str) -> str:
    return name[len(ROOT) + 1:] if name.startswith(ROOT + ".") else name


def _text_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    text = str(value)
    quote = not text or any(c.isspace() or c in '"=' or not c.isprintable() for c in text)
    return json.dumps(text) if quote else text  # JSON escapes control characters (ESC, NUL, U+202E ...)


class TextFormatter(logging.Formatter):
    """`TIME LEVEL LOGGER message key=value ...` (values with spaces or any character that is not printable
    are JSON-quoted: a client-chosen name cannot break the line or send terminal escapes)."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        tail = "".join(f" {k}={_text_value(v)}" for k, v in fields.items())
        line = f"{_timestamp(record)} {record.levelname} {_short(record.name)} {record.getMessage()}{tail}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, then the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": _timestamp(record), "level": record.levelname, "logger": _short(record.name),
               "msg": record.getMessage()}
        for key, value in getattr(record, "fields", {}).items():
            out.setdefault(key, value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


class _Below(logging.Filter):
    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


class ClientHttpErrors(logging.Filter):
    """On aiohttp's `aiohttp.server` logger: a request that is not valid HTTP (a request line or header over
    aiohttp's limits, a bad chunk size, TLS or HTTP/2 bytes on the plain port ...) is the client's error,
    answered 400 by aiohttp. aiohttp logs it at ERROR with a traceback, as if the server had failed (and any
    client could fill the log with them); this filter drops that record and logs one INFO line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        reason = (exc.message or type(exc).__name__).splitlines()[0][:120]
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else None
        event(server_log, "malformed HTTP request refused", status=exc.code, reason=reason, remote=remote)
        return False


def setup_logging(fmt: str = "text", level: str = "info", access: bool = True) -> None:
    """Configure the `lorafleet` logger: `fmt` "text" or "json", `level` a logging level name; `access`
    False silences lorafleet.access. Replaces handlers a previous call installed."""
    root = logging.getLogger(ROOT)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(_Below(logging.WARNING))
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    for handler in (out, err):
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False
    access_log.disabled = not access
    aiohttp_server = logging.getLogger("aiohttp.server")
    for old in [f for f in aiohttp_server.filters if isinstance(f, ClientHttpErrors)]:
        aiohttp_server.removeFilter(old)
    aiohttp_server.addFilter(ClientHttpErrors())


def http_status(record) -> int:
    """The HTTP status a request record ended with: its own, else 200 for a finish, else by error code."""
    status = getattr(record, "status", None)
    if status is not None:
        return status
    if record.error_code is None:
        return 200
    return {"executor_failed": 503, "slo_unattainable": 429, "server_shutting_down": 503,
            "queue_full": 429}.get(record.error_code, 500)


class AccessLog:
    """A hub listener: one `lorafleet.access` line per request record (finished, failed or refused)."""

    def __call__(self, kind: str, item: object) -> None:
        if kind != "record":
            return
        r = item
        event(access_log, "request", id=r.id, adapter=r.adapter or "-", status=http_status(r),
              finish_reason=r.finish_reason, error=r.error_code, prompt_tokens=r.prompt_tokens,
              completion_tokens=r.completion_tokens, queue_ms=_ms(r.queue_ms), ttft_ms=_ms(r.ttft_ms),
              e2e_ms=_ms(r.e2e_ms))


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
