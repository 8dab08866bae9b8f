"""structlog set-up: readable on a terminal, JSON otherwise, and every secret redacted.

Logs go to stderr so `--json` output on stdout stays one clean JSON document.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

from connectors.secrets import redact, redact_value


def redact_secrets(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    """Last-line defence: no registered secret leaves in any field of any event."""
    return {k: redact_value(v) for k, v in event.items()}


def _redact_rendered(_logger: Any, _name: str, rendered: Any) -> Any:
    return redact(rendered) if isinstance(rendered, str) else rendered


class _CurrentStderr:
    """Whatever `sys.stderr` is when a line is written (test runners swap and close it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def configure_logging(
    *, json_logs: bool | None = None, level: str = "info", stream: TextIO | None = None
) -> None:
    stream = stream or _CurrentStderr()  # type: ignore[assignment]
    as_json = json_logs if json_logs is not None else not stream.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact_secrets,
            renderer,
            _redact_rendered,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    # Libraries that log through stdlib logging (urllib3, httpx) must not print tokens either.
    logging.basicConfig(level=logging.WARNING, stream=stream, force=True)  # type: ignore[arg-type]
    for handler in logging.getLogger().handlers:
        handler.addFilter(_RedactFilter())


class _RedactFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = ()
        return True
